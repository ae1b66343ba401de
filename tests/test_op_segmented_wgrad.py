"""segmented_wgrad (exact) on every backend against independent float64 brute force."""

from __future__ import annotations

import os
import shutil

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

from rnb_kernels.ops import segmented_wgrad
from rnb_kernels.ops.reference import bias_grads_ref, segmented_wgrad_ref

EXAMPLES = {"torch": 60, "triton": 15, "cuda": 60}


def check_segmented(x, dy, ids, m, backend):
    """dW against the float64 reference, acc = acc0 + per-domain shares, absent domains
    untouched (not even by a +0 rounding)."""
    acc0 = torch.randn(m, dy.shape[1], x.shape[1], device=x.device)
    acc = acc0.clone()
    dw, out = segmented_wgrad(x, dy, ids, m, acc, backend=backend)
    if x.is_cuda:
        torch.cuda.synchronize()
    assert out is acc
    ref_dw, ref_pd = segmented_wgrad_ref(x, dy, ids, m)
    assert dw.dtype == x.dtype and dw.shape == ref_dw.shape
    assert_close(dw, ref_dw, x.dtype, "dW")
    assert_close(acc, acc0.double() + ref_pd, ACC_DTYPE, "acc")
    for d in absent_domains(ids, m):
        assert torch.equal(acc[d], acc0[d]), f"absent domain {d} was modified"


