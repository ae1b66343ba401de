"""DomainGradientTracker: per-domain gradients of chosen ``nn.Linear`` layers, computed inside the
normal backward at (nearly) no extra cost.

The weight gradient of each tracked layer goes through :func:`rnb_kernels.ops.segmented_wgrad`
(exact mode), :func:`rnb_kernels.ops.domain_projection` (projected mode) or
:func:`rnb_kernels.ops.domain_sketch` (sketch mode): the op returns the ordinary weight gradient
``dyᵀ x`` *and* adds each domain's share into fp32 statistics, so the bookkeeping replaces the
weight-gradient GEMM instead of adding a second pass. On the torch backend the
returned gradient is literally ``dy.t().mm(x)``, the GEMM autograd runs for ``nn.Linear``, so
``param.grad`` is bit-identical to an untracked backward (other backends compute it in their own
kernel: equal within the dtype's rounding). See :mod:`.linear` for how the backward is routed.
Tied weights work unchanged: only the tracked module's *use* of the weight goes through the op.

The hot path does no host synchronisation
------------------------------------------
Per micro-batch, ids are validated once (:func:`~rnb_kernels.tracking.validate_domain_ids`):
on the CPU, where a check costs nothing, immediately; for ids on a GPU, out-of-range values are
masked to ``-1`` on the device (so no kernel ever indexes out of bounds) and counted, and the
error is raised at the round's end by the first statistics read (``id_check``). Per layer, the
op is called with the backend resolved at construction and no further checks.

Non-finite gradients (fp16 + GradScaler overflow)
-------------------------------------------------
``skip_nonfinite="round"`` (default): nothing is checked in the backward. A NaN/Inf reaching
the statistics makes the round's Gram (or alignment) non-finite; the statistics reads detect
that on the small ``[m, m]`` / ``[m]`` result, count it in ``nonfinite_rounds`` and warn, and
every mixer skips a non-finite update (weights unchanged). One overflowing micro-batch thus
costs the round's update, never a wrong one. ``"micro-batch"`` drops only the offending
micro-batch (the gradient is still returned, so the scaler sees the Inf) at the price of a
min/max reduction over ``x`` and ``dy`` and a host sync per tracked layer. Loss scaling itself
is undone exactly: pass ``grad_scale=scaler`` to :meth:`domains` and the buffers are kept in the
current scale's units and rescaled (by a power of two, so exactly) when the scale changes.

Choosing the mode
-----------------
``mode="auto"`` (default) keeps exact accumulators while they are small and projects beyond:
exact when ``num_domains * P_tracked <= AUTO_EXACT_MAX_ELEMENTS`` (``2**24`` fp32 elements,
64 MiB; ``P_tracked`` counts weights and biases of the tracked layers), projected otherwise. The
resolved mode is stored in :attr:`DomainGradientTracker.mode` and logged; pass ``mode="exact"``
/ ``"projected"`` / ``"sketch"`` to override. ``docs/tracking.md`` ("Projected mode") explains
the projection, its variance and the default ``proj_dim``.

Multi-process
-------------
Buffers and counts are local to each rank. Reading statistics (``gram()``, ``counts()``,
``domain_grads()``, ``target_alignment()``...) first all-reduces every buffer once when
``torch.distributed`` is initialised, so the reads are collectives: call them on all ranks.
Accumulating more after such a read (without ``reset()``) is supported: each rank then scales
its (now global) buffers by ``1 / world_size`` so the next all-reduce does not double count.

Under FSDP2 the forward sees the unsharded weight, so every rank accumulates full-size
statistics of its own data and the all-reduce above sums them. A row-sharded (tensor-parallel,
vocabulary-parallel) tracked weight is accumulated on this rank's rows only: exact buffers are
``[m, V / tp, K_in]`` and their partial Grams are summed over the tensor-parallel group at read
time; sketches hash rows by their global index, so the shards' sketches are summed into the
full one. Ranks of one tensor-parallel group see the same data, so counts and buffers are
summed over the data-parallel group only (``dp_group``). See ``docs/distributed.md``.

Never silently tracking nothing
-------------------------------
A tracked layer whose weight is used without calling its ``forward`` (a fused linear
cross-entropy such as Liger-Kernel's reads ``lm_head.weight`` directly) would contribute
nothing. At the end of every ``domains()`` / ``target()`` block the tracker checks, per layer,
whether its statistics were accumulated; if not, while its weight received a gradient in the
block or the model ran its forward without calling the layer's, it raises (``on_untracked=
"raise"``, default) or warns, naming the layer and the fix
(:func:`rnb_kernels.integrations.fused_ce.fused_linear_cross_entropy` with ``tracker=``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .. import distributed as rdist
from ..ops import gram
from ..ops.gram import gram_matvec
from ..ops.sketch_hash import round_seed
from .ids import per_sample_counts, validate_domain_ids
from .linear import DOMAIN, SLOTS, TARGET, Context, canonical_name, is_tracked, make_forward
from .slot import MODE_OPS, Slot

logger = logging.getLogger(__name__)

__all__ = ["DomainGradientTracker"]

_MODES = tuple(MODE_OPS)
# mode="auto": exact accumulators up to this many fp32 elements (m * P_tracked), 64 MiB; a
# GPT-2 head at m = 16 is 620M elements, the CPU GPT config (8192 x 256, m = 16) 34M.
AUTO_EXACT_MAX_ELEMENTS = 2**24
# Projected mode's default rows per layer: on real LM-head gradients R&B weights stay within
# 0.01 of exact from 64 rows on (worst 0.0078); 128 leaves a 2x margin (worst 0.0054) at a
# cost that hardly depends on it (benchmarks/results/projection_error_cpu.md).
DEFAULT_PROJ_DIM = 128
# Projected mode's default exact rows per layer. An LM head's gradient is dominated by a few
# rows (frequent tokens); two of them sharing a bucket is most of the projection's error. On
# the demo's gradients at proj_dim 128, keeping the previous round's 64 heaviest rows exactly
# cut the worst per-round R&B weight error from 0.055 to 0.0075 (61 tasks) and from 0.29 to
# 0.034 (32 clusters), for 50% more state (benchmarks/results/projection_demo_cpu.md).
DEFAULT_EXACT_ROWS = 64
_NONFINITE = ("round", "micro-batch")
_ID_CHECKS = ("auto", "eager", "deferred")
_ON_UNTRACKED = ("raise", "warn", "ignore")


class DomainGradientTracker:
    """Per-domain gradients of chosen ``nn.Linear`` layers, from the normal backward.

    Args:
        model: any ``nn.Module``.
        num_domains: ``m >= 1``.
        modules: ``None`` = the last ``nn.Linear`` of ``model.named_modules()`` (the LM head);
            an ``nn.Linear`` of the model, a name pattern (``fnmatch``, e.g. ``"blocks.*.mlp.fc2"``)
            or a list mixing both. Every match must be an ``nn.Linear``.
        mode: ``"exact"`` keeps fp32 ``[m, K_out, K_in]`` (+ ``[m, K_out]`` bias) accumulators
            per layer; ``"projected"`` keeps fp32 ``[m, proj_dim, K_in + bias]`` (or
            ``[m, proj_dim, proj_in_dim]``) count-sketch projections of the output side per
            layer; ``"sketch"`` keeps a fp32 count-sketch ``[m, sketch_dim]`` per layer (the bias
            sketched as an extra column); ``"auto"`` (default) picks exact while
            ``m * P_tracked <= AUTO_EXACT_MAX_ELEMENTS`` (2**24), projected beyond. The
            resolved mode is :attr:`mode`.
        sketch_dim: buckets per layer in sketch mode.
        proj_dim: output-side rows per layer in projected mode.
        proj_in_dim: projected mode: also project the input side to this many columns
            (``None``: keep ``K_in``, plus one column for a bias).
        exact_rows: projected mode: also keep this many output rows of each layer exactly
            (``[m, exact_rows, K_in']`` more state): in every round after the first, the rows
            with the most gradient energy in the previous round (``Σ ‖dW_i‖²`` over its
            micro-batches and ranks). Gram estimates take those rows exactly and project only
            the rest, which removes the collisions of heavy rows (frequent tokens of an LM
            head) that dominate the projection's error; still unbiased. ``0`` turns it off; a
            row-sharded (tensor-parallel) layer does not use it.
        backend: op backend (``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``).
        seed: count-sketch hash seed (tracked layer ``l`` uses hash layer id ``l``).
        reseed: sketch and projected modes draw a fresh hash at every :meth:`reset` (round
            ``r`` hashes with ``sketch_hash.round_seed(seed, r)``, :attr:`hash_seed`), so one
            unlucky hash does not bias every round alike (default ``True``); ``False`` keeps
            ``seed`` for the whole run.
        bitwise_grad: exact and sketch modes on the torch backend (the CPU): ``True``
            (default) computes each tracked weight's gradient with the GEMM autograd runs, so
            ``param.grad`` is bit-identical to untracked training, and the per-domain products
            with a second GEMM; ``False`` forms the gradient as the sum of the per-domain
            products, equal up to fp32 rounding, which saves one ``dyᵀ x`` per tracked layer
            and micro-batch (about a third of an LM head's backward-and-forward GEMM time;
            ``rnb bench overhead`` rows ``exact-summed`` / ``sketch-summed``). Projected mode
            and the GPU kernels, which form the gradient in the same pass, ignore it.
        skip_nonfinite: ``"round"`` (default; free: a round whose statistics turned non-finite
            is reported and its update skipped) or ``"micro-batch"`` (drop just the offending
            micro-batch; a min/max reduction and a host sync per layer). ``True`` means
            ``"micro-batch"``; see the module docstring.
        id_check: when domain-id *values* are range-checked: ``"eager"`` on entry to
            :meth:`domains` (a host sync for GPU ids), ``"deferred"`` at the round's end (bad
            ids masked to ``-1`` on the device, then ``ValueError`` from the next statistics
            read), ``"auto"`` = eager for CPU ids, deferred otherwise.
        on_untracked: what to do when a ``domains()`` / ``target()`` block ends and a tracked
            layer was bypassed (its weight used without its forward, e.g. by a fused linear
            cross-entropy): ``"raise"`` ``RuntimeError`` (default), ``"warn"`` (a
            ``RuntimeWarning``, counted in ``untracked_micro_batches``) or ``"ignore"``.
        dp_group: the process group over which ranks see *different* data (``ProcessGroup`` or
            a 1-D ``DeviceMesh``). Default: every rank, or none when a tracked weight is
            row-sharded over all ranks (pure tensor parallelism); with tensor parallelism over
            part of the ranks it must be given.

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
        mode: str = "auto",
        sketch_dim: int = 8192,
        backend: str = "auto",
        seed: int = 0,
        *,
        proj_dim: int = DEFAULT_PROJ_DIM,
        proj_in_dim: int | None = None,
        exact_rows: int = DEFAULT_EXACT_ROWS,
        skip_nonfinite: bool | str = "round",
        id_check: str = "auto",
        on_untracked: str = "raise",
        dp_group: Any = None,
        reseed: bool = True,
        bitwise_grad: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(num_domains, bool) or not isinstance(num_domains, int):
            raise TypeError(f"num_domains must be an int, got {type(num_domains).__name__}")
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        if not isinstance(mode, str) or mode not in (*_MODES, "auto"):
            raise ValueError(f"mode must be 'auto' or one of {_MODES}, got {mode!r}")
        for name, v in (("sketch_dim", sketch_dim), ("proj_dim", proj_dim)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if proj_in_dim is not None:
            if isinstance(proj_in_dim, bool) or not isinstance(proj_in_dim, int):
                raise TypeError(
                    f"proj_in_dim must be None or an int, got {type(proj_in_dim).__name__}"
                )
            if proj_in_dim < 1:
                raise ValueError(f"proj_in_dim must be >= 1, got {proj_in_dim}")
        if isinstance(exact_rows, bool) or not isinstance(exact_rows, int):
            raise TypeError(f"exact_rows must be an int, got {type(exact_rows).__name__}")
        if exact_rows < 0:
            raise ValueError(f"exact_rows must be >= 0, got {exact_rows}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2**32), got {seed}")
        if not isinstance(reseed, bool):
            raise TypeError(f"reseed must be a bool, got {type(reseed).__name__}")
        if not isinstance(bitwise_grad, bool):
            raise TypeError(f"bitwise_grad must be a bool, got {type(bitwise_grad).__name__}")
        if skip_nonfinite is True:
            skip_nonfinite = "micro-batch"
        if skip_nonfinite not in _NONFINITE:
            raise ValueError(
                f"skip_nonfinite must be one of {_NONFINITE} or True, got {skip_nonfinite!r}"
            )
        if id_check not in _ID_CHECKS:
            raise ValueError(f"id_check must be one of {_ID_CHECKS}, got {id_check!r}")
        if on_untracked not in _ON_UNTRACKED:
            raise ValueError(f"on_untracked must be one of {_ON_UNTRACKED}, got {on_untracked!r}")
        if hasattr(dp_group, "get_group"):  # a 1-D DeviceMesh
            dp_group = dp_group.get_group()
        if dp_group is not None and not (
            torch.distributed.is_available()
            and isinstance(dp_group, torch.distributed.ProcessGroup)
        ):
            raise TypeError(
                "dp_group must be None, a ProcessGroup or a 1-D DeviceMesh, got "
                f"{type(dp_group).__name__}"
            )
        named = self._resolve_modules(model, modules)
        for name, mod in named:
            if is_tracked(mod):
                raise ValueError(f"modules: {mod!r} is already tracked by another tracker")
            if not mod.weight.requires_grad:
                logger.warning("%s.weight does not require grad: nothing will be tracked", name)
        self.num_domains = num_domains
        self.requested_mode = mode
        self.mode = resolve_mode(mode, num_domains, named)
        if mode == "auto":
            logger.info(
                "mode='auto' -> %r: m * P_tracked = %d x %d = %d fp32 elements %s %d "
                "(AUTO_EXACT_MAX_ELEMENTS)",
                self.mode, num_domains, _num_params(named), num_domains * _num_params(named),
                "<=" if self.mode == "exact" else ">", AUTO_EXACT_MAX_ELEMENTS,
            )  # fmt: skip
        self.sketch_dim = sketch_dim
        self.proj_dim = proj_dim
        self.proj_in_dim = proj_in_dim
        self.exact_rows = exact_rows
        self.backend = backend
        self.seed = seed
        self.reseed = reseed
        self.bitwise_grad = bitwise_grad
        self._round = 0  # resets so far: picks the round's hash seed
        self.skip_nonfinite = skip_nonfinite
        self.id_check = id_check
        self.on_untracked = on_untracked
        self.dp_group = dp_group
        self.untracked_micro_batches = 0  # blocks with a bypassed layer (on_untracked="warn")
        self.nonfinite_skips = 0  # micro-batches dropped (skip_nonfinite="micro-batch")
        self.nonfinite_rounds = 0  # statistics reads that came out non-finite ("round")
        self._model_params = [p for p in model.parameters()]
        self._slots = [Slot(self, name, mod, i) for i, (name, mod) in enumerate(named)]
        self.device = self._slots[0].device
        self._bad_ids = torch.zeros((), dtype=torch.int64, device=self.device)
        self._counts = torch.zeros(num_domains, dtype=torch.float64, device=self.device)
        self._target_count = torch.zeros((), dtype=torch.float64, device=self.device)
        self._active: Context | None = None
        self._anchor = torch.zeros((), requires_grad=True)
        self._synced = False
        self._removed = False
        for slot in self._slots:
            slot.module.forward = make_forward(self, slot)
        # Evidence for the bypass check (see the module docstring): the model's forward ran (a
        # module hook), and a tracked weight's .grad changed during the block (_begin/_release).
        self._hooks = [model.register_forward_pre_hook(self._on_model_forward)]
        logger.debug(
            "tracking %s in %s mode (m=%d, P=%d)",
            self.module_names,
            self.mode,
            num_domains,
            self.num_params,
        )

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _resolve_modules(model: nn.Module, modules) -> list[tuple[str, nn.Linear]]:
        # Names are taken without wrapper prefixes (DDP's "module.", torch.compile's
        # "_orig_mod."), so patterns and saved states work with and without the wrappers.
        all_named = [(canonical_name(n), m) for n, m in model.named_modules()]
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

    def memory_bytes(self) -> int:
        """Bytes of statistics buffers this rank holds (all tracked layers, domain + target)."""
        return sum(s.memory_bytes() for s in self._slots)

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this tracker was removed; create a new one")

    # ------------------------------------------------------------------ bypass check
    def _on_model_forward(self, module, args) -> None:
        # Skipped while compiling: reading the per-micro-batch context would add guards.
        if torch.compiler.is_compiling():
            return
        ctx = self._active
        if ctx is not None and torch.is_grad_enabled():
            ctx.model_ran = True

    def _check_bypass(self, ctx: Context) -> None:
        """End of a block: no tracked layer may have been used without its statistics."""
        if self.on_untracked == "ignore" or ctx.bad or ctx.anchor_only:
            return
        bypassed, unreached = [], []
        for slot in self._slots:
            i = slot.index
            # A frozen weight gets no gradient, so there is nothing to track (its forward is
            # the plain one): not a bypass.
            if i in ctx.accumulated or not slot.module.weight.requires_grad:
                continue
            if i in ctx.weight_grads or (ctx.model_ran and i not in ctx.forwarded):
                bypassed.append(slot.name)
            elif i in ctx.forwarded:
                unreached.append(slot.name)
        block = "tracker.domains()" if ctx.kind == DOMAIN else "tracker.target()"
        if unreached:
            msg = (
                f"tracked layer(s) {unreached} ran their forward inside {block} but no backward "
                "reached them inside the block: run loss.backward() inside the `with` block, or "
                "these statistics are lost"
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=4)
            logger.warning(msg)
        if not bypassed:
            return
        name = bypassed[0]
        msg = (
            f"tracked layer(s) {bypassed}: inside {block} the weight was used (the model ran, "
            f"or {name}.weight received a gradient) but {name}.forward was never called, so the "
            "tracker recorded nothing for it and its per-domain statistics would silently be "
            "zero. The usual cause is a fused linear cross-entropy that reads "
            f"{name}.weight directly, e.g. Liger-Kernel's LigerFusedLinearCrossEntropyLoss or "
            "apply_liger_kernel_to_*(fused_linear_cross_entropy=True), or a chunked loss of "
            "HF/torchtune. Compute the loss with rnb_kernels.integrations.fused_ce."
            f"fused_linear_cross_entropy(hidden, {name}.weight, targets, tracker=tracker) (or "
            "tracker.fused_cross_entropy(hidden, targets)), which collects the statistics in "
            "its own backward, or switch the fused loss off. (on_untracked='warn' turns this "
            "error into a warning.)"
        )
        if self.on_untracked == "raise":
            raise RuntimeError(msg)
        self.untracked_micro_batches += 1
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        logger.warning(msg)

    # ------------------------------------------------------------------ contexts
    def _begin(self, ctx: Context) -> None:
        self._check_live()
        if self._active is not None:
            raise RuntimeError(
                f"a {self._active.kind} context is already active; contexts do not nest"
            )
        if self._synced and rdist.world_size() > 1:
            # Buffers hold the global sum on every rank: keep 1/W of it here (W = the ranks
            # the sum was taken over) so the next all-reduce adds only new contributions once.
            dp = float(self._dp()[1])
            for slot in self._slots:
                w = dp * (slot.tp_size if self._sums_over_tp(slot) else 1)
                for group in (DOMAIN, TARGET):
                    for t in slot.tensors(group):
                        t.div_(w)
                if slot.energy is not None:
                    slot.energy.div_(dp)
            self._counts.div_(dp)
            self._target_count.div_(dp)
        self._synced = False
        self._active = ctx
        # Whether a backward reached a tracked weight in the block shows in its .grad: a new
        # tensor or an in-place accumulation (version bump). This also covers FSDP2, which
        # writes the reduce-scattered gradient into the sharded parameter's .grad, and needs
        # no tensor hooks (whose Python state would outlive the block on the parameters).
        ctx.grads_before = [
            (slot.index, w, w.grad, None if w.grad is None else w.grad._version)
            for slot in self._slots
            for w in (slot.module.weight,)
        ]

    def _release(self) -> None:
        """Close the active block: note which tracked weights got a gradient, clear it."""
        ctx = self._active
        if ctx is not None:
            for index, w, g0, v0 in ctx.grads_before:
                g = w.grad
                if g is not g0 or (g is not None and g._version != v0):
                    ctx.weight_grads.add(index)
            ctx.grads_before = []
        self._active = None

    def _end_micro_batch(self, ctx: Context, stacklevel: int = 4) -> None:
        """``stacklevel``: frames from here to the user's code, so the warning points there
        (4 from ``domains()``: its generator and contextlib's ``__exit__`` in between)."""
        if ctx.bad:
            self.nonfinite_skips += 1
            msg = (
                f"non-finite activations/gradients in a tracked layer: {ctx.kind} statistics of "
                f"this micro-batch skipped ({self.nonfinite_skips} so far)"
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)
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
    def domains(self, domain_ids, grad_scale=None, *, validated: bool = False) -> Iterator[None]:
        """Accumulate per-domain gradients of every backward run inside the block.

        Args:
            domain_ids: integer tensor ``[B]`` (one domain per sample, broadcast over the
                sequence) or ``[B, T]`` (one per token); ``-1`` = ignore. Rows of a tracked
                layer's input are taken batch-first (``[B, ..., K_in]``).
            grad_scale: the loss scale the backward runs under (a float or a ``GradScaler``,
                whose ``get_scale()`` is read on entry); statistics are stored unscaled.
            validated: ``domain_ids`` already came out of :meth:`validate_ids` (the Balancer
                validates once per micro-batch and passes them on).

        One block per micro-batch: samples are counted once, on exit, if a tracked layer's
        backward ran inside and no non-finite value was met.

        Example:
            >>> with tracker.domains(batch_domain_ids):  # doctest: +SKIP
            ...     loss.backward()
        """
        self._check_live()
        ids = domain_ids if validated else self.validate_ids(domain_ids)
        scale = self._scale_value(grad_scale)
        counts = per_sample_counts(ids, self.num_domains)
        ctx = Context(DOMAIN, ids, scale, anchor_only=False)
        self._begin(ctx)
        try:
            yield
        finally:
            self._release()
        if ctx.seen and not ctx.bad:
            self._counts += counts.to(self._counts.device)
        self._end_micro_batch(ctx)
        self._check_bypass(ctx)

    def validate_ids(self, domain_ids: Any, name: str = "domain_ids") -> torch.Tensor:
        """Validate one micro-batch's ids as :meth:`domains` does (``id_check``); int64 result.

        Deferred checking masks out-of-range ids to ``-1`` and counts them on the device.
        """
        on_cpu = not isinstance(domain_ids, torch.Tensor) or domain_ids.device.type == "cpu"
        eager = self.id_check == "eager" or (self.id_check == "auto" and on_cpu)
        ids = validate_domain_ids(domain_ids, self.num_domains, name, check_values=eager)
        if not eager:
            bad = (ids < -1) | (ids >= self.num_domains)
            self._bad_ids += bad.sum().to(self._bad_ids.device, non_blocking=True)
            ids = ids.masked_fill(bad, -1)
        return ids

    def _target_ctx(self, mask, grad_scale, anchor_only: bool) -> tuple[Context, Any]:
        ids = None if mask is None else validate_domain_ids(mask, 1, "mask", mask=True)
        scale = self._scale_value(grad_scale)
        n = None if ids is None else float(per_sample_counts(ids, 1)[0])
        return Context(TARGET, ids, scale, anchor_only), n

    def _end_target(self, ctx: Context, n: float | None, stacklevel: int = 5) -> None:
        if ctx.seen and not ctx.bad:
            self._target_count += float(ctx.batch if n is None else n)
        self._end_micro_batch(ctx, stacklevel)

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
            self._release()
            for p, g in saved:
                p.grad = g
        self._end_target(ctx, n)
        self._check_bypass(ctx)

    def record_target(
        self, loss: torch.Tensor, mask=None, grad_scale=None, retain_graph: bool = False
    ) -> None:
        """Record ``d loss / d(tracked params)`` into the target row; no ``param.grad`` changes.

        Runs ``torch.autograd.grad`` only down to the tracked layers (through a private anchor
        tensor), so the rest of the model's backward is skipped, and forms no weight gradient
        for them either (no ``dyᵀ x`` GEMM: only the statistics are kept).

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
            self._release()
        if not ctx.seen and not ctx.bad:
            raise ValueError(
                "loss does not depend on any tracked module (a fused linear cross-entropy that "
                "reads the head's weight directly bypasses it: use "
                "rnb_kernels.integrations.fused_ce.fused_linear_cross_entropy(..., tracker=))"
            )
        self._end_target(ctx, n, stacklevel=4)

    def fused_cross_entropy(
        self, hidden: torch.Tensor, targets: torch.Tensor, module: Any = None, **kwargs: Any
    ) -> torch.Tensor:
        """Cross-entropy of a tracked head on ``hidden`` without materialising the logits, its
        statistics collected in the same backward (no extra pass).

        :func:`rnb_kernels.integrations.fused_ce.fused_linear_cross_entropy` with this tracker
        and the head's weight and bias; use it where a fused loss (e.g. Liger-Kernel's) would
        read ``lm_head.weight`` directly and bypass the tracked forward.

        Args:
            hidden: ``[..., K_in]`` inputs of the head (e.g. ``[B, T, H]``).
            targets: int ``[...]`` (``hidden``'s leading shape).
            module: the tracked layer (module or name); default: the last tracked one (the
                LM head with ``modules=None``).
            **kwargs: more :func:`~rnb_kernels.integrations.fused_ce.fused_linear_cross_entropy`
                arguments (``chunk_size``, ``ignore_index``, ``reduction``, ``domain_ids``...).

        Example:
            >>> with tracker.domains(ids):  # doctest: +SKIP
            ...     tracker.fused_cross_entropy(model.body(x), targets).backward()
        """
        from ..integrations.fused_ce import fused_linear_cross_entropy

        self._check_live()
        if module is None:
            slot = self._slots[-1]
        else:
            hits = [s for s in self._slots if s.module is module or s.name == module]
            if not hits:
                raise ValueError(f"module: {module!r} is not tracked by this tracker")
            slot = hits[0]
        mod = slot.module
        return fused_linear_cross_entropy(
            hidden, mod.weight, targets, tracker=self, bias=mod.bias, module=mod, **kwargs
        )

    # ------------------------------------------------------------------ statistics
    def sync(self) -> None:
        """All-reduce buffers and counts over ranks (collective; once per accumulation round).

        Called by every statistics accessor; a no-op without ``torch.distributed``.
        """
        self._check_live()
        self._raise_deferred_id_errors()
        if self._synced or not rdist.is_initialized() or rdist.world_size() == 1:
            return
        dp_group, dp_size = self._dp()
        tensors: list[torch.Tensor] = [self._counts, self._target_count.view(1)]
        over_tp: list[tuple[Any, list[torch.Tensor]]] = []
        for slot in self._slots:
            slot.ensure_buffers()
            for group in (DOMAIN, TARGET):
                slot.normalize_scale(group)
                tensors.extend(slot.tensors(group))
                if self._sums_over_tp(slot):
                    over_tp.append((slot.tp_group, slot.tensors(group)))
            if slot.energy is not None:
                tensors.append(slot.energy)
        if dp_size > 1:
            rdist.all_reduce_sum_(tensors, group=dp_group)
        # Shard sketches are hashed by global row: their sum over the group is the full sketch.
        for group, ts in over_tp:
            rdist.all_reduce_sum_(ts, group=group)
        for slot in self._slots:
            for group in (DOMAIN, TARGET):
                slot.dirty[group] = True
        self._synced = True

    def _sums_over_tp(self, slot: Slot) -> bool:
        """A sharded sketch is summed over its group at sync; a sharded exact slot keeps its
        rows and only its partial Grams are summed (:meth:`_tp_sum`)."""
        return slot.sharded and self.mode != "exact"

    def _dp(self) -> tuple[Any, int]:
        """``(group, size)`` of the ranks holding different data (``group`` None = all)."""
        if not rdist.is_initialized():
            return None, 1
        if self.dp_group is not None:
            return self.dp_group, rdist.world_size(self.dp_group)
        tp = {s.tp_size for s in self._slots if s.sharded}
        if not tp:
            return None, rdist.world_size()
        if tp == {rdist.world_size()}:
            return None, 1
        raise ValueError(
            f"dp_group: tracked weights are row-sharded over {sorted(tp)} of "
            f"{rdist.world_size()} ranks; pass DomainGradientTracker(..., dp_group=...) (the "
            "data-parallel group, e.g. mesh['dp'])"
        )

    def _tp_sum(self, slot: Slot, value: torch.Tensor) -> torch.Tensor:
        """Sum a sharded exact slot's partial statistic over its tensor-parallel group."""
        if slot.sharded and self.mode == "exact" and slot.tp_size > 1:
            rdist.all_reduce_sum_([value], group=slot.tp_group)
        return value

    def _raise_deferred_id_errors(self) -> None:
        # The round's one host read of the deferred id check.
        n = int(self._bad_ids)
        if n:
            self._bad_ids.zero_()
            raise ValueError(
                f"domain_ids: {n} id(s) outside [-1, num_domains={self.num_domains}) were passed "
                "to domains() this round; they were ignored (treated as -1), the statistics "
                "hold only the valid ids"
            )

    def _checked(self, value: torch.Tensor, what: str) -> torch.Tensor:
        """Count and report a non-finite statistic (a NaN/Inf reached the buffers)."""
        if not bool(torch.isfinite(value).all()):
            self.nonfinite_rounds += 1
            msg = (
                f"non-finite {what}: a NaN/Inf gradient reached the tracked statistics this "
                f"round; mixers skip such an update ({self.nonfinite_rounds} so far)"
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            logger.warning(msg)
        return value

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
        per layer block, summed). Projected and sketch modes: sum over layers of the Grams of
        the projections / sketches, an unbiased estimate.
        """
        self.sync()
        m = self.num_domains
        out = torch.zeros(m, m, dtype=torch.float64, device=self.device)
        for slot in self._slots:
            part = torch.zeros(m, m, dtype=torch.float64, device=slot.device)
            for rows in slot.gram_parts(DOMAIN):
                part += gram(rows, backend=self.backend)
            s = slot.scale[DOMAIN]
            out += self._tp_sum(slot, part / (s * s)).to(self.device)
        return self._checked(out, "gram")

    def gram_vector(self, coeffs: Any) -> torch.Tensor:
        """float64 ``[m]``: ``G c`` for ``c = coeffs`` ``[m]``, without forming ``G``.

        ``G c = A (Aᵀ c)`` over the ``[m, P]`` statistics: ``~2·m·P`` work in one streaming
        pass instead of the Gram's ``m²·P``. This is all R&B needs each round (``G p_eval``
        with ``p_eval`` divided by the counts); :meth:`gram` stays for diagnostics.
        """
        self.sync()
        m = self.num_domains
        c = torch.as_tensor(coeffs, dtype=torch.float64)
        if c.shape != (m,):
            raise ValueError(f"coeffs must have shape ({m},), got {tuple(c.shape)}")
        out = torch.zeros(m, dtype=torch.float64, device=self.device)
        for slot in self._slots:
            s = slot.scale[DOMAIN]
            cs = c.to(slot.device)
            part = torch.zeros(m, dtype=torch.float64, device=slot.device)
            for rows in slot.gram_parts(DOMAIN):
                part += gram_matvec(rows, cs)
            out += self._tp_sum(slot, part / (s * s)).to(self.device)
        return self._checked(out, "gram vector")

    def domain_grads(self) -> torch.Tensor:
        """Exact mode: float32 ``[m, P_tracked]`` per-domain gradient sums (weights then bias of
        each tracked layer, flattened row-major, layers in :attr:`module_names` order)."""
        if self.mode != "exact":
            raise RuntimeError(
                f"domain_grads() needs mode='exact'; {self.mode} mode keeps no [m, P]"
            )
        self._no_row_shards("domain_grads()")
        self.sync()
        return torch.cat([s.rows(DOMAIN).to(self.device) for s in self._slots], 1)

    def domain_sketches(self) -> torch.Tensor:
        """Sketch mode: float32 ``[m, L * sketch_dim]`` (per-layer sketches side by side)."""
        if self.mode != "sketch":
            raise RuntimeError("domain_sketches() needs mode='sketch'")
        self.sync()
        return torch.cat([s.rows(DOMAIN).to(self.device) for s in self._slots], 1)

    def domain_projections(self) -> torch.Tensor:
        """Projected mode: float32 ``[m, Σ_layers proj_dim * K_in']`` -- each layer's
        ``[proj_dim, K_in']`` state flattened row-major (``K_in' = K_in + bias``, or
        ``proj_in_dim``), layers side by side in :attr:`module_names` order. Inner products of
        rows are unbiased estimates of those of :meth:`domain_grads`' rows."""
        if self.mode != "projected":
            raise RuntimeError(f"domain_projections() needs mode='projected', not {self.mode!r}")
        self.sync()
        return torch.cat([s.rows(DOMAIN).to(self.device) for s in self._slots], 1)

    def target_grad(self) -> torch.Tensor:
        """The target row: float32 ``[P_tracked]`` (exact), ``[Σ_layers proj_dim * K_in']``
        (projected) or ``[L * sketch_dim]`` (sketch)."""
        if self.mode == "exact":
            self._no_row_shards("target_grad()")
        self.sync()
        return torch.cat([s.rows(TARGET).to(self.device) for s in self._slots], 1)[0]

    def _no_row_shards(self, what: str) -> None:
        names = [s.name for s in self._slots if s.sharded]
        if names:
            raise RuntimeError(
                f"{what}: tracked layers {names} are row-sharded (tensor parallel), each rank "
                "holds only its rows; use gram(), gram_vector() or target_alignment()"
            )

    def target_alignment(self) -> torch.Tensor:
        """float64 ``[m]``: ``<g_i, g_target>`` of the sums (divide by ``counts()`` and
        ``target_count()`` for means). Projected / sketch mode: unbiased estimate."""
        self.sync()
        out = torch.zeros(self.num_domains, dtype=torch.float64, device=self.device)
        for slot in self._slots:
            dom, tgt = slot.gram_parts(DOMAIN), slot.gram_parts(TARGET)
            s = slot.scale[DOMAIN] * slot.scale[TARGET]
            part = torch.zeros(self.num_domains, dtype=torch.float64, device=slot.device)
            for a, b in zip(dom, tgt):
                part += gram(a, b[0], backend=self.backend)
            out += self._tp_sum(slot, part / s).to(self.device)
        return self._checked(out, "target alignment")

    @property
    def hash_seed(self) -> int:
        """The hash seed of the current round (``seed`` when ``reseed=False``)."""
        return round_seed(self.seed, self._round) if self.reseed else self.seed

    def reset(self) -> None:
        """Zero every accumulator, sketch, target row and count (start a new round; with
        ``reseed``, sketch and projected modes hash the new round with a fresh seed)."""
        self._check_live()
        self._sync_energy()
        self._round += 1
        for slot in self._slots:
            slot.choose_heavy()
            for group in (DOMAIN, TARGET):
                for t in slot.tensors(group):
                    t.zero_()
                slot.scale[group] = 1.0
                slot.dirty[group] = False
        self._counts.zero_()
        self._target_count.zero_()
        self._bad_ids.zero_()
        self._synced = False

    def _sync_energy(self) -> None:
        """Sum the rows' energies over the data-parallel ranks if no statistics read did, so
        every rank keeps the same exact rows next round (collective; only with exact rows)."""
        energies = [s.energy for s in self._slots if s.energy is not None]
        if self._synced or not energies or not rdist.is_initialized():
            return
        dp_group, dp_size = self._dp()
        if dp_size > 1:
            rdist.all_reduce_sum_(energies, group=dp_group)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-exactly (buffers are cloned)."""
        self._check_live()
        for s in self._slots:
            s.ensure_buffers()
        return {
            "version": 3,
            "mode": self.mode,
            "num_domains": self.num_domains,
            "sketch_dim": self.sketch_dim,
            "proj_dim": self.proj_dim,
            "proj_in_dim": self.proj_in_dim,
            "exact_rows": self.exact_rows,
            "seed": self.seed,
            "reseed": self.reseed,
            "round": self._round,
            "modules": self.module_names,
            "counts": self._counts.clone(),
            "target_count": self._target_count.clone(),
            "nonfinite_skips": self.nonfinite_skips,
            "nonfinite_rounds": self.nonfinite_rounds,
            "synced": self._synced,
            "slots": [
                {
                    "buffers": {g: {k: t.clone() for k, t in s.buf[g].items()} for g in s.buf},
                    "scale": dict(s.scale),
                    "dirty": dict(s.dirty),
                    "heavy": None if s.heavy is None else s.heavy.clone(),
                    "energy": None if s.energy is None else s.energy.clone(),
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
        # Only the settings that shape this mode's buffers or hash must match.
        keys = ["mode", "num_domains", "seed", "modules"]
        keys += {
            "sketch": ["sketch_dim"],
            "projected": ["proj_dim", "proj_in_dim", "exact_rows"],
        }.get(self.mode, [])
        mine = tuple(self.module_names if k == "modules" else getattr(self, k) for k in keys)
        # States saved before exact rows existed kept none.
        theirs = tuple(state.get(k, 0 if k == "exact_rows" else "<missing>") for k in keys)
        if mine != theirs:
            raise ValueError(f"state was saved by a tracker configured as {theirs}, not {mine}")
        slots = state["slots"]
        for s in self._slots:
            s.ensure_buffers()
        if len(slots) != len(self._slots):
            raise ValueError(f"state has {len(slots)} slots, this tracker {len(self._slots)}")
        for s, st in zip(self._slots, slots):
            for g in s.buf:
                for k, t in s.buf[g].items():
                    src = st["buffers"][g].get(k)
                    if src is None:
                        raise ValueError(f"state has no buffer {g}/{k} for {s.name}")
                    if tuple(src.shape) != tuple(t.shape):
                        raise ValueError(
                            f"state: buffer {g}/{k} of {s.name} has shape {tuple(src.shape)}, "
                            f"expected {tuple(t.shape)}"
                        )
        for s, st in zip(self._slots, slots):
            heavy, energy = st.get("heavy"), st.get("energy")
            if (
                heavy is not None
                and s.exact_rows
                and (
                    tuple(heavy.shape) != (s.exact_rows,)
                    or bool((heavy < 0).any() | (heavy >= s.local_rows).any())
                )
            ):
                raise ValueError(
                    f"state: heavy rows of {s.name} must be {s.exact_rows} indices in "
                    f"[0, {s.local_rows}), got shape {tuple(heavy.shape)}"
                )
            if energy is not None and s.energy is not None and energy.shape != s.energy.shape:
                raise ValueError(
                    f"state: energy of {s.name} has shape {tuple(energy.shape)}, expected "
                    f"{tuple(s.energy.shape)}"
                )
        if tuple(state["counts"].shape) != (self.num_domains,):
            raise ValueError(f"state: counts must have shape ({self.num_domains},)")
        for s, st in zip(self._slots, slots):
            for g in s.buf:
                for k, t in s.buf[g].items():
                    t.copy_(st["buffers"][g][k])
            s.scale = dict(st["scale"])
            s.dirty = dict(st["dirty"])
            heavy, energy = st.get("heavy"), st.get("energy")
            s.heavy = None if heavy is None or not s.exact_rows else heavy.to(s.device).clone()
            if s.energy is not None:
                if energy is None:
                    s.energy.zero_()
                else:
                    s.energy.copy_(energy)
        self._counts.copy_(state["counts"])
        self._target_count.copy_(state["target_count"])
        self.nonfinite_skips = int(state["nonfinite_skips"])
        self.nonfinite_rounds = int(state.get("nonfinite_rounds", 0))
        self._synced = bool(state["synced"])
        if state.get("reseed", False) != self.reseed:
            logger.warning(
                "state was saved with reseed=%s, this tracker has reseed=%s: the rest of the "
                "round is hashed with this tracker's setting", state.get("reseed", False),
                self.reseed,
            )  # fmt: skip
        self._round = int(state.get("round", 0))

    # ------------------------------------------------------------------ teardown
    def remove(self) -> None:
        """Restore every tracked module exactly (its ``forward``); the tracker becomes unusable."""
        if self._removed:
            return
        for h in self._hooks:
            h.remove()
        for slot in self._slots:
            SLOTS.pop(slot.key, None)
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


def _num_params(named: Sequence[tuple[str, nn.Linear]]) -> int:
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for _, m in named)


def resolve_mode(mode: str, num_domains: int, named: Sequence[tuple[str, nn.Linear]]) -> str:
    """The mode ``mode="auto"`` stands for: ``"exact"`` while the exact accumulators hold at
    most :data:`AUTO_EXACT_MAX_ELEMENTS` fp32 elements (``num_domains * P_tracked``), else
    ``"projected"``. Any other mode is returned as is.

    Example:
        >>> head = [("lm_head", nn.Linear(256, 8192, bias=False))]
        >>> resolve_mode("auto", 4, head), resolve_mode("auto", 16, head)
        ('exact', 'projected')
    """
    if mode != "auto":
        return mode
    return "exact" if num_domains * _num_params(named) <= AUTO_EXACT_MAX_ELEMENTS else "projected"
