"""Triton ``gram``: ``A Aᵀ`` / ``A bᵀ`` over per-domain accumulators, float64 result.

Design (docs/design.md, "gram")
------------------------------
* **One streaming pass.** ``P`` (tens of millions of columns) is split into ``C`` contiguous
  spans, one per program along grid axis 1, with ``C`` chosen so that the grid holds a few
  programs per SM. For ``m <= BLOCK_M`` (64) a single program reads its span of ``A`` exactly
  once; for larger ``m`` the tile pairs of one span run next to each other in launch order, so
  the re-reads of a span come from L2.
* **Symmetric.** With ``b=None`` only the tile pairs ``ti <= tj`` are launched (a host-side
  table); the host then mirrors the strict upper triangle, so the result is exactly symmetric.
* **Precision.** Inside a span the tile product accumulates in fp32 over at most
  ``FOLD * BLOCK_K`` columns and is then added to an fp64 register tile, so fp32 rounding
  never grows with ``P``. fp32 inputs use ``input_precision="tf32x3"`` (three TF32 tensor-core
  products, error ~2**-21 per product, within fp32 tolerance): full-IEEE FMAs need
  ``2m`` flops per loaded element, which caps an m = 64 Gram at ~60 TFLOP/s i.e. below the
  bandwidth target. bf16/fp16 use tensor cores with fp32 accumulation.
* **Combination.** Each program writes its fp64 partial tile to ``partials[C, m, r]``; one
  deterministic ``sum(0)`` in fp64 finishes (no fp64 atomics, bit-reproducible run to run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET_GRAM,
    cdiv,
    device_guard,
    dot_precision,
    interpreter_upcast,
    interpreting,
    num_sms,
    runnable,
)

# Spans are multiples of the largest BLOCK_K so every config walks whole blocks but the last.
_SPAN_ALIGN = 256
_PROGRAMS_PER_SM = 4


def _gpu_configs() -> list[triton.Config]:
    # H100/H200, checked by compiling for sm_90 offline: with 64x64 tiles, fp32 (tf32x3 keeps
    # hi/lo operand splits in registers) spills at BLOCK_K=64 with 4 warps and at 128 with 8,
    # while bf16 fits everywhere; all of these stay under 132 KB of shared memory.
    return [
        triton.Config({"BLOCK_K": bk, "FOLD": 4096 // bk}, num_warps=w, num_stages=s)
        for bk, w, s in [(32, 4, 4), (32, 8, 4), (64, 8, 3), (64, 8, 4), (128, 8, 3)]
    ]


@triton.jit
def _gram_kernel(
    a_ptr,  # [M, P]
    b_ptr,  # [R, P] (a_ptr itself when SYMMETRIC)
    part_ptr,  # [C, M, R] float64 partial products
    pairs_ptr,  # [T, 2] int32 (ti, tj) tile pairs, ti <= tj (SYMMETRIC only)
    M,
    R,
    P,
    SPAN,
    stride_am,
    stride_ak,
    stride_bm,
    stride_bk,
    SYMMETRIC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FOLD: tl.constexpr,
):
    pid_t = tl.program_id(0)  # fastest: all tile pairs of one span are adjacent (L2 reuse)
    pid_c = tl.program_id(1)
    if SYMMETRIC:
        ti = tl.load(pairs_ptr + 2 * pid_t)
        tj = tl.load(pairs_ptr + 2 * pid_t + 1)
    else:
        n_tj = tl.cdiv(R, BLOCK_R)
        ti = pid_t // n_tj
        tj = pid_t % n_tj
    offs_i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tj * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_i = offs_i < M
    mask_j = offs_j < R
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + offs_i.to(tl.int64)[:, None] * stride_am
    b_rows = b_ptr + offs_j.to(tl.int64)[:, None] * stride_bm

    start = pid_c.to(tl.int64) * SPAN
    end = tl.minimum(start + SPAN, P)
    total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float64)
    for f0 in range(start, end, BLOCK_K * FOLD):
        f1 = tl.minimum(f0 + BLOCK_K * FOLD, end)
        part = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(f0, f1, BLOCK_K):
            cols = k0 + offs_k
            in_span = cols < f1
            a = tl.load(
                a_rows + cols[None, :] * stride_ak,
                mask=mask_i[:, None] & in_span[None, :],
                other=0.0,
            )
            b = tl.load(
                b_rows + cols[None, :] * stride_bk,
                mask=mask_j[:, None] & in_span[None, :],
                other=0.0,
            )
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            part = tl.dot(a, tl.trans(b), part, input_precision=PRECISION)
        total += part.to(tl.float64)

    out = part_ptr + pid_c.to(tl.int64) * M * R + offs_i.to(tl.int64)[:, None] * R + offs_j[None, :]
    tl.store(out, total, mask=mask_i[:, None] & mask_j[None, :])


_gram_tuned = triton.autotune(configs=_gpu_configs(), key=["M", "R", "P"])(_gram_kernel)


def _block(n: int, cap: int) -> int:
    # tl.dot needs every block dimension >= 16.
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _tile_pairs(tiles: int, device) -> torch.Tensor:
    pairs = [(i, j) for i in range(tiles) for j in range(i, tiles)]
    return torch.tensor(pairs, dtype=torch.int32, device=device).reshape(-1, 2)


def gram_triton(a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Triton backend of :func:`rnb_kernels.ops.gram` (inputs already validated).

    Args:
        a: ``[m, P]`` float32 / float16 / bfloat16, any strides (unit column stride is fastest).
        b: ``None`` for ``A Aᵀ`` or ``[r, P]`` (same dtype and device) for ``A bᵀ``.

    Returns:
        float64 ``[m, m]`` (exactly symmetric) or ``[m, r]``.

    Example (CPU, ``TRITON_INTERPRET=1`` set before Triton is imported):
        >>> a = torch.randn(3, 100)
        >>> torch.allclose(gram_triton(a, None), a.double() @ a.double().T, rtol=1e-5)
        True
    """
    symmetric = b is None
    bb = a if symmetric else b
    m, p = a.shape
    r = bb.shape[0]
    if m == 0 or r == 0 or p == 0:
        return torch.zeros(m, r, dtype=torch.float64, device=a.device)

    block_m = _block(max(m, r) if symmetric else m, 64)
    block_r = block_m if symmetric else _block(r, 64)
    if symmetric:
        pairs = _tile_pairs(cdiv(m, block_m), a.device)
        n_tiles = pairs.shape[0]
    else:
        pairs = torch.empty(0, 2, dtype=torch.int32, device=a.device)
        n_tiles = cdiv(m, block_m) * cdiv(r, block_r)
    # Enough spans to fill the machine; never shorter than one aligned block of columns.
    spans_wanted = max(1, cdiv(_PROGRAMS_PER_SM * num_sms(a), n_tiles))
    span = cdiv(cdiv(p, spans_wanted), _SPAN_ALIGN) * _SPAN_ALIGN
    if interpreting():
        span = cdiv(cdiv(p, spans_wanted), INTERPRET_GRAM["BLOCK_K"]) * INTERPRET_GRAM["BLOCK_K"]
    n_spans = cdiv(p, span)

    # Tiles below the diagonal are never written; the mirror below discards them.
    partials = torch.empty(n_spans, m, r, dtype=torch.float64, device=a.device)
    args = (
        a, bb, partials, pairs, m, r, p, span,
        a.stride(0), a.stride(1), bb.stride(0), bb.stride(1),
    )  # fmt: skip
    grid = (n_tiles, n_spans)
    precision = dot_precision(a.dtype, "tf32x3")
    with device_guard(a):
        if interpreting():
            upcast = interpreter_upcast(a.dtype)
            runnable(_gram_kernel)[grid](
                *args,
                SYMMETRIC=symmetric,
                PRECISION="ieee" if upcast else precision,
                UPCAST=upcast,
                BLOCK_M=block_m,
                BLOCK_R=block_r,
                **INTERPRET_GRAM,
            )
        else:
            _gram_tuned[grid](
                *args,
                SYMMETRIC=symmetric,
                PRECISION=precision,
                UPCAST=False,
                BLOCK_M=block_m,
                BLOCK_R=block_r,
            )
    out = partials.sum(0)
    if symmetric:
        out = torch.triu(out) + torch.triu(out, 1).t()
    return out
