"""Pure-PyTorch float64 references: the ground truth every backend is tested against.

These are written for clarity, not speed: explicit loops over domains, float64 throughout.
Tests and benchmarks import them; nothing on a hot path should.

The count-sketch hash is specified in :mod:`rnb_kernels.ops.sketch_hash`; the references use
it as is, so every backend is checked against the same statement.
"""

from __future__ import annotations

import torch

from .sketch_hash import PROJ_IN, PROJ_OUT, projection_hash, sketch_hash

# The references' name for the hash (tests and benchmarks import it from here).
sketch_hash_ref = sketch_hash


def count_sketch_ref(
    g: torch.Tensor, sketch_dim: int, seed: int = 0, layer: int = 0
) -> torch.Tensor:
    """Count-sketch of dense gradients.

    Args:
        g: ``[..., K_out, K_in]`` any float dtype.
        sketch_dim: number of buckets ``k``.

    Returns:
        float64 ``[..., k]`` with ``out[..., b] = sum_{(i,j): bucket=b} sign(i,j) * g[..., i, j]``.
    """
    k_out, k_in = g.shape[-2], g.shape[-1]
    bucket, sign = sketch_hash(k_out, k_in, sketch_dim, seed, layer, device=g.device)
    lead = g.shape[:-2]
    flat = (g.to(torch.float64) * sign).reshape(*lead, k_out * k_in)
    out = torch.zeros(*lead, sketch_dim, dtype=torch.float64, device=g.device)
    index = bucket.reshape(-1).expand_as(flat)
    return out.scatter_add_(-1, index.contiguous(), flat)


