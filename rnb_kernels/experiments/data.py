"""Corpus preparation shared by ``rnb demo`` and ``rnb bench mixing``.

:func:`prepare` loads a corpus, splits it into train/eval (stratified by domain), regroups
the training texts into semantic clusters (eval texts go to the nearest training centroid)
and tokenizes both splits into fixed-length rows (:class:`EncodedData`) over a compact
vocabulary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import CorpusConfig
from .models import IGNORE_INDEX
from .tokenizer import CompactVocab

logger = logging.getLogger(__name__)

__all__ = ["EncodedData", "PreparedData", "encode_texts", "load_corpus", "prepare"]


@dataclass
class EncodedData:
    """Fixed-length token rows with a domain label per row.

    Attributes:
        inputs: ``int64[n, T]`` token ids (right-padded).
        labels: ``int64[n, T]`` next-token targets, ``-100`` on padding.
        domains: ``int64[n]`` domain of each row (the mixer's domains for training data).
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    domains: np.ndarray

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, idx: np.ndarray | Sequence[int]) -> EncodedData:
        """Rows ``idx`` (``int[k]``) as a new :class:`EncodedData`."""
        idx = np.asarray(idx, dtype=np.int64)
        t = torch.from_numpy(idx)
        return EncodedData(self.inputs[t], self.labels[t], self.domains[idx])

    def with_domains(self, domains: np.ndarray) -> EncodedData:
        """Same rows, other labels (e.g. regrouped clusters instead of original domains)."""
        domains = np.asarray(domains, dtype=np.int64)
        if domains.shape != (len(self),):
            raise ValueError(f"domains has shape {domains.shape}; expected ({len(self)},)")
        return EncodedData(self.inputs, self.labels, domains)


def encode_texts(
    texts: Sequence[str],
    tokenizer: Any,
    context: int,
    domains: np.ndarray | Sequence[int],
    vocab: CompactVocab | None = None,
) -> EncodedData:
    """Tokenize, append EOS, truncate to ``context + 1`` tokens, shift, pad.

    Args:
        texts: ``n`` strings.
        tokenizer: has ``encode_batch(texts) -> list[list[int]]`` and ``eos_id``.
        context: model context ``T``.
        domains: ``int[n]`` domain per text.
        vocab: optional :class:`~rnb_kernels.experiments.tokenizer.CompactVocab` to remap ids.

    Returns:
        :class:`EncodedData` with ``inputs``/``labels`` of shape ``[n, T]``.
    """
    domains = np.asarray(domains, dtype=np.int64)
    if domains.shape != (len(texts),):
        raise ValueError(f"domains has shape {domains.shape}; expected ({len(texts)},)")
    if context < 1:
        raise ValueError(f"context must be >= 1; got {context}")
    n = len(texts)
    eos = CompactVocab.EOS if vocab is not None else tokenizer.eos_id
    inputs = np.full((n, context), eos, dtype=np.int64)
    labels = np.full((n, context), IGNORE_INDEX, dtype=np.int64)
    for i, ids in enumerate(tokenizer.encode_batch(list(texts))):
        seq = np.asarray(ids[:context], dtype=np.int64)
        if vocab is not None:
            seq = vocab(seq)
        # EOS first as a BOS so the first real token is predicted too, and last to learn to stop.
        seq = np.concatenate([[eos], seq, [eos]])[: context + 1]
        L = seq.shape[0] - 1
        inputs[i, :L] = seq[:-1]
        labels[i, :L] = seq[1:]
    return EncodedData(torch.from_numpy(inputs), torch.from_numpy(labels), domains)


def load_corpus(cfg: CorpusConfig, seed: int):
    """The corpus ``cfg`` names, capped at ``cfg.max_examples``, with no empty domain.

    Returns:
        a :class:`~rnb_kernels.datasets.Corpus` whose labels are ``[0, m)``.
    """
    from ..datasets import load_fortunes, load_natural_instructions

    if cfg.name == "ni":
        c = load_natural_instructions(max_per_task=cfg.max_per_task, seed=seed)
    else:
        c = load_fortunes()
    if len(c) > cfg.max_examples:
        c = c.sample(cfg.max_examples, seed=seed)
    # Domains the subsample left empty would only be dead rows in every mixer.
    used = np.unique(c.labels)
    remap = np.full(c.num_domains, -1, dtype=np.int64)
    remap[used] = np.arange(used.size)
    c.labels = remap[c.labels]
    c.label_names = [c.label_names[i] for i in used]
    return c


