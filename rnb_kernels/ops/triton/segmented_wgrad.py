"""Triton ``segmented_wgrad``: the layer's weight-gradient GEMM that also writes per-domain shares.

Design (docs/design.md, "segmented_wgrad")
------------------------------
* **Grouping.** Rows are grouped by a stable argsort of the ids (``-1`` rows first) plus
  per-id offsets (:func:`rnb_kernels.ops.grouping.group_rows`); the kernel *gathers* rows of ``x`` and
  ``dy`` through that permutation, so no ``[N, K]`` tensor is ever copied. Cost: a radix sort,
  a bincount and a cumsum over the ``N`` ids, no host sync.
* **Ownership, no atomics.** Program ``(pid_m, pid_n)`` owns output tile
  ``[BLOCK_M (K_out), BLOCK_N (K_in)]`` of ``dW`` *and of every domain's accumulator*. It walks
  the N dimension segment by segment, keeps the segment's partial product in fp32 registers,
  and at each domain boundary read-modify-writes ``acc[d]``'s tile (no other program touches
  it) and adds the segment into the running ``dW`` tile. FLOPs equal one ``dyᵀ x``; extra
  traffic is one fp32 RMW of the tile per present domain. Empty domains cost nothing.
* **Padding cost.** Each segment is processed in ``BLOCK_K``-row steps, so the GEMM does at most
  ``N / BLOCK_K + (#present segments)`` steps instead of ``N / BLOCK_K``. That overhead only
  matters when segments are tiny, and then the accumulator RMW dominates anyway.
* **Precision.** 16-bit inputs use tensor cores with fp32 accumulation; fp32 inputs use
  ``input_precision="ieee"`` so neither ``dW`` nor the accumulators silently become TF32.
* **No split-K.** Parallelism is over output tiles only: ``K_out x K_in`` of a tracked layer
  (e.g. 50257 x 768 for a GPT-2 head) gives thousands of tiles. Small layers with huge N
  would want split-K with atomics into ``acc``; not needed for the layers this tracks.

The same kernel with ``SKETCH=True`` is the count-sketch variant (``domain_sketch.py``): the
main loop is shared so the two cannot drift; only the flush differs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import sketch_hash as H
from ..grouping import group_rows
from ._common import (
    INTERPRET_SEGMENTED,
    cdiv,
    device_guard,
    dot_precision,
    interpreter_upcast,
    interpreting,
    runnable,
)


def _gpu_configs() -> list[triton.Config]:
    # H100/H200. Two fp32 [BLOCK_M, BLOCK_N] tiles (segment and running dW) live in registers
    # next to the gather addresses, so per-thread tile share is what limits the config:
    # compiled offline for sm_90 (bf16), 128x64 / 64x128 with 8 warps and 64x64 with 4 warps
    # need <= 250 registers and no spills; 128x128 with 8 warps spills ~200 B/thread (exact)
    # and ~860 B (sketch) and is kept only for the autotuner to rule on.
    shapes = [
        (128, 64, 64, 8, 3),
        (128, 64, 64, 8, 4),
        (64, 128, 64, 8, 3),
        (64, 128, 64, 8, 4),
        (64, 64, 64, 4, 3),
        (64, 64, 32, 4, 4),
        (128, 128, 64, 8, 3),
    ]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_warps=w,
            num_stages=s,
        )
        for bm, bn, bk, w, s in shapes
    ]


@triton.jit(do_not_specialize=["SKETCH_DIM", "KEY_BASE", "ROW_OFFSET"])
def _segmented_wgrad_kernel(
    x_ptr,  # [N, K_in]
    dy_ptr,  # [N, K_out]
    order_ptr,  # [N] rows in domain-grouped order
    bounds_ptr,  # [NUM_SEGS + 1] segment offsets into order; segment 0 = id -1
    dw_ptr,  # [K_out, K_in] contiguous, x.dtype
    out_ptr,  # exact: acc fp32 [m, K_out, K_in]; sketch: fp32 [m, SKETCH_DIM]
    K_OUT,
    K_IN,
    NUM_SEGS,
    stride_xn,
    stride_xk,
    stride_dyn,
    stride_dyk,
    SKETCH_DIM,
    KEY_BASE,  # int32 bit pattern of sketch_hash.key_base(seed, layer)
    ROW_OFFSET,  # int32 bit pattern of the global index of row 0 (row-sharded weights)
    ROW_MUL: tl.constexpr,  # the hash multipliers, from rnb_kernels.ops.sketch_hash
    COL_MUL: tl.constexpr,
    FMIX1: tl.constexpr,
    FMIX2: tl.constexpr,
    SKETCH: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row-tiles share each column strip of x while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(K_OUT, BLOCK_M)
    num_pid_n = tl.cdiv(K_IN, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output features i (rows of dW)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input features j (columns of dW)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < K_OUT
    mask_n = offs_n < K_IN
    tile_mask = mask_m[:, None] & mask_n[None, :]
    # Offsets inside one [K_out, K_in] matrix stay int32 unless it has 2**31+ elements (the
    # per-domain base is int64 regardless): fewer registers in the flush epilogue.
    if WIDE:
        tile_offs = offs_m.to(tl.int64)[:, None] * K_IN + offs_n[None, :]
    else:
        tile_offs = offs_m[:, None] * K_IN + offs_n[None, :]

    if SKETCH:
        # The count-sketch hash of rnb_kernels.ops.sketch_hash, in wrapping uint32 arithmetic.
        # Its row half depends on i only and its column mix on j only: computed once here.
        # i is the global row, so the sketches of a row-sharded weight's shards add up.
        glob_m = offs_m.to(tl.uint32) + ROW_OFFSET.to(tl.uint32, bitcast=True)
        row_key = glob_m * ROW_MUL ^ KEY_BASE.to(tl.uint32, bitcast=True)
        row_key ^= row_key >> 16
        row_key *= FMIX1
        row_key ^= row_key >> 13
        row_key *= FMIX2
        row_key ^= row_key >> 16
        col_mix = offs_n.to(tl.uint32) * COL_MUL
        sketch_k = SKETCH_DIM.to(tl.uint32)

    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    lo = tl.load(bounds_ptr)
    for s in range(0, NUM_SEGS):
        hi = tl.load(bounds_ptr + s + 1)
        seg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_K):
            idx = n0 + offs_k
            valid = idx < hi
            rows = tl.load(order_ptr + idx, mask=valid, other=0).to(tl.int64)
            a = tl.load(
                dy_ptr + rows[:, None] * stride_dyn + offs_m[None, :] * stride_dyk,
                mask=valid[:, None] & mask_m[None, :],
                other=0.0,
            )
            b = tl.load(
                x_ptr + rows[:, None] * stride_xn + offs_n[None, :] * stride_xk,
                mask=valid[:, None] & mask_n[None, :],
                other=0.0,
            )
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            seg = tl.dot(tl.trans(a), b, seg, input_precision=PRECISION)
        if hi > lo:
            if s > 0:
                d = tl.cast(s, tl.int64) - 1
                if SKETCH:
                    h = row_key[:, None] + col_mix[None, :]
                    h ^= h >> 16
                    h *= FMIX1
                    h ^= h >> 13
                    h *= FMIX2
                    h ^= h >> 16
                    bucket = ((h & 0x7FFFFFFF) % sketch_k).to(tl.int64)
                    signed = tl.where((h >> 31) == 0, seg, -seg)
                    tl.atomic_add(
                        out_ptr + d * SKETCH_DIM + bucket, signed, mask=tile_mask, sem="relaxed"
                    )
                else:
                    acc_ptrs = out_ptr + d * K_OUT * K_IN + tile_offs
                    cur = tl.load(acc_ptrs, mask=tile_mask, other=0.0)
                    tl.store(acc_ptrs, cur + seg, mask=tile_mask)
            dw += seg
        lo = hi

    tl.store(dw_ptr + tile_offs, dw.to(dw_ptr.dtype.element_ty), mask=tile_mask)


# Autotuning an op that accumulates in place must not add the tile sums once per trial.
# The exact accumulator can be tens of GB (restore_value would snapshot it), so the launcher
# tunes on a proxy instead: same x/dy, every row in one domain, a one-domain scratch acc.
_segmented_wgrad_tuned = triton.autotune(configs=_gpu_configs(), key=["K_OUT", "K_IN"])(
    _segmented_wgrad_kernel
)
_tuned_keys: set[tuple] = set()
# Layers with at least this many weights index a [K_out, K_in] tile with int64 offsets.
_WIDE_ELEMENTS = 2**31


def _grid(k_out: int, k_in: int):
    return lambda meta: (cdiv(k_out, meta["BLOCK_M"]) * cdiv(k_in, meta["BLOCK_N"]),)


def _index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n < 2**31 else torch.int64


def launch_segmented(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    out: torch.Tensor,
    *,
    sketch: bool,
    key_base: int = 0,
    row_offset: int = 0,
    tuned=None,
) -> torch.Tensor:
    """Shared launcher of both variants; returns ``dW``. ``tuned`` is the autotuned kernel
    to use on the GPU (the sketch variant tunes with ``restore_value`` on its small output)."""
    n, k_in = x.shape
    k_out = dy.shape[1]
    dw = torch.empty(k_out, k_in, dtype=x.dtype, device=x.device)
    if dw.numel() == 0:
        return dw
    if n == 0:
        return dw.zero_()
    order, bounds = group_rows(domain_ids, num_domains, index_dtype=_index_dtype(n))
    # The hash base is a uint32 bit pattern; passed as int32 so one compiled variant serves
    # every seed (the kernel bitcasts it back).
    key_i32, offset_i32 = (v - (1 << 32) if v >= (1 << 31) else v for v in (key_base, row_offset))
    args = (
        x, dy, order, bounds, dw, out, k_out, k_in, num_domains + 1,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        out.shape[1] if sketch else 1, key_i32, offset_i32,
    )  # fmt: skip
    wide = k_out * k_in >= _WIDE_ELEMENTS
    precision = dot_precision(x.dtype, "ieee")
    with device_guard(x):
        if interpreting():
            upcast = interpreter_upcast(x.dtype)
            kernel = runnable(_segmented_wgrad_kernel)
            kernel[_grid(k_out, k_in)(INTERPRET_SEGMENTED)](
                *args,
                SKETCH=sketch,
                PRECISION="ieee" if upcast else precision,
                UPCAST=upcast,
                WIDE=wide,
                **H.kernel_constants(),
                **INTERPRET_SEGMENTED,
            )
            return dw
        if tuned is None:
            _tune_exact_on_proxy(x, dy, order, dw, k_out, k_in, precision, wide)
            tuned = _segmented_wgrad_tuned
        tuned[_grid(k_out, k_in)](
            *args, SKETCH=sketch, PRECISION=precision, UPCAST=False, WIDE=wide,
            **H.kernel_constants(),
        )  # fmt: skip
    return dw


def _tune_exact_on_proxy(x, dy, order, dw, k_out, k_in, precision, wide) -> None:
    key = (k_out, k_in, x.dtype, dy.dtype, x.device)
    if key in _tuned_keys:
        return
    n = x.shape[0]
    scratch = torch.zeros(1, k_out, k_in, dtype=torch.float32, device=x.device)
    bounds = torch.tensor([0, 0, n], dtype=order.dtype, device=x.device)
    _segmented_wgrad_tuned[_grid(k_out, k_in)](
        x, dy, order, bounds, dw, scratch, k_out, k_in, 2,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), 1, 0, 0,
        SKETCH=False, PRECISION=precision, UPCAST=False, WIDE=wide, **H.kernel_constants(),
    )  # fmt: skip
    _tuned_keys.add(key)


def segmented_wgrad_triton(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    acc: torch.Tensor,
) -> torch.Tensor:
    """Triton backend of :func:`rnb_kernels.ops.segmented_wgrad` (inputs already validated).

    Args:
        x: ``[N, K_in]`` float32 / float16 / bfloat16, any strides.
        dy: ``[N, K_out]``, same dtype and device.
        domain_ids: int32/int64 ``[N]`` in ``[-1, num_domains)``; ``-1`` rows count toward
            ``dW`` only.
        num_domains: ``m``.
        acc: float32 contiguous ``[m, K_out, K_in]``; ``acc[d] += Σ_{n∈d} dy_nᵀ x_n`` in place.

    Returns:
        ``dW = dyᵀ x`` over all rows, ``[K_out, K_in]`` in ``x.dtype``.

    Example (CPU, ``TRITON_INTERPRET=1`` set before Triton is imported):
        >>> x, dy = torch.randn(5, 3), torch.randn(5, 2)
        >>> acc = torch.zeros(2, 2, 3)
        >>> dw = segmented_wgrad_triton(x, dy, torch.tensor([1, -1, 0, 1, 0]), 2, acc)
        >>> torch.allclose(acc[1], dy[[0, 3]].T @ x[[0, 3]], atol=1e-5)
        True
    """
    return launch_segmented(x, dy, domain_ids, num_domains, acc, sketch=False)
