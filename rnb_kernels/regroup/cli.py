"""``rnb regroup``: regroup a corpus from the command line.

Usage::

    rnb regroup INPUT [--text-column text] [--k auto|N] [--embedder minilm|tfidf|PATH] --out DIR

INPUT is a ``.txt`` file (one example per line), a ``.csv`` / ``.tsv`` file (the text in
``--text-column``, default ``text``), a ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` file (the
text in the field ``--text-field``, the same option), a ``save_to_disk`` directory, or a
named corpus (``fortunes``, ``natural-instructions``). Writes to DIR:

* ``partition/``          the saved :class:`Partition` (``Partition.load(DIR/partition)``)
* ``summary.txt``         the table printed to stdout
* ``summary.json``        per-cluster rows, scores, agreement, timings
* ``silhouette.png``      silhouette vs k (when ``--k auto``)
* ``cluster_sizes.png``   cluster sizes, largest first
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["add_parser", "run"]


def _k_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--k must be 'auto' or an integer; got {value!r}"
        ) from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"--k must be >= 1; got {k}")
    return k


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``regroup`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "regroup",
        help="re-partition a corpus into semantic domains (embed + k-means)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="file, directory, or named corpus")
    p.add_argument(
        "--text-field",
        "--text-column",
        dest="text_field",
        default="text",
        help="field (jsonl, parquet, HF) or CSV column holding the text (default: text; "
        "ignored for .txt, one example per line)",
    )
    p.add_argument(
        "--domain-field",
        "--domain-column",
        dest="domain_field",
        default=None,
        help="field or CSV column holding an original domain (for ARI/NMI)",
    )
    p.add_argument("--k", type=_k_arg, default="auto", help="'auto' (default) or a number")
    p.add_argument(
        "--k-range",
        type=int,
        nargs=2,
        default=(2, 64),
        metavar=("LO", "HI"),
        help="k values tried by --k auto (inclusive; default 2 64)",
    )
    p.add_argument(
        "--k-coarse", type=int, default=None, help="also group clusters into this many coarse ones"
    )
    p.add_argument("--embedder", default="minilm", help="minilm (default), tfidf, or a model dir")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use at most N texts (random sample)")
    p.add_argument("--backend", default="auto", choices=("auto", "kmeans", "minibatch", "faiss"))
    p.add_argument("--n-init", type=int, default=3, help="k-means restarts (default 3)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="embedding cache (default $RNB_CACHE or ~/.cache/rnb_kernels)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    p.add_argument(
        "--stream",
        action="store_true",
        help="out-of-core path for big jsonl files: memmapped embeddings + partial_fit",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("-q", "--quiet", action="store_true", help="only print the summary table")
    return p


def _plots(part: Any, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping plots (pip install matplotlib)")
        return []
    written = []
    if part.scores:
        ks = sorted(part.scores)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(ks, [part.scores[k] for k in ks], marker="o")
        ax.axvline(part.k, color="tab:red", linestyle="--", label=f"chosen k={part.k}")
        ax.set_xlabel("k")
        ax.set_ylabel("silhouette (subsample)")
        ax.set_title("Silhouette vs k")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "silhouette.png", dpi=120)
        plt.close(fig)
        written.append(out / "silhouette.png")
    sizes = np.sort(part.sizes)[::-1]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(np.arange(sizes.size), sizes, width=1.0)
    ax.set_xlabel("cluster (largest first)")
    ax.set_ylabel("examples")
    ax.set_title(f"Cluster sizes (k={part.k}, n={int(sizes.sum())})")
    fig.tight_layout()
    fig.savefig(out / "cluster_sizes.png", dpi=120)
    plt.close(fig)
    written.append(out / "cluster_sizes.png")
    return written


def run(args: argparse.Namespace) -> int:
    """Execute ``rnb regroup``; returns the process exit code (0 ok, 2 bad input)."""
    from ..datasets import CorpusNotFoundError, iter_jsonl, load_corpus
    from .api import regroup, regroup_stream
    from .partition import json_default

    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out: Path = args.out
    cache = False if args.no_cache else args.cache_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        if args.stream:
            src = Path(args.input)
            if not src.is_file() or not src.name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
                raise ValueError("--stream needs a .jsonl / .jsonl.gz file as INPUT")
            part = regroup_stream(
                iter_jsonl(src, args.text_field, limit=args.limit),
                args.k,
                work_dir=out / "work",
                embedder=args.embedder,
                seed=args.seed,
                k_range=tuple(args.k_range),
                show_progress=not args.quiet,
            )
            texts, reference = None, None
        else:
            corpus = load_corpus(
                args.input, text_field=args.text_field, domain_field=args.domain_field
            )
            if args.limit is not None:
                corpus = corpus.sample(args.limit, seed=args.seed)
            texts, reference = corpus.texts, corpus.domains
            part = regroup(
                texts,
                k=args.k,
                k_range=tuple(args.k_range),
                embedder=args.embedder,
                seed=args.seed,
                k_coarse=args.k_coarse,
                backend=args.backend,
                n_init=args.n_init,
                cache_dir=cache,
                reference_labels=reference,
                show_progress=not args.quiet,
            )
    except (ValueError, TypeError, CorpusNotFoundError, FileNotFoundError, ImportError) as exc:
        print(f"rnb regroup: error: {exc}", file=sys.stderr)
        return 2

    part.save(out / "partition")
    table = part.summary(texts, reference=reference)
    print(table)
    (out / "summary.txt").write_text(table + "\n")
    rows = part.summary_rows(texts, reference=reference, n_examples=3)
    report = {
        "input": str(args.input),
        "k": part.k,
        "scores": {str(k): v for k, v in sorted(part.scores.items())},
        "agreement": part.metadata.get("agreement"),
        "metadata": part.metadata,
        "clusters": rows,
    }
    (out / "summary.json").write_text(json.dumps(report, indent=2, default=json_default))
    plots = [] if args.no_plots else _plots(part, out)
    print(f"\nwrote {out / 'partition'}, summary.txt, summary.json" + "".join(
        f", {p.name}" for p in plots
    ))  # fmt: skip
    return 0