def _regroup(texts: list[str], cfg: CorpusConfig, seed: int):
    from ..regroup import regroup

    try:
        return regroup(texts, k="auto", k_range=cfg.k_range, embedder=cfg.embedder, seed=seed)
    except ImportError as exc:
        if cfg.embedder == "tfidf":
            raise
        logger.warning("embedder %r unavailable (%s); regrouping with tfidf", cfg.embedder, exc)
        return regroup(texts, k="auto", k_range=cfg.k_range, embedder="tfidf", seed=seed)


@dataclass
class PreparedData:
    """Everything the runs of one seed share.

    Attributes:
        corpus: the loaded :class:`~rnb_kernels.datasets.Corpus` (original domains ``[0, m)``).
        partition: the regrouping of the training texts (:class:`~rnb_kernels.regroup.Partition`).
        train, eval: encoded splits labelled with the original domains.
        train_clusters, eval_clusters: ``int64[n_train]`` / ``int64[n_eval]`` regrouped labels.
        vocab: the compact vocabulary; ``vocab.size`` is the model's ``vocab_size``.
        tokenizer: name of the tokenizer used.
        timings: seconds spent loading, regrouping and tokenizing.
    """

    corpus: Any
    partition: Any
    train: EncodedData
    eval: EncodedData
    train_clusters: np.ndarray
    eval_clusters: np.ndarray
    vocab: CompactVocab
    tokenizer: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_original(self) -> int:
        """Original domains ``m``."""
        return int(self.corpus.num_domains)

    def splits(self, domains: str) -> tuple[EncodedData, EncodedData, int]:
        """``(train, eval, num_domains)`` labelled in the ``"original"`` or ``"regrouped"``
        domain space."""
        if domains == "regrouped":
            return (
                self.train.with_domains(self.train_clusters),
                self.eval.with_domains(self.eval_clusters),
                int(self.partition.k),
            )
        if domains == "original":
            return self.train, self.eval, self.num_original
        raise ValueError(f"domains must be 'original' or 'regrouped'; got {domains!r}")

    def domain_names(self, domains: str) -> list[str]:
        """Names of the domains of a domain space (cluster ids for the regrouped one)."""
        if domains == "regrouped":
            return [f"c{i}" for i in range(int(self.partition.k))]
        return list(self.corpus.label_names)


def prepare(
    cfg: CorpusConfig, *, vocab_cap: int, context: int, seed: int, out: str | Path
) -> PreparedData:
    """Load, split, regroup and tokenize.

    Args:
        cfg: which corpus and how to regroup it.
        vocab_cap: largest compact vocabulary (the model's ``vocab_size`` setting).
        context: tokens per row ``T``.
        seed: subsample, split and regrouping seed.
        out: the partition is saved to ``out/partition``.
    """
    from ..datasets import train_eval_split
    from .tokenizer import load_tokenizer

    out = Path(out)
    t0 = time.perf_counter()
    corpus = load_corpus(cfg, seed)
    tr_idx, ev_idx = train_eval_split(corpus.labels, cfg.eval_fraction, seed=seed)
    if ev_idx.size > cfg.eval_cap:
        ev_idx = np.sort(np.random.default_rng(seed).choice(ev_idx, cfg.eval_cap, False))
    tr_texts = [corpus.texts[i] for i in tr_idx]
    ev_texts = [corpus.texts[i] for i in ev_idx]
    t_load = time.perf_counter() - t0
    logger.info("%s: %d train / %d eval texts, %d domains", corpus.name, len(tr_texts),
                len(ev_texts), corpus.num_domains)  # fmt: skip

    t0 = time.perf_counter()
    part = _regroup(tr_texts, cfg, seed)
    ev_clusters = part.assign(ev_texts)
    t_regroup = time.perf_counter() - t0
    part.save(out / "partition")
    logger.info("regrouped into k=%d clusters in %.1fs", part.k, t_regroup)

    t0 = time.perf_counter()
    tok = load_tokenizer()
    vocab = CompactVocab(tok.encode_batch(tr_texts), tok.vocab_size, vocab_cap)
    train_data = encode_texts(tr_texts, tok, context, corpus.labels[tr_idx], vocab)
    eval_data = encode_texts(ev_texts, tok, context, corpus.labels[ev_idx], vocab)
    t_tok = time.perf_counter() - t0
    logger.info("tokenizer %s, compact vocab %d (%.1f%% of train tokens)", tok.name,
                vocab.size, 100 * vocab.coverage)  # fmt: skip
    return PreparedData(
        corpus=corpus,
        partition=part,
        train=train_data,
        eval=eval_data,
        train_clusters=np.asarray(part.labels, dtype=np.int64),
        eval_clusters=np.asarray(ev_clusters, dtype=np.int64),
        vocab=vocab,
        tokenizer=tok.name,
        timings={"load_s": t_load, "regroup_s": t_regroup, "tokenize_s": t_tok},
    )
