"""The tracked ``nn.Linear``: its forward swap, the autograd Function and the context it reads.

Each tracked ``nn.Linear`` gets its ``forward`` replaced (an instance attribute; ``remove()``
deletes it again) by a call to :class:`TrackedLinear`. Its forward is exactly ``F.linear``; its
backward computes ``grad_input = dy @ W`` (the GEMM autograd would run) and routes the weight
gradient through the layer's :class:`~rnb_kernels.tracking.slot.Slot`, whose op returns the
ordinary ``dyᵀ x`` *and* adds each domain's share into its statistics. Outside a ``domains()``
context the backward is the plain one.

``torch.compile``
-----------------
Dynamo traces the swapped forward and the Function's backward. Everything with Python side
effects (reading the active context, the statistics buffers, host syncs of the row grouping)
sits behind one opaque custom op, ``rnb::tracked_wgrad`` (:func:`tracked_wgrad`), which the
compiled backward calls at run time; the forward's bookkeeping (which layers ran inside a
context) is skipped while compiling so that it neither breaks the graph nor adds guards on
per-micro-batch Python state. The op is tagged ``cudagraph_unsafe``: with CUDA graphs
(``mode="reduce-overhead"``) Inductor leaves the part of the backward around it uncaptured.
Under compilation the end-of-block bypass check only has the weight-gradient evidence (the
tracked weight's ``.grad`` changed in the block).

Tensor parallelism
------------------
A weight that is a ``DTensor`` sharded on dim 0 of a 1-D mesh when the forward runs
(``ColwiseParallel``, a vocabulary-parallel LM head) is tracked on its local rows: the Function
runs on local tensors, the slot hashes or stores rows at their *global* index, and the tracker
combines the ranks' partial statistics over the mesh's group (see :mod:`.tracker`). FSDP2
unshards its parameters before the forward, so an FSDP-only weight arrives as a plain tensor.
"""

from __future__ import annotations

import itertools
import sys
import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .slot import Slot
    from .tracker import DomainGradientTracker

DOMAIN, TARGET = "domain", "target"

# Slots by integer key: the custom op below can only take plain values, and the compiled
# backward finds its slot through this table at run time. Weak: a tracker dropped without
# remove() (its module gone too) must not be kept alive, buffers and all, by this table.
SLOTS: weakref.WeakValueDictionary[int, Slot] = weakref.WeakValueDictionary()
_keys = itertools.count()


def register_slot(slot: Slot) -> int:
    key = next(_keys)
    SLOTS[key] = slot
    return key


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
        # Evidence for the end-of-context check that no tracked layer was bypassed, by slot
        # index: whose tracked forward ran, whose statistics were accumulated, whose weight got
        # a gradient; and whether the tracker's model ran its forward (with grad) at all.
        self.forwarded: set[int] = set()
        self.accumulated: set[int] = set()
        self.weight_grads: set[int] = set()
        self.grads_before: list[tuple] = []
        self.model_ran = False
        self._rows: dict[tuple[int, torch.device], torch.Tensor] = {}

    def rows(self, n: int, device: torch.device) -> torch.Tensor:
        """int64 ``[N]`` domain id of every row of the layer's flattened input (cached per
        shape, so several tracked layers share one copy)."""
        key = (n, device)
        if key not in self._rows:
            self._rows[key] = rows_of(self.ids, n, device)
        return self._rows[key]


