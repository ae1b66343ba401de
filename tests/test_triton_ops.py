"""Triton backend vs the float64 references (docs/design.md: ops and reliability).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set here before Triton is imported); with a GPU the same tests run the compiled kernels on
CUDA tensors, and the ``cuda``-marked tests add production-sized shapes.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton", reason="Triton is not installed")

import rnb_kernels as rnb  # noqa: E402
from rnb_kernels.ops.domain_sketch import domain_sketch_torch  # noqa: E402
from rnb_kernels.ops.grouping import group_rows  # noqa: E402
from rnb_kernels.ops.reference import (  # noqa: E402
    domain_sketch_ref,
    gram_ref,
    segmented_wgrad_ref,
)
from rnb_kernels.ops.sketch_hash import key_base as sketch_key_base  # noqa: E402
from rnb_kernels.ops.triton._common import runnable  # noqa: E402
from tests._tol import ACC_DTYPE, assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

if DEVICE == "cpu" and not rnb.backends()["triton"].available:
    pytest.skip(rnb.backends()["triton"].reason, allow_module_level=True)


@pytest.fixture(autouse=True)
def _poison_fresh_buffers(monkeypatch):
    """Every float ``torch.empty`` (dW, Gram partials) starts as NaN: a skipped write fails."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point() and not t.requires_grad:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)


def make_ids(pattern: str, n: int, m: int) -> torch.Tensor:
    if pattern == "mixed":  # every domain and -1, in shuffled order
        ids = torch.randint(-1, m, (n,))
    elif pattern == "sorted":  # already grouped, as a domain-aware sampler would emit
        ids = torch.randint(-1, m, (n,)).sort().values
    elif pattern == "one-domain":
        ids = torch.full((n,), m - 1)
    elif pattern == "all-ignored":
        ids = torch.full((n,), -1)
    elif pattern == "empty-domains":  # only even domains (and -1) occur
        ids = 2 * torch.randint(0, (m + 1) // 2, (n,))
        ids[torch.rand(n) < 0.2] = -1
    else:
        raise ValueError(pattern)
    return ids.to(DEVICE)


def make_inputs(n, k_in, k_out, dtype, *, transposed=False, integer=False):
    def rand(rows, cols):
        if integer:  # exactly representable, and every fp32 partial sum stays exact
            return torch.randint(-2, 3, (rows, cols)).to(dtype)
        return torch.randn(rows, cols).to(dtype)

    if transposed:  # column-major views: the kernels take any strides
        x, dy = rand(k_in, n).T, rand(k_out, n).T
    else:
        x, dy = rand(n, k_in), rand(n, k_out)
    return x.to(DEVICE), dy.to(DEVICE)


def absent_domains(ids: torch.Tensor, m: int) -> list[int]:
    present = set(ids.tolist())
    return [d for d in range(m) if d not in present]


# --------------------------------------------------------------------------- exact wgrad

SHAPES = [  # (N, K_in, K_out, m): none of the K are multiples of a block size
    pytest.param(1, 1, 1, 1, id="N1-Kin1-Kout1-m1"),
    pytest.param(37, 33, 70, 5, id="N37-Kin33-Kout70-m5"),
    pytest.param(300, 70, 33, 7, id="N300-Kin70-Kout33-m7"),
    pytest.param(300, 1, 70, 3, id="N300-Kin1-Kout70-m3"),
]
PATTERNS = ["mixed", "sorted", "one-domain", "all-ignored", "empty-domains"]


def check_segmented(x, dy, ids, m):
    acc0 = torch.randn(m, dy.shape[1], x.shape[1], device=DEVICE)
    acc = acc0.clone()
    dw, out = rnb.ops.segmented_wgrad(x, dy, ids, m, acc, backend="triton")
    assert out is acc
    ref_dw, ref_pd = segmented_wgrad_ref(x, dy, ids, m)
    assert dw.dtype == x.dtype and dw.shape == ref_dw.shape
    assert_close(dw, ref_dw, x.dtype, "dW")
    assert_close(acc, acc0.double() + ref_pd, ACC_DTYPE, "acc")
    for d in absent_domains(ids, m):  # a domain without rows is never read-modify-written
        assert torch.equal(acc[d], acc0[d]), f"absent domain {d} was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,k_in,k_out,m", SHAPES)
