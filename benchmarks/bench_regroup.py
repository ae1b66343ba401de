"""Regroup throughput on this CPU: embedding (tfidf, minilm) and clustering at 10k / 100k texts.

Corpus: Natural Instructions v1 (193,250 texts, 61 subtasks) from the BIG-bench archive,
uniformly subsampled (seeded) to each size; ARI against the subtasks is reported next to
every clustering time so speed and quality can be read together.

What is measured (wall-clock, one run each, ``time.perf_counter``):
  * ``embed``      tfidf fit+transform at each size; minilm at ``--minilm-n`` texts only
                   (all-MiniLM-L6-v2 runs at roughly 50-100 texts/s on 2 cores, so 100k
                   would take ~20-30 min; the row is labelled with its own n and texts/s).
  * ``kmeans``     k = ``--k`` on the tfidf embeddings with each backend: exact sklearn
                   KMeans (n_init=1 and 3), MiniBatchKMeans, faiss when installed.
  * ``select_k``   k="auto": silhouette over the default k_range (2, 64) on a 4000-row sample.
  * ``stream``     the out-of-core path: embed_to_memmap + MiniBatchKMeans.partial_fit.
                   Texts arrive in corpus order (grouped by subtask) and tfidf is fitted on
                   the first 50k of them, so at 100k the streamed ARI is lower by design:
                   it shows the cost of an unrepresentative fit sample.

Run (with the package installed or importable):
    python benchmarks/bench_regroup.py                 # full: ~10 min on 2 cores
    python benchmarks/bench_regroup.py --quick         # smoke test: ~1 min
Writes ``regroup_cpu.{csv,json}`` (or ``--tag``) into the results directory (``--out``, else
``benchmarks/results`` of the checkout, else ``./benchmark_results``), replacing the previous
run; every CSV row carries the environment columns of ``rnb_kernels.experiments.harness``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from rnb_kernels._deps import has_module
from rnb_kernels.datasets import load_natural_instructions
from rnb_kernels.experiments.harness import environment, results_dir, write_csv
from rnb_kernels.regroup import (
    TfidfEmbedder,
    agreement,
    embed_to_memmap,
    get_embedder,
    k_candidates,
    kmeans,
    kmeans_stream,
    silhouette_scores,
)


def package_versions() -> dict[str, str]:
    """Versions of the packages regrouping speed depends on (beyond the harness columns)."""
    versions = {}
    for pkg in ("numpy", "scikit-learn", "scipy", "sentence-transformers", "faiss-cpu"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return versions


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def timed(fn: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--minilm-n", type=int, default=2000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="sizes 2000, minilm 200")
    ap.add_argument("--out", type=Path, default=None, help="results directory")
    ap.add_argument("--tag", default="regroup_cpu")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.minilm_n = [2000], 200

    env = environment("cpu")
    extra = {"usable_cpus": usable_cpus(), "versions": package_versions()}
    out = results_dir(args.out)
    # Import the lazily-loaded dependencies up front so no timing includes import cost.
    import sklearn.cluster  # noqa: F401
    import sklearn.decomposition  # noqa: F401
    import sklearn.feature_extraction.text  # noqa: F401
    import sklearn.metrics  # noqa: F401

    print(
        f"# {env['hardware']} ({extra['usable_cpus']} usable CPUs, load {env['load_avg_1min']}), "
        f"git {env['git_sha']}"
    )
    ni, t_load = timed(lambda: load_natural_instructions(download=True))
    print(f"loaded NI v1: {len(ni)} texts, {ni.num_domains} subtasks in {t_load:.1f}s")
    rows: list[dict[str, Any]] = []

    def record(**row: Any) -> None:
        rows.append(row)
        tps = f" ({row['texts_per_s']:.0f} texts/s)" if row.get("texts_per_s") else ""
        ari = f" ARI={row['ari']:.3f}" if row.get("ari") is not None else ""
        extra = f" [{row['note']}]" if row.get("note") else ""
        print(
            f"{row['stage']:9s} n={row['n']:>6d} {row['method']:22s} "
            f"{row['seconds']:8.2f}s{tps}{ari}{extra}",
            flush=True,
        )

    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(ni))
    for n in sorted(args.sizes):
        n = min(n, len(ni))
        idx = np.sort(order[:n])
        texts = [ni.texts[i] for i in idx]
        truth = ni.labels[idx]
        emb = TfidfEmbedder(seed=args.seed)
        x, sec = timed(lambda emb=emb, texts=texts: emb.fit(texts)(texts))
        record(stage="embed", n=n, method=f"tfidf(dim={x.shape[1]})", seconds=sec,
               texts_per_s=n / sec, note="fit + transform")  # fmt: skip
        backends = [("kmeans", 1), ("kmeans", 3), ("minibatch", 3)]
        if has_module("faiss"):
            backends.append(("faiss", 1))
        for backend, n_init in backends:
            res, sec = timed(
                lambda b=backend, i=n_init, x=x: kmeans(x, args.k, seed=args.seed, n_init=i, backend=b)
            )  # fmt: skip
            record(stage="kmeans", n=n, method=f"{backend}(k={args.k},n_init={n_init})",
                   seconds=sec, ari=agreement(res.labels, truth)["ari"])  # fmt: skip
        ks = k_candidates((2, 64), min(n, 4000))
        scores, sec = timed(lambda x=x, ks=ks: silhouette_scores(x, ks, seed=args.seed))
        best = max(scores, key=lambda kk: (scores[kk], -kk))
        record(stage="select_k", n=n, method=f"silhouette({len(ks)} ks)", seconds=sec,
               note=f"sample 4000, best k={best}")  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            semb = TfidfEmbedder(seed=args.seed)
            mm, sec_e = timed(
                lambda semb=semb, texts=texts, tmp=tmp: embed_to_memmap(
                    iter(texts), semb, Path(tmp) / "e.npy", show_progress=False
                )
            )
            res, sec_c = timed(
                lambda mm=mm: kmeans_stream(mm, args.k, seed=args.seed, show_progress=False)
            )
            record(stage="stream", n=n, method=f"memmap+partial_fit(k={args.k})",
                   seconds=sec_e + sec_c, texts_per_s=n / (sec_e + sec_c),
                   ari=agreement(res.labels, truth)["ari"],
                   note=f"embed {sec_e:.1f}s + cluster {sec_c:.1f}s, 3 epochs")  # fmt: skip
            del mm

    if args.minilm_n > 0:
        n = min(args.minilm_n, len(ni))
        idx = np.sort(order[:n])
        texts = [ni.texts[i] for i in idx]
        model = get_embedder("minilm", show_progress=False)
        _, sec_load = timed(lambda: model(texts[:8]))  # loads the model, warms up
        x, sec = timed(lambda: model(texts))
        record(stage="embed", n=n, method="minilm(dim=384)", seconds=sec, texts_per_s=n / sec,
               note=f"max_seq_length 256, batch 64; model load {sec_load:.1f}s; "
                    f"100k would take ~{100_000 / (n / sec) / 60:.0f} min")  # fmt: skip
        res = kmeans(x, min(args.k, n // 4), seed=args.seed)
        rows[-1]["ari"] = agreement(res.labels, ni.labels[idx])["ari"]

    out.mkdir(parents=True, exist_ok=True)
    payload = {"environment": {**env, **extra}, "corpus": {"name": "natural-instructions-v1",
               "texts": len(ni), "domains": ni.num_domains, "load_s": t_load}, "rows": rows}  # fmt: skip
    (out / f"{args.tag}.json").write_text(json.dumps(payload, indent=2))
    flat = ["stage", "n", "method", "seconds", "texts_per_s", "ari", "note"]
    write_csv(out / f"{args.tag}.csv", [{**{c: r.get(c) for c in flat}, **env} for r in rows])
    print(f"wrote {out / (args.tag + '.csv')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