@pytest.mark.parametrize("backend", BACKENDS)
def test_segmented_wgrad_matches_brute_force(backend):
    dev = device_of(backend)

    @settings(max_examples=EXAMPLES[backend], deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(
        n=st.integers(1, 40),
        k_in=st.integers(1, 17),
        k_out=st.integers(1, 13),
        m=st.integers(1, 6),
        dtype=st.sampled_from(DTYPES),
        id_mode=st.sampled_from(["random", "all-ignored", "one-domain", "skip-even"]),
        id_dtype=st.sampled_from([torch.int32, torch.int64]),
    )
    def check(n, k_in, k_out, m, dtype, id_mode, id_dtype):
        x, dy = make_inputs(n, k_in, k_out, dtype, dev)
        ids = make_ids(id_mode, n, m, dev).to(id_dtype)
        acc0 = torch.randn(m, k_out, k_in, device=dev)
        acc = acc0.clone()
        dw, acc_out = segmented_wgrad(x, dy, ids, m, acc, backend=backend)
        ref_dw, ref_per = brute_force(x, dy, ids, m)
        assert acc_out is acc
        assert dw.dtype == dtype and dw.shape == (k_out, k_in)
        assert_close(dw, ref_dw, dtype, "dW")
        assert_close(acc - acc0, ref_per, torch.float32, "acc increment")
        for d in absent_domains(ids, m):
            assert torch.equal(acc[d], acc0[d])

    check()


SHAPES = [  # (N, K_in, K_out, m): none of the K are multiples of a block size
    pytest.param(1, 1, 1, 1, id="N1-Kin1-Kout1-m1"),
    pytest.param(37, 33, 70, 5, id="N37-Kin33-Kout70-m5"),
    pytest.param(300, 70, 33, 7, id="N300-Kin70-Kout33-m7"),
    pytest.param(300, 1, 70, 3, id="N300-Kin1-Kout70-m3"),
]
PATTERNS = ["mixed", "sorted", "one-domain", "all-ignored", "empty-domains"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,k_in,k_out,m", SHAPES)
def test_segmented_wgrad_shapes(n, k_in, k_out, m, dtype, backend, poisoned):
    dev = device_of(backend)
    x, dy = make_inputs(n, k_in, k_out, dtype, dev)
    check_segmented(x, dy, make_ids("mixed", n, m, dev), m, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n,k_in,k_out",
    [(1000, 33, 70), (300, 1, 1000)],
    ids=lambda v: str(v),
)
def test_segmented_wgrad_odd_shapes_vs_reference(n, k_in, k_out, backend, poisoned):
    dev = device_of(backend)
    x, dy = make_inputs(n, k_in, k_out, torch.float32, dev)
    check_segmented(x, dy, make_ids("mixed", n, 7, dev), 7, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_segmented_wgrad_id_patterns(pattern, dtype, backend, poisoned):
    n, k_in, k_out, m = 37, 33, 70, 6
    dev = device_of(backend)
    x, dy = make_inputs(n, k_in, k_out, dtype, dev)
    check_segmented(x, dy, make_ids(pattern, n, m, dev), m, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_segmented_wgrad_strided_inputs(id_dtype, backend, poisoned):
    dev = device_of(backend)
    x, dy = make_inputs(70, 33, 37, torch.float32, dev, transposed=True)
    assert not x.is_contiguous()
    check_segmented(x, dy, make_ids("mixed", 70, 4, dev).to(id_dtype), 4, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segmented_wgrad_many_domains_few_rows(backend, poisoned):
    # More domains than rows: most are empty, every present segment is shorter than a block.
    dev = device_of(backend)
    x, dy = make_inputs(37, 33, 33, torch.float32, dev)
    check_segmented(x, dy, make_ids("mixed", 37, 64, dev), 64, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segmented_wgrad_no_rows(backend, poisoned):
    dev = device_of(backend)
    x, dy = make_inputs(0, 33, 70, torch.float32, dev)
    acc0 = torch.randn(3, 70, 33, device=dev)
    acc = acc0.clone()
    ids = torch.zeros(0, dtype=torch.int64, device=dev)
    dw, _ = segmented_wgrad(x, dy, ids, 3, acc, backend)
    assert torch.equal(dw, torch.zeros_like(dw))
    assert torch.equal(acc, acc0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segmented_wgrad_matches_torch_backend(backend):
    n, m = 300, 5
    dev = device_of(backend)
    x, dy = make_inputs(n, 70, 33, torch.bfloat16, dev)
    ids = make_ids("mixed", n, m, dev)
    acc_b = torch.zeros(m, 33, 70, device=dev)
    acc_t = torch.zeros(m, 33, 70, device=dev)
    dw_b, _ = segmented_wgrad(x, dy, ids, m, acc_b, backend=backend)
    dw_t, _ = segmented_wgrad(x, dy, ids, m, acc_t, backend="torch")
    assert_close(acc_b, acc_t, ACC_DTYPE, f"acc {backend} vs torch")
    assert_close(dw_b, dw_t, torch.bfloat16, f"dW {backend} vs torch")


def test_reference_agrees_with_brute_force():
    x, dy = make_inputs(29, 6, 4, torch.float64)
    ids = make_ids("mixed", 29, 5)
    ref_dw, ref_per = segmented_wgrad_ref(x, dy, ids, 5)
    bf_dw, bf_per = brute_force(x, dy, ids, 5)
    torch.testing.assert_close(ref_dw, bf_dw)
    torch.testing.assert_close(ref_per, bf_per)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dw_equals_the_autograd_gemm(backend):
    """torch backend: dW is bitwise the very GEMM autograd runs for nn.Linear; the kernel
    backends compute it in their own kernel (equal within fp32 rounding)."""
    dev = device_of(backend)
    lin = torch.nn.Linear(24, 10, bias=False).to(dev)
    x = torch.randn(50, 24, device=dev)
    out = lin(x)
    dy = torch.randn_like(out)
    out.backward(dy)
    ids = torch.randint(-1, 3, (50,), device=dev)
    dw, _ = segmented_wgrad(x, dy, ids, 3, backend=backend)
    if backend == "torch":
        assert torch.equal(dw, lin.weight.grad)
    else:
        assert_close(dw, lin.weight.grad.double(), torch.float32, "dW vs autograd")


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulates_across_calls(backend):
    dev = device_of(backend)
    x, dy = make_inputs(40, 9, 6, torch.float32, dev)
    ids = make_ids("mixed", 40, 3, dev)
    acc = torch.zeros(3, 6, 9, device=dev)
    segmented_wgrad(x[:15], dy[:15], ids[:15], 3, acc, backend=backend)
    segmented_wgrad(x[15:], dy[15:], ids[15:], 3, acc, backend=backend)
    _, ref_per = segmented_wgrad_ref(x, dy, ids, 3)
    assert_close(acc, ref_per, torch.float32, "two calls")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_only_on_torch_backend(backend):
    dev = device_of(backend)
    x, dy = make_inputs(11, 5, 3, torch.float64, dev)
    ids = make_ids("mixed", 11, 2, dev)
    if backend != "torch":
        with pytest.raises(TypeError, match="float64 inputs are supported by backend='torch'"):
            segmented_wgrad(x, dy, ids, 2, backend=backend)
        return
    dw, acc = segmented_wgrad(x, dy, ids, 2, backend=backend)
    ref_dw, ref_per = segmented_wgrad_ref(x, dy, ids, 2)
    assert dw.dtype == torch.float64
    assert_close(dw, ref_dw, torch.float64, "dW")
    assert_close(acc, ref_per, torch.float32, "acc")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 37])
def test_bias_acc_holds_each_domains_bias_gradient(backend, n):
    """segmented_wgrad(bias_acc=...) adds each domain's Σ dy (against the float64 reference)."""
    dev = device_of(backend)
    g = torch.Generator().manual_seed(n)
    m, k_in, k_out = 3, 5, 7
    x = torch.randn(n, k_in, generator=g).to(dev)
    dy = torch.randn(n, k_out, generator=g).to(dev)
    ids = torch.randint(-1, m, (n,), generator=g).to(dev)
    b0 = torch.randn(m, k_out, generator=g).to(dev)
    bias_acc = b0.clone()
    segmented_wgrad(x, dy, ids, m, backend=backend, bias_acc=bias_acc)
    assert_close(bias_acc - b0, bias_grads_ref(dy, ids, m), torch.float32, "bias_acc")


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_layer_offsets(monkeypatch, backend):
    """Layers of 2**31+ weights switch the Triton tile offsets to int64; force that path (the
    switch is Triton's; on the other backends the same call is checked as is)."""
    from rnb_kernels.ops.triton import segmented_wgrad as sw

    monkeypatch.setattr(sw, "_WIDE_ELEMENTS", 1)
    dev = device_of(backend)
    x, dy = make_inputs(37, 33, 70, torch.float32, dev)
    check_segmented(x, dy, make_ids("mixed", 37, 3, dev), 3, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_traces_segmented_wgrad(backend):
    if device_of(backend) == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("torch.compile's inductor backend needs a C++ compiler on CPU (none found)")
    dev = device_of(backend)
    m, n, k_in, k_out = 4, 37, 33, 16
    weight = torch.randn(k_out, k_in, device=dev)

    def train_step(x, target, ids, acc):
        dy = 2 * (x @ weight.T - target) / x.shape[0]  # d(MSE)/dy
        dw, acc = segmented_wgrad(x, dy, ids, m, acc, backend=backend)
        return weight - 0.1 * dw, acc

    x = torch.randn(n, k_in, device=dev)
    target = torch.randn(n, k_out, device=dev)
    ids = make_ids("mixed", n, m, dev)
    acc_eager = torch.zeros(m, k_out, k_in, device=dev)
    acc_comp = torch.zeros(m, k_out, k_in, device=dev)
    w_eager, _ = train_step(x, target, ids, acc_eager)
    compiled = torch.compile(train_step, fullgraph=True)
    w_comp, out = compiled(x, target, ids, acc_comp)
    assert out is acc_comp
    assert_close(w_comp, w_eager.double(), torch.float32, "compiled weight")
    assert_close(acc_comp, acc_eager.double(), ACC_DTYPE, "compiled acc")
    compiled(x, target, ids, acc_comp)  # the in-place update is not lost to functionalization
    assert_close(acc_comp, 2 * acc_eager.double(), ACC_DTYPE, "compiled acc, second step")


# --------------------------------------------------------------------------- GPU sizes

GPU_SHAPES = [  # (N, K_in, K_out)
    (1, 1, 1),
    (37, 33, 1),
    (37, 1, 33),
    (1000, 33, 1000),
    (1000, 1000, 33),
    (37, 1000, 1000),
    (1000, 128, 256),  # 16-byte aligned rows: cp.async path, split over rows (few tiles)
    (1000, 2048, 2304),  # enough output tiles that the rows are not split
]
GPU_PATTERNS = ["mixed", "one-domain", "all-ignored", "sparse", "shuffled"]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "N{}-Kin{}-Kout{}".format(*s))
@pytest.mark.parametrize("pattern", GPU_PATTERNS)
def test_segmented_wgrad_gpu_shapes(dtype, shape, pattern, backend, poisoned):
    n, k_in, k_out = shape
    x, dy = make_inputs(n, k_in, k_out, dtype, "cuda")
    check_segmented(x, dy, make_ids(pattern, n, 5, "cuda"), 5, backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_segmented_wgrad_gpu_large(dtype, backend):
    n, k_in, k_out, m = 4099, 768, 1000, 16
    x, dy = make_inputs(n, k_in, k_out, dtype, "cuda")
    check_segmented(x, dy, make_ids("mixed", n, m, "cuda"), m, backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k_out", [50257, 50304], ids=["V50257", "V50304"])
def test_segmented_wgrad_gpt2_head(k_out, dtype, backend):
    """The GPT-2 head: 50257 makes dy's rows misaligned for 16-byte loads, 50304 (padded to
    a multiple of 64) keeps them aligned, so both load paths run at production width."""
    n, k_in, m = 1031, 768, 8
    x, dy = make_inputs(n, k_in, k_out, dtype, "cuda")
    check_segmented(x, dy, make_ids("mixed", n, m, "cuda"), m, backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_segmented_wgrad_offsets_past_2_31(backend):
    """acc [64, 50304, 768] fp32 holds 2.47e9 elements (9.9 GB): domains 56+ start past 2**31
    elements, so 32-bit offsets would wrap. Checked slice by slice in float64."""
    m, k_in, k_out, n = 64, 768, 50304, 301
    x, dy = make_inputs(n, k_in, k_out, torch.bfloat16, "cuda")
    present = torch.tensor([0, 62, 63, -1], device="cuda")
    ids = present[torch.randint(0, 4, (n,), device="cuda")]
    acc = torch.zeros(m, k_out, k_in, device="cuda")
    dw, out = segmented_wgrad(x, dy, ids, m, acc, backend=backend)
    torch.cuda.synchronize()
    assert out is acc
    xd, dyd = x.double(), dy.double()
    assert_close(dw, dyd.T @ xd, x.dtype, "dW")
    for d in (0, 62, 63):
        rows = ids == d
        assert_close(acc[d], dyd[rows].T @ xd[rows], ACC_DTYPE, f"acc[{d}]")
    for d in (1, 55, 56, 61):
        assert not acc[d].any(), f"absent domain {d} was written"
    del acc


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_segmented_strided_inputs_and_side_stream(dtype, backend, poisoned):
    # Row strides wider than the rows (views into a bigger buffer), odd offsets that rule out
    # 16-byte loads, and a non-default current stream.
    n, k_in, k_out, m = 300, 40, 24, 3
    big_x = torch.randn(n, k_in + 9, device="cuda").to(dtype)
    big_dy = torch.randn(n, k_out + 8, device="cuda").to(dtype)
    x, dy = big_x[:, 1 : k_in + 1], big_dy[:, :k_out]
    ids = make_ids("mixed", n, m, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        acc = torch.zeros(m, k_out, k_in, device="cuda")
        dw, _ = segmented_wgrad(x, dy, ids, m, acc=acc, backend=backend)
    stream.synchronize()
    ref_dw, ref_acc = segmented_wgrad_ref(x, dy, ids, m)
    assert_close(dw, ref_dw, dtype, "dW")
    assert_close(acc, ref_acc, ACC_DTYPE, "acc")


# --------------------------------------------------------------------------- validation


def _inputs(dev="cpu"):
    x = torch.randn(8, 5, device=dev)
    dy = torch.randn(8, 3, device=dev)
    ids = torch.tensor([0, 1, 2, -1, 0, 1, 2, 2], device=dev)
    acc = torch.randn(3, 3, 5, device=dev)
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
    ("bias_acc shape", dict(bias_acc=torch.zeros(3, 5)), ValueError, "bias_acc"),
    ("num_domains 0", dict(num_domains=0), ValueError, "num_domains"),
    ("num_domains bool", dict(num_domains=True), TypeError, "num_domains"),
    ("num_domains float", dict(num_domains=3.0), TypeError, "num_domains"),
    ("backend name", dict(backend="cudnn"), ValueError, "backend"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_WGRAD, ids=[c[0] for c in BAD_WGRAD])
def test_segmented_wgrad_rejects_bad_input_without_touching_acc(case, backend):
    _, override, exc, name = case
    dev = device_of(backend)
    x, dy, ids, acc = _inputs(dev)
    args = dict(x=x, dy=dy, domain_ids=ids, num_domains=3, acc=acc, backend=backend)
    override = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in override.items()}
    args.update(override)
    before = args["acc"].clone()
    with pytest.raises(exc, match=name):
        segmented_wgrad(**args)
    assert torch.equal(args["acc"], before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["x", "dy"])
def test_non_finite_inputs_rejected_when_checked(which, backend):
    from rnb_kernels.ops import domain_sketch

    dev = device_of(backend)
    x, dy, ids, acc = _inputs(dev)
    bad = {"x": x, "dy": dy}
    bad[which][2, 1] = float("nan")
    before = acc.clone()
    with pytest.raises(ValueError, match=which):
        segmented_wgrad(bad["x"], bad["dy"], ids, 3, acc, backend=backend, check_finite=True)
    assert torch.equal(acc, before)
    sk = torch.zeros(3, 16, device=dev)
    with pytest.raises(ValueError, match=which):
        domain_sketch(bad["x"], bad["dy"], ids, 3, sk, backend=backend, check_finite=True)
    assert torch.equal(sk, torch.zeros(3, 16, device=dev))


@pytest.mark.parametrize("layout", ["per-sample runs", "fragmented"])
def test_torch_backend_run_and_gather_paths_agree_with_reference(layout):
    """Both row-block paths of the torch backends (views of runs, gathered copy)."""
    from rnb_kernels.ops import domain_sketch
    from rnb_kernels.ops.reference import domain_sketch_ref

    g = torch.Generator().manual_seed(7)
    m, n = 4, 256
    if layout == "per-sample runs":
        ids = torch.randint(-1, m, (8,), generator=g).repeat_interleave(n // 8)
    else:
        ids = torch.randint(-1, m, (n,), generator=g)
    x, dy = torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)
    dw, acc = segmented_wgrad(x, dy, ids, m, backend="torch")
    ref_dw, ref_acc = segmented_wgrad_ref(x, dy, ids, m)
    assert torch.equal(dw, dy.t().mm(x))
    assert_close(acc, ref_acc, torch.float32, "acc")
    _, s = domain_sketch(x, dy, ids, m, sketch_dim=16, seed=3, backend="torch")
    assert_close(s, domain_sketch_ref(x, dy, ids, m, 16, seed=3)[1], torch.float32, "sketch")


def test_bias_reference_is_float64_exact():
    """bias_grads_ref sums in float64: fp32 inputs whose fp32 sum cancels to 0 sum to 1 here."""
    dy = torch.tensor([[1e8, 0.0], [1.0, 2.0], [-1e8, 0.0], [5.0, 5.0]], dtype=torch.float32)
    ids = torch.tensor([0, 0, 0, 1])
    out = bias_grads_ref(dy, ids, 3)
    assert out.dtype == torch.float64
    assert out.tolist() == [[1.0, 2.0], [5.0, 5.0], [0.0, 0.0]]


# ------------------------------------------------------------ dW as the sum of the domain tiles
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pattern", ["mixed", "sorted", "one-domain", "all-ignored", "skip-even"])
@pytest.mark.parametrize("n", [1, 37, 300])
def test_dw_from_domains_matches_reference(n, pattern, dtype):
    """torch backend: dW summed from the domain tiles (ignored rows included) is dyᵀx at the
    dtype's tolerance, and acc gets the same shares as with the GEMM; both row layouts (long
    runs read in place at n=300 sorted, a gathered copy for mixed ids)."""
    m = 5
    x, dy = make_inputs(n, 19, 23, dtype)
    ids = make_ids(pattern, n, m)
    acc0 = torch.randn(m, 23, 19)
    acc = acc0.clone()
    dw, _ = segmented_wgrad(x, dy, ids, m, acc, backend="torch", dw_from_domains=True)
    ref_dw, ref_pd = segmented_wgrad_ref(x, dy, ids, m)
    assert dw.dtype == dtype and dw.shape == (23, 19)
    assert_close(dw, ref_dw, dtype, "dW")
    assert_close(acc, acc0.double() + ref_pd, ACC_DTYPE, "acc")
    for d in absent_domains(ids, m):
        assert torch.equal(acc[d], acc0[d]), f"absent domain {d} was modified"


def test_dw_from_domains_runs_no_full_gemm():
    """The point of the option: no GEMM over all N rows; without it, exactly one."""
    x, dy = make_inputs(256, 16, 24, torch.float32)
    ids = torch.arange(4).repeat_interleave(64)
    ids[:64] = -1  # ignored rows are multiplied on their own, not with the batch
    for flag, want in ((True, [64] * 4), (False, [64] * 3 + [256])):
        with GemmShapes() as rec:
            segmented_wgrad(x, dy, ids, 4, backend="torch", dw_from_domains=flag)
        assert sorted(rec.inner) == want, (flag, rec.inner)


def test_dw_from_domains_float64_is_the_gemm():
    """float64 inputs keep the float64 GEMM (fp32 tiles would lose precision)."""
    x, dy = make_inputs(50, 7, 9, torch.float64)
    ids = make_ids("mixed", 50, 3)
    dw, _ = segmented_wgrad(x, dy, ids, 3, backend="torch", dw_from_domains=True)
    assert torch.equal(dw, dy.t().mm(x))


def test_dw_from_domains_rejects_non_bool():
    x, dy = make_inputs(4, 3, 2, torch.float32)
    with pytest.raises(TypeError, match="dw_from_domains must be a bool"):
        segmented_wgrad(x, dy, torch.zeros(4, dtype=torch.int64), 1, dw_from_domains=1)