def rows_of(ids: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """int64 ``[n]``: the domain of each of a layer's ``n`` input rows under ``ids`` --
    ``[B]`` per sample (broadcast over the rows of each sample), ``[B, T]`` per token, or
    ``None`` (a target context without a mask: every row is the target's, 0)."""
    if ids is None:
        return torch.zeros(n, dtype=torch.int64, device=device)
    if ids.dim() == 1:
        if n % ids.shape[0]:
            raise ValueError(
                f"domain_ids has {ids.shape[0]} samples but the tracked layer saw {n} rows "
                f"(not a multiple); pass per-token ids [batch, seq] for this layout"
            )
        return ids.to(device, non_blocking=True).repeat_interleave(n // ids.shape[0])
    if ids.numel() != n:
        raise ValueError(
            f"domain_ids has shape {tuple(ids.shape)} ({ids.numel()} tokens) but the "
            f"tracked layer saw {n} rows"
        )
    return ids.to(device, non_blocking=True).reshape(-1)


# cudagraph_unsafe: its Python body (context lookup, row grouping, buffer updates) must run on
# every call, so CUDA-graph capture (mode="reduce-overhead") must not record and replay it.
@torch.library.custom_op("rnb::tracked_wgrad", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _tracked_wgrad_op(
    x: torch.Tensor,
    dy: torch.Tensor,
    key: int,
    batch: int,
    lo: int,
    n: int,
    ids: torch.Tensor | None,
) -> torch.Tensor:
    return SLOTS[key].wgrad(x, dy, batch, lo, n, ids)


@_tracked_wgrad_op.register_fake
def _(x, dy, key, batch, lo, n, ids):
    return x.new_empty(dy.shape[1], x.shape[1])


def tracked_wgrad(
    x2: torch.Tensor,
    dy2: torch.Tensor,
    key: int,
    batch: int,
    lo: int = 0,
    n: int = -1,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dy2ᵀ x2`` (``[K_out, K_in]``, ``x2.dtype``) for the slot registered under ``key``, plus
    its statistics when a tracker context is active at run time.

    ``x2`` / ``dy2`` may be rows ``[lo, lo + len)`` of an input of ``n`` rows (``-1``: all of
    it), whose domains are ``ids`` (default: the context's, mapped onto the ``n`` rows).
    Eagerly a plain call; while compiling, the opaque custom op ``rnb::tracked_wgrad`` (the
    tracker's buffers it updates are invisible to the compiler, which only needs the result).
    """
    if torch.compiler.is_compiling():
        return _tracked_wgrad_op(x2, dy2, key, batch, lo, n, ids)
    return SLOTS[key].wgrad(x2, dy2, batch, lo, n, ids)


@torch.library.custom_op("rnb::tracked_rows", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _tracked_rows_op(
    like: torch.Tensor, key: int, n: int, ids: torch.Tensor | None
) -> torch.Tensor:
    return SLOTS[key].context_rows(n, like.device, ids).clone()


@_tracked_rows_op.register_fake
def _(like, key, n, ids):
    return like.new_empty(n, dtype=torch.int64)


def tracked_rows(
    like: torch.Tensor, key: int, n: int, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """int64 ``[n]``: the domain of each of ``n`` rows under the context active at run time
    (``ids`` mapped instead of the context's when given; all ``-1`` outside a context), on
    ``like``'s device. Eagerly a plain call; compiled, the opaque op ``rnb::tracked_rows``."""
    if torch.compiler.is_compiling():
        return _tracked_rows_op(like, key, n, ids)
    return SLOTS[key].context_rows(n, like.device, ids)


class TrackedLinear(torch.autograd.Function):
    """``F.linear`` whose backward routes the weight gradient through the tracker's op."""

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, key):  # noqa: ARG004 - anchor only links the graph
        ctx.key = key
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not torch.compiler.is_compiling():
            return SLOTS[ctx.key].backward(x, weight, dy, need_x, need_w, need_b, ctx.has_bias)
        # Compiled: no Python state may be read here, so no shortcut for record_target().
        k_out, k_in = weight.shape
        x2, dy2 = x.reshape(-1, k_in), dy.reshape(-1, k_out)
        gw = tracked_wgrad(x2, dy2, ctx.key, x.shape[0] if x.dim() > 1 else 1)
        gx = dy2.mm(weight).view(x.shape) if need_x else None
        gb = dy2.sum(0) if (need_b and ctx.has_bias) else None
        return gx, gw if need_w else None, gb, None, None


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


def is_dtensor(t: Any) -> bool:
    # No DTensor can exist before its module is imported, and importing it here would cost
    # `import rnb_kernels` a second; sys.modules also keeps this traceable by Dynamo.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _apply(tracker, slot, x, w, b):
    """``TrackedLinear`` under autocast's casts, as an untracked ``nn.Linear`` would see them."""
    dev = w.device.type
    if torch.is_autocast_enabled(dev):
        # Reproduce autocast's casts outside the Function (so their backward casts the
        # gradients back exactly as for an untracked layer), then run it with autocast off.
        dt = torch.get_autocast_dtype(dev)
        x, w, b = (_autocast_cast(t, dt) for t in (x, w, b))
        with torch.autocast(dev, enabled=False):
            return TrackedLinear.apply(x, w, b, tracker._anchor, slot.key)
    return TrackedLinear.apply(x, w, b, tracker._anchor, slot.key)


@torch.compiler.disable
def _sharded_forward(tracker, slot, x, w, b):
    """Row-sharded (vocabulary-parallel) weight: run on local tensors, return a DTensor
    sharded on the last dim, as ``F.linear`` on the DTensors would.

    Always eager (one graph break per such layer under ``torch.compile``): it binds the
    slot's layout and reads the active context, Python state the compiler must not see.
    """
    from torch.distributed.tensor import DTensor, Partial, Shard

    if tracker._active is not None:
        tracker._active.forwarded.add(slot.index)
    slot.bind_sharded(w)
    if not isinstance(x, DTensor) or not all(p.is_replicate() for p in x.placements):
        got = x.placements if isinstance(x, DTensor) else type(x).__name__
        raise ValueError(
            f"{slot.name}: a row-sharded tracked weight needs a replicated DTensor input "
            f"(ColwiseParallel's default input_layouts), got {got}"
        )
    if b is not None and not (isinstance(b, DTensor) and b.placements == w.placements):
        raise ValueError(f"{slot.name}: the bias must be sharded like the weight")
    # The local input gradient dy_local @ W_local is this rank's part of a sum over the mesh.
    x_local = x.to_local(grad_placements=[Partial()])
    b_local = None if b is None else b.to_local()
    y = _apply(tracker, slot, x_local, w.to_local(), b_local)
    # The global shape is given explicitly: shards of a vocabulary not divisible by the mesh
    # size are uneven, and from_local would otherwise assume equal ones.
    shape = (*y.shape[:-1], w.shape[0])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        y, w.device_mesh, [Shard(y.dim() - 1)], run_check=False, shape=shape, stride=stride
    )


def make_forward(tracker: DomainGradientTracker, slot: Slot) -> Any:
    """The ``forward`` installed on a tracked module."""

    def forward(input: torch.Tensor) -> torch.Tensor:
        mod = slot.module
        w, b = mod.weight, mod.bias
        if not torch.is_grad_enabled() or not w.requires_grad:
            # No weight gradient will be computed: nothing to track.
            return slot.orig_forward(input)
        if is_dtensor(w):
            return _sharded_forward(tracker, slot, input, w, b)
        if not torch.compiler.is_compiling():
            ctx = tracker._active
            if ctx is not None:
                ctx.forwarded.add(slot.index)
        return _apply(tracker, slot, input, w, b)

    forward._rnb_tracker_forward = True  # type: ignore[attr-defined]
    return forward
