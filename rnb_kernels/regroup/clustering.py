"""k-means clustering, silhouette-based choice of k, and two-level (coarse -> fine) clustering.

All backends (scikit-learn ``KMeans``, ``MiniBatchKMeans``, optional ``faiss``) only
produce *centroids*; the labels are always recomputed by :func:`nearest_centroid`, the
same function :meth:`Partition.assign` uses. So ``part.assign(train_embeddings) ==
part.labels`` holds by construction, whatever the backend.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .._deps import has_module, require

logger = logging.getLogger(__name__)

__all__ = [
    "KMeansResult",
    "TwoLevelClustering",
    "kmeans",
    "kmeans_stream",
    "nearest_centroid",
    "k_candidates",
    "silhouette_scores",
    "two_level_kmeans",
]

BACKENDS = ("auto", "kmeans", "minibatch", "faiss")


@dataclass
class KMeansResult:
    """Output of :func:`kmeans`.

    Attributes:
        labels: ``int64[n]`` nearest-centroid labels in ``[0, k)``.
        centroids: ``float32[k, dim]``.
        inertia: sum of squared distances to the assigned centroid.
        backend: which backend ran (``"kmeans"``, ``"minibatch"``, ``"faiss"``, ``"stream"``).
        sq_dist: ``float64[n]`` squared distance of each row to its centroid.
    """

    labels: np.ndarray
    centroids: np.ndarray
    inertia: float
    backend: str
    sq_dist: np.ndarray


def nearest_centroid(
    x: np.ndarray, centroids: np.ndarray, *, chunk_size: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest centroid (squared Euclidean) for every row of ``x``.

    Computed in float64, chunk by chunk (``x`` may be a memmap larger than memory), so
    the answer does not depend on how the rows are batched. Ties go to the lower index.

    Args:
        x: ``float[n, dim]``.
        centroids: ``float[k, dim]``.

    Returns:
        ``(labels int64[n], squared distances float64[n])``.

    Example:
        >>> nearest_centroid(np.array([[0.0], [0.9]]), np.array([[0.0], [1.0]]))[0]
        array([0, 1])
    """
    c = np.asarray(centroids, dtype=np.float64)
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(
            f"embeddings of shape {tuple(x.shape)} do not match centroids of shape {c.shape}"
        )
    c_sq = np.einsum("kd,kd->k", c, c)
    n = x.shape[0]
    labels = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float64)
    for start in range(0, n, chunk_size):
        xb = np.asarray(x[start : start + chunk_size], dtype=np.float64)
        if not np.isfinite(xb).all():
            bad = start + int(np.flatnonzero(~np.isfinite(xb).all(axis=1))[0])
            raise ValueError(f"embeddings contain NaN or inf (first at row {bad})")
        d2 = c_sq[None, :] - 2.0 * (xb @ c.T)
        lab = np.argmin(d2, axis=1)
        labels[start : start + xb.shape[0]] = lab
        x_sq = np.einsum("nd,nd->n", xb, xb)
        dist[start : start + xb.shape[0]] = np.maximum(d2[np.arange(xb.shape[0]), lab] + x_sq, 0.0)
    return labels, dist


