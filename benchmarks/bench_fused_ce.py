"""Fused linear cross-entropy vs the unfused head: peak memory and time of one forward +
backward of the LM-head loss, each configuration in a fresh process (clean peak RSS).

Configurations: ``unfused`` (``F.cross_entropy(lm_head(h))``), ``fused`` (the chunked loss),
each untracked and with the tracker on the head in sketch mode (so the statistics' own buffers
stay small and the difference is the logits). Prints a Markdown table and writes CSV.

Usage::

    python benchmarks/bench_fused_ce.py --tokens 4096 --vocab 50257 --hidden 768
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

CONFIGS = ["unfused", "fused", "unfused+tracker", "fused+tracker"]


def _one(cfg: str, n: int, vocab: int, hidden: int, m: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    head = nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(n, hidden, requires_grad=True)
    t = torch.randint(0, vocab, (n,))
    ids = torch.randint(0, m, (n,))
    tracker = None
    if cfg.endswith("+tracker"):
        from rnb_kernels.tracking import DomainGradientTracker

        tracker = DomainGradientTracker(head, m, mode="sketch", sketch_dim=8192)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    ctx = tracker.domains(ids) if tracker is not None else _null()
    with ctx:
        if cfg.startswith("fused"):
            from rnb_kernels.integrations.fused_ce import fused_linear_cross_entropy

            loss = fused_linear_cross_entropy(h, head.weight, t, tracker=tracker)
        else:
            loss = F.cross_entropy(head(h), t)
        loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"config": cfg, "tokens": n, "vocab": vocab, "hidden": hidden,
            "seconds": round(seconds, 3), "peak_rss_growth_mb": round(peak - base, 1),
            "loss": float(loss)}  # fmt: skip


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--domains", type=int, default=8)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--csv", default="benchmarks/results/fused_ce_cpu.csv")
    a = p.parse_args()
    if a.one:
        print(json.dumps(_one(a.one, a.tokens, a.vocab, a.hidden, a.domains)))
        return
    rows = []
    for cfg in CONFIGS:
        out = subprocess.run(
            [sys.executable, __file__, "--one", cfg, "--tokens", str(a.tokens),
             "--vocab", str(a.vocab), "--hidden", str(a.hidden), "--domains", str(a.domains)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    logits_mb = a.tokens * a.vocab * 4 / 2**20
    print(f"N={a.tokens} V={a.vocab} H={a.hidden}; fp32 logits alone: {logits_mb:.0f} MiB\n")
    print("| config | seconds | peak RSS growth (MiB) | loss |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['seconds']} | {r['peak_rss_growth_mb']} | {r['loss']:.5f} |")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
