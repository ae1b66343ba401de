"""The three ops on the torch backend vs independent brute force, plus validation and dispatch."""

from __future__ import annotations

import math

import pytest
import torch
from _tol import TOL, assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnb_kernels as rnb
from rnb_kernels.ops import domain_sketch, gram, segmented_wgrad
from rnb_kernels.ops.reference import (
    count_sketch_ref,
    domain_sketch_ref,
    gram_ref,
    segmented_wgrad_ref,
    sketch_hash_ref,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def brute_force(x, dy, ids, m):
    """Row-by-row outer products in float64: shares no code with the library."""
    k_out, k_in = dy.shape[1], x.shape[1]
    dw = torch.zeros(k_out, k_in, dtype=torch.float64)
    per = torch.zeros(m, k_out, k_in, dtype=torch.float64)
    for n in range(x.shape[0]):
        outer = torch.outer(dy[n].double(), x[n].double())
        dw += outer
        if int(ids[n]) >= 0:
            per[int(ids[n])] += outer
    return dw, per


def make_case(n, k_in, k_out, m, dtype, id_mode="random"):
    x = torch.randn(n, k_in).to(dtype)
    dy = torch.randn(n, k_out).to(dtype)
    if id_mode == "random":
        ids = torch.randint(-1, m, (n,))
    elif id_mode == "all_ignored":
        ids = torch.full((n,), -1)
    elif id_mode == "one_domain":
        ids = torch.full((n,), m - 1)
    elif id_mode == "skip_even":  # only odd domains present: the even ones stay empty
        ids = (torch.randint(0, max(m // 2, 1), (n,)) * 2 + 1).clamp(max=m - 1)
    else:
        raise AssertionError(id_mode)
    return x, dy, ids


# --------------------------------------------------------------------------- segmented_wgrad


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    k_in=st.integers(1, 17),
    k_out=st.integers(1, 13),
    m=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    id_mode=st.sampled_from(["random", "all_ignored", "one_domain", "skip_even"]),
    id_dtype=st.sampled_from([torch.int32, torch.int64]),
)
def test_segmented_wgrad_matches_brute_force(n, k_in, k_out, m, dtype, id_mode, id_dtype):
    x, dy, ids = make_case(n, k_in, k_out, m, dtype, id_mode)
    ids = ids.to(id_dtype)
    acc0 = torch.randn(m, k_out, k_in)
    acc = acc0.clone()
    dw, acc_out = segmented_wgrad(x, dy, ids, m, acc, backend="torch")
    ref_dw, ref_per = brute_force(x, dy, ids, m)
    assert acc_out is acc
    assert dw.dtype == dtype and dw.shape == (k_out, k_in)
    assert_close(dw, ref_dw, dtype, "dW")
    assert_close(acc - acc0, ref_per, torch.float32, "acc increment")
    # Domains without rows must not be touched at all, not even by a +0 rounding.
    absent = [d for d in range(m) if not bool((ids == d).any())]
    for d in absent:
        assert torch.equal(acc[d], acc0[d])


@pytest.mark.parametrize(
    "n,k_in,k_out",
    [(1, 1, 1), (37, 33, 5), (1000, 33, 70), (300, 1, 1000)],
    ids=lambda v: str(v),
)
def test_segmented_wgrad_odd_shapes_vs_reference(n, k_in, k_out):
    m = 7
    x, dy, ids = make_case(n, k_in, k_out, m, torch.float32)
    dw, acc = segmented_wgrad(x, dy, ids, m, backend="torch")
    ref_dw, ref_per = segmented_wgrad_ref(x, dy, ids, m)
    assert_close(dw, ref_dw, torch.float32, "dW")
    assert_close(acc, ref_per, torch.float32, "acc")


def test_reference_agrees_with_brute_force():
    x, dy, ids = make_case(29, 6, 4, 5, torch.float64)
    ref_dw, ref_per = segmented_wgrad_ref(x, dy, ids, 5)
    bf_dw, bf_per = brute_force(x, dy, ids, 5)
    torch.testing.assert_close(ref_dw, bf_dw)
    torch.testing.assert_close(ref_per, bf_per)


def test_fp32_dw_is_bitwise_the_autograd_gemm():
    """On the torch backend dW is the very GEMM autograd runs for nn.Linear."""
    lin = torch.nn.Linear(24, 10, bias=False)
    x = torch.randn(50, 24, requires_grad=False)
    out = lin(x)
    dy = torch.randn_like(out)
    out.backward(dy)
    dw, _ = segmented_wgrad(x, dy, torch.randint(-1, 3, (50,)), 3, backend="torch")
    assert torch.equal(dw, lin.weight.grad)


def test_accumulates_across_calls():
    x, dy, ids = make_case(40, 9, 6, 3, torch.float32)
    acc = torch.zeros(3, 6, 9)
    segmented_wgrad(x[:15], dy[:15], ids[:15], 3, acc, backend="torch")
    segmented_wgrad(x[15:], dy[15:], ids[15:], 3, acc, backend="torch")
    _, ref_per = segmented_wgrad_ref(x, dy, ids, 3)
    assert_close(acc, ref_per, torch.float32, "two calls")


def test_float64_inputs_on_torch_backend():
    x, dy, ids = make_case(11, 5, 3, 2, torch.float64)
    dw, acc = segmented_wgrad(x, dy, ids, 2, backend="torch")
    ref_dw, ref_per = segmented_wgrad_ref(x, dy, ids, 2)
    assert dw.dtype == torch.float64
    assert_close(dw, ref_dw, torch.float64, "dW")
    assert_close(acc, ref_per, torch.float32, "acc")


# --------------------------------------------------------------------------- sketch


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 30),
    k_in=st.integers(1, 11),
    k_out=st.integers(1, 9),
    m=st.integers(1, 5),
    sketch_dim=st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
    layer=st.integers(0, 7),
    dtype=st.sampled_from(DTYPES),
    id_mode=st.sampled_from(["random", "all_ignored", "one_domain", "skip_even"]),
)
def test_domain_sketch_matches_brute_force(
    n, k_in, k_out, m, sketch_dim, seed, layer, dtype, id_mode
):
    x, dy, ids = make_case(n, k_in, k_out, m, dtype, id_mode)
    dw, sk = domain_sketch(
        x, dy, ids, m, sketch_dim=sketch_dim, seed=seed, layer=layer, backend="torch"
    )
    ref_dw, ref_per = brute_force(x, dy, ids, m)
    # Independent sketch: loop over every element with the hash spec.
    bucket, sign = sketch_hash_ref(k_out, k_in, sketch_dim, seed, layer)
    ref_sk = torch.zeros(m, sketch_dim, dtype=torch.float64)
    for i in range(k_out):
        for j in range(k_in):
            ref_sk[:, bucket[i, j]] += sign[i, j] * ref_per[:, i, j]
    assert_close(dw, ref_dw, dtype, "dW")
    assert_close(sk, ref_sk, torch.float32, "sketch")
    _, ref_sk2 = domain_sketch_ref(x, dy, ids, m, sketch_dim, seed, layer)
    assert_close(ref_sk2, ref_sk, torch.float64, "domain_sketch_ref")


def test_hash_spec_known_values():
    """Pins the hash so any backend (and any refactor) must reproduce these exact buckets."""
    bucket, sign = sketch_hash_ref(2, 3, 1000, seed=0, layer=0)
    bucket2, sign2 = sketch_hash_ref(2, 3, 1000, seed=0, layer=0)
    assert torch.equal(bucket, bucket2) and torch.equal(sign, sign2)
    assert bucket.min() >= 0 and bucket.max() < 1000
    # Recompute element (1, 2) by hand from the documented formula.
    m32 = 0xFFFFFFFF

    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & m32
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & m32
        return h ^ (h >> 16)

    seed, layer, i, j = 5, 3, 1, 2
    b, s = sketch_hash_ref(2, 3, 1000, seed=seed, layer=layer)
    row = fmix(
        ((seed * 0x9E3779B9) & m32) ^ ((layer * 0x85EBCA6B) & m32) ^ ((i * 0xC2B2AE35) & m32)
    )
    h = fmix((row + j * 0x27D4EB2F) & m32)
    assert int(b[i, j]) == (h & 0x7FFFFFFF) % 1000
    assert float(s[i, j]) == (1.0 if (h >> 31) == 0 else -1.0)


def test_sketch_is_linear_and_deterministic():
    x, dy, ids = make_case(60, 13, 7, 4, torch.float32)
    whole = domain_sketch(x, dy, ids, 4, sketch_dim=32, seed=9, layer=2, backend="torch")[1]
    parts = torch.zeros(4, 32)
    for lo in range(0, 60, 17):
        domain_sketch(
            x[lo : lo + 17], dy[lo : lo + 17], ids[lo : lo + 17], 4, parts, seed=9, layer=2
        )
    assert_close(parts, whole.double(), torch.float32, "sketch of sum vs sum of sketches")
    again = domain_sketch(x, dy, ids, 4, sketch_dim=32, seed=9, layer=2, backend="torch")[1]
    assert torch.equal(again, whole)
    other = domain_sketch(x, dy, ids, 4, sketch_dim=32, seed=10, layer=2, backend="torch")[1]
    assert not torch.allclose(other, whole)


def test_sketch_inner_product_is_unbiased_with_predicted_variance():
    """Over many seeds: mean error within 3 SE of 0, variance within 2x of the variance formula in docs/design.md."""
    k_out, k_in, k, seeds = 12, 20, 64, 2000
    x = torch.randn(40, k_in, dtype=torch.float64)
    dy = torch.randn(40, k_out, dtype=torch.float64)
    ids = torch.tensor([0] * 20 + [1] * 20)
    # Correlated domains so <g_a, g_b> is far from 0 and both variance terms matter.
    dy[20:] = 0.6 * dy[:20] + 0.8 * dy[20:]
    x[20:] = x[:20]
    _, per = segmented_wgrad_ref(x, dy, ids, 2)
    ga, gb = per[0].flatten(), per[1].flatten()
    truth = float(ga @ gb)
    est = torch.empty(seeds, dtype=torch.float64)
    for s in range(seeds):
        sk = count_sketch_ref(per, k, seed=s, layer=0)
        est[s] = sk[0] @ sk[1]
    err = est - truth
    se = float(err.std()) / math.sqrt(seeds)
    assert abs(float(err.mean())) < 3 * se, (float(err.mean()), se)
    predicted = (float(ga @ ga) * float(gb @ gb) + truth**2) / k
    ratio = float(err.var()) / predicted
    assert 0.5 < ratio < 2.0, ratio


def test_torch_backend_sketch_equals_spec_on_large_tile():
    x, dy, ids = make_case(50, 70, 33, 3, torch.float32)
    _, sk = domain_sketch(x, dy, ids, 3, sketch_dim=97, seed=123, layer=4, backend="torch")
    _, ref = domain_sketch_ref(x, dy, ids, 3, 97, seed=123, layer=4)
    assert_close(sk, ref, torch.float32, "sketch")


# --------------------------------------------------------------------------- gram


def gram_loops(a, b=None):
    rows_b = a if b is None else b
    out = torch.zeros(a.shape[0], rows_b.shape[0], dtype=torch.float64)
    for i in range(a.shape[0]):
        for j in range(rows_b.shape[0]):
            out[i, j] = sum(float(u) * float(v) for u, v in zip(a[i].double(), rows_b[j].double()))
    return out


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 6),
    p=st.integers(1, 50),
    r=st.integers(0, 3),
    dtype=st.sampled_from(DTYPES),
)
def test_gram_matches_loops(m, p, r, dtype):
    a = torch.randn(m, p).to(dtype)
    g = gram(a, backend="torch")
    assert g.dtype == torch.float64 and g.shape == (m, m)
    assert_close(g, gram_loops(a), torch.float32, "A A^T")
    assert torch.equal(g, g.T)
    if r:
        b = torch.randn(r, p).to(dtype)
        assert_close(gram(a, b, backend="torch"), gram_loops(a, b), torch.float32, "A B^T")
        vec = gram(a, b[0], backend="torch")
        assert vec.shape == (m,)
        assert_close(vec, gram_loops(a, b[:1])[:, 0], torch.float32, "A b")


