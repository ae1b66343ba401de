"""``regroup()``: texts -> embeddings -> k-means (k by silhouette) -> :class:`Partition`."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .clustering import (
    KMeansResult,
    k_candidates,
    kmeans,
    kmeans_stream,
    silhouette_scores,
    two_level_kmeans,
)
from .embed_cache import embed, embed_to_memmap, texts_fingerprint
from .embedders import Embedder, check_embeddings, get_embedder
from .partition import Partition, agreement

logger = logging.getLogger(__name__)

__all__ = ["regroup", "regroup_stream", "validate_texts"]

EmbedderSpec = str | os.PathLike[str] | Callable[..., Any] | Embedder


def validate_texts(texts: Any, *, name: str = "texts") -> list[str]:
    """Check that ``texts`` is a non-empty sequence of non-blank strings; return it as a list.

    Raises:
        TypeError: ``texts`` is a single string, not a sequence, or holds a non-string.
        ValueError: the corpus is empty, or a text is empty / whitespace-only (the error
            names the first offending index and how many there are).
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            f"{name} must be a sequence of strings, not a single {type(texts).__name__}"
        )
    if texts is None or not isinstance(texts, Iterable):
        raise TypeError(f"{name} must be a sequence of strings; got {type(texts).__name__}")
    out = list(texts)
    if not out:
        raise ValueError(f"empty corpus: {name} has no examples")
    blank = []
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] is {type(t).__name__}, not str")
        if not t.strip():
            blank.append(i)
    if blank:
        raise ValueError(
            f"{name} contains {len(blank)} empty or whitespace-only string(s) "
            f"(first at index {blank[0]}); drop or fill them before regrouping"
        )
    return out


def _check_k(k: Any, n: int) -> int | str:
    if isinstance(k, str):
        if k != "auto":
            raise ValueError(f"k must be a positive int or 'auto'; got {k!r}")
        return k
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be a positive int or 'auto'; got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of examples ({n})")
    return int(k)


def _auto_candidates(
    k_range: Any, n: int, silhouette_sample: int, max_candidates: int
) -> list[int]:
    m = min(n, silhouette_sample)
    if m < 3:
        raise ValueError(f"k='auto' needs at least 3 examples to compare silhouettes; got {n}")
    if isinstance(k_range, tuple) and len(k_range) == 2 and int(k_range[1]) > m - 1:
        # The default (2, 64) should just work on a small corpus: shrink the top of a
        # *range* to what silhouette can score, but never an explicit list of ks.
        if int(k_range[0]) > m - 1:
            raise ValueError(
                f"k_range={k_range} starts above the largest scorable k ({m - 1}) for "
                f"{n} examples (silhouette sample {m})"
            )
        logger.warning("k_range upper bound %s clipped to %d", k_range[1], m - 1)
        k_range = (int(k_range[0]), m - 1)
    return k_candidates(k_range, m, max_candidates=max_candidates)


