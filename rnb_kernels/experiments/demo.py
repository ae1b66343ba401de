"""``rnb demo``: regroup a real corpus, then train the same small GPT under Stratified, DGA
and R&B (original and regrouped domains) with the same seed and token budget, and compare.

Natural Instructions v1 (61 task domains, from the BIG-bench archive, fetched and cached on
first use) by default; Debian fortunes (``--corpus fortunes``) as the small fallback.
``--quick`` is the CI-sized run (about a minute on fortunes).

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .models import GPTConfig
from .train import EncodedData, TrainConfig, TrainResult, encode_texts, train

logger = logging.getLogger(__name__)

__all__ = ["DemoConfig", "add_parser", "format_table", "run", "run_demo"]

# (run name, method, domains): the comparison the demo prints.
RUNS = (
    ("stratified", "stratified", "original"),
    ("dga", "dga", "original"),
    ("rnb-original", "rnb", "original"),
    ("rnb-regrouped", "rnb", "regrouped"),
)


@dataclass
class DemoConfig:
    """Sizes of the demo (the defaults are the full ~10-minute CPU run on NI)."""

    corpus: str = "ni"
    max_per_task: int = 120  # NI examples per subtask; fortunes: total cap below
    max_examples: int = 8000
    eval_fraction: float = 0.1
    # TF-IDF+SVD: MiniLM embeds ~15 texts/s on a 2-core CPU, minutes for this corpus alone;
    # `--embedder minilm` uses it when the budget allows.
    embedder: str = "tfidf"
    k_range: tuple[int, int] = (8, 64)
    vocab: int = 4096
    context: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    steps: int = 300
    batch_size: int = 16
    eval_every: int = 50
    update_every: int = 10
    lr: float = 3e-3
    rnb_lam: float = 2.0
    dga_step_size: float = 1.0
    dga_ema: float = 0.5
    eval_cap: int = 1500
    seed: int = 0


QUICK = DemoConfig(
    corpus="fortunes", max_examples=1500, embedder="tfidf", k_range=(4, 12), vocab=1024,
    context=32, n_layer=1, n_head=2, n_embd=32, steps=40, batch_size=16, eval_every=20,
    update_every=5, eval_cap=300,
)  # fmt: skip


def _load_corpus(cfg: DemoConfig):
    from ..datasets import load_fortunes, load_natural_instructions

    if cfg.corpus == "ni":
        c = load_natural_instructions(max_per_task=cfg.max_per_task, seed=cfg.seed)
    elif cfg.corpus == "fortunes":
        c = load_fortunes()
    else:
        raise ValueError(f"corpus must be 'ni' or 'fortunes'; got {cfg.corpus!r}")
    if len(c) > cfg.max_examples:
        c = c.sample(cfg.max_examples, seed=cfg.seed)
    # Domains the subsample left empty would only be dead rows in every mixer.
    used = np.unique(c.labels)
    remap = np.full(c.num_domains, -1, dtype=np.int64)
    remap[used] = np.arange(used.size)
    c.labels = remap[c.labels]
    c.label_names = [c.label_names[i] for i in used]
    return c


def _regroup(texts: list[str], cfg: DemoConfig):
    from ..regroup import regroup

    try:
        return regroup(texts, k="auto", k_range=cfg.k_range, embedder=cfg.embedder, seed=cfg.seed)
    except ImportError as exc:
        if cfg.embedder == "tfidf":
            raise
        logger.warning("embedder %r unavailable (%s); regrouping with tfidf", cfg.embedder, exc)
        return regroup(texts, k="auto", k_range=cfg.k_range, embedder="tfidf", seed=cfg.seed)


def prepare(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    """Load, split, regroup and tokenize; returns everything the runs need."""
    from ..datasets import train_eval_split
    from .tokenizer import CompactVocab, load_tokenizer

    t0 = time.perf_counter()
    corpus = _load_corpus(cfg)
    tr_idx, ev_idx = train_eval_split(corpus.labels, cfg.eval_fraction, seed=cfg.seed)
    if ev_idx.size > cfg.eval_cap:
        ev_idx = np.sort(np.random.default_rng(cfg.seed).choice(ev_idx, cfg.eval_cap, False))
    tr_texts = [corpus.texts[i] for i in tr_idx]
    ev_texts = [corpus.texts[i] for i in ev_idx]
    t_load = time.perf_counter() - t0
    logger.info("%s: %d train / %d eval texts, %d domains", corpus.name, len(tr_texts),
                len(ev_texts), corpus.num_domains)  # fmt: skip

    t0 = time.perf_counter()
    part = _regroup(tr_texts, cfg)
    ev_clusters = part.assign(ev_texts)
    t_regroup = time.perf_counter() - t0
    part.save(out / "partition")
    logger.info("regrouped into k=%d clusters in %.1fs", part.k, t_regroup)

    t0 = time.perf_counter()
    tok = load_tokenizer()
    vocab = CompactVocab(tok.encode_batch(tr_texts), tok.vocab_size, cfg.vocab)
    train_data = encode_texts(tr_texts, tok, cfg.context, corpus.labels[tr_idx], vocab)
    eval_data = encode_texts(ev_texts, tok, cfg.context, corpus.labels[ev_idx], vocab)
    t_tok = time.perf_counter() - t0
    logger.info("tokenizer %s, compact vocab %d (%.1f%% of train tokens)", tok.name,
                vocab.size, 100 * vocab.coverage)  # fmt: skip
    return {
        "corpus": corpus,
        "part": part,
        "train": train_data,
        "eval": eval_data,
        "train_clusters": np.asarray(part.labels, dtype=np.int64),
        "eval_clusters": np.asarray(ev_clusters, dtype=np.int64),
        "vocab": vocab,
        "tokenizer": tok.name,
        "timings": {"load_s": t_load, "regroup_s": t_regroup, "tokenize_s": t_tok},
    }


def run_demo(cfg: DemoConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the whole comparison; returns ``{"rows": [...], "results": {...}, ...}``."""
    out = Path(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    prep = prepare(cfg, out)
    corpus, train_data, eval_data = prep["corpus"], prep["train"], prep["eval"]
    m_orig = corpus.num_domains
    k = prep["part"].k
    model_cfg = GPTConfig(
        vocab_size=prep["vocab"].size, context=cfg.context, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_embd=cfg.n_embd,
    )  # fmt: skip
    tcfg = TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, eval_every=cfg.eval_every,
        update_every=cfg.update_every, rnb_lam=cfg.rnb_lam, dga_step_size=cfg.dga_step_size,
        dga_ema=cfg.dga_ema, warmup=max(1, cfg.steps // 15), seed=cfg.seed,
    )  # fmt: skip
    results: dict[str, TrainResult] = {}
    domains_of: dict[str, int] = {}
    for name, method, space in RUNS:
        if space == "regrouped":
            tr: EncodedData = train_data.with_domains(prep["train_clusters"])
            ev = eval_data.with_domains(prep["eval_clusters"])
            m = k
        else:
            tr, ev, m = train_data, eval_data, m_orig
        logger.info("run %s: %s on %d %s domains", name, method, m, space)
        results[name] = train(
            model_cfg, tr, ev, method, tcfg, num_domains=m,
            # Per-domain eval losses are always reported on the original domains, so the
            # regrouped run is compared on the same footing.
            eval_groups=eval_data.domains, num_groups=m_orig,
            name=name, out_dir=out / "logs", progress=progress,
        )  # fmt: skip
        domains_of[name] = m
    wall = time.perf_counter() - t_all

    rows = []
    for name, r in results.items():
        s = r.summary()
        s["domains"] = domains_of[name]
        rows.append(s)
    _write_outputs(out, rows, results, prep, corpus)
    meta = {
        "config": asdict(cfg),
        "model": model_cfg.to_dict(),
        "train": asdict(tcfg),
        "corpus": corpus.name,
        "n_train": len(train_data),
        "n_eval": len(eval_data),
        "original_domains": m_orig,
        "regrouped_k": k,
        "tokenizer": prep["tokenizer"],
        "vocab_coverage": prep["vocab"].coverage,
        "timings": {**prep["timings"], "wall_s": wall},
        "tokens_per_run": cfg.steps * cfg.batch_size * cfg.context,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
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


def _write_outputs(out: Path, rows, results: dict[str, TrainResult], prep, corpus) -> None:
    from .plots import plot_eval_curves, plot_weights

    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for name, r in results.items():
        np.save(out / "logs" / f"{name}.per_domain_eval.npy", r.per_domain_eval)
    plot_eval_curves(
        {n: (r.eval_steps, r.eval_losses) for n, r in results.items()},
        out / "eval_loss.png",
        title=f"eval loss, {corpus.name}",
    )
    names = {
        n: (
            corpus.label_names if "regrouped" not in n else [f"c{i}" for i in range(prep["part"].k)]
        )
        for n in results
    }
    plot_weights(
        {n: (r.weight_steps, r.weights) for n, r in results.items() if n != "stratified"},
        out / "weights.png",
        names=names,
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
    p.add_argument("--embedder", default=None, help="regroup embedder: minilm or tfidf")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("-v", "--verbose", action="store_true")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    cfg = QUICK if args.quick else DemoConfig()
    over = {"corpus": args.corpus, "steps": args.steps, "embedder": args.embedder}
    cfg = DemoConfig(**{**asdict(cfg), **{k: v for k, v in over.items() if v is not None}})
    cfg.seed = args.seed
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
