"""The count-sketch hash: the one statement of it in Python.

Every backend (the float64 reference, the torch and Triton launchers, the tracker) takes its
constants and functions from here; ``csrc/sketch_hash.h`` is its C++ transcription and a test
checks the two bit for bit.

All arithmetic is on unsigned 32-bit integers (wrap-around mod 2**32). With ``fmix32`` the
MurmurHash3 finaliser::

    key_base(seed, layer)   = seed * SEED_MUL ^ layer * LAYER_MUL
    row_key(seed, layer, i) = fmix32(key_base(seed, layer) ^ i * ROW_MUL)
    h(i, j)                 = fmix32(row_key(seed, layer, i) + j * COL_MUL)
    bucket(i, j)            = (h & 0x7FFFFFFF) % k
    sign(i, j)              = +1 if (h >> 31) == 0 else -1

``i`` indexes output features (rows of the weight, ``K_out``) and ``j`` input features
(``K_in``); a layer's bias is column ``j = K_in`` of the augmented ``[W | b]``. The hash depends
only on ``(seed, layer, i, j)``, so sketches are linear: sketches of different steps,
micro-batches and ranks add up to the sketch of the sum. ``i`` is the *global* row: a rank
holding rows ``[row_offset, row_offset + K_out)`` of a row-sharded (vocabulary-parallel) weight
hashes ``row_offset + i``, so the shards' sketches add up to the sketch of the whole weight.

Projected mode hashes single features instead of elements (one count-sketch per side of the
weight, :func:`projection_hash`)::

    proj_key(seed, layer, OUT) = key_base(seed, layer)
    proj_key(seed, layer, IN)  = fmix32(key_base(seed, layer) ^ COL_MUL)
    g(i, OUT)                  = fmix32(proj_key(seed, layer, OUT) ^ i * ROW_MUL)  (= row_key)
    g(j, IN)                   = fmix32(proj_key(seed, layer, IN) ^ j * COL_MUL)
    bucket, sign               = from g exactly as from h above

``i`` / ``j`` are *global* feature indices (a rank holding output rows ``[offset, offset +
K_out_local)`` of a vocabulary-sharded head hashes ``offset + i``), so projections of shards
add up to the projection of the whole layer. The input side's key goes through ``fmix32`` so
that no pair ``(i, j)`` shares its hash value with the output side for every seed (which a
plain XOR of the two multipliers would allow, and which would bias two-sided projections).
"""

from __future__ import annotations

import torch

__all__ = [
    "COL_MUL",
    "FMIX_MUL1",
    "FMIX_MUL2",
    "LAYER_MUL",
    "MASK32",
    "ROW_MUL",
    "SEED_MUL",
    "bias_hash",
    "fmix32",
    "key_base",
    "kernel_constants",
    "PROJ_IN",
    "PROJ_OUT",
    "projection_hash",
    "projection_multiplier",
    "projection_key",
    "round_seed",
    "sketch_hash",
]

MASK32 = 0xFFFFFFFF
SEED_MUL = 0x9E3779B9
LAYER_MUL = 0x85EBCA6B
ROW_MUL = 0xC2B2AE35
COL_MUL = 0x27D4EB2F
# The two multipliers of MurmurHash3's fmix32.
FMIX_MUL1 = 0x85EBCA6B
FMIX_MUL2 = 0xC2B2AE35


def kernel_constants() -> dict[str, int]:
    """The multipliers as ``tl.constexpr`` keyword arguments of the Triton kernels."""
    return {"ROW_MUL": ROW_MUL, "COL_MUL": COL_MUL, "FMIX1": FMIX_MUL1, "FMIX2": FMIX_MUL2}


# Sides of a projected layer: output features (rows of W, columns of dy) and input features.
PROJ_OUT = 0
PROJ_IN = 1


def fmix32(h: torch.Tensor | int) -> torch.Tensor | int:
    """MurmurHash3 finaliser on int64 tensors (or Python ints) holding uint32 values (result
    in [0, 2**32))."""
    # int64 products of two uint32 values may wrap past 2**63; the low 32 bits stay exact.
    h = h ^ (h >> 16)
    h = (h * FMIX_MUL1) & MASK32
    h = h ^ (h >> 13)
    h = (h * FMIX_MUL2) & MASK32
    h = h ^ (h >> 16)
    return h


def key_base(seed: int, layer: int) -> int:
    """``seed * SEED_MUL ^ layer * LAYER_MUL`` mod 2**32: the per-layer part of every row key."""
    return ((seed & MASK32) * SEED_MUL & MASK32) ^ ((layer & MASK32) * LAYER_MUL & MASK32)


