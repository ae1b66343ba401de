"""``rnb bench mixing``: mixing methods x corpora x seeds, same model, seed and token budget.

Methods (:mod:`~rnb_kernels.experiments.methods`; default all named ones): ``stratified``,
``static`` (natural, size-proportional), ``odm`` (EXP3 on loss), ``dga-extra`` (the DGA paper:
an extra forward/backward per domain every round), ``dga`` (per-domain gradients from the
training backward, no extra pass), ``rnb-original`` and ``rnb-regrouped`` (R&B on the corpus'
own domains and on regrouped clusters); any registered mixer is accepted by name too.

Every run reports the final eval loss (overall, and mean / worst over the original domains)
and the measured mixing overhead (time spent on the mixture as a % of the rest of the
training loop). Writes ``mixing_<preset>.csv`` (one row per run, with the environment
columns of :mod:`~rnb_kernels.experiments.harness`), ``mixing_<preset>.md`` (mean ± std over
seeds) and ``mixing_<preset>_<corpus>.png`` into the results directory (``--out``, else
``benchmarks/results`` of a source checkout, else ``./benchmark_results``).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import BENCH_PRESETS, ExperimentConfig
from ..data import prepare
from ..harness import append_csv, environment, results_dir
from ..methods import resolve_methods
from ..train import run_methods

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "run_mixing", "summarize"]


def run_mixing(
    cfg: ExperimentConfig,
    corpora: list[str],
    out: Path,
    preset: str = "custom",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train every (corpus, seed, method) of ``cfg``; one row per run, each also appended to
    ``out/mixing_<preset>.csv`` as soon as it finishes."""
    info = environment(cfg.train.device)
    rows: list[dict[str, Any]] = []
    csv_path = out / f"mixing_{preset}.csv"
    for corpus in corpora:
        ccfg = cfg.replace(corpus=corpus)
        for seed in cfg.seeds:
            work = out / f"mixing_{preset}_work" / f"{corpus}_s{seed}"
            work.mkdir(parents=True, exist_ok=True)
            prep = prepare(
                ccfg.corpus, vocab_cap=cfg.model.vocab_size, context=cfg.model.context,
                seed=seed, out=work,
            )  # fmt: skip
            for method, r in run_methods(
                ccfg, prep, seed=seed, log_dir=work / "logs", progress=progress
            ):
                row = {
                    "preset": preset, "corpus": corpus, "seed": seed, **r.summary(),
                    "wall_s": round(r.wall_s, 2), "tokens": cfg.tokens_per_run(), **info,
                }  # fmt: skip
                logger.info("%s/%s/s%d: eval %.4f overhead %.2f%%", corpus, method.name, seed,
                            row["eval_loss"], row["overhead_pct"])  # fmt: skip
                rows.append(row)
                append_csv(csv_path, [row])
    return rows


def _mean_std(v: list[float]) -> str:
    a = np.asarray(v, dtype=np.float64)
    return f"{a.mean():.4f} ± {a.std(ddof=1) if a.size > 1 else 0.0:.4f}"


def summarize(rows: list[dict[str, Any]]) -> str:
    """Markdown: per corpus and method, mean ± std over seeds."""
    lines = [
        "| corpus | method | domains | seeds | eval loss | per-domain mean | per-domain worst "
        "| mixing overhead % |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    keys = dict.fromkeys((r["corpus"], r["method"]) for r in rows)
    for corpus, method in keys:
        rs = [r for r in rows if r["corpus"] == corpus and r["method"] == method]
        ov = np.asarray([r["overhead_pct"] for r in rs], dtype=np.float64)
        lines.append(
            f"| {corpus} | {method} | {rs[0]['domains']} | {len(rs)} "
            f"| {_mean_std([r['eval_loss'] for r in rs])} "
            f"| {_mean_std([r['domain_mean'] for r in rs])} "
            f"| {_mean_std([r['domain_worst'] for r in rs])} "
            f"| {ov.mean():.2f} ± {ov.std(ddof=1) if ov.size > 1 else 0.0:.2f} |"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(BENCH_PRESETS), default="cpu")
    p.add_argument("--corpora", default="fortunes,ni", help="comma-separated: fortunes, ni")
    p.add_argument(
        "--seeds", default=None, help="comma-separated seeds (>= 3 for std; default 0,1,2)"
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated (default: every named method); a named method, or any "
        "registered mixer with optional -regrouped / -extra suffixes",
    )
    p.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    p.add_argument("--device", default=None, help="default: cuda for the gpu preset, else cpu")
    p.add_argument("--out", default=None, help="default benchmarks/results")
    p.add_argument("--no-progress", action="store_true")


def _csv_list(text: str | None, kind: type = str) -> tuple | None:
    return None if text is None else tuple(kind(v) for v in text.split(",") if v)


def run(args: argparse.Namespace) -> int:
    import torch

    cfg = BENCH_PRESETS[args.preset].replace(
        steps=args.steps, device=args.device, seeds=_csv_list(args.seeds, int),
        methods=_csv_list(args.methods),
    )  # fmt: skip
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"preset {args.preset!r} needs a CUDA device and none is available here")
        return 2
    try:
        resolve_methods(cfg.methods)
    except ValueError as exc:
        print(exc)
        return 2
    out = results_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpora = list(_csv_list(args.corpora))
    t = time.perf_counter()
    rows = run_mixing(cfg, corpora, out, args.preset, not args.no_progress)
    from ..plots import plot_method_bars

    md = summarize(rows)
    model, tr = cfg.model, cfg.train
    head = (
        f"`rnb bench mixing --preset {args.preset}` on {rows[0]['hardware']} "
        f"(torch {rows[0]['torch']}, git {rows[0]['git_sha']}), {len(cfg.seeds)} seeds, "
        f"model {model.n_layer}x{model.n_embd}, T={model.context}, {tr.steps} steps x "
        f"{tr.batch_size} sequences.\n\n"
    )
    (out / f"mixing_{args.preset}.md").write_text(head + md + "\n")
    for corpus in corpora:
        rs = [r for r in rows if r["corpus"] == corpus]
        stats = {}
        for method in dict.fromkeys(r["method"] for r in rs):
            v = np.asarray([r["eval_loss"] for r in rs if r["method"] == method])
            stats[method] = (float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0)
        plot_method_bars(
            stats, out / f"mixing_{args.preset}_{corpus}.png", "final eval loss",
            title=f"{corpus}: eval loss, mean ± std over {len(cfg.seeds)} seeds",
        )  # fmt: skip
    print(head + md)
    print(
        f"\n{len(rows)} runs in {time.perf_counter() - t:.0f}s; wrote {out}/mixing_{args.preset}.*"
    )
    return 0
