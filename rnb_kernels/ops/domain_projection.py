"""segmented_wgrad (projected): the layer's weight gradient plus a random projection of each
domain's share, ``P_out g_d`` (``[proj_dim, K_in]``) or ``P_out g_d P_inᵀ``.

The projection is specified in :mod:`rnb_kernels.ops.reference` (section "projected mode") and
hashed by :func:`rnb_kernels.ops.sketch_hash.projection_hash`. Because ``P_out g_d =
(dy_d P_outᵀ)ᵀ x_d``, the work beyond ``dW`` is one pass over ``dy`` (its columns folded into
``proj_dim`` signed buckets) and a ``[proj_dim, N] x [N, K_in]`` GEMM split by domain: no
``[K_out, K_in]`` tile per domain is ever formed.
"""

from __future__ import annotations

import functools

import torch

from . import _validate as V
from . import sketch_hash as H
from ._dispatch import eager, get_impl, resolve_backend
from .cpu_fold import ColumnHash, fold_columns
from .segmented_wgrad import domain_row_blocks

_U32 = 2**32


@functools.lru_cache(maxsize=64)
def _column_hash(
    k: int, proj_dim: int, seed: int, layer: int, offset: int, side: int, device: torch.device
) -> ColumnHash:
    """The count-sketch of ``k`` features as the folds read it (built once per layer)."""
    bucket, sign = H.projection_hash(k, proj_dim, seed, layer, offset, side, device)
    return ColumnHash.make(bucket, sign, proj_dim)


@functools.lru_cache(maxsize=64)
def _feature_hash(index: int, proj_dim: int, seed: int, layer: int, side: int) -> tuple[int, float]:
    """``(bucket, sign)`` of one feature, as Python numbers (the bias's ones column)."""
    bucket, sign = H.projection_hash(1, proj_dim, seed, layer, index, side)
    return int(bucket[0]), float(sign[0])


def project_columns_torch(
    t: torch.Tensor, proj_dim: int, seed: int, layer: int, offset: int, side: int
) -> torch.Tensor:
    """float32 ``[N, proj_dim]`` = ``t Pᵀ`` for the count-sketch ``P`` of ``t``'s columns.

    Args:
        t: ``[N, K]`` float tensor (any strides); column ``c`` is feature ``offset + c``.
        proj_dim, seed, layer, side: as in :func:`rnb_kernels.ops.sketch_hash.projection_hash`.

    The fold is :func:`~rnb_kernels.ops.cpu_fold.fold_columns` (compiled on CPU tensors, else
    ``index_add_`` along columns into ``[N, 2·proj_dim]``). Measured on the 2-core CPU at
    ``N=1024, K=8192, proj_dim=128`` (fp32), ``index_add_`` beat a dense ``t @ Pᵀ`` (~2x),
    ``t * sign`` followed by a signed ``index_add_`` or ``scatter_add_`` (~2x), a CSR sparse
    matmul, a bucket-sorted gather with ``segment_reduce`` or a padded reshape-sum (3-5x); the
    compiled fold takes a fraction of ``index_add_``'s time (see :mod:`.cpu_fold`).

    Example:
        >>> y = project_columns_torch(torch.ones(2, 5), 4, seed=0, layer=0, offset=0, side=0)
        >>> y.shape, y.dtype
        (torch.Size([2, 4]), torch.float32)
    """
    return fold_columns(t, _column_hash(t.shape[1], proj_dim, seed, layer, offset, side, t.device))


def project_columns_keeping(
    t: torch.Tensor,
    index: torch.Tensor,
    proj_dim: int,
    seed: int,
    layer: int,
    offset: int,
    side: int,
) -> torch.Tensor:
    """float32 ``[N, proj_dim + h]``: ``t Pᵀ`` (every column projected, as
    :func:`project_columns_torch`) beside the ``h`` columns ``t[:, index]`` kept as they are,
    from one pass over ``t`` (:func:`~rnb_kernels.ops.cpu_fold.fold_columns` with ``keep``).

    Args:
        t: ``[N, K]`` float tensor; column ``c`` is feature ``offset + c``.
        index: int64 ``[h]`` distinct columns of ``t``, on ``t``'s device.
        proj_dim, seed, layer, offset, side: as in :func:`project_columns_torch`.

    Example:
        >>> t, idx = torch.randn(3, 9), torch.tensor([2, 7])
        >>> both = project_columns_keeping(t, idx, 4, seed=0, layer=0, offset=0, side=0)
        >>> full = project_columns_torch(t, 4, seed=0, layer=0, offset=0, side=0)
        >>> torch.allclose(both[:, :4], full, atol=1e-6), torch.equal(both[:, 4:], t[:, idx])
        (True, True)
    """
    h = _column_hash(t.shape[1], proj_dim, seed, layer, offset, side, t.device)
    return fold_columns(t, h, keep=index)


