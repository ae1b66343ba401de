"""Regroup: re-partition a corpus into fine-grained semantic domains.

Embed every example (MiniLM, TF-IDF+SVD, a local sentence-transformers model or your own
callable), cluster with seeded k-means, choose k by silhouette, and get a
:class:`Partition` whose :meth:`~Partition.assign` maps evaluation data to the nearest
*training* centroid.

Example:
    >>> from rnb_kernels.regroup import regroup, Partition
    >>> part = regroup(texts, k="auto", k_range=(2, 64), embedder="minilm", seed=0)
    ... # doctest: +SKIP

Heavy dependencies (scikit-learn, sentence-transformers) are imported only when used;
install them with ``pip install 'rnb_kernels[regroup]'``.

This package is also callable: importing it binds ``rnb_kernels.regroup`` to the package (that
is how Python's import system works), so ``rnb.regroup(texts, ...)`` must work on the package
as well as on the function it re-exports.
"""

import sys as _sys
import types as _types

from .._cache import default_cache_dir
from .api import regroup, regroup_stream, validate_texts
from .clustering import (
    KMeansResult,
    TwoLevelClustering,
    k_candidates,
    kmeans,
    kmeans_stream,
    membership_matrix,
    nearest_centroid,
    silhouette_scores,
    two_level_kmeans,
)
from .embed_cache import embed, embed_to_memmap
from .embedders import (
    CallableEmbedder,
    Embedder,
    MiniLMEmbedder,
    SentenceTransformerEmbedder,
    TfidfEmbedder,
    get_embedder,
)
from .partition import Partition, agreement, top_terms

__all__ = [
    "regroup",
    "regroup_stream",
    "validate_texts",
    "Partition",
    "agreement",
    "top_terms",
    "KMeansResult",
    "TwoLevelClustering",
    "kmeans",
    "kmeans_stream",
    "k_candidates",
    "membership_matrix",
    "nearest_centroid",
    "silhouette_scores",
    "two_level_kmeans",
    "Embedder",
    "TfidfEmbedder",
    "SentenceTransformerEmbedder",
    "MiniLMEmbedder",
    "CallableEmbedder",
    "get_embedder",
    "embed",
    "embed_to_memmap",
    "default_cache_dir",
]


class _CallablePackage(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        """``rnb_kernels.regroup(texts, ...)``: the :func:`regroup` function."""
        return regroup(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallablePackage
