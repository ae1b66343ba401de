"""The count-sketch hash (rnb_kernels/ops/sketch_hash.py) against pinned literal outputs.

The expected values below were computed once from the hash's statement and written here as
literals: a change to any constant, shift or mask of the hash changes them, so this test fails
instead of re-deriving the hash from itself. Every backend is then checked against the Python
statement (test_op_domain_sketch.py, bit for bit), and csrc/sketch_hash.h against these same
literals (test_csrc_host.py).
"""

from __future__ import annotations

import pytest
import torch

from rnb_kernels.ops import sketch_hash as H
from rnb_kernels.ops.reference import sketch_hash_ref

# (k_out, k_in, sketch_dim, seed, layer) -> (bucket [k_out][k_in], sign [k_out][k_in])
PINNED = {
    (3, 5, 1000, 0, 0): (
        [[0, 407, 28, 232, 607], [90, 220, 613, 441, 178], [139, 367, 261, 189, 64]],
        [[1, -1, 1, 1, 1], [1, 1, 1, -1, -1], [-1, 1, 1, 1, -1]],
    ),
    (2, 3, 1000, 5, 3): ([[525, 134, 221], [281, 38, 79]], [[1, -1, 1], [-1, 1, 1]]),
    (2, 4, 97, 2**32 - 1, 2**32 - 1): (
        [[64, 47, 37, 93], [45, 84, 89, 56]],
        [[-1, 1, -1, -1], [-1, -1, 1, 1]],
    ),
}
# bias_hash(k_out=4, k_in=3, sketch_dim=64, seed=7, layer=1): column j = K_in of [W | b].
PINNED_BIAS = ([56, 4, 35, 27], [-1, -1, 1, -1])
# MurmurHash3's fmix32 (fmix32(1) = 0x514E28B7 is the published test value).
PINNED_FMIX = {0: 0, 1: 0x514E28B7, 2**31: 1832674720, 2**32 - 1: 2180083513,
               0x12345678: 3816608188}  # fmt: skip
PINNED_KEY_BASE = {(0, 0): 0, (1, 2): 2514546031, (2**32 - 1, 2**32 - 1): 467448786}
# Far (i, j) pairs, k = 65521, seed 99, layer 4 -> (bucket, sign): beyond any dense grid.
FAR_KEY = (65521, 99, 4)
PINNED_FAR = {
    (0, 2**31): (47010, -1),
    (2**31 - 1, 5): (10675, -1),
    (2**32 - 1, 2**32 - 1): (59731, 1),
    (50256, 767): (40152, 1),
    (123457, 99991): (54477, -1),
}


@pytest.mark.parametrize("key", list(PINNED), ids=lambda k: "-".join(map(str, k)))
def test_sketch_hash_pinned(key):
    bucket, sign = sketch_hash_ref(*key)
    want_b, want_s = PINNED[key]
    assert bucket.dtype == torch.int64 and sign.dtype == torch.float64
    assert bucket.tolist() == want_b
    assert sign.tolist() == [[float(v) for v in row] for row in want_s]
    # The fp32 signs the launchers use are the same values.
    b32, s32 = H.sketch_hash(*key, dtype=torch.float32)
    assert torch.equal(b32, bucket) and s32.dtype == torch.float32
    assert s32.tolist() == sign.tolist()


def test_bias_hash_pinned_and_is_column_k_in():
    b, s = H.bias_hash(4, 3, 64, seed=7, layer=1)
    assert (b.tolist(), s.tolist()) == (PINNED_BIAS[0], [float(v) for v in PINNED_BIAS[1]])
    wide_b, wide_s = H.sketch_hash(4, 4, 64, seed=7, layer=1)  # the augmented [W | b]
    assert torch.equal(wide_b[:, 3], b) and torch.equal(wide_s[:, 3].float(), s)


def test_fmix32_and_key_base_pinned():
    x = torch.tensor(list(PINNED_FMIX), dtype=torch.int64)
    assert H.fmix32(x).tolist() == list(PINNED_FMIX.values())
    for (seed, layer), want in PINNED_KEY_BASE.items():
        assert H.key_base(seed, layer) == want


