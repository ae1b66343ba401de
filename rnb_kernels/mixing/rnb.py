"""R&B: mixture balancing from the Gram matrix of per-domain gradients (Ge et al., 2025)."""

from __future__ import annotations

from typing import Any

import torch

from .base import Mixer, MixingContext, as_float64, as_simplex, check_counts, check_float
from .registry import register_mixer

__all__ = ["RnB"]


def _inverse(n: torch.Tensor) -> torch.Tensor:
    # A domain with no samples has mean gradient 0: its row and column of G_mean vanish.
    return torch.where(n > 0, 1.0 / n.clamp(min=1e-300), torch.zeros_like(n))


@register_mixer
class RnB(Mixer):
    """R&B mixer: ``p' = softmax(lam · G p_eval / ‖G p_eval‖₂)``, overwriting the old weights.

    ``G_ij = <g_i, g_j> / (|S_i| |S_j|)`` with ``g_i`` the per-domain gradient *sum* of the round
    and ``|S_i|`` its sample count, i.e. the Gram of mean gradients; a domain with no samples has
    mean gradient 0 (its row and column of ``G`` are 0).

    Args:
        num_domains: ``m``.
        eval_proportions: ``p_eval`` float ``[m]``, the evaluation set's share of each domain
            (non-negative, positive sum; normalised here).
        lam: softmax temperature ``λ`` (> 0). ``G p_eval`` is normalised to unit length, so
            logits lie in ``[-λ, λ]`` and the largest weight ratio is at most ``e^{2λ}``.
        update_every: ``K`` optimizer steps per round.
        init_weights: weights before the first update (default uniform).

    Degenerate rounds: ``‖G p_eval‖ = 0`` (e.g. no samples of any evaluated domain) keeps the
    weights; a non-finite Gram skips the update with a warning.

    Example:
        >>> mixer = RnB(3, eval_proportions=[0.5, 0.5, 0.0], lam=2.0)
        >>> G = torch.tensor([[4.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
        >>> w = mixer.update(gram=G, counts=torch.tensor([2.0, 1.0, 1.0]))
        >>> float(w.sum())
        1.0
    """

    name = "rnb"
    # G p_eval is all the update needs: the Balancer computes it as ``gram_vector`` (one pass
    # over the statistics, ~2·m·P work) rather than the full Gram (m²·P).
    requires = ("gram_vec", "counts")

    def __init__(
        self,
        num_domains: int,
        eval_proportions: Any,
        lam: float = 1.0,
        update_every: int = 1,
        init_weights: Any = None,
    ) -> None:
        super().__init__(num_domains, update_every, init_weights)
        self.eval_proportions = as_simplex(eval_proportions, "eval_proportions", self.num_domains)
        self.lam = check_float(lam, "lam", low=0.0, low_open=True)

    @classmethod
    def from_context(cls, context: MixingContext, **hparams: Any) -> RnB:
        """``eval_proportions`` from the context unless given."""
        if "eval_proportions" not in hparams:
            hparams["eval_proportions"] = context.require("eval_proportions", cls.name)
        return super().from_context(context, **hparams)

    def gram_coefficients(self, counts: Any) -> torch.Tensor:
        """float64 ``[m]``: ``c = p_eval / counts`` (0 for empty domains), so that
        ``G_mean p_eval = (G c) / counts`` with ``G`` the Gram of gradient *sums*."""
        n = check_counts(counts, "counts", self.num_domains)
        return self.eval_proportions * _inverse(n)

    def update(self, gram: Any = None, counts: Any = None, *, gram_vec: Any = None) -> torch.Tensor:
        """New weights from this round's statistics and per-domain sample counts.

        Args:
            gram: float ``[m, m]``, ``<g_i, g_j>`` of per-domain gradient sums
                (``tracker.gram()``); or, instead,
            gram_vec: float ``[m]``, ``G c`` with ``c = gram_coefficients(counts)``
                (``tracker.gram_vector(c)``, what the Balancer passes).
            counts: float ``[m]``, samples per domain in the round (``tracker.counts()``).

        Returns:
            float64 ``[m]`` new weights (also stored in :attr:`weights`).
        """
        m = self.num_domains
        if counts is None:
            raise TypeError("update() needs counts")
        if (gram is None) == (gram_vec is None):
            raise TypeError("update() needs exactly one of gram or gram_vec")
        n = check_counts(counts, "counts", m)
        inv = _inverse(n)
        if gram is not None:
            g = as_float64(gram, "gram", (m, m))
            if not bool(torch.isfinite(g).all()):
                return self._skip("non-finite gram")
            gv = g @ (self.eval_proportions * inv)
        else:
            gv = as_float64(gram_vec, "gram_vec", (m,))
            if not bool(torch.isfinite(gv).all()):
                return self._skip("non-finite gram")
        v = inv * gv
        norm = torch.linalg.vector_norm(v)
        if not bool(torch.isfinite(norm)):
            return self._skip("non-finite G p_eval (overflow)")
        if float(norm) == 0.0:
            return self._skip("||G p_eval|| = 0", warn=False)
        return self._commit(torch.softmax(self.lam * v / norm, dim=0))

    def _extra_state(self) -> dict[str, Any]:
        return {"eval_proportions": self.eval_proportions.clone(), "lam": self.lam}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        as_simplex(state["eval_proportions"], "state['eval_proportions']", self.num_domains)
        check_float(state["lam"], "state['lam']", low=0.0, low_open=True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.eval_proportions = as_float64(state["eval_proportions"], "eval_proportions").clone()
        self.lam = float(state["lam"])