def test_gram_reference_and_chunking(monkeypatch):
    import sys

    gram_mod = sys.modules["rnb_kernels.ops.gram"]  # the package attribute is the function
    monkeypatch.setattr(gram_mod, "_CHUNK", 7)  # force several column chunks
    a = torch.randn(5, 40)
    assert_close(gram(a, backend="torch"), gram_ref(a), torch.float32, "chunked")
    assert_close(gram_ref(a), gram_loops(a), torch.float64, "gram_ref")
    assert_close(gram(a, a[2], backend="torch"), gram_ref(a, a[2]), torch.float32, "vector")


def test_gram_of_accumulators_is_domain_inner_products():
    x, dy, ids = make_case(80, 10, 6, 4, torch.float32)
    _, acc = segmented_wgrad(x, dy, ids, 4)
    _, per = brute_force(x, dy, ids, 4)
    flat = per.reshape(4, -1)
    assert_close(gram(acc.view(4, -1)), flat @ flat.T, torch.float32, "G")


# --------------------------------------------------------------------------- validation


def _inputs():
    x = torch.randn(8, 5)
    dy = torch.randn(8, 3)
    ids = torch.tensor([0, 1, 2, -1, 0, 1, 2, 2])
    acc = torch.randn(3, 3, 5)
    return x, dy, ids, acc


