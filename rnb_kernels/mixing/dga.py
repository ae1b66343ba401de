"""DGA: Dynamic Gradient Alignment (Fan et al., 2024) and its distribution-reweighting variant.

Both are an exponentiated-gradient (mirror-descent on the simplex) step toward the domains whose
mean gradient aligns with the mean gradient of a small *specific* (target) set:
``α̂ ∝ α ⊙ exp(η · <ḡ_i, ḡ_spe>)``, then ``α ← (1 − β) α + β α̂`` (β = 1: no EMA).

Two sources of ``<ḡ_i, ḡ_spe>``:

* ours, free: the per-domain gradient sums that training already produced
  (:class:`~rnb_kernels.DomainGradientTracker` with a target row recorded by
  ``tracker.record_target(loss_spe)``): pass ``alignment=tracker.target_alignment()``,
  ``counts=tracker.counts()``, ``target_count=tracker.target_count()``;
* the paper's: one extra forward/backward per domain every K steps
  (:func:`domain_gradient_alignment`), passed as means (``counts=None``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import Mixer, MixingContext, as_float64, as_simplex, check_counts, check_float
from .registry import register_mixer

logger = logging.getLogger(__name__)

__all__ = ["DGA", "DGADistribution", "domain_gradient_alignment"]


def _mean_alignment(
    alignment: Any, counts: Any, target_count: Any, n: int, what: str
) -> torch.Tensor | None:
    """``<ḡ_i, ḡ_spe>`` from sums (``counts`` given) or as given (means). None if no target."""
    a = as_float64(alignment, "alignment", (n,))
    if counts is None:
        if target_count is not None:
            raise ValueError("target_count is only meaningful with counts (alignment of sums)")
        return a
    c = check_counts(counts, "counts", n)
    if target_count is None:
        raise ValueError(f"target_count is required when counts are given ({what} sums)")
    t = check_float(target_count, "target_count", low=0.0)
    if t == 0.0:
        return None
    denom = c * t
    return torch.where(c > 0, a / denom.clamp(min=1e-300), torch.zeros_like(a))


_NORMALIZE = ("max", "none")


@register_mixer
class DGA(Mixer):
    """Dynamic Gradient Alignment mixer.

    Args:
        num_domains: ``m``.
        step_size: ``η`` (> 0) of the exponentiated-gradient step.
        ema: ``β`` in ``(0, 1]``; ``α ← (1 − β) α + β α̂``. ``1`` disables the EMA, ``0.1`` is the
            paper's stabilised setting.
        update_every: ``K`` optimizer steps per round.
        init_weights: initial ``α`` (default uniform).
        normalize: how alignments are scaled before the step. ``"max"`` (default) divides them
            by the largest alignment magnitude seen so far (kept in the state), so the first
            update moves the best-aligned domain's log-weight by ``η`` whatever the model's
            gradient scale (raw final-layer alignments are often ~1e-4, which makes a fixed
            ``η`` of order 1 a no-op), and later steps shrink as the alignments do — which is
            what lets the mirror descent settle. ``"none"`` is the paper's raw form, where
            ``η`` must be tuned to the gradient scale.

    Example:
        >>> mixer = DGA(2, step_size=1.0, ema=1.0)
        >>> w = mixer.update(alignment=torch.tensor([1.0, 0.0]))
        >>> round(float(w[0]), 4)  # e / (e + 1)
        0.7311
    """

    name = "dga"
    requires = ("alignment", "counts", "target_count")

    def __init__(
        self,
        num_domains: int,
        step_size: float = 1.0,
        ema: float = 0.1,
        update_every: int = 1,
        init_weights: Any = None,
        normalize: str = "max",
    ) -> None:
        super().__init__(num_domains, update_every, init_weights)
        self.step_size = check_float(step_size, "step_size", low=0.0, low_open=True)
        self.ema = check_float(ema, "ema", low=0.0, high=1.0, low_open=True)
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
        self.normalize = normalize
        self.scale = 0.0  # running max of |alignment| ("max" normalisation)

    def _step(self, a: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(a).all()):
            return self._skip("non-finite gradient alignment")
        if self.normalize == "max":
            scale = max(self.scale, float(a.abs().max()))
            if scale == 0.0:
                return self._skip("all alignments are 0", warn=False)
            self.scale = scale
            a = a / scale
        alpha = self._weights
        # log-space: exp(η a) overflows long before the normalised result does.
        logits = torch.log(alpha) + self.step_size * a
        alpha_hat = torch.softmax(logits, dim=0)
        new = (1.0 - self.ema) * alpha + self.ema * alpha_hat
        return self._commit(new / new.sum())

    def update(self, alignment: Any, counts: Any = None, target_count: Any = None) -> torch.Tensor:
        """One exponentiated-gradient step.

        Args:
            alignment: float ``[m]``. With ``counts=None``: the mean-gradient alignments
                ``<ḡ_i, ḡ_spe>``. With ``counts``: the alignments of gradient *sums*
                ``<g_i, g_spe>`` (``tracker.target_alignment()``), divided here by
                ``counts[i] * target_count``; a domain with no samples gets alignment 0.
            counts: float ``[m]`` samples per domain, or None.
            target_count: samples behind the target gradient (required with ``counts``).

        Returns:
            float64 ``[m]`` new weights.
        """
        a = _mean_alignment(alignment, counts, target_count, self.num_domains, "domain")
        if a is None:
            return self._skip("no target gradient recorded (target_count = 0)", warn=False)
        return self._step(a)

    def _extra_state(self) -> dict[str, Any]:
        return {
            "step_size": self.step_size,
            "ema": self.ema,
            "normalize": self.normalize,
            "scale": self.scale,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        check_float(state["step_size"], "state['step_size']", low=0.0, low_open=True)
        check_float(state["ema"], "state['ema']", low=0.0, high=1.0, low_open=True)
        normalize = state.get("normalize", self.normalize)
        if normalize not in _NORMALIZE:
            raise ValueError(f"state['normalize'] must be one of {_NORMALIZE}, got {normalize!r}")
        check_float(state.get("scale", 0.0), "state['scale']", low=0.0)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.step_size = float(state["step_size"])
        self.ema = float(state["ema"])
        self.normalize = state.get("normalize", self.normalize)
        self.scale = float(state.get("scale", 0.0))


@register_mixer
class DGADistribution(DGA):
    """DGA over *basis distributions* instead of domains (distribution reweighting).

    Weights ``w`` over ``m`` bases ``B`` (rows of ``[m, k]``, each a distribution over ``k`` fine
    clusters); examples are drawn from the fine clusters with probabilities ``Σ_j w_j B_j``
    (:attr:`sampling_weights`, what :class:`~rnb_kernels.MixtureSampler` reads). One gradient per
    basis: ``ḡ_{B_j} = Σ_c B_jc ḡ_c``, so with the tracker over the ``k`` fine clusters the basis
    alignments are ``B · a_fine``.

    Args:
        bases: float ``[m, k]``, non-negative rows with positive sums (normalised here).
        step_size, ema, update_every, init_weights, normalize: as in :class:`DGA`.
        num_domains: optional ``m``; must equal ``bases.shape[0]``.

    Example:
        >>> B = DGADistribution.default_bases([0, 0, 3], coarse_of_fine=[0, 0, 1, 1])
        >>> B.shape  # specific-set histogram + one uniform row per coarse cluster
        torch.Size([3, 4])
        >>> mixer = DGADistribution(B, step_size=1.0)
        >>> mixer.sampling_weights.shape
        torch.Size([4])
    """

    def __init__(
        self,
        bases: Any,
        step_size: float = 1.0,
        ema: float = 0.1,
        update_every: int = 1,
        init_weights: Any = None,
        normalize: str = "max",
        *,
        num_domains: int | None = None,
    ) -> None:
        b = as_float64(bases, "bases")
        if b.dim() != 2 or b.shape[0] < 1 or b.shape[1] < 1:
            raise ValueError(f"bases must be a non-empty [m, k] matrix, got {tuple(b.shape)}")
        if num_domains is not None and num_domains != b.shape[0]:
            raise ValueError(f"num_domains={num_domains} but bases has {b.shape[0]} rows")
        rows = [as_simplex(row, f"bases[{i}]") for i, row in enumerate(b)]
        super().__init__(b.shape[0], step_size, ema, update_every, init_weights, normalize)
        self.bases = torch.stack(rows)

    name = "dga-distribution"

    @classmethod
    def from_context(cls, context: MixingContext, **hparams: Any) -> DGADistribution:
        """``bases`` is a hyper-parameter here (``[m, k]``); ``context.num_domains`` is the
        ``k`` fine clusters the sampler draws from."""
        if "bases" not in hparams:
            raise ValueError("mixer 'dga-distribution' needs bases=[m, k] (see default_bases)")
        mixer = cls(update_every=hparams.pop("update_every", context.update_every), **hparams)
        if mixer.num_clusters != context.num_domains:
            raise ValueError(
                f"bases cover {mixer.num_clusters} clusters, the data has {context.num_domains}"
            )
        return mixer

    @property
    def num_clusters(self) -> int:
        """``k``: fine clusters the bases are distributions over."""
        return self.bases.shape[1]

    @property
    def stat_domains(self) -> int:
        return self.num_clusters

    @property
    def sampling_weights(self) -> torch.Tensor:
        """float64 ``[k]``: ``Σ_j w_j B_j``, the fine-cluster sampling distribution."""
        p = self._weights @ self.bases
        return p / p.sum()

    def update(
        self,
        alignment: Any,
        counts: Any = None,
        target_count: Any = None,
        level: str = "cluster",
    ) -> torch.Tensor:
        """One exponentiated-gradient step on the basis weights.

        Args:
            alignment: ``level="cluster"``: float ``[k]`` over fine clusters (sums with
                ``counts``, means without), projected to the bases as ``B · a``;
                ``level="basis"``: float ``[m]``, one alignment per basis distribution (e.g.
                from :func:`domain_gradient_alignment` with one batch per basis).
            counts, target_count: as in :meth:`DGA.update`, over the same level.
            level: ``"cluster"`` or ``"basis"``.
        """
        if level not in ("cluster", "basis"):
            raise ValueError(f"level must be 'cluster' or 'basis', got {level!r}")
        n = self.num_clusters if level == "cluster" else self.num_domains
        a = _mean_alignment(alignment, counts, target_count, n, level)
        if a is None:
            return self._skip("no target gradient recorded (target_count = 0)", warn=False)
        if level == "cluster":
            if not bool(torch.isfinite(a).all()):
                return self._skip("non-finite gradient alignment")
            a = self.bases @ a
        return self._step(a)

    @staticmethod
    def default_bases(
        specific_labels: Any, coarse_of_fine: Any, num_fine: int | None = None
    ) -> torch.Tensor:
        """The paper's default bases over ``k`` fine clusters.

        Row 0: the specific set's histogram over fine clusters (importance sampling). Then one
        row per coarse cluster (sorted by label): uniform over the fine clusters it contains.

        Args:
            specific_labels: int ``[n]`` fine-cluster label of every specific-set example.
            coarse_of_fine: int ``[k]`` coarse label of every fine cluster (two-level k-means).
            num_fine: ``k`` (default ``len(coarse_of_fine)``).

        Returns:
            float64 ``[1 + C, k]``, rows on the simplex.
        """
        coarse = np.asarray(
            coarse_of_fine.cpu() if isinstance(coarse_of_fine, torch.Tensor) else coarse_of_fine
        )
        spec = np.asarray(
            specific_labels.cpu() if isinstance(specific_labels, torch.Tensor) else specific_labels
        )
        for name, arr in (("coarse_of_fine", coarse), ("specific_labels", spec)):
            if arr.dtype.kind not in "iu":
                raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
            if arr.ndim != 1 or arr.size == 0:
                raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
        k = coarse.size if num_fine is None else int(num_fine)
        if coarse.size != k:
            raise ValueError(f"coarse_of_fine must have num_fine={k} entries, got {coarse.size}")
        if spec.min() < 0 or spec.max() >= k:
            raise ValueError(
                f"specific_labels must lie in [0, {k}), found [{spec.min()}, {spec.max()}]"
            )
        rows = [np.bincount(spec, minlength=k).astype(np.float64)]
        for c in np.unique(coarse):
            rows.append((coarse == c).astype(np.float64))
        b = torch.as_tensor(np.stack(rows))
        return b / b.sum(1, keepdim=True)

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "bases": self.bases.clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        b = as_float64(state["bases"], "state['bases']", tuple(self.bases.shape))
        for i, row in enumerate(b):
            as_simplex(row, f"state['bases'][{i}]")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.bases = as_float64(state["bases"], "bases").clone()


def domain_gradient_alignment(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    domain_batches: Sequence[Any],
    target_batch: Any,
    params: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The DGA paper's gradient source: one extra forward/backward per domain.

    Computes ``<∇L_i, ∇L_spe>`` for every domain ``i`` with ``torch.autograd.grad`` (no
    ``param.grad`` is touched), holding one domain's gradient at a time besides the target's.

    Args:
        model: the model being trained.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of a batch.
        domain_batches: one batch per domain (``None`` for a domain with no data: alignment 0).
        target_batch: a batch of the specific set.
        params: parameters to differentiate (default: all that require grad).

    Returns:
        float64 ``[m]`` alignments of the mean gradients; pass as ``DGA.update(alignment=...)``.

    Example:
        >>> a = domain_gradient_alignment(model, loss_fn, [b0, b1], spe)  # doctest: +SKIP
        >>> mixer.update(alignment=a)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable: loss_fn(model, batch) -> scalar")
    if isinstance(domain_batches, str | bytes) or not isinstance(domain_batches, Sequence):
        raise TypeError("domain_batches must be a sequence with one batch per domain")
    if len(domain_batches) == 0:
        raise ValueError("domain_batches is empty")
    ps = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not ps:
        raise ValueError("params: no parameter requires grad")

    def grads(batch: Any) -> list[torch.Tensor]:
        loss = loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar tensor")
        gs = torch.autograd.grad(loss, ps, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(ps, gs)]

    target = grads(target_batch)
    out = torch.zeros(len(domain_batches), dtype=torch.float64)
    for i, batch in enumerate(domain_batches):
        if batch is None:
            continue
        gi = grads(batch)
        out[i] = sum(
            float(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()))
            for a, b in zip(gi, target)
        )
    return out
