"""Launchers for the compiled CUDA kernels in ``rnb_kernels._C`` (``backend="cuda"``).

The public ops validate shapes, dtypes and devices before they get here; these wrappers only
translate tensors into pointers, strides and the current stream.
"""

from __future__ import annotations

import torch

from .._backends import REBUILD_HINT, BackendUnavailableError, _load_extension
from .grouping import group_rows

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def extension():
    """The compiled module, or a :class:`BackendUnavailableError` saying how to build it."""
    ext, err = _load_extension()
    if ext is None:
        raise BackendUnavailableError(f"rnb_kernels._C is not available ({err}); {REBUILD_HINT}")
    return ext


def dtype_code(t: torch.Tensor, name: str) -> int:
    try:
        return _DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(
            f"{name}: the cuda backend takes float32/float16/bfloat16, got {t.dtype}"
        ) from None


def current_stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _unit_col_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every output the kernels must fully overwrite (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D operand the kernels can read: unit column stride, row stride >= its width."""
    if t.stride(-1) == 1 and t.stride(0) >= max(t.shape[1], 1):
        return t
    return t.contiguous()


def _segmented_call(kernel: str, x, dy, domain_ids, num_domains, extra) -> torch.Tensor:
    """Shared body of the two segmented launchers; ``extra`` are the kernel-specific args."""
    ext = extension()
    x, dy = _rows(x), _rows(dy)
    n, k_in = x.shape
    k_out = dy.shape[1]
    code = dtype_code(x, "x")
    dw = _empty((k_out, k_in), x.dtype, x.device)
    with torch.cuda.device(x.device):
        order, bounds = group_rows(domain_ids, num_domains)
        ws_len = ext.segmented_workspace_elems(code, n, k_in, k_out)
        ws = torch.empty(ws_len, dtype=torch.float32, device=x.device) if ws_len else None
        getattr(ext, kernel)(
            x.data_ptr(), dy.data_ptr(), order.data_ptr(), bounds.data_ptr(), code,
            n, k_in, k_out, x.stride(0), dy.stride(0), num_domains, *extra, dw.data_ptr(),
            0 if ws is None else ws.data_ptr(), ws_len, current_stream(x),
        )  # fmt: skip
    return dw


def segmented_wgrad_cuda(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    acc: torch.Tensor,
) -> torch.Tensor:
    """``_segmented_wgrad_kernel``: ``dW = dyᵀ x`` and ``acc[d] += dyᵀ x`` over domain ``d``'s rows.

    Args:
        x: ``[N, K_in]`` float32 / float16 / bfloat16 on CUDA.
        dy: ``[N, K_out]``, same dtype and device.
        domain_ids: int32/int64 ``[N]`` in ``[-1, num_domains)``; ``-1`` rows go to ``dW`` only.
        num_domains: ``m``.
        acc: float32 ``[m, K_out, K_in]`` contiguous, updated in place (domains without rows
            untouched).

    Returns:
        ``dW`` ``[K_out, K_in]`` in ``x.dtype``. Runs on the current stream of ``x.device``.
    """
    return _segmented_call("segmented_wgrad", x, dy, domain_ids, num_domains, (acc.data_ptr(),))


def domain_sketch_cuda(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    sketch: torch.Tensor,
    seed: int,
    layer: int,
    row_offset: int = 0,
) -> torch.Tensor:
    """``_domain_sketch_kernel``: ``dW = dyᵀ x`` and ``sketch[d] +=`` count-sketch of domain ``d``'s
    ``dyᵀ x`` (hash of :mod:`rnb_kernels.ops.sketch_hash`).

    Args:
        x: ``[N, K_in]`` float32 / float16 / bfloat16 on CUDA.
        dy: ``[N, K_out]``, same dtype and device.
        domain_ids: int32/int64 ``[N]`` in ``[-1, num_domains)``.
        num_domains: ``m``.
        sketch: float32 ``[m, k]`` contiguous, updated in place.
        seed, layer: hash key, integers in ``[0, 2**32)``.
        row_offset: global index of row 0 of a row shard (builds without
            ``DOMAIN_SKETCH_ROW_OFFSET`` only take 0; the public op checks).

    Returns:
        ``dW`` ``[K_out, K_in]`` in ``x.dtype``. Runs on the current stream of ``x.device``.
    """
    extra: tuple = (sketch.data_ptr(), sketch.shape[1], int(seed), int(layer))
    if getattr(extension(), "DOMAIN_SKETCH_ROW_OFFSET", False):
        extra += (int(row_offset),)
    return _segmented_call("domain_sketch", x, dy, domain_ids, num_domains, extra)


def gram_cuda(a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``a [m, P]`` (and ``b [r, P]``) on CUDA -> float64 ``[m, r]`` via ``_gram_kernel``."""
    ext = extension()
    a = _unit_col_stride(a)
    sym = b is None
    bb = a if sym else _unit_col_stride(b)
    m, p = a.shape
    r = bb.shape[0]
    out = _empty((m, r), torch.float64, a.device)
    with torch.cuda.device(a.device):
        ext.gram(
            a.data_ptr(),
            bb.data_ptr(),
            dtype_code(a, "a"),
            m,
            r,
            p,
            a.stride(0),
            bb.stride(0),
            sym,
            out.data_ptr(),
            current_stream(a),
        )
    if sym:
        out = torch.triu(out) + torch.triu(out, 1).t()
    return out