BAD_WGRAD = [
    ("float ids", dict(domain_ids=torch.zeros(8)), TypeError, "domain_ids"),
    ("ids >= m", dict(domain_ids=torch.tensor([0, 1, 3, 0, 0, 0, 0, 0])), ValueError, "domain_ids"),
    (
        "ids < -1",
        dict(domain_ids=torch.tensor([0, -2, 1, 0, 0, 0, 0, 0])),
        ValueError,
        "domain_ids",
    ),
    ("ids 2-D", dict(domain_ids=torch.zeros(8, 1, dtype=torch.long)), ValueError, "domain_ids"),
    ("ids too short", dict(domain_ids=torch.zeros(7, dtype=torch.long)), ValueError, "domain_ids"),
    ("dy rows", dict(dy=torch.randn(7, 3)), ValueError, "dy"),
    ("dy dtype", dict(dy=torch.randn(8, 3, dtype=torch.float64)), TypeError, "dy"),
    ("x 1-D", dict(x=torch.randn(8)), ValueError, "x"),
    ("x int", dict(x=torch.ones(8, 5, dtype=torch.long)), TypeError, "x"),
    ("x not tensor", dict(x=[[1.0] * 5] * 8), TypeError, "x"),
    ("acc shape", dict(acc=torch.zeros(3, 5, 3)), ValueError, "acc"),
    ("acc dtype", dict(acc=torch.zeros(3, 3, 5, dtype=torch.float64)), TypeError, "acc"),
    ("acc strided", dict(acc=torch.zeros(3, 5, 3).transpose(1, 2)), ValueError, "acc"),
    ("num_domains 0", dict(num_domains=0), ValueError, "num_domains"),
    ("num_domains bool", dict(num_domains=True), TypeError, "num_domains"),
    ("num_domains float", dict(num_domains=3.0), TypeError, "num_domains"),
    ("backend name", dict(backend="cudnn"), ValueError, "backend"),
]


