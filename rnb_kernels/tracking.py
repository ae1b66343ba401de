"""DomainGradientTracker: per-domain gradients of chosen ``nn.Linear`` layers, computed inside the
normal backward at (nearly) no extra cost.

How the backward is routed
--------------------------
Each tracked ``nn.Linear`` gets its ``forward`` replaced (an instance attribute; ``remove()``
deletes it again) by a call to a small ``torch.autograd.Function``. Its forward is exactly
``F.linear``; its backward computes

* ``grad_input = dy @ W`` (the GEMM autograd would run),
* ``grad_weight`` through :func:`rnb_kernels.ops.segmented_wgrad` (exact mode) or
  :func:`rnb_kernels.ops.domain_sketch` (sketch mode). The op returns the ordinary weight
  gradient ``dyᵀ x`` *and* adds each domain's share into fp32 accumulators, so the per-domain
  bookkeeping replaces the weight-gradient GEMM instead of adding a second one. On the torch
  backend this is literally ``dy.t().mm(x)``, the GEMM autograd runs for ``nn.Linear``, so
  ``param.grad`` is bit-identical to an untracked backward.
* ``grad_bias = dy.sum(0)`` plus a segmented sum into per-domain bias rows.

Outside a :meth:`DomainGradientTracker.domains` context the backward is the plain one (nothing is
accumulated). Tied weights work unchanged: only the tracked module's *use* of the weight goes
through the op; other uses (e.g. GPT-2's token embedding sharing ``lm_head.weight``) produce
their gradient normally and autograd adds the two as usual.

Non-finite gradients (fp16 + GradScaler overflow)
-------------------------------------------------
Before accumulating, each tracked layer checks ``x`` and ``dy`` for NaN/Inf with one min/max
reduction (``skip_nonfinite=True``, the default). On a fault the layer's gradient is still
computed and returned (so the scaler sees the Inf and skips the optimizer step) but the
micro-batch is dropped from the statistics: nothing more is accumulated, its samples are not
counted, ``nonfinite_skips`` is incremented and a warning is issued. Layers that the backward
reached *before* the fault (only possible with several tracked layers) keep their finite
contribution. Loss scaling itself is undone exactly: pass ``grad_scale=scaler`` to
:meth:`domains` and the accumulators are kept in the current scale's units and rescaled
(by a power of two, so exactly) when the scale changes.

Multi-process
-------------
Accumulators and counts are local to each rank. Reading statistics (``gram()``, ``counts()``,
``domain_grads()``, ``target_alignment()``...) first all-reduces every buffer once when
``torch.distributed`` is initialised, so the reads are collectives: call them on all ranks.
Accumulating more after such a read (without ``reset()``) is supported: each rank then scales
its (now global) buffers by ``1 / world_size`` so the next all-reduce does not double count.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import distributed as rdist
from .ops import domain_sketch, gram, segmented_wgrad
from .ops._dispatch import resolve_backend
from .ops.reference import _C_COL, _C_LAYER, _C_ROW, _C_SEED, _MASK32, _fmix32

logger = logging.getLogger(__name__)

__all__ = ["DomainGradientTracker"]

_MODES = ("exact", "sketch")
_DOMAIN, _TARGET = "domain", "target"


def _bias_hash(
    k_out: int, k_in: int, sketch_dim: int, seed: int, layer: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count-sketch bucket (int64 ``[K_out]``) and sign (float32 ``[K_out]``) for the bias.

    The bias is sketched as column ``j = K_in`` of the augmented matrix ``[W | b]``, with the
    hash specified in :mod:`rnb_kernels.ops.reference`, so the sketch of a layer with bias is
    exactly the count-sketch of its ``[K_out, K_in + 1]`` gradient and no bias bucket collides
    systematically with a weight bucket.
    """
    i = torch.arange(k_out, dtype=torch.int64)
    s32 = (seed & _MASK32) * _C_SEED & _MASK32
    l32 = (layer & _MASK32) * _C_LAYER & _MASK32
    row = _fmix32(((i * _C_ROW) & _MASK32) ^ (s32 ^ l32))
    h = _fmix32((row + (k_in * _C_COL & _MASK32)) & _MASK32)
    bucket = (h & 0x7FFFFFFF) % sketch_dim
    sign = 1.0 - 2.0 * (h >> 31).to(torch.float32)
    return bucket.to(device), sign.to(device)


