"""segmented_wgrad (exact): the layer's weight gradient plus each domain's share of it."""

from __future__ import annotations

import torch

from . import _validate as V
from ._dispatch import get_impl, resolve_backend


def group_rows(domain_ids: torch.Tensor, num_domains: int):
    """Stable sort of rows by domain id.

    Returns ``(order, bounds, present)``: ``order`` int64 ``[N]`` permutation putting rows of
    the same domain together (ignored ``-1`` rows first), ``bounds`` int64 ``[m + 2]`` offsets
    so that rows of domain ``d`` are ``order[bounds[d + 1]:bounds[d + 2]]``, and ``present`` the
    python list of domain ids that have at least one row.
    """
    ids = domain_ids.to(torch.int64)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids + 1, minlength=num_domains + 1)
    bounds = torch.zeros(num_domains + 2, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=bounds[1:])
    present = (counts[1:] > 0).nonzero().flatten().tolist()
    return order, bounds, present


def segmented_wgrad_torch(
    x: torch.Tensor, dy: torch.Tensor, domain_ids: torch.Tensor, num_domains: int, acc: torch.Tensor
) -> torch.Tensor:
    """Torch backend: ``dW = dyᵀ x`` in the input dtype (the same GEMM autograd runs for
    ``nn.Linear``, so ``param.grad`` is bit-identical), then fp32 per-domain GEMMs into ``acc``."""
    dw = dy.t().mm(x)
    order, bounds, present = group_rows(domain_ids, num_domains)
    if present:
        xs = x.index_select(0, order).float()
        dys = dy.index_select(0, order).float()
        b = bounds.tolist()
        for d in present:
            lo, hi = b[d + 1], b[d + 2]
            acc[d].addmm_(dys[lo:hi].t(), xs[lo:hi])
    return dw


@torch.library.custom_op("rnb::segmented_wgrad", mutates_args=("acc",))
def _segmented_wgrad_op(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    acc: torch.Tensor,
    backend: str,
    check_finite: bool,
) -> torch.Tensor:
    V.check_id_values(domain_ids, num_domains)
    if check_finite:
        V.check_finite("x", x)
        V.check_finite("dy", dy)
    return get_impl("segmented_wgrad", backend)(x, dy, domain_ids, num_domains, acc)


@_segmented_wgrad_op.register_fake
def _(x, dy, domain_ids, num_domains, acc, backend, check_finite):
    return x.new_empty(dy.shape[1], x.shape[1])


def segmented_wgrad(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    acc: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    check_finite: bool = False,
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
        backend: ``"auto"`` (cuda > triton > torch on GPU, torch on CPU), ``"torch"``,
            ``"triton"`` or ``"cuda"``.
        check_finite: raise ``ValueError`` (before touching ``acc``) if ``x`` or ``dy`` hold
            NaN/Inf. Off by default: it costs a pass over both inputs.

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
    be = resolve_backend("segmented_wgrad", backend, x.device)
    if be != "torch" and x.dtype == torch.float64:
        raise TypeError(f"x: float64 inputs are supported by backend='torch' only, not {be!r}")
    dw = _segmented_wgrad_op(x, dy, domain_ids, num_domains, acc, be, bool(check_finite))
    return dw, acc