@pytest.mark.parametrize("case", BAD_WGRAD, ids=[c[0] for c in BAD_WGRAD])
def test_segmented_wgrad_rejects_bad_input_without_touching_acc(case):
    _, override, exc, name = case
    x, dy, ids, acc = _inputs()
    args = dict(x=x, dy=dy, domain_ids=ids, num_domains=3, acc=acc, backend="torch")
    args.update(override)
    before = args["acc"].clone()
    with pytest.raises(exc, match=name):
        segmented_wgrad(**args)
    assert torch.equal(args["acc"], before)


@pytest.mark.parametrize("which", ["x", "dy"])
def test_non_finite_inputs_rejected_when_checked(which):
    x, dy, ids, acc = _inputs()
    bad = {"x": x, "dy": dy}
    bad[which][2, 1] = float("nan")
    before = acc.clone()
    with pytest.raises(ValueError, match=which):
        segmented_wgrad(bad["x"], bad["dy"], ids, 3, acc, check_finite=True)
    assert torch.equal(acc, before)
    sk = torch.zeros(3, 16)
    with pytest.raises(ValueError, match=which):
        domain_sketch(bad["x"], bad["dy"], ids, 3, sk, check_finite=True)
    assert torch.equal(sk, torch.zeros(3, 16))


BAD_SKETCH = [
    ("sketch dtype", dict(sketch=torch.zeros(3, 16, dtype=torch.float16)), TypeError, "sketch"),
    ("sketch rows", dict(sketch=torch.zeros(2, 16)), ValueError, "sketch"),
    ("sketch 1-D", dict(sketch=torch.zeros(16)), ValueError, "sketch"),
    ("sketch_dim 0", dict(sketch=None, sketch_dim=0), ValueError, "sketch_dim"),
    ("seed negative", dict(seed=-1), ValueError, "seed"),
    ("seed too big", dict(seed=2**32), ValueError, "seed"),
    ("layer float", dict(layer=1.5), TypeError, "layer"),
    ("ids >= m", dict(domain_ids=torch.tensor([0, 1, 5, 0, 0, 0, 0, 0])), ValueError, "domain_ids"),
]