def _resolve_backend(backend: str, n: int, minibatch_threshold: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend != "auto":
        if backend == "faiss":
            require("faiss", what="the 'faiss' clustering backend", extra="faiss")
        return backend
    if n <= minibatch_threshold:
        return "kmeans"
    return "faiss" if has_module("faiss") else "minibatch"


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    n_init: int = 3,
    max_iter: int = 300,
    backend: str = "auto",
    minibatch_threshold: int = 50_000,
    batch_size: int = 4096,
    sample_weight: np.ndarray | None = None,
) -> KMeansResult:
    """Seeded k-means on ``x`` (``float[n, dim]``).

    Args:
        k: number of clusters, ``1 <= k <= n``.
        seed: makes the result deterministic (for the sklearn backends; faiss is
            deterministic for a fixed thread count).
        n_init: restarts; the lowest-inertia run wins.
        backend: ``"auto"`` (exact ``KMeans`` up to ``minibatch_threshold`` rows, then
            faiss when installed, else ``MiniBatchKMeans``), or force one of
            ``"kmeans" | "minibatch" | "faiss"``.
        sample_weight: optional ``float[n]`` row weights (sklearn backends).

    Returns:
        :class:`KMeansResult`; ``labels`` is ``int64[n]``, ``centroids`` ``float32[k, dim]``.

    Example:
        >>> r = kmeans(np.random.default_rng(0).normal(size=(100, 4)), 3, seed=0)
        >>> r.labels.shape, r.centroids.shape
        ((100,), (3, 4))
    """
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int; got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of examples ({n})")
    which = _resolve_backend(backend, n, minibatch_threshold)
    xf = np.ascontiguousarray(x, dtype=np.float32)
    if which == "faiss":
        if sample_weight is not None:
            raise ValueError("sample_weight is not supported by the 'faiss' backend")
        faiss = require("faiss", what="the 'faiss' clustering backend", extra="faiss")
        km = faiss.Kmeans(
            xf.shape[1], int(k), niter=min(max_iter, 25), nredo=n_init, seed=seed,
            max_points_per_centroid=max(256, math.ceil(n / k)), verbose=False,
        )  # fmt: skip
        km.train(xf)
        centroids = np.asarray(km.centroids, dtype=np.float32)
    else:
        cluster = require("sklearn.cluster", what="k-means clustering")
        if which == "minibatch":
            est = cluster.MiniBatchKMeans(
                n_clusters=int(k), random_state=seed, n_init=n_init, max_iter=max_iter,
                batch_size=batch_size,
            )  # fmt: skip
        else:
            est = cluster.KMeans(
                n_clusters=int(k), random_state=seed, n_init=n_init, max_iter=max_iter
            )
        est.fit(xf, sample_weight=sample_weight)
        centroids = np.asarray(est.cluster_centers_, dtype=np.float32)
    labels, dist = nearest_centroid(xf, centroids)
    w = 1.0 if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    return KMeansResult(labels, centroids, float(np.sum(w * dist)), which, dist)


def kmeans_stream(
    x: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    chunk_size: int = 16_384,
    epochs: int = 3,
    init_size: int | None = None,
    show_progress: bool = True,
) -> KMeansResult:
    """Out-of-core k-means: ``MiniBatchKMeans.partial_fit`` over row blocks of ``x``.

    ``x`` is typically the memmap written by :func:`~rnb_kernels.regroup.embed_to_memmap`;
    only one block of ``chunk_size`` rows is in memory at a time. Centroids are seeded by
    exact k-means on ``init_size`` random rows (default ``max(10_000, 20 k)``), then
    refined for ``epochs`` passes; blocks are visited in a seeded random order each epoch
    so the centroids do not drift toward the file's tail.

    Returns:
        :class:`KMeansResult` with ``backend="stream"``.
    """
    from tqdm.auto import tqdm

    cluster = require("sklearn.cluster", what="streaming k-means")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of examples ({n})")
    rng = np.random.default_rng(seed)
    # Seeding from the first partial_fit block alone (sklearn's default) often merges two
    # true clusters and splits another, and mini-batch updates rarely undo that. Instead
    # seed with exact k-means (k-means++, restarts) on a random sample read from the memmap.
    m = min(n, init_size if init_size is not None else max(10_000, 20 * k))
    sample = np.asarray(x[np.sort(rng.choice(n, size=m, replace=False))], dtype=np.float32)
    init = kmeans(sample, k, seed=seed, n_init=3, backend="kmeans").centroids
    starts = np.arange(0, n, chunk_size)
    est = cluster.MiniBatchKMeans(n_clusters=int(k), init=init, n_init=1, random_state=seed)
    total = epochs * len(starts)
    with tqdm(total=total, disable=not show_progress, desc="k-means (stream)") as bar:
        for _ in range(epochs):
            for b in rng.permutation(len(starts)):
                block = np.asarray(x[starts[b] : starts[b] + chunk_size], dtype=np.float32)
                est.partial_fit(block)
                bar.update(1)
    centroids = np.asarray(est.cluster_centers_, dtype=np.float32)
    labels, dist = nearest_centroid(x, centroids)
    return KMeansResult(labels, centroids, float(dist.sum()), "stream", dist)


