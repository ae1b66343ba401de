"""Launchers for the compiled CUDA kernels in ``rnb_kernels._C`` (``backend="cuda"``).

The public ops validate shapes, dtypes and devices before they get here; these wrappers only
translate tensors into pointers, strides and the current stream.
"""

from __future__ import annotations

import torch

from .._backends import REBUILD_HINT, BackendUnavailableError, _load_extension

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
        raise TypeError(f"{name}: the cuda backend takes float32/float16/bfloat16, got {t.dtype}")


def current_stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _unit_col_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def gram_cuda(a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``a [m, P]`` (and ``b [r, P]``) on CUDA -> float64 ``[m, r]`` via ``_gram_kernel``."""
    ext = extension()
    a = _unit_col_stride(a)
    sym = b is None
    bb = a if sym else _unit_col_stride(b)
    m, p = a.shape
    r = bb.shape[0]
    out = torch.empty(m, r, dtype=torch.float64, device=a.device)
    with torch.cuda.device(a.device):
        ext.gram(
            a.data_ptr(), bb.data_ptr(), dtype_code(a, "a"), m, r, p,
            a.stride(0), bb.stride(0), sym, out.data_ptr(), current_stream(a),
        )
    if sym:
        out = torch.triu(out) + torch.triu(out, 1).t()
    return out