@pytest.mark.parametrize("case", BAD_SKETCH, ids=[c[0] for c in BAD_SKETCH])
def test_domain_sketch_rejects_bad_input_without_touching_sketch(case):
    _, override, exc, name = case
    x, dy, ids, _ = _inputs()
    args = dict(x=x, dy=dy, domain_ids=ids, num_domains=3, sketch=torch.ones(3, 16))
    args.update(override)
    before = None if args["sketch"] is None else args["sketch"].clone()
    with pytest.raises(exc, match=name):
        domain_sketch(**args)
    if before is not None:
        assert torch.equal(args["sketch"], before)


BAD_GRAM = [
    ("a 1-D", dict(a=torch.randn(5)), ValueError, "a"),
    ("a int", dict(a=torch.ones(2, 5, dtype=torch.long)), TypeError, "a"),
    ("b cols", dict(b=torch.randn(2, 4)), ValueError, "b"),
    ("b dtype", dict(b=torch.randn(5, dtype=torch.float64)), TypeError, "b"),
    ("b 3-D", dict(b=torch.randn(1, 1, 5)), ValueError, "b"),
]


@pytest.mark.parametrize("case", BAD_GRAM, ids=[c[0] for c in BAD_GRAM])
def test_gram_rejects_bad_input(case):
    _, override, exc, name = case
    args = dict(a=torch.randn(3, 5), b=None)
    args.update(override)
    with pytest.raises(exc, match=name):
        gram(**args)


def test_gram_non_finite_rejected_when_checked():
    a = torch.randn(3, 5)
    a[1, 1] = float("inf")
    with pytest.raises(ValueError, match="a contains"):
        gram(a, check_finite=True)


# --------------------------------------------------------------------------- dispatch