def _finite(*ts: torch.Tensor) -> bool:
    """True when no tensor holds NaN/Inf. One min/max reduction each (no [N, K] temporary)."""
    flags = []
    for t in ts:
        if t.numel():
            lo, hi = torch.aminmax(t)
            flags.append(torch.isfinite(lo) & torch.isfinite(hi))
    return bool(torch.stack(flags).all()) if flags else True


def _as_ids(ids: Any, name: str, num_domains: int, *, mask: bool = False) -> torch.Tensor:
    """Validate per-sample ``[B]`` or per-token ``[B, T]`` ids (or a boolean mask) -> int64."""
    if isinstance(ids, np.ndarray | list | tuple):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be an integer tensor, got {type(ids).__name__}") from e
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if mask:
        if ids.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got {ids.dtype}")
        ids = torch.where(ids, 0, -1).to(torch.int64)
    elif ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must have an integer dtype, got {ids.dtype}")
    if ids.dim() not in (1, 2):
        raise ValueError(f"{name} must be [batch] or [batch, seq], got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty")
    ids = ids.to(torch.int64)
    if not mask:
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        if lo < -1 or hi >= num_domains:
            raise ValueError(
                f"{name} must lie in [-1, num_domains={num_domains}), found values in [{lo}, {hi}]"
            )
    return ids


def _per_sample_counts(ids: torch.Tensor, num_domains: int) -> torch.Tensor:
    """float64 ``[m]``: samples per domain. A row of per-token ids counts once in every domain
    that appears in it (a packed row with two documents counts in both)."""
    if ids.dim() == 1:
        return torch.bincount(ids + 1, minlength=num_domains + 1)[1:].to(torch.float64)
    present = torch.zeros(ids.shape[0], num_domains + 1, dtype=torch.float64, device=ids.device)
    present.scatter_(1, ids + 1, 1.0)
    return present[:, 1:].sum(0)


class _Context:
    """State of one active ``domains()`` / ``target()`` / ``record_target()`` context."""

    def __init__(self, kind: str, ids: torch.Tensor | None, scale: float, anchor_only: bool):
        self.kind = kind
        self.ids = ids
        self.scale = scale
        self.anchor_only = anchor_only
        self.seen = False  # a tracked layer's backward ran inside the context
        self.bad = False  # non-finite values were met: drop the micro-batch
        self.batch: int | None = None  # samples (target without a mask: read off x)
        self._rows: dict[tuple[int, torch.device], torch.Tensor] = {}

    def rows(self, n: int, device: torch.device) -> torch.Tensor:
        """int64 ``[N]`` domain id of every row of the layer's flattened input."""
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