def segmented_wgrad_ref(
    x: torch.Tensor, dy: torch.Tensor, domain_ids: torch.Tensor, num_domains: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference of the exact segmented weight gradient.

    Args:
        x: ``[N, K_in]`` layer inputs.
        dy: ``[N, K_out]`` gradient w.r.t. the layer outputs.
        domain_ids: integer ``[N]``; ``-1`` rows count toward ``dW`` but no domain.
        num_domains: ``m``.

    Returns:
        ``(dW, per_domain)``: float64 ``[K_out, K_in]`` and float64 ``[m, K_out, K_in]``.
    """
    x64, dy64 = x.to(torch.float64), dy.to(torch.float64)
    per_domain = torch.zeros(
        num_domains, dy.shape[1], x.shape[1], dtype=torch.float64, device=x.device
    )
    for d in range(num_domains):
        rows = domain_ids == d
        if rows.any():
            per_domain[d] = dy64[rows].T @ x64[rows]
    return dy64.T @ x64, per_domain


def domain_sketch_ref(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    sketch_dim: int,
    seed: int = 0,
    layer: int = 0,
    bias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference of the count-sketched segmented weight gradient.

    With ``bias=True`` each domain's bias gradient ``Σ_{n∈d} dy_n`` is sketched too, as column
    ``K_in`` of the augmented ``[K_out, K_in + 1]`` gradient.

    Returns:
        ``(dW, sketch)``: float64 ``[K_out, K_in]`` and float64 ``[m, sketch_dim]``.
    """
    dw, per_domain = augmented_grads_ref(x, dy, domain_ids, num_domains, bias)
    return dw, count_sketch_ref(per_domain, sketch_dim, seed, layer)


def augmented_grads_ref(
    x: torch.Tensor, dy: torch.Tensor, domain_ids: torch.Tensor, num_domains: int, bias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dW, G)``: float64 ``dW`` ``[K_out, K_in]`` and each domain's gradient ``G``
    ``[m, K_out, K_in']``, augmented with its bias gradient as column ``K_in`` when ``bias``
    (the ones column every sketched or projected layer with a bias carries)."""
    dw, per_domain = segmented_wgrad_ref(x, dy, domain_ids, num_domains)
    if bias:
        per_domain = torch.cat(
            [per_domain, bias_grads_ref(dy, domain_ids, num_domains)[..., None]], -1
        )
    return dw, per_domain


def bias_grads_ref(dy: torch.Tensor, domain_ids: torch.Tensor, num_domains: int) -> torch.Tensor:
    """float64 ``[m, K_out]``: each domain's bias gradient ``Σ_{n: id_n = d} dy_n``."""
    out = torch.zeros(num_domains, dy.shape[1], dtype=torch.float64, device=dy.device)
    for d in range(num_domains):
        out[d] = dy.to(torch.float64)[domain_ids == d].sum(0)
    return out


def gram_ref(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """float64 ``A Aᵀ`` (``[m, m]``), or ``A bᵀ`` for ``b`` of shape ``[P]`` (``[m]``) or ``[r, P]``
    (``[m, r]``). ``a`` is ``[m, P]``; computed by explicit row-pair dot products."""
    a64 = a.to(torch.float64)
    if b is None:
        m = a.shape[0]
        out = torch.empty(m, m, dtype=torch.float64, device=a.device)
        for i in range(m):
            for j in range(i, m):
                out[i, j] = out[j, i] = torch.dot(a64[i], a64[j])
        return out
    b64 = b.to(torch.float64)
    if b64.dim() == 1:
        return (
            torch.stack([torch.dot(a64[i], b64) for i in range(a.shape[0])])
            if len(a)
            else (torch.zeros(0, dtype=torch.float64, device=a.device))
        )
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            out[i, j] = torch.dot(a64[i], b64[j])
    return out


# --------------------------------------------------------------------------- projected mode
#
# Specification of ``mode="projected"`` (:func:`rnb_kernels.ops.domain_projection`).
#
# State. Domain d's gradient ``g_d = Σ_{n∈d} dy_nᵀ x_n`` (``[K_out, K_in]``) is kept as
# ``P_out g_d`` (``[proj_dim, K_in]``), or with ``proj_in_dim`` as ``P_out g_d P_inᵀ``
# (``[proj_dim, proj_in_dim]``). ``P_out`` is the count-sketch of ``projection_hash(side=OUT)``
# over the *global* output index ``i = row_offset + local row``: ``P_out[b(i), i] = s(i)``.
# ``P_in`` is the independent count-sketch ``projection_hash(side=IN)`` over input features.
#
# Bias. A layer with bias is projected as the augmented ``[g_d | β_d]`` with
# ``β_d = Σ_{n∈d} dy_n``, i.e. ``x`` augmented with a column of ones (input feature
# ``j = K_in``): the state gets one extra column ``P_out β_d`` (without ``P_in``), or the ones
# column is hashed by ``P_in`` like any other input feature (with ``P_in``).
#
# Linearity. The state is linear in (dy, x) row by row and ``P`` depends only on (seed, layer,
# global index): states of micro-batches, steps and data-parallel ranks add up, and so do the
# states of vocabulary shards (disjoint ``row_offset`` ranges) of one layer.
#
# Unbiasedness. ``<P_out A, P_out B> = Σ_{i,i'} [b(i) = b(i')] s(i) s(i') (A Bᵀ)_{ii'}``; with
# ``E[s(i) s(i')] = [i = i']`` this has mean ``tr(A Bᵀ) = <A, B>``. Same argument on each side
# for ``P_out A P_inᵀ``.
#
# Variance (output side only; hash idealised as 4-wise independent over seeds; ``M = A Bᵀ``,
# ``A, B`` the augmented ``[K_out, K_in(+1)]`` gradients of two domains):
#
#     Var <P_out A, P_out B> = (‖M‖_F² + tr(M²) - 2 Σ_i M_ii²) / proj_dim.
#
# This is sketch mode's ``(|a|²|b|² + <a, b>² - 2 Σ_u a_u² b_u²) / k`` with ``|a|²|b|²`` replaced
# by ``‖A Bᵀ‖_F²`` and ``<a, b>²`` by ``tr((A Bᵀ)²)`` -- i.e. a count-sketch with
# ``k = proj_dim · K_in`` buckets on the *structured* hash ``bucket(i, j) = b(i) · K_in + j``,
# ``sign(i, j) = s(i)``, whose collisions only pair elements of the same column. How much that
# structure costs depends on the gradients: when the columns of ``A`` and ``B`` are
# uncorrelated, ``‖A Bᵀ‖_F² ≈ ‖A‖²‖B‖² / K_in`` and the variance is that of a free sketch with
# ``proj_dim · K_in`` buckets; for rank-one gradients ``A = u vᵀ`` it is that of a sketch of
# ``u`` alone with ``proj_dim`` buckets (``‖A Bᵀ‖_F² = ‖A‖²‖B‖²``). Both bounds are attained
# by no real gradient; ``benchmarks/results/projection_error_cpu.md`` measures where real
# LM-head gradients fall. With ``P_in`` as well (law of total variance, ``P_in`` independent of
# ``P_out``): the variance above plus ``E[(‖M'‖_F² + tr(M'²) - 2 Σ_j M'_jj²)] / proj_in_dim``
# with ``M' = (P_out A)ᵀ (P_out B)``, whose mean is the same expression for ``Aᵀ B`` plus
# ``O(1 / proj_dim)``. Input features are hashed by their local index ``j`` (``j = K_in`` for the
# ones column); only the output side takes a ``row_offset``.


def projection_matrix_ref(
    k: int, proj_dim: int, seed: int = 0, layer: int = 0, offset: int = 0, side: int = PROJ_OUT
) -> torch.Tensor:
    """float64 dense ``[proj_dim, k]`` count-sketch projection ``P`` of features
    ``offset .. offset+k-1`` (``P[bucket(f), f] = sign(f)``), built from
    :func:`rnb_kernels.ops.sketch_hash.projection_hash`."""
    bucket, sign = projection_hash(k, proj_dim, seed, layer, offset, side)
    out = torch.zeros(proj_dim, k, dtype=torch.float64)
    out[bucket, torch.arange(k)] = sign
    return out


def domain_projection_ref(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    proj_dim: int,
    seed: int = 0,
    layer: int = 0,
    row_offset: int = 0,
    bias: bool = False,
    proj_in_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference of the projected segmented weight gradient (spec above).

    Projects the *exact* per-domain gradients: ``proj[d] = P_out [g_d | β_d] (P_inᵀ)`` with
    the ``β_d`` column only when ``bias`` and ``P_in`` only when ``proj_in_dim`` is given.

    Returns:
        ``(dW, proj)``: float64 ``[K_out, K_in]`` and float64 ``[m, proj_dim, K_in']`` with
        ``K_in' = proj_in_dim`` or ``K_in + bias``.
    """
    dw, per_domain = augmented_grads_ref(x, dy, domain_ids, num_domains, bias)
    p_out = projection_matrix_ref(dy.shape[1], proj_dim, seed, layer, row_offset, PROJ_OUT)
    proj = _input_projection(p_out @ per_domain.cpu(), proj_in_dim, seed, layer)
    return dw, proj.to(x.device)


def _input_projection(t: torch.Tensor, proj_in_dim: int | None, seed: int, layer: int):
    """``t P_inᵀ`` over ``t``'s last dim (the input features), or ``t`` without ``proj_in_dim``."""
    if proj_in_dim is None:
        return t
    return t @ projection_matrix_ref(t.shape[-1], proj_in_dim, seed, layer, 0, PROJ_IN).T


def domain_rows_ref(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    index: torch.Tensor,
    seed: int = 0,
    layer: int = 0,
    bias: bool = False,
    proj_in_dim: int | None = None,
) -> torch.Tensor:
    """float64 ``[m, h, K_in']``: rows ``index`` of each domain's augmented gradient
    ``[g_d | β_d]`` (``β_d`` only with ``bias``), times ``P_inᵀ`` with ``proj_in_dim`` -- what
    ``domain_projection(..., exact_index=index, exact=...)`` adds to ``exact``. ``P_in`` is
    the input projection of :func:`domain_projection_ref` (same seed and layer)."""
    _, per_domain = augmented_grads_ref(x, dy, domain_ids, num_domains, bias)
    rows = per_domain.cpu()[:, index.cpu()]
    return _input_projection(rows, proj_in_dim, seed, layer).to(x.device)
