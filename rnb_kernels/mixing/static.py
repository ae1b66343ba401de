"""Static baselines: fixed weights, natural (size-proportional) and importance sampling."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import Mixer, as_float64, as_simplex, check_int

__all__ = ["Static"]


class Static(Mixer):
    """Fixed mixture weights (normalised); ``update`` accepts and ignores any statistics.

    Args:
        weights: float ``[m]``, non-negative with a positive sum.

    Example:
        >>> Static([1, 3]).weights.tolist()
        [0.25, 0.75]
        >>> Static.natural([100, 300, 600]).weights.tolist()
        [0.1, 0.3, 0.6]
    """

    def __init__(self, weights: Any, update_every: int = 1) -> None:
        w = as_simplex(weights, "weights")
        super().__init__(w.numel(), update_every, init_weights=w)

    @classmethod
    def natural(cls, sizes: Any) -> Static:
        """Size-proportional weights (the natural distribution of the corpus).

        Args:
            sizes: ``[m]`` examples (or tokens) per domain.
        """
        return cls(as_simplex(sizes, "sizes"))

    @classmethod
    def importance(cls, target_labels: Any, num_domains: int) -> Static:
        """Importance sampling: the target (specific/eval) set's histogram over domains.

        Args:
            target_labels: int ``[n]`` domain label of every target example, in ``[0, m)``.
            num_domains: ``m``.
        """
        m = check_int(num_domains, "num_domains", 1)
        lab = np.asarray(
            target_labels.detach().cpu()
            if isinstance(target_labels, torch.Tensor)
            else target_labels
        )
        if lab.dtype.kind not in "iu":
            raise TypeError(f"target_labels must be integers, got dtype {lab.dtype}")
        if lab.ndim != 1 or lab.size == 0:
            raise ValueError(f"target_labels must be a non-empty 1-D array, got {lab.shape}")
        if lab.min() < 0 or lab.max() >= m:
            raise ValueError(
                f"target_labels must lie in [0, {m}), found [{lab.min()}, {lab.max()}]"
            )
        return cls(np.bincount(lab, minlength=m).astype(np.float64))

    def update(self, **stats: Any) -> torch.Tensor:
        """Return the (unchanged) static weights."""
        return self.weights

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        as_float64(state["weights"], "state['weights']", (self.num_domains,))
