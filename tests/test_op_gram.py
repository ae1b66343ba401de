"""gram (and gram_matvec) on every backend against independent products.

What each backend claims, and is held to, per entry (``_tol.assert_dot_close``):

* torch: float64 products of the inputs summed in float64 -> float64 tolerance, on sizes where
  an fp32 Gram cast to float64 misses by ~1e7 x the bound;
* triton / cuda: products summed in fp32 spans, then folded in float64 -> fp32 tolerance.

Off-diagonal entries are bounded by their own magnitude ``(|A| |B|ᵀ)_ij``, never by the
diagonal, and rows of very different norms are included so a small domain's entries count.
"""

from __future__ import annotations

import sys

import pytest
import torch
from _optest import (
    BACKENDS,
    DTYPE_IDS,
    DTYPES,
    GPU_BACKENDS,
    brute_force,
    device_of,
    make_ids,
    make_inputs,
)
from _tol import ACC_DTYPE, assert_close, assert_dot_close, exact_products
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnb_kernels.ops import gram, segmented_wgrad
from rnb_kernels.ops.gram import gram_matvec
from rnb_kernels.ops.reference import gram_ref

# The accumulation precision each backend claims.
ACC = {"torch": torch.float64, "triton": torch.float32, "cuda": torch.float32}


def gram_loops(a, b=None):
    """Pair-by-pair Python float sums: shares no code with the library."""
    a = a.cpu()
    rows_b = a if b is None else b.cpu()
    out = torch.zeros(a.shape[0], rows_b.shape[0], dtype=torch.float64)
    for i in range(a.shape[0]):
        for j in range(rows_b.shape[0]):
            out[i, j] = sum(float(u) * float(v) for u, v in zip(a[i].double(), rows_b[j].double()))
    return out


