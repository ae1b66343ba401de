"""One tracked layer's statistics: buffers, loss-scale bookkeeping and the backward's op call."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..ops import domain_projection, domain_sketch, segmented_wgrad
from ..ops._dispatch import resolve_backend
from ..ops.domain_projection import project_rows, projection_width
from .linear import DOMAIN, TARGET, Context, is_dtensor, register_slot, rows_of

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

    * exact: ``w [rows, R, K_in]`` and, with a bias, ``b [rows, R]``;
    * projected: ``p [rows, proj_dim, K_in']`` with ``K_in' = K_in + bias`` (the op projects
      the bias as a ones column of ``x``) or ``proj_in_dim``, and ``e [rows, h, K_in']``, the
      round's ``h = exact_rows`` heaviest output rows (:attr:`heavy`) kept exactly;
    * sketch: ``s [rows, sketch_dim]`` (the bias is sketched by the op as column ``K_in``).

    ``R = K_out``, except for a row-sharded (tensor-parallel) weight, where ``R`` is this rank's
    rows ``[row_offset, row_offset + R)`` of the logical weight. Buffers of a plain weight are
    allocated at construction; those of a ``DTensor`` weight when its first forward shows the
    layout the computation uses (FSDP2 hands the forward the unsharded weight, tensor
    parallelism a row shard), so no rank ever holds more than it needs.

    Buffers are kept in the units of the current loss scale (``scale``) and rescaled by the
    ratio, a power of two for GradScaler, when it changes; :meth:`rows` returns true units.
    """

    def __init__(self, tracker: DomainGradientTracker, name: str, module: nn.Linear, index: int):
        self.tracker = tracker
        self.name = name
        self.module = module
        self.index = index
        w = module.weight
        # The logical shape (a DTensor reports its global shape).
        self.k_out, self.k_in = w.shape
        self.has_bias = module.bias is not None
        if w.device.type == "meta":
            raise ValueError(
                f"modules: {name}.weight is on the meta device; build the tracker after the "
                "model is materialised (to_empty() / init), so its buffers get a real device"
            )
        self.device = w.device
        # Resolved once here: the backward runs on every micro-batch.
        self.backend = resolve_backend(MODE_OPS[tracker.mode], tracker.backend, w.device)
        self.had_forward_attr = "forward" in module.__dict__
        self.orig_forward = module.forward
        # Row layout of what this rank accumulates (see the class docstring).
        self.local_rows = self.k_out
        self.row_offset = 0
        self.tp_group: Any = None
        self.tp_size = 1
        self.buf: dict[str, dict[str, torch.Tensor]] = {}
        # Projected mode's exact rows: how many, this round's (int64 [h], None until a round
        # has measured the rows' energy) and the energy measured this round (fp32 [K_out]).
        self.exact_rows = min(tracker.exact_rows, self.k_out) if tracker.mode == "projected" else 0
        self.heavy: torch.Tensor | None = None
        self.energy: torch.Tensor | None = None
        if not is_dtensor(w):
            self._allocate(self.k_out, w.device)
        self.scale = {DOMAIN: 1.0, TARGET: 1.0}
        self.dirty = {DOMAIN: False, TARGET: False}
        self.key = register_slot(self)

    # ------------------------------------------------------------------ layout and buffers
    def _allocate(self, rows_out: int, device: torch.device) -> None:
        tr = self.tracker
        m, f32 = tr.num_domains, torch.float32
        self.buf = {}
        for group, rows in ((DOMAIN, m), (TARGET, 1)):
            if tr.mode == "exact":
                b = {"w": torch.zeros(rows, rows_out, self.k_in, dtype=f32, device=device)}
                if self.has_bias:
                    b["b"] = torch.zeros(rows, rows_out, dtype=f32, device=device)
            elif tr.mode == "projected":
                width = projection_width(self.k_in, self.has_bias, tr.proj_in_dim)
                b = {"p": torch.zeros(rows, tr.proj_dim, width, dtype=f32, device=device)}
                if self.exact_rows:
                    b["e"] = torch.zeros(rows, self.exact_rows, width, dtype=f32, device=device)
            else:
                b = {"s": torch.zeros(rows, tr.sketch_dim, dtype=f32, device=device)}
            self.buf[group] = b
        self.local_rows = rows_out
        if self.exact_rows:
            self.energy = torch.zeros(rows_out, dtype=f32, device=device)

    def ensure_buffers(self) -> None:
        """Allocate the full-layout buffers of a ``DTensor`` weight not yet seen in a forward."""
        if not self.buf:
            self._allocate(self.k_out, self.device)

    def bind_sharded(self, w: Any) -> None:
        """Adopt the layout of a row-sharded ``DTensor`` weight seen in the forward (once)."""
        if self.tp_group is not None:
            return
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        mesh, placements = w.device_mesh, w.placements
        if mesh.ndim != 1 or not placements[0].is_shard(0):
            raise NotImplementedError(
                f"{self.name}: the tracked weight is a DTensor with placements {placements} on "
                f"a {mesh.ndim}-D mesh; only row sharding on a 1-D mesh (Shard(0): "
                "ColwiseParallel, a vocabulary-parallel head) is supported"
            )
        if tuple(w.shape) != (self.k_out, self.k_in):
            raise ValueError(
                f"{self.name}: the weight's logical shape changed from {(self.k_out, self.k_in)} "
                f"to {tuple(w.shape)} after the tracker was built"
            )
        shape, offset = compute_local_shape_and_global_offset(w.shape, mesh, placements)
        if self.buf and any(bool(t.any()) for g in self.buf for t in self.tensors(g)):
            raise RuntimeError(
                f"{self.name}: statistics were accumulated before the weight became row-sharded; "
                "build the tracker after parallelize_module"
            )
        # Exact rows would need the heaviest rows of the whole vocabulary agreed over the
        # shards; a row-sharded layer keeps the plain projection.
        self.exact_rows = 0
        self._allocate(int(shape[0]), w.to_local().device)
        self.row_offset = int(offset[0])
        self.tp_group = mesh.get_group(0)
        self.tp_size = mesh.size(0)

    @property
    def sharded(self) -> bool:
        """Whether this rank holds only a row shard of the layer (tensor parallelism)."""
        return self.tp_group is not None

    @property
    def num_params(self) -> int:
        return self.k_out * self.k_in + (self.k_out if self.has_bias else 0)

    def tensors(self, group: str) -> list[torch.Tensor]:
        return list(self.buf[group].values()) if self.buf else []

    def gram_parts(self, group: str) -> list[torch.Tensor]:
        """Row blocks ``[rows, *]`` (scaled units) whose Grams add up to this slot's Gram (this
        rank's part of it for a row-sharded exact slot).

        Projected mode with exact rows: the exact rows, and the projection of the other rows
        (the exact rows' share taken out of ``p``), so heavy rows never collide in a bucket."""
        self.ensure_buffers()
        b = self.buf[group]
        if "e" not in b:
            return [t.reshape(t.shape[0], -1) for t in b.values()]
        p, e = b["p"], b["e"]
        if self.heavy is None:
            return [p.reshape(p.shape[0], -1)]
        tr = self.tracker
        rest = p - project_rows(
            e, self.heavy, self.local_rows, p.shape[1], tr.hash_seed, self.index, self.row_offset
        )
        return [rest.reshape(p.shape[0], -1), e.reshape(e.shape[0], -1)]

    def choose_heavy(self) -> None:
        """Round's end: the next round keeps exactly the ``exact_rows`` output rows with the
        most gradient energy (``Σ ‖dW_i‖²`` over this round's micro-batches, summed over the
        data-parallel ranks when the statistics were synced). A round without energy keeps
        the rows it had."""
        if not self.exact_rows or self.energy is None:
            return
        e = self.energy
        if bool(e.any()):
            top = torch.topk(torch.nan_to_num(e, nan=0.0, posinf=0.0), self.exact_rows).indices
            self.heavy = torch.sort(top).values
        e.zero_()

    def rows(self, group: str) -> torch.Tensor:
        """float32 ``[rows, P_slot]`` (exact), ``[rows, proj_dim * K_in']`` (projected: the
        projection of every row, exact rows included) or ``[rows, k]`` (sketch), in true
        units."""
        self.ensure_buffers()
        parts = [t.reshape(t.shape[0], -1) for k, t in self.buf[group].items() if k != "e"]
        out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        s = self.scale[group]
        return out if s == 1.0 else out / s

    def memory_bytes(self) -> int:
        """Bytes of this rank's statistics buffers (both groups, and the rows' energy)."""
        n = sum(t.numel() * t.element_size() for g in self.buf for t in self.tensors(g))
        return n + (0 if self.energy is None else self.energy.numel() * 4)

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

    # ------------------------------------------------------------------ backward
    def accumulate(
        self,
        x2: torch.Tensor,
        dy2: torch.Tensor,
        ctx: Context,
        rows: torch.Tensor | None = None,
        need_dw: bool = True,
    ) -> torch.Tensor | None:
        """Return ``dW = dy2ᵀ x2`` and add each domain's share (weight and bias) to the buffers.

        ``rows``: int64 ``[N]`` domain id of each row; ``None`` maps ``x2``'s rows to the
        context's ids (a caller feeding chunks of a larger input passes its slice).
        ``need_dw=False`` (target contexts only, :meth:`DomainGradientTracker.record_target`):
        ``dW`` is not wanted, so no GEMM is spent on it (``None`` or a by-product is returned;
        the rows' energy, which reads ``dW``, is measured on domain contexts only).
        """
        tr = self.tracker
        if ctx.bad:
            return dy2.t().mm(x2)
        if tr.skip_nonfinite == "micro-batch" and not _finite(x2, dy2):
            ctx.bad = True
            return dy2.t().mm(x2)
        self.ensure_buffers()
        group = ctx.kind
        if rows is None:
            rows = ctx.rows(x2.shape[0], x2.device)
        self._prepare_scale(group, ctx.scale)
        m = tr.num_domains if group == DOMAIN else 1
        b = self.buf[group]
        # Ids were validated once for the micro-batch (tracker.domains); no per-layer check.
        if tr.mode == "exact":
            dw, _ = segmented_wgrad(
                x2, dy2, rows, m, acc=b["w"], backend=self.backend, bias_acc=b.get("b"),
                check_ids=False, dw_from_domains=not (tr.bitwise_grad and need_dw),
            )  # fmt: skip
        elif tr.mode == "projected":
            # This round's heavy rows go to ``e`` in the same op (one fold of dy2 for both).
            heavy = self.heavy if self.exact_rows else None
            dw, _ = domain_projection(
                x2, dy2, rows, m, proj=b["p"], seed=tr.hash_seed, layer=self.index,
                backend=self.backend, bias=self.has_bias, proj_in_dim=tr.proj_in_dim,
                check_ids=False, row_offset=self.row_offset, exact_index=heavy,
                exact=None if heavy is None else b["e"], need_dw=need_dw,
            )  # fmt: skip
            if self.exact_rows and group == DOMAIN and self.energy is not None:
                # The rows' energy, for the next round's choice of heavy rows. No host sync.
                self.energy += torch.linalg.vector_norm(dw, dim=1, dtype=torch.float32).square_()
        else:
            dw, _ = domain_sketch(
                x2, dy2, rows, m, sketch=b["s"], seed=tr.hash_seed, layer=self.index,
                backend=self.backend, bias=self.has_bias, check_ids=False,
                row_offset=self.row_offset, dw_from_domains=not (tr.bitwise_grad and need_dw),
            )  # fmt: skip
        self.dirty[group] = True
        ctx.seen = True
        ctx.accumulated.add(self.index)
        return dw

    def context_rows(
        self, n: int, device: torch.device, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """int64 ``[n]`` domain of each row under the active context (``-1`` without one)."""
        ctx = self.tracker._active
        if ctx is None:
            return torch.full((n,), -1, dtype=torch.int64, device=device)
        return ctx.rows(n, device) if ids is None else rows_of(ids, n, device)

    def wgrad(
        self,
        x2: torch.Tensor,
        dy2: torch.Tensor,
        batch: int,
        lo: int = 0,
        n: int = -1,
        ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``dy2ᵀ x2``, through the statistics when a context is active (read at run time).

        ``x2`` may be rows ``[lo, lo + len)`` of an input of ``n`` rows (a chunk); their ids
        are taken from ``ids`` or the context's, mapped onto the ``n`` rows.
        """
        ctx = self.tracker._active
        if ctx is None:
            return dy2.t().mm(x2)
        if ctx.batch is None:
            ctx.batch = batch
        rows = None
        if ids is not None or lo != 0 or (n >= 0 and n != x2.shape[0]):
            n = x2.shape[0] if n < 0 else n
            rows = ctx.rows(n, x2.device) if ids is None else rows_of(ids, n, x2.device)
            rows = rows[lo : lo + x2.shape[0]]
        return self.accumulate(x2, dy2, ctx, rows)

    def backward(self, x, weight, dy, need_x: bool, need_w: bool, need_b: bool, has_bias: bool):
        """Gradients of ``F.linear(x, weight, bias)`` for :class:`TrackedLinear` (eager)."""
        tr = self.tracker
        ctx = tr._active
        k_out, k_in = weight.shape
        x2 = x.reshape(-1, k_in)
        dy2 = dy.reshape(-1, k_out)
        if ctx is not None and ctx.batch is None:
            ctx.batch = x.shape[0] if x.dim() > 1 else 1
        if ctx is not None and ctx.anchor_only:
            # record_target(): only the statistics are wanted. grad_input is still needed when
            # a deeper tracked layer has to be reached.
            self.accumulate(x2, dy2, ctx, need_dw=False)
            gx = dy2.mm(weight).view(x.shape) if need_x and len(tr._slots) > 1 else None
            return gx, None, None, None, None
        gx = dy2.mm(weight).view(x.shape) if need_x else None
        gw = None
        if need_w:
            gw = dy2.t().mm(x2) if ctx is None else self.accumulate(x2, dy2, ctx)
        gb = dy2.sum(0) if (need_b and has_bias) else None
        return gx, gw, gb, None, None
