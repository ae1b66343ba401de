"""MixtureSampler: a resumable, DDP-aware ``torch.utils.data.Sampler`` that follows live
mixture weights."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from . import distributed as rdist
from ._warnings import warn_at_caller

logger = logging.getLogger(__name__)

__all__ = ["MixtureSampler"]

_MODES = ("categorical", "proportional")
_PARTITION_TAG = 0x6D1C5  # seeds the rank partition, shared by all ranks


def _largest_remainder(target: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to the non-negative ``target``.

    Floors first, then hands the remaining units to the largest fractional parts (ties go to
    the lower index), so the result is deterministic.
    """
    t = np.clip(target, 0.0, None)
    s = t.sum()
    t = t * (total / s)
    base = np.floor(t).astype(np.int64)
    rest = total - int(base.sum())
    if rest > 0:
        frac = t - base
        order = np.argsort(-frac, kind="stable")
        base[order[:rest]] += 1
    return base


class MixtureSampler(Sampler[int]):
    """Yields dataset indices whose domains follow the current mixture weights.

    Every ``batch_size`` indices the sampler re-reads the weights (``mixer.sampling_weights``,
    else ``mixer.weights``, else the array or callable given), so a mixer updated during
    training steers the next batch. Pair it with ``DataLoader(..., batch_size=batch_size,
    sampler=sampler)``. With ``num_workers > 0`` the loader prefetches a few batches, which then
    follow the weights of the moment they were drawn.

    * ``mode="categorical"``: each index draws a domain from the weights, then the next example
      of that domain's shuffled pool (without replacement; the pool is reshuffled when
      exhausted). ``replacement=True`` draws uniformly from the domain instead.
    * ``mode="proportional"``: each batch holds ``round(B · p)`` examples per domain by the
      largest-remainder rule, carrying the rounding error to the next batch so that even a
      domain with ``B · p < 0.5`` gets its share over time. Batches are grouped by domain.

    Under ``torch.distributed`` (or with ``num_replicas``/``rank`` given) every rank owns a
    disjoint slice of each domain (a seed-shared shuffle, dealt round-robin) and draws domains
    with its own generator; all ranks read the same weights. A domain smaller than the number
    of ranks is shared in full by the ranks whose slice would be empty.

    Domains with zero weight or no examples are never drawn; if no domain with examples has
    positive weight, drawing raises ``ValueError``.

    Args:
        domain_labels: int ``[n]`` domain of every example in ``[0, m)``; ``-1`` excludes it.
        weights: a mixer (anything with ``sampling_weights``/``weights``), a callable returning
            ``[m]`` weights, or a fixed ``[m]`` array.
        batch_size: ``B``, the per-rank batch size the weights are re-read at.
        seed: seed of the whole stream.
        replacement: draw with replacement within a domain.
        mode: ``"categorical"`` or ``"proportional"``.
        num_replicas, rank: DDP world size and rank (default: from ``torch.distributed``).
        num_samples: ``len(sampler)``, indices per epoch (default ``n // num_replicas``);
            epochs continue one stream.
        num_domains: ``m`` (default: from the weights, else ``max(label) + 1``).

    Example:
        >>> labels = [0, 0, 0, 1, 1, 2]
        >>> s = MixtureSampler(labels, weights=[0.5, 0.5, 0.0], batch_size=2, seed=0)
        >>> idx = list(s)
        >>> len(idx), all(labels[i] != 2 for i in idx)
        (6, True)
    """

    def __init__(
        self,
        domain_labels: Any,
        weights: Any,
        batch_size: int,
        seed: int = 0,
        replacement: bool = False,
        mode: str = "categorical",
        num_replicas: int | None = None,
        rank: int | None = None,
        num_samples: int | None = None,
        num_domains: int | None = None,
    ) -> None:
        labels = np.asarray(
            domain_labels.detach().cpu()
            if isinstance(domain_labels, torch.Tensor)
            else domain_labels
        )
        if labels.dtype.kind not in "iu":
            raise TypeError(f"domain_labels must hold integers, got dtype {labels.dtype}")
        if labels.ndim != 1:
            raise ValueError(f"domain_labels must be 1-D, got shape {labels.shape}")
        if labels.size == 0:
            raise ValueError("domain_labels is empty")
        if int(labels.min()) < -1:
            raise ValueError(f"domain_labels must be >= -1, found {int(labels.min())}")
        for name, v in (("batch_size", batch_size), ("seed", seed)):
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if num_replicas is None:
            num_replicas = rdist.world_size()
        if rank is None:
            rank = rdist.rank()
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be an int >= 1, got {num_replicas!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an int in [0, {num_replicas}), got {rank!r}")
        self._source = weights
        self._fixed: np.ndarray | None = None
        if not (
            hasattr(weights, "sampling_weights") or hasattr(weights, "weights") or callable(weights)
        ):
            self._fixed = self._check_weights(weights, None)
        if num_domains is None:
            probe = self._fixed if self._fixed is not None else self._read_raw()
            num_domains = int(np.asarray(probe).shape[0])
        if isinstance(num_domains, bool) or not isinstance(num_domains, int) or num_domains < 1:
            raise ValueError(f"num_domains must be an int >= 1, got {num_domains!r}")
        if int(labels.max()) >= num_domains:
            raise ValueError(
                f"domain_labels must be < num_domains={num_domains}, found {int(labels.max())}"
            )
        self.num_domains = num_domains
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.replacement = bool(replacement)
        self.mode = mode
        self.num_replicas = num_replicas
        self.rank = rank
        if num_samples is None:
            num_samples = labels.size // num_replicas
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        self.num_samples = num_samples

        part_rng = np.random.default_rng([self.seed, _PARTITION_TAG])
        self._pools: list[np.ndarray] = []
        for d in range(num_domains):
            members = np.flatnonzero(labels == d)
            mine = part_rng.permutation(members)[rank::num_replicas]
            self._pools.append(np.sort(mine) if mine.size else members)
        self._sizes = np.array([p.size for p in self._pools], dtype=np.int64)
        self._rng = np.random.default_rng([self.seed, self.rank])
        self._orders: list[np.ndarray | None] = [None] * num_domains
        self._cursors = np.zeros(num_domains, dtype=np.int64)
        self._carry = np.zeros(num_domains, dtype=np.float64)
        self._buffer: list[int] = []
        self._pos = 0
        self._yielded = 0
        self._batches = 0
        self._warned_empty = False

    # ------------------------------------------------------------------ weights
    def _read_raw(self) -> Any:
        src = self._source
        if hasattr(src, "sampling_weights"):
            return src.sampling_weights
        if hasattr(src, "weights"):
            return src.weights
        return src()

    def _check_weights(self, w: Any, m: int | None) -> np.ndarray:
        if isinstance(w, torch.Tensor):
            w = w.detach().cpu().to(torch.float64).numpy()
        try:
            arr = np.asarray(w, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"weights must be a real vector, got {type(w).__name__}") from e
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"weights must be a non-empty 1-D vector, got shape {arr.shape}")
        if m is not None and arr.size != m:
            raise ValueError(f"weights must have {m} entries (num_domains), got {arr.size}")
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError(f"weights must be finite and non-negative, got {arr.tolist()}")
        return arr

    def current_weights(self) -> np.ndarray:
        """float64 ``[m]`` probabilities the next batch is drawn with (empty domains zeroed)."""
        w = (
            self._fixed
            if self._fixed is not None
            else self._check_weights(self._read_raw(), self.num_domains)
        )
        if w.size != self.num_domains:
            raise ValueError(f"weights must have {self.num_domains} entries, got {w.size}")
        p = np.where(self._sizes > 0, w, 0.0)
        if not self._warned_empty and np.any((w > 0) & (self._sizes == 0)):
            self._warned_empty = True
            empty = np.flatnonzero((w > 0) & (self._sizes == 0)).tolist()
            msg = f"domains {empty} have positive weight but no examples; they are never drawn"
            warn_at_caller(msg)
            logger.warning(msg)
        total = p.sum()
        if not total > 0:
            raise ValueError("weights: every domain with examples has zero weight")
        return p / total

    # ------------------------------------------------------------------ drawing
    def _take(self, d: int) -> int:
        pool = self._pools[d]
        if self.replacement:
            return int(pool[self._rng.integers(pool.size)])
        order = self._orders[d]
        if order is None or self._cursors[d] >= order.size:
            order = self._rng.permutation(pool)
            self._orders[d] = order
            self._cursors[d] = 0
        i = int(order[self._cursors[d]])
        self._cursors[d] += 1
        return i

    def _next_batch(self) -> list[int]:
        p = self.current_weights()
        b = self.batch_size
        if self.mode == "categorical":
            doms = self._rng.choice(self.num_domains, size=b, p=p)
        else:
            target = b * p + self._carry
            counts = _largest_remainder(target, b)
            self._carry = np.where(p > 0, target - counts, 0.0)
            doms = np.repeat(np.arange(self.num_domains), counts)
        self._batches += 1
        return [self._take(int(d)) for d in doms]

    def __iter__(self) -> Iterator[int]:
        while self._yielded < self.num_samples:
            if self._pos >= len(self._buffer):
                self._buffer = self._next_batch()
                self._pos = 0
            i = self._buffer[self._pos]
            self._pos += 1
            self._yielded += 1
            yield i
        self._yielded = 0

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Accepted for ``DistributedSampler`` compatibility; the stream simply continues."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Generator state, pool orders and cursors, rounding carry and position in the batch:
        a fresh sampler loading it yields the identical next indices."""
        return {
            "version": 1,
            "config": self._config(),
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "orders": [None if o is None else o.copy() for o in self._orders],
            "cursors": self._cursors.copy(),
            "carry": self._carry.copy(),
            "buffer": list(self._buffer),
            "pos": self._pos,
            "yielded": self._yielded,
            "batches": self._batches,
        }

    def _config(self) -> dict[str, Any]:
        return {
            "num_domains": self.num_domains,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "replacement": self.replacement,
            "mode": self.mode,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "sizes": self._sizes.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (validated before anything changes)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if state.get("config") != self._config():
            raise ValueError(
                f"state was saved by a sampler configured as {state.get('config')}, "
                f"not {self._config()}"
            )
        orders = state["orders"]
        if len(orders) != self.num_domains:
            raise ValueError(f"state has {len(orders)} domain orders, expected {self.num_domains}")
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])
        self._orders = [None if o is None else np.asarray(o).copy() for o in orders]
        self._cursors = np.asarray(state["cursors"], dtype=np.int64).copy()
        self._carry = np.asarray(state["carry"], dtype=np.float64).copy()
        self._buffer = [int(i) for i in state["buffer"]]
        self._pos = int(state["pos"])
        self._yielded = int(state["yielded"])
        self._batches = int(state["batches"])
