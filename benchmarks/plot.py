"""Plot kernel benchmark CSVs: time as a ratio to the floor, per provider, against the target.

One figure per CSV (``benchmarks/results/kernels_gpu.csv`` -> ``kernels_gpu.png``), one panel
per op (exact, sketch, projected, gram), one group of bars per benchmarked shape, one bar per
provider; the floor is 1 (``dy.T @ x`` for exact/sketch/projected, the copy-bandwidth read of
``A`` for gram) and a black tick marks the performance target for that shape (see
``bench_kernels.py``). Only the latest run in each CSV (by timestamp and hardware) is drawn.
Reads rows written before the shared harness too (their ``hardware`` carries the thread count;
newer rows have a ``threads`` column).

Usage::

    python benchmarks/plot.py                      # every kernels_*.csv in the results directory
    python benchmarks/plot.py path/to/kernels_gpu.csv --out fig.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from rnb_kernels.experiments.harness import results_dir
from rnb_kernels.experiments.plots import pyplot

PROVIDER_ORDER = ["triton", "cuda", "torch", "torch-index_add", "cublas", "loop"]
OPS = ["exact", "sketch", "projected", "gram"]


def latest_run(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Rows of the most recent (timestamp, hardware) run in the file."""
    if not rows:
        return []
    last = max(rows, key=lambda r: r["timestamp"])
    return [
        r for r in rows if r["timestamp"] == last["timestamp"] and r["hardware"] == last["hardware"]
    ]


def shape_label(r: dict[str, str]) -> str:
    tokens = f" N={r['tokens']}" if r["tokens"] else ""
    return f"{r['layer']}{tokens} m={r['m']} {r['dtype']}"


def plot_csv(path: Path, out: Path) -> Path:
    with open(path, newline="") as f:
        rows = latest_run(list(csv.DictReader(f)))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    plt = pyplot()
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    n_shapes = max(len({shape_label(r) for r in rows if r["op"] == op}) for op in ops)
    fig, axes = plt.subplots(
        len(ops), 1, figsize=(max(8.0, 0.55 * n_shapes + 2), 3.6 * len(ops)), squeeze=False
    )
    colors = dict(zip(PROVIDER_ORDER, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, op in zip(axes[:, 0], ops):
        op_rows = [r for r in rows if r["op"] == op]
        shapes = list(dict.fromkeys(shape_label(r) for r in op_rows))
        provs = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in op_rows)]
        width = 0.8 / len(provs)
        for k, prov in enumerate(provs):
            xs, ys = [], []
            for i, s in enumerate(shapes):
                for r in op_rows:
                    if r["provider"] == prov and shape_label(r) == s:
                        xs.append(i - 0.4 + (k + 0.5) * width)
                        ys.append(float(r["ratio_to_floor"]))
            ax.bar(xs, ys, width, label=prov, color=colors[prov])
        for i, s in enumerate(shapes):
            target = next(float(r["target_ratio"]) for r in op_rows if shape_label(r) == s)
            ax.plot([i - 0.45, i + 0.45], [target, target], color="black", lw=1.2)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=60, ha="right", fontsize=7)
        floor = "copy-bandwidth read of A" if op == "gram" else "dy.T @ x"
        ax.set_ylabel(f"time / ({floor})")
        ax.set_title(f"{op}  (black tick: performance target)", fontsize=9)
        ax.legend(fontsize=7, ncol=len(provs))
    first = rows[0]
    threads = f" ({first['threads']} threads)" if first.get("threads") else ""
    fig.suptitle(
        f"{first['hardware']}{threads} | torch {first['torch']} triton {first['triton']} "
        f"cuda {first['cuda'] or '-'} | {first['git_sha']} | {first['timestamp']}",
        fontsize=8,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="ratio-to-floor bar charts of kernels_*.csv")
    ap.add_argument("csvs", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, help="output .png (only with a single CSV)")
    ap.add_argument("--results", type=Path, help="results directory (default benchmarks/results)")
    args = ap.parse_args(argv)
    folder = results_dir(args.results)
    paths = args.csvs or sorted(folder.glob("kernels_*.csv"))
    if not paths:
        raise SystemExit(f"no kernels_*.csv under {folder}")
    if args.out and len(paths) > 1:
        raise SystemExit("--out needs exactly one CSV")
    for p in paths:
        print(plot_csv(p, args.out or p.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
