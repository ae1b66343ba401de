"""segmented_wgrad (exact): the layer's weight gradient plus each domain's share of it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _validate as V
from ._dispatch import eager, get_impl, resolve_backend
from .grouping import group_rows, host_runs, host_segments


def domain_row_blocks(
    x: torch.Tensor, dy: torch.Tensor, domain_ids: torch.Tensor, num_domains: int
):
    """Yield ``(d, [(dy_block, x_block), ...])`` fp32 row blocks of each present domain, for the
    torch backends: views of contiguous runs when the ids come in long runs (per-sample ids),
    else slices of one gathered copy in domain order."""
    runs = host_runs(domain_ids)
    if runs is not None:
        for d, spans in runs:
            yield d, [(dy[lo:hi].float(), x[lo:hi].float()) for lo, hi in spans]
        return
    order, bounds = group_rows(domain_ids, num_domains)
    segments = host_segments(bounds)
    if segments:
        xs = x.index_select(0, order).float()
        dys = dy.index_select(0, order).float()
        for d, lo, hi in segments:
            yield d, [(dys[lo:hi], xs[lo:hi])]


def domain_bias_sums(dy: torch.Tensor, domain_ids: torch.Tensor, num_domains: int) -> torch.Tensor:
    """float32 ``[m, K_out]``: each domain's bias gradient ``Σ_{n: id_n = d} dy_n`` (one segmented
    sum; ``-1`` rows land in a scratch row that is dropped)."""
    out = torch.zeros(num_domains + 1, dy.shape[1], dtype=torch.float32, device=dy.device)
    out.index_add_(0, domain_ids.to(torch.int64) + 1, dy.to(torch.float32))
    return out[1:]


def domain_tiles(x: torch.Tensor, dy: torch.Tensor, domain_ids: torch.Tensor, num_domains: int):
    """Yield ``(d, tile)``: each present domain's fp32 ``dy_dᵀ x_d`` ``[K_out, K_in]`` (torch
    backends). The first tile is a new tensor the caller may keep; the later ones share one
    scratch buffer, valid until the next is yielded."""
    first: torch.Tensor | None = None
    scratch: torch.Tensor | None = None
    for d, parts in domain_row_blocks(x, dy, domain_ids, num_domains):
        (dys, xs), rest = parts[0], parts[1:]
        if first is None:
            tile = first = dys.t().mm(xs)
        else:
            if scratch is None:
                scratch = torch.empty_like(first)
            tile = torch.mm(dys.t(), xs, out=scratch)
        for dys, xs in rest:
            tile.addmm_(dys.t(), xs)
        yield d, tile


def wgrad_from_domains(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    consume: Callable[[int, torch.Tensor], None],
) -> torch.Tensor:
    """``dW = dyᵀ x`` formed as the sum of the per-domain products (torch backends).

    Each present domain's tile (:func:`domain_tiles`) is handed to ``consume(d, tile)`` (valid
    only during the call) and added into ``dW``; rows with id ``-1`` are added last. The GEMM
    work is that of one ``dyᵀ x``, against two for ``dyᵀ x`` plus the per-domain products, for
    one ``[K_out, K_in]`` add per domain; ``dW`` equals ``dyᵀ x`` up to fp32 rounding (summed in
    fp32, returned in ``x.dtype``), not bit for bit."""
    dw: torch.Tensor | None = None
    for d, tile in domain_tiles(x, dy, domain_ids, num_domains):
        consume(d, tile)
        if dw is None:
            dw = tile  # the first tile is the caller's to keep
        else:
            dw.add_(tile)
    ignored = domain_ids < 0
    if dw is None:
        dw = torch.zeros(dy.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    if bool(ignored.any()):
        dw.addmm_(dy[ignored].float().t(), x[ignored].float())
    return dw.to(x.dtype)


def segmented_wgrad_torch(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    acc: torch.Tensor,
    dw_from_domains: bool = False,
) -> torch.Tensor:
    """Torch backend: ``dW = dyᵀ x`` in the input dtype (the same GEMM autograd runs for
    ``nn.Linear``, so ``param.grad`` is bit-identical), then fp32 per-domain GEMMs into ``acc``;
    with ``dw_from_domains`` (not for float64), ``dW`` is the sum of those products instead
    (:func:`wgrad_from_domains`: one GEMM less, equal up to fp32 rounding)."""
    if dw_from_domains and x.dtype != torch.float64:
        return wgrad_from_domains(x, dy, domain_ids, num_domains, lambda d, t: acc[d].add_(t))
    dw = dy.t().mm(x)
    add_domain_products(x, dy, domain_ids, num_domains, acc)
    return dw


def add_domain_products(
    x: torch.Tensor, dy: torch.Tensor, domain_ids: torch.Tensor, num_domains: int, acc: torch.Tensor
) -> None:
    """``acc[d] += dy_dᵀ x_d`` in fp32 for every present domain (torch; no ``dW``, no checks:
    callers have validated ``domain_ids`` and ``acc``)."""
    for d, parts in domain_row_blocks(x, dy, domain_ids, num_domains):
        for dys, xs in parts:
            acc[d].addmm_(dys.t(), xs)


def _segmented_wgrad_impl(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    acc: torch.Tensor,
    bias_acc: torch.Tensor | None,
    backend: str,
    check_ids: bool,
    check_finite: bool,
    dw_from_domains: bool = False,
) -> torch.Tensor:
    V.check_values(x, dy, domain_ids, num_domains, check_ids, check_finite)
    if backend == "torch":
        dw = segmented_wgrad_torch(x, dy, domain_ids, num_domains, acc, dw_from_domains)
    else:  # the fused kernels form dW themselves
        dw = get_impl("segmented_wgrad", backend)(x, dy, domain_ids, num_domains, acc)
    if bias_acc is not None:
        bias_acc += domain_bias_sums(dy, domain_ids, num_domains)
    return dw


_segmented_wgrad_op = torch.library.custom_op(
    "rnb::segmented_wgrad", _segmented_wgrad_impl, mutates_args=("acc", "bias_acc")
)


@_segmented_wgrad_op.register_fake
def _(
    x, dy, domain_ids, num_domains, acc, bias_acc, backend, check_ids, check_finite,
    dw_from_domains=False,
):  # fmt: skip
    return x.new_empty(dy.shape[1], x.shape[1])


def segmented_wgrad(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    acc: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    bias_acc: torch.Tensor | None = None,
    check_ids: bool = True,
    check_finite: bool = False,
    dw_from_domains: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight gradient of ``y = x Wᵀ`` plus per-domain shares, in one op.

    Computes ``dW = Σ_n dy_nᵀ x_n`` (what the layer's backward would compute) and adds
    ``acc[d] += Σ_{n: id_n = d} dy_nᵀ x_n`` for every domain ``d`` present. Rows with id ``-1``
    count toward ``dW`` but no domain.

    Args:
        x: ``[N, K_in]`` float16 / bfloat16 / float32 (float64 on the torch backend).
        dy: ``[N, K_out]``, same dtype and device as ``x``.
        domain_ids: int32/int64 ``[N]`` with values in ``[-1, num_domains)``.
        num_domains: ``m >= 1``.
        acc: float32 ``[m, K_out, K_in]`` contiguous accumulator, updated in place;
            ``None`` allocates a zeroed one.
        backend: ``"auto"`` (triton > cuda > torch on GPU, torch on CPU), ``"torch"``,
            ``"triton"`` or ``"cuda"``.
        bias_acc: optional float32 ``[m, K_out]`` contiguous; each domain's bias gradient
            ``Σ_{n: id_n = d} dy_n`` is added to it in place.
        check_ids: check that ids lie in ``[-1, m)`` before touching ``acc`` (one reduction and,
            on a GPU, a host sync). Callers that validated the ids already (the tracker, once
            per micro-batch) pass ``False``.
        check_finite: raise ``ValueError`` (before touching ``acc``) if ``x`` or ``dy`` hold
            NaN/Inf. Off by default: it costs a pass over both inputs.
        dw_from_domains: torch backend: form ``dW`` as the sum of the per-domain products (one
            GEMM instead of two; equal to ``dyᵀ x`` up to fp32 rounding, not bit for bit).
            Ignored for float64 inputs and by the fused GPU kernels, which form ``dW`` anyway.

    Returns:
        ``(dW, acc)``: ``dW`` ``[K_out, K_in]`` in ``x.dtype``; ``acc`` the updated accumulator.

    Example:
        >>> x, dy = torch.randn(6, 4), torch.randn(6, 3)
        >>> ids = torch.tensor([0, 1, 1, -1, 0, 2])
        >>> dw, acc = segmented_wgrad(x, dy, ids, num_domains=3)
        >>> torch.allclose(acc.sum(0) + dy[3:4].T @ x[3:4], dw, atol=1e-5)
        True
    """
    V.check_wgrad_inputs(x, dy, domain_ids, num_domains)
    shape = (num_domains, dy.shape[1], x.shape[1])
    if acc is None:
        acc = torch.zeros(shape, dtype=torch.float32, device=x.device)
    else:
        V.check_accumulator(acc, "acc", shape, x)
    if bias_acc is not None:
        V.check_accumulator(bias_acc, "bias_acc", (num_domains, dy.shape[1]), x)
    be = resolve_backend("segmented_wgrad", backend, x.device)
    if be != "torch" and x.dtype == torch.float64:
        raise TypeError(f"x: float64 inputs are supported by backend='torch' only, not {be!r}")
    if not isinstance(dw_from_domains, bool):
        raise TypeError(f"dw_from_domains must be a bool, got {type(dw_from_domains).__name__}")
    # Eagerly the implementation is called directly (see _dispatch.eager).
    op = _segmented_wgrad_impl if eager(x, dy) else _segmented_wgrad_op
    dw = op(
        x, dy, domain_ids, num_domains, acc, bias_acc, be, bool(check_ids), bool(check_finite),
        dw_from_domains,
    )  # fmt: skip
    return dw, acc