def test_segmented_wgrad_shapes(n, k_in, k_out, m, dtype):
    x, dy = make_inputs(n, k_in, k_out, dtype)
    check_segmented(x, dy, make_ids("mixed", n, m), m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_segmented_wgrad_id_patterns(pattern, dtype):
    n, k_in, k_out, m = 37, 33, 70, 6
    x, dy = make_inputs(n, k_in, k_out, dtype)
    check_segmented(x, dy, make_ids(pattern, n, m), m)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_segmented_wgrad_strided_inputs(id_dtype):
    x, dy = make_inputs(70, 33, 37, torch.float32, transposed=True)
    assert not x.is_contiguous()
    check_segmented(x, dy, make_ids("mixed", 70, 4).to(id_dtype), 4)


@pytest.mark.parametrize("sketch", [False, True], ids=["exact", "sketch"])
def test_wide_layer_offsets(monkeypatch, sketch):
    # Layers of 2**31+ weights switch the tile offsets to int64; force that path here.
    from rnb_kernels.ops.triton import segmented_wgrad as sw

    monkeypatch.setattr(sw, "_WIDE_ELEMENTS", 1)
    x, dy = make_inputs(37, 33, 70, torch.float32)
    ids = make_ids("mixed", 37, 3)
    if sketch:
        check_sketch(x, dy, ids, 3, k=50, seed=2, layer=9)
    else:
        check_segmented(x, dy, ids, 3)


def test_segmented_wgrad_many_domains_few_rows():
    # More domains than rows: most are empty, every present segment is shorter than a block.
    x, dy = make_inputs(37, 33, 33, torch.float32)
    check_segmented(x, dy, make_ids("mixed", 37, 64), 64)


def test_segmented_wgrad_no_rows():
    x, dy = make_inputs(0, 33, 70, torch.float32)
    acc0 = torch.randn(3, 70, 33, device=DEVICE)
    acc = acc0.clone()
    dw, _ = rnb.ops.segmented_wgrad(x, dy, torch.zeros(0, dtype=torch.int64), 3, acc, "triton")
    assert torch.equal(dw, torch.zeros_like(dw))
    assert torch.equal(acc, acc0)


def test_segmented_wgrad_matches_torch_backend():
    n, m = 300, 5
    x, dy = make_inputs(n, 70, 33, torch.bfloat16)
    ids = make_ids("mixed", n, m)
    acc_t = torch.zeros(m, 33, 70, device=DEVICE)
    acc_r = torch.zeros(m, 33, 70, device=DEVICE)
    dw_t, _ = rnb.ops.segmented_wgrad(x, dy, ids, m, acc_t, backend="triton")
    dw_r, _ = rnb.ops.segmented_wgrad(x, dy, ids, m, acc_r, backend="torch")
    assert_close(acc_t, acc_r, ACC_DTYPE, "acc triton vs torch")
    assert_close(dw_t, dw_r, torch.bfloat16, "dW triton vs torch")


def test_group_by_domain_is_stable_and_bounded():
    ids = torch.tensor([2, -1, 0, 2, 0, -1, 2], device=DEVICE)
    order, bounds = group_rows(ids, 4, index_dtype=torch.int32)
    assert order.tolist() == [1, 5, 2, 4, 0, 3, 6]
    assert bounds.tolist() == [0, 2, 4, 4, 7, 7]


# --------------------------------------------------------------------------- sketch


def check_sketch(x, dy, ids, m, k, seed, layer):
    s0 = torch.randn(m, k, device=DEVICE)
    s = s0.clone()
    dw, out = rnb.ops.domain_sketch(x, dy, ids, m, s, seed=seed, layer=layer, backend="triton")
    assert out is s
    ref_dw, ref_s = domain_sketch_ref(x, dy, ids, m, k, seed, layer)
    assert_close(dw, ref_dw, x.dtype, "dW")
    assert_close(s, s0.double() + ref_s, ACC_DTYPE, "sketch")
    for d in absent_domains(ids, m):
        assert torch.equal(s[d], s0[d]), f"absent domain {d} was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,k_in,k_out,m", SHAPES)
def test_domain_sketch_shapes(n, k_in, k_out, m, dtype):
    x, dy = make_inputs(n, k_in, k_out, dtype)
    check_sketch(x, dy, make_ids("mixed", n, m), m, k=61, seed=7, layer=3)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_domain_sketch_id_patterns(pattern):
    x, dy = make_inputs(37, 33, 70, torch.float32)
    check_sketch(x, dy, make_ids(pattern, 37, 6), 6, k=128, seed=0, layer=0)


