"""Pure-PyTorch float64 references: the ground truth every backend is tested against.

These are written for clarity, not speed: explicit loops over domains, float64 throughout.
Tests and benchmarks import them; nothing on a hot path should.

Count-sketch hash (shared by every backend, bit for bit)
--------------------------------------------------------
All arithmetic is on unsigned 32-bit integers (wrap-around mod 2**32). With
``fmix32`` the MurmurHash3 finaliser::

    row_key(seed, layer, i) = fmix32(seed * 0x9E3779B9 ^ layer * 0x85EBCA6B ^ i * 0xC2B2AE35)
    h(i, j)                 = fmix32(row_key + j * 0x27D4EB2F)
    bucket(i, j)            = (h & 0x7FFFFFFF) % k
    sign(i, j)              = +1 if (h >> 31) == 0 else -1

``i`` indexes the output features (rows of the weight, ``K_out``) and ``j`` the input
features (``K_in``). Because the hash depends only on (seed, layer, i, j), sketches are
linear: sketches of different steps, micro-batches and ranks add up to the sketch of the sum.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_C_SEED = 0x9E3779B9
_C_LAYER = 0x85EBCA6B
_C_ROW = 0xC2B2AE35
_C_COL = 0x27D4EB2F


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 finaliser on int64 tensors holding uint32 values (result in [0, 2**32))."""
    # int64 products of two uint32 values may wrap past 2**63; the low 32 bits stay exact.
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    h = h ^ (h >> 16)
    return h


def sketch_hash_ref(
    k_out: int, k_in: int, sketch_dim: int, seed: int = 0, layer: int = 0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets and signs of the count-sketch for a ``[k_out, k_in]`` weight.

    Returns:
        ``bucket``: int64 ``[k_out, k_in]`` in ``[0, sketch_dim)``;
        ``sign``: float64 ``[k_out, k_in]`` in ``{-1, +1}``.

    Example:
        >>> b, s = sketch_hash_ref(3, 5, 16, seed=1)
        >>> b.shape, s.abs().unique().tolist()
        (torch.Size([3, 5]), [1.0])
    """
    i = torch.arange(k_out, dtype=torch.int64, device=device)
    j = torch.arange(k_in, dtype=torch.int64, device=device)
    s32 = (seed & _MASK32) * _C_SEED & _MASK32
    l32 = (layer & _MASK32) * _C_LAYER & _MASK32
    row = _fmix32(((i * _C_ROW) & _MASK32) ^ (s32 ^ l32))
    h = _fmix32((row[:, None] + (j[None, :] * _C_COL & _MASK32)) & _MASK32)
    bucket = (h & 0x7FFFFFFF) % sketch_dim
    sign = 1.0 - 2.0 * (h >> 31).to(torch.float64)
    return bucket, sign


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
    bucket, sign = sketch_hash_ref(k_out, k_in, sketch_dim, seed, layer, device=g.device)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference of the count-sketched segmented weight gradient.

    Returns:
        ``(dW, sketch)``: float64 ``[K_out, K_in]`` and float64 ``[m, sketch_dim]``.
    """
    dw, per_domain = segmented_wgrad_ref(x, dy, domain_ids, num_domains)
    return dw, count_sketch_ref(per_domain, sketch_dim, seed, layer)


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
