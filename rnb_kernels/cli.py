"""The ``rnb`` command."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommands live next to their feature; each module provides add_parser(sub) and run(args).
# The command line sits on top of every layer: it names the experiments' modules here and
# imports them only when it builds its parser; no library module imports them.
_SUBCOMMANDS = {
    "backends": "rnb_kernels.cli",
    "regroup": "rnb_kernels.regroup.cli",
    "demo": "rnb_kernels.experiments.demo",
    "bench": "rnb_kernels.experiments.bench.cli",
}


def add_parser(sub) -> None:
    sub.add_parser("backends", help="show which kernel backends can run here")


def run(args) -> int:
    from ._backends import backends

    for name, status in backends().items():
        mark = "yes" if status.available else "no "
        print(f"{name:7s} {mark}  {status.reason}")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="rnb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules: dict[str, object] = {}
    for name, mod_name in _SUBCOMMANDS.items():
        try:
            mod = (
                sys.modules[__name__] if mod_name == __name__ else importlib.import_module(mod_name)
            )
        except ImportError:
            continue
        mod.add_parser(sub)
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