def project_rows(
    rows: torch.Tensor,
    index: torch.Tensor,
    k_out: int,
    proj_dim: int,
    seed: int,
    layer: int,
    row_offset: int = 0,
) -> torch.Tensor:
    """float32 ``[G, proj_dim, K']``: ``P_out`` applied to a layer's gradient that is zero
    except on the output rows ``index``, given as ``rows`` ``[G, h, K']``.

    Projected mode keeps the heaviest output rows of a layer exactly beside the projection of
    all rows (:class:`~rnb_kernels.DomainGradientTracker`'s ``exact_rows``); this is the part of
    the projection those rows contributed, which the tracker subtracts so that no heavy row
    collides with another in a bucket.

    Args:
        rows: float32 ``[G, h, K']``, row ``r`` of group ``g`` being output row ``index[r]``.
        index: int64 ``[h]`` local output rows, distinct, in ``[0, k_out)``, on ``rows``' device.
        k_out, proj_dim, seed, layer, row_offset: the layer's hash, as in
            :func:`domain_projection` (``row_offset`` = the global index of local row 0).

    Example:
        >>> g = torch.randn(1, 6, 3)
        >>> idx = torch.tensor([1, 4])
        >>> part = g.clone(); part[:, [0, 2, 3, 5]] = 0
        >>> rest = project_columns_torch(part[0].t(), 4, seed=0, layer=0, offset=0, side=0)
        >>> torch.allclose(project_rows(g[:, idx], idx, 6, 4, 0, 0)[0], rest.t(), atol=1e-6)
        True
    """
    route = _column_hash(k_out, proj_dim, seed, layer, row_offset, H.PROJ_OUT, rows.device).route
    s = route.index_select(0, index)
    out = torch.zeros(rows.shape[0], 2 * proj_dim, rows.shape[2], dtype=torch.float32,
                      device=rows.device)  # fmt: skip
    out.index_add_(1, s, rows.float())
    return out[:, :proj_dim] - out[:, proj_dim:]


def add_ones_column_projection(xp: torch.Tensor, k_in: int, seed: int, layer: int) -> torch.Tensor:
    """Add the input projection of the bias's ones column (feature ``j = K_in``) to every row
    of ``xp`` ``[N, proj_in_dim]`` in place."""
    bucket, sign = _feature_hash(k_in, xp.shape[1], seed, layer, H.PROJ_IN)
    xp[:, bucket] += sign
    return xp


def input_side(
    x: torch.Tensor, proj_in_dim: int | None, bias: bool, seed: int, layer: int
) -> torch.Tensor:
    """float32 ``[N, K_in']``: ``x`` with the ones column appended (``bias``), or its input
    projection (``proj_in_dim``) -- the right factor of every domain's state."""
    if proj_in_dim is None:
        xf = x.float()
        if bias:
            xf = torch.cat([xf, xf.new_ones(x.shape[0], 1)], 1)
        return xf
    xp = project_columns_torch(x, proj_in_dim, seed, layer, 0, H.PROJ_IN)
    return add_ones_column_projection(xp, x.shape[1], seed, layer) if bias else xp


def domain_projection_torch(
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
    exact_index: torch.Tensor | None = None,
    exact: torch.Tensor | None = None,
) -> None:
    """Torch backend: ``proj[d] += (dy_d P_outᵀ)ᵀ x_d`` per present domain, in fp32, and with
    ``exact_index`` also ``exact[d] += dy_d[:, exact_index]ᵀ x_d`` (``dW`` is the caller's).

    ``dy`` is folded for every row (ignored rows included) before rows are grouped: the fold
    is the one pass over ``[N, K_out]`` (it also gathers the exact rows' columns), and grouping
    then moves only ``[N, proj_dim + h]``."""
    p = proj.shape[1]
    if exact_index is None:
        dyp = project_columns_torch(dy, p, seed, layer, row_offset, H.PROJ_OUT)
    else:
        dyp = project_columns_keeping(dy, exact_index, p, seed, layer, row_offset, H.PROJ_OUT)
    xin = input_side(x, proj_in_dim, bias, seed, layer)
    for d, parts in domain_row_blocks(xin, dyp, domain_ids, num_domains):
        for dys, xs in parts:
            proj[d].addmm_(dys[:, :p].t(), xs)
            if exact is not None:
                exact[d].addmm_(dys[:, p:].t(), xs)


