"""``rnb bench mixing``: mixing methods x corpora x seeds, same model, seed and token budget.

Methods: ``stratified``, ``static`` (natural, size-proportional), ``odm`` (EXP3 on loss),
``dga-extra`` (the DGA paper: an extra forward/backward per domain every round),
``dga`` (per-domain gradients from the training backward, no extra pass), ``rnb-original``
and ``rnb-regrouped`` (R&B on the corpus' own domains and on regrouped clusters).

Every run reports the final eval loss (overall, and mean / worst over the original domains)
and the measured mixing overhead (time spent on the mixture as a % of the rest of the
training loop). Writes ``mixing_<preset>.csv`` (one row per run), ``mixing_<preset>.md``
(mean ± std over seeds) and ``mixing_<preset>_<corpus>.png`` into ``--out``
(default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..demo import DemoConfig, prepare
from ..harness import append_csv, machine_info, results_dir
from ..models import GPTConfig
from ..train import TrainConfig, train

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "PRESETS", "add_arguments", "run", "run_mixing", "summarize"]

# name -> (train-loop method, domain space)
METHODS: dict[str, tuple[str, str]] = {
    "stratified": ("stratified", "original"),
    "static": ("static", "original"),
    "odm": ("odm", "original"),
    "dga-extra": ("dga-extra", "original"),
    "dga": ("dga", "original"),
    "rnb-original": ("rnb", "original"),
    "rnb-regrouped": ("rnb", "regrouped"),
}

PRESETS: dict[str, DemoConfig] = {
    # Minutes on a CPU: what `rnb bench mixing` runs by default.
    "cpu": DemoConfig(
        max_per_task=40, max_examples=2500, embedder="tfidf", k_range=(8, 48), vocab=2048,
        context=32, n_layer=1, n_head=2, n_embd=48, steps=120, batch_size=16, eval_every=40,
        update_every=10, eval_cap=500,
    ),
    # Seconds: the test suite.
    "tiny": DemoConfig(
        max_examples=400, embedder="tfidf", k_range=(3, 6), vocab=256, context=16, n_layer=1,
        n_head=1, n_embd=16, steps=6, batch_size=8, eval_every=3, update_every=3, eval_cap=80,
    ),
    # GPT-Neo-125M-like (12 x 768, full GPT-2 vocabulary kept by a 50257 compact cap) for a GPU.
    "gpu": DemoConfig(
        max_per_task=2000, max_examples=120000, embedder="minilm", k_range=(16, 128),
        vocab=50257, context=512, n_layer=12, n_head=12, n_embd=768, steps=3000, batch_size=32,
        eval_every=250, update_every=50, lr=6e-4, eval_cap=6000,
    ),
}  # fmt: skip


def run_mixing(
    preset: str,
    corpora: list[str],
    seeds: list[int],
    methods: list[str],
    out: Path,
    device: str = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train every (corpus, seed, method); return one row per run (also appended to CSV)."""
    base = PRESETS[preset]
    info = machine_info(device)
    rows: list[dict[str, Any]] = []
    csv_path = out / f"mixing_{preset}.csv"
    for corpus in corpora:
        for seed in seeds:
            cfg = replace(base, corpus=corpus, seed=seed)
            work = out / f"mixing_{preset}_work" / f"{corpus}_s{seed}"
            work.mkdir(parents=True, exist_ok=True)
            prep = prepare(cfg, work)
            m_orig = prep["corpus"].num_domains
            model_cfg = GPTConfig(
                vocab_size=prep["vocab"].size, context=cfg.context, n_layer=cfg.n_layer,
                n_head=cfg.n_head, n_embd=cfg.n_embd,
            )  # fmt: skip
            tcfg = TrainConfig(
                steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                eval_every=cfg.eval_every, update_every=cfg.update_every, rnb_lam=cfg.rnb_lam,
                dga_step_size=cfg.dga_step_size, dga_ema=cfg.dga_ema,
                warmup=max(1, cfg.steps // 15), seed=seed, device=device,
            )  # fmt: skip
            for name in methods:
                method, space = METHODS[name]
                tr, ev, m = prep["train"], prep["eval"], m_orig
                if space == "regrouped":
                    tr = tr.with_domains(prep["train_clusters"])
                    ev = ev.with_domains(prep["eval_clusters"])
                    m = prep["part"].k
                t = time.perf_counter()
                r = train(
                    model_cfg, tr, ev, method, tcfg, num_domains=m,
                    eval_groups=prep["eval"].domains, num_groups=m_orig, name=name,
                    out_dir=work / "logs", progress=progress,
                )  # fmt: skip
                row = {
                    "preset": preset, "corpus": corpus, "seed": seed, **r.summary(),
                    "domains": m, "wall_s": round(time.perf_counter() - t, 2),
                    "tokens": cfg.steps * cfg.batch_size * cfg.context, **info,
                }  # fmt: skip
                logger.info("%s/%s/s%d: eval %.4f overhead %.2f%%", corpus, name, seed,
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
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--corpora", default="fortunes,ni", help="comma-separated: fortunes, ni")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 3 for std)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    p.add_argument("--device", default=None, help="default: cuda for the gpu preset, else cpu")
    p.add_argument("--out", default=None, help="default benchmarks/results")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    device = args.device or ("cuda" if args.preset == "gpu" else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"preset {args.preset!r} needs a CUDA device and none is available here")
        return 2
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"unknown methods {bad}; choose from {list(METHODS)}")
        return 2
    if args.steps is not None:
        PRESETS[args.preset] = replace(PRESETS[args.preset], steps=args.steps)
    out = Path(args.out) if args.out else results_dir()
    out.mkdir(parents=True, exist_ok=True)
    corpora = [c for c in args.corpora.split(",") if c]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    t = time.perf_counter()
    rows = run_mixing(args.preset, corpora, seeds, methods, out, device, not args.no_progress)
    from ..plots import plot_method_bars

    md = summarize(rows)
    cfg = asdict(PRESETS[args.preset])
    head = (
        f"`rnb bench mixing --preset {args.preset}` on {rows[0]['machine']} "
        f"(torch {rows[0]['torch']}, git {rows[0]['git_sha']}), {len(seeds)} seeds, "
        f"model {cfg['n_layer']}x{cfg['n_embd']}, T={cfg['context']}, {cfg['steps']} steps x "
        f"{cfg['batch_size']} sequences.\n\n"
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
            title=f"{corpus}: eval loss, mean ± std over {len(seeds)} seeds",
        )  # fmt: skip
    print(head + md)
    print(
        f"\n{len(rows)} runs in {time.perf_counter() - t:.0f}s; wrote {out}/mixing_{args.preset}.*"
    )
    return 0
