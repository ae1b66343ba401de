"""domain_sketch (count-sketch) on every backend against an element-by-element float64 sketch."""

from __future__ import annotations

import math

import pytest
import torch
from _optest import (
    BACKENDS,
    DTYPE_IDS,
    DTYPES,
    GPU_BACKENDS,
    GemmShapes,
    absent_domains,
    brute_force,
    device_of,
    make_ids,
    make_inputs,
)
from _tol import ACC_DTYPE, assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnb_kernels.ops import domain_sketch
from rnb_kernels.ops.domain_sketch import domain_sketch_torch
from rnb_kernels.ops.reference import (
    count_sketch_ref,
    domain_sketch_ref,
    segmented_wgrad_ref,
    sketch_hash_ref,
)
from rnb_kernels.ops.sketch_hash import key_base

EXAMPLES = {"torch": 40, "triton": 12, "cuda": 40}


def assert_sketch_close(s, s0, ref_s, x, dy, ids, m, k, seed, layer):
    """``s == s0 + ref_s`` per bucket, within fp32 accumulation of that bucket's terms.

    A bucket is a signed sum of every weight that hashes to it (a whole domain's gradient when
    ``k = 1``), added in fp32 in an order the GPU's atomics choose, so its rounding error
    scales with the bucket's magnitude ``M_b = Σ |g_ij|``, not with its (cancelled) value:
    bound ``8 · eps32 · M_b`` (random-sign summation) plus the fp32 tolerance of the value.
    A dropped or doubled weight still fails: it moves the bucket by ``|g_ij|`` >> the bound.
    """
    _, per = segmented_wgrad_ref(x, dy, ids, m)
    bucket, _ = sketch_hash_ref(dy.shape[1], x.shape[1], k, seed, layer, device=per.device)
    mag = torch.zeros(m, k, dtype=torch.float64, device=per.device)
    mag.index_add_(1, bucket.reshape(-1), per.abs().reshape(m, -1))
    want = (s0.double() + ref_s).cpu()
    err = (s.double().cpu() - want).abs()
    scale = max(float(want.abs().max()) if want.numel() else 0.0, 1.0)
    bound = 1e-5 * (want.abs() + scale) + 8 * 2.0**-24 * mag.cpu()
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"sketch: bucket error up to {worst:.3g}x its bound"


def check_sketch(x, dy, ids, m, k, seed, layer, backend):
    s0 = torch.randn(m, k, device=x.device)
    s = s0.clone()
    dw, out = domain_sketch(x, dy, ids, m, s, seed=seed, layer=layer, backend=backend)
    if x.is_cuda:
        torch.cuda.synchronize()
    assert out is s
    ref_dw, ref_s = domain_sketch_ref(x, dy, ids, m, k, seed, layer)
    assert_close(dw, ref_dw, x.dtype, "dW")
    assert_sketch_close(s, s0, ref_s, x, dy, ids, m, k, seed, layer)
    for d in absent_domains(ids, m):
        assert torch.equal(s[d], s0[d]), f"absent domain {d} was modified"


