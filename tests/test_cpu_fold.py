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


def _fold64(
    t: torch.Tensor,
    index: torch.Tensor,
    width: int,
    sign: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    t64 = t.double() if sign is None else t.double() * sign.double()
    out = torch.zeros(t.shape[0], width, dtype=torch.float64).index_add_(1, index, t64)
    return out if keep is None else torch.cat([out, t.double()[:, keep]], 1)


def _tol(t: torch.Tensor, n_terms: int) -> float:
    # fp32 sums of n_terms values of |t| <= max: a few ulps per term of the largest partial sum.
    return 4 * n_terms * torch.finfo(torch.float32).eps * float(t.abs().max()) + 1e-30


def _hash(k: int, width: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    index = torch.randint(0, width, (k,))
    sign = torch.randint(0, 2, (k,)).float() * 2 - 1 if signed else None
    return index, sign


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 17, 64])
@pytest.mark.parametrize("k", [1, 7, 8, 9, 31, 1000])
@pytest.mark.parametrize("width", [1, 3, 8, 13, 256])
@pytest.mark.parametrize("signed", [False, True])
def test_fold_columns_matches_float64(compiled, poisoned, rows, k, width, signed):
    t = torch.randn(rows, k) * torch.rand(1, k) * 10
    index, sign = _hash(k, width, signed)
    got = cpu_fold.fold_columns(t, cpu_fold.ColumnHash.make(index, sign, width))
    assert got.dtype == torch.float32 and got.shape == (rows, width)
    assert not got.isnan().any()  # every element written (torch.empty is poisoned)
    want = _fold64(t, index, width, sign)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=_tol(t, k))


@pytest.mark.parametrize("rows", [1, 9, 64])
@pytest.mark.parametrize(
    ("k", "kept"), [(1, [0]), (9, [8, 0, 3]), (1000, list(range(0, 1000, 37)))]
)
@pytest.mark.parametrize("signed", [False, True])
def test_fold_columns_keeps_columns(compiled, poisoned, rows, k, kept, signed):
    # Kept columns are copied out exactly and still folded into their buckets.
    t = torch.randn(rows, k)
    index, sign = _hash(k, 13, signed)
    keep = torch.tensor(kept)
    got = cpu_fold.fold_columns(t, cpu_fold.ColumnHash.make(index, sign, 13), keep=keep)
    assert got.shape == (rows, 13 + len(kept)) and not got.isnan().any()
    assert torch.equal(got[:, 13:], t[:, keep])
    want = _fold64(t, index, 13, sign)
    torch.testing.assert_close(got[:, :13].double(), want, rtol=0, atol=_tol(t, k))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("kept", [None, [0, 40, 7]])
def test_index_add_fold_matches_float64(signed, kept):
    # The path of GPU tensors, other layouts and builds without rnb_kernels._cpu.
    t = torch.randn(21, 41)
    index, sign = _hash(41, 6, signed)
    keep = None if kept is None else torch.tensor(kept)
    with cpu_fold.index_add_folds():
        got = cpu_fold.fold_columns(t, cpu_fold.ColumnHash.make(index, sign, 6), keep)
    want = _fold64(t, index, 6, sign, keep)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=_tol(t, 41))


def test_fold_columns_strided_rows_and_collisions(compiled, poisoned):
    # A column window of a wider tensor (row stride > K), every column in two buckets only,
    # so the 8 columns of a vector step collide.
    big = torch.randn(23, 77)
    t = big[:, 5:69]
    index = torch.arange(64) % 2
    sign = torch.where(torch.arange(64) % 3 == 0, -1.0, 1.0)
    for s in (None, sign):
        got = cpu_fold.fold_columns(t, cpu_fold.ColumnHash.make(index, s, 2), torch.tensor([63]))
        want = _fold64(t, index, 2, s, torch.tensor([63]))
        torch.testing.assert_close(got.double(), want, rtol=0, atol=_tol(t, 64))


