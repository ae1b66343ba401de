"""Row-sharded weights (vocabulary-parallel heads): ``domain_sketch(row_offset=)`` hashes rows by
their global index, so the sketches of row shards add up to the sketch of the whole weight, on
the torch backend and in the Triton kernel (``ROW_OFFSET``)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from _tol import ACC_DTYPE, assert_close  # noqa: E402

import rnb_kernels  # noqa: E402
from rnb_kernels.ops import domain_sketch  # noqa: E402
from rnb_kernels.ops.reference import domain_sketch_ref  # noqa: E402
from rnb_kernels.ops.sketch_hash import bias_hash, sketch_hash  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return rnb_kernels.backends()["triton"].available


BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not _triton_ok(), reason="no Triton")),
]


def test_hash_of_a_shard_is_the_slice_of_the_full_hash():
    b, s = sketch_hash(10, 7, 33, seed=5, layer=2)
    b2, s2 = sketch_hash(4, 7, 33, seed=5, layer=2, row_offset=6)
    assert torch.equal(b2, b[6:]) and torch.equal(s2, s[6:])
    bb, bs = bias_hash(10, 7, 33, seed=5, layer=2)
    bb2, bs2 = bias_hash(4, 7, 33, seed=5, layer=2, row_offset=6)
    assert torch.equal(bb2, bb[6:]) and torch.equal(bs2, bs[6:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shards", [[0, 37, 70], [0, 13, 50, 70]], ids=["2-way", "3-way-uneven"])
def test_shard_sketches_add_up_to_the_full_sketch(backend, bias, shards):
    g = torch.Generator().manual_seed(0)
    n, k_in, k_out, m, k = 41, 33, 70, 3, 50
    x = torch.randn(n, k_in, generator=g).to(DEVICE)
    dy = torch.randn(n, k_out, generator=g).to(DEVICE)
    ids = torch.randint(-1, m, (n,), generator=g).to(DEVICE)
    _, ref = domain_sketch_ref(x, dy, ids, m, k, seed=7, layer=3, bias=bias)
    total = torch.zeros(m, k, device=DEVICE)
    for lo, hi in zip(shards[:-1], shards[1:]):
        part = torch.zeros(m, k, device=DEVICE)
        dw, _ = domain_sketch(
            x, dy[:, lo:hi], ids, m, part, seed=7, layer=3, backend=backend, bias=bias,
            row_offset=lo,
        )  # fmt: skip
        assert_close(dw, dy[:, lo:hi].double().T @ x.double(), torch.float32, "shard dW")
        total += part
    assert_close(total, ref, ACC_DTYPE, f"{backend} sum of shard sketches")


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_offset_changes_the_hash(backend):
    """A kernel that ignored the offset would hash every shard like rows [0, K_out)."""
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(9, 5, generator=g).to(DEVICE), torch.randn(9, 4, generator=g).to(DEVICE)
    ids = torch.zeros(9, dtype=torch.int64, device=DEVICE)
    s0, s1 = torch.zeros(1, 64, device=DEVICE), torch.zeros(1, 64, device=DEVICE)
    domain_sketch(x, dy, ids, 1, s0, backend=backend)
    domain_sketch(x, dy, ids, 1, s1, backend=backend, row_offset=2**31 + 3)
    full = torch.zeros(4, 5, dtype=torch.float64, device=DEVICE)
    bucket, sign = sketch_hash(4, 5, 64, row_offset=2**31 + 3, device=DEVICE)
    ref = (
        full.view(-1)
        .new_zeros(64)
        .index_add_(0, bucket.view(-1), (dy.double().T @ x.double() * sign).view(-1))
    )
    assert not torch.allclose(s0, s1)
    assert_close(s1[0], ref, ACC_DTYPE, "offset sketch")


def test_row_offset_is_validated():
    x, dy, ids = torch.randn(3, 2), torch.randn(3, 4), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="row_offset"):
        domain_sketch(x, dy, ids, 1, sketch_dim=8, row_offset=-1)
    with pytest.raises(ValueError, match="row_offset"):
        domain_sketch(x, dy, ids, 1, sketch_dim=8, row_offset=2**32 - 3)
    with pytest.raises(TypeError, match="row_offset"):
        domain_sketch(x, dy, ids, 1, sketch_dim=8, row_offset=1.0)


@pytest.mark.cuda
def test_cuda_kernel_row_offset_matches_torch():
    status = rnb_kernels.backends()["cuda"]
    if not status.available:
        pytest.skip(status.reason)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 33, generator=g).cuda()
    dy = torch.randn(40, 70, generator=g).cuda()
    ids = torch.randint(-1, 3, (40,), generator=g).cuda()
    got, ref = torch.zeros(3, 50, device="cuda"), torch.zeros(3, 50, device="cuda")
    domain_sketch(x, dy, ids, 3, got, seed=1, layer=2, backend="cuda", row_offset=1000)
    domain_sketch(x, dy, ids, 3, ref, seed=1, layer=2, backend="torch", row_offset=1000)
    assert_close(got, ref.double(), ACC_DTYPE, "cuda vs torch")
