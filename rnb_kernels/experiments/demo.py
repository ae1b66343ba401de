"""``rnb demo``: does data mixing help? Regroup a real corpus, then train the same GPT-Neo
under Stratified, the oracle, DGA and R&B over several seeds, and compare on held-out data.

Default: the **target-shift** scenario on Natural Instructions v1 (61 task domains, from the
BIG-bench archive, fetched with pip and cached on first use). The training pool holds every
task; the evaluation (test split) holds only the 7 Winogrande tasks; the mixers see a
256-example target sample of them (R&B: its proportions over the regrouped clusters as
``p_eval``; DGA: its gradient). The **oracle** trains on the target's own tasks only: the
reference a mixer should approach. ``--in-distribution`` trains and evaluates on the same 61
tasks instead (the R&B paper's setting).

Three seeds (model init, sampling order, target batches); the data split and the regrouping
are shared by every seed, so differences are paired on the same test set. The printed table
gives, per method, the test loss (mean ± std), the paired difference to stratified with its
95% interval, the share of the stratified→oracle gap closed, per-domain mean and worst, the
share of training samples drawn from the target tasks, and the training time relative to
stratified's in the same run.

``--quick`` is the CI-sized run (one seed on the fortunes corpus, about a minute).
``--methods a,b,...`` picks the runs: a named method (``stratified``, ``oracle``, ``static``,
``odm``, ``dga``, ``dga-extra``, ``rnb-original``, ``rnb-regrouped``) or any registered mixer,
optionally suffixed ``-regrouped``.

Writes to ``--out`` (default ``out/demo``): ``results.csv`` (one row per run),
``results.md`` (the printed table), ``eval_loss.png`` (test loss curves, band = lowest to
highest seed), ``weights.png`` (the mixtures of the first seed as stacked areas, top domains
named, regrouped clusters by their key terms), ``meta.json``, ``partition/`` (the
regrouping), per-run logs under ``s<seed>/logs/`` (the Balancer's full weights per round in
``<run>/mixture.{csv,jsonl}`` and TensorBoard) and ``demo.log``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from .compare import aggregate, format_table, plot_comparison, run_comparison
from .config import DEMO, QUICK, ExperimentConfig
from .harness import environment, write_csv
from .methods import resolve_methods

logger = logging.getLogger(__name__)

__all__ = ["add_parser", "describe", "run", "run_demo"]


def run_demo(cfg: ExperimentConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the comparison of ``cfg`` (every seed) on the test split, write the outputs.

    Returns:
        ``{"rows": [one row per run], "summary": [one row per method], "table": str,
        "meta": {...}, "comparison": Comparison, "out": Path}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    comp = run_comparison(cfg, out, evaluate_on="test", progress=progress)
    prep = comp.prepared
    summary = aggregate(comp.rows)
    env = environment(cfg.train.device)
    meta = {
        "config": cfg.to_dict(),
        "seeds": list(cfg.seeds),
        "model": {**cfg.model.to_dict(), "vocab_size": prep.vocab.size},
        "corpus": prep.corpus.name,
        "scenario": prep.scenario,
        "target_domains": [prep.corpus.label_names[i] for i in prep.target_domains],
        "sizes": {k: len(v) for k, v in prep.data.items()},
        "original_domains": prep.num_original,
        "regrouped_k": int(prep.partition.k),
        "tokenizer": prep.tokenizer,
        "vocab_coverage": prep.vocab.coverage,
        "timings": {**prep.timings, "wall_s": comp.wall_s},
        "tokens_per_run": cfg.tokens_per_run(),
        "environment": env,
    }
    table = describe(meta) + "\n\n" + format_table(summary) + "\n\n" + _notes(meta)
    write_csv(out / "results.csv", comp.rows)
    (out / "results.md").write_text(table + "\n")
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    plot_comparison(comp, out / "eval_loss.png", out / "weights.png")
    return {"rows": comp.rows, "summary": summary, "table": table, "meta": meta,
            "comparison": comp, "out": out}  # fmt: skip


def describe(meta: dict[str, Any]) -> str:
    """One paragraph: what was trained on what, and what was evaluated."""
    n = meta["sizes"]
    model = meta["model"]
    what = (
        f"**target shift** on {meta['corpus']}: the pool holds all {meta['original_domains']} "
        f"domains; test, validation and the target sample hold only the "
        f"{len(meta['target_domains'])} target domains ({', '.join(meta['target_domains'])})"
        if meta["scenario"] == "target-shift"
        else f"**in-distribution** on {meta['corpus']}: train and test on the same "
        f"{meta['original_domains']} domains"
    )
    return (
        f"{what}. {n['train']} training / {n['val']} validation / {n['test']} test texts; "
        f"the mixers see a {n['target']}-text target sample. Regrouped into "
        f"k={meta['regrouped_k']} clusters. GPT-Neo {model['n_layer']}x{model['n_embd']} "
        f"(vocab {model['vocab_size']}, T={model['context']}), "
        f"{meta['tokens_per_run']:,} training tokens per run, seeds "
        f"{', '.join(map(str, meta['seeds']))}."
    )


def _notes(meta: dict[str, Any]) -> str:
    env = meta["environment"]
    return (
        "Test loss in nats/token. Δ = method − stratified, paired by seed, with a 95% "
        "Student-t interval over seeds (* = the interval excludes 0; negative = better). Gap "
        "closed = (stratified − method) / (stratified − oracle) per seed, mean and 95% "
        "Student-t interval. Per-domain: over the evaluated domains, mean over seeds. Target "
        "share: share of training samples drawn from the target domains. Time / stratified: "
        "training-loop time (mixing included, evaluation excluded) over stratified's in the "
        "same seed, in CPU time of the process and in wall time, on "
        f"{env['hardware']} ({env['threads']} torch threads, 1-min load average "
        f"{env['load_avg_1min']} at the end; other processes make wall times noisy). Wall "
        f"{meta['timings']['wall_s']:.0f}s in all."
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="does mixing help? Stratified / oracle / DGA / R&B on GPT-Neo, several seeds",
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
    p.add_argument(
        "--in-distribution",
        action="store_true",
        help="train and evaluate on the same domains instead of the target shift",
    )
    p.add_argument("--target", default=None, help="comma-separated target-domain keywords")
    p.add_argument("--out", default="out/demo", help="output directory")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1,2)")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods (default: " + ",".join(DEMO.methods) + "); a named "
        "method, or any registered mixer with optional -regrouped / -extra suffixes",
    )
    p.add_argument("--embedder", default=None, help="regroup embedder: minilm or tfidf")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these small models gain little from more, and "
        "several threads slow down badly when other processes keep the cores busy; 0 = "
        "torch's default)",
    )
    p.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)  # old: one seed
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("-v", "--verbose", action="store_true")  # fmt: skip


def _csv(text: str | None, kind: type = str) -> tuple | None:
    return None if text is None else tuple(kind(v) for v in text.split(",") if v)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The preset (:data:`~.config.DEMO` or :data:`~.config.QUICK`) with the flags applied."""
    seeds = _csv(args.seeds, int) or ((args.seed,) if args.seed is not None else None)
    return (QUICK if args.quick else DEMO).replace(
        corpus=args.corpus, steps=args.steps, embedder=args.embedder, methods=_csv(args.methods),
        seeds=seeds, scenario="in-distribution" if args.in_distribution else None,
        target=_csv(args.target),
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.contrib.logging import logging_redirect_tqdm

    cfg = config_from_args(args)
    try:
        resolve_methods(cfg.methods)
    except ValueError as exc:
        print(exc)
        return 2
    if args.threads and not cfg.train.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s"
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format=fmt)
    fh = logging.FileHandler(out / "demo.log", mode="w")
    fh.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.addHandler(fh)
    # The package's records reach demo.log even where the root logger was configured already
    # (an embedding application, pytest).
    pkg = logging.getLogger("rnb_kernels")
    old_level = pkg.level
    pkg.setLevel(level)
    try:
        # Log lines go through tqdm.write, so they print above the progress bar, not into it.
        with logging_redirect_tqdm():
            res = run_demo(cfg, out, progress=not args.no_progress)
    finally:
        root.removeHandler(fh)
        fh.close()
        pkg.setLevel(old_level)
    print(res["table"])
    print(
        f"\nwrote {out}/: results.csv results.md eval_loss.png weights.png meta.json "
        "partition/ s<seed>/logs/ demo.log"
    )
    return 0
