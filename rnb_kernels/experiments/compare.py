"""A comparison over seeds, and the statistics a reviewer asks for.

:func:`run_comparison` prepares the corpus of one scenario per seed and trains every method of
an :class:`~.config.ExperimentConfig` on it (the same model init, seed and token budget for each
method of a seed), evaluating on the test split (reported results) or on the validation split
(hyper-parameter selection, ``rnb bench sweep``) — never both.

:func:`aggregate` turns the per-run rows into one row per method:

* ``eval_loss`` mean ± std over seeds;
* ``diff`` = method − stratified, paired by seed, with its 95% Student-t interval (a
  negative difference is a lower loss than stratified; the interval excludes zero when the
  seeds agree);
* ``gap_closed`` = (stratified − method) / (stratified − oracle), computed per seed, with the
  mean and 95% Student-t interval over seeds (when the run includes ``oracle`` and the oracle
  beats stratified beyond noise: with several seeds, its own paired interval must exclude 0);
* per-domain eval loss over the evaluated domains: mean and worst, mean over seeds;
* ``target_share``: share of the training samples drawn from the target domains (what a
  mixer moved toward);
* ``cost`` = the method's training time / stratified's training time in the same seed (the
  full cost of mixing: tracking, statistics, updates, target batches, extra passes), mean ±
  std over seeds; measured in CPU time of the process (``train_cpu_s``), which other
  processes on a shared machine disturb far less than wall time; ``cost_wall`` is the same
  ratio in wall time.

:func:`format_table` prints them as a markdown table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import ExperimentConfig
from .data import PreparedData, prepare
from .harness import paired_t, t_interval
from .methods import Method
from .train import TrainResult, run_methods

logger = logging.getLogger(__name__)

__all__ = [
    "Comparison",
    "aggregate",
    "format_per_domain",
    "format_table",
    "plot_comparison",
    "run_comparison",
]


@dataclass
class Comparison:
    """Every run of a comparison.

    Attributes:
        rows: one :meth:`~.train.TrainResult.summary` per (seed, method), plus ``corpus``,
            ``scenario``, ``seed`` and ``tokens``.
        results: ``{seed: {method name: TrainResult}}``.
        methods: ``{method name: Method}``.
        prepared: the :class:`~.data.PreparedData` every seed trained on.
        per_domain: one row per (seed, method, evaluated original domain): its eval loss, the
            share of the run's training samples drawn from it, and its mean tokens per
            training example.
        wall_s: wall time of the whole comparison.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    results: dict[int, dict[str, TrainResult]] = field(default_factory=dict)
    methods: dict[str, Method] = field(default_factory=dict)
    prepared: PreparedData | None = None
    per_domain: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0


def run_comparison(
    cfg: ExperimentConfig,
    work: str | Path,
    *,
    evaluate_on: str = "test",
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    prepared: PreparedData | None = None,
) -> Comparison:
    """Prepare ``cfg.corpus`` (its scenario, data seed ``cfg.corpus.seed``) once, then train
    every (seed, method) of ``cfg`` on it.

    Args:
        work: the partition goes to ``work/partition``, per-seed logs to
            ``work/s<seed>/logs``.
        evaluate_on: ``"test"`` or ``"val"`` (see :func:`~.train.run_methods`).
        on_row: called with each row as soon as its run finishes (e.g. to append a CSV).
        prepared: reuse this preparation of ``cfg.corpus`` instead of preparing it.
    """
    work = Path(work)
    t0 = time.perf_counter()
    comp = Comparison()
    if prepared is None:
        prepared = prepare(
            cfg.corpus, vocab_cap=cfg.model.vocab_size, context=cfg.model.context, out=work
        )
    comp.prepared = prepared
    target = ",".join(cfg.corpus.target_keywords) if cfg.corpus.scenario == "target-shift" else ""
    for seed in cfg.seeds:
        wdir = work / f"s{seed}"
        wdir.mkdir(parents=True, exist_ok=True)
        comp.results[seed] = {}
        for method, r in run_methods(
            cfg, prepared, seed=seed, evaluate_on=evaluate_on, log_dir=wdir / "logs",
            progress=progress,
        ):  # fmt: skip
            comp.methods[method.name] = method
            comp.results[seed][method.name] = r
            share = prepared.target_share(method.domains)
            row = {
                "corpus": cfg.corpus.name, "scenario": cfg.corpus.scenario, "target": target,
                "seed": seed,
                **r.summary(evaluate_on),
                # Share of the run's training samples that came from the target domains.
                "target_share": float(r.domain_counts @ share / r.domain_counts.sum()),
                "wall_s": round(r.wall_s, 2), "tokens": cfg.tokens_per_run(),
            }  # fmt: skip
            comp.rows.append(row)
            drawn = r.domain_counts @ prepared.composition(method.domains)
            drawn = drawn / max(drawn.sum(), 1.0)
            per = r.per_domain[evaluate_on]
            names = prepared.corpus.label_names
            tokens = prepared.tokens_per_example()
            for d in np.flatnonzero(np.isfinite(per)):
                comp.per_domain.append({
                    "corpus": cfg.corpus.name, "scenario": cfg.corpus.scenario,
                    "target": target, "seed": seed,
                    "method": method.name, "domain": names[d], "split": evaluate_on,
                    "loss": float(per[d]), "drawn_share": float(drawn[d]),
                    "tokens": float(tokens[d]),
                })  # fmt: skip
            if on_row is not None:
                on_row(row)
    comp.wall_s = time.perf_counter() - t0
    return comp


