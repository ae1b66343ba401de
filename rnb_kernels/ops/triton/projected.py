"""Triton ``domain_projection``: a column-projection kernel plus the exact segmented kernel.

Design
------
* **Column projection** (:func:`project_columns_triton`). Program ``(pid_n, pid_p)`` owns rows
  ``[BLOCK_N]`` of the output ``[N, proj_dim]`` and buckets ``[BLOCK_P]``. It streams the
  source's columns in ``BLOCK_K`` steps, evaluates the projection hash of
  :mod:`rnb_kernels.ops.sketch_hash` for them in wrapping ``tl.uint32`` arithmetic
  (bit-identical to the torch backend), builds the signed one-hot ``[BLOCK_K, BLOCK_P]`` block
  of ``Pᵀ`` in registers and multiplies it in with ``tl.dot``. No atomics, deterministic, and
  the tensor cores make the fold cost about one read of the source as long as ``2·BLOCK_P``
  flops per loaded byte stay under the GPU's ridge point (``proj_dim`` up to a few hundred;
  wider projections re-read the source once per ``BLOCK_P`` block). 16-bit sources keep
  their dtype (the ±1 one-hot is exact in it) and accumulate in fp32.
* **Segmented GEMM.** The projected ``dy`` (fp32 ``[N, proj_dim]``) and the input side (``x``
  as fp32, with the bias's ones column appended, or ``x`` projected by the same kernel) go
  through :mod:`.segmented_wgrad`'s exact kernel with ``proj`` as its ``[m, proj_dim, K_in']``
  accumulator: rows gathered in domain order, one read-modify-write of each present domain's
  tile, empty domains untouched. Its own ``dW`` output (``[proj_dim, K_in']``) is scratch.
* **dW** is ``dy.t().mm(x)``, the GEMM autograd runs (cuBLAS on a GPU): the projection needs
  only ``[N, proj_dim]`` of ``dy``'s information, so fusing it into the dW kernel would save
  one read of ``dy`` at the price of a hand-written GEMM slower than cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import sketch_hash as H
from ..domain_projection import add_ones_column_projection
from ._common import cdiv, device_guard, dot_precision, interpreter_upcast, interpreting, runnable
from .segmented_wgrad import launch_segmented


@triton.jit(do_not_specialize=["PROJ_DIM", "KEY", "OFFSET"])
def _project_columns_kernel(
    src_ptr,  # [N, K] any strides
    out_ptr,  # fp32 [N, PROJ_DIM] contiguous, overwritten
    N,
    K,
    PROJ_DIM,
    stride_n,
    stride_k,
    KEY,  # int32 bit pattern of sketch_hash.projection_key(seed, layer, side)
    OFFSET,  # int32 bit pattern of the global index of column 0
    MUL: tl.constexpr,  # sketch_hash.projection_multiplier(side)
    FMIX1: tl.constexpr,
    FMIX2: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_p = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_n = offs_n < N
    mask_p = offs_p < PROJ_DIM
    rows = offs_n.to(tl.int64)  # N * stride_n may pass 2**31 (e.g. 16k tokens x 128k vocab)
    key = KEY.to(tl.uint32, bitcast=True)
    first = OFFSET.to(tl.uint32, bitcast=True)
    p = PROJ_DIM.to(tl.uint32)
    acc = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        tile = tl.load(
            src_ptr + rows[:, None] * stride_n + offs_k[None, :] * stride_k,
            mask=mask_n[:, None] & mask_k[None, :],
            other=0.0,
        )
        h = (offs_k.to(tl.uint32) + first) * MUL ^ key
        h ^= h >> 16
        h *= FMIX1
        h ^= h >> 13
        h *= FMIX2
        h ^= h >> 16
        bucket = ((h & 0x7FFFFFFF) % p).to(tl.int32)
        sign = tl.where((h >> 31) == 0, 1.0, -1.0)
        hit = (bucket[:, None] == offs_p[None, :]) & mask_k[:, None]
        onehot = tl.where(hit, sign[:, None], 0.0)
        if UPCAST:
            tile = tile.to(tl.float32)
        else:
            onehot = onehot.to(tile.dtype)
        acc = tl.dot(tile, onehot, acc, input_precision=PRECISION)
    out_offs = rows[:, None] * PROJ_DIM + offs_p[None, :]
    tl.store(out_ptr + out_offs, acc, mask=mask_n[:, None] & mask_p[None, :])


def _blocks(proj_dim: int) -> dict[str, int]:
    # tl.dot needs every block dim >= 16; the interpreter runs programs one by one in numpy,
    # so it gets fewer, larger ones.
    bp = max(16, min(128 if not interpreting() else 64, triton.next_power_of_2(proj_dim)))
    if interpreting():
        return {"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_P": bp}
    return {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_P": bp}


def _i32(v: int) -> int:
    """uint32 value -> int32 bit pattern (one compiled variant for every key and offset)."""
    return v - (1 << 32) if v >= (1 << 31) else v


def project_columns_triton(
    t: torch.Tensor, proj_dim: int, seed: int, layer: int, offset: int, side: int
) -> torch.Tensor:
    """float32 ``[N, proj_dim]`` = ``t Pᵀ``, ``P`` the count-sketch of ``t``'s columns
    (features ``offset + c``); the Triton twin of
    :func:`rnb_kernels.ops.domain_projection.project_columns_torch`.

    Args:
        t: ``[N, K]`` float32 / float16 / bfloat16, any strides.

    Example (CPU, ``TRITON_INTERPRET=1`` set before Triton is imported):
        >>> t = torch.randn(3, 40)
        >>> y = project_columns_triton(t, 8, seed=1, layer=0, offset=0, side=0)
        >>> from rnb_kernels.ops.reference import projection_matrix_ref
        >>> torch.allclose(y.double(), t.double() @ projection_matrix_ref(40, 8, 1).T, atol=1e-5)
        True
    """
    n, k = t.shape
    out = torch.empty(n, proj_dim, dtype=torch.float32, device=t.device)
    if n == 0:
        return out
    if k == 0:
        return out.zero_()
    blocks = _blocks(proj_dim)
    upcast = interpreter_upcast(t.dtype)
    precision = "ieee" if upcast else dot_precision(t.dtype, "ieee")
    kernel = runnable(_project_columns_kernel)
    grid = (cdiv(n, blocks["BLOCK_N"]), cdiv(proj_dim, blocks["BLOCK_P"]))
    with device_guard(t):
        kernel[grid](
            t, out, n, k, proj_dim, t.stride(0), t.stride(1),
            _i32(H.projection_key(seed, layer, side)), _i32(offset),
            MUL=H.projection_multiplier(side), FMIX1=H.FMIX_MUL1, FMIX2=H.FMIX_MUL2,
            PRECISION=precision, UPCAST=upcast, **blocks,
        )  # fmt: skip
    return out


def domain_projection_triton(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    proj: torch.Tensor,
    seed: int,
    layer: int,
    row_offset: int,
    proj_in_dim: int | None,
    bias: bool,
) -> None:
    """Triton backend of :func:`rnb_kernels.ops.domain_projection` (inputs already validated;
    ``dW`` is the caller's).

    Args:
        x: ``[N, K_in]`` float32 / float16 / bfloat16, any strides.
        dy: ``[N, K_out]``, same dtype and device.
        domain_ids: int32/int64 ``[N]`` in ``[-1, num_domains)``.
        num_domains: ``m``.
        proj: float32 contiguous ``[m, proj_dim, K_in']``; ``proj[d] += P_out [g_d | β_d]
            (P_inᵀ)`` in place.
        seed, layer, row_offset, proj_in_dim, bias: as in the public op.

    Example (CPU, ``TRITON_INTERPRET=1`` set before Triton is imported):
        >>> from rnb_kernels.ops.reference import domain_projection_ref
        >>> x, dy, ids = torch.randn(6, 5), torch.randn(6, 40), torch.tensor([0, 1, 1, -1, 0, 1])
        >>> p = torch.zeros(2, 8, 5)
        >>> domain_projection_triton(x, dy, ids, 2, p, 3, 1, 0, None, False)
        >>> ref = domain_projection_ref(x, dy, ids, 2, 8, seed=3, layer=1)[1]
        >>> torch.allclose(p.double(), ref, atol=1e-4)
        True
    """
    if x.shape[0] == 0 or proj.numel() == 0:
        return
    dyp = project_columns_triton(dy, proj.shape[1], seed, layer, row_offset, H.PROJ_OUT)
    if proj_in_dim is None:
        xin = x.float()
        if bias:
            xin = torch.cat([xin, xin.new_ones(x.shape[0], 1)], 1)
    else:
        xin = project_columns_triton(x, proj_in_dim, seed, layer, 0, H.PROJ_IN)
        if bias:
            add_ones_column_projection(xin, x.shape[1], seed, layer)
    launch_segmented(xin, dyp, domain_ids, num_domains, proj, sketch=False)
