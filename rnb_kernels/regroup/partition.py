"""The :class:`Partition` produced by :func:`~rnb_kernels.regroup.regroup`.

A Partition is everything a training run needs from regrouping: one domain label per
training example, the centroids (to assign eval data to the nearest *training* cluster,
so every eval cluster has training data), the silhouette scores that chose k, the fitted
embedder state where there is one, and metadata. It saves to a directory holding
``partition.npz`` (arrays, loaded with ``allow_pickle=False``) and ``partition.json``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._deps import require
from .clustering import membership_matrix, nearest_centroid
from .embedders import Embedder, check_embeddings, embedder_from_state

logger = logging.getLogger(__name__)

__all__ = ["Partition", "agreement", "top_terms"]

FORMAT_VERSION = 1
_ARRAYS = "partition.npz"
_META = "partition.json"


def agreement(labels: np.ndarray, reference: Sequence[Any] | np.ndarray) -> dict[str, float]:
    """Adjusted Rand index and normalised mutual information between two labelings.

    ARI is 0 in expectation for a random labeling and 1 for identical partitions (up to
    renaming); NMI is in [0, 1]. ``reference`` may hold any hashable labels (e.g. strings).

    Example:
        >>> agreement(np.array([0, 0, 1, 1]), ["a", "a", "b", "b"])
        {'ari': 1.0, 'nmi': 1.0}
    """
    metrics = require("sklearn.metrics", what="agreement scores (ARI/NMI)")
    labels = np.asarray(labels)
    ref = np.asarray(reference)
    if ref.shape != labels.shape:
        raise ValueError(
            f"reference labels have shape {ref.shape}, expected {labels.shape} (one per example)"
        )
    return {
        "ari": float(metrics.adjusted_rand_score(ref, labels)),
        "nmi": float(metrics.normalized_mutual_info_score(ref, labels)),
    }


def top_terms(
    texts: Sequence[str], labels: np.ndarray, k: int, n_terms: int = 8
) -> list[list[str]]:
    """The ``n_terms`` most distinctive words of each cluster (class-based TF-IDF).

    Term frequencies are pooled per cluster and weighted by log(1 + mean cluster
    frequency / term frequency), so words common to every cluster rank low.
    """
    fe = require("sklearn.feature_extraction.text", what="cluster top terms")
    vec = fe.CountVectorizer(stop_words="english", max_features=50_000, min_df=1, dtype=np.float64)
    try:
        counts = vec.fit_transform(texts)
    except ValueError:  # no word tokens at all
        return [[] for _ in range(k)]
    sp = require("scipy.sparse", what="cluster top terms")
    onehot = sp.csr_matrix(
        (np.ones(len(labels)), (np.asarray(labels), np.arange(len(labels)))),
        shape=(k, len(labels)),
    )
    per_cluster = np.asarray((onehot @ counts).todense())  # [k, V]
    tf = per_cluster / np.maximum(per_cluster.sum(axis=1, keepdims=True), 1.0)
    avg_words = per_cluster.sum() / max(k, 1)
    idf = np.log1p(avg_words / np.maximum(per_cluster.sum(axis=0), 1.0))
    score = tf * idf[None, :]
    vocab = vec.get_feature_names_out()
    out = []
    for c in range(k):
        order = np.argsort(-score[c], kind="stable")[:n_terms]
        out.append([str(vocab[j]) for j in order if score[c, j] > 0])
    return out


@dataclass
class Partition:
    """A semantic partition of a corpus into ``k`` domains.

    Attributes:
        labels: ``int64[n]`` domain of each training example, values in ``[0, k)``.
        centroids: ``float32[k, dim]`` cluster centres in embedding space.
        scores: ``{k: silhouette}`` for every k tried (empty when k was given).
        metadata: embedder, seed, sizes, timings, k_range, backend, ... (JSON-able).
        representatives: ``int64[k, r]`` indices of the r training examples closest to
            each centroid (-1 padded), used by :meth:`summary`.
        coarse_of_fine: for a two-level partition, ``int64[k]`` coarse cluster of each
            (fine) cluster; ``None`` otherwise.
        coarse_centroids: ``float32[k_coarse, dim]`` or ``None``.

    Example:
        >>> part = regroup(texts, k=8, embedder="tfidf")          # doctest: +SKIP
        >>> eval_labels = part.assign(eval_texts)                  # doctest: +SKIP
        >>> part.save("runs/part"); Partition.load("runs/part")    # doctest: +SKIP
    """

    labels: np.ndarray
    centroids: np.ndarray
    scores: dict[int, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    representatives: np.ndarray | None = None
    coarse_of_fine: np.ndarray | None = None
    coarse_centroids: np.ndarray | None = None
    embedder: Embedder | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        self.scores = {int(k): float(v) for k, v in self.scores.items()}
        if self.centroids.ndim != 2:
            raise ValueError(f"centroids must be [k, dim]; got shape {self.centroids.shape}")
        if self.labels.ndim != 1:
            raise ValueError(f"labels must be 1-D; got shape {self.labels.shape}")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= self.k):
            raise ValueError(f"labels must lie in [0, k={self.k})")

    # ---- basic views -------------------------------------------------------------------

    @property
    def k(self) -> int:
        """Number of clusters (domains)."""
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def sizes(self) -> np.ndarray:
        """``int64[k]`` training examples per cluster."""
        return np.bincount(self.labels, minlength=self.k).astype(np.int64)

    def proportions(self, labels: np.ndarray | None = None) -> np.ndarray:
        """``float64[k]`` share of each cluster in ``labels`` (default: the training labels).

        ``part.proportions(part.assign(eval_texts))`` is R&B's ``p_eval``.
        """
        lab = self.labels if labels is None else np.asarray(labels, dtype=np.int64)
        counts = np.bincount(lab, minlength=self.k).astype(np.float64)
        total = counts.sum()
        if total == 0:
            raise ValueError("cannot take proportions of an empty labeling")
        return counts / total

    @property
    def coarse_k(self) -> int | None:
        return None if self.coarse_centroids is None else int(self.coarse_centroids.shape[0])

    @property
    def coarse_labels(self) -> np.ndarray | None:
        """``int64[n]`` coarse cluster of each example (two-level partitions only)."""
        return None if self.coarse_of_fine is None else self.coarse_of_fine[self.labels]

    def membership(self) -> np.ndarray:
        """``float64[k_coarse, k]``: uniform distribution over each coarse cluster's members.

        The default DGA basis distributions B_j (one per coarse cluster).
        """
        if self.coarse_of_fine is None or self.coarse_k is None:
            raise ValueError("this partition has no coarse level; regroup(..., k_coarse=m)")
        return membership_matrix(self.coarse_of_fine, self.coarse_k)

    # ---- assignment --------------------------------------------------------------------

    def assign(self, texts_or_embeddings: Sequence[str] | np.ndarray | Any) -> np.ndarray:
        """Nearest-centroid cluster of each new example: ``int64[n]``.

        Args:
            texts_or_embeddings: a list of strings (embedded with this partition's
                embedder: minilm / a local model / the fitted TF-IDF), or embeddings
                ``float[n, dim]`` (numpy or torch) from the same embedder.

        ``part.assign(training_embeddings)`` reproduces ``part.labels`` exactly.
        """
        x = texts_or_embeddings
        if isinstance(x, str):
            raise TypeError("assign() takes a list of texts or an [n, dim] array, not one str")
        is_texts = isinstance(x, Sequence) and len(x) > 0 and isinstance(x[0], str)
        if is_texts:
            if self.embedder is None:
                raise ValueError(
                    f"this partition's embedder ({self.metadata.get('embedder')!r}) cannot "
                    "be rebuilt (e.g. a user callable after load); pass embeddings instead"
                )
            for i, t in enumerate(x):
                if not isinstance(t, str) or not t.strip():
                    raise ValueError(f"text at index {i} is empty or not a str")
            emb = self.embedder(list(x))
        else:
            if isinstance(x, np.ndarray) and x.ndim == 2 and x.dtype.kind in "fiu":
                # Memmaps are not copied; nearest_centroid checks finiteness per chunk.
                emb = x
            else:
                emb = check_embeddings(x, len(x), "assign() input")
        if emb.shape[1] != self.dim:
            raise ValueError(
                f"embeddings have dim {emb.shape[1]} but the partition's centroids have dim "
                f"{self.dim}; embed with the same embedder ({self.metadata.get('embedder')!r})"
            )
        return nearest_centroid(emb, self.centroids)[0]

    # ---- reporting ---------------------------------------------------------------------

    def agreement(self, reference: Sequence[Any] | np.ndarray) -> dict[str, float]:
        """ARI and NMI of :attr:`labels` against original domain labels (see :func:`agreement`)."""
        return agreement(self.labels, reference)

    def summary_rows(
        self,
        texts: Sequence[str] | None = None,
        *,
        reference: Sequence[Any] | np.ndarray | None = None,
        n_examples: int = 2,
        n_terms: int = 6,
    ) -> list[dict[str, Any]]:
        """One dict per cluster: ``cluster, size, share, top_terms, examples[, top_domain]``.

        ``texts`` are the training texts (same order as :attr:`labels`); without them only
        sizes are reported. With ``reference`` (original domains) each row also names the
        majority original domain and its purity.
        """
        sizes = self.sizes
        n = max(int(sizes.sum()), 1)
        terms = top_terms(texts, self.labels, self.k, n_terms) if texts is not None else None
        rows = []
        ref = None if reference is None else np.asarray(reference)
        for c in range(self.k):
            row: dict[str, Any] = {"cluster": c, "size": int(sizes[c]), "share": sizes[c] / n}
            if self.coarse_of_fine is not None:
                row["coarse"] = int(self.coarse_of_fine[c])
            if terms is not None:
                row["top_terms"] = terms[c]
            if texts is not None and self.representatives is not None:
                idx = [int(i) for i in self.representatives[c][:n_examples] if i >= 0]
                row["examples"] = [texts[i] for i in idx]
            if ref is not None and sizes[c]:
                vals, cnt = np.unique(ref[self.labels == c], return_counts=True)
                j = int(np.argmax(cnt))
                row["top_domain"] = str(vals[j])
                row["purity"] = float(cnt[j] / sizes[c])
            rows.append(row)
        return rows

    def summary(
        self,
        texts: Sequence[str] | None = None,
        *,
        reference: Sequence[Any] | np.ndarray | None = None,
        n_examples: int = 1,
        n_terms: int = 6,
        max_rows: int = 64,
        width: int = 60,
    ) -> str:
        """A human-readable table: sizes, top terms, a representative text per cluster.

        Clusters are listed largest first (at most ``max_rows``); agreement with
        ``reference`` (ARI/NMI) heads the table when given.
        """
        rows = self.summary_rows(texts, reference=reference, n_examples=n_examples, n_terms=n_terms)
        md = self.metadata
        head = [
            f"Partition: k={self.k}, n={int(self.sizes.sum())}, dim={self.dim}, "
            f"embedder={md.get('embedder', '?')}, seed={md.get('seed', '?')}"
        ]
        if self.scores:
            best = max(self.scores, key=lambda kk: (self.scores[kk], -kk))
            head.append(
                f"silhouette over {len(self.scores)} k values: best k={best} "
                f"({self.scores[best]:.4f})"
            )
        if reference is not None:
            ag = self.agreement(reference)
            head.append(f"agreement with original labels: ARI={ag['ari']:.4f} NMI={ag['nmi']:.4f}")
        if self.coarse_k is not None:
            head.append(f"two-level: {self.coarse_k} coarse clusters over {self.k} fine clusters")

        def clip(s: str) -> str:
            s = " ".join(s.split())
            return s if len(s) <= width else s[: width - 1] + "…"

        cols = ["cluster", "size", "share"]
        if rows and "coarse" in rows[0]:
            cols.append("coarse")
        if reference is not None:
            cols += ["top_domain", "purity"]
        if texts is not None:
            cols += ["top_terms", "example"]
        table = []
        for r in sorted(rows, key=lambda r: (-r["size"], r["cluster"]))[:max_rows]:
            cells = {
                "cluster": str(r["cluster"]),
                "size": str(r["size"]),
                "share": f"{r['share']:.1%}",
                "coarse": str(r.get("coarse", "")),
                "top_domain": clip(r.get("top_domain", "")),
                "purity": f"{r['purity']:.0%}" if "purity" in r else "",
                "top_terms": clip(", ".join(r.get("top_terms", []))),
                "example": clip(r["examples"][0]) if r.get("examples") else "",
            }
            table.append([cells[c] for c in cols])
        widths = [
            max(len(c), *(len(t[i]) for t in table)) if table else len(c)
            for i, c in enumerate(cols)
        ]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths)) for t in table]
        if len(rows) > max_rows:
            lines.append(f"... {len(rows) - max_rows} smaller clusters not shown")
        return "\n".join(head + [""] + lines)

    # ---- persistence -------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path/partition.npz`` and ``path/partition.json`` (no pickle); returns ``path``."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {"labels": self.labels, "centroids": self.centroids}
        if self.representatives is not None:
            arrays["representatives"] = np.asarray(self.representatives, dtype=np.int64)
        if self.coarse_of_fine is not None:
            arrays["coarse_of_fine"] = self.coarse_of_fine
            arrays["coarse_centroids"] = self.coarse_centroids
        emb_cfg = None
        if self.embedder is not None:
            emb_cfg, emb_arrays = self.embedder.state()
            arrays.update({f"embedder/{k}": v for k, v in emb_arrays.items()})
        meta = {
            "format_version": FORMAT_VERSION,
            "k": self.k,
            "scores": {str(k): v for k, v in sorted(self.scores.items())},
            "metadata": self.metadata,
            "embedder_config": emb_cfg,
        }
        np.savez(out / _ARRAYS, **arrays)
        (out / _META).write_text(json.dumps(meta, indent=2, default=json_default))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Partition:
        """Load a partition written by :meth:`save`.

        A user-callable embedder cannot be restored (nothing is pickled), so such a
        partition assigns embeddings only.
        """
        src = Path(path)
        if not (src / _META).is_file() or not (src / _ARRAYS).is_file():
            raise FileNotFoundError(
                f"{src} is not a saved Partition (expected {_META} and {_ARRAYS} inside)"
            )
        meta = json.loads((src / _META).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{src}: unsupported partition format {meta.get('format_version')!r}")
        with np.load(src / _ARRAYS, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        embedder = None
        if meta.get("embedder_config"):
            emb_arrays = {
                k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("embedder/")
            }
            try:
                embedder = embedder_from_state(meta["embedder_config"], emb_arrays)
            except ImportError as exc:
                logger.warning("partition embedder not restored: %s", exc)
        return cls(
            labels=arrays["labels"],
            centroids=arrays["centroids"],
            scores={int(k): v for k, v in meta["scores"].items()},
            metadata=meta["metadata"],
            representatives=arrays.get("representatives"),
            coarse_of_fine=arrays.get("coarse_of_fine"),
            coarse_centroids=arrays.get("coarse_centroids"),
            embedder=embedder,
        )


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars / arrays and paths."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
