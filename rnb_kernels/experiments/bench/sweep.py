"""``rnb bench sweep``: choose the mixers' hyper-parameters on the **validation** split.

A small coordinate-wise sweep, evaluated on the validation split only (the test split is not
even evaluated, so nothing here can be tuned on it):

* stage 1, each method on its own: R&B ``lam`` (on the regrouped and on the original
  domains), DGA step size x EMA, ODM smoothing x exploration;
* stage 2, at the stage-1 winners: the round length ``update_every`` for R&B (regrouped) and
  DGA, and the regrouping's ``k_range`` for R&B (regrouped).

The value with the lowest mean validation loss over the seeds wins. ``stratified`` and
``oracle`` run once per seed as references (the gap-closed column). The winners are printed
as an ``hparams`` dictionary; they become the documented defaults in
``rnb_kernels/experiments/config.py`` by hand (a reviewed change, not a file the sweep
rewrites).

Writes ``mixing_sweep_<preset>.csv`` (one row per run) and ``mixing_sweep_<preset>.md`` (one
row per value: mean validation loss, paired difference to stratified, gap closed) into the
results directory.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import BENCH_PRESETS, ExperimentConfig
from ..data import PreparedData, prepare
from ..harness import append_csv, environment, paired_t, results_dir, t_interval
from ..methods import get_method
from ..train import train

logger = logging.getLogger(__name__)

__all__ = ["Variant", "add_arguments", "run", "run_sweep", "stage1", "stage2"]


@dataclass(frozen=True)
class Variant:
    """One point of the sweep.

    Attributes:
        method: the method it runs (``"rnb-regrouped"``, ``"dga"``, ...).
        param: the swept setting (``"lam"``, ``"step_size,ema"``, ``"update_every"``,
            ``"k_range"``; ``""`` for the references).
        value: its value, as printed.
        hparams: ``{mixer or method name: {hyper-parameter: value}}`` merged over the config's.
        train: :class:`~..config.TrainConfig` overrides.
        corpus: :class:`~..config.CorpusConfig` overrides (a new preparation per value).
    """

    method: str
    param: str = ""
    value: str = ""
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    corpus: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.method} {self.param}={self.value}" if self.param else self.method


# The values tried in stage 1 (a handful per method: the sweep must fit a 2-core CPU).
LAMBDAS = (2.0, 5.0, 10.0, 20.0, 50.0)
DGA_STEPS = (1.0, 3.0, 10.0)
DGA_EMAS = (0.3, 1.0)
ODM_SMOOTHING = (0.5, 0.9)
ODM_EXPLORATION = (0.1, 1.0)
UPDATE_EVERY = (5, 10, 20)
K_RANGES = ((4, 16), (8, 32), (8, 64))


def stage1() -> list[Variant]:
    """References and each mixer's own hyper-parameters."""
    out = [Variant("stratified"), Variant("oracle")]
    for method in ("rnb-regrouped", "rnb-original"):
        out += [Variant(method, "lam", f"{v:g}", {method: {"lam": v}}) for v in LAMBDAS]
    out += [
        Variant("dga", "step_size,ema", f"{s:g},{e:g}", {"dga": {"step_size": s, "ema": e}})
        for s in DGA_STEPS
        for e in DGA_EMAS
    ]
    out += [
        Variant("odm", "smoothing,exploration", f"{a:g},{c:g}",
                {"odm": {"smoothing": a, "exploration": c}})
        for a in ODM_SMOOTHING
        for c in ODM_EXPLORATION
    ]  # fmt: skip
    return out


def stage2(best: dict[str, Variant], base: ExperimentConfig) -> list[Variant]:
    """Round length and ``k_range`` at the stage-1 winners (the current value is not re-run)."""
    out = []
    for method in ("rnb-regrouped", "dga"):
        if method not in best:
            continue
        hp = best[method].hparams
        current = _round_length(base, method)
        out += [
            Variant(method, "update_every", str(k), _merge(hp, {method: {"update_every": k}}))
            for k in UPDATE_EVERY
            if k != current
        ]
    if "rnb-regrouped" in best:
        hp = best["rnb-regrouped"].hparams
        out += [
            Variant("rnb-regrouped", "k_range", f"{lo}-{hi}", hp, corpus={"k_range": (lo, hi)})
            for lo, hi in K_RANGES
            if (lo, hi) != tuple(base.corpus.k_range)
        ]
    return out


def _round_length(cfg: ExperimentConfig, method: str) -> int:
    """The round length a method runs with under ``cfg`` (method, then mixer, then train)."""
    mixer = get_method(method).mixer
    hp = {**cfg.hparams_for(mixer), **cfg.hparams_for(method)}
    return int(hp.get("update_every", cfg.train.update_every))


