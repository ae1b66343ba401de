"""The compiled CPU folds (rnb_kernels._cpu) against float64 sums, and their use by the ops."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from rnb_kernels.ops import cpu_fold
from rnb_kernels.ops.domain_projection import domain_projection
from rnb_kernels.ops.domain_sketch import domain_sketch


def _expected_missing() -> str | None:
    """Why setup.py legitimately did not build rnb_kernels._cpu here, or None."""
    if os.environ.get("RNB_SKIP_CPU_BUILD", "0") not in ("", "0"):
        return "RNB_SKIP_CPU_BUILD is set"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler: setup.py does not build rnb_kernels._cpu"
    return None


@pytest.fixture
def compiled(monkeypatch):
    """The compiled folds, enabled whatever RNB_CPU_FOLDS says in the environment."""
    reason = _expected_missing()
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("RNB_CPU_FOLDS", "1")
    clear = cpu_fold._extension.cache_clear  # a test may patch _extension itself
    clear()
    import rnb_kernels._cpu as ext

    assert cpu_fold.compiled_folds()
    yield ext
    clear()


def _fold64(t: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    out = torch.zeros(t.shape[0], width, dtype=torch.float64)
    return out.index_add_(1, index, t.double())


def _tol(t: torch.Tensor, n_terms: int) -> float:
    # fp32 sums of n_terms values of |t| <= max: a few ulps per term of the largest partial sum.
    return 4 * n_terms * torch.finfo(torch.float32).eps * float(t.abs().max()) + 1e-30


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 17, 64])
@pytest.mark.parametrize("k", [1, 7, 8, 9, 31, 1000])
@pytest.mark.parametrize("width", [1, 3, 8, 13, 256])
def test_fold_columns_matches_float64(compiled, poisoned, rows, k, width):
    t = torch.randn(rows, k) * torch.rand(1, k) * 10
    index = torch.randint(0, width, (k,))
    got = cpu_fold.fold_columns(t, index, index.int(), width)
    assert got.dtype == torch.float32 and got.shape == (rows, width)
    assert not got.isnan().any()  # every element written (torch.empty is poisoned)
    torch.testing.assert_close(got.double(), _fold64(t, index, width), rtol=0, atol=_tol(t, k))


def test_fold_columns_strided_rows_and_collisions(compiled, poisoned):
    # A column window of a wider tensor (row stride > K), every column in two buckets only,
    # so the 8 columns of a vector step collide.
    big = torch.randn(23, 77)
    t = big[:, 5:69]
    index = torch.arange(64) % 2
    got = cpu_fold.fold_columns(t, index, index.int(), 2)
    torch.testing.assert_close(got.double(), _fold64(t, index, 2), rtol=0, atol=_tol(t, 64))


def test_fold_columns_other_layouts_and_dtypes(compiled):
    # Transposed inputs (column stride != 1) go through index_add_; bfloat16 is folded in
    # float32.
    t = torch.randn(40, 12)
    index = torch.randint(0, 5, (40,))
    got = cpu_fold.fold_columns(t.t(), index, index.int(), 5)
    torch.testing.assert_close(got.double(), _fold64(t.t(), index, 5), rtol=0, atol=1e-5)
    h = torch.randn(9, 40).bfloat16()
    got = cpu_fold.fold_columns(h, index, index.int(), 5)
    torch.testing.assert_close(got.double(), _fold64(h.float(), index, 5), rtol=0, atol=1e-4)
    # An int32 index the loops cannot read as is (strided, or of the wrong length or dtype).
    f = torch.randn(9, 40)
    want = _fold64(f, index, 5)
    for index32 in (index.int().repeat(2)[::2], index.int()[:-1], index):
        got = cpu_fold.fold_columns(f, index, index32, 5)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_folds_allocate_on_the_inputs_device(compiled):
    # A process-wide default device must not move the compiled folds' outputs off the CPU.
    t, index = torch.randn(16, 9), torch.randint(0, 4, (9,))
    want = _fold64(t, index, 4)
    with torch.device("meta"):
        got = cpu_fold.fold_columns(t, index, index.int(), 4)
        flat = cpu_fold.fold_flat(t, index.repeat(16), index.repeat(16).int(), 4)
    assert got.device.type == "cpu" and flat.device.type == "cpu"
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(flat.double(), want.sum(0), rtol=0, atol=1e-4)


@pytest.mark.parametrize("n", [1, 7, 8, 1000, 1 << 16])
@pytest.mark.parametrize("width", [1, 5, 16384])
def test_fold_flat_matches_float64(compiled, poisoned, n, width):
    t = torch.randn(n)
    index = torch.randint(0, width, (n,))
    got = cpu_fold.fold_flat(t, index, index.int(), width)
    assert not got.isnan().any()
    want = torch.zeros(width, dtype=torch.float64).index_add_(0, index, t.double())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=_tol(t, n))


def test_fold_flat_is_in_order_single_pass(compiled):
    # Summation order is the element order (one thread): equal to a float32 loop bit for bit.
    t = torch.randn(300)
    index = torch.randint(0, 4, (300,))
    got = cpu_fold.fold_flat(t, index, index.int(), 4)
    want = [torch.tensor(0.0)] * 4
    for v, i in zip(t, index.tolist()):
        want[i] = want[i] + v
    assert torch.equal(got, torch.stack(want))


def test_ops_use_the_compiled_folds(compiled, monkeypatch):
    calls = {"fold_columns": 0, "fold_flat": 0}

    class Counting:
        def __getattr__(self, name):
            calls[name] += 1
            return getattr(compiled, name)

    monkeypatch.setattr(cpu_fold, "_extension", lambda: Counting())
    x, dy = torch.randn(20, 6), torch.randn(20, 40)
    ids = torch.randint(0, 3, (20,))
    domain_projection(x, dy, ids, 3, proj_dim=8)
    domain_projection(x, dy, ids, 3, proj_dim=8, exact_index=torch.tensor([1, 5]),
                      exact=torch.zeros(3, 2, 6))  # fmt: skip
    assert calls["fold_columns"] == 2
    domain_projection(x.bfloat16(), dy.bfloat16(), ids, 3, proj_dim=8)  # folded in float32
    assert calls["fold_columns"] == 3
    domain_sketch(x, dy, ids, 3, sketch_dim=64)
    assert calls["fold_flat"] == int(ids.unique().numel())
    with cpu_fold.index_add_folds():  # the A/B switch of benchmarks/bench_kernels.py
        assert not cpu_fold.compiled_folds()
        domain_projection(x, dy, ids, 3, proj_dim=8)
        domain_sketch(x, dy, ids, 3, sketch_dim=64)
    assert calls == {"fold_columns": 3, "fold_flat": int(ids.unique().numel())}
    assert cpu_fold.compiled_folds()


@pytest.mark.parametrize("mode", ["projected", "sketch"])
def test_compiled_and_index_add_states_agree(compiled, monkeypatch, mode):
    x, dy = torch.randn(50, 16), torch.randn(50, 300)
    ids = torch.randint(-1, 4, (50,))

    def state() -> torch.Tensor:
        if mode == "projected":
            return domain_projection(x, dy, ids, 4, proj_dim=32, seed=3, layer=1,
                                     exact_index=torch.tensor([0, 299]),
                                     exact=torch.zeros(4, 2, 16))[1]  # fmt: skip
        return domain_sketch(x, dy, ids, 4, sketch_dim=128, seed=3, layer=1)[1]

    with_ext = state()
    monkeypatch.setenv("RNB_CPU_FOLDS", "0")
    cpu_fold._extension.cache_clear()
    assert not cpu_fold.compiled_folds()
    torch.testing.assert_close(with_ext, state(), rtol=1e-5, atol=1e-4)