def test_backends_report():
    status = rnb.backends()
    assert set(status) == {"cuda", "triton", "torch"}
    assert status["torch"].available
    for s in status.values():
        assert isinstance(s.reason, str) and s.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cuda_backend_on_cpu_says_what_to_do():
    x, dy, ids, acc = _inputs()
    with pytest.raises(rnb.BackendUnavailableError, match="cuda") as info:
        segmented_wgrad(x, dy, ids, 3, acc, backend="cuda")
    msg = str(info.value)
    assert "pip install" in msg or "CUDA device" in msg or "CPU-only" in msg
    with pytest.raises(rnb.BackendUnavailableError):
        gram(torch.randn(2, 3), backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_triton_on_cpu_needs_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, dy, ids, acc = _inputs()
    with pytest.raises(rnb.BackendUnavailableError, match="TRITON_INTERPRET"):
        segmented_wgrad(x, dy, ids, 3, acc, backend="triton")


def test_auto_uses_torch_on_cpu():
    x, dy, ids, _ = _inputs()
    dw_auto, acc_auto = segmented_wgrad(x, dy, ids, 3)
    dw_t, acc_t = segmented_wgrad(x, dy, ids, 3, backend="torch")
    assert torch.equal(dw_auto, dw_t) and torch.equal(acc_auto, acc_t)


def test_custom_ops_pass_opcheck():
    """Schema, fake implementation and aliasing of the torch.library ops are consistent."""
    from rnb_kernels.ops.domain_sketch import _domain_sketch_op
    from rnb_kernels.ops.gram import _gram_op
    from rnb_kernels.ops.segmented_wgrad import _segmented_wgrad_op

    x, dy, ids, acc = _inputs()
    bias_acc = torch.zeros(3, dy.shape[1])
    for b_acc in (None, bias_acc):
        torch.library.opcheck(
            _segmented_wgrad_op, (x, dy, ids, 3, acc, b_acc, "torch", True, False)
        )
    for bias in (False, True):
        torch.library.opcheck(
            _domain_sketch_op,
            (x, dy, ids, 3, torch.zeros(3, 16), 1, 0, bias, "torch", True, False),
        )
    torch.library.opcheck(_gram_op, (acc.view(3, -1), None, "torch", False))


def test_tolerance_table_covers_all_dtypes():
    for dt in DTYPES:
        assert dt in TOL


# ----------------------------------------------------------------------------- grouping
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n", [0, 1, 37, 1000])
def test_group_rows_is_a_stable_sort_with_segment_offsets(n, id_dtype):
    from rnb_kernels.ops.grouping import group_rows, host_segments

    m = 5
    ids = torch.randint(-1, m, (n,), dtype=id_dtype)
    order, bounds = group_rows(ids, m)
    assert order.dtype == torch.int64 and bounds.shape == (m + 2,)
    # Brute force: rows of each id in original order, -1 first.
    expect = [i for d in range(-1, m) for i in range(n) if int(ids[i]) == d]
    assert order.tolist() == expect
    for s in range(m + 1):
        seg = order[bounds[s] : bounds[s + 1]]
        assert bool((ids[seg] == s - 1).all())
    assert [d for d, _, _ in host_segments(bounds)] == sorted({int(v) for v in ids} - {-1})


def test_host_runs_groups_contiguous_runs_or_declines():
    from rnb_kernels.ops.grouping import host_runs

    ids = torch.tensor([2, 2, 2, -1, -1, 0, 0, 2, 2])
    assert host_runs(ids, min_mean_run=2) == [(0, [(5, 7)]), (2, [(0, 3), (7, 9)])]
    assert host_runs(ids, min_mean_run=3) is None  # 4 runs over 9 rows: too fragmented
    assert host_runs(torch.tensor([], dtype=torch.int64)) == []
    assert host_runs(torch.full((64,), -1), min_mean_run=32) == []


@pytest.mark.parametrize("layout", ["per-sample runs", "fragmented"])
def test_torch_backend_run_and_gather_paths_agree_with_reference(layout):
    """Both row-block paths of the torch backends (views of runs, gathered copy)."""
    g = torch.Generator().manual_seed(7)
    m, n = 4, 256
    if layout == "per-sample runs":
        ids = torch.randint(-1, m, (8,), generator=g).repeat_interleave(n // 8)
    else:
        ids = torch.randint(-1, m, (n,), generator=g)
    x, dy = torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)
    dw, acc = rnb.ops.segmented_wgrad(x, dy, ids, m, backend="torch")
    ref_dw, ref_acc = segmented_wgrad_ref(x, dy, ids, m)
    assert torch.equal(dw, dy.t().mm(x))
    torch.testing.assert_close(acc.double(), ref_acc, rtol=1e-5, atol=1e-5)
    _, s = rnb.ops.domain_sketch(x, dy, ids, m, sketch_dim=16, seed=3, backend="torch")
    torch.testing.assert_close(
        s.double(), domain_sketch_ref(x, dy, ids, m, 16, seed=3)[1], rtol=1e-5, atol=1e-5
    )