def test_fold_columns_other_layouts_and_dtypes(compiled):
    # Transposed inputs (column stride != 1) go through index_add_; bfloat16 is folded in
    # float32.
    t = torch.randn(40, 12)
    index, sign = _hash(40, 5, True)
    h = cpu_fold.ColumnHash.make(index, sign, 5)
    keep = torch.tensor([3, 39])
    got = cpu_fold.fold_columns(t.t(), h, keep)
    torch.testing.assert_close(
        got.double(), _fold64(t.t(), index, 5, sign, keep), rtol=0, atol=1e-5
    )
    b = torch.randn(9, 40).bfloat16()
    got = cpu_fold.fold_columns(b, h)
    torch.testing.assert_close(got.double(), _fold64(b.float(), index, 5, sign), rtol=0, atol=1e-4)
    # An int32 index the loops cannot read as is (strided, or of the wrong length or dtype).
    f = torch.randn(9, 40)
    want = _fold64(f, index, 5, sign)
    for index32 in (index.int().repeat(2)[::2], index.int()[:-1], index):
        got = cpu_fold.fold_columns(f, h._replace(bucket32=index32))
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_column_fold_does_not_depend_on_the_thread_count(compiled):
    # Rows are split among threads in blocks, never a bucket's sum: equal bit for bit.
    t = torch.randn(1029, 700)
    index, sign = _hash(700, 61, True)
    h = cpu_fold.ColumnHash.make(index, sign, 61)
    keep = torch.tensor([5, 699], dtype=torch.int32)

    def run(threads: int) -> torch.Tensor:
        out = torch.full((1029, 63), float("nan"))
        compiled.fold_columns(t.data_ptr(), 1029, 700, 700, h.bucket32.data_ptr(),
                              h.sign.data_ptr(), 61, keep.data_ptr(), 2, out.data_ptr(), 63,
                              threads)  # fmt: skip
        return out

    one = run(1)
    assert not one.isnan().any()
    for threads in (2, 3, 8):
        assert torch.equal(run(threads), one)
    torch.testing.assert_close(one.double(), _fold64(t, index, 61, sign, keep.long()),
                               rtol=0, atol=_tol(t, 700))  # fmt: skip


def _torch_openmp_library() -> str | None:
    """File name of the OpenMP runtime PyTorch's CPU library resolves, or None."""
    import ctypes

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                    ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]  # fmt: skip

    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        fn = ctypes.CDLL(lib).omp_get_max_threads
    except (OSError, AttributeError):
        return None
    info = DlInfo()
    dladdr = ctypes.CDLL(None).dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(DlInfo)]
    if not dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)):
        return None
    return os.path.basename(info.fname.decode())


def test_column_fold_runs_on_torchs_threads_when_it_shares_the_runtime(compiled, monkeypatch):
    if _torch_openmp_library() != "libgomp.so.1":
        pytest.skip(f"PyTorch's OpenMP runtime here is {_torch_openmp_library()}, not libgomp")
    # setup.py links the module to libgomp.so.1 when the compiler takes -fopenmp; the loader
    # then hands it the runtime torch loaded, and the fold uses torch's thread count.
    assert compiled.openmp_symbol() != 0
    cpu_fold._shares_torch_openmp.cache_clear()
    assert cpu_fold.fold_threads() == torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 5)
    assert cpu_fold.fold_threads() == 5
    monkeypatch.setattr(cpu_fold, "_shares_torch_openmp", lambda: False)
    assert cpu_fold.fold_threads() == 1  # another runtime's threads would fight torch's


def test_folds_allocate_on_the_inputs_device(compiled):
    # A process-wide default device must not move the compiled folds' outputs off the CPU.
    t, index = torch.randn(16, 9), torch.randint(0, 4, (9,))
    want = _fold64(t, index, 4)
    h = cpu_fold.ColumnHash.make(index, None, 4)
    with torch.device("meta"):
        got = cpu_fold.fold_columns(t, h)
        flat = cpu_fold.fold_flat(t, index.repeat(16), index.repeat(16).int(), 4)
    assert got.device.type == "cpu" and flat.device.type == "cpu"
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(flat.double(), want.sum(0), rtol=0, atol=1e-4)


@pytest.mark.parametrize("n", [1, 7, 8, 1000, 1 << 16, (1 << 19) + 5, 3 << 20])
@pytest.mark.parametrize("width", [1, 5, 16384, 1 << 22])
def test_fold_flat_matches_float64(compiled, poisoned, n, width):
    t = torch.randn(n)
    index = torch.randint(0, width, (n,))
    got = cpu_fold.fold_flat(t, index, index.int(), width)
    assert not got.isnan().any()
    want = torch.zeros(width, dtype=torch.float64).index_add_(0, index, t.double())
    # Each bucket sums its own elements only: the tolerance follows the fullest bucket.
    terms = int(torch.bincount(index, minlength=width).max())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=_tol(t, terms))


def test_element_fold_does_not_depend_on_the_thread_count(compiled):
    # Large inputs are folded in chunks fixed by n and width; threads only share them out.
    for n, width in ((3 << 20, 16384), ((1 << 19) + 5, 7), (1 << 20, 1 << 22)):
        t = torch.randn(n)
        index = torch.randint(0, width, (n,), dtype=torch.int32)

        def run(threads: int, t=t, n=n, index=index, width=width) -> torch.Tensor:
            out = torch.full((width,), float("nan"))
            compiled.fold_flat(t.data_ptr(), n, index.data_ptr(), out.data_ptr(), width, threads)
            return out

        one = run(1)
        assert not one.isnan().any()
        for threads in (2, 3):
            assert torch.equal(run(threads), one)


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
