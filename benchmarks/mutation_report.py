"""Summarise a mutmut run (``make mutation``) as a per-module table in Markdown.

Reads ``python -m mutmut results --all true`` (one ``name: status`` line per mutant) and writes
the score of each mutated module: killed (+ timeouts) over the mutants that were tested. A
``no tests`` mutant is code no selected test reaches; it counts against the score. Surviving
mutants judged equivalent are listed in ``EQUIVALENT`` below with the reason, and reported
separately (the score over non-equivalent mutants is the one the issue asks for).

Usage: python benchmarks/mutation_report.py [--out benchmarks/results/mutation.md]
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Surviving mutants that cannot change any observable behaviour, with the reason. Keys are
# mutmut's mutant names; keep this list short and argued.
EQUIVALENT: dict[str, str] = {}


def module_of(name: str) -> str:
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.startswith(("x_", "xǁ")):
            return ".".join(parts[:i])
    return name


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mutation.md"))
    ap.add_argument("--results", help="read mutmut results from this file instead of running")
    args = ap.parse_args()
    if args.results:
        text = Path(args.results).read_text()
    else:
        text = subprocess.run(
            [sys.executable, "-m", "mutmut", "results", "--all", "true"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    by_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors: dict[str, list[str]] = collections.defaultdict(list)
    for line in text.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if not m:
            continue
        name, status = m.group(1), m.group(2).strip()
        mod = module_of(name)
        if status == "survived" and name in EQUIVALENT:
            status = "equivalent"
        by_module[mod][status] += 1
        if status in ("survived", "no tests"):
            survivors[mod].append(f"{name} ({status})")
    rows = []
    tot = collections.Counter()
    for mod in sorted(by_module):
        c = by_module[mod]
        tot.update(c)
        rows.append((mod, c))
    rows.append(("**all**", tot))

    def score(c: collections.Counter) -> str:
        killed = c["killed"] + c["timeout"]
        tested = killed + c["survived"] + c["no tests"] + c["suspicious"] + c["segfault"]
        return "-" if tested == 0 else f"{100.0 * killed / tested:.1f}%"

    lines = [
        "| module | mutants | killed | timeout | survived | no tests | equivalent | score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mod, c in rows:
        n = sum(c.values())
        lines.append(
            f"| {mod} | {n} | {c['killed']} | {c['timeout']} | {c['survived']} | "
            f"{c['no tests']} | {c['equivalent']} | {score(c)} |"
        )
    body = "\n".join(lines)
    surv = "\n".join(
        f"- `{mod}`: " + ", ".join(f"`{s}`" for s in sorted(v))
        for mod, v in sorted(survivors.items())
    )
    Path(args.out).write_text(
        "# Mutation testing of the core\n\n"
        "Produced by `make mutation` (mutmut 3.8.1, config in `pyproject.toml` "
        "`[tool.mutmut]`; report by `benchmarks/mutation_report.py`). Score = (killed + "
        "timeout) / (mutants tested), equivalent mutants excluded.\n\n"
        f"{body}\n\n## Surviving mutants\n\n{surv or 'none'}\n"
    )
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
