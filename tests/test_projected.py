"""Projected mode: the hash, ``domain_projection`` on every backend against the float64
reference, linearity (micro-batches, vocabulary shards), unbiasedness and variance, bad inputs,
and the tracker in ``mode="projected"`` / ``"auto"``."""

from __future__ import annotations

import copy
import logging
import math
import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is imported: without a GPU its kernels run in the
# interpreter (the same switch as tests/test_triton_ops.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _tol import ACC_DTYPE, TOL, assert_close  # noqa: E402
from torch import nn  # noqa: E402

import rnb_kernels as rnb  # noqa: E402
from rnb_kernels.ops import domain_projection  # noqa: E402
from rnb_kernels.ops.domain_projection import (  # noqa: E402
    project_columns_keeping,
    project_columns_torch,
)
from rnb_kernels.ops.reference import (  # noqa: E402
    domain_projection_ref,
    domain_rows_ref,
    projection_matrix_ref,
    segmented_wgrad_ref,
)
from rnb_kernels.ops.sketch_hash import (  # noqa: E402
    PROJ_IN,
    PROJ_OUT,
    projection_hash,
    projection_key,
)
from rnb_kernels.tracking import DomainGradientTracker  # noqa: E402
from rnb_kernels.tracking import tracker as tracker_mod  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
HAS_TRITON = rnb.backends()["triton"].available
BACKENDS = [
    "torch",
    pytest.param(
        "triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="Triton cannot run here")
    ),
]