def _representatives(labels: np.ndarray, dist: np.ndarray, k: int, r: int) -> np.ndarray:
    # Group by label, nearest first; then take each group's first r (pad with -1).
    order = np.lexsort((dist, labels))
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, np.arange(k), side="left")
    ends = np.searchsorted(sorted_labels, np.arange(k), side="right")
    out = np.full((k, r), -1, dtype=np.int64)
    for c in range(k):
        take = order[starts[c] : min(ends[c], starts[c] + r)]
        out[c, : take.size] = take
    return out


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("rnb_kernels", "numpy", "scikit-learn", "sentence-transformers", "torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def regroup(
    texts: Sequence[str] | None = None,
    k: int | str = "auto",
    k_range: tuple[int, int] | Sequence[int] = (2, 64),
    embedder: EmbedderSpec = "minilm",
    seed: int = 0,
    *,
    embeddings: np.ndarray | None = None,
    k_coarse: int | None = None,
    backend: str = "auto",
    n_init: int = 3,
    silhouette_sample: int = 4000,
    max_candidates: int = 16,
    cache_dir: str | os.PathLike[str] | bool | None = None,
    reference_labels: Sequence[Any] | np.ndarray | None = None,
    n_representatives: int = 5,
    embedder_kwargs: dict[str, Any] | None = None,
    show_progress: bool | None = None,
) -> Partition:
    """Re-partition a corpus into ``k`` semantic domains.

    Embeds every text, clusters the embeddings with seeded k-means and, for ``k="auto"``,
    picks k by the silhouette score over ``k_range`` on a bounded random subsample.

    Args:
        texts: ``n`` non-empty strings (may be omitted when ``embeddings`` is given).
        k: number of clusters, or ``"auto"``.
        k_range: for ``k="auto"``: ``(lo, hi)`` inclusive (at most ``max_candidates``
            values are tried, log-spaced), or an explicit list of ks.
        embedder: ``"minilm"``, ``"tfidf"``, a local sentence-transformers directory, an
            :class:`~rnb_kernels.regroup.embedders.Embedder`, or a callable
            ``list[str] -> array[n, d]``.
        seed: seeds subsampling and k-means; same inputs + seed -> same partition.
        embeddings: precomputed ``float[n, d]`` embeddings (skips embedding). ``embedder``
            then names the model that produced them, so :meth:`Partition.assign` can embed
            new texts the same way (an unfitted tfidf is not attached).
        k_coarse: also group the k clusters into ``k_coarse`` coarse clusters (two-level
            k-means for DGA's distribution reweighting; see :meth:`Partition.membership`).
        backend: ``"auto" | "kmeans" | "minibatch" | "faiss"`` (see
            :func:`~rnb_kernels.regroup.clustering.kmeans`).
        n_init: k-means restarts for the final clustering.
        silhouette_sample: rows used to score each candidate k.
        cache_dir: embedding cache root; ``None`` = ``$RNB_CACHE`` or
            ``~/.cache/rnb_kernels``; ``False`` disables the cache.
        reference_labels: original domain of each text; ARI/NMI go into the metadata.
        n_representatives: texts nearest each centroid kept for :meth:`Partition.summary`.
        embedder_kwargs: constructor arguments for a named embedder (e.g. ``{"dim": 64}``).

    Returns:
        :class:`Partition` with ``labels int64[n]`` in ``[0, k)``, ``centroids
        float32[k, d]``, ``scores {k: silhouette}`` (every k tried; empty for a fixed k).

    Example:
        >>> import rnb_kernels as rnb
        >>> part = rnb.regroup(texts, k="auto", k_range=(2, 64), embedder="minilm", seed=0)
        ... # doctest: +SKIP
        >>> p_eval = part.proportions(part.assign(eval_texts))   # doctest: +SKIP
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if texts is None and embeddings is None:
        raise ValueError("regroup() needs texts or embeddings")
    text_list = validate_texts(texts) if texts is not None else None
    n = len(text_list) if text_list is not None else len(embeddings)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("empty corpus: embeddings has no rows")
    k = _check_k(k, n)
    if not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init must be a positive int; got {n_init!r}")
    if k_coarse is not None and k != "auto" and not 1 <= k_coarse <= k:
        raise ValueError(f"k_coarse={k_coarse} must be between 1 and k={k}")
    if reference_labels is not None and len(reference_labels) != n:
        raise ValueError(
            f"reference_labels has {len(reference_labels)} entries but the corpus has {n}"
        )

    emb_obj: Embedder | None
    if embeddings is not None:
        x = check_embeddings(embeddings, n, "embeddings")
        try:
            emb_obj = get_embedder(embedder, **(embedder_kwargs or {}))
            if emb_obj.needs_fit and not emb_obj.fitted:
                emb_obj = None  # an unfitted TF-IDF could not embed eval texts consistently
        except ImportError as exc:
            logger.info("no embedder attached to the partition (%s)", exc)
            emb_obj = None
    else:
        assert text_list is not None
        emb_obj = get_embedder(embedder, **(embedder_kwargs or {}))
        if show_progress is not None and hasattr(emb_obj, "show_progress"):
            emb_obj.show_progress = show_progress
        t = time.perf_counter()
        x = embed(text_list, emb_obj, cache_dir=cache_dir)
        timings["embed_s"] = time.perf_counter() - t
    logger.info("regroup: %d examples, embedding dim %d", n, x.shape[1])

    scores: dict[int, float] = {}
    candidates: list[int] = []
    if k == "auto":
        candidates = _auto_candidates(k_range, n, silhouette_sample, max_candidates)
        t = time.perf_counter()
        scores = silhouette_scores(
            x,
            candidates,
            seed=seed,
            sample_size=silhouette_sample,
            show_progress=bool(show_progress),
        )
        timings["select_k_s"] = time.perf_counter() - t
        k = max(scores, key=lambda kk: (scores[kk], -kk))
        logger.info("regroup: k=%d chosen by silhouette (%.4f)", k, scores[k])
    assert isinstance(k, int)
    if k_coarse is not None and not 1 <= k_coarse <= k:
        raise ValueError(f"k_coarse={k_coarse} must be between 1 and the chosen k={k}")

    t = time.perf_counter()
    res = kmeans(x, k, seed=seed, n_init=n_init, backend=backend)
    two = None
    if k_coarse is not None:
        two = two_level_kmeans(x, k, k_coarse, seed=seed, n_init=n_init, fine=res)
    timings["cluster_s"] = time.perf_counter() - t

    part = _build_partition(
        x, res, scores, emb_obj, seed, n_representatives, timings, t0,
        extra={
            "k_mode": "auto" if scores else "fixed",
            "k_candidates": candidates,
            "n_init": n_init,
            "silhouette_sample": silhouette_sample if scores else None,
            "corpus_sha256": texts_fingerprint(text_list) if text_list is not None else None,
            "precomputed_embeddings": embeddings is not None,
        },
    )  # fmt: skip
    if two is not None:
        part.coarse_of_fine = two.coarse_of_fine
        part.coarse_centroids = two.coarse_centroids
        part.metadata["k_coarse"] = two.k_coarse
    if reference_labels is not None:
        part.metadata["agreement"] = agreement(part.labels, reference_labels)
        logger.info("regroup: agreement with reference %s", part.metadata["agreement"])
    return part


def _build_partition(
    x: np.ndarray,
    res: KMeansResult,
    scores: dict[int, float],
    emb_obj: Embedder | None,
    seed: int,
    n_representatives: int,
    timings: dict[str, float],
    t0: float,
    extra: dict[str, Any],
) -> Partition:
    k = res.centroids.shape[0]
    timings["total_s"] = time.perf_counter() - t0
    metadata: dict[str, Any] = {
        "embedder": emb_obj.name if emb_obj is not None else "precomputed",
        "embedder_key": emb_obj.cache_key if emb_obj is not None else None,
        "seed": seed,
        "n": int(x.shape[0]),
        "dim": int(x.shape[1]),
        "k": int(k),
        "backend": res.backend,
        "inertia": res.inertia,
        "sizes": np.bincount(res.labels, minlength=k).tolist(),
        "timings": {kk: round(v, 4) for kk, v in timings.items()},
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    return Partition(
        labels=res.labels,
        centroids=res.centroids,
        scores=scores,
        metadata=metadata,
        representatives=_representatives(res.labels, res.sq_dist, k, n_representatives),
        embedder=emb_obj,
    )


def regroup_stream(
    texts: Iterable[str],
    k: int | str,
    *,
    work_dir: str | os.PathLike[str],
    embedder: EmbedderSpec = "minilm",
    seed: int = 0,
    k_range: tuple[int, int] | Sequence[int] = (2, 64),
    chunk_size: int = 8192,
    epochs: int = 3,
    silhouette_sample: int = 4000,
    max_candidates: int = 16,
    n_representatives: int = 5,
    embedder_kwargs: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> Partition:
    """Regroup a corpus larger than memory.

    ``texts`` is consumed once, lazily (e.g. a generator over a jsonl file). Embeddings
    are streamed to ``work_dir/embeddings.npy`` (memory-mapped), k is chosen by silhouette
    on a random subsample read from the memmap, and k-means runs as
    ``MiniBatchKMeans.partial_fit`` over row blocks. Peak memory is about one chunk of
    texts and embeddings plus the labels (8 bytes per example).

    A corpus-fitted embedder (``"tfidf"``) is fitted on the first 50k texts.

    Returns:
        :class:`Partition`; ``metadata["embeddings_path"]`` points to the memmap.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be an iterable of strings, not a single string")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    emb_obj = get_embedder(embedder, **(embedder_kwargs or {}))
    t = time.perf_counter()
    x = embed_to_memmap(
        texts, emb_obj, work / "embeddings.npy", chunk_size=chunk_size, show_progress=show_progress
    )
    timings["embed_s"] = time.perf_counter() - t
    n = x.shape[0]
    k = _check_k(k, n)
    scores: dict[int, float] = {}
    candidates: list[int] = []
    if k == "auto":
        candidates = _auto_candidates(k_range, n, silhouette_sample, max_candidates)
        t = time.perf_counter()
        scores = silhouette_scores(x, candidates, seed=seed, sample_size=silhouette_sample)
        timings["select_k_s"] = time.perf_counter() - t
        k = max(scores, key=lambda kk: (scores[kk], -kk))
    assert isinstance(k, int)
    t = time.perf_counter()
    res = kmeans_stream(
        x, k, seed=seed, chunk_size=chunk_size, epochs=epochs, show_progress=show_progress
    )
    timings["cluster_s"] = time.perf_counter() - t
    return _build_partition(
        x, res, scores, emb_obj, seed, n_representatives, timings, t0,
        extra={
            "k_mode": "auto" if scores else "fixed",
            "k_candidates": candidates,
            "epochs": epochs,
            "chunk_size": chunk_size,
            "embeddings_path": str(work / "embeddings.npy"),
        },
    )  # fmt: skip