@pytest.mark.parametrize(
    "seed,layer,k",
    [
        pytest.param(0, 0, 1, id="k1"),
        pytest.param(1, 2, 1000, id="keybase-above-2^31"),
        pytest.param(2**32 - 1, 2**32 - 1, 97, id="seed-layer-max"),
    ],
)
def test_domain_sketch_hash_is_bit_identical_to_torch(seed, layer, k):
    # Integer inputs keep every fp32 sum exact, so any bucket or sign that differs from the
    # torch backend's hash shows up as inequality, whatever order the atomics landed in.
    if seed == 1:
        assert sketch_key_base(seed, layer) >= 2**31
    n, m = 37, 4
    x, dy = make_inputs(n, 33, 70, torch.bfloat16, integer=True)
    ids = make_ids("mixed", n, m)
    s_triton = torch.zeros(m, k, device=DEVICE)
    s_torch = torch.zeros(m, k, device=DEVICE)
    rnb.ops.domain_sketch(x, dy, ids, m, s_triton, seed=seed, layer=layer, backend="triton")
    domain_sketch_torch(x, dy, ids, m, s_torch, seed, layer)
    assert s_torch.abs().sum() > 0
    assert torch.equal(s_triton, s_torch)


def test_domain_sketch_is_linear_across_calls():
    # Two micro-batches sketched in turn equal one sketch of their concatenation (up to fp32).
    m, k = 3, 64
    x, dy = make_inputs(74, 33, 70, torch.float32)
    ids = make_ids("mixed", 74, m)
    s_split = torch.zeros(m, k, device=DEVICE)
    for sl in (slice(0, 37), slice(37, 74)):
        rnb.ops.domain_sketch(x[sl], dy[sl], ids[sl], m, s_split, seed=5, backend="triton")
    s_once = torch.zeros(m, k, device=DEVICE)
    rnb.ops.domain_sketch(x, dy, ids, m, s_once, seed=5, backend="triton")
    assert_close(s_split, s_once.double(), ACC_DTYPE, "split vs whole")


# --------------------------------------------------------------------------- gram

GRAM_SHAPES = [
    pytest.param(1, 1, id="m1-P1"),
    pytest.param(5, 300, id="m5-P300"),
    pytest.param(37, 1000, id="m37-P1000"),
    pytest.param(70, 333, id="m70-P333"),  # two row tiles: off-diagonal tile pairs and mirror
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,p", GRAM_SHAPES)
def test_gram_symmetric(m, p, dtype):
    a = torch.randn(m, p).to(dtype).to(DEVICE)
    g = rnb.ops.gram(a, backend="triton")
    assert g.dtype == torch.float64 and g.shape == (m, m)
    assert torch.equal(g, g.T), "A Aᵀ must be exactly symmetric"
    assert_close(g, gram_ref(a), ACC_DTYPE, "gram")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "m,p,r",
    [
        pytest.param(5, 300, 1, id="m5-P300-r1"),
        pytest.param(20, 777, 3, id="m20-P777-r3"),
        pytest.param(70, 100, 17, id="m70-P100-r17"),
    ],
)
def test_gram_against_rows(m, p, r, dtype):
    a = torch.randn(m, p).to(dtype).to(DEVICE)
    b = torch.randn(r, p).to(dtype).to(DEVICE)
    g = rnb.ops.gram(a, b, backend="triton")
    assert g.shape == (m, r)
    assert_close(g, gram_ref(a, b), ACC_DTYPE, "A bᵀ")


def test_gram_vector_target_and_strided_rows():
    base = torch.randn(6, 1000, device=DEVICE)
    a = base[:, 3:700]  # row stride 1000, not P: a view into a larger accumulator
    b = torch.randn(697, device=DEVICE)
    g = rnb.ops.gram(a, b, backend="triton")
    assert g.shape == (6,)
    assert_close(g, gram_ref(a, b), ACC_DTYPE, "A b")


def test_gram_empty_columns():
    a = torch.zeros(4, 0, device=DEVICE)
    zeros = torch.zeros(4, 4, dtype=torch.float64, device=DEVICE)
    assert torch.equal(rnb.ops.gram(a, backend="triton"), zeros)


