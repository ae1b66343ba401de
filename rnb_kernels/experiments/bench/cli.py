"""``rnb bench mixing`` and ``rnb bench overhead``."""

from __future__ import annotations

import argparse
import importlib
import logging

_BENCHES = {
    "mixing": (
        "rnb_kernels.experiments.bench.mixing",
        "mixing methods x corpora x seeds: eval loss, overhead",
    ),
    "sweep": (
        "rnb_kernels.experiments.bench.sweep",
        "choose mixer hyper-parameters on the validation split",
    ),
    "overhead": (
        "rnb_kernels.experiments.bench.overhead",
        "step time tracked vs untracked vs the anchors",
    ),
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="benchmarks: mixing quality/cost, hyper-parameter sweep, tracking overhead"
    )
    bsub = p.add_subparsers(dest="bench", required=True)
    for name, (mod_name, help_) in _BENCHES.items():
        bp = bsub.add_parser(name, help=help_, description=help_)
        importlib.import_module(mod_name).add_arguments(bp)
        bp.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return int(importlib.import_module(_BENCHES[args.bench][0]).run(args) or 0)
