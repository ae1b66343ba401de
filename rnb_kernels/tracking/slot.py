"""One tracked layer's statistics: buffers, loss-scale bookkeeping and the backward's op call."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..ops import domain_projection, domain_sketch, segmented_wgrad
from ..ops._dispatch import resolve_backend
from ..ops.domain_projection import projection_width
from .linear import DOMAIN, TARGET, Context

if TYPE_CHECKING:
    from .tracker import DomainGradientTracker

# Which op serves each mode.
MODE_OPS = {
    "exact": "segmented_wgrad",
    "projected": "domain_projection",
    "sketch": "domain_sketch",
}


def _finite(*ts: torch.Tensor) -> bool:
    """True when no tensor holds NaN/Inf. One min/max reduction each and a host sync."""
    flags = []
    for t in ts:
        if t.numel():
            lo, hi = torch.aminmax(t)
            flags.append(torch.isfinite(lo) & torch.isfinite(hi))
    return bool(torch.stack(flags).all()) if flags else True


class Slot:
    """One tracked ``nn.Linear``: its buffers, its original forward, its backward.

    Buffers per group (``"domain"``: ``m`` rows, ``"target"``: 1 row), float32:

    * exact: ``w [rows, K_out, K_in]`` and, with a bias, ``b [rows, K_out]``;
    * projected: ``p [rows, proj_dim, K_in']`` with ``K_in' = K_in + bias`` (the op projects
      the bias as a ones column of ``x``) or ``proj_in_dim``;
    * sketch: ``s [rows, sketch_dim]`` (the bias is sketched by the op as column ``K_in``).

    Buffers are kept in the units of the current loss scale (``scale``) and rescaled by the
    ratio, a power of two for GradScaler, when it changes; :meth:`rows` returns true units.
    """

    def __init__(self, tracker: DomainGradientTracker, name: str, module: nn.Linear, index: int):
        self.tracker = tracker
        self.name = name
        self.module = module
        self.index = index
        w = module.weight
        self.k_out, self.k_in = w.shape
        self.has_bias = module.bias is not None
        self.device = w.device
        # Resolved once here: the backward runs on every micro-batch.
        self.backend = resolve_backend(MODE_OPS[tracker.mode], tracker.backend, w.device)
        self.had_forward_attr = "forward" in module.__dict__
        self.orig_forward = module.forward
        self.forward_calls = 0
        m, dev, f32 = tracker.num_domains, w.device, torch.float32
        self.buf: dict[str, dict[str, torch.Tensor]] = {}
        for group, rows in ((DOMAIN, m), (TARGET, 1)):
            if tracker.mode == "exact":
                b = {"w": torch.zeros(rows, self.k_out, self.k_in, dtype=f32, device=dev)}
                if self.has_bias:
                    b["b"] = torch.zeros(rows, self.k_out, dtype=f32, device=dev)
            elif tracker.mode == "projected":
                width = projection_width(self.k_in, self.has_bias, tracker.proj_in_dim)
                b = {"p": torch.zeros(rows, tracker.proj_dim, width, dtype=f32, device=dev)}
            else:
                b = {"s": torch.zeros(rows, tracker.sketch_dim, dtype=f32, device=dev)}
            self.buf[group] = b
        self.scale = {DOMAIN: 1.0, TARGET: 1.0}
        self.dirty = {DOMAIN: False, TARGET: False}

    @property
    def num_params(self) -> int:
        return self.k_out * self.k_in + (self.k_out if self.has_bias else 0)

    def tensors(self, group: str) -> list[torch.Tensor]:
        return list(self.buf[group].values())

    def gram_parts(self, group: str) -> list[torch.Tensor]:
        """Row blocks ``[rows, *]`` (scaled units) whose Grams add up to this slot's Gram."""
        return [t.reshape(t.shape[0], -1) for t in self.buf[group].values()]

    def rows(self, group: str) -> torch.Tensor:
        """float32 ``[rows, P_slot]`` (exact), ``[rows, proj_dim * K_in']`` (projected) or
        ``[rows, k]`` (sketch), in true units."""
        parts = self.gram_parts(group)
        out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        s = self.scale[group]
        return out if s == 1.0 else out / s

    def _prepare_scale(self, group: str, scale: float) -> None:
        if scale == self.scale[group]:
            return
        if self.dirty[group]:
            ratio = scale / self.scale[group]
            for t in self.tensors(group):
                t.mul_(ratio)
        self.scale[group] = scale

    def normalize_scale(self, group: str) -> None:
        """Bring buffers to true units (scale 1), e.g. before an all-reduce."""
        s = self.scale[group]
        if s != 1.0:
            for t in self.tensors(group):
                t.div_(s)
            self.scale[group] = 1.0

    def accumulate(self, x2: torch.Tensor, dy2: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Return ``dW = dy2ᵀ x2`` and add each domain's share (weight and bias) to the buffers."""
        tr = self.tracker
        if ctx.bad:
            return dy2.t().mm(x2)
        if tr.skip_nonfinite == "micro-batch" and not _finite(x2, dy2):
            ctx.bad = True
            return dy2.t().mm(x2)
        group = ctx.kind
        rows = ctx.rows(x2.shape[0], x2.device)
        self._prepare_scale(group, ctx.scale)
        m = tr.num_domains if group == DOMAIN else 1
        b = self.buf[group]
        # Ids were validated once for the micro-batch (tracker.domains); no per-layer check.
        if tr.mode == "exact":
            dw, _ = segmented_wgrad(
                x2, dy2, rows, m, acc=b["w"], backend=self.backend, bias_acc=b.get("b"),
                check_ids=False,
            )  # fmt: skip
        elif tr.mode == "projected":
            dw, _ = domain_projection(
                x2, dy2, rows, m, proj=b["p"], seed=tr.seed, layer=self.index,
                backend=self.backend, bias=self.has_bias, proj_in_dim=tr.proj_in_dim,
                check_ids=False,
            )  # fmt: skip
        else:
            dw, _ = domain_sketch(
                x2, dy2, rows, m, sketch=b["s"], seed=tr.seed, layer=self.index,
                backend=self.backend, bias=self.has_bias, check_ids=False,
            )  # fmt: skip
        self.dirty[group] = True
        ctx.seen = True
        return dw

    def backward(self, fctx: Any, x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor):
        tr = self.tracker
        ctx = tr._active
        x2 = x.reshape(-1, self.k_in)
        dy2 = dy.reshape(-1, self.k_out)
        need_x, need_w, need_b = fctx.needs_input_grad[:3]
        if ctx is not None and ctx.batch is None:
            ctx.batch = x.shape[0] if x.dim() > 1 else 1
        if ctx is not None and ctx.anchor_only:
            # record_target(): only the statistics are wanted. grad_input is still needed when
            # a deeper tracked layer has to be reached.
            self.accumulate(x2, dy2, ctx)
            gx = dy2.mm(weight).view(x.shape) if need_x and len(tr._slots) > 1 else None
            return gx, None, None, None, None
        gx = dy2.mm(weight).view(x.shape) if need_x else None
        gw = None
        if need_w:
            gw = dy2.t().mm(x2) if ctx is None else self.accumulate(x2, dy2, ctx)
        gb = dy2.sum(0) if (need_b and fctx.has_bias) else None
        return gx, gw, gb, None, None
