"""Chunked fused linear cross-entropy that also collects the LM head's per-domain statistics.

``fused_linear_cross_entropy(hidden, weight, targets)`` equals
``F.cross_entropy(F.linear(hidden, weight), targets)`` but never materialises the ``[N, V]``
logits: rows are processed ``chunk_size`` at a time, so the largest temporary is one
``[chunk_size, V]`` block (by default about the size of ``hidden``).

Forward, per chunk: ``z = h_c Wᵀ`` (one GEMM), then :func:`~rnb_kernels.ops.cross_entropy.
cross_entropy_rows` keeps each row's loss and log-sum-exp (``[N]`` floats saved in all).
Backward, per chunk: ``z`` is recomputed (one GEMM), overwritten in place with its gradient
``dz = g (softmax(z) - onehot(t))`` by :func:`~rnb_kernels.ops.cross_entropy.
cross_entropy_rows_grad_`, and then ``grad_hidden = dz W`` and ``grad_W += dzᵀ h_c``. The last
GEMM is the head's weight gradient, and ``dz`` is the head's ``dy``: with ``tracker=`` it goes
through the tracker's slot for ``weight`` (``segmented_wgrad`` with ``acc=`` in exact mode,
``domain_sketch`` in sketch mode), which returns the same ``dzᵀ h_c`` *and* adds each domain's
share to the statistics. The statistics therefore cost no pass of their own, and they equal
what the tracker would record for ``lm_head(hidden)`` followed by ``F.cross_entropy``.

Why the backward recomputes the logits (4 GEMMs per chunk, where Liger-Kernel computes the
gradients inside the forward with 3): the statistics must see the real backward. The
``grad_output`` (loss scale, ``1 / accumulation steps``, per-sample weights with
``reduction="none"``) is only known there, the statistics belong to the ``domains()`` context
active during ``backward()``, and nothing ``[V, H]``-sized is held between forward and
backward.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from rnb_kernels.integrations.fused_ce import fused_linear_cross_entropy
    >>> h = torch.randn(6, 4, requires_grad=True)
    >>> w = torch.randn(10, 4, requires_grad=True)
    >>> t = torch.tensor([1, 2, -100, 9, 0, 3])
    >>> loss = fused_linear_cross_entropy(h, w, t, chunk_size=4)
    >>> torch.allclose(loss, F.cross_entropy(F.linear(h, w), t))
    True
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..ops import _validate as V
from ..ops.cross_entropy import cross_entropy_rows, cross_entropy_rows_grad_
from ..tracking.linear import is_dtensor, rows_of, tracked_rows, tracked_wgrad

if TYPE_CHECKING:
    from ..tracking.slot import Slot
    from ..tracking.tracker import DomainGradientTracker

__all__ = ["FusedLinearCrossEntropyLoss", "default_chunk_size", "fused_linear_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")
_MIN_CHUNK = 256


def default_chunk_size(n: int, vocab: int, hidden: int) -> int:
    """Rows per chunk so that one ``[chunk, V]`` logits block is about as large as the
    ``[N, H]`` hidden states (Liger-Kernel's rule, ``2**ceil(log2(N / ceil(V / H)))``), but at
    least 256 rows (or ``N``).

    Example:
        >>> default_chunk_size(8192, 50257, 768), default_chunk_size(100_000, 50257, 768)
        (256, 2048)
    """
    rows = max(1, math.ceil(n / max(1, math.ceil(vocab / max(hidden, 1)))))
    # At least _MIN_CHUNK rows (or all of them): thinner GEMMs run far below peak (measured
    # 2.2x slower at 64 rows than at 1024 on the CPU), for a block of only _MIN_CHUNK x V.
    return min(max(1 << (rows - 1).bit_length(), _MIN_CHUNK), max(n, 1))


def _find_slot(tracker: DomainGradientTracker, weight: torch.Tensor, module: Any) -> Slot:
    slots = tracker._slots
    if module is not None:
        hits = [s for s in slots if s.module is module or s.name == module]
        if not hits:
            raise ValueError(f"module: {module!r} is not tracked by this tracker")
        return hits[0]
    hits = [s for s in slots if s.module.weight is weight]
    if not hits:
        raise ValueError(
            "weight is not the weight of a layer this tracker tracks; track the LM head "
            "(DomainGradientTracker(model, m, modules='lm_head')) and pass its weight "
            "(model.lm_head.weight), or name it with module="
        )
    return hits[0]


class _Plan:
    """Everything the autograd Function needs besides tensors (kept off the autograd args)."""

    def __init__(self, chunk, ignore_index, reduction, backend, tracker, slot, ids):
        self.chunk = chunk
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend
        self.tracker = tracker
        self.slot = slot
        self.ids = ids  # explicit per-row domain ids (int64 [N]) or None


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, anchor, plan: _Plan):  # noqa: ARG004
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for lo in range(0, n, plan.chunk):
            hi = min(n, lo + plan.chunk)
            z = _logits(hidden[lo:hi], weight, bias)
            loss[lo:hi], lse[lo:hi] = cross_entropy_rows(
                z, targets[lo:hi], plan.ignore_index, plan.backend
            )
        ctx.plan = plan
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        if plan.reduction == "none":
            return loss.to(hidden.dtype)
        total = loss.sum()
        if plan.reduction == "mean":
            # Same convention as F.cross_entropy: 0 / 0 = NaN when every row is ignored.
            total = total / (targets != plan.ignore_index).sum()
        return total.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        g = grad_out.float()
        if plan.reduction == "none":
            scale = g.reshape(n)
        else:
            if plan.reduction == "mean":
                g = g / (targets != plan.ignore_index).sum()
            scale = g.expand(n).contiguous()

        tr = plan.tracker
        if tr is not None and not torch.compiler.is_compiling():
            track = tr._active
            if track is not None and track.anchor_only:
                # record_target(): statistics only; grad_hidden only when a deeper tracked
                # layer has to be reached. (Compiled, no Python state is read: all computed.)
                need_w = need_b = False
                need_h = need_h and len(tr._slots) > 1
        gh = torch.empty_like(hidden) if need_h else None
        # fp32 accumulation across chunks (each chunk's product is already fp32-accumulated).
        gw = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        gb = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            if need_b
            else None
        )
        rows = order = None
        if plan.slot is not None:
            # Rows in domain order: a chunk then spans about one domain, so the statistics'
            # per-domain update runs ~(chunks + m) times instead of chunks x m (each is a
            # read-modify-write of a [V, H] accumulator or a sketch fold of one).
            rows, order = torch.sort(tracked_rows(hidden, plan.slot.key, n, plan.ids), stable=True)
        for lo in range(0, n, plan.chunk):
            hi = min(n, lo + plan.chunk)
            if order is None:
                h, t, s, sc = hidden[lo:hi], targets[lo:hi], lse[lo:hi], scale[lo:hi]
            else:
                idx = order[lo:hi]
                h, t, s, sc = (v.index_select(0, idx) for v in (hidden, targets, lse, scale))
            dz = cross_entropy_rows_grad_(
                _logits(h, weight, bias), t, s, sc, plan.ignore_index, plan.backend
            )
            if gh is not None:
                if order is None:
                    torch.mm(dz, weight, out=gh[lo:hi])
                else:
                    gh.index_copy_(0, idx, dz.mm(weight))
            if plan.slot is not None:
                # The head's dW; with a context active at run time, also its statistics.
                dw = tracked_wgrad(h, dz, plan.slot.key, n, ids=rows[lo:hi])
            elif gw is not None:
                dw = dz.t().mm(h)
            else:
                dw = None
            if gw is not None:
                gw += dw
            if gb is not None:
                gb += dz.sum(0, dtype=torch.float32)
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(bias.dtype)
        return gh, gw, gb, None, None, None


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    z = h.mm(weight.t())
    return z if bias is None else z.add_(bias)


def _autocast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    domain_ids: Any = None,
    tracker: DomainGradientTracker | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    bias: torch.Tensor | None = None,
    module: nn.Module | str | None = None,
    backend: str = "auto",
    check_targets: bool = True,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets)``, chunk by chunk, with the
    head's per-domain gradient statistics collected in the same backward.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 (float64 on the torch backend),
            e.g. ``[B, T, H]`` or ``[N, H]`` (flattened row-major, batch first).
        weight: ``[V, H]``, same dtype and device (the LM head's weight, tied or not).
        targets: int ``[...]`` (``hidden``'s leading shape) in ``[0, V)`` or ``ignore_index``.
        domain_ids: with ``tracker``: per-row ids replacing the ``domains()`` context's for
            this loss (``[N]`` / ``[B]`` / ``[B, T]`` in ``[-1, m)``; useful when ``hidden``
            rows do not line up with the context's ids, e.g. after shifting). Default: the
            context's ids, mapped onto the rows exactly as for a tracked ``nn.Linear``.
        tracker: a :class:`~rnb_kernels.DomainGradientTracker` tracking the layer whose weight
            this is: the backward accumulates the statistics of that layer (inside a
            ``domains()`` / ``target()`` / ``record_target()`` context active at backward
            time, like a tracked layer; outside one, the backward is plain).
        chunk_size: rows per chunk; default :func:`default_chunk_size`.
        ignore_index: target value of rows without loss (and without gradient).
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"`` (one loss per
            row, shaped like ``targets``).
        bias: optional ``[V]``.
        module: with ``tracker``, the tracked layer (module or name) to credit; default: the
            one whose ``weight`` this is.
        backend: backend of the per-chunk softmax kernels (``"auto"``: Triton on GPU tensors
            when installed, else torch); the statistics use the tracker's backend.
        check_targets: check target values once per call (a host sync on a GPU; skipped
            inside ``torch.compile``).

    Returns:
        the loss in ``hidden.dtype``: a scalar, or ``targets``-shaped for ``"none"``.

    Tolerances: float32 matches ``F.cross_entropy(F.linear(...))`` to ~1e-6 relative (the
    chunked sums are reordered). For bfloat16 / float16 the logits are rounded to the input
    dtype exactly as ``F.linear`` rounds them, then every softmax and loss is computed in fp32;
    ``grad_weight`` is summed over chunks in fp32 (more accurate than one bf16 GEMM), so results
    agree with the unfused bf16 computation to bf16 rounding (~1e-2 relative), see
    ``tests/test_fused_ce.py``.

    Example:
        >>> h, w = torch.randn(2, 3, 4), torch.randn(7, 4)
        >>> t = torch.randint(0, 7, (2, 3))
        >>> fused_linear_cross_entropy(h, w, t, reduction="none").shape
        torch.Size([2, 3])
    """
    V.check_tensor(hidden, "hidden", dtypes=V.FLOAT_DTYPES)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension [..., H]")
    V.check_tensor(weight, "weight", ndim=2, dtypes=V.FLOAT_DTYPES)
    V.check_tensor(targets, "targets", dtypes=V.ID_DTYPES)
    if is_dtensor(weight) or is_dtensor(hidden):
        raise TypeError(
            "weight/hidden: DTensors are not supported; call this inside the forward of the "
            "FSDP2 module that owns the head (its parameters are unsharded there), or use a "
            "replicated head"
        )
    vocab, h_dim = weight.shape
    if hidden.shape[-1] != h_dim:
        raise ValueError(
            f"hidden has {hidden.shape[-1]} features but weight is {tuple(weight.shape)}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, got "
            f"{tuple(targets.shape)}"
        )
    V.check_same_device(hidden, "hidden", weight=weight, targets=targets)
    if bias is not None:
        V.check_tensor(bias, "bias", ndim=1, dtypes=V.FLOAT_DTYPES)
        if bias.shape[0] != vocab:
            raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")
        V.check_same_device(hidden, "hidden", bias=bias)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    V.check_int(ignore_index, "ignore_index")
    n = targets.numel()
    if chunk_size is None:
        chunk_size = default_chunk_size(n, vocab, h_dim)
    V.check_int(chunk_size, "chunk_size", low=1)
    dev = weight.device.type
    if torch.is_autocast_enabled(dev):
        # What autocast does to F.linear: run it in the autocast dtype (CE itself is fp32).
        dt = torch.get_autocast_dtype(dev)
        hidden, weight, bias = (_autocast(t, dt) for t in (hidden, weight, bias))
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(
            f"hidden ({hidden.dtype}), weight ({weight.dtype}) and bias must share a dtype"
        )
    flat_t = targets.reshape(n)
    # A data-dependent branch: skipped while compiling (it would break the graph).
    if check_targets and n and not torch.compiler.is_compiling():
        bad = (flat_t != ignore_index) & ((flat_t < 0) | (flat_t >= vocab))
        if bool(bad.any()):
            raise ValueError(
                f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found "
                f"{int(flat_t[bad][0])}"
            )
    slot, ids = None, None
    if tracker is not None:
        from ..tracking.tracker import DomainGradientTracker

        if not isinstance(tracker, DomainGradientTracker):
            raise TypeError(
                f"tracker must be a DomainGradientTracker, got {type(tracker).__name__}"
            )
        slot = _find_slot(tracker, weight, module)
        if domain_ids is not None:
            ids = tracker.validate_ids(domain_ids)
            rows_of(ids, n, hidden.device)  # shape check, now
        # Not while compiling: reading the context would guard on it (a recompile per block).
        if not torch.compiler.is_compiling() and tracker._active is not None:
            tracker._active.forwarded.add(slot.index)
    elif domain_ids is not None:
        raise ValueError("domain_ids needs tracker= (the statistics go to its slot)")
    plan = _Plan(chunk_size, ignore_index, reduction, backend, tracker, slot, ids)
    anchor = tracker._anchor if tracker is not None else None
    with torch.autocast(dev, enabled=False):
        out = _FusedLinearCE.apply(hidden.reshape(n, h_dim), weight, bias, flat_t, anchor, plan)
    return out.view(targets.shape) if reduction == "none" else out


class FusedLinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`fused_linear_cross_entropy`.

    Args:
        tracker: optional :class:`~rnb_kernels.DomainGradientTracker` (statistics of the layer
            whose weight is passed).
        chunk_size, ignore_index, reduction, backend: as in :func:`fused_linear_cross_entropy`.

    Example:
        >>> loss_fn = FusedLinearCrossEntropyLoss(chunk_size=64)
        >>> h, w, t = torch.randn(5, 4), torch.randn(9, 4), torch.tensor([0, 8, 3, 3, 1])
        >>> loss_fn(h, w, t).shape
        torch.Size([])
    """

    def __init__(
        self,
        tracker: DomainGradientTracker | None = None,
        chunk_size: int | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.tracker = tracker
        self.chunk_size = chunk_size
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
        domain_ids: Any = None,
    ) -> torch.Tensor:
        return fused_linear_cross_entropy(
            hidden, weight, targets, domain_ids, self.tracker, self.chunk_size,
            self.ignore_index, self.reduction, bias=bias, backend=self.backend,
        )  # fmt: skip