def _mean_std(values: Iterable[float]) -> tuple[float, float]:
    a = np.asarray(list(values), dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def aggregate(
    rows: Sequence[dict[str, Any]], reference: str = "stratified", oracle: str = "oracle"
) -> list[dict[str, Any]]:
    """One row per (corpus, scenario, target, method) with the statistics of the module
    docstring.

    Seeds are paired by their ``seed`` value; a method's differences use the seeds it shares
    with ``reference`` (and ``oracle`` for the gap).
    """
    out = []
    groups = dict.fromkeys((r["corpus"], r["scenario"], r.get("target", "")) for r in rows)
    for corpus, scenario, target in groups:
        rs = [
            r
            for r in rows
            if (r["corpus"], r["scenario"], r.get("target", "")) == (corpus, scenario, target)
        ]
        by = {}
        for r in rs:
            by.setdefault(r["method"], {})[int(r["seed"])] = r
        ref, orc = by.get(reference, {}), by.get(oracle, {})
        for method, seeds in by.items():
            loss = [float(seeds[s]["eval_loss"]) for s in sorted(seeds)]
            row: dict[str, Any] = {
                "corpus": corpus,
                "scenario": scenario,
                "target": target,
                "method": method,
                "domains": int(next(iter(seeds.values()))["domains"]),
                "seeds": len(seeds),
                "eval_loss": _mean_std(loss),
                "domain_mean": _mean_std(float(seeds[s]["domain_mean"]) for s in seeds),
                "domain_worst": _mean_std(float(seeds[s]["domain_worst"]) for s in seeds),
                "target_share": _mean_std(
                    float(seeds[s].get("target_share", "nan")) for s in seeds
                ),
                "diff": None,
                "gap_closed": None,
                "cost": None,
                "cost_wall": None,
            }
            common = sorted(set(seeds) & set(ref))
            if common and method != reference:
                a = [float(seeds[s]["eval_loss"]) for s in common]
                b = [float(ref[s]["eval_loss"]) for s in common]
                row["diff"] = paired_t(a, b)
            if common:
                row["cost_wall"] = _mean_std(
                    float(seeds[s]["train_s"]) / float(ref[s]["train_s"]) for s in common
                )
                key = "train_cpu_s" if all(
                    seeds[s].get("train_cpu_s") not in (None, "") for s in common
                ) else "train_s"  # fmt: skip
                row["cost"] = _mean_std(float(seeds[s][key]) / float(ref[s][key]) for s in common)
            both = sorted(set(seeds) & set(ref) & set(orc))
            if len(both) > 1:
                # A gap to close exists only when the oracle is lower than stratified beyond
                # noise (its paired interval excludes 0); in-distribution it usually is not.
                hi = paired_t(
                    [float(orc[s]["eval_loss"]) for s in both],
                    [float(ref[s]["eval_loss"]) for s in both],
                )[2]
                if not hi < 0:
                    both = []
            if both and method not in (reference, oracle):
                gaps = []
                for s in both:
                    r0, ro = float(ref[s]["eval_loss"]), float(orc[s]["eval_loss"])
                    gaps.append((r0 - float(seeds[s]["eval_loss"])) / (r0 - ro))
                row["gap_closed"] = t_interval(gaps)
            out.append(row)
    return out


def _pm(v: tuple[float, float] | None, digits: int = 4) -> str:
    return "" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def _ci(v: tuple[float, float, float] | None, digits: int = 4, pct: bool = False) -> str:
    if v is None:
        return ""
    mean, lo, hi = v
    if pct:
        if not np.isfinite(lo):
            return f"{100 * mean:.0f}%"
        return f"{100 * mean:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"
    if not np.isfinite(lo):
        return f"{mean:+.{digits}f}"
    star = " *" if hi < 0 or lo > 0 else ""
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{star}"


def format_table(
    summary: Sequence[dict[str, Any]], *, with_group: bool = False, split: str = "test"
) -> str:
    """Markdown table of :func:`aggregate` rows (losses on ``split``).

    ``*`` marks a difference whose 95% interval excludes zero.
    """
    head = (
        f"| method | domains | seeds | {split} loss | Δ vs stratified [95% CI] "
        "| gap closed [95% CI] | per-domain mean | per-domain worst | target share "
        "| time / stratified (CPU, wall) |"
    )
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if with_group:
        head = "| corpus | scenario " + head
        sep = "|---|---" + sep
    lines = [head, sep]
    for r in summary:
        cells = [
            r["method"], str(r["domains"]), str(r["seeds"]), _pm(r["eval_loss"]),
            _ci(r["diff"]), _ci(r["gap_closed"], pct=True), _pm(r["domain_mean"]),
            _pm(r["domain_worst"]), f"{100 * r['target_share'][0]:.0f}%",
            "" if r["cost"] is None
            else f"{r['cost'][0]:.2f}×, {r['cost_wall'][0]:.2f}×",
        ]  # fmt: skip
        if with_group:
            cells = [r["corpus"], r["scenario"], *cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_per_domain(
    per_domain: Sequence[dict[str, Any]], methods: Sequence[str] | None = None
) -> str:
    """Markdown: one row per evaluated domain, one column per method: eval loss (mean over
    seeds) and, in parentheses, the share of training samples drawn from that domain."""
    from .data import short_domain_name

    methods = list(methods or dict.fromkeys(r["method"] for r in per_domain))
    domains = list(dict.fromkeys(r["domain"] for r in per_domain))
    cell: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in per_domain:
        cell.setdefault((r["domain"], r["method"]), []).append((r["loss"], r["drawn_share"]))
    lines = [
        "| domain | " + " | ".join(methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    for d in domains:
        cells = []
        for m in methods:
            v = np.asarray(cell.get((d, m), []), dtype=np.float64)
            cells.append(f"{v[:, 0].mean():.3f} ({100 * v[:, 1].mean():.1f}%)" if v.size else "")
        lines.append(f"| {short_domain_name(d)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(comp: Comparison, eval_png: str | Path, weights_png: str | Path) -> None:
    """Two figures: the eval loss curves of every method (mean over seeds, band = lowest to
    highest seed) and the mixtures of the first seed as stacked areas (top domains named,
    regrouped clusters by their key terms, the target share as a dashed line)."""
    from .plots import plot_eval_curves, plot_weights

    prep = comp.prepared
    seeds = list(comp.results)
    names = list(comp.methods)
    curves = {}
    for name in names:
        runs = [comp.results[s][name] for s in seeds if name in comp.results[s]]
        curves[name] = (runs[0].eval_steps, np.stack([r.eval_losses for r in runs]))
    split = comp.results[seeds[0]][names[0]].curve
    split = {"test": "test", "val": "validation"}.get(split, split)
    target = (
        "the target domains" if prep.scenario == "target-shift"
        else f"all {prep.num_original} domains"
    )  # fmt: skip
    band = f"; band: lowest..highest of {len(seeds)} seeds" if len(seeds) > 1 else ""
    plot_eval_curves(
        curves, eval_png, ylabel=f"{split} loss (nats/token)",
        title=f"{prep.corpus.name}, {prep.scenario}: {split} loss on {target}{band}",
    )  # fmt: skip
    # Methods whose weights never move (stratified, static, oracle) would say nothing.
    first = comp.results[seeds[0]]
    moving = [n for n in names if comp.methods[n].mixer not in ("stratified", "static")]
    if not moving:
        return
    shares = {n: prep.target_share(comp.methods[n].domains) for n in moving}
    names = {n: prep.domain_names(comp.methods[n].domains) for n in moving}
    if prep.scenario == "target-shift":  # mark the target domains / target-heavy clusters
        for n in moving:
            names[n] = [
                f"★ {name}" + (f" ({100 * s:.0f}% target)" if s < 1 else "") if s >= 0.5 else name
                for name, s in zip(names[n], shares[n])
            ]
    plot_weights(
        {n: (first[n].weight_steps, first[n].weights) for n in moving},
        weights_png,
        names=names,
        # In-distribution every domain is a target: a line at 1 would say nothing.
        target_share=shares if prep.scenario == "target-shift" else None,
        title=f"{prep.corpus.name}, {prep.scenario}: the mixture over time (seed {seeds[0]}; "
        "★ = target domain)"
        if prep.scenario == "target-shift"
        else f"{prep.corpus.name}, {prep.scenario}: the mixture over time (seed {seeds[0]})",
    )
