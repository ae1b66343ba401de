"""Stratified baseline: uniform over domains, forever."""

from __future__ import annotations

from typing import Any

import torch

from .base import Mixer
from .registry import register_mixer

__all__ = ["Stratified"]


@register_mixer
class Stratified(Mixer):
    """Uniform weights ``1/m`` over domains; ``update`` accepts and ignores any statistics.

    Example:
        >>> Stratified(4).weights.tolist()
        [0.25, 0.25, 0.25, 0.25]
    """

    name = "stratified"

    def __init__(self, num_domains: int, update_every: int = 1) -> None:
        super().__init__(num_domains, update_every)

    def update(self, **stats: Any) -> torch.Tensor:
        """Return the (unchanged) uniform weights."""
        return self.weights