def k_candidates(
    k_range: tuple[int, int] | Sequence[int] | Iterable[int],
    n: int,
    *,
    max_candidates: int = 16,
) -> list[int]:
    """The values of k that ``k="auto"`` tries.

    A 2-tuple ``(lo, hi)`` is an inclusive range: every integer when it holds at most
    ``max_candidates`` values, else a log-spaced grid that always contains ``lo`` and
    ``hi`` (silhouette changes slowly in k, so a geometric grid loses little). Any other
    iterable is taken as the explicit list. Values must lie in ``[2, n - 1]``, the domain
    of the silhouette score.

    Example:
        >>> k_candidates((2, 6), n=100)
        [2, 3, 4, 5, 6]
    """
    if isinstance(k_range, tuple) and len(k_range) == 2:
        lo, hi = (int(v) for v in k_range)
        if lo > hi:
            raise ValueError(f"k_range=({lo}, {hi}) must have lo <= hi")
        if hi - lo + 1 <= max_candidates:
            ks = list(range(lo, hi + 1))
        else:
            grid = np.geomspace(lo, hi, num=max_candidates)
            ks = sorted({lo, hi, *(int(round(v)) for v in grid)})
    else:
        ks = sorted({int(v) for v in k_range})
    if not ks:
        raise ValueError("k_range is empty")
    if ks[0] < 2:
        raise ValueError(f"k_range values must be >= 2 for the silhouette score; got {ks[0]}")
    if ks[-1] > n - 1:
        raise ValueError(
            f"k_range goes up to k={ks[-1]} but silhouette needs k <= n - 1 = {n - 1} "
            f"(the corpus has {n} examples)"
        )
    return ks


def silhouette_scores(
    x: np.ndarray,
    ks: Sequence[int],
    *,
    seed: int = 0,
    sample_size: int = 4000,
    n_init: int = 2,
    show_progress: bool = False,
) -> dict[int, float]:
    """Silhouette score of a seeded k-means for each k, on one bounded random subsample.

    Silhouette costs O(m²) in the subsample size m, so both the clustering and the score
    use the same ``min(n, sample_size)`` rows (drawn once, seeded): every k is judged on
    identical data, and the cost is independent of the corpus size.

    Returns:
        ``{k: silhouette in [-1, 1]}``; a k whose clustering collapses to a single
        non-empty cluster scores -1.
    """
    from tqdm.auto import tqdm

    metrics = require("sklearn.metrics", what="choosing k by silhouette")
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n, sample_size), replace=False))
    xs = np.ascontiguousarray(x[idx], dtype=np.float32)
    m = xs.shape[0]
    scores: dict[int, float] = {}
    for k in tqdm(ks, disable=not show_progress, desc="silhouette"):
        if not 2 <= k <= m - 1:
            raise ValueError(f"cannot score k={k} on a subsample of {m} examples")
        res = kmeans(xs, int(k), seed=seed, n_init=n_init, backend="kmeans")
        if np.unique(res.labels).size < 2:
            scores[int(k)] = -1.0
        else:
            scores[int(k)] = float(metrics.silhouette_score(xs, res.labels, metric="euclidean"))
        logger.debug("silhouette k=%d: %.4f", k, scores[int(k)])
    return scores


