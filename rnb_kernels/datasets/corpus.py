"""The :class:`Corpus` container every loader returns, and the error for missing corpora."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Corpus", "CorpusNotFoundError"]


class CorpusNotFoundError(FileNotFoundError):
    """A named corpus is not installed / downloadable here; the message says how to get it."""


@dataclass
class Corpus:
    """Texts with their original domain labels.

    Attributes:
        texts: ``n`` strings.
        labels: ``int64[n]`` original domain index of each text, or ``None`` when the
            source has no domain field.
        label_names: domain name of each label index (``label_names[labels[i]]``).
        name: where the corpus came from (e.g. ``"fortunes"``).
        meta: loader-specific details (paths, counts).

    Example:
        >>> c = Corpus(["a", "b"], np.array([0, 1]), ["x", "y"], "toy")
        >>> c.domains
        ['x', 'y']
    """

    texts: list[str]
    labels: np.ndarray | None = None
    label_names: list[str] | None = None
    name: str = "corpus"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (len(self.texts),):
                raise ValueError(
                    f"labels has shape {self.labels.shape}; expected ({len(self.texts)},)"
                )
            if self.label_names is None:
                raise ValueError("label_names is required when labels are given")
            if self.labels.size and not 0 <= self.labels.min() <= self.labels.max() < len(
                self.label_names
            ):
                raise ValueError("labels must index into label_names")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_domains(self) -> int:
        """Number of original domains (0 when unlabelled)."""
        return 0 if self.label_names is None else len(self.label_names)

    @property
    def domains(self) -> list[str] | None:
        """Original domain *name* of every text, or ``None`` when unlabelled."""
        if self.labels is None or self.label_names is None:
            return None
        names = self.label_names
        return [names[i] for i in self.labels.tolist()]

    def subset(self, indices: Sequence[int] | np.ndarray) -> Corpus:
        """The texts at ``indices`` (in that order), keeping the full label-name table."""
        idx = np.asarray(indices, dtype=np.int64)
        return Corpus(
            texts=[self.texts[i] for i in idx.tolist()],
            labels=None if self.labels is None else self.labels[idx],
            label_names=self.label_names,
            name=self.name,
            meta=dict(self.meta),
        )

    def sample(self, n: int, seed: int = 0) -> Corpus:
        """A uniform random subset of ``min(n, len(self))`` texts, in corpus order."""
        if n < 1:
            raise ValueError(f"n must be >= 1; got {n}")
        if n >= len(self):
            return self.subset(np.arange(len(self)))
        rng = np.random.default_rng(seed)
        return self.subset(np.sort(rng.choice(len(self), size=n, replace=False)))
