"""gram: ``A Aᵀ`` (or ``A bᵀ``) over per-domain accumulators, float64 result."""

from __future__ import annotations

import torch

from . import _validate as V
from ._dispatch import get_impl, resolve_backend

# Float64 column chunks. On the CPU a chunk of all rows is ~4 MB, copied into one buffer reused
# for every chunk: measured on the 2-core CPU at m = 16 and 64, P = 2M, this is 4-6x faster than
# 2**20-column chunks, whose fresh 128-512 MB temporaries are page-faulted in on every call. On
# a GPU, 2**20 columns: few launches, and the caching allocator reuses the memory anyway.
_CPU_CHUNK_BYTES = 4 << 20
_GPU_CHUNK_COLUMNS = 1 << 20


def _spans(rows: int, cols: int, device: torch.device) -> list[tuple[int, int]]:
    """Column spans ``(lo, hi)`` of a float64 pass over ``rows`` rows of ``cols`` columns."""
    step = max(1, _CPU_CHUNK_BYTES // (8 * rows)) if device.type == "cpu" else _GPU_CHUNK_COLUMNS
    return [(lo, min(lo + step, cols)) for lo in range(0, cols, step)]


def _float64_chunks(spans: list[tuple[int, int]], *ts: torch.Tensor):
    """Yield, per span, each tensor's columns in float64, copied into one buffer per tensor
    that every chunk reuses (the views are overwritten by the next chunk)."""
    width = max((hi - lo for lo, hi in spans), default=0)
    bufs = [torch.empty(t.shape[0], width, dtype=torch.float64, device=t.device) for t in ts]
    for lo, hi in spans:
        yield [buf[:, : hi - lo].copy_(t[:, lo:hi]) for buf, t in zip(bufs, ts)]


def gram_torch(a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Torch backend: float64 products over column chunks of ``a`` (and ``b``)."""
    rows_b = a if b is None else b
    out = torch.zeros(a.shape[0], rows_b.shape[0], dtype=torch.float64, device=a.device)
    ts = (a,) if b is None else (a, b)
    spans = _spans(sum(t.shape[0] for t in ts), a.shape[1], a.device)
    for chunk in _float64_chunks(spans, *ts):
        ac, bc = chunk[0], chunk[-1]
        out.addmm_(ac, bc.t())
    if b is None:
        # Exact symmetry, whatever order the BLAS summed the two triangles in.
        out = torch.triu(out) + torch.triu(out, 1).t()
    return out


@torch.library.custom_op("rnb::gram", mutates_args=())
def _gram_op(
    a: torch.Tensor, b: torch.Tensor | None, backend: str, check_finite: bool
) -> torch.Tensor:
    if check_finite:
        V.check_finite_tensor("a", a)
        if b is not None:
            V.check_finite_tensor("b", b)
    return get_impl("gram", backend)(a, b)


@_gram_op.register_fake
def _(a, b, backend, check_finite):
    r = a.shape[0] if b is None else b.shape[0]
    return a.new_empty(a.shape[0], r, dtype=torch.float64)


def gram(
    a: torch.Tensor,
    b: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    check_finite: bool = False,
) -> torch.Tensor:
    """Gram products of per-domain gradient rows, in float64.

    Args:
        a: ``[m, P]`` float32 (also float16 / bfloat16; float64 on the torch backend), rows =
            per-domain accumulators flattened (``acc.view(m, -1)``).
        b: ``None`` for ``A Aᵀ``; a target row ``[P]`` or rows ``[r, P]`` for ``A bᵀ``.
            Same dtype and device as ``a``.
        backend: as in :func:`segmented_wgrad`.
        check_finite: raise ``ValueError`` on NaN/Inf inputs (costs a pass).

    Returns:
        float64 ``[m, m]`` (exactly symmetric) for ``b=None``, ``[m]`` for ``b`` of shape
        ``[P]``, ``[m, r]`` for ``b`` of shape ``[r, P]``.

    Example:
        >>> a = torch.randn(3, 10)
        >>> torch.allclose(gram(a), a.double() @ a.double().T)
        True
    """
    V.check_tensor(a, "a", ndim=2, dtypes=V.FLOAT_DTYPES)
    vector_b = False
    if b is not None:
        V.check_tensor(b, "b", dtypes=V.FLOAT_DTYPES)
        if b.dim() == 1:
            vector_b, b = True, b.unsqueeze(0)
        if b.dim() != 2:
            raise ValueError(f"b must be 1-D [P] or 2-D [r, P], got shape {tuple(b.shape)}")
        if b.shape[1] != a.shape[1]:
            raise ValueError(f"b has {b.shape[1]} columns but a has {a.shape[1]}; they must match")
        if b.dtype != a.dtype:
            raise TypeError(f"b has dtype {b.dtype} but a has {a.dtype}; they must match")
        V.check_same_device(a, "a", b=b)
    be = resolve_backend("gram", backend, a.device)
    if be != "torch" and a.dtype == torch.float64:
        raise TypeError(f"a: float64 inputs are supported by backend='torch' only, not {be!r}")
    out = _gram_op(a, b, be, bool(check_finite))
    return out[:, 0] if vector_b else out


def gram_matvec(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``G c = A (Aᵀ c)`` in float64 without forming ``G``: one streaming pass over ``a``.

    Each column chunk of ``a`` is read once and used twice (``u = cᵀ A_chunk``, then
    ``A_chunk u``), so the work is ``~2·m·P`` against the full Gram's ``m²·P``; the result equals
    ``gram(a) @ c`` up to float64 rounding. It is memory-bound on every device, so one torch
    implementation serves all backends.

    Args:
        a: ``[m, P]`` float32 / float16 / bfloat16 / float64.
        c: ``[m]`` coefficients (any real dtype; used in float64), on ``a``'s device.

    Returns:
        float64 ``[m]``.

    Example:
        >>> a, c = torch.randn(3, 10), torch.tensor([0.5, 0.0, 0.5])
        >>> torch.allclose(gram_matvec(a, c), gram(a) @ c.double())
        True
    """
    V.check_tensor(a, "a", ndim=2, dtypes=V.FLOAT_DTYPES)
    V.check_tensor(c, "c", ndim=1)
    if c.shape[0] != a.shape[0]:
        raise ValueError(f"c has {c.shape[0]} entries but a has {a.shape[0]} rows")
    V.check_same_device(a, "a", c=c)
    c64 = c.to(torch.float64)
    out = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    for (ac,) in _float64_chunks(_spans(a.shape[0], a.shape[1], a.device), a):
        out.addmv_(ac, c64 @ ac)
    return out