# --------------------------------------------------------------------------- plumbing


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter-only plumbing")
def test_runnable_interprets_a_kernel_jitted_before_the_switch():
    # @triton.jit picks JIT vs interpreter when it decorates; a module imported before
    # TRITON_INTERPRET=1 was set must still run its kernels on CPU tensors.
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    def _twice(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < N), mask=offs < N)

    kernel = JITFunction(_twice)
    x, y = torch.randn(5), torch.zeros(5)
    runnable(kernel)[(1,)](x, y, 5, BLOCK=8)
    assert torch.equal(y, 2 * x)


@pytest.mark.skipif(
    DEVICE == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None,
    reason="torch.compile's inductor backend needs a C++ compiler on CPU (none found)",
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_traces_segmented_wgrad(backend):
    m, n, k_in, k_out = 4, 37, 33, 16
    weight = torch.randn(k_out, k_in, device=DEVICE)

    def train_step(x, target, ids, acc):
        dy = 2 * (x @ weight.T - target) / x.shape[0]  # d(MSE)/dy
        dw, acc = rnb.ops.segmented_wgrad(x, dy, ids, m, acc, backend=backend)
        return weight - 0.1 * dw, acc

    x = torch.randn(n, k_in, device=DEVICE)
    target = torch.randn(n, k_out, device=DEVICE)
    ids = make_ids("mixed", n, m)
    acc_eager = torch.zeros(m, k_out, k_in, device=DEVICE)
    acc_comp = torch.zeros(m, k_out, k_in, device=DEVICE)
    w_eager, _ = train_step(x, target, ids, acc_eager)
    compiled = torch.compile(train_step, fullgraph=True)
    w_comp, out = compiled(x, target, ids, acc_comp)
    assert out is acc_comp
    assert_close(w_comp, w_eager.double(), torch.float32, "compiled weight")
    assert_close(acc_comp, acc_eager.double(), ACC_DTYPE, "compiled acc")
    compiled(x, target, ids, acc_comp)  # the in-place update is not lost to functionalization
    assert_close(acc_comp, 2 * acc_eager.double(), ACC_DTYPE, "compiled acc, second step")


# --------------------------------------------------------------------------- GPU sizes


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_segmented_wgrad_large(dtype):
    n, k_in, k_out, m = 4099, 768, 1000, 16
    x, dy = make_inputs(n, k_in, k_out, dtype)
    check_segmented(x, dy, make_ids("mixed", n, m), m)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_domain_sketch_large(dtype):
    n, k_in, k_out, m = 4099, 768, 1000, 16
    x, dy = make_inputs(n, k_in, k_out, dtype)
    check_sketch(x, dy, make_ids("mixed", n, m), m, k=8192, seed=11, layer=4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [16, 64, 130])
def test_gpu_gram_large(m, dtype):
    a = torch.randn(m, (1 << 20) + 17, device=DEVICE).to(dtype)
    g = rnb.ops.gram(a, backend="triton")
    assert torch.equal(g, g.T)
    assert_close(g, a.double() @ a.double().T, ACC_DTYPE, "gram")
    b = torch.randn(2, a.shape[1], device=DEVICE).to(dtype)
    assert_close(rnb.ops.gram(a, b, backend="triton"), a.double() @ b.double().T, ACC_DTYPE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n", [1, 37])
def test_ops_fold_the_bias_column(backend, n):
    """segmented_wgrad(bias_acc=...) adds each domain's Σ dy; domain_sketch(bias=True) sketches
    it as column K_in of [W | b] — both against the float64 references."""
    from rnb_kernels.ops.reference import bias_grads_ref

    g = torch.Generator().manual_seed(n)
    m, k_in, k_out, k = 3, 5, 7, 32
    x = torch.randn(n, k_in, generator=g).to(DEVICE)
    dy = torch.randn(n, k_out, generator=g).to(DEVICE)
    ids = torch.randint(-1, m, (n,), generator=g).to(DEVICE)
    b0 = torch.randn(m, k_out, generator=g).to(DEVICE)
    bias_acc = b0.clone()
    rnb.ops.segmented_wgrad(x, dy, ids, m, backend=backend, bias_acc=bias_acc)
    assert_close(bias_acc - b0, bias_grads_ref(dy, ids, m), torch.float32, "bias_acc")
    s = torch.zeros(m, k, device=DEVICE)
    rnb.ops.domain_sketch(x, dy, ids, m, sketch=s, seed=5, layer=2, backend=backend, bias=True)
    _, ref = domain_sketch_ref(x, dy, ids, m, k, seed=5, layer=2, bias=True)
    assert_close(s, ref, torch.float32, "sketch with bias")