def far_hash(i: int, j: int) -> tuple[int, int]:
    """The Python statement at one (i, j) (through its row/column form)."""
    k, seed, layer = FAR_KEY
    h = H._hash(torch.tensor([i]), torch.tensor([j]), seed, layer)
    b, s = H._bucket_sign(h, k, torch.float64)
    return int(b), int(s)


def test_far_indices_pinned():
    for (i, j), want in PINNED_FAR.items():
        assert far_hash(i, j) == want, (i, j)


def test_hash_properties():
    """Buckets in range, signs ±1, deterministic, and the key matters."""
    b, s = sketch_hash_ref(37, 33, 97, seed=3, layer=1)
    assert int(b.min()) >= 0 and int(b.max()) < 97
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    b2, s2 = sketch_hash_ref(37, 33, 97, seed=3, layer=1)
    assert torch.equal(b, b2) and torch.equal(s, s2)
    for other in (dict(seed=4, layer=1), dict(seed=3, layer=2)):
        bo, so = sketch_hash_ref(37, 33, 97, **other)
        assert not torch.equal(bo, b) and not torch.equal(so, s)
    # Roughly balanced signs and buckets (a weak hash would concentrate them).
    assert abs(float(s.mean())) < 0.1
    assert torch.bincount(b.reshape(-1), minlength=97).max() < 3 * (37 * 33) / 97


def test_kernel_constants_are_the_hash_multipliers():
    kc = H.kernel_constants()
    assert kc == {"ROW_MUL": H.ROW_MUL, "COL_MUL": H.COL_MUL, "FMIX1": H.FMIX_MUL1,
                  "FMIX2": H.FMIX_MUL2}  # fmt: skip


def test_bias_hash_defaults_and_dtype():
    """Default seed/layer are 0 (as sketch_hash's) and the sign dtype is the one asked for."""
    b, s = H.bias_hash(4, 3, 64)
    wide_b, wide_s = H.sketch_hash(4, 4, 64, seed=0, layer=0)
    assert torch.equal(b, wide_b[:, 3]) and s.tolist() == wide_s[:, 3].tolist()
    assert s.dtype == torch.float32 and b.dtype == torch.int64
    b64, s64 = H.bias_hash(4, 3, 64, seed=7, layer=1, dtype=torch.float64)
    assert s64.dtype == torch.float64 and s64.tolist() == [float(v) for v in PINNED_BIAS[1]]
    wb, ws = H.sketch_hash(2, 2, 16)
    assert torch.equal(wb, H.sketch_hash(2, 2, 16, seed=0, layer=0)[0])
    assert ws.dtype == torch.float64


# Literals from the module docstring's statement (pure Python integers, computed once).
# sketch_hash(2, 3, 64) with the default seed 0 and layer 0.
PINNED_SKETCH_DEFAULT = ([[0, 31, 36], [50, 60, 5]], [[1, -1, 1], [1, 1, 1]])
# sketch_hash(2, 3, 64, seed=1, row_offset=3): global rows 3 and 4.
PINNED_ROW_OFFSET = ([[30, 20, 20], [50, 27, 44]], [[1, 1, -1], [-1, -1, 1]])
# bias_hash(3, 4, 32, row_offset=2): column j = 4 of global rows 2..4.
PINNED_BIAS_ROW_OFFSET = ([8, 0, 2], [-1, -1, -1])
# projection_hash(6, 50) with every default (seed 0, layer 0, offset 0, PROJ_OUT), and PROJ_IN.
PINNED_PROJ_DEFAULT = ([0, 2, 10, 0, 45, 31], [1, 1, -1, 1, 1, -1])
PINNED_PROJ_DEFAULT_IN = ([15, 39, 43, 35, 6, 33], [-1, 1, 1, 1, -1, 1])
# projection_hash(4, 64, seed=2, layer=1, offset=5, side=...): global features 5..8.
PINNED_PROJ_OFFSET = {
    H.PROJ_OUT: ([29, 58, 28, 49], [-1, -1, 1, 1]),
    H.PROJ_IN: ([25, 26, 13, 30], [1, 1, 1, -1]),
}
# projection_key(seed, layer, side)
PINNED_PROJ_KEY = {(0, 0, 1): 2349025055, (1, 2, 1): 2514185564, (1, 2, 0): 2514546031}