def round_seed(seed: int, round_index: int) -> int:
    """The hash seed a tracker seeded ``seed`` uses in round ``round_index`` (0, 1, ...):
    ``seed`` itself in round 0, ``fmix32((seed ^ round_index * SEED_MUL) mod 2**32)`` after.

    A fresh hash every round keeps one unlucky hash (two heavy rows in one bucket) from biasing
    every round of a run the same way: the rounds' errors become independent, and the mixture
    averaged over rounds converges to the exact one.

    Example:
        >>> round_seed(7, 0), round_seed(7, 1) != 7
        (7, True)
    """
    if round_index == 0:
        return seed & MASK32
    return int(fmix32((seed & MASK32) ^ ((round_index & MASK32) * SEED_MUL & MASK32)))


def _hash(rows: torch.Tensor, cols: torch.Tensor, seed: int, layer: int) -> torch.Tensor:
    """``h(i, j)`` for int64 ``rows [R]`` x ``cols [C]`` -> int64 ``[R, C]`` in [0, 2**32)."""
    row = fmix32(((rows * ROW_MUL) & MASK32) ^ key_base(seed, layer))
    return fmix32((row[:, None] + (cols[None, :] * COL_MUL & MASK32)) & MASK32)


def _bucket_sign(h: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (h & 0x7FFFFFFF) % k, 1.0 - 2.0 * (h >> 31).to(dtype)


def sketch_hash(
    k_out: int,
    k_in: int,
    sketch_dim: int,
    seed: int = 0,
    layer: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    *,
    row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets and signs of the count-sketch for a ``[k_out, k_in]`` weight (rows
    ``[row_offset, row_offset + k_out)`` of a row-sharded one).

    Returns:
        ``bucket``: int64 ``[k_out, k_in]`` in ``[0, sketch_dim)``;
        ``sign``: ``dtype`` ``[k_out, k_in]`` in ``{-1, +1}``.

    Example:
        >>> b, s = sketch_hash(3, 5, 16, seed=1)
        >>> b.shape, s.abs().unique().tolist()
        (torch.Size([3, 5]), [1.0])
        >>> torch.equal(sketch_hash(2, 5, 16, seed=1, row_offset=1)[0], b[1:])
        True
    """
    i = torch.arange(row_offset, row_offset + k_out, dtype=torch.int64, device=device)
    j = torch.arange(k_in, dtype=torch.int64, device=device)
    return _bucket_sign(_hash(i, j, seed, layer), sketch_dim, dtype)


def bias_hash(
    k_out: int,
    k_in: int,
    sketch_dim: int,
    seed: int = 0,
    layer: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket (int64 ``[k_out]``) and sign (``[k_out]``) of a bias, hashed as column ``k_in`` of
    the augmented ``[W | b]`` so a layer with bias is sketched as one ``[k_out, k_in + 1]``
    matrix and no bias bucket collides systematically with a weight bucket. ``row_offset``
    as in :func:`sketch_hash`."""
    i = torch.arange(row_offset, row_offset + k_out, dtype=torch.int64, device=device)
    j = torch.tensor([k_in], dtype=torch.int64, device=device)
    bucket, sign = _bucket_sign(_hash(i, j, seed, layer), sketch_dim, dtype)
    return bucket[:, 0], sign[:, 0]


def projection_key(seed: int, layer: int, side: int) -> int:
    """``proj_key(seed, layer, side)`` of the module docstring: the uint32 that keys one side's
    feature hash (``side`` is :data:`PROJ_OUT` or :data:`PROJ_IN`)."""
    base = key_base(seed, layer)
    if side == PROJ_OUT:
        return base
    if side == PROJ_IN:
        return int(fmix32(base ^ COL_MUL))
    raise ValueError(f"side must be PROJ_OUT (0) or PROJ_IN (1), got {side!r}")


def projection_multiplier(side: int) -> int:
    """The multiplier applied to a feature index of ``side`` before the key is mixed in."""
    return ROW_MUL if side == PROJ_OUT else COL_MUL


def projection_hash(
    k: int,
    proj_dim: int,
    seed: int = 0,
    layer: int = 0,
    offset: int = 0,
    side: int = PROJ_OUT,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets and signs of the count-sketch projection of features ``offset .. offset+k-1``.

    Feature ``f`` (global index ``offset + f``) of ``side`` goes to row ``bucket[f]`` of the
    projection with sign ``sign[f]``: the projection matrix is ``P [proj_dim, k]`` with
    ``P[bucket[f], f] = sign[f]`` and zeros elsewhere.

    Returns:
        ``bucket``: int64 ``[k]`` in ``[0, proj_dim)``; ``sign``: ``dtype`` ``[k]`` in ``{-1, +1}``.

    Example:
        >>> b, s = projection_hash(5, 4, seed=1)
        >>> b.shape, bool((b < 4).all()), s.abs().unique().tolist()
        (torch.Size([5]), True, [1.0])
        >>> # A shard holding features 3.. hashes them as the full layer does.
        >>> bool((projection_hash(2, 4, seed=1, offset=3)[0] == b[3:]).all())
        True
    """
    f = torch.arange(offset, offset + k, dtype=torch.int64, device=device)
    key = projection_key(seed, layer, side)
    h = fmix32(((f * projection_multiplier(side)) & MASK32) ^ key)
    return _bucket_sign(h, proj_dim, dtype)
