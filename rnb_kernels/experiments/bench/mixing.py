"""``rnb bench mixing``: mixing methods x scenarios x seeds, same model, seed and token budget.

Scenarios (:class:`~rnb_kernels.experiments.config.CorpusConfig`): ``target-shift`` (the pool
holds every domain, the evaluation only a target family; the DGA paper's setting) and
``in-distribution`` (train and evaluate on the same domains; the R&B paper's setting).

Methods (:mod:`~rnb_kernels.experiments.methods`; default all named ones): ``stratified``,
``oracle`` (static weights on the target's own domains), ``static`` (natural,
size-proportional), ``odm`` (EXP3 on loss), ``dga-extra`` (the DGA paper: an extra
forward/backward per domain every round), ``dga`` (per-domain gradients from the training
backward, no extra pass), ``rnb-original`` and ``rnb-regrouped`` (R&B on the corpus' own
domains and on regrouped clusters); any registered mixer is accepted by name too.

Every run is evaluated on the **test** split (hyper-parameters are chosen on the validation
split by ``rnb bench sweep``, never here). Writes ``mixing_<preset>.csv`` (one row per run,
with the environment columns of :mod:`~rnb_kernels.experiments.harness`),
``mixing_<preset>.md`` (per scenario: mean ± std over seeds, paired differences to stratified
with 95% intervals, the share of the stratified→oracle gap closed, per-domain mean and worst,
cost relative to stratified; per target domain: loss and share of samples drawn),
``mixing_<preset>_per_domain.csv`` (one row per seed, method and evaluated domain) and, per
scenario, ``mixing_<preset>_<corpus>_<scenario>.png``
(eval curves) and ``..._weights.png`` (mixtures) into the results directory (``--out``, else
``benchmarks/results`` of a source checkout, else ``./benchmark_results``).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from ..compare import (
    Comparison,
    aggregate,
    format_per_domain,
    format_table,
    plot_comparison,
    run_comparison,
)
from ..config import BENCH_PRESETS, SCENARIOS, ExperimentConfig
from ..harness import append_csv, environment, results_dir, write_csv
from ..methods import resolve_methods

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "report", "run", "run_mixing"]


def run_mixing(
    cfg: ExperimentConfig,
    corpora: list[str],
    scenarios: list[str],
    out: Path,
    preset: str = "custom",
    progress: bool = True,
) -> dict[tuple[str, str], Comparison]:
    """Train every (corpus, scenario, seed, method) of ``cfg``, evaluated on the test split;
    each row is appended to ``out/mixing_<preset>.csv`` as soon as its run finishes.

    Returns:
        ``{(corpus, scenario): Comparison}``.
    """
    info = environment(cfg.train.device)
    csv_path = out / f"mixing_{preset}.csv"
    comps = {}
    for corpus in corpora:
        for spec in scenarios:
            scenario, keywords = parse_scenario(spec)
            ccfg = cfg.replace(corpus=corpus, scenario=scenario, target=keywords or None)
            work = out / f"mixing_{preset}_work" / f"{corpus}_{_slug(spec)}"

            def on_row(row: dict[str, Any]) -> None:
                row = {"preset": preset, **row, **info}
                logger.info("%s/%s/%s/s%d: test loss %.4f, %.1fs", row["corpus"],
                            row["scenario"], row["method"], row["seed"], row["eval_loss"],
                            row["train_s"])  # fmt: skip
                append_csv(csv_path, [row])

            comps[(corpus, spec)] = run_comparison(
                ccfg, work, evaluate_on="test", progress=progress, on_row=on_row
            )
    return comps


def _slug(spec: str) -> str:
    return spec.replace(":", "-").replace("+", "-")


def parse_scenario(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"target-shift"``, ``"in-distribution"`` or ``"target-shift:kw1+kw2"`` (target
    keywords) -> ``(scenario, keywords)``; raises ``ValueError`` for anything else."""
    scenario, _, keywords = spec.partition(":")
    if scenario not in SCENARIOS or (keywords and scenario != "target-shift"):
        raise ValueError(
            f"unknown scenario {spec!r}: use {', '.join(SCENARIOS)}, or target-shift:KEYWORD"
        )
    return scenario, tuple(k for k in keywords.split("+") if k)


