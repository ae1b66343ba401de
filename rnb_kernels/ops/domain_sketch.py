"""segmented_wgrad (sketch): the layer's weight gradient plus a count-sketch of each domain's
share. No ``[m, K_out, K_in]`` memory; the hash is :mod:`rnb_kernels.ops.sketch_hash`."""

from __future__ import annotations

import functools

import torch

from . import _validate as V
from . import sketch_hash as H
from ._dispatch import eager, get_impl, resolve_backend
from .cpu_fold import fold_flat, signed_route
from .segmented_wgrad import domain_bias_sums, domain_tiles, wgrad_from_domains

_U32_MAX = 2**32 - 1


def _cuda_takes_row_offset() -> bool:
    # Builds of rnb_kernels._C older than the row_offset argument hash rows from 0.
    from .cuda import extension

    return bool(getattr(extension(), "DOMAIN_SKETCH_ROW_OFFSET", False))


@functools.lru_cache(maxsize=8)
def _signed_flat_hash(
    k_out: int,
    k_in: int,
    sketch_dim: int,
    seed: int,
    layer: int,
    device: torch.device,
    row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached ``[K_out*K_in]`` :func:`~rnb_kernels.ops.cpu_fold.signed_route` of every element,
    as int64 and as int32 (the index the compiled CPU fold reads)."""
    bucket, sign = H.sketch_hash(
        k_out, k_in, sketch_dim, seed, layer, device, torch.float32, row_offset=row_offset
    )
    signed = signed_route(bucket, sign, sketch_dim).reshape(-1)
    return signed, signed.to(torch.int32)


@functools.lru_cache(maxsize=32)
def _bias_hash(
    k_out: int,
    k_in: int,
    sketch_dim: int,
    seed: int,
    layer: int,
    device: torch.device,
    row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    return H.bias_hash(k_out, k_in, sketch_dim, seed, layer, device, row_offset=row_offset)


def domain_sketch_torch(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    sketch: torch.Tensor,
    seed: int,
    layer: int,
    row_offset: int = 0,
    dw_from_domains: bool = False,
) -> torch.Tensor:
    """Torch backend: one fp32 tile per present domain, folded into ``sketch`` (compiled on
    CPU tensors, else ``index_add_``: :func:`~rnb_kernels.ops.cpu_fold.fold_flat`).

    ``dW`` is ``dyᵀ x`` (bit-identical to autograd's), or with ``dw_from_domains`` (not for
    float64) the sum of the tiles, which saves one GEMM (see :func:`wgrad_from_domains`)."""
    k = sketch.shape[1]
    key = (dy.shape[1], x.shape[1], k, seed, layer, x.device, row_offset)

    def fold(d: int, tile: torch.Tensor) -> None:
        # Hashed only when a domain is present (cached across calls).
        both = fold_flat(tile, *_signed_flat_hash(*key), 2 * k)
        sketch[d] += both[:k] - both[k:]

    if dw_from_domains and x.dtype != torch.float64:
        return wgrad_from_domains(x, dy, domain_ids, num_domains, fold)
    dw = dy.t().mm(x)
    for d, tile in domain_tiles(x, dy, domain_ids, num_domains):
        fold(d, tile)
    return dw


def _domain_sketch_impl(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    sketch: torch.Tensor,
    seed: int,
    layer: int,
    bias: bool,
    backend: str,
    check_ids: bool,
    check_finite: bool,
    row_offset: int = 0,
    dw_from_domains: bool = False,
) -> torch.Tensor:
    V.check_values(x, dy, domain_ids, num_domains, check_ids, check_finite)
    if backend == "torch":
        dw = domain_sketch_torch(
            x, dy, domain_ids, num_domains, sketch, seed, layer, row_offset, dw_from_domains
        )
    else:  # the fused kernels form dW themselves
        impl = get_impl("domain_sketch", backend)
        dw = impl(x, dy, domain_ids, num_domains, sketch, seed, layer, row_offset)
    if bias:
        bucket, sign = _bias_hash(
            dy.shape[1], x.shape[1], sketch.shape[1], seed, layer, x.device, row_offset
        )
        sketch.index_add_(1, bucket, domain_bias_sums(dy, domain_ids, num_domains) * sign)
    return dw


_domain_sketch_op = torch.library.custom_op(
    "rnb::domain_sketch", _domain_sketch_impl, mutates_args=("sketch",)
)


@_domain_sketch_op.register_fake
def _(
    x, dy, domain_ids, num_domains, sketch, seed, layer, bias, backend, check_ids, check_finite,
    row_offset=0, dw_from_domains=False,
):  # fmt: skip
    return x.new_empty(dy.shape[1], x.shape[1])


def domain_sketch(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    sketch: torch.Tensor | None = None,
    sketch_dim: int = 8192,
    seed: int = 0,
    layer: int = 0,
    backend: str = "auto",
    *,
    bias: bool = False,
    check_ids: bool = True,
    check_finite: bool = False,
    row_offset: int = 0,
    dw_from_domains: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight gradient of ``y = x Wᵀ`` plus a count-sketch of each domain's share.

    Element ``(i, j)`` of domain ``d``'s gradient tile is added, times ``sign(i, j)``, to
    ``sketch[d, bucket(i, j)]``; the hash depends only on ``(seed, layer, i, j)`` so sketches
    add across steps and ranks, and ``<S g_a, S g_b>`` is an unbiased estimate of
    ``<g_a, g_b>`` with variance about ``(|g_a|²|g_b|² + <g_a, g_b>²) / sketch_dim``.

    Args:
        x: ``[N, K_in]`` float16 / bfloat16 / float32 (float64 on the torch backend).
        dy: ``[N, K_out]``, same dtype and device as ``x``.
        domain_ids: int32/int64 ``[N]`` in ``[-1, num_domains)``; ``-1`` rows count toward
            ``dW`` only.
        num_domains: ``m >= 1``.
        sketch: float32 ``[m, sketch_dim]`` contiguous, updated in place; ``None`` allocates
            a zeroed one of width ``sketch_dim``.
        sketch_dim: buckets ``k`` (used when ``sketch`` is None; else taken from it).
        seed, layer: hash key, integers in ``[0, 2**32)``. Use a distinct ``layer`` per
            tracked weight so different layers' sketches are independent.
        backend: as in :func:`segmented_wgrad`.
        bias: also sketch each domain's bias gradient ``Σ_{n∈d} dy_n``, as column ``K_in`` of
            the augmented ``[W | b]`` (so a layer with bias is one ``[K_out, K_in + 1]`` sketch).
        check_ids: as in :func:`segmented_wgrad`.
        check_finite: raise ``ValueError`` before touching ``sketch`` on NaN/Inf inputs.
        row_offset: global index of ``dy``'s first column when this is a row shard of a larger
            weight (rows ``[row_offset, row_offset + K_out)``, a vocabulary-parallel head): rows
            are hashed by global index, so the shards' sketches add up to the full weight's.
            ``row_offset + K_out <= 2**32``.
        dw_from_domains: as in :func:`segmented_wgrad` (torch backend: ``dW`` as the sum of
            the domain tiles, one GEMM less, not bit-identical to ``dyᵀ x``).

    Returns:
        ``(dW, sketch)``: ``dW`` ``[K_out, K_in]`` in ``x.dtype`` and the updated sketch.

    Example:
        >>> x, dy = torch.randn(5, 4), torch.randn(5, 3)
        >>> dw, s = domain_sketch(x, dy, torch.tensor([0, 0, 1, 1, -1]), 2, sketch_dim=64)
        >>> s.shape
        torch.Size([2, 64])
        >>> # Two row shards of the same gradient add up to its sketch.
        >>> ids = torch.tensor([0, 0, 1, 1, -1])
        >>> _, top = domain_sketch(x, dy[:, :2], ids, 2, sketch_dim=64)
        >>> _, bot = domain_sketch(x, dy[:, 2:], ids, 2, sketch_dim=64, row_offset=2)
        >>> torch.allclose(top + bot, s, atol=1e-5)
        True
    """
    V.check_wgrad_inputs(x, dy, domain_ids, num_domains)
    V.check_int(seed, "seed", low=0, high=_U32_MAX)
    V.check_int(layer, "layer", low=0, high=_U32_MAX)
    V.check_int(row_offset, "row_offset", low=0, high=_U32_MAX + 1 - dy.shape[1])
    if sketch is None:
        V.check_int(sketch_dim, "sketch_dim", low=1)
        sketch = torch.zeros(num_domains, sketch_dim, dtype=torch.float32, device=x.device)
    else:
        V.check_tensor(sketch, "sketch", ndim=2)
        V.check_accumulator(sketch, "sketch", (num_domains, sketch.shape[1]), x)
        if sketch.shape[1] < 1:
            raise ValueError("sketch must have at least one column (sketch_dim >= 1)")
    be = resolve_backend("domain_sketch", backend, x.device)
    if be != "torch" and x.dtype == torch.float64:
        raise TypeError(f"x: float64 inputs are supported by backend='torch' only, not {be!r}")
    if row_offset and be == "cuda" and not _cuda_takes_row_offset():
        raise ValueError(
            "row_offset: this build's cuda domain_sketch kernel hashes rows from 0; "
            "rebuild rnb_kernels._C or use backend='triton' / 'torch' for row-sharded weights"
        )
    if not isinstance(dw_from_domains, bool):
        raise TypeError(f"dw_from_domains must be a bool, got {type(dw_from_domains).__name__}")
    # Eagerly the implementation is called directly (see _dispatch.eager).
    op = _domain_sketch_impl if eager(x, dy) else _domain_sketch_op
    dw = op(
        x, dy, domain_ids, num_domains, sketch, seed, layer, bool(bias), be,
        bool(check_ids), bool(check_finite), int(row_offset), dw_from_domains,
    )  # fmt: skip
    return dw, sketch
