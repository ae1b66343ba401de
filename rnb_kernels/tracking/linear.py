"""The tracked ``nn.Linear``: its forward swap, the autograd Function and the context it reads.

Each tracked ``nn.Linear`` gets its ``forward`` replaced (an instance attribute; ``remove()``
deletes it again) by a call to :class:`TrackedLinear`. Its forward is exactly ``F.linear``; its
backward computes ``grad_input = dy @ W`` (the GEMM autograd would run) and routes the weight
gradient through the layer's :class:`~rnb_kernels.tracking.slot.Slot`, whose op returns the
ordinary ``dyᵀ x`` *and* adds each domain's share into its statistics. Outside a ``domains()``
context the backward is the plain one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from .slot import Slot
    from .tracker import DomainGradientTracker

DOMAIN, TARGET = "domain", "target"


class Context:
    """State of one active ``domains()`` / ``target()`` / ``record_target()`` context."""

    def __init__(self, kind: str, ids: torch.Tensor | None, scale: float, anchor_only: bool):
        self.kind = kind
        self.ids = ids
        self.scale = scale
        self.anchor_only = anchor_only
        self.seen = False  # a tracked layer's backward ran inside the context
        self.bad = False  # non-finite values were met (skip_nonfinite="micro-batch")
        self.batch: int | None = None  # samples (target without a mask: read off x)
        self._rows: dict[tuple[int, torch.device], torch.Tensor] = {}

    def rows(self, n: int, device: torch.device) -> torch.Tensor:
        """int64 ``[N]`` domain id of every row of the layer's flattened input (cached per
        shape, so several tracked layers share one copy)."""
        key = (n, device)
        if key in self._rows:
            return self._rows[key]
        ids = self.ids
        if ids is None:
            rows = torch.zeros(n, dtype=torch.int64, device=device)
        elif ids.dim() == 1:
            if n % ids.shape[0]:
                raise ValueError(
                    f"domain_ids has {ids.shape[0]} samples but the tracked layer saw {n} rows "
                    f"(not a multiple); pass per-token ids [batch, seq] for this layout"
                )
            rows = ids.to(device, non_blocking=True).repeat_interleave(n // ids.shape[0])
        else:
            if ids.numel() != n:
                raise ValueError(
                    f"domain_ids has shape {tuple(ids.shape)} ({ids.numel()} tokens) but the "
                    f"tracked layer saw {n} rows"
                )
            rows = ids.to(device, non_blocking=True).reshape(-1)
        self._rows[key] = rows
        return rows


class TrackedLinear(torch.autograd.Function):
    """``F.linear`` whose backward routes the weight gradient through the tracker's op."""

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, slot):  # noqa: ARG004 - anchor only links the graph
        ctx.slot = slot
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        return ctx.slot.backward(ctx, x, weight, dy)


def _autocast_cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # Same eligibility rule as autocast's own cast: floating point, not float64.
    if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def canonical_name(name: str) -> str:
    """Module name without wrapper prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``)."""
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return "" if name in ("module", "_orig_mod") else name


def is_tracked(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "_rnb_tracker_forward", False)


def make_forward(tracker: DomainGradientTracker, slot: Slot) -> Any:
    """The ``forward`` installed on a tracked module."""

    def forward(input: torch.Tensor) -> torch.Tensor:
        mod = slot.module
        w, b = mod.weight, mod.bias
        if not torch.is_grad_enabled() or not w.requires_grad:
            # No weight gradient will be computed: nothing to track.
            return slot.orig_forward(input)
        slot.forward_calls += 1
        dev = w.device.type
        if torch.is_autocast_enabled(dev):
            # Reproduce autocast's casts outside the Function (so their backward casts the
            # gradients back exactly as for an untracked layer), then run it with autocast off.
            dt = torch.get_autocast_dtype(dev)
            input, w, b = (_autocast_cast(t, dt) for t in (input, w, b))
            with torch.autocast(dev, enabled=False):
                return TrackedLinear.apply(input, w, b, tracker._anchor, slot)
        return TrackedLinear.apply(input, w, b, tracker._anchor, slot)

    forward._rnb_tracker_forward = True  # type: ignore[attr-defined]
    return forward