@pytest.fixture(autouse=True)
def _poison_fresh_buffers(monkeypatch):
    """Every float ``torch.empty`` (dW, projected dy) starts as NaN: a skipped write fails."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point() and not t.requires_grad:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)


def make_ids(pattern: str, n: int, m: int, g: torch.Generator) -> torch.Tensor:
    if pattern == "mixed":
        ids = torch.randint(-1, m, (n,), generator=g)
    elif pattern == "one-domain":
        ids = torch.full((n,), m - 1)
    elif pattern == "all-ignored":
        ids = torch.full((n,), -1)
    elif pattern == "empty-domains":  # only even domains (and -1) occur
        ids = 2 * torch.randint(0, (m + 1) // 2, (n,), generator=g)
        ids[torch.rand(n, generator=g) < 0.2] = -1
    else:
        raise ValueError(pattern)
    return ids.to(DEVICE)


def make_inputs(n, k_in, k_out, dtype, g, integer=False):
    def rand(rows, cols):
        if integer:  # exact in every dtype, and every fp32 partial sum stays exact
            return torch.randint(-2, 3, (rows, cols), generator=g).to(dtype)
        return torch.randn(rows, cols, generator=g).to(dtype)

    return rand(n, k_in).to(DEVICE), rand(n, k_out).to(DEVICE)


def check_against_reference(x, dy, ids, m, backend, *, p=13, seed=5, layer=2, offset=0,
                            bias=False, q=None, rows=None):  # fmt: skip
    """``rows``: also keep these output rows exactly (``exact_index``) and check them."""
    g = torch.Generator().manual_seed(99)
    width = q if q is not None else x.shape[1] + int(bias)
    p0 = torch.randn(m, p, width, generator=g).to(DEVICE)
    state = p0.clone()
    extra = {}
    if rows is not None:
        rows = torch.as_tensor(rows, dtype=torch.int64, device=DEVICE)
        e0 = torch.randn(m, rows.numel(), width, generator=g).to(DEVICE)
        extra = dict(exact_index=rows, exact=e0.clone())
    dw, out = domain_projection(
        x, dy, ids, m, state, seed=seed, layer=layer, row_offset=offset, backend=backend,
        bias=bias, proj_in_dim=q, **extra,
    )  # fmt: skip
    assert out is state
    ref_dw, ref = domain_projection_ref(x, dy, ids, m, p, seed, layer, offset, bias, q)
    assert dw.dtype == x.dtype and dw.shape == ref_dw.shape
    assert_close(dw, ref_dw, x.dtype, "dW")
    assert_close(state, p0.double() + ref, ACC_DTYPE, "proj")
    present = set(ids.tolist())
    for d in range(m):
        if d not in present:
            assert torch.equal(state[d], p0[d]), f"absent domain {d} was modified"
    if rows is not None:
        want = e0.double() + domain_rows_ref(x, dy, ids, m, rows, seed, layer, bias, q)
        assert_close(extra["exact"], want, ACC_DTYPE, "exact rows")
        for d in range(m):
            if d not in present:
                assert torch.equal(extra["exact"][d], e0[d]), f"absent domain {d}: exact rows"
    if backend == "torch":
        assert torch.equal(dw, dy.t().mm(x)), "dW must be autograd's GEMM, bit for bit"


# --------------------------------------------------------------------------- hash


def test_projection_hash_spec_known_values():
    """Pinned outputs of the projection hash (computed once from the formula in
    rnb_kernels/ops/sketch_hash.py and written here, so a change to the hash fails this test;
    the constants themselves live only in that module and csrc/sketch_hash.h)."""
    seed, layer, dim = 5, 3, 1000
    assert projection_key(seed, layer, PROJ_OUT) == 2262187996
    assert projection_key(seed, layer, PROJ_IN) == 861493265
    b_out, s_out = projection_hash(10, dim, seed, layer, offset=7, side=PROJ_OUT)
    b_in, s_in = projection_hash(10, dim, seed, layer, offset=0, side=PROJ_IN)
    assert b_out.tolist() == [90, 851, 899, 438, 32, 130, 951, 259, 126, 18]
    assert s_out.tolist() == [-1.0, 1.0, -1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0, 1.0]
    assert b_in.tolist() == [275, 498, 415, 180, 272, 344, 637, 949, 862, 854]
    assert s_in.tolist() == [-1.0, -1.0, 1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="side"):
        projection_key(0, 0, 2)


def test_projection_hash_uses_global_indices_and_is_balanced():
    full_b, full_s = projection_hash(1000, 16, seed=3, layer=1)
    for lo in (0, 1, 333, 999):
        b, s = projection_hash(1000 - lo, 16, seed=3, layer=1, offset=lo)
        assert torch.equal(b, full_b[lo:]) and torch.equal(s, full_s[lo:])
    # Every bucket used about equally often and signs about half positive.
    counts = torch.bincount(full_b, minlength=16).double()
    assert float(counts.min()) > 1000 / 16 * 0.5
    assert abs(float(full_s.mean())) < 0.15
    # Features at the top of the uint32 range hash without overflow.
    b, _ = projection_hash(3, 16, offset=2**32 - 3)
    assert bool(((b >= 0) & (b < 16)).all())


@pytest.mark.parametrize("side", [PROJ_OUT, PROJ_IN], ids=["out", "in"])
def test_project_columns_torch_is_the_dense_projection(side):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(9, 50, generator=g, dtype=torch.float64)
    got = project_columns_torch(t, 7, seed=4, layer=2, offset=11, side=side)
    ref = t @ projection_matrix_ref(50, 7, seed=4, layer=2, offset=11, side=side).T
    assert_close(got, ref, torch.float32, "t Pᵀ")


# --------------------------------------------------------------------------- op vs reference

SHAPES = [  # (N, K_in, K_out, m): odd sizes, none a multiple of a block
    pytest.param(1, 1, 1, 1, id="N1-Kin1-Kout1-m1"),
    pytest.param(37, 33, 70, 5, id="N37-Kin33-Kout70-m5"),
    pytest.param(37, 1, 33, 3, id="N37-Kin1-Kout33-m3"),
    pytest.param(300, 70, 33, 7, id="N300-Kin70-Kout33-m7"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,k_in,k_out,m", SHAPES)
def test_op_matches_reference(n, k_in, k_out, m, dtype, backend):
    g = torch.Generator().manual_seed(n * 1000 + k_in)
    x, dy = make_inputs(n, k_in, k_out, dtype, g)
    ids = make_ids("mixed", n, m, g)
    check_against_reference(x, dy, ids, m, backend, offset=17)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "bias,q", [(True, None), (False, 7), (True, 7), (True, 1)], ids=["bias", "in", "bias-in", "q1"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_op_bias_and_input_projection(bias, q, dtype, backend):
    g = torch.Generator().manual_seed(3)
    x, dy = make_inputs(37, 33, 70, dtype, g)
    ids = make_ids("mixed", 37, 4, g)
    check_against_reference(x, dy, ids, 4, backend, p=20, seed=2**32 - 1, layer=7, bias=bias,
                            q=q)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["one-domain", "all-ignored", "empty-domains"])
def test_op_id_patterns(pattern, backend):
    g = torch.Generator().manual_seed(4)
    x, dy = make_inputs(37, 33, 70, torch.float32, g)
    check_against_reference(x, dy, make_ids(pattern, 37, 6, g), 6, backend, bias=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_per_sample_runs(backend):
    # Per-sample ids broadcast over 40 tokens: long runs, which the torch backend multiplies
    # as views in place instead of gathering rows into domain order.
    g = torch.Generator().manual_seed(19)
    x, dy = make_inputs(200, 9, 30, torch.float32, g)
    ids = torch.randint(-1, 4, (5,), generator=g).repeat_interleave(40).to(DEVICE)
    check_against_reference(x, dy, ids, 4, backend, bias=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_more_domains_than_rows_and_wide_projection(backend):
    g = torch.Generator().manual_seed(5)
    x, dy = make_inputs(37, 5, 300, torch.float32, g)
    # proj_dim > 64 spans several BLOCK_P column blocks of the Triton projection kernel.
    check_against_reference(x, dy, make_ids("mixed", 37, 50, g), 50, backend, p=150)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_no_rows(backend):
    x, dy = torch.zeros(0, 6, device=DEVICE), torch.zeros(0, 9, device=DEVICE)
    state = torch.ones(3, 4, 6, device=DEVICE)
    dw, _ = domain_projection(x, dy, torch.zeros(0, dtype=torch.long, device=DEVICE), 3, state,
                              backend=backend)  # fmt: skip
    assert torch.equal(dw, torch.zeros(9, 6, device=DEVICE))
    assert torch.equal(state, torch.ones(3, 4, 6, device=DEVICE))


EXACT_ROWS = {
    "one": [5],
    "spread": [0, 9, 33, 69],  # first and last rows included
    "adjacent": [40, 41, 42, 43, 44, 45],
    "unsorted": [61, 2, 30],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", list(EXACT_ROWS.values()), ids=list(EXACT_ROWS))
@pytest.mark.parametrize(
    "bias,q", [(False, None), (True, None), (True, 7)], ids=["plain", "bias", "bias-in"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_op_exact_rows_match_reference(rows, bias, q, dtype, backend):
    """``exact_index``: the rows land exactly in ``exact`` and ``proj`` still projects every row
    (the torch backend folds the rows into columns of their own and adds them back)."""
    g = torch.Generator().manual_seed(len(rows) * 10 + int(bias))
    x, dy = make_inputs(37, 33, 70, dtype, g)
    ids = make_ids("mixed", 37, 4, g)
    check_against_reference(x, dy, ids, 4, backend, p=11, offset=5, bias=bias, q=q, rows=rows)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["one-domain", "all-ignored", "empty-domains", "runs"])
def test_op_exact_rows_id_patterns(pattern, backend):
    g = torch.Generator().manual_seed(8)
    if pattern == "runs":
        x, dy = make_inputs(200, 9, 30, torch.float32, g)
        ids = torch.randint(-1, 4, (5,), generator=g).repeat_interleave(40).to(DEVICE)
    else:
        x, dy = make_inputs(37, 33, 70, torch.float32, g)
        ids = make_ids(pattern, 37, 4, g)
    check_against_reference(x, dy, ids, 4, backend, bias=True, rows=[3, 17, 29])


def test_op_exact_rows_float64():
    g = torch.Generator().manual_seed(9)
    x, dy = make_inputs(37, 33, 70, torch.float64, g)
    check_against_reference(x, dy, make_ids("mixed", 37, 3, g), 3, "torch", rows=[1, 50])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_project_columns_keeping_is_projection_beside_gather(dtype):
    g = torch.Generator().manual_seed(10)
    t = torch.randn(23, 300, generator=g).to(dtype)
    index = torch.randperm(300, generator=g)[:17]
    both = project_columns_keeping(t, index, 19, seed=3, layer=4, offset=11, side=PROJ_OUT)
    assert both.shape == (23, 19 + 17) and both.dtype == torch.float32
    dense = projection_matrix_ref(300, 19, 3, 4, 11, PROJ_OUT)
    assert_close(both[:, :19], t.double() @ dense.T, torch.float32, "projection")
    assert torch.equal(both[:, 19:], t[:, index].float())


def test_references_at_their_defaults_hash_like_the_op_at_its():
    """``projection_matrix_ref`` and ``domain_rows_ref`` with their defaults (seed 0, layer 0,
    offset 0, no bias) describe what ``domain_projection`` computes with its defaults."""
    g = torch.Generator().manual_seed(12)
    x, dy = make_inputs(30, 6, 20, torch.float32, g)
    ids = make_ids("mixed", 30, 3, g)
    index = torch.tensor([4, 11], device=DEVICE)
    rows = torch.zeros(3, 2, 5, device=DEVICE)
    _, p = domain_projection(x, dy, ids, 3, proj_dim=7, proj_in_dim=5, exact_index=index,
                             exact=rows)  # fmt: skip
    _, per = segmented_wgrad_ref(x, dy, ids, 3)
    p_out, p_in = projection_matrix_ref(20, 7), projection_matrix_ref(6, 5, side=PROJ_IN)
    assert_close(p, p_out @ per.cpu() @ p_in.T, ACC_DTYPE, "proj at the defaults")
    assert_close(rows, domain_rows_ref(x, dy, ids, 3, index, proj_in_dim=5), ACC_DTYPE,
                 "exact rows at the defaults")  # fmt: skip


def test_op_float64_on_torch_backend():
    g = torch.Generator().manual_seed(6)
    x, dy = make_inputs(37, 33, 70, torch.float64, g)
    check_against_reference(x, dy, make_ids("mixed", 37, 3, g), 3, "torch", bias=True)


def test_op_allocates_state_when_none():
    g = torch.Generator().manual_seed(7)
    x, dy = make_inputs(20, 6, 30, torch.float32, g)
    ids = make_ids("mixed", 20, 3, g)
    _, state = domain_projection(x, dy, ids, 3, proj_dim=9, bias=True)
    assert state.shape == (3, 9, 7) and state.dtype == torch.float32
    _, ref = domain_projection_ref(x, dy, ids, 3, 9, bias=True)
    assert_close(state, ref, ACC_DTYPE, "allocated state")
    _, state = domain_projection(x, dy, ids, 3, proj_dim=9, bias=True, proj_in_dim=4)
    assert state.shape == (3, 9, 4)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton cannot run here")
@pytest.mark.parametrize(
    "seed,layer,offset",
    [(0, 0, 0), (1, 2, 5), (2**32 - 1, 2**32 - 1, 2**32 - 70)],
    ids=["zero", "keybase-above-2^31", "max-key-and-offset"],
)
def test_triton_hash_is_bit_identical_to_torch(seed, layer, offset):
    # Integer inputs keep every fp32 sum exact: a bucket or sign that differs shows up.
    from rnb_kernels.ops.triton.projected import project_columns_triton

    g = torch.Generator().manual_seed(8)
    for dtype in DTYPES:
        t = torch.randint(-2, 3, (37, 70), generator=g).to(dtype).to(DEVICE)
        for side in (PROJ_OUT, PROJ_IN):
            a = project_columns_triton(t, 13, seed, layer, offset, side)
            b = project_columns_torch(t, 13, seed, layer, offset, side)
            assert b.abs().sum() > 0
            assert torch.equal(a, b), (dtype, side)


@pytest.mark.parametrize("backend", BACKENDS)
def test_triton_and_strided_inputs(backend):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(33, 37, generator=g).T.to(DEVICE)  # column-major views
    dy = torch.randn(70, 37, generator=g).T.to(DEVICE)
    assert not x.is_contiguous()
    ids = make_ids("mixed", 37, 4, g).to(torch.int32)
    check_against_reference(x, dy, ids, 4, backend, bias=True)


# --------------------------------------------------------------------------- linearity


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_across_micro_batches(backend):
    g = torch.Generator().manual_seed(10)
    m = 3
    x, dy = make_inputs(74, 33, 70, torch.float32, g)
    ids = make_ids("mixed", 74, m, g)
    split = torch.zeros(m, 16, 34, device=DEVICE)
    for sl in (slice(0, 37), slice(37, 74)):
        domain_projection(x[sl], dy[sl], ids[sl], m, split, seed=5, bias=True, backend=backend)
    whole = torch.zeros(m, 16, 34, device=DEVICE)
    domain_projection(x, dy, ids, m, whole, seed=5, bias=True, backend=backend)
    assert_close(split, whole.double(), ACC_DTYPE, "split vs whole")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q", [None, 5], ids=["out-only", "two-sided"])
def test_vocabulary_shards_add_up_to_the_full_projection(backend, q):
    """A head split by output rows ([0, 29) and [29, 70)) on two 'ranks': each shard hashes its
    rows by global index, so the shard states sum to the unsharded state."""
    g = torch.Generator().manual_seed(11)
    m, cut = 4, 29
    x, dy = make_inputs(50, 12, 70, torch.float32, g)
    ids = make_ids("mixed", 50, m, g)
    width = q if q is not None else 13
    full = torch.zeros(m, 8, width, device=DEVICE)
    domain_projection(x, dy, ids, m, full, seed=9, layer=4, bias=True, proj_in_dim=q,
                      backend=backend)  # fmt: skip
    parts = []
    for lo, hi in ((0, cut), (cut, 70)):
        part = torch.zeros(m, 8, width, device=DEVICE)
        domain_projection(x, dy[:, lo:hi], ids, m, part, seed=9, layer=4, row_offset=lo,
                          bias=True, proj_in_dim=q, backend=backend)  # fmt: skip
        parts.append(part)
    assert_close(parts[0] + parts[1], full.double(), ACC_DTYPE, "sum of shards vs full")
    # Without its offset the second shard would hash its rows as rows 0.. of the layer.
    local = torch.zeros(m, 8, width, device=DEVICE)
    domain_projection(x, dy[:, cut:], ids, m, local, seed=9, layer=4, bias=True,
                      proj_in_dim=q, backend=backend)  # fmt: skip
    assert not torch.allclose(local, parts[1], atol=1e-3)


def test_deterministic_and_seeded():
    g = torch.Generator().manual_seed(12)
    x, dy = make_inputs(40, 6, 30, torch.float32, g)
    ids = make_ids("mixed", 40, 3, g)
    a = domain_projection(x, dy, ids, 3, proj_dim=8, seed=1)[1]
    assert torch.equal(a, domain_projection(x, dy, ids, 3, proj_dim=8, seed=1)[1])
    assert not torch.allclose(a, domain_projection(x, dy, ids, 3, proj_dim=8, seed=2)[1])
    assert not torch.allclose(a, domain_projection(x, dy, ids, 3, proj_dim=8, seed=1, layer=1)[1])


# --------------------------------------------------------------------------- statistics


def _two_correlated_domains(k_out: int, k_in: int, n: int = 20):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2 * n, k_in, dtype=torch.float64, generator=g)
    dy = torch.randn(2 * n, k_out, dtype=torch.float64, generator=g)
    # Correlated domains so <g_a, g_b> is far from 0 and every variance term matters.
    dy[n:] = 0.6 * dy[:n] + 0.8 * dy[n:]
    x[n:] = x[:n]
    ids = torch.tensor([0] * n + [1] * n)
    _, per = segmented_wgrad_ref(x, dy, ids, 2)
    return per[0], per[1]


def test_inner_product_is_unbiased_with_the_documented_variance():
    """Over many seeds: mean error within 3 SE of 0, variance within 2x of the formula
    Var = (‖M‖_F² + tr(M²) - 2 Σ_i M_ii²) / proj_dim, M = A Bᵀ (ops/reference.py)."""
    k_out, k_in, p, seeds = 24, 6, 8, 3000
    a, b = _two_correlated_domains(k_out, k_in)
    truth = float((a * b).sum())
    est = torch.empty(seeds, dtype=torch.float64)
    for s in range(seeds):
        pm = projection_matrix_ref(k_out, p, seed=s, layer=0)
        est[s] = ((pm @ a) * (pm @ b)).sum()
    err = est - truth
    se = float(err.std()) / math.sqrt(seeds)
    assert abs(float(err.mean())) < 3 * se, (float(err.mean()), se)
    mm = a @ b.T
    predicted = (float(mm.square().sum()) + float(torch.trace(mm @ mm))
                 - 2 * float(mm.diagonal().square().sum())) / p  # fmt: skip
    ratio = float(err.var()) / predicted
    assert 0.5 < ratio < 2.0, ratio


def test_two_sided_inner_product_is_unbiased():
    k_out, k_in, p, q, seeds = 16, 12, 6, 5, 3000
    a, b = _two_correlated_domains(k_out, k_in)
    truth = float((a * b).sum())
    est = torch.empty(seeds, dtype=torch.float64)
    for s in range(seeds):
        po = projection_matrix_ref(k_out, p, seed=s, side=PROJ_OUT)
        pi = projection_matrix_ref(k_in, q, seed=s, side=PROJ_IN)
        est[s] = ((po @ a @ pi.T) * (po @ b @ pi.T)).sum()
    err = est - truth
    se = float(err.std()) / math.sqrt(seeds)
    assert abs(float(err.mean())) < 3 * se, (float(err.mean()), se)


# --------------------------------------------------------------------------- bad inputs


def _inputs():
    x = torch.randn(8, 5)
    dy = torch.randn(8, 3)
    ids = torch.tensor([0, 1, 2, -1, 0, 1, 2, 2])
    return x, dy, ids


def _exact(index, shape=(3, 1, 5), dtype=torch.float32, index_dtype=torch.int64):
    """``exact_index`` / ``exact`` arguments for the bad-input table."""
    return dict(
        exact_index=torch.tensor(index, dtype=index_dtype), exact=torch.ones(shape, dtype=dtype)
    )


BAD = [
    ("proj dtype", dict(proj=torch.zeros(3, 4, 5, dtype=torch.float16)), TypeError, "proj"),
    ("proj rows", dict(proj=torch.zeros(2, 4, 5)), ValueError, "proj"),
    ("proj width", dict(proj=torch.zeros(3, 4, 6)), ValueError, "proj"),
    ("proj width bias", dict(bias=True), ValueError, "proj"),
    ("proj width in", dict(proj_in_dim=4), ValueError, "proj"),
    ("proj 2-D", dict(proj=torch.zeros(3, 20)), ValueError, "proj"),
    ("proj no rows", dict(proj=torch.zeros(3, 0, 5)), ValueError, "proj"),
    ("proj strided", dict(proj=torch.zeros(3, 5, 4).transpose(1, 2)), ValueError, "proj"),
    ("proj_dim 0", dict(proj=None, proj_dim=0), ValueError, "proj_dim"),
    ("proj_dim float", dict(proj=None, proj_dim=8.0), TypeError, "proj_dim"),
    ("proj_in_dim 0", dict(proj_in_dim=0), ValueError, "proj_in_dim"),
    ("proj_in_dim bool", dict(proj_in_dim=True), TypeError, "proj_in_dim"),
    ("row_offset negative", dict(row_offset=-1), ValueError, "row_offset"),
    ("row_offset past 2**32", dict(row_offset=2**32 - 2), ValueError, "row_offset"),
    ("seed negative", dict(seed=-1), ValueError, "seed"),
    ("seed too big", dict(seed=2**32), ValueError, "seed"),
    ("layer float", dict(layer=1.5), TypeError, "layer"),
    ("bias int", dict(bias=1), TypeError, "bias"),
    ("ids >= m", dict(domain_ids=torch.tensor([0, 1, 5, 0, 0, 0, 0, 0])), ValueError, "domain_ids"),
    ("ids float", dict(domain_ids=torch.zeros(8)), TypeError, "domain_ids"),
    ("dy rows", dict(dy=torch.randn(7, 3)), ValueError, "dy"),
    ("x dtype", dict(x=torch.randn(8, 5, dtype=torch.float64)), TypeError, "dy"),
    ("num_domains 0", dict(num_domains=0), ValueError, "num_domains"),
    ("backend name", dict(backend="cudnn"), ValueError, "backend"),
    ("exact_index alone", dict(exact_index=torch.tensor([0])), ValueError, "exact_index"),
    ("exact alone", dict(exact=torch.zeros(3, 1, 5)), ValueError, "exact_index"),
    ("exact_index int32", _exact([0], index_dtype=torch.int32), TypeError, "exact_index"),
    ("exact_index 2-D", _exact([[0]]), ValueError, "exact_index"),
    ("exact rows", _exact([0, 1]), ValueError, "exact"),
    ("exact width", _exact([0], (3, 1, 6)), ValueError, "exact"),
    ("exact dtype", _exact([0], dtype=torch.float16), TypeError, "exact"),
    ("exact_index repeated", _exact([1, 1], (3, 2, 5)), ValueError, "exact_index"),
    ("exact_index >= K_out", _exact([3]), ValueError, "exact_index"),
    ("exact_index negative", _exact([-1]), ValueError, "exact_index"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_rejects_bad_input_without_touching_state(case):
    _, override, exc, name = case
    x, dy, ids = _inputs()
    args = dict(x=x, dy=dy, domain_ids=ids, num_domains=3, proj=torch.ones(3, 4, 5))
    args.update(override)
    before = None if args["proj"] is None else args["proj"].clone()
    exact = args.get("exact")
    exact_before = None if exact is None else exact.clone()
    with pytest.raises(exc, match=name):
        domain_projection(**args)
    if before is not None:
        assert torch.equal(args["proj"], before)
    if exact is not None:
        assert torch.equal(exact, exact_before)


@pytest.mark.parametrize("which", ["x", "dy"])
def test_non_finite_inputs_rejected_when_checked(which):
    x, dy, ids = _inputs()
    bad = {"x": x, "dy": dy}
    bad[which][2, 1] = float("inf")
    state = torch.zeros(3, 4, 5)
    with pytest.raises(ValueError, match=which):
        domain_projection(bad["x"], bad["dy"], ids, 3, state, check_finite=True)
    assert torch.equal(state, torch.zeros(3, 4, 5))


def test_custom_op_passes_opcheck():
    from rnb_kernels.ops.domain_projection import _domain_projection_op

    x, dy, ids = _inputs()
    for bias, q, width in ((False, None, 5), (True, None, 6), (True, 3, 3)):
        torch.library.opcheck(
            _domain_projection_op,
            (x, dy, ids, 3, torch.zeros(3, 4, width), 1, 2, 7, q, bias, "torch", True, False),
        )
        torch.library.opcheck(
            _domain_projection_op,
            (x, dy, ids, 3, torch.zeros(3, 4, width), 1, 2, 7, q, bias, "torch", True, False,
             torch.tensor([2, 0]), torch.zeros(3, 2, width)),
        )  # fmt: skip
        torch.library.opcheck(
            _domain_projection_op,
            (x, dy, ids, 3, torch.zeros(3, 4, width), 1, 2, 7, q, bias, "torch", True, False,
             None, None, False),
        )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [None, [3, 17]], ids=["plain", "exact-rows"])
def test_op_without_dw_updates_the_same_state(rows, backend):
    """``need_dw=False`` (a target gradient): no ``dW``, the same state bit for bit."""
    g = torch.Generator().manual_seed(8)
    x, dy = make_inputs(37, 33, 70, torch.float32, g)
    ids = make_ids("mixed", 37, 4, g)
    out = []
    for need_dw in (True, False):
        kw = {}
        if rows is not None:
            kw = {"exact_index": torch.tensor(rows, device=DEVICE),
                  "exact": torch.zeros(4, len(rows), 34, device=DEVICE)}  # fmt: skip
        dw, proj = domain_projection(x, dy, ids, 4, proj_dim=16, bias=True, backend=backend,
                                     need_dw=need_dw, **kw)  # fmt: skip
        out.append((dw, proj, kw.get("exact")))
    assert torch.equal(out[0][0], dy.t().mm(x)) and out[1][0] is None
    assert torch.equal(out[0][1], out[1][1])
    if rows is not None:
        assert torch.equal(out[0][2], out[1][2]) and out[1][2].abs().sum() > 0
    with pytest.raises(TypeError, match=r"^need_dw must be a bool, got int$"):
        domain_projection(x, dy, ids, 4, backend=backend, need_dw=1)


def test_exported_from_ops():
    assert rnb.ops.domain_projection is domain_projection
    assert "domain_projection" in rnb.ops.__all__


# --------------------------------------------------------------------------- tracker

M = 4


class MLP(nn.Module):
    def __init__(self, bias: bool = True, d: int = 6, h: int = 40, o: int = 30):
        super().__init__()
        self.inp = nn.Linear(d, h, bias=bias)
        self.mid = nn.Linear(h, h, bias=bias)
        self.head = nn.Linear(h, o, bias=bias)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


def _run(model, tracker, batches):
    for x, ids in batches:
        with tracker.domains(ids):
            model(x).square().sum().backward()


def _batches(g, n=2):
    out = []
    for _ in range(n):
        ids = torch.randint(0, M, (6, 4), generator=g)
        ids[torch.rand(6, 4, generator=g) < 0.3] = -1
        out.append((torch.randn(6, 4, 6, generator=g), ids))
    return out


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("q", [None, 9], ids=["out-only", "two-sided"])
def test_tracker_projected_equals_projection_of_exact_and_gram_within_bound(bias, q):
    g = torch.Generator().manual_seed(14)
    model = MLP(bias=bias)
    exact_model = copy.deepcopy(model)
    p = 16
    pr = DomainGradientTracker(model, M, modules=["mid", "head"], mode="projected",
                               proj_dim=p, proj_in_dim=q, seed=11)  # fmt: skip
    ex = DomainGradientTracker(exact_model, M, modules=["mid", "head"], mode="exact")
    assert pr.mode == "projected"
    batches = _batches(g)
    _run(model, pr, batches)
    _run(exact_model, ex, batches)
    # Deterministic part: each layer's state is P_out [g | β] (P_inᵀ) of the exact gradients.
    grads = ex.domain_grads().double()
    off, expected, var = 0, [], torch.zeros(M, M, dtype=torch.float64)
    for layer, mod in enumerate([exact_model.mid, exact_model.head]):
        ko, ki = mod.weight.shape
        w = grads[:, off : off + ko * ki].view(M, ko, ki)
        off += ko * ki
        if bias:
            w = torch.cat([w, grads[:, off : off + ko].view(M, ko, 1)], 2)
            off += ko
        pw = projection_matrix_ref(ko, p, seed=11, layer=layer) @ w
        if q is not None:
            pw = pw @ projection_matrix_ref(w.shape[2], q, seed=11, layer=layer, side=PROJ_IN).T
        expected.append(pw.reshape(M, -1))
        # Output-side variance of every entry of the Gram (ops/reference.py).
        for a in range(M):
            for b in range(M):
                mm = w[a] @ w[b].T
                var[a, b] += (mm.square().sum() + torch.trace(mm @ mm)
                              - 2 * mm.diagonal().square().sum()) / p  # fmt: skip
    assert_close(pr.domain_projections(), torch.cat(expected, 1), torch.float32, "projections")
    assert_close(pr.target_grad(), torch.zeros(sum(e.shape[1] for e in expected)),
                 torch.float32)  # fmt: skip
    gram = pr.gram()
    assert_close(gram, torch.cat(expected, 1) @ torch.cat(expected, 1).T, torch.float32, "gram")
    if q is None:  # statistical part: |G_proj - G| within 6 sigma of the documented variance
        z = (gram - ex.gram()).abs() / var.sqrt().clamp(min=1e-30)
        assert float(z.max()) < 6.0, f"max z-score {float(z.max()):.2f}"
    c = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    assert_close(pr.gram_vector(c), gram @ c, torch.float32, "gram_vector vs gram @ c")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_param_grad_bit_identical_in_projected_mode(bias):
    g = torch.Generator().manual_seed(15)
    model = MLP(bias=bias)
    untracked = copy.deepcopy(model)
    tr = DomainGradientTracker(model, M, modules=["inp", "mid", "head"], mode="projected",
                               proj_dim=8, backend="torch")  # fmt: skip
    batches = _batches(g)
    _run(model, tr, batches)
    for x, _ in batches:
        untracked(x).square().sum().backward()
    for (n, a), (_, b) in zip(model.named_parameters(), untracked.named_parameters()):
        assert torch.equal(a.grad, b.grad), n


def test_target_alignment_in_projected_mode():
    g = torch.Generator().manual_seed(16)
    model = MLP()
    tr = DomainGradientTracker(model, M, modules=["head"], mode="projected", proj_dim=8)
    _run(model, tr, _batches(g))
    xs = torch.randn(3, 4, 6, generator=g)
    tr.record_target(model(xs).square().sum())
    dom, tgt = tr.domain_projections().double(), tr.target_grad().double()
    assert tgt.abs().sum() > 0
    assert_close(tr.target_alignment(), dom @ tgt, torch.float32, "alignment")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton cannot run here")
def test_tracker_triton_backend_matches_torch():
    g = torch.Generator().manual_seed(17)
    model = MLP(h=20, o=17)
    other = copy.deepcopy(model)
    a = DomainGradientTracker(model, M, modules=["head"], mode="projected", proj_dim=8,
                              backend="triton")  # fmt: skip
    b = DomainGradientTracker(other, M, modules=["head"], mode="projected", proj_dim=8,
                              backend="torch")  # fmt: skip
    batches = _batches(g, 1)
    _run(model, a, batches)
    _run(other, b, batches)
    assert_close(a.domain_projections(), b.domain_projections().double(), ACC_DTYPE, "state")


def test_state_dict_round_trip_and_mismatch():
    g = torch.Generator().manual_seed(18)
    model = MLP()
    tr = DomainGradientTracker(model, M, modules=["head"], mode="projected", proj_dim=8)
    _run(model, tr, _batches(g))
    state = tr.state_dict()
    assert state["mode"] == "projected" and state["proj_dim"] == 8
    assert state["proj_in_dim"] is None
    tr.remove()
    fresh = DomainGradientTracker(model, M, modules=["head"], mode="projected", proj_dim=8)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.domain_projections(), torch.as_tensor(
        state["slots"][0]["buffers"]["domain"]["p"]).reshape(M, -1))  # fmt: skip
    fresh.remove()
    other = DomainGradientTracker(model, M, modules=["head"], mode="projected", proj_dim=16)
    with pytest.raises(ValueError, match="configured"):
        other.load_state_dict(state)
    other.remove()


def test_mode_specific_accessors():
    model = MLP()
    tr = DomainGradientTracker(model, M, modules=["head"], mode="projected", proj_dim=8)
    with pytest.raises(RuntimeError, match="exact"):
        tr.domain_grads()
    with pytest.raises(RuntimeError, match="sketch"):
        tr.domain_sketches()
    tr.remove()
    ex = DomainGradientTracker(model, M, modules=["head"], mode="exact")
    with pytest.raises(RuntimeError, match="projected"):
        ex.domain_projections()
    ex.remove()


BAD_TRACKER = [
    (dict(mode="projection"), ValueError, "mode"),
    (dict(proj_dim=0), ValueError, "proj_dim"),
    (dict(proj_dim=True), TypeError, "proj_dim"),
    (dict(proj_in_dim=0), ValueError, "proj_in_dim"),
    (dict(proj_in_dim=2.0), TypeError, "proj_in_dim"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD_TRACKER, ids=[str(c[0]) for c in BAD_TRACKER])
def test_tracker_rejects_bad_projection_args(kwargs, exc, name):
    model = MLP()
    with pytest.raises(exc, match=name):
        DomainGradientTracker(model, M, **kwargs)
    assert "forward" not in model.head.__dict__  # nothing was installed


def test_auto_mode_rule(monkeypatch, caplog):
    model = MLP(bias=True)  # head: 30 x 40 + 30 = 1230 parameters
    tr = DomainGradientTracker(model, M)
    assert tr.requested_mode == "auto" and tr.mode == "exact"  # the default is "auto"
    tr.remove()
    limit = M * 1230
    monkeypatch.setattr(tracker_mod, "AUTO_EXACT_MAX_ELEMENTS", limit)
    with caplog.at_level(logging.INFO, logger="rnb_kernels.tracking.tracker"):
        tr = DomainGradientTracker(model, M, modules=["head"])
    assert tr.mode == "exact"  # m * P == limit: still exact
    assert "mode='auto' -> 'exact'" in caplog.text
    tr.remove()
    tr = DomainGradientTracker(model, M + 1, modules=["head"])
    assert tr.mode == "projected"
    assert tr.state_dict()["mode"] == "projected"
    tr.remove()
    # Two layers count together: inp (40 x 6 + 40) pushes the same m over the limit.
    tr = DomainGradientTracker(model, M, modules=["inp", "head"])
    assert tr.mode == "projected"
    tr.remove()
    # An explicit mode always wins.
    tr = DomainGradientTracker(model, M + 1, modules=["head"], mode="exact")
    assert tr.mode == "exact"
    tr.remove()


def test_auto_mode_on_real_sizes():
    from rnb_kernels.tracking.tracker import resolve_mode

    def head(k_out, k_in):
        return [("lm_head", nn.Linear(k_in, k_out, bias=False, device="meta"))]

    # The demo's head (4096 x 64) stays exact up to 64 domains; the CPU GPT config of issue 10
    # (8192 x 256, m = 16) and a GPT-2 head are projected.
    assert resolve_mode("auto", 64, head(4096, 64)) == "exact"
    assert resolve_mode("auto", 16, head(8192, 256)) == "projected"
    assert resolve_mode("auto", 2, head(50257, 768)) == "projected"
    assert resolve_mode("sketch", 2, head(50257, 768)) == "sketch"


def test_tolerance_table_covers_all_dtypes():
    for dt in DTYPES:
        assert dt in TOL