def stage3(chosen: dict[str, Any]) -> list[Variant]:
    """The winners of both stages together (stage 2 chose each setting on its own), to confirm
    the combination on the validation split."""
    out = []
    for method in ("rnb-regrouped", "dga"):
        hp = {k: v for k, v in chosen["hparams"].items() if k == method}
        if not hp:
            continue
        corpus = {"k_range": tuple(chosen["k_range"])} if method == "rnb-regrouped" else {}
        desc = ", ".join(f"{k}={v:g}" for k, v in hp[method].items())
        if corpus:
            desc += f", k_range={corpus['k_range'][0]}-{corpus['k_range'][1]}"
        out.append(Variant(method, "combined", desc, hp, corpus=corpus))
    return out


def _merge(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict:
    out = {k: dict(v) for k, v in a.items()}
    for k, v in b.items():
        out.setdefault(k, {}).update(v)
    return out


def _run(
    cfg: ExperimentConfig,
    variants: Iterable[Variant],
    preps: dict[tuple, PreparedData],
    work: Path,
    on_row: Any,
    progress: bool,
    done: dict[tuple[str, int], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    rows = []
    done = done or {}
    for v in variants:
        if all((v.label, seed) in done for seed in cfg.seeds):
            rows += [done[(v.label, seed)] for seed in cfg.seeds]
            continue
        ccfg = cfg.replace(**v.corpus) if v.corpus else cfg
        key = tuple(sorted(v.corpus.items()))
        if key not in preps:
            preps[key] = prepare(
                ccfg.corpus, vocab_cap=cfg.model.vocab_size, context=cfg.model.context,
                out=work / ("data" + "".join(f"_{k}{val}" for k, val in key)),
            )  # fmt: skip
        prep = preps[key]
        method = get_method(v.method)
        tcfg = replace(cfg.train, **v.train)
        hparams = _merge({k: dict(x) for k, x in cfg.hparams.items()}, v.hparams)
        for seed in cfg.seeds:
            if (v.label, seed) in done:
                rows.append(done[(v.label, seed)])
                continue
            r = train(
                replace(cfg.model, vocab_size=prep.vocab.size),
                prep.split("train", method.domains), {"val": prep.split("val")}, method, tcfg,
                target=prep.split("target", method.domains), seed=seed, hparams=hparams,
                num_domains=prep.num_domains(method.domains), num_groups=prep.num_original,
                domain_names=prep.domain_names(method.domains), name=v.label.replace(" ", "_"),
                out_dir=work / f"s{seed}" / "logs", progress=progress,
            )  # fmt: skip
            share = prep.target_share(method.domains)
            row = {
                **r.summary("val"), "variant": v.label, "method": v.method, "param": v.param,
                "value": v.value, "seed": seed,
                "target_share": float(r.domain_counts @ share / r.domain_counts.sum()),
                "k": prep.num_domains(method.domains),
            }  # fmt: skip
            rows.append(row)
            on_row(row)
    return rows


def _score(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: mean validation loss, paired difference to stratified, gap closed."""
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["variant"], {})[int(r["seed"])] = r
    ref, orc = by.get("stratified", {}), by.get("oracle", {})
    out = {}
    for label, seeds in by.items():
        common = sorted(set(seeds) & set(ref))
        loss = [float(seeds[s]["eval_loss"]) for s in common or sorted(seeds)]
        entry: dict[str, Any] = {"val_loss": float(np.mean(loss)), "seeds": len(loss)}
        if common and label != "stratified":
            entry["diff"] = paired_t(loss, [float(ref[s]["eval_loss"]) for s in common])
        both = [s for s in common if s in orc]
        if both:  # a gap to close only when the oracle beats stratified beyond noise
            d = paired_t(
                [float(orc[s]["eval_loss"]) for s in both],
                [float(ref[s]["eval_loss"]) for s in both],
            )
            if not (d[2] < 0 if len(both) > 1 else d[0] < 0):
                both = []
        if both and label not in ("stratified", "oracle"):
            entry["gap"] = t_interval([
                (float(ref[s]["eval_loss"]) - float(seeds[s]["eval_loss"]))
                / (float(ref[s]["eval_loss"]) - float(orc[s]["eval_loss"]))
                for s in both
            ])  # fmt: skip
        first = next(iter(seeds.values()))
        entry.update(method=first["method"], param=first["param"], value=first["value"],
                     target_share=float(np.mean([float(x["target_share"])
                                                 for x in seeds.values()])))  # fmt: skip
        out[label] = entry
    return out


def _best(scores: dict[str, dict[str, Any]], variants: list[Variant], method: str, param: str):
    cands = [v for v in variants if v.method == method and v.param == param]
    cands = [v for v in cands if v.label in scores]
    return min(cands, key=lambda v: scores[v.label]["val_loss"]) if cands else None


def sweep_name(preset: str, scenario: str) -> str:
    """``mixing_sweep_<preset>`` (target shift, the scenario the defaults are chosen on), else
    ``mixing_sweep_<preset>_<scenario>``."""
    return f"mixing_sweep_{preset}" + ("" if scenario == "target-shift" else f"_{scenario}")


def run_sweep(
    cfg: ExperimentConfig,
    out: Path,
    preset: str,
    progress: bool = True,
    resume: bool = False,
    only: Iterable[str] | None = None,
    stage1_only: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All stages on ``cfg`` (its corpus and scenario, its seeds); returns the rows and the
    chosen settings ``{"hparams": {...}, "k_range": [lo, hi], "scores": {...}}``.

    With ``resume``, (variant, seed) rows already in the sweep's CSV are reused instead of
    trained again (runs are deterministic for a seed on the CPU). ``only`` restricts the
    swept methods (the references always run); ``stage1_only`` stops after stage 1.
    """
    info = environment(cfg.train.device)
    name = sweep_name(preset, cfg.corpus.scenario)
    csv_path = out / f"{name}.csv"
    work = out / f"{name}_work"
    done = _load_rows(csv_path) if resume else {}

    def on_row(row: dict[str, Any]) -> None:
        logger.info("%s s%d: val loss %.4f", row["variant"], row["seed"], row["eval_loss"])
        append_csv(csv_path, [{"preset": preset, "scenario": cfg.corpus.scenario, **row, **info}])

    preps: dict[tuple, PreparedData] = {}
    keep = None if only is None else {"stratified", "oracle", *only}
    v1 = [v for v in stage1() if keep is None or v.method in keep]
    rows = _run(cfg, v1, preps, work, on_row, progress, done)
    scores = _score(rows)
    best = {}
    for method, param in (("rnb-regrouped", "lam"), ("rnb-original", "lam"),
                          ("dga", "step_size,ema"), ("odm", "smoothing,exploration")):  # fmt: skip
        b = _best(scores, v1, method, param)
        if b is not None:
            best[method] = b
    v2 = [] if stage1_only else stage2(best, cfg)
    rows += _run(cfg, v2, preps, work, on_row, progress, done)
    scores = _score(rows)
    chosen: dict[str, Any] = {"hparams": {}, "stage1": {m: v.label for m, v in best.items()}}
    for v in best.values():
        chosen["hparams"] = _merge(chosen["hparams"], v.hparams)
    for method in ("rnb-regrouped", "dga"):
        if method not in best:
            continue
        cands = [(_round_length(cfg, method), best[method].label)] + [
            (int(v.value), v.label) for v in v2 if v.method == method and v.param == "update_every"
        ]
        cands = [(val, lab) for val, lab in cands if lab in scores]
        val, _ = min(cands, key=lambda c: scores[c[1]]["val_loss"])
        chosen["hparams"] = _merge(chosen["hparams"], {method: {"update_every": val}})
    chosen["k_range"] = list(cfg.corpus.k_range)
    if "rnb-regrouped" in best:
        cands = [(tuple(cfg.corpus.k_range), best["rnb-regrouped"].label)] + [
            (v.corpus["k_range"], v.label) for v in v2 if v.param == "k_range"
        ]
        cands = [(k, lab) for k, lab in cands if lab in scores]
        chosen["k_range"] = list(min(cands, key=lambda c: scores[c[1]]["val_loss"])[0])
    if not stage1_only:
        rows += _run(cfg, stage3(chosen), preps, work, on_row, progress, done)
    chosen["scores"] = _score(rows)
    if stage1_only or only is not None:
        chosen["note"] = (
            f"Restricted run: {'stage 1 only' if stage1_only else 'all stages'}, methods "
            f"{', '.join(sorted(keep or []))}."
        )
    chosen["defaults"] = {
        "update_every": {m: _round_length(cfg, m) for m in ("rnb-regrouped", "dga")},
        "k_range": list(cfg.corpus.k_range),
    }
    return rows, chosen


def _load_rows(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Rows of an earlier sweep, keyed by (variant, seed), numbers parsed back."""
    import csv

    if not path.exists():
        return {}
    out = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = dict(r)
            for k in ("eval_loss", "target_share", "train_s"):
                row[k] = float(row[k])
            row["seed"] = int(row["seed"])
            out[(row["variant"], row["seed"])] = row
    return out


def _cells(s: dict[str, Any], value: str, bold: bool) -> str:
    d, g = s.get("diff"), s.get("gap")
    diff = "" if d is None else (
        f"{d[0]:+.4f}" if not np.isfinite(d[1]) else f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"
    )  # fmt: skip
    gap = "" if g is None else f"{100 * g[0]:.0f}%"
    loss = f"**{s['val_loss']:.4f}**" if bold else f"{s['val_loss']:.4f}"
    return (
        f"| {s['method']} | {s['param'] or 'reference'} | {value} | {loss} | {diff} | {gap} "
        f"| {100 * s['target_share']:.0f}% |"
    )


def format_sweep(chosen: dict[str, Any], cfg: ExperimentConfig, preset: str) -> str:
    """The markdown of ``mixing_sweep_<preset>.md``: one table, grouped by stage and setting,
    the winner of every group in bold (the stage-1 winner is repeated in its stage-2 groups as
    the current value)."""
    env = environment(cfg.train.device)
    scores = chosen["scores"]
    stage1_winner = chosen.get("stage1", {})
    defaults = chosen.get("defaults", {})
    model, tr = cfg.model, cfg.train
    lines = [
        f"# `rnb bench sweep --preset {preset}`: hyper-parameters chosen on the validation split\n",
        f"{cfg.corpus.name}, {cfg.corpus.scenario}; GPT-Neo {model.n_layer}x{model.n_embd}, "
        f"T={model.context}, {tr.steps} steps x {tr.batch_size} sequences, round length "
        f"{tr.update_every} and k range {tuple(cfg.corpus.k_range)} unless swept; seeds "
        f"{', '.join(map(str, cfg.seeds))}. Every number below is a **validation** loss "
        "(nats/token, mean over the seeds); the test split is never evaluated by the sweep. "
        "Coordinate-wise: stage 1 sweeps each mixer's own hyper-parameters; stage 2 the round "
        "length and the regrouping's k range, each on its own at the stage-1 winner (repeated "
        "as the current value); stage 3 runs the winners together to confirm the combination. "
        "Lowest mean validation loss wins (**bold**). Kept small to run on a shared 2-core CPU: "
        f"a handful of values per method and {len(cfg.seeds)} seeds, so close values are not "
        "distinguishable (see the intervals). Δ: paired by seed, 95% Student-t interval; gap "
        "closed: (stratified − method) / (stratified − oracle), mean over seeds.\n",
        f"Run on {env['hardware']}, torch {env['torch']}, git {env['git_sha']}.\n",
        *([chosen["note"] + "\n"] if "note" in chosen else []),
        "| method | setting | value | val loss | Δ vs stratified [95% CI] | gap closed "
        "| target share |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for label, sc in scores.items():
        groups.setdefault((sc["method"], sc["param"]), []).append((label, sc["value"]))
    for (method, param), members in groups.items():
        if param in ("update_every", "k_range") and method in stage1_winner:
            cur = defaults.get(param, {})
            cur = cur.get(method) if isinstance(cur, dict) else f"{cur[0]}-{cur[1]}"
            members = [(stage1_winner[method], f"{cur} (stage-1 winner)"), *members]
        members = [(lab, val) for lab, val in members if lab in scores]
        win = (
            min(members, key=lambda m: scores[m[0]]["val_loss"])[0]
            if param and param != "combined"
            else None
        )
        for lab, val in members:
            row = dict(scores[lab], method=method, param=param)
            lines.append(_cells(row, val, lab == win))
    hp = chosen["hparams"]
    lines += [
        "",
        f"Chosen: `hparams = {hp}`, `k_range = {tuple(chosen['k_range'])}`.",
    ]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(BENCH_PRESETS), default="cpu")
    p.add_argument("--corpus", default=None, help="ni (default) or fortunes")
    p.add_argument("--scenario", default="target-shift", help="target-shift or in-distribution")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's default)"
    )
    p.add_argument("--out", default=None, help="default benchmarks/results")
    p.add_argument(
        "--resume", action="store_true", help="reuse the (variant, seed) rows already in the CSV"
    )
    p.add_argument("--only", default=None, help="comma-separated methods to sweep (default all)")
    p.add_argument("--stage1-only", action="store_true", help="stop after stage 1")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.contrib.logging import logging_redirect_tqdm

    cfg = BENCH_PRESETS[args.preset].replace(
        corpus=args.corpus, scenario=args.scenario, steps=args.steps,
        seeds=tuple(int(s) for s in args.seeds.split(",") if s),
    )  # fmt: skip
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"preset {args.preset!r} needs a CUDA device and none is available here")
        return 2
    if args.threads and not cfg.train.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    out = results_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with logging_redirect_tqdm():
        rows, chosen = run_sweep(
            cfg, out, args.preset, not args.no_progress, args.resume,
            only=None if args.only is None else [m for m in args.only.split(",") if m],
            stage1_only=args.stage1_only,
        )  # fmt: skip
    md = format_sweep(chosen, cfg, args.preset)
    md += f"\n{len(rows)} runs in {time.perf_counter() - t:.0f}s.\n"
    (out / f"{sweep_name(args.preset, cfg.corpus.scenario)}.md").write_text(md)
    print(md)
    return 0