EXAMPLES = {"torch": 40, "triton": 12, "cuda": 40}


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_matches_loops(backend):
    dev = device_of(backend)

    @settings(max_examples=EXAMPLES[backend], deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(
        m=st.integers(1, 6),
        p=st.integers(1, 50),
        r=st.integers(0, 3),
        dtype=st.sampled_from(DTYPES),
    )
    def check(m, p, r, dtype):
        a = torch.randn(m, p).to(dtype).to(dev)
        g = gram(a, backend=backend)
        assert g.dtype == torch.float64 and g.shape == (m, m)
        assert_close(g, gram_loops(a), torch.float32, "A A^T")
        assert_dot_close(g, a, None, ACC[backend], "A A^T per entry")
        assert torch.equal(g, g.T)
        if r:
            b = torch.randn(r, p).to(dtype).to(dev)
            gb = gram(a, b, backend=backend)
            assert_close(gb, gram_loops(a, b), torch.float32, "A B^T")
            assert_dot_close(gb, a, b, ACC[backend], "A B^T per entry")
            vec = gram(a, b[0], backend=backend)
            assert vec.shape == (m,)
            assert_close(vec, gram_loops(a, b[:1])[:, 0], torch.float32, "A b")

    check()


# --------------------------------------------------------------------- float64 means float64

# (m, P, row scales): P large enough that fp32 accumulation (or an fp32 Gram cast to float64)
# misses the float64 bound by orders of magnitude; rows of norms 1e3 and 1e-3 next to each
# other so the small rows' entries are checked at their own scale.
F64_CASES = [
    pytest.param(4, 100_003, (1.0, 1.0, 1.0, 1.0), id="m4-P100003"),
    pytest.param(5, 20_011, (1e3, 1.0, 1e-3, 1.0, 1e3), id="m5-P20011-scales"),
]


def _rows(m, p, scales):
    a = torch.randn(m, p)
    return a * torch.tensor(scales)[:, None]


@pytest.mark.parametrize("m,p,scales", F64_CASES)
def test_torch_gram_is_float64_accurate_per_entry(m, p, scales):
    a = _rows(m, p, scales)  # fp32 inputs: their products are exact in float64
    g = gram(a, backend="torch")
    assert_dot_close(g, a, None, torch.float64, "gram")
    b = torch.randn(3, p)
    assert_dot_close(gram(a, b, backend="torch"), a, b, torch.float64, "gram rows")
    assert_dot_close(gram(a, b[1], backend="torch"), a, b[1:2], torch.float64, "gram vector")


def test_float64_bound_rejects_an_fp32_gram():
    """The bound above is not vacuous: the same Gram computed in fp32 (then cast) fails it."""
    a = _rows(4, 100_003, (1.0, 1.0, 1.0, 1.0))
    fp32_gram = (a @ a.T).double()
    with pytest.raises(AssertionError, match="per-entry bound"):
        assert_dot_close(fp32_gram, a, None, torch.float64, "fp32 gram")
    assert_dot_close(fp32_gram, a, None, torch.float32, "fp32 gram at fp32 tolerance")


@pytest.mark.parametrize("m,p,scales", F64_CASES)
def test_gram_matvec_is_float64_accurate(monkeypatch, m, p, scales):
    gram_mod = sys.modules["rnb_kernels.ops.gram"]  # the package attribute is the function
    a = _rows(m, p, scales)
    c = torch.rand(m, dtype=torch.float64)
    ref, mag = exact_products(a)
    want = ref @ c
    bound = 8.0 * p**0.5 * 2.0**-53 * (mag @ c.abs()) * m
    for chunk in (gram_mod._CPU_CHUNK_BYTES, 8 * m * 4099):  # default chunks, and 4099 columns
        monkeypatch.setattr(gram_mod, "_CPU_CHUNK_BYTES", chunk)
        got = gram_matvec(a, c)
        assert got.dtype == torch.float64 and got.shape == (m,)
        err = (got - want).abs()
        assert bool((err <= bound).all()), (err / bound).max()


def test_gram_matvec_rejects_bad_input():
    a = torch.randn(3, 5)
    with pytest.raises(ValueError, match="c has 2 entries"):
        gram_matvec(a, torch.ones(2))
    with pytest.raises(ValueError, match="c must be 1-D"):
        gram_matvec(a, torch.ones(3, 1))
    with pytest.raises(TypeError, match="a must have dtype"):
        gram_matvec(a.long(), torch.ones(3))


def test_gram_reference_and_chunking(monkeypatch):
    """torch backend only: its column chunking."""
    gram_mod = sys.modules["rnb_kernels.ops.gram"]
    # Several column chunks (7 or 8 columns: a's 5 rows, with b's one), the last one short.
    monkeypatch.setattr(gram_mod, "_CPU_CHUNK_BYTES", 8 * 7 * 6)
    a = torch.randn(5, 40)
    assert_close(gram(a, backend="torch"), gram_ref(a), torch.float32, "chunked")
    assert_dot_close(gram(a, backend="torch"), a, None, torch.float64, "chunked per entry")
    assert_close(gram_ref(a), gram_loops(a), torch.float64, "gram_ref")
    assert_close(gram(a, a[2], backend="torch"), gram_ref(a, a[2]), torch.float32, "vector")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_of_accumulators_is_domain_inner_products(backend):
    dev = device_of(backend)
    x, dy = make_inputs(80, 10, 6, torch.float32, dev)
    ids = make_ids("mixed", 80, 4, dev)
    _, acc = segmented_wgrad(x, dy, ids, 4, backend=backend)
    _, per = brute_force(x, dy, ids, 4)
    flat = per.reshape(4, -1)
    assert_close(gram(acc.view(4, -1), backend=backend), flat @ flat.T, torch.float32, "G")


# --------------------------------------------------------------------- shapes, strides, edges

GRAM_SHAPES = [
    pytest.param(1, 1, id="m1-P1"),
    pytest.param(5, 300, id="m5-P300"),
    pytest.param(37, 1000, id="m37-P1000"),
    pytest.param(70, 333, id="m70-P333"),  # two row tiles: off-diagonal tile pairs and mirror
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,p", GRAM_SHAPES)
def test_gram_symmetric(m, p, dtype, backend, poisoned):
    a = torch.randn(m, p).to(dtype).to(device_of(backend))
    g = gram(a, backend=backend)
    assert g.dtype == torch.float64 and g.shape == (m, m)
    assert torch.equal(g, g.T), "A Aᵀ must be exactly symmetric"
    assert_close(g, gram_ref(a), ACC_DTYPE, "gram")
    assert_dot_close(g, a, None, ACC[backend], "gram per entry")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "m,p,r",
    [
        pytest.param(5, 300, 1, id="m5-P300-r1"),
        pytest.param(20, 777, 3, id="m20-P777-r3"),
        pytest.param(70, 100, 17, id="m70-P100-r17"),
    ],
)
def test_gram_against_rows(m, p, r, dtype, backend, poisoned):
    dev = device_of(backend)
    a = torch.randn(m, p).to(dtype).to(dev)
    b = torch.randn(r, p).to(dtype).to(dev)
    g = gram(a, b, backend=backend)
    assert g.shape == (m, r)
    assert_close(g, gram_ref(a, b), ACC_DTYPE, "A bᵀ")
    assert_dot_close(g, a, b, ACC[backend], "A bᵀ per entry")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_vector_target_and_strided_rows(backend, poisoned):
    dev = device_of(backend)
    base = torch.randn(6, 1000, device=dev)
    a = base[:, 3:700]  # row stride 1000, not P: a view into a larger accumulator
    b = torch.randn(697, device=dev)
    g = gram(a, b, backend=backend)
    assert g.shape == (6,)
    assert_close(g, gram_ref(a, b), ACC_DTYPE, "A b")
    assert_dot_close(g, a, b[None], ACC[backend], "A b per entry")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_empty_columns(backend, poisoned):
    dev = device_of(backend)
    a = torch.zeros(4, 0, device=dev)
    zeros = torch.zeros(4, 4, dtype=torch.float64, device=dev)
    assert torch.equal(gram(a, backend=backend), zeros)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,p", [(1, 1), (5, 33), (64, 1000), (65, 4099), (3, 300_007)])
def test_gram_gpu_shapes(dtype, m, p, backend, poisoned):
    a = torch.randn(m, p, device="cuda").to(dtype)
    g = gram(a, backend=backend)
    torch.cuda.synchronize()
    assert g.dtype == torch.float64 and g.shape == (m, m)
    assert torch.equal(g, g.T), "A Aᵀ must be exactly symmetric"
    # Products are summed in fp32 before the fp64 fold: fp32-grade whatever the input dtype.
    assert_close(g, gram_ref(a), ACC_DTYPE, "gram")
    assert_dot_close(g, a, None, torch.float32, "gram per entry")
    b = torch.randn(p, device="cuda").to(dtype)
    assert_close(gram(a, b, backend=backend), gram_ref(a, b), ACC_DTYPE, "gram vector")
    bm = torch.randn(7, p, device="cuda").to(dtype)
    assert_close(gram(a, bm, backend=backend), gram_ref(a, bm), ACC_DTYPE, "gram rows")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [16, 64, 130])
