"""Pure-PyTorch float64 references: the ground truth every backend is tested against.

These are written for clarity, not speed: explicit loops over domains, float64 throughout.
Tests and benchmarks import them; nothing on a hot path should.

The count-sketch hash is specified in :mod:`rnb_kernels.ops.sketch_hash`; the references use
it as is, so every backend is checked against the same statement.
"""

from __future__ import annotations

import torch

from .sketch_hash import sketch_hash

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
    dw, per_domain = segmented_wgrad_ref(x, dy, domain_ids, num_domains)
    if bias:
        per_domain = torch.cat(
            [per_domain, bias_grads_ref(dy, domain_ids, num_domains)[..., None]], -1
        )
    return dw, count_sketch_ref(per_domain, sketch_dim, seed, layer)


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