def _domain_projection_impl(
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
    backend: str,
    check_ids: bool,
    check_finite: bool,
    exact_index: torch.Tensor | None = None,
    exact: torch.Tensor | None = None,
    need_dw: bool = True,
) -> torch.Tensor:
    V.check_values(x, dy, domain_ids, num_domains, check_ids, check_finite)
    if check_ids and exact_index is not None:
        V.check_distinct_index(exact_index, "exact_index", dy.shape[1])
    # Autograd's own GEMM, so param.grad is bit-identical to an untracked backward; skipped
    # when only the statistics are wanted (a target gradient), where it is thrown away.
    dw = dy.t().mm(x) if need_dw else x.new_empty(0, x.shape[1])
    args = (x, dy, domain_ids, num_domains, proj, seed, layer, row_offset, proj_in_dim, bias)
    if backend == "torch":
        domain_projection_torch(*args, exact_index, exact)
        return dw
    get_impl("domain_projection", backend)(*args)
    if exact is not None:
        # The projection kernels have no exact-rows path: the rows' shares go through the
        # segmented kernel of the same backend (its dW of these columns is not needed).
        xin = input_side(x, proj_in_dim, bias, seed, layer)
        dyh = dy.index_select(1, exact_index).float()
        get_impl("segmented_wgrad", backend)(xin, dyh, domain_ids, num_domains, exact)
    return dw


_domain_projection_op = torch.library.custom_op(
    "rnb::domain_projection", _domain_projection_impl, mutates_args=("proj", "exact")
)


@_domain_projection_op.register_fake
def _(
    x, dy, domain_ids, num_domains, proj, seed, layer, row_offset, proj_in_dim, bias, backend,
    check_ids, check_finite, exact_index=None, exact=None, need_dw=True,
):  # fmt: skip
    return x.new_empty(dy.shape[1] if need_dw else 0, x.shape[1])


def projection_width(k_in: int, bias: bool, proj_in_dim: int | None) -> int:
    """Columns of one domain's state: ``proj_in_dim``, else ``K_in`` (+1 with a bias)."""
    return proj_in_dim if proj_in_dim is not None else k_in + int(bool(bias))