class _Slot:
    """One tracked ``nn.Linear``: its buffers, its original forward, its backward."""

    def __init__(self, tracker: DomainGradientTracker, name: str, module: nn.Linear, index: int):
        self.tracker = tracker
        self.name = name
        self.module = module
        self.index = index
        w = module.weight
        self.k_out, self.k_in = w.shape
        self.has_bias = module.bias is not None
        self.device = w.device
        self.had_forward_attr = "forward" in module.__dict__
        self.orig_forward = module.forward
        m, dev, f32 = tracker.num_domains, w.device, torch.float32
        self.buf: dict[str, dict[str, torch.Tensor]] = {}
        for group, rows in ((_DOMAIN, m), (_TARGET, 1)):
            if tracker.mode == "exact":
                b = {"w": torch.zeros(rows, self.k_out, self.k_in, dtype=f32, device=dev)}
                if self.has_bias:
                    # Row 0 collects ignored (-1) rows so the segmented sum needs no masking.
                    b["b"] = torch.zeros(rows + 1, self.k_out, dtype=f32, device=dev)
            else:
                b = {"s": torch.zeros(rows, tracker.sketch_dim, dtype=f32, device=dev)}
            self.buf[group] = b
        self.scale = {_DOMAIN: 1.0, _TARGET: 1.0}
        self.dirty = {_DOMAIN: False, _TARGET: False}
        self._bias_hash: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_params(self) -> int:
        return self.k_out * self.k_in + (self.k_out if self.has_bias else 0)

    def tensors(self, group: str) -> list[torch.Tensor]:
        return list(self.buf[group].values())

    def rows(self, group: str) -> torch.Tensor:
        """float32 ``[rows, P_slot]`` (exact) or ``[rows, k]`` (sketch), in true units."""
        b = self.buf[group]
        if "s" in b:
            out = b["s"]
        else:
            parts = [b["w"].reshape(b["w"].shape[0], -1)]
            if self.has_bias:
                parts.append(b["b"][1:])
            out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        s = self.scale[group]
        return out if s == 1.0 else out / s

    def gram_parts(self, group: str) -> list[torch.Tensor]:
        """Row blocks whose Grams add up to this slot's Gram (avoids concatenating [m, P])."""
        b = self.buf[group]
        if "s" in b:
            return [b["s"]]
        parts = [b["w"].reshape(b["w"].shape[0], -1)]
        if self.has_bias:
            parts.append(b["b"][1:])
        return parts

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

    def bias_hash(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._bias_hash is None:
            tr = self.tracker
            self._bias_hash = _bias_hash(
                self.k_out, self.k_in, tr.sketch_dim, tr.seed, self.index, self.device
            )
        return self._bias_hash

    def accumulate(self, x2: torch.Tensor, dy2: torch.Tensor, ctx: _Context) -> torch.Tensor:
        """Return ``dW = dy2ᵀ x2`` and add each domain's share (weight and bias) to the buffers."""
        tr = self.tracker
        if ctx.bad:
            return dy2.t().mm(x2)
        if tr.skip_nonfinite and not _finite(x2, dy2):
            ctx.bad = True
            return dy2.t().mm(x2)
        group = ctx.kind
        rows = ctx.rows(x2.shape[0], x2.device)
        self._prepare_scale(group, ctx.scale)
        m = tr.num_domains if group == _DOMAIN else 1
        b = self.buf[group]
        if tr.mode == "exact":
            dw, _ = segmented_wgrad(x2, dy2, rows, m, acc=b["w"], backend=tr.backend)
            if self.has_bias:
                b["b"].index_add_(0, rows + 1, dy2.to(torch.float32))
                b["b"][0].zero_()
        else:
            dw, _ = domain_sketch(
                x2, dy2, rows, m, sketch=b["s"], seed=tr.seed, layer=self.index, backend=tr.backend
            )
            if self.has_bias:
                per = torch.zeros(m + 1, self.k_out, dtype=torch.float32, device=dy2.device)
                per.index_add_(0, rows + 1, dy2.to(torch.float32))
                bucket, sign = self.bias_hash()
                b["s"].index_add_(1, bucket, per[1:] * sign)
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


class _TrackedLinear(torch.autograd.Function):
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


class DomainGradientTracker:
    """Per-domain gradients of chosen ``nn.Linear`` layers, from the normal backward.

    Args:
        model: any ``nn.Module``.
        num_domains: ``m >= 1``.
        modules: ``None`` = the last ``nn.Linear`` of ``model.named_modules()`` (the LM head);
            an ``nn.Linear`` of the model, a name pattern (``fnmatch``, e.g. ``"blocks.*.mlp.fc2"``)
            or a list mixing both. Every match must be an ``nn.Linear``.
        mode: ``"exact"`` keeps fp32 ``[m, K_out, K_in]`` (+ ``[m, K_out]`` bias) accumulators
            per layer; ``"sketch"`` keeps a fp32 count-sketch ``[m, sketch_dim]`` per layer.
        sketch_dim: buckets per layer in sketch mode.
        backend: op backend (``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``).
        seed: count-sketch hash seed (tracked layer ``l`` uses hash layer id ``l``).
        skip_nonfinite: drop micro-batches whose tracked activations/gradients hold NaN/Inf
            (see the module docstring); costs one min/max reduction and a host sync per layer.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> tracker = DomainGradientTracker(model, num_domains=2)
        >>> x, ids = torch.randn(5, 4), torch.tensor([0, 1, 1, -1, 0])
        >>> with tracker.domains(ids):
        ...     model(x).square().sum().backward()
        >>> tracker.counts().tolist(), tracker.gram().shape
        ([2.0, 2.0], torch.Size([2, 2]))
        >>> tracker.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        num_domains: int,
        modules: nn.Module | str | Sequence[nn.Module | str] | None = None,
        mode: str = "exact",
        sketch_dim: int = 8192,
        backend: str = "auto",
        seed: int = 0,
        *,
        skip_nonfinite: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(num_domains, bool) or not isinstance(num_domains, int):
            raise TypeError(f"num_domains must be an int, got {type(num_domains).__name__}")
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        if not isinstance(mode, str) or mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int):
            raise TypeError(f"sketch_dim must be an int, got {type(sketch_dim).__name__}")
        if sketch_dim < 1:
            raise ValueError(f"sketch_dim must be >= 1, got {sketch_dim}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2**32), got {seed}")
        named = self._resolve_modules(model, modules)
        op = "segmented_wgrad" if mode == "exact" else "domain_sketch"
        for name, mod in named:
            resolve_backend(op, backend, mod.weight.device)
            if _is_tracked(mod):
                raise ValueError(f"modules: {mod!r} is already tracked by another tracker")
            if not mod.weight.requires_grad:
                logger.warning("%s.weight does not require grad: nothing will be tracked", name)
        self.num_domains = num_domains
        self.mode = mode
        self.sketch_dim = sketch_dim
        self.backend = backend
        self.seed = seed
        self.skip_nonfinite = bool(skip_nonfinite)
        self.nonfinite_skips = 0
        self._model_params = [p for p in model.parameters()]
        self._slots = [_Slot(self, name, mod, i) for i, (name, mod) in enumerate(named)]
        self.device = self._slots[0].device
        self._counts = torch.zeros(num_domains, dtype=torch.float64, device=self.device)
        self._target_count = torch.zeros((), dtype=torch.float64, device=self.device)
        self._active: _Context | None = None
        self._anchor = torch.zeros((), requires_grad=True)
        self._synced = False
        self._removed = False
        for slot in self._slots:
            slot.module.forward = _make_forward(self, slot)
        logger.debug(
            "tracking %s in %s mode (m=%d, P=%d)",
            self.module_names,
            mode,
            num_domains,
            self.num_params,
        )

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _resolve_modules(model: nn.Module, modules) -> list[tuple[str, nn.Linear]]:
        # Names are taken without wrapper prefixes (DDP's "module.", torch.compile's
        # "_orig_mod."), so patterns and saved states work with and without the wrappers.
        all_named = [(_canonical(n), m) for n, m in model.named_modules()]
        if modules is None:
            linears = [(n, m) for n, m in all_named if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError("modules: model has no nn.Linear to track; pass modules=...")
            return [linears[-1]]
        items = [modules] if isinstance(modules, nn.Module | str) else modules
        if not isinstance(items, Sequence) or len(items) == 0:
            raise TypeError(
                "modules must be None, an nn.Module, a name pattern or a non-empty list"
            )
        chosen: set[int] = set()
        for item in items:
            if isinstance(item, str):
                hits = [m for n, m in all_named if n and fnmatch.fnmatchcase(n, item)]
                if not hits:
                    raise ValueError(f"modules: pattern {item!r} matches no submodule")
            elif isinstance(item, nn.Module):
                hits = [item]
                if not any(m is item for _, m in all_named):
                    raise ValueError(f"modules: {item!r} is not a submodule of model")
            else:
                raise TypeError(
                    f"modules entries must be nn.Module or str, got {type(item).__name__}"
                )
            for m in hits:
                if not isinstance(m, nn.Linear):
                    raise TypeError(
                        f"modules: only nn.Linear can be tracked, got {type(m).__name__}"
                    )
                chosen.add(id(m))
        return [(n, m) for n, m in all_named if id(m) in chosen]

    # ------------------------------------------------------------------ info
    @property
    def module_names(self) -> list[str]:
        """Qualified names of the tracked modules, in tracking (= hash layer id) order."""
        return [s.name for s in self._slots]

    @property
    def num_params(self) -> int:
        """``P_tracked``: weight + bias elements of all tracked layers."""
        return sum(s.num_params for s in self._slots)

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this tracker was removed; create a new one")

    # ------------------------------------------------------------------ contexts
    def _begin(self, ctx: _Context) -> None:
        self._check_live()
        if self._active is not None:
            raise RuntimeError(
                f"a {self._active.kind} context is already active; contexts do not nest"
            )
        if self._synced and rdist.world_size() > 1:
            # Buffers hold the global sum on every rank: keep 1/W of it here so the next
            # all-reduce adds only the new local contributions once.
            w = float(rdist.world_size())
            for slot in self._slots:
                for group in (_DOMAIN, _TARGET):
                    for t in slot.tensors(group):
                        t.div_(w)
            self._counts.div_(w)
            self._target_count.div_(w)
        self._synced = False
        self._active = ctx

    def _end_micro_batch(self, ctx: _Context) -> None:
        if ctx.bad:
            self.nonfinite_skips += 1
            msg = (
                f"non-finite activations/gradients in a tracked layer: {ctx.kind} statistics of "
                f"this micro-batch skipped ({self.nonfinite_skips} so far)"
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            logger.warning(msg)

    @staticmethod
    def _scale_value(grad_scale) -> float:
        if grad_scale is None:
            return 1.0
        if hasattr(grad_scale, "get_scale"):
            grad_scale = grad_scale.get_scale()
        if isinstance(grad_scale, torch.Tensor):
            grad_scale = float(grad_scale)
        if isinstance(grad_scale, bool) or not isinstance(grad_scale, int | float):
            raise TypeError(
                f"grad_scale must be a float or a GradScaler, got {type(grad_scale).__name__}"
            )
        if not (grad_scale > 0 and grad_scale < float("inf")):
            raise ValueError(f"grad_scale must be finite and > 0, got {grad_scale}")
        return float(grad_scale)

    @contextlib.contextmanager
    def domains(self, domain_ids, grad_scale=None) -> Iterator[None]:
        """Accumulate per-domain gradients of every backward run inside the block.

        Args:
            domain_ids: integer tensor ``[B]`` (one domain per sample, broadcast over the
                sequence) or ``[B, T]`` (one per token); ``-1`` = ignore. Rows of a tracked
                layer's input are taken batch-first (``[B, ..., K_in]``).
            grad_scale: the loss scale the backward runs under (a float or a ``GradScaler``,
                whose ``get_scale()`` is read on entry); statistics are stored unscaled.

        One block per micro-batch: samples are counted once, on exit, if a tracked layer's
        backward ran inside and no non-finite value was met.

        Example:
            >>> with tracker.domains(batch_domain_ids):  # doctest: +SKIP
            ...     loss.backward()
        """
        self._check_live()
        ids = _as_ids(domain_ids, "domain_ids", self.num_domains)
        scale = self._scale_value(grad_scale)
        counts = _per_sample_counts(ids, self.num_domains)
        ctx = _Context(_DOMAIN, ids, scale, anchor_only=False)
        self._begin(ctx)
        try:
            yield
        finally:
            self._active = None
        if ctx.seen and not ctx.bad:
            self._counts += counts.to(self._counts.device)
        self._end_micro_batch(ctx)

    def _target_ctx(self, mask, grad_scale, anchor_only: bool) -> tuple[_Context, Any]:
        ids = None if mask is None else _as_ids(mask, "mask", 1, mask=True)
        scale = self._scale_value(grad_scale)
        n = None if ids is None else float(_per_sample_counts(ids, 1)[0])
        return _Context(_TARGET, ids, scale, anchor_only), n

    def _end_target(self, ctx: _Context, n: float | None) -> None:
        if ctx.seen and not ctx.bad:
            self._target_count += float(ctx.batch if n is None else n)
        self._end_micro_batch(ctx)

    @contextlib.contextmanager
    def target(self, mask=None, grad_scale=None) -> Iterator[None]:
        """Record the gradient of a specific-set (target) loss into the target row.

        Every ``param.grad`` of the model is saved on entry and restored on exit, so the
        backward run inside leaves the training gradients untouched. Prefer
        :meth:`record_target` (no full backward, no ``.grad`` juggling; required under DDP).

        Args:
            mask: optional bool ``[B]`` / ``[B, T]``: which samples/tokens belong to the target.
            grad_scale: as in :meth:`domains`.
        """
        self._check_live()
        ctx, n = self._target_ctx(mask, grad_scale, anchor_only=False)
        saved = [(p, p.grad) for p in self._model_params]
        for p, _ in saved:
            p.grad = None
        self._begin(ctx)
        try:
            yield
        finally:
            self._active = None
            for p, g in saved:
                p.grad = g
        self._end_target(ctx, n)

    def record_target(
        self, loss: torch.Tensor, mask=None, grad_scale=None, retain_graph: bool = False
    ) -> None:
        """Record ``d loss / d(tracked params)`` into the target row; no ``param.grad`` changes.

        Runs ``torch.autograd.grad`` only down to the tracked layers (through a private anchor
        tensor), so the rest of the model's backward is skipped.

        Args:
            loss: scalar (or any tensor; ``sum()`` is differentiated) of the specific set.
            mask: optional bool ``[B]`` / ``[B, T]``: which samples/tokens count.
            grad_scale: as in :meth:`domains`.
            retain_graph: passed to ``torch.autograd.grad``.

        Example:
            >>> tracker.record_target(model(x_spe).square().mean())  # doctest: +SKIP
            >>> tracker.target_alignment()  # float64 [m]  # doctest: +SKIP
        """
        self._check_live()
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__}")
        if not loss.requires_grad:
            raise ValueError("loss does not require grad (was it computed under no_grad?)")
        ctx, n = self._target_ctx(mask, grad_scale, anchor_only=True)
        self._begin(ctx)
        try:
            out = loss if loss.dim() == 0 else loss.sum()
            (g,) = torch.autograd.grad(
                out, [self._anchor], retain_graph=retain_graph, allow_unused=True
            )
        finally:
            self._active = None
        if not ctx.seen and not ctx.bad:
            raise ValueError("loss does not depend on any tracked module")
        self._end_target(ctx, n)

    # ------------------------------------------------------------------ statistics
    def sync(self) -> None:
        """All-reduce buffers and counts over ranks (collective; once per accumulation round).

        Called by every statistics accessor; a no-op without ``torch.distributed``.
        """
        self._check_live()
        if self._synced or not rdist.is_initialized() or rdist.world_size() == 1:
            return
        tensors: list[torch.Tensor] = [self._counts, self._target_count.view(1)]
        for slot in self._slots:
            for group in (_DOMAIN, _TARGET):
                slot.normalize_scale(group)
                tensors.extend(slot.tensors(group))
        rdist.all_reduce_sum_(tensors)
        for slot in self._slots:
            for group in (_DOMAIN, _TARGET):
                slot.dirty[group] = True
        self._synced = True

    def counts(self) -> torch.Tensor:
        """float64 ``[m]``: samples per domain since ``reset()``, summed over ranks."""
        self.sync()
        return self._counts.clone()

    def target_count(self) -> float:
        """Samples recorded into the target row since ``reset()``, summed over ranks."""
        self.sync()
        return float(self._target_count)

    def gram(self) -> torch.Tensor:
        """float64 ``[m, m]``: ``G_ij = <g_i, g_j>`` of the per-domain gradient *sums*.

        Exact mode: Gram of the ``[m, P_tracked]`` accumulators (:func:`rnb_kernels.ops.gram`
        per layer block, summed). Sketch mode: sum over layers of the sketch Grams, an
        unbiased estimate.
        """
        self.sync()
        m = self.num_domains
        out = torch.zeros(m, m, dtype=torch.float64, device=self.device)
        for slot in self._slots:
            part = torch.zeros(m, m, dtype=torch.float64, device=slot.device)
            for rows in slot.gram_parts(_DOMAIN):
                part += gram(rows, backend=self.backend)
            s = slot.scale[_DOMAIN]
            out += (part / (s * s)).to(self.device)
        return out

    def domain_grads(self) -> torch.Tensor:
        """Exact mode: float32 ``[m, P_tracked]`` per-domain gradient sums (weights then bias of
        each tracked layer, flattened row-major, layers in :attr:`module_names` order)."""
        if self.mode != "exact":
            raise RuntimeError("domain_grads() needs mode='exact'; sketch mode keeps no [m, P]")
        self.sync()
        return torch.cat([s.rows(_DOMAIN).to(self.device) for s in self._slots], 1)

    def domain_sketches(self) -> torch.Tensor:
        """Sketch mode: float32 ``[m, L * sketch_dim]`` (per-layer sketches side by side)."""
        if self.mode != "sketch":
            raise RuntimeError("domain_sketches() needs mode='sketch'")
        self.sync()
        return torch.cat([s.rows(_DOMAIN).to(self.device) for s in self._slots], 1)

    def target_grad(self) -> torch.Tensor:
        """The target row: float32 ``[P_tracked]`` (exact) or ``[L * sketch_dim]`` (sketch)."""
        self.sync()
        return torch.cat([s.rows(_TARGET).to(self.device) for s in self._slots], 1)[0]

    def target_alignment(self) -> torch.Tensor:
        """float64 ``[m]``: ``<g_i, g_target>`` of the sums (divide by ``counts()`` and
        ``target_count()`` for means). Sketch mode: unbiased estimate."""
        self.sync()
        out = torch.zeros(self.num_domains, dtype=torch.float64, device=self.device)
        for slot in self._slots:
            dom, tgt = slot.gram_parts(_DOMAIN), slot.gram_parts(_TARGET)
            s = slot.scale[_DOMAIN] * slot.scale[_TARGET]
            for a, b in zip(dom, tgt):
                out += (gram(a, b[0], backend=self.backend) / s).to(self.device)
        return out

    def reset(self) -> None:
        """Zero every accumulator, sketch, target row and count (start a new round)."""
        self._check_live()
        for slot in self._slots:
            for group in (_DOMAIN, _TARGET):
                for t in slot.tensors(group):
                    t.zero_()
                slot.scale[group] = 1.0
                slot.dirty[group] = False
        self._counts.zero_()
        self._target_count.zero_()
        self._synced = False

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-exactly (buffers are cloned)."""
        self._check_live()
        return {
            "version": 1,
            "mode": self.mode,
            "num_domains": self.num_domains,
            "sketch_dim": self.sketch_dim,
            "seed": self.seed,
            "modules": self.module_names,
            "counts": self._counts.clone(),
            "target_count": self._target_count.clone(),
            "nonfinite_skips": self.nonfinite_skips,
            "synced": self._synced,
            "slots": [
                {
                    "buffers": {g: {k: t.clone() for k, t in s.buf[g].items()} for g in s.buf},
                    "scale": dict(s.scale),
                    "dirty": dict(s.dirty),
                }
                for s in self._slots
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; validates everything before changing anything."""
        self._check_live()
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        for key in ("mode", "num_domains", "sketch_dim", "seed", "modules"):
            if key not in state:
                raise ValueError(f"state is missing {key!r}")
        mine = (self.mode, self.num_domains, self.sketch_dim, self.seed, self.module_names)
        theirs = tuple(state[k] for k in ("mode", "num_domains", "sketch_dim", "seed", "modules"))
        if self.mode != "sketch":
            mine, theirs = mine[:2] + mine[3:], theirs[:2] + theirs[3:]
        if mine != theirs:
            raise ValueError(f"state was saved by a tracker configured as {theirs}, not {mine}")
        slots = state["slots"]
        if len(slots) != len(self._slots):
            raise ValueError(f"state has {len(slots)} slots, this tracker {len(self._slots)}")
        for s, st in zip(self._slots, slots):
            for g in s.buf:
                for k, t in s.buf[g].items():
                    src = st["buffers"][g][k]
                    if tuple(src.shape) != tuple(t.shape):
                        raise ValueError(
                            f"state: buffer {g}/{k} of {s.name} has shape {tuple(src.shape)}, "
                            f"expected {tuple(t.shape)}"
                        )
        if tuple(state["counts"].shape) != (self.num_domains,):
            raise ValueError(f"state: counts must have shape ({self.num_domains},)")
        for s, st in zip(self._slots, slots):
            for g in s.buf:
                for k, t in s.buf[g].items():
                    t.copy_(st["buffers"][g][k])
            s.scale = dict(st["scale"])
            s.dirty = dict(st["dirty"])
        self._counts.copy_(state["counts"])
        self._target_count.copy_(state["target_count"])
        self.nonfinite_skips = int(state["nonfinite_skips"])
        self._synced = bool(state["synced"])

    # ------------------------------------------------------------------ teardown
    def remove(self) -> None:
        """Restore every tracked module exactly (its ``forward``); the tracker becomes unusable."""
        if self._removed:
            return
        for slot in self._slots:
            mod = slot.module
            current = mod.__dict__.get("forward")
            if not getattr(current, "_rnb_tracker_forward", False):
                logger.warning("%s.forward was replaced after tracking began; restoring", slot.name)
            if slot.had_forward_attr:
                mod.forward = slot.orig_forward
            else:
                mod.__dict__.pop("forward", None)
        self._removed = True

    def __enter__(self) -> DomainGradientTracker:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"DomainGradientTracker(num_domains={self.num_domains}, mode={self.mode!r}, "
            f"modules={self.module_names}, P={self.num_params})"
        )


def _canonical(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return "" if name in ("module", "_orig_mod") else name


def _is_tracked(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "_rnb_tracker_forward", False)


def _make_forward(tracker: DomainGradientTracker, slot: _Slot):
    def forward(input: torch.Tensor) -> torch.Tensor:
        mod = slot.module
        w, b = mod.weight, mod.bias
        if not torch.is_grad_enabled() or not w.requires_grad:
            # No weight gradient will be computed: nothing to track.
            return slot.orig_forward(input)
        dev = w.device.type
        if torch.is_autocast_enabled(dev):
            # Reproduce autocast's casts outside the Function (so their backward casts the
            # gradients back exactly as for an untracked layer), then run it with autocast off.
            dt = torch.get_autocast_dtype(dev)
            input, w, b = (_autocast_cast(t, dt) for t in (input, w, b))
            with torch.autocast(dev, enabled=False):
                return _TrackedLinear.apply(input, w, b, tracker._anchor, slot)
        return _TrackedLinear.apply(input, w, b, tracker._anchor, slot)

    forward._rnb_tracker_forward = True  # type: ignore[attr-defined]
    return forward
