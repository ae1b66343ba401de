"""Static baselines: fixed weights, natural (size-proportional) and importance sampling."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import Mixer, MixingContext, as_simplex, check_int
from .registry import register_mixer

__all__ = ["Static"]


@register_mixer
class Static(Mixer):
    """Fixed mixture weights (normalised); ``update`` accepts and ignores any statistics.

    Built as ``Static(num_domains=m, weights=w)`` like every mixer, or ``Static(w)``
    (``num_domains`` is then ``len(w)``); ``Static(num_domains=m)`` alone is uniform.

    Args:
        weights: float ``[m]``, non-negative with a positive sum.
        num_domains: ``m``; must equal ``len(weights)`` when both are given.

    Example:
        >>> Static([1, 3]).weights.tolist()
        [0.25, 0.75]
        >>> Static.natural([100, 300, 600]).weights.tolist()
        [0.1, 0.3, 0.6]
    """

    name = "static"

    def __init__(
        self, weights: Any = None, update_every: int = 1, *, num_domains: int | None = None
    ) -> None:
        if weights is None:
            if num_domains is None:
                raise ValueError("Static needs weights or num_domains")
            # Uniform exactly as Stratified's (1/m, not renormalised).
            super().__init__(num_domains, update_every)
            return
        w = as_simplex(weights, "weights")
        if num_domains is not None and check_int(num_domains, "num_domains", 1) != w.numel():
            raise ValueError(f"weights has {w.numel()} entries but num_domains={num_domains}")
        super().__init__(w.numel(), update_every, init_weights=w)

    @classmethod
    def from_context(cls, context: MixingContext, **hparams: Any) -> Static:
        """Natural (size-proportional) weights from ``context.domain_sizes`` unless ``weights``
        is given."""
        if "weights" not in hparams:
            hparams["weights"] = context.require("domain_sizes", cls.name)
        return super().from_context(context, **hparams)

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