def domain_projection(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    proj: torch.Tensor | None = None,
    proj_dim: int = 128,
    seed: int = 0,
    layer: int = 0,
    row_offset: int = 0,
    backend: str = "auto",
    *,
    bias: bool = False,
    proj_in_dim: int | None = None,
    check_ids: bool = True,
    check_finite: bool = False,
    exact_index: torch.Tensor | None = None,
    exact: torch.Tensor | None = None,
    need_dw: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Weight gradient of ``y = x Wᵀ`` plus a count-sketch projection of each domain's share.

    ``proj[d] += P_out [g_d | β_d] (P_inᵀ)`` where ``g_d = Σ_{n∈d} dy_nᵀ x_n``, ``β_d =
    Σ_{n∈d} dy_n`` (only with ``bias``) and ``P_in`` only with ``proj_in_dim``. ``P_out``
    hashes *global* output features ``row_offset + i``, so the states of vocabulary shards of
    one layer (and of micro-batches, steps, ranks) add up. ``<proj[a], proj[b]>`` is an unbiased
    estimate of ``<g_a, g_b>``; see :mod:`rnb_kernels.ops.reference` for the variance.

    Args:
        x: ``[N, K_in]`` float16 / bfloat16 / float32 (float64 on the torch backend).
        dy: ``[N, K_out]``, same dtype and device as ``x``.
        domain_ids: int32/int64 ``[N]`` in ``[-1, num_domains)``; ``-1`` rows count toward
            ``dW`` only.
        num_domains: ``m >= 1``.
        proj: float32 ``[m, proj_dim, K_in']`` contiguous, updated in place, with ``K_in' =
            proj_in_dim`` or ``K_in + bias``; ``None`` allocates a zeroed one.
        proj_dim: rows of the output projection (used when ``proj`` is None; else its
            ``shape[1]``).
        seed, layer: hash key, integers in ``[0, 2**32)``; use a distinct ``layer`` per weight.
        row_offset: global index of ``dy``'s first column (a vocabulary shard's first row of
            ``W``); ``row_offset + K_out <= 2**32``.
        backend: ``"auto"`` (triton on GPU tensors, torch on CPU tensors), ``"torch"`` or
            ``"triton"``.
        bias: also project each domain's bias gradient, as a ones column appended to ``x``.
        proj_in_dim: also project the input side to this many columns (for wide ``K_in``).
        check_ids: as in :func:`rnb_kernels.ops.segmented_wgrad`; also checks that
            ``exact_index`` holds distinct rows in ``[0, K_out)`` (a host sync).
        check_finite: raise ``ValueError`` before touching ``proj`` on NaN/Inf inputs.
        exact_index: int64 ``[h]`` distinct local output rows to keep exactly as well (the
            tracker's heaviest rows); needs ``exact``. ``proj`` still projects every row.
        exact: float32 ``[m, h, K_in']`` contiguous, same ``K_in'`` as ``proj``; updated in
            place with ``exact[d] += [g_d | β_d][exact_index] (P_inᵀ)``, the rows the projection
            would mix with others. On the torch backend the one fold of ``dy`` also gathers
            these columns.
        need_dw: ``False`` skips the ``dW`` GEMM (returned as ``None``) when only the state is
            wanted, e.g. for a target set's gradient.

    Returns:
        ``(dW, proj)``: ``dW = dyᵀ x`` ``[K_out, K_in]`` in ``x.dtype`` (bit-identical to
        ``dy.t().mm(x)`` on every backend; ``None`` with ``need_dw=False``) and the updated
        state.

    Example:
        >>> x, dy = torch.randn(5, 4), torch.randn(5, 3)
        >>> dw, p = domain_projection(x, dy, torch.tensor([0, 0, 1, 1, -1]), 2, proj_dim=8,
        ...                           bias=True)
        >>> p.shape, torch.equal(dw, dy.t().mm(x))
        (torch.Size([2, 8, 5]), True)
        >>> rows = torch.zeros(2, 1, 5)
        >>> _ = domain_projection(x, dy, torch.tensor([0, 0, 1, 1, -1]), 2, proj_dim=8,
        ...                       bias=True, exact_index=torch.tensor([2]), exact=rows)
        >>> torch.allclose(rows[0, 0, :4], dy[:2, 2] @ x[:2], atol=1e-6)
        True
    """
    V.check_wgrad_inputs(x, dy, domain_ids, num_domains)
    V.check_int(seed, "seed", low=0, high=_U32 - 1)
    V.check_int(layer, "layer", low=0, high=_U32 - 1)
    V.check_int(row_offset, "row_offset", low=0, high=_U32 - dy.shape[1])
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
    if proj_in_dim is not None:
        V.check_int(proj_in_dim, "proj_in_dim", low=1)
    width = projection_width(x.shape[1], bias, proj_in_dim)
    if proj is None:
        V.check_int(proj_dim, "proj_dim", low=1)
        proj = torch.zeros(num_domains, proj_dim, width, dtype=torch.float32, device=x.device)
    else:
        V.check_tensor(proj, "proj", ndim=3)
        if proj.shape[1] < 1:
            raise ValueError("proj must have at least one row per domain (proj_dim >= 1)")
        V.check_accumulator(proj, "proj", (num_domains, proj.shape[1], width), x)
    if (exact_index is None) != (exact is None):
        raise ValueError("exact_index and exact must be given together")
    if exact_index is not None:
        V.check_tensor(exact_index, "exact_index", ndim=1, dtypes=(torch.int64,))
        if exact_index.device != x.device:
            raise ValueError(f"exact_index must be on {x.device}, got {exact_index.device}")
        V.check_accumulator(exact, "exact", (num_domains, exact_index.shape[0], width), x)
    be = resolve_backend("domain_projection", backend, x.device)
    if be != "torch" and x.dtype == torch.float64:
        raise TypeError(f"x: float64 inputs are supported by backend='torch' only, not {be!r}")
    if not isinstance(need_dw, bool):
        raise TypeError(f"need_dw must be a bool, got {type(need_dw).__name__}")
    # Eagerly the implementation is called directly: the custom op is what the compiler needs,
    # and its dispatch alone costs about 0.25 ms per call on the CPU.
    op = _domain_projection_impl if eager(x, dy) else _domain_projection_op
    dw = op(
        x, dy, domain_ids, num_domains, proj, seed, layer, row_offset, proj_in_dim, bias, be,
        bool(check_ids), bool(check_finite), exact_index, exact, need_dw,
    )  # fmt: skip
    return (dw if need_dw else None), proj