def test_gram_gpu_large(m, dtype, backend):
    a = torch.randn(m, (1 << 20) + 17, device="cuda").to(dtype)
    g = gram(a, backend=backend)
    assert torch.equal(g, g.T)
    assert_close(g, a.double() @ a.double().T, ACC_DTYPE, "gram")
    b = torch.randn(2, a.shape[1], device="cuda").to(dtype)
    assert_close(gram(a, b, backend=backend), a.double() @ b.double().T, ACC_DTYPE)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gram_past_2_31_elements(backend):
    """A [3, 2**30 + 7] fp32 (12.9 GB): rows 2+ start past 2**31 elements, so 32-bit offsets
    would wrap. The float64 reference is summed in chunks to stay small."""
    m, p, chunk = 3, (1 << 30) + 7, 1 << 26
    a = torch.randn(m, p, device="cuda")
    g = gram(a, backend=backend)
    b = gram(a, a[1], backend=backend)
    ref = torch.zeros(m, m, dtype=torch.float64, device="cuda")
    for s in range(0, p, chunk):
        c = a[:, s : s + chunk].double()
        ref += c @ c.T
    assert torch.equal(g, g.T)
    assert_close(g, ref, ACC_DTYPE, "gram")
    assert_close(b, ref[:, 1], ACC_DTYPE, "gram vector")
    del a


# --------------------------------------------------------------------- validation

BAD_GRAM = [
    ("a 1-D", dict(a=torch.randn(5)), ValueError, "a"),
    ("a int", dict(a=torch.ones(2, 5, dtype=torch.long)), TypeError, "a"),
    ("b cols", dict(b=torch.randn(2, 4)), ValueError, "b"),
    ("b dtype", dict(b=torch.randn(5, dtype=torch.float64)), TypeError, "b"),
    ("b 3-D", dict(b=torch.randn(1, 1, 5)), ValueError, "b"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_GRAM, ids=[c[0] for c in BAD_GRAM])
def test_gram_rejects_bad_input(case, backend):
    _, override, exc, name = case
    dev = device_of(backend)
    args = dict(a=torch.randn(3, 5), b=None)
    args.update(override)
    args = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(exc, match=name):
        gram(**args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_non_finite_rejected_when_checked(backend):
    a = torch.randn(3, 5)
    a[1, 1] = float("inf")
    with pytest.raises(ValueError, match="a contains"):
        gram(a.to(device_of(backend)), backend=backend, check_finite=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_float64_inputs_only_on_torch(backend):
    a = torch.randn(3, 5, dtype=torch.float64)
    if backend == "torch":
        assert_dot_close(gram(a, backend="torch"), a, None, torch.float64, "fp64 input")
    else:
        with pytest.raises(TypeError, match="float64 inputs are supported by backend='torch'"):
            gram(a.to(device_of(backend)), backend=backend)


def test_gram_reference_dtypes_and_empty_rows():
    """gram_ref stores float64 (a value fp32 cannot hold survives) and handles zero rows."""
    a = torch.tensor([[1.0, 1e-9]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    for out in (gram_ref(a, b), gram_ref(a, b[0]), gram_ref(torch.cat([a, b]))):
        assert out.dtype == torch.float64
    assert gram_ref(a, b).tolist() == [[1.0 + 1e-9]]
    assert gram_ref(a, b[0]).tolist() == [1.0 + 1e-9]
    assert gram_ref(torch.cat([a, b])).tolist() == [[1.0 + 1e-18, 1.0 + 1e-9],
                                                    [1.0 + 1e-9, 2.0]]  # fmt: skip
    empty = gram_ref(torch.zeros(0, 5), torch.ones(5))
    assert empty.shape == (0,) and empty.dtype == torch.float64
    assert gram_ref(torch.zeros(0, 5), torch.ones(2, 5)).shape == (0, 2)
