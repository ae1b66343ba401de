"""``rnb demo``: regroup a real corpus, then train the same small GPT under Stratified, DGA
and R&B (original and regrouped domains) with the same seed and token budget, and compare.

Natural Instructions v1 (61 task domains, from the BIG-bench archive, fetched and cached on
first use) by default; Debian fortunes (``--corpus fortunes``) as the small fallback.
``--quick`` is the CI-sized run (about a minute on fortunes). ``--methods a,b,...`` picks the
runs: a named method (``stratified``, ``dga``, ``dga-extra``, ``rnb-original``,
``rnb-regrouped``, ...) or any registered mixer, optionally suffixed ``-regrouped``.

Writes to ``--out`` (default ``out/demo``): ``results.csv``, ``results.md`` (the printed
table), ``eval_loss.png``, ``weights.png``, ``partition/`` (the regrouping), per-run logs under
``logs/`` and ``demo.log``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import DEMO, QUICK, ExperimentConfig
from .data import PreparedData, prepare
from .methods import Method, resolve_methods
from .train import TrainResult, run_methods

logger = logging.getLogger(__name__)

__all__ = ["add_parser", "format_table", "run", "run_demo"]


def run_demo(cfg: ExperimentConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the whole comparison on ``cfg.seeds[0]``.

    Returns:
        ``{"rows": [one summary per method], "results": {name: TrainResult}, "meta": {...},
        "out": Path}``.
    """
    out = Path(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    seed = cfg.seeds[0]
    t_all = time.perf_counter()
    prep = prepare(
        cfg.corpus, vocab_cap=cfg.model.vocab_size, context=cfg.model.context, seed=seed, out=out
    )
    runs = {
        method.name: (method, result)
        for method, result in run_methods(
            cfg, prep, seed=seed, log_dir=out / "logs", progress=progress
        )
    }
    wall = time.perf_counter() - t_all

    rows = [result.summary() for _, result in runs.values()]
    _write_outputs(out, rows, runs, prep)
    meta = {
        "config": cfg.to_dict(),
        "seed": seed,
        "model": {**cfg.to_dict()["model"], "vocab_size": prep.vocab.size},
        "corpus": prep.corpus.name,
        "n_train": len(prep.train),
        "n_eval": len(prep.eval),
        "original_domains": prep.num_original,
        "regrouped_k": prep.partition.k,
        "tokenizer": prep.tokenizer,
        "vocab_coverage": prep.vocab.coverage,
        "timings": {**prep.timings, "wall_s": wall},
        "tokens_per_run": cfg.tokens_per_run(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    results = {name: result for name, (_, result) in runs.items()}
    return {"rows": rows, "results": results, "meta": meta, "out": out}


def format_table(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    """The table ``rnb demo`` prints (GitHub markdown, readable as plain text)."""
    head = (
        "| method | domains | eval loss | per-domain mean | per-domain worst "
        "| mixing overhead | train time |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['domains']} | {r['eval_loss']:.4f} | {r['domain_mean']:.4f} "
            f"| {r['domain_worst']:.4f} | {r['overhead_pct']:.2f}% | {r['train_s']:.1f}s |"
        )
    if meta:
        lines.append("")
        lines.append(
            f"corpus {meta['corpus']}: {meta['n_train']} train / {meta['n_eval']} eval texts, "
            f"{meta['original_domains']} original domains, regrouped k={meta['regrouped_k']}; "
            f"{meta['tokens_per_run']} training tokens per run; wall {meta['timings']['wall_s']:.0f}s"
        )
    return "\n".join(lines)


def _write_outputs(
    out: Path,
    rows: list[dict[str, Any]],
    runs: dict[str, tuple[Method, TrainResult]],
    prep: PreparedData,
) -> None:
    from .plots import plot_eval_curves, plot_weights

    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for name, (_, r) in runs.items():
        np.save(out / "logs" / f"{name}.per_domain_eval.npy", r.per_domain_eval)
    plot_eval_curves(
        {n: (r.eval_steps, r.eval_losses) for n, (_, r) in runs.items()},
        out / "eval_loss.png",
        title=f"eval loss, {prep.corpus.name}",
    )
    # Stratified weights never move; its panel would say nothing.
    moving = {n: (m, r) for n, (m, r) in runs.items() if m.mixer != "stratified"}
    plot_weights(
        {n: (r.weight_steps, r.weights) for n, (_, r) in moving.items()},
        out / "weights.png",
        names={n: prep.domain_names(m.domains) for n, (m, _) in moving.items()},
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="regroup a real corpus and compare Stratified / DGA / R&B on a small GPT",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--corpus",
        choices=("ni", "fortunes"),
        default=None,
        help="ni (Natural Instructions v1; default) or fortunes (default with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="CI size: ~1 minute on fortunes")
    p.add_argument("--out", default="out/demo", help="output directory")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods (default: " + ",".join(DEMO.methods) + "); a named "
        "method, or any registered mixer with optional -regrouped / -extra suffixes",
    )
    p.add_argument("--embedder", default=None, help="regroup embedder: minilm or tfidf")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("-v", "--verbose", action="store_true")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    methods = None if args.methods is None else tuple(m for m in args.methods.split(",") if m)
    cfg = (QUICK if args.quick else DEMO).replace(
        corpus=args.corpus, steps=args.steps, embedder=args.embedder, methods=methods,
        seeds=(args.seed,),
    )  # fmt: skip
    try:
        resolve_methods(cfg.methods)
    except ValueError as exc:
        print(exc)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=fmt)
    fh = logging.FileHandler(out / "demo.log", mode="w")
    fh.setFormatter(logging.Formatter(fmt))
    logging.getLogger().addHandler(fh)
    try:
        res = run_demo(cfg, out, progress=not args.no_progress)
    finally:
        logging.getLogger().removeHandler(fh)
        fh.close()
    table = format_table(res["rows"], res["meta"])
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out}/: results.csv results.md eval_loss.png weights.png meta.json logs/")
    return 0
