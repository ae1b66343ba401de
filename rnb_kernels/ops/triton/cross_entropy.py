"""Triton kernels of :mod:`rnb_kernels.ops.cross_entropy`: row-wise softmax cross-entropy.

One program per row streams over the vocabulary in ``BLOCK_V`` slices, so a row of any width
costs one read (forward: online max / sum-of-exponentials, as in flash attention) or one read
and one write (gradient, with the forward's ``lse``), all arithmetic in fp32 registers. Rows
are independent, so there are no atomics and results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_guard, runnable

# The interpreter runs programs one after another in numpy: wide slices keep CPU tests fast.
_BLOCK_V_INTERPRET = 64


def _block_v(v: int) -> int:
    return min(4096, triton.next_power_of_2(max(v, 1)))


@triton.jit
def _ce_rows_kernel(
    z_ptr,  # [n, V], row stride stride_z, unit column stride
    t_ptr,  # [n] targets
    loss_ptr,  # [n] fp32
    lse_ptr,  # [n] fp32
    IGNORE,
    V,
    stride_z,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + cols < V
        z = tl.load(base + v0 + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    t = tl.load(t_ptr + row)
    valid = t != IGNORE
    zt = tl.load(base + tl.where(valid, t, 0)).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(valid, lse - zt, 0.0))


@triton.jit
def _ce_grad_kernel(
    z_ptr,  # [n, V] in: logits, out: gradient
    t_ptr,
    lse_ptr,
    scale_ptr,
    IGNORE,
    V,
    stride_z,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    cols = tl.arange(0, BLOCK_V)
    t = tl.load(t_ptr + row)
    valid = t != IGNORE
    lse = tl.load(lse_ptr + row)
    scale = tl.where(valid, tl.load(scale_ptr + row), 0.0)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + cols
        mask = idx < V
        z = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(z - lse) - tl.where(idx == t, 1.0, 0.0)
        tl.store(base + idx, (g * scale).to(z_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, logits: torch.Tensor, *args) -> None:
    """``kernel[(n,)](logits, *args, V, row_stride)``: ``args`` end with ``IGNORE``."""
    n, v = logits.shape
    if n == 0:
        return
    from ._common import interpreting

    block = _BLOCK_V_INTERPRET if interpreting() else _block_v(v)
    with device_guard(logits):
        runnable(kernel)[(n,)](logits, *args, v, logits.stride(0), BLOCK_V=block)


def cross_entropy_rows_triton(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of :func:`rnb_kernels.ops.cross_entropy.cross_entropy_rows`.

    Example (CPU, ``TRITON_INTERPRET=1`` set before Triton is imported):
        >>> z, t = torch.randn(4, 9), torch.tensor([0, 8, -100, 3])
        >>> loss, lse = cross_entropy_rows_triton(z, t, -100)
        >>> torch.allclose(lse, torch.logsumexp(z, 1), atol=1e-5)
        True
    """
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    n = logits.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    _launch(_ce_rows_kernel, logits, targets, loss, lse, ignore_index)
    return loss, lse


def cross_entropy_rows_grad_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
) -> None:
    """Triton backend of :func:`rnb_kernels.ops.cross_entropy.cross_entropy_rows_grad_`
    (``logits`` has unit column stride; it is overwritten with the gradient)."""
    _launch(_ce_grad_kernel, logits, targets, lse.contiguous(), scale.contiguous(), ignore_index)