def _floats(rows):
    return (
        [[float(v) for v in r] for r in rows]
        if isinstance(rows[0], list)
        else [float(v) for v in rows]
    )


def test_sketch_and_bias_hash_default_key_and_row_offset_pinned():
    b, s = H.sketch_hash(2, 3, 64)
    assert (b.tolist(), s.tolist()) == (PINNED_SKETCH_DEFAULT[0], _floats(PINNED_SKETCH_DEFAULT[1]))
    b, s = H.sketch_hash(2, 3, 64, seed=1, row_offset=3)
    assert (b.tolist(), s.tolist()) == (PINNED_ROW_OFFSET[0], _floats(PINNED_ROW_OFFSET[1]))
    b, s = H.bias_hash(3, 4, 32, row_offset=2)
    assert b.tolist() == PINNED_BIAS_ROW_OFFSET[0]
    assert s.tolist() == _floats(PINNED_BIAS_ROW_OFFSET[1]) and s.dtype == torch.float32


def test_projection_hash_defaults_pinned():
    b, s = H.projection_hash(6, 50)
    assert b.dtype == torch.int64 and s.dtype == torch.float64
    assert (b.tolist(), s.tolist()) == (PINNED_PROJ_DEFAULT[0], _floats(PINNED_PROJ_DEFAULT[1]))
    b, s = H.projection_hash(6, 50, side=H.PROJ_IN)
    assert (b.tolist(), s.tolist()) == (
        PINNED_PROJ_DEFAULT_IN[0],
        _floats(PINNED_PROJ_DEFAULT_IN[1]),
    )


@pytest.mark.parametrize("side", [H.PROJ_OUT, H.PROJ_IN], ids=["out", "in"])
def test_projection_hash_offset_seed_layer_pinned(side):
    b, s = H.projection_hash(4, 64, seed=2, layer=1, offset=5, side=side, dtype=torch.float32)
    want_b, want_s = PINNED_PROJ_OFFSET[side]
    assert b.tolist() == want_b and s.tolist() == _floats(want_s) and s.dtype == torch.float32


def test_projection_key_and_multiplier_pinned():
    for (seed, layer, side), want in PINNED_PROJ_KEY.items():
        assert H.projection_key(seed, layer, side) == want
    assert type(H.projection_key(1, 2, H.PROJ_IN)) is int
    assert (H.PROJ_OUT, H.PROJ_IN) == (0, 1)
    assert H.projection_multiplier(H.PROJ_OUT) == 0xC2B2AE35  # ROW_MUL
    assert H.projection_multiplier(H.PROJ_IN) == 0x27D4EB2F  # COL_MUL
    with pytest.raises(ValueError, match=r"^side must be PROJ_OUT \(0\) or PROJ_IN \(1\), got 2$"):
        H.projection_key(0, 0, 2)


def test_hashes_are_built_on_the_device_asked_for():
    """The index vectors are allocated on ``device`` (the meta device stands in for a GPU)."""
    for b, s in (
        H.sketch_hash(2, 3, 16, device="meta"),
        H.sketch_hash(2, 3, 16, device="meta", row_offset=1),
        H.bias_hash(4, 3, 16, device="meta"),
        H.projection_hash(5, 16, device="meta"),
    ):
        assert b.device.type == "meta" and s.device.type == "meta"
    b, s = H.sketch_hash(2, 3, 16, device="meta")
    assert b.shape == (2, 3) and b.dtype == torch.int64 and s.dtype == torch.float64