@pytest.mark.parametrize("backend", BACKENDS)
def test_domain_sketch_matches_brute_force(backend):
    dev = device_of(backend)

    @settings(max_examples=EXAMPLES[backend], deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(
        n=st.integers(1, 30),
        k_in=st.integers(1, 11),
        k_out=st.integers(1, 9),
        m=st.integers(1, 5),
        sketch_dim=st.integers(1, 50),
        seed=st.integers(0, 2**32 - 1),
        layer=st.integers(0, 7),
        dtype=st.sampled_from(DTYPES),
        id_mode=st.sampled_from(["random", "all-ignored", "one-domain", "skip-even"]),
    )
    def check(n, k_in, k_out, m, sketch_dim, seed, layer, dtype, id_mode):
        x, dy = make_inputs(n, k_in, k_out, dtype, dev)
        ids = make_ids(id_mode, n, m, dev)
        dw, sk = domain_sketch(
            x, dy, ids, m, sketch_dim=sketch_dim, seed=seed, layer=layer, backend=backend
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

    check()


SHAPES = [
    pytest.param(1, 1, 1, 1, id="N1-Kin1-Kout1-m1"),
    pytest.param(37, 33, 70, 5, id="N37-Kin33-Kout70-m5"),
    pytest.param(300, 70, 33, 7, id="N300-Kin70-Kout33-m7"),
    pytest.param(300, 1, 70, 3, id="N300-Kin1-Kout70-m3"),
]
PATTERNS = ["mixed", "sorted", "one-domain", "all-ignored", "empty-domains"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,k_in,k_out,m", SHAPES)
def test_domain_sketch_shapes(n, k_in, k_out, m, dtype, backend, poisoned):
    dev = device_of(backend)
    x, dy = make_inputs(n, k_in, k_out, dtype, dev)
    check_sketch(x, dy, make_ids("mixed", n, m, dev), m, 61, 7, 3, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_domain_sketch_id_patterns(pattern, backend, poisoned):
    dev = device_of(backend)
    x, dy = make_inputs(37, 33, 70, torch.float32, dev)
    check_sketch(x, dy, make_ids(pattern, 37, 6, dev), 6, 128, 0, 0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_domain_sketch_large_tile(backend, poisoned):
    dev = device_of(backend)
    x, dy = make_inputs(50, 70, 33, torch.float32, dev)
    check_sketch(x, dy, make_ids("mixed", 50, 3, dev), 3, 97, 123, 4, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "seed,layer,k",
    [
        pytest.param(0, 0, 1, id="k1"),
        pytest.param(1, 2, 1000, id="keybase-above-2^31"),
        pytest.param(2**32 - 1, 2**32 - 1, 97, id="seed-layer-max"),
    ],
)
def test_domain_sketch_hash_is_bit_identical_to_torch(seed, layer, k, backend):
    # Integer inputs keep every fp32 sum exact, so any bucket or sign that differs from the
    # torch backend's hash shows up as inequality, whatever order the atomics landed in.
    if seed == 1:
        assert key_base(seed, layer) >= 2**31
    dev = device_of(backend)
    n, m = 37, 4
    x, dy = make_inputs(n, 33, 70, torch.bfloat16, dev, integer=True)
    ids = make_ids("mixed", n, m, dev)
    s_backend = torch.zeros(m, k, device=dev)
    s_torch = torch.zeros(m, k, device=dev)
    domain_sketch(x, dy, ids, m, s_backend, seed=seed, layer=layer, backend=backend)
    domain_sketch_torch(x, dy, ids, m, s_torch, seed, layer)
    assert s_torch.abs().sum() > 0
    assert torch.equal(s_backend, s_torch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sketch_is_linear_and_deterministic(backend):
    dev = device_of(backend)
    x, dy = make_inputs(60, 13, 7, torch.float32, dev)
    ids = make_ids("mixed", 60, 4, dev)
    kw = dict(sketch_dim=32, layer=2, backend=backend)
    whole = domain_sketch(x, dy, ids, 4, seed=9, **kw)[1]
    parts = torch.zeros(4, 32, device=dev)
    for lo in range(0, 60, 17):
        sl = slice(lo, lo + 17)
        domain_sketch(x[sl], dy[sl], ids[sl], 4, parts, seed=9, layer=2, backend=backend)
    assert_close(parts, whole.double(), torch.float32, "sketch of sum vs sum of sketches")
    again = domain_sketch(x, dy, ids, 4, seed=9, **kw)[1]
    if backend == "torch":  # no atomics: bitwise reproducible
        assert torch.equal(again, whole)
    else:
        assert_close(again, whole.double(), torch.float32, "rerun")
    other = domain_sketch(x, dy, ids, 4, seed=10, **kw)[1]
    assert not torch.allclose(other, whole)


def test_sketch_inner_product_is_unbiased_with_predicted_variance():
    """Over many seeds: mean error within 3 SE of 0, variance within 2x of the formula
    ``(|g_a|²|g_b|² + <g_a, g_b>²) / k`` of docs/design.md (reference sketch; the backends
    equal it above)."""
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 37])
def test_sketch_folds_the_bias_column(backend, n):
    """domain_sketch(bias=True) sketches each domain's Σ dy as column K_in of [W | b]."""
    dev = device_of(backend)
    g = torch.Generator().manual_seed(n)
    m, k_in, k_out, k = 3, 5, 7, 32
    x = torch.randn(n, k_in, generator=g).to(dev)
    dy = torch.randn(n, k_out, generator=g).to(dev)
    ids = torch.randint(-1, m, (n,), generator=g).to(dev)
    s = torch.zeros(m, k, device=dev)
    domain_sketch(x, dy, ids, m, sketch=s, seed=5, layer=2, backend=backend, bias=True)
    _, ref = domain_sketch_ref(x, dy, ids, m, k, seed=5, layer=2, bias=True)
    assert_close(s, ref, torch.float32, "sketch with bias")
    without = torch.zeros(m, k, device=dev)
    domain_sketch(x, dy, ids, m, sketch=without, seed=5, layer=2, backend=backend)
    if bool((ids >= 0).any()):
        assert not torch.allclose(without, s)  # the bias column is really there


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_layer_offsets_sketch(monkeypatch, backend):
    """Forces Triton's int64 tile offsets (layers of 2**31+ weights); others run as is."""
    from rnb_kernels.ops.triton import segmented_wgrad as sw

    monkeypatch.setattr(sw, "_WIDE_ELEMENTS", 1)
    dev = device_of(backend)
    x, dy = make_inputs(37, 33, 70, torch.float32, dev)
    check_sketch(x, dy, make_ids("mixed", 37, 3, dev), 3, 50, 2, 9, backend)


# --------------------------------------------------------------------------- GPU sizes

GPU_SHAPES = [
    (1, 1, 1),
    (37, 33, 1),
    (37, 1, 33),
    (1000, 33, 1000),
    (1000, 1000, 33),
    (37, 1000, 1000),
    (1000, 128, 256),
    (1000, 2048, 2304),
]
SKETCH_KEYS = [(1, 0, 0), (61, 3, 1), (4096, 2**32 - 1, 7)]
# Large layers run with the realistic sketch width only: the cases are generated that way
# (nothing is skipped at run time).
GPU_SKETCH_CASES = [
    pytest.param(shape, key, id="N{}-Kin{}-Kout{}".format(*shape) + "-k{}-seed{}-layer{}".format(*key))
    for shape in GPU_SHAPES
    for key in SKETCH_KEYS
    if shape[1] * shape[2] <= 300_000 or key[0] == 4096
]  # fmt: skip


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,key", GPU_SKETCH_CASES)
@pytest.mark.parametrize("pattern", ["mixed", "one-domain", "sparse", "shuffled"])
def test_domain_sketch_gpu_shapes(dtype, shape, key, pattern, backend, poisoned):
    n, k_in, k_out = shape
    sketch_dim, seed, layer = key
    x, dy = make_inputs(n, k_in, k_out, dtype, "cuda")
    check_sketch(x, dy, make_ids(pattern, n, 4, "cuda"), 4, sketch_dim, seed, layer, backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_domain_sketch_gpu_large(dtype, backend):
    n, k_in, k_out, m = 4099, 768, 1000, 16
    x, dy = make_inputs(n, k_in, k_out, dtype, "cuda")
    check_sketch(x, dy, make_ids("mixed", n, m, "cuda"), m, 8192, 11, 4, backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sketch_dw_matches_segmented_dw(dtype, backend):
    from rnb_kernels.ops import segmented_wgrad

    n, k_in, k_out, m = 1000, 96, 160, 6
    x, dy = make_inputs(n, k_in, k_out, dtype, "cuda")
    ids = make_ids("mixed", n, m, "cuda").to(torch.int32)
    dw_c, acc_c = segmented_wgrad(x, dy, ids, m, backend=backend)
    dw_t, acc_t = segmented_wgrad(x, dy, ids, m, backend="torch")
    dw_s, _ = domain_sketch(x, dy, ids, m, sketch_dim=256, backend=backend)
    ref_dw, _ = segmented_wgrad_ref(x, dy, ids, m)
    assert_close(dw_c, dw_t.double(), dtype, "dW vs torch backend")
    assert_close(dw_s, ref_dw, dtype, "sketch-mode dW")
    assert_close(acc_c, acc_t.double(), ACC_DTYPE, "acc vs torch backend")


# --------------------------------------------------------------------------- validation


def _inputs(dev):
    x = torch.randn(8, 5, device=dev)
    dy = torch.randn(8, 3, device=dev)
    ids = torch.tensor([0, 1, 2, -1, 0, 1, 2, 2], device=dev)
    return x, dy, ids


BAD_SKETCH = [
    ("sketch dtype", dict(sketch=torch.zeros(3, 16, dtype=torch.float16)), TypeError, "sketch"),
    ("sketch rows", dict(sketch=torch.zeros(2, 16)), ValueError, "sketch"),
    ("sketch 1-D", dict(sketch=torch.zeros(16)), ValueError, "sketch"),
    ("sketch strided", dict(sketch=torch.zeros(16, 3).T), ValueError, "sketch"),
    ("sketch_dim 0", dict(sketch=None, sketch_dim=0), ValueError, "sketch_dim"),
    ("seed negative", dict(seed=-1), ValueError, "seed"),
    ("seed too big", dict(seed=2**32), ValueError, "seed"),
    ("layer float", dict(layer=1.5), TypeError, "layer"),
    ("layer too big", dict(layer=2**32), ValueError, "layer"),
    ("ids >= m", dict(domain_ids=torch.tensor([0, 1, 5, 0, 0, 0, 0, 0])), ValueError, "domain_ids"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_SKETCH, ids=[c[0] for c in BAD_SKETCH])
def test_domain_sketch_rejects_bad_input_without_touching_sketch(case, backend):
    _, override, exc, name = case
    dev = device_of(backend)
    x, dy, ids = _inputs(dev)
    args = dict(x=x, dy=dy, domain_ids=ids, num_domains=3, sketch=torch.ones(3, 16, device=dev))
    override = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in override.items()}
    args.update(override)
    before = None if args["sketch"] is None else args["sketch"].clone()
    with pytest.raises(exc, match=name):
        domain_sketch(**args, backend=backend)
    if before is not None:
        assert torch.equal(args["sketch"], before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_domain_sketch_float64_inputs_only_on_torch(backend):
    dev = device_of(backend)
    x, dy = make_inputs(11, 5, 3, torch.float64, dev)
    ids = make_ids("mixed", 11, 2, dev)
    if backend != "torch":
        with pytest.raises(TypeError, match="float64 inputs are supported by backend='torch'"):
            domain_sketch(x, dy, ids, 2, sketch_dim=8, backend=backend)
        return
    dw, sk = domain_sketch(x, dy, ids, 2, sketch_dim=8, seed=3, backend="torch")
    ref_dw, ref_sk = domain_sketch_ref(x, dy, ids, 2, 8, seed=3)
    assert dw.dtype == torch.float64
    assert_close(dw, ref_dw, torch.float64, "dW")
    assert_close(sk, ref_sk, torch.float32, "sketch")


# ------------------------------------------------------------ dW as the sum of the domain tiles
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pattern", ["mixed", "sorted", "one-domain", "all-ignored"])
@pytest.mark.parametrize("n", [1, 37, 300])
def test_sketch_dw_from_domains_matches_reference(n, pattern, dtype):
    m, k, seed, layer = 4, 29, 3, 1
    x, dy = make_inputs(n, 11, 13, dtype)
    ids = make_ids(pattern, n, m)
    s0 = torch.randn(m, k)
    s = s0.clone()
    dw, _ = domain_sketch(x, dy, ids, m, s, seed=seed, layer=layer, backend="torch",
                          bias=True, dw_from_domains=True)  # fmt: skip
    ref_dw, _ = domain_sketch_ref(x, dy, ids, m, k, seed, layer)
    assert dw.dtype == dtype
    assert_close(dw, ref_dw, dtype, "dW")
    # The sketch itself is the same whichever way dW is formed.
    want = s0.clone()
    domain_sketch(x, dy, ids, m, want, seed=seed, layer=layer, backend="torch", bias=True)
    assert_close(s, want.double(), ACC_DTYPE, "sketch")
    for d in absent_domains(ids, m):
        assert torch.equal(s[d], s0[d]), f"absent domain {d} was modified"


def test_sketch_dw_from_domains_runs_no_full_gemm():
    x, dy = make_inputs(192, 8, 12, torch.float32)
    ids = torch.arange(3).repeat_interleave(64)
    for flag, full in ((True, 0), (False, 1)):
        with GemmShapes() as rec:
            domain_sketch(x, dy, ids, 3, sketch_dim=16, backend="torch", dw_from_domains=flag)
        assert sorted(rec.inner) == sorted([64] * 3 + [192] * full), (flag, rec.inner)


def test_references_default_to_the_ops_hash():
    """At their defaults (seed 0, layer 0) the references hash like the ops at theirs, and
    ``count_sketch_ref`` sketches every leading index on its own."""
    from rnb_kernels.ops import domain_projection
    from rnb_kernels.ops.reference import count_sketch_ref, domain_projection_ref

    g = torch.Generator().manual_seed(21)
    x, dy = torch.randn(12, 5, generator=g), torch.randn(12, 7, generator=g)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, 1, -1, 0, 1, 0])
    _, s_op = domain_sketch(x, dy, ids, 2, sketch_dim=16)
    _, s_ref = domain_sketch_ref(x, dy, ids, 2, 16)
    assert_close(s_op, s_ref, ACC_DTYPE, "domain_sketch defaults")
    _, s_one = domain_sketch(x, dy, torch.zeros(12, dtype=torch.long), 1, sketch_dim=16)
    assert_close(s_one[0], count_sketch_ref(dy.T.double() @ x.double(), 16), ACC_DTYPE,
                 "count_sketch_ref defaults")  # fmt: skip
    _, p_op = domain_projection(x, dy, ids, 2, proj_dim=4)
    _, p_ref = domain_projection_ref(x, dy, ids, 2, 4)
    assert_close(p_op, p_ref, ACC_DTYPE, "domain_projection defaults")
    tiles = torch.randn(2, 3, 7, 5, generator=g, dtype=torch.float64)
    out = count_sketch_ref(tiles, 16, seed=3, layer=1)
    assert out.shape == (2, 3, 16)
    for i in range(2):
        for j in range(3):
            assert torch.equal(out[i, j], count_sketch_ref(tiles[i, j], 16, seed=3, layer=1))
