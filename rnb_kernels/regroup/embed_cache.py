"""Embedding with a disk cache, and streaming a corpus too large for memory to a memmap.

* :func:`embed` — embed a corpus through the on-disk cache (key: embedder identity + every
  text), restoring a corpus-fitted embedder's state on a hit.
* :func:`embed_to_memmap` — stream any iterable of texts through an embedder into a
  memory-mapped ``.npy``, one chunk at a time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .._cache import default_cache_dir
from .embedders import Embedder, check_embeddings

logger = logging.getLogger(__name__)

__all__ = ["embed", "embed_to_memmap", "texts_fingerprint"]


def texts_fingerprint(texts: Iterable[str], salt: str = "") -> str:
    """SHA-256 over the texts in order (length-prefixed, so boundaries are unambiguous)."""
    h = hashlib.sha256(salt.encode())
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def embed(
    texts: Sequence[str],
    embedder: Embedder,
    *,
    cache_dir: str | os.PathLike[str] | None | bool = None,
) -> np.ndarray:
    """Embed ``texts`` with ``embedder``, through the on-disk cache.

    The cache key is SHA-256 of (embedder identity, every text in order): the same corpus
    with the same embedder is served from disk instantly; any change re-embeds. For a
    corpus-fitted embedder (TF-IDF) the fitted state is cached too and restored into
    ``embedder`` on a hit, so later :meth:`Partition.assign` calls match.

    Args:
        texts: the corpus, ``n`` strings.
        embedder: a resolved :class:`Embedder` (see :func:`get_embedder`).
        cache_dir: cache root (``<root>/embeddings/``); ``None`` = :func:`default_cache_dir`,
            ``False`` = no caching.

    Returns:
        ``float32[n, dim]`` embeddings (validated finite).
    """
    texts = list(texts)
    key = embedder.cache_key
    if key is None or cache_dir is False:
        root = None
    elif cache_dir is None or cache_dir is True:
        root = default_cache_dir()
    else:
        root = Path(cache_dir)
    if root is None:
        if embedder.needs_fit and not embedder.fitted:
            embedder.fit(texts)
        return embedder(texts)

    folder = root / "embeddings"
    digest = texts_fingerprint(texts, salt=key)[:32]
    emb_path = folder / f"{embedder.name.replace('/', '_').replace(':', '_')}-{digest}.npy"
    state_path = emb_path.with_suffix(".state.npz")
    if emb_path.is_file() and (not embedder.needs_fit or embedder.fitted or state_path.is_file()):
        try:
            emb = np.load(emb_path, allow_pickle=False)
            if embedder.needs_fit and not embedder.fitted:
                with np.load(state_path, allow_pickle=False) as z:
                    embedder.load_fitted({k: z[k] for k in z.files})
            logger.info("embedding cache hit: %s", emb_path)
            return check_embeddings(emb, len(texts), f"cached embeddings {emb_path}")
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable embedding cache %s (%s)", emb_path, exc)

    if embedder.needs_fit and not embedder.fitted:
        embedder.fit(texts)
    emb = embedder(texts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if embedder.needs_fit:
            _atomic_save_npz(state_path, embedder.state()[1])
        _atomic_save_npy(emb_path, emb)
        logger.info("cached embeddings at %s", emb_path)
    except OSError as exc:  # a read-only cache must not break the run
        logger.warning("could not write embedding cache %s (%s)", emb_path, exc)
    return emb


_NPY_HEADER_BYTES = 128


def _npy_header(n: int, d: int) -> bytes:
    # A fixed-size .npy v1.0 header lets us stream rows of unknown count and patch the
    # shape in at the end without rewriting the data.
    magic = b"\x93NUMPY\x01\x00"
    body = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, {d}), }}"
    pad = _NPY_HEADER_BYTES - len(magic) - 2 - len(body) - 1
    if pad < 0:
        raise ValueError(f"shape ({n}, {d}) too large for the streaming header")
    body = body + " " * pad + "\n"
    return magic + len(body).to_bytes(2, "little") + body.encode("latin1")


def embed_to_memmap(
    texts: Iterable[str],
    embedder: Embedder,
    path: str | os.PathLike[str],
    *,
    chunk_size: int = 8192,
    fit_size: int = 50_000,
    show_progress: bool = True,
) -> np.memmap:
    """Stream ``texts`` through ``embedder`` into a memory-mapped ``.npy`` file.

    For corpora that do not fit in memory: texts are consumed lazily (any iterable, e.g. a
    generator reading a jsonl file) and embeddings are written chunk by chunk, so peak
    memory is one chunk of texts plus one chunk of embeddings. A corpus-fitted embedder
    that is not yet fitted is fitted on the first ``fit_size`` texts.

    Returns:
        read-only ``np.memmap`` of shape ``[n, dim]``, dtype float32, backed by ``path``
        (a standard ``.npy``: ``np.load(path, mmap_mode="r")`` reopens it).
    """
    from tqdm.auto import tqdm

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    it = iter(texts)
    first: list[str] = []
    if embedder.needs_fit and not embedder.fitted:
        for t in it:
            first.append(t)
            if len(first) >= fit_size:
                break
        if not first:
            raise ValueError("empty corpus: the text stream yielded no texts")
        embedder.fit(first)

    def chunks() -> Iterator[list[str]]:
        buf = list(first)
        while len(buf) >= chunk_size:
            yield buf[:chunk_size]
            buf = buf[chunk_size:]
        for t in it:
            buf.append(t)
            if len(buf) == chunk_size:
                yield buf
                buf = []
        if buf:
            yield buf

    n = 0
    d = None
    tmp = path.with_suffix(path.suffix + ".partial")
    with open(tmp, "wb") as f, tqdm(disable=not show_progress, unit="text", desc="embed") as bar:
        f.write(b"\0" * _NPY_HEADER_BYTES)
        for chunk in chunks():
            _check_text_chunk(chunk, n)
            emb = embedder(chunk)
            if d is None:
                d = emb.shape[1]
            elif emb.shape[1] != d:
                raise ValueError(f"embedder changed dimension mid-stream: {d} -> {emb.shape[1]}")
            f.write(emb.tobytes(order="C"))
            n += len(chunk)
            bar.update(len(chunk))
        if n == 0:
            raise ValueError("empty corpus: the text stream yielded no texts")
        f.seek(0)
        f.write(_npy_header(n, d))
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def _check_text_chunk(chunk: list[str], offset: int) -> None:
    for i, t in enumerate(chunk):
        if not isinstance(t, str):
            raise TypeError(f"text at index {offset + i} is {type(t).__name__}, not str")
        if not t.strip():
            raise ValueError(f"text at index {offset + i} is empty or whitespace-only")