@dataclass
class TwoLevelClustering:
    """Fine clusters grouped into coarse clusters (DGA distribution reweighting).

    Attributes:
        fine_labels: ``int64[n]`` fine cluster of each example, in ``[0, k_fine)``.
        fine_centroids: ``float32[k_fine, dim]``.
        coarse_of_fine: ``int64[k_fine]`` coarse cluster of each fine cluster.
        coarse_centroids: ``float32[k_coarse, dim]`` (size-weighted means of fine centroids).
    """

    fine_labels: np.ndarray
    fine_centroids: np.ndarray
    coarse_of_fine: np.ndarray
    coarse_centroids: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def k_fine(self) -> int:
        return int(self.fine_centroids.shape[0])

    @property
    def k_coarse(self) -> int:
        return int(self.coarse_centroids.shape[0])

    @property
    def coarse_labels(self) -> np.ndarray:
        """``int64[n]`` coarse cluster of each example."""
        return self.coarse_of_fine[self.fine_labels]

    def members(self, coarse: int) -> np.ndarray:
        """Sorted fine cluster ids that belong to coarse cluster ``coarse``."""
        return np.flatnonzero(self.coarse_of_fine == coarse)

    @property
    def membership(self) -> np.ndarray:
        """``float64[k_coarse, k_fine]``: row c is uniform over coarse cluster c's members.

        These rows are DGA's default basis distributions B_j over fine clusters.
        """
        return membership_matrix(self.coarse_of_fine, self.k_coarse)


def membership_matrix(coarse_of_fine: np.ndarray, k_coarse: int) -> np.ndarray:
    """Row-stochastic ``float64[k_coarse, k_fine]``, uniform over each coarse cluster's members."""
    k_fine = coarse_of_fine.shape[0]
    b = np.zeros((k_coarse, k_fine), dtype=np.float64)
    b[coarse_of_fine, np.arange(k_fine)] = 1.0
    sizes = b.sum(axis=1, keepdims=True)
    np.divide(b, sizes, out=b, where=sizes > 0)
    return b


def two_level_kmeans(
    x: np.ndarray,
    k_fine: int,
    k_coarse: int,
    *,
    seed: int = 0,
    n_init: int = 3,
    backend: str = "auto",
    fine: KMeansResult | None = None,
) -> TwoLevelClustering:
    """Fine k-means on the data, then coarse k-means on the fine centroids.

    The coarse step clusters the ``k_fine`` centroids weighted by their cluster sizes, so
    it costs O(k_fine) rather than O(n) and every fine cluster belongs to exactly one
    coarse cluster. Coarse clusters that end up with no member are dropped (and
    renumbered), so every coarse cluster is non-empty.

    Args:
        x: ``float[n, dim]`` embeddings.
        k_fine: fine clusters (e.g. 4096 for DGA), ``<= n``.
        k_coarse: coarse clusters (e.g. 64), ``<= k_fine``.
        fine: an already computed fine clustering to reuse.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(500, 8)).astype(np.float32)
        >>> tl = two_level_kmeans(x, k_fine=32, k_coarse=4, seed=0)
        >>> tl.membership.shape, tl.coarse_labels.shape
        ((4, 32), (500,))
    """
    if not 1 <= k_coarse <= k_fine:
        raise ValueError(f"k_coarse={k_coarse} must be between 1 and k_fine={k_fine}")
    if fine is None:
        fine = kmeans(x, k_fine, seed=seed, n_init=n_init, backend=backend)
    sizes = np.bincount(fine.labels, minlength=k_fine).astype(np.float64)
    # An empty fine cluster carries no data, but it still needs a coarse parent; a tiny
    # weight keeps sklearn's weighted update well-defined without letting it pull.
    weights = np.where(sizes > 0, sizes, 1e-6)
    coarse = kmeans(
        fine.centroids, k_coarse, seed=seed, n_init=n_init, backend="kmeans", sample_weight=weights
    )
    used = np.unique(coarse.labels)
    coarse_of_fine = coarse.labels
    coarse_centroids = coarse.centroids
    if used.size < k_coarse:
        logger.warning(
            "two_level_kmeans: %d of %d coarse clusters had no fine member and were dropped",
            k_coarse - used.size,
            k_coarse,
        )
        remap = np.full(k_coarse, -1, dtype=np.int64)
        remap[used] = np.arange(used.size)
        coarse_of_fine = remap[coarse_of_fine]
        coarse_centroids = coarse_centroids[used]
    return TwoLevelClustering(
        fine_labels=fine.labels,
        fine_centroids=fine.centroids,
        coarse_of_fine=coarse_of_fine.astype(np.int64),
        coarse_centroids=np.ascontiguousarray(coarse_centroids, dtype=np.float32),
        meta={"fine_backend": fine.backend, "fine_inertia": fine.inertia},
    )
