"""Mixer base class and the input checks shared by every mixer.

A mixer holds mixture weights over ``m`` domains (float64, on the simplex) and turns
per-round statistics into new weights with :meth:`Mixer.update`. ``update`` is a pure function of
its inputs and the mixer's state: bad inputs raise ``ValueError`` / ``TypeError`` naming the
argument *before* any state changes; numerical faults (a non-finite Gram or gradient) skip the
update with a ``RuntimeWarning`` and count it in ``skipped_updates``.
"""

from __future__ import annotations

import abc
import logging
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["Mixer", "MixingContext", "as_float64", "as_simplex"]


def as_float64(value: Any, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Convert a tensor / numpy array / sequence to a float64 CPU tensor and check its shape.

    Non-finite values pass through (callers decide whether that is an input error or a
    numerical fault to skip).
    """
    if isinstance(value, torch.Tensor):
        t = value.detach()
    elif isinstance(value, np.ndarray | list | tuple):
        try:
            arr = np.asarray(value)
            if arr.dtype.kind == "c":  # casting to float64 would drop the imaginary part
                raise TypeError(f"complex values ({arr.dtype})")
            t = torch.as_tensor(np.asarray(arr, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must hold real numbers: {e}") from e
    else:
        raise TypeError(
            f"{name} must be a tensor, numpy array or sequence, got {type(value).__name__}"
        )
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got {t.dtype}")
    t = t.to(device="cpu", dtype=torch.float64)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def as_simplex(value: Any, name: str, m: int | None = None) -> torch.Tensor:
    """Validate non-negative finite weights with a positive sum; return them normalised."""
    t = as_float64(value, name, None if m is None else (m,))
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    if bool((t < 0).any()):
        raise ValueError(f"{name} must be non-negative, got {t.tolist()}")
    total = float(t.sum())
    if not total > 0:
        raise ValueError(f"{name} must sum to a positive number, got sum {total}")
    return t / total


def check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_float(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")
    return v


def check_counts(value: Any, name: str, m: int) -> torch.Tensor:
    """Per-domain sample counts: float64 ``[m]``, finite, non-negative (input errors raise)."""
    n = as_float64(value, name, (m,))
    if not bool(torch.isfinite(n).all()) or bool((n < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative, got {n.tolist()}")
    return n


@dataclass
class MixingContext:
    """What a run's data tells a mixer at construction (see :meth:`Mixer.from_context`).

    Attributes:
        num_domains: ``m``, the training domains the sampler draws from.
        eval_proportions: float ``[m]`` share of the evaluation (or target) set in each domain.
        domain_sizes: float ``[m]`` training examples per domain.
        target_labels: int ``[n]`` domain of every target/eval example.
        update_every: optimizer steps per round.
    """

    num_domains: int
    eval_proportions: Any = None
    domain_sizes: Any = None
    target_labels: Any = None
    update_every: int = 1

    def require(self, field: str, mixer: str) -> Any:
        value = getattr(self, field)
        if value is None:
            raise ValueError(f"mixer {mixer!r} needs MixingContext.{field}")
        return value


class Mixer(abc.ABC):
    """Base class: mixture weights over ``num_domains`` domains, updated every ``update_every``
    optimizer steps.

    Attributes:
        requires: names of the statistics :meth:`update` takes (the :class:`~rnb_kernels.Balancer`
            gathers exactly these).
        num_updates: accepted updates so far. skipped_updates: updates skipped (numerical fault
            or a degenerate input), ``last_skip_reason`` says why.

    Subclasses implement :meth:`update` and may extend :meth:`_extra_state`; registered ones
    (:func:`~rnb_kernels.mixing.register_mixer`) also set :attr:`name` and, when they need
    more than ``num_domains`` from the data, override :meth:`from_context`.
    """

    #: registry name (``"rnb"``, ``"dga"``, ...); set by :func:`register_mixer`.
    name: ClassVar[str] = ""
    #: statistics :meth:`update` takes, by the names of the Balancer's statistics registry.
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, num_domains: int, update_every: int = 1, init_weights: Any = None) -> None:
        self.num_domains = check_int(num_domains, "num_domains", 1)
        self.update_every = check_int(update_every, "update_every", 1)
        m = self.num_domains
        w = torch.full((m,), 1.0 / m, dtype=torch.float64)
        if init_weights is not None:
            w = as_simplex(init_weights, "init_weights", m)
        self._weights = w
        self.num_updates = 0
        self.skipped_updates = 0
        self.last_skip_reason: str | None = None

    @classmethod
    def from_context(cls, context: MixingContext, **hparams: Any) -> Mixer:
        """Build from a run's :class:`MixingContext` (default: ``num_domains`` and
        ``update_every`` only)."""
        hparams.setdefault("update_every", context.update_every)
        return cls(num_domains=context.num_domains, **hparams)

    @property
    def stat_domains(self) -> int:
        """Rows of the per-domain statistics :meth:`update` expects (``num_domains`` unless a
        mixer keeps statistics at another granularity, e.g. fine clusters)."""
        return self.num_domains

    @property
    def weights(self) -> torch.Tensor:
        """float64 ``[m]`` on the simplex (a copy)."""
        return self._weights.clone()

    @property
    def sampling_weights(self) -> torch.Tensor:
        """Weights a sampler should draw domains with (``weights`` unless overridden)."""
        return self.weights

    def should_update(self, step: int) -> bool:
        """True when optimizer step ``step`` (1-based count of steps done) closes a round."""
        return step > 0 and step % self.update_every == 0

    @abc.abstractmethod
    def update(self, **stats: Any) -> torch.Tensor:
        """Return the new weights computed from this round's statistics."""

    # ----------------------------------------------------------------- helpers for subclasses
    def _commit(self, w: torch.Tensor) -> torch.Tensor:
        self._weights = w.to(torch.float64).clone()
        self.num_updates += 1
        return self.weights

    def _skip(self, reason: str, *, warn: bool = True) -> torch.Tensor:
        self.skipped_updates += 1
        self.last_skip_reason = reason
        msg = f"{type(self).__name__}: update skipped ({reason}); weights unchanged"
        if warn:
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            logger.warning(msg)
        else:
            logger.info(msg)
        return self.weights

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Validate subclass state; must raise before anything is mutated (default: none)."""
        return None

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (tensors cloned); restores the mixer bit-exactly."""
        return {
            "type": type(self).__name__,
            "num_domains": self.num_domains,
            "weights": self._weights.clone(),
            "num_updates": self.num_updates,
            "skipped_updates": self.skipped_updates,
            "last_skip_reason": self.last_skip_reason,
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; validates before changing anything."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if state.get("type") != type(self).__name__:
            raise ValueError(f"state is for {state.get('type')!r}, not {type(self).__name__!r}")
        if state.get("num_domains") != self.num_domains:
            raise ValueError(
                f"state has num_domains={state.get('num_domains')}, this mixer {self.num_domains}"
            )
        w = as_float64(state["weights"], "state['weights']", (self.num_domains,))
        as_simplex(w, "state['weights']", self.num_domains)
        self._load_extra_state(state)
        self._weights = w.clone()
        self.num_updates = int(state["num_updates"])
        self.skipped_updates = int(state["skipped_updates"])
        self.last_skip_reason = state.get("last_skip_reason")

    def __repr__(self) -> str:
        w = ", ".join(f"{v:.3f}" for v in self._weights.tolist()[:8])
        more = ", ..." if self.num_domains > 8 else ""
        return f"{type(self).__name__}(num_domains={self.num_domains}, weights=[{w}{more}])"