def report(
    comps: dict[tuple[str, str], Comparison], cfg: ExperimentConfig, preset: str, out: Path
) -> str:
    """The markdown of ``mixing_<preset>.md``, and the plots of every scenario."""
    from ..demo import describe

    env = environment(cfg.train.device)
    dirty = "+dirty" if env["git_dirty"] is True else ""
    parts = [
        f"# `rnb bench mixing --preset {preset}`\n",
        f"{env['hardware']} ({env['threads']} torch threads), torch {env['torch']}, git "
        f"{env['git_sha']}{dirty}; 1-min load average {env['load_avg_1min']} when the report "
        "was written (a shared machine: timings are noisy, losses are not affected).\n",
        "Test loss in nats/token (hyper-parameters were chosen on the validation split, "
        "`mixing_sweep_*`). Δ = method − stratified, paired by seed, 95% Student-t interval "
        "(* = excludes 0; negative = better than stratified). Gap closed = (stratified − "
        "method) / (stratified − oracle) per seed, mean and 95% Student-t interval. "
        "Per-domain: mean and worst over the evaluated domains. Target share: share of the "
        "training samples drawn from the target domains. Time / stratified: training-loop time "
        "(mixing included, evaluation excluded) over stratified's in the same seed and "
        "process, in CPU time of the process (steady on a shared machine) and in wall time.\n",
    ]
    for (corpus, spec), comp in comps.items():
        scenario = spec.partition(":")[0]
        prep = comp.prepared
        meta = {
            "corpus": prep.corpus.name,
            "scenario": scenario,
            "original_domains": prep.num_original,
            "target_domains": [prep.corpus.label_names[i] for i in prep.target_domains],
            "sizes": {k: len(v) for k, v in prep.data.items()},
            "regrouped_k": int(prep.partition.k),
            "model": {**cfg.model.to_dict(), "vocab_size": prep.vocab.size},
            "tokens_per_run": cfg.tokens_per_run(),
            "seeds": list(cfg.seeds),
        }
        stem = f"mixing_{preset}_{corpus}_{_slug(spec)}"
        plot_comparison(comp, out / f"{stem}.png", out / f"{stem}_weights.png")
        target = comp.rows[0].get("target", "") if comp.rows else ""
        title = f"{scenario} (target: {target})" if scenario == "target-shift" else scenario
        parts.append(f"## {corpus}, {title}\n")
        parts.append(describe(meta) + f" Wall {comp.wall_s:.0f}s.\n")
        parts.append(format_table(aggregate(comp.rows)) + "\n")
        if scenario == "target-shift":
            parts.append(
                "Per target domain: test loss, mean over seeds (share of the training samples "
                "drawn from the domain):\n"
            )
            parts.append(format_per_domain(comp.per_domain) + "\n")
        parts.append(f"![eval loss]({stem}.png)\n\n![mixture]({stem}_weights.png)\n")
    return "\n".join(parts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(BENCH_PRESETS), default="cpu")
    p.add_argument("--corpora", default="ni", help="comma-separated: ni, fortunes")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated: " + ", ".join(SCENARIOS) + "; target-shift:KEYWORD[+KEYWORD] "
        "picks other target domains (e.g. target-shift:multirc)",
    )
    p.add_argument(
        "--seeds", default=None, help="comma-separated seeds (>= 3 for intervals; default 0,1,2)"
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated (default: every named method); a named method, or any "
        "registered mixer with optional -regrouped / -extra suffixes",
    )
    p.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    p.add_argument("--device", default=None, help="default: cuda for the gpu preset, else cpu")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's default)"
    )
    p.add_argument("--out", default=None, help="default benchmarks/results")
    p.add_argument("--no-progress", action="store_true")


def _csv_list(text: str | None, kind: type = str) -> tuple | None:
    return None if text is None else tuple(kind(v) for v in text.split(",") if v)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.contrib.logging import logging_redirect_tqdm

    cfg = BENCH_PRESETS[args.preset].replace(
        steps=args.steps, device=args.device, seeds=_csv_list(args.seeds, int),
        methods=_csv_list(args.methods),
    )  # fmt: skip
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"preset {args.preset!r} needs a CUDA device and none is available here")
        return 2
    scenarios = list(_csv_list(args.scenarios))
    try:
        resolve_methods(cfg.methods)
        for spec in scenarios:
            parse_scenario(spec)
    except ValueError as exc:
        print(exc)
        return 2
    if args.threads and not cfg.train.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    out = results_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpora = list(_csv_list(args.corpora))
    t = time.perf_counter()
    with logging_redirect_tqdm():
        comps = run_mixing(cfg, corpora, scenarios, out, args.preset, not args.no_progress)
    md = report(comps, cfg, args.preset, out)
    write_csv(
        out / f"mixing_{args.preset}_per_domain.csv",
        [r for c in comps.values() for r in c.per_domain],
    )
    (out / f"mixing_{args.preset}.md").write_text(md)
    print(md)
    n = sum(len(c.rows) for c in comps.values())
    print(f"\n{n} runs in {time.perf_counter() - t:.0f}s; wrote {out}/mixing_{args.preset}.*")
    return 0
