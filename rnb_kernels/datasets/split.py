"""Deterministic train/eval splits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["train_eval_split", "train_val_test_split"]


def train_eval_split(
    n_or_labels: int | Sequence[Any] | np.ndarray,
    eval_fraction: float = 0.1,
    *,
    seed: int = 0,
    stratify: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into train and eval, deterministically for a seed.

    Args:
        n_or_labels: the number of examples, or one label per example (e.g. the original
            domains, or a Partition's labels). With labels and ``stratify=True`` each label
            is split separately, so every label with at least 2 examples appears on both
            sides and the eval set has (up to rounding) the corpus' label proportions.
        eval_fraction: share of examples for eval, in (0, 1).
        seed: same inputs + seed -> same split.

    Returns:
        ``(train_idx, eval_idx)``: disjoint sorted ``int64`` arrays covering ``range(n)``.

    Example:
        >>> tr, ev = train_eval_split(10, 0.2, seed=0)
        >>> len(tr), len(ev)
        (8, 2)
    """
    if not 0.0 < float(eval_fraction) < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1); got {eval_fraction}")
    rng = np.random.default_rng(seed)
    if isinstance(n_or_labels, (int, np.integer)) and not isinstance(n_or_labels, bool):
        n = int(n_or_labels)
        if n < 2:
            raise ValueError(f"need at least 2 examples to split; got {n}")
        n_eval = min(max(1, round(n * eval_fraction)), n - 1)
        perm = rng.permutation(n)
        return np.sort(perm[n_eval:]).astype(np.int64), np.sort(perm[:n_eval]).astype(np.int64)
    labels = np.asarray(n_or_labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D; got shape {labels.shape}")
    n = labels.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 examples to split; got {n}")
    if not stratify:
        return train_eval_split(n, eval_fraction, seed=seed)
    _, inverse = np.unique(labels, return_inverse=True)
    eval_parts = []
    for g in range(int(inverse.max()) + 1):
        idx = np.flatnonzero(inverse == g)
        if idx.size < 2:
            continue  # a singleton stays in train: eval clusters must have training data
        n_eval = min(max(1, round(idx.size * eval_fraction)), idx.size - 1)
        eval_parts.append(rng.permutation(idx)[:n_eval])
    eval_idx = np.sort(np.concatenate(eval_parts)) if eval_parts else np.zeros(0, np.int64)
    mask = np.ones(n, dtype=bool)
    mask[eval_idx] = False
    return np.flatnonzero(mask).astype(np.int64), eval_idx.astype(np.int64)


def train_val_test_split(
    labels: Sequence[Any] | np.ndarray,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    *,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three disjoint splits, stratified by label: train, validation (for choosing
    hyper-parameters) and test (for reporting only).

    The test split is cut first, then the validation split from the rest, each with
    :func:`train_eval_split` (so a label with few examples keeps at least one in train).

    Returns:
        ``(train_idx, val_idx, test_idx)``: disjoint sorted ``int64`` arrays covering
        ``range(len(labels))``.

    Example:
        >>> tr, va, te = train_val_test_split([0] * 10 + [1] * 10, 0.2, 0.2, seed=0)
        >>> len(tr), len(va), len(te)
        (12, 4, 4)
    """
    if not (val_fraction > 0.0 and test_fraction > 0.0):
        raise ValueError(
            f"val_fraction and test_fraction must be > 0; got {val_fraction}, {test_fraction}"
        )
    if not val_fraction + test_fraction < 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1; got {val_fraction} + {test_fraction}"
        )
    labels = np.asarray(labels)
    rest, test_idx = train_eval_split(labels, test_fraction, seed=seed)
    tr, va = train_eval_split(labels[rest], val_fraction / (1.0 - test_fraction), seed=seed + 1)
    return rest[tr], rest[va], test_idx
