"""ODM: Online Data Mixing as a multi-armed bandit (Albalak et al., 2023), EXP3 on domain loss."""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import Mixer, as_float64, check_counts, check_float
from .registry import register_mixer

__all__ = ["ODM"]


@register_mixer
class ODM(Mixer):
    """EXP3 bandit over domains with the training loss as reward (no gradients needed).

    Following Algorithm 1 of Albalak et al. (2023), with ``K = m`` arms, after ``t`` updates:

    * ``ε_t = min(1/K, c · sqrt(ln K / (K t)))`` (``ε_0 = 1/K``; ``c = exploration``, 1 in the
      paper),
    * ``π = (1 − K ε_{t+1}) · softmax(ε_t R̂) + ε_{t+1}`` (the policy of the next round),
    * reward of every domain observed in the round:
      ``R̂_i ← α R̂_i + (1 − α) L_i / π_i`` (importance-weighted, smoothed); unobserved domains
      keep their estimate.

    The paper draws one domain per batch; here a round may observe several domains (mixed
    batches), each updated with its mean loss.

    With ``c = 1`` the policy is exactly uniform (``K ε = 1``) for the first ``K ln K`` updates
    (165 at 43 domains, 250 at 61): a short run never leaves uniform. ``exploration < 1``
    shortens that phase to ``c² K ln K`` updates and keeps a floor of ``ε_t`` per domain after.

    Args:
        num_domains: ``m``.
        smoothing: ``α`` in ``[0, 1)``.
        update_every: ``K`` optimizer steps per round (the paper updates every step).
        exploration: ``c > 0``, the scale of the exploration rate.

    Example:
        >>> mixer = ODM(3)
        >>> for _ in range(10):
        ...     w = mixer.update(losses=[3.0, 1.0, 1.0], counts=[4, 4, 4])
        >>> bool(w[0] > w[1])
        True
    """

    name = "odm"
    requires = ("losses", "counts")

    def __init__(
        self,
        num_domains: int,
        smoothing: float = 0.9,
        update_every: int = 1,
        exploration: float = 1.0,
    ) -> None:
        super().__init__(num_domains, update_every)
        self.smoothing = check_float(smoothing, "smoothing", low=0.0, high=1.0)
        self.exploration = check_float(exploration, "exploration", low=0.0, low_open=True)
        if self.smoothing == 1.0:
            raise ValueError("smoothing must be < 1 (1 would ignore every reward)")
        self.rewards = torch.zeros(self.num_domains, dtype=torch.float64)
        self.t = 0

    def _eps(self, t: int) -> float:
        """``ε_t`` of round ``t >= 1`` (0 for one domain: ``ln 1 = 0``); the initial policy is
        the uniform one, ``ε_0 = 1/K``, so no update asks for ``t = 0``."""
        k = self.num_domains
        return min(1.0 / k, self.exploration * math.sqrt(math.log(k) / (k * t)))

    def update(self, losses: Any, counts: Any) -> torch.Tensor:
        """One bandit step from this round's per-domain mean losses.

        Args:
            losses: float ``[m]`` mean training loss per domain (entries of domains with
                ``counts == 0`` are ignored and may be NaN).
            counts: float ``[m]`` samples (or tokens) behind each mean.
        """
        m = self.num_domains
        loss = as_float64(losses, "losses", (m,))
        n = check_counts(counts, "counts", m)
        seen = n > 0
        if not bool(seen.any()):
            return self._skip("no domain observed in the round", warn=False)
        if not bool(torch.isfinite(loss[seen]).all()):
            return self._skip("non-finite loss")
        pi = self._weights
        r = self.rewards.clone()
        a = self.smoothing
        r[seen] = a * r[seen] + (1.0 - a) * loss[seen] / pi[seen].clamp(min=1e-300)
        if not bool(torch.isfinite(r).all()):
            return self._skip("non-finite reward estimate")
        t = self.t + 1
        eps_t, eps_next = self._eps(t), self._eps(t + 1)
        new = (1.0 - m * eps_next) * torch.softmax(eps_t * r, 0) + eps_next
        self.rewards, self.t = r, t
        return self._commit(new / new.sum())

    def _extra_state(self) -> dict[str, Any]:
        return {
            "rewards": self.rewards.clone(),
            "t": self.t,
            "smoothing": self.smoothing,
            "exploration": self.exploration,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        as_float64(state["rewards"], "state['rewards']", (self.num_domains,))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rewards = as_float64(state["rewards"], "rewards").clone()
        self.t = int(state["t"])
        self.smoothing = float(state["smoothing"])
        self.exploration = float(state.get("exploration", 1.0))
