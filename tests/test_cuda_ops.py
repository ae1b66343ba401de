"""The compiled CUDA backend (rnb_kernels._C, backend="cuda").

Two groups:

* CPU-runnable (CI): the module imports without a GPU and reports its architectures, explicit
  backend="cuda" fails cleanly here, binding errors name the kernel, the launcher's row sort
  matches the torch backend's, and tests/cpp/host_test.cpp -- the kernels' own hash and
  segment-walk code compiled for the host -- checks out against the Python reference.
* ``cuda``-marked: every kernel against the float64 references on a GPU (skipped otherwise).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from _tol import ACC_DTYPE, TOL, assert_close, poison

import rnb_kernels as rnb
from rnb_kernels.ops import cuda as cuda_ops
from rnb_kernels.ops.reference import (
    domain_sketch_ref,
    gram_ref,
    segmented_wgrad_ref,
    sketch_hash_ref,
)

ROOT = Path(__file__).resolve().parents[1]
HOST_TEST_SRC = ROOT / "tests" / "cpp" / "host_test.cpp"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --------------------------------------------------------------------------------------------
# CPU-runnable: build, import, errors
# --------------------------------------------------------------------------------------------


def _nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def _extension_expected() -> str | None:
    """Why the extension is legitimately absent here, or None if setup.py must have built it."""
    if os.environ.get("RNB_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "RNB_SKIP_CUDA_BUILD is set"
    if _nvcc() is None:
        return "no nvcc: setup.py installs the pure-Python package"
    return None


@pytest.fixture(scope="module")
def ext():
    reason = _extension_expected()
    if reason is not None:
        pytest.skip(reason)
    import rnb_kernels._C as C  # must import without a GPU or a CUDA build of torch

    return C


def test_extension_imports_without_gpu(ext):
    for name in ("segmented_wgrad", "domain_sketch", "gram", "segmented_workspace_elems"):
        assert callable(getattr(ext, name)), name
    assert ext.cuda_runtime_version() >= 11000


def test_built_archs_match_build_setting(ext):
    spec = os.environ.get("RNB_CUDA_ARCHS", "80;90")
    # setup.py's parsing: ';' or ',' separated, "sm_" prefix and dots dropped.
    want = [
        a.strip().replace("sm_", "").replace(".", "") for a in spec.replace(",", ";").split(";")
    ]
    assert ext.built_archs() == [a for a in want if a]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
@pytest.mark.parametrize("op", ["segmented_wgrad", "domain_sketch", "gram"])
def test_explicit_cuda_backend_unavailable_here(op):
    x, dy, ids = torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 1, -1, 0])
    reason = rnb.backends()["cuda"].reason
    with pytest.raises(rnb.BackendUnavailableError, match="backend 'cuda' cannot run here") as e:
        if op == "segmented_wgrad":
            rnb.ops.segmented_wgrad(x, dy, ids, 2, backend="cuda")
        elif op == "domain_sketch":
            rnb.ops.domain_sketch(x, dy, ids, 2, sketch_dim=8, backend="cuda")
        else:
            rnb.ops.gram(x, backend="cuda")
    # The message carries the concrete reason (not built / CPU-only torch / no device).
    assert reason in str(e.value)


def test_binding_rejects_bad_arguments_naming_the_kernel(ext):
    # Argument checks run before any CUDA call, so they fail the same way with or without a GPU.
    base = dict(
        x=0, dy=0, order=0, bounds=0, dtype=0, n=4, k_in=3, k_out=2, ldx=3, ldy=2,
        num_domains=2, dw=0, workspace=0, workspace_len=0, stream=0,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="'segmented_wgrad'.*cudaErrorInvalidValue"):
        ext.segmented_wgrad(acc=0, **{**base, "dtype": 7})
    with pytest.raises(RuntimeError, match="'segmented_wgrad'.*cudaErrorInvalidValue"):
        ext.segmented_wgrad(acc=0, **{**base, "ldx": 2})  # row stride below the width
    with pytest.raises(RuntimeError, match="'domain_sketch'.*cudaErrorInvalidValue"):
        ext.domain_sketch(sketch=0, sketch_dim=0, seed=0, layer=0, **base)
    with pytest.raises(RuntimeError, match="'domain_sketch'.*cudaErrorInvalidValue"):
        ext.domain_sketch(sketch=0, sketch_dim=8, seed=0, layer=0, **{**base, "num_domains": 0})


# --------------------------------------------------------------------------------------------
# CPU-runnable: the kernels' index math, compiled for the host
# --------------------------------------------------------------------------------------------


def _host_compilers():
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    return [
        pytest.param(("c++", cxx), id="c++"),
        pytest.param(("nvcc", _nvcc()), id="nvcc"),
    ]


@pytest.fixture(scope="module", params=_host_compilers())
def host_test(request, tmp_path_factory):
    kind, compiler = request.param
    if compiler is None:
        pytest.skip(f"no {kind} compiler found")
    exe = tmp_path_factory.mktemp(f"host_test_{kind}") / "host_test"
    inc = f"-I{ROOT / 'csrc'}"
    if kind == "nvcc":
        # -x cu takes the __host__ __device__ branch of the headers, as the kernels do.
        cmd = [compiler, "-std=c++17", "-O1", "-x", "cu", "-Xcompiler=-Wall", inc]
    else:
        cmd = [compiler, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", inc]
    res = subprocess.run(
        [*cmd, str(HOST_TEST_SRC), "-o", str(exe)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    return exe


def _run(exe, *args) -> str:
    res = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _parse_hash(out: str) -> tuple[torch.Tensor, torch.Tensor]:
    vals = torch.tensor([[int(v) for v in line.split()] for line in out.splitlines()])
    return vals[:, 0], vals[:, 1].to(torch.float64)


@pytest.mark.parametrize(
    "k_out,k_in,k,seed,layer",
    [
        (1, 1, 1, 0, 0),
        (3, 5, 16, 1, 0),
        (37, 33, 8192, 0, 3),
        (33, 37, 4099, 2**32 - 1, 2**32 - 1),
        (64, 64, 2**31 - 1, 123456789, 7),
        (8, 1000, 2**32 - 1, 5, 2**31),
    ],
)
def test_host_sketch_hash_matches_reference(host_test, k_out, k_in, k, seed, layer):
    bucket, sign = _parse_hash(_run(host_test, "hash", k_out, k_in, k, seed, layer))
    ref_bucket, ref_sign = sketch_hash_ref(k_out, k_in, k, seed, layer)
    assert torch.equal(bucket, ref_bucket.reshape(-1))
    assert torch.equal(sign, ref_sign.reshape(-1))


def _spec_hash(k, seed, layer, i, j):
    """The reference docstring's formula on python ints (mod 2**32 arithmetic)."""
    m32 = 0xFFFFFFFF

    def fmix32(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & m32
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & m32
        return h ^ (h >> 16)

    row = fmix32(((seed * 0x9E3779B9) ^ (layer * 0x85EBCA6B) ^ (i * 0xC2B2AE35)) & m32)
    h = fmix32((row + j * 0x27D4EB2F) & m32)
    return (h & 0x7FFFFFFF) % k, 1.0 if (h >> 31) == 0 else -1.0


def test_host_sketch_hash_large_indices(host_test):
    k, seed, layer = 65521, 99, 4
    # The python transcription first agrees with the reference implementation itself ...
    ref_b, ref_s = sketch_hash_ref(9, 11, k, seed, layer)
    for i in range(9):
        for j in range(11):
            assert _spec_hash(k, seed, layer, i, j) == (int(ref_b[i, j]), float(ref_s[i, j]))
    # ... then vouches for rows/columns far beyond what a dense reference grid can hold.
    pairs = [(0, 2**31), (2**31 - 1, 5), (2**32 - 1, 2**32 - 1), (50256, 767), (123457, 99991)]
    flat = [v for p in pairs for v in p]
    bucket, sign = _parse_hash(_run(host_test, "hash_at", k, seed, layer, *flat))
    for (i, j), b, s in zip(pairs, bucket.tolist(), sign.tolist()):
        assert (b, s) == _spec_hash(k, seed, layer, i, j), (i, j)


def test_host_segment_walk(host_test):
    out = _run(host_test, "segments")
    assert out.startswith("ok ") and int(out.split()[1]) > 1000, out


# --------------------------------------------------------------------------------------------
# GPU: kernels against the float64 references
# --------------------------------------------------------------------------------------------

SHAPES = [  # (N, K_in, K_out)
    (1, 1, 1),
    (37, 33, 1),
    (37, 1, 33),
    (1000, 33, 1000),
    (1000, 1000, 33),
    (37, 1000, 1000),
    (1000, 128, 256),  # 16-byte aligned rows: cp.async path, split over rows (few tiles)
    (1000, 2048, 2304),  # enough output tiles that the rows are not split
]
PATTERNS = ["mixed", "one_domain", "all_ignored", "sparse", "shuffled"]


def _shape_id(shape) -> str:
    n, k_in, k_out = shape
    return f"N{n}-Kin{k_in}-Kout{k_out}"


def _ids(pattern: str, n: int, m: int, device="cpu") -> torch.Tensor:
    """Domain ids: mixed with -1s, all in one domain, all ignored, only 2 of m domains (the rest
    empty), or rows of each domain contiguous but the domains in a shuffled order."""
    if pattern == "mixed":
        ids = torch.randint(-1, m, (n,))
    elif pattern == "one_domain":
        ids = torch.full((n,), m - 1)
    elif pattern == "all_ignored":
        ids = torch.full((n,), -1)
    elif pattern == "sparse":
        ids = torch.tensor([1, m - 1, -1])[torch.randint(0, 3, (n,))]
    elif pattern in ("shuffled", "empty_rows"):
        ids = torch.randperm(m)[torch.sort(torch.randint(0, m, (n,))).values]
    else:
        raise ValueError(pattern)
    return ids.to(device)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every output buffer the launchers allocate starts as NaN."""
    real = cuda_ops._empty
    monkeypatch.setattr(cuda_ops, "_empty", lambda *a, **k: poison(real(*a, **k)))


def _inputs(n, k_in, k_out, dtype):
    x = torch.randn(n, k_in, device="cuda").to(dtype)
    dy = torch.randn(n, k_out, device="cuda").to(dtype)
    return x, dy


def _check_acc(new, old, ref, ids, m, what):
    """new = old + ref within fp32 tolerance, domains without rows bit-identical to before."""
    assert_close(new, old.double() + ref, ACC_DTYPE, what)
    present = set(ids[ids >= 0].unique().tolist())
    for d in range(m):
        if d not in present:
            assert torch.equal(new[d], old[d]), f"{what}: domain {d} has no rows but changed"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_segmented_wgrad_cuda(dtype, shape, pattern, poisoned_outputs):
    n, k_in, k_out = shape
    m = 5
    x, dy = _inputs(n, k_in, k_out, dtype)
    ids = _ids(pattern, n, m, "cuda")
    acc0 = torch.randn(m, k_out, k_in, device="cuda")
    acc = acc0.clone()
    dw, out = rnb.ops.segmented_wgrad(x, dy, ids, m, acc=acc, backend="cuda")
    torch.cuda.synchronize()
    assert out is acc and dw.dtype == dtype and dw.shape == (k_out, k_in)
    ref_dw, ref_acc = segmented_wgrad_ref(x, dy, ids, m)
    assert_close(dw, ref_dw, dtype, "dW")
    _check_acc(acc, acc0, ref_acc, ids, m, "acc")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("pattern", ["mixed", "one_domain", "sparse", "shuffled"])
@pytest.mark.parametrize("sketch_dim,seed,layer", [(1, 0, 0), (61, 3, 1), (4096, 2**32 - 1, 7)])
def test_domain_sketch_cuda(dtype, shape, pattern, sketch_dim, seed, layer, poisoned_outputs):
    n, k_in, k_out = shape
    if k_in * k_out > 300_000 and sketch_dim != 4096:
        pytest.skip("large layers run with the realistic sketch width only")
    m = 4
    x, dy = _inputs(n, k_in, k_out, dtype)
    ids = _ids(pattern, n, m, "cuda")
    s0 = torch.randn(m, sketch_dim, device="cuda")
    sketch = s0.clone()
    dw, out = rnb.ops.domain_sketch(
        x, dy, ids, m, sketch=sketch, seed=seed, layer=layer, backend="cuda"
    )
    torch.cuda.synchronize()
    assert out is sketch
    ref_dw, ref_sketch = domain_sketch_ref(x, dy, ids, m, sketch_dim, seed, layer)
    assert_close(dw, ref_dw, dtype, "dW")
    _check_acc(sketch, s0, ref_sketch, ids, m, "sketch")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segmented_matches_torch_backend_and_sketch_dw(dtype):
    n, k_in, k_out, m = 1000, 96, 160, 6
    x, dy = _inputs(n, k_in, k_out, dtype)
    ids = _ids("mixed", n, m, "cuda").to(torch.int32)
    dw_c, acc_c = rnb.ops.segmented_wgrad(x, dy, ids, m, backend="cuda")
    dw_t, acc_t = rnb.ops.segmented_wgrad(x, dy, ids, m, backend="torch")
    dw_s, _ = rnb.ops.domain_sketch(x, dy, ids, m, sketch_dim=256, backend="cuda")
    ref_dw, _ = segmented_wgrad_ref(x, dy, ids, m)
    assert_close(dw_c, dw_t.double(), dtype, "dW vs torch backend")
    assert_close(dw_s, ref_dw, dtype, "sketch-mode dW")
    assert_close(acc_c, acc_t.double(), ACC_DTYPE, "acc vs torch backend")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segmented_strided_inputs_and_side_stream(dtype, poisoned_outputs):
    # Row strides wider than the rows (views into a bigger buffer), odd offsets that rule out
    # 16-byte loads, and a non-default current stream.
    n, k_in, k_out, m = 300, 40, 24, 3
    big_x = torch.randn(n, k_in + 9, device="cuda").to(dtype)
    big_dy = torch.randn(n, k_out + 8, device="cuda").to(dtype)
    x, dy = big_x[:, 1 : k_in + 1], big_dy[:, :k_out]
    ids = _ids("mixed", n, m, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        acc = torch.zeros(m, k_out, k_in, device="cuda")
        dw, _ = rnb.ops.segmented_wgrad(x, dy, ids, m, acc=acc, backend="cuda")
    stream.synchronize()
    ref_dw, ref_acc = segmented_wgrad_ref(x, dy, ids, m)
    assert_close(dw, ref_dw, dtype, "dW")
    assert_close(acc, ref_acc, ACC_DTYPE, "acc")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segmented_zero_rows(dtype, poisoned_outputs):
    m = 3
    x, dy = _inputs(0, 33, 17, dtype)
    ids = torch.zeros(0, dtype=torch.int64, device="cuda")
    acc0 = torch.randn(m, 17, 33, device="cuda")
    acc = acc0.clone()
    dw, _ = rnb.ops.segmented_wgrad(x, dy, ids, m, acc=acc, backend="cuda")
    torch.cuda.synchronize()
    assert torch.equal(dw.float(), torch.zeros(17, 33, device="cuda"))
    assert torch.equal(acc, acc0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,p", [(1, 1), (5, 33), (64, 1000), (65, 4099), (3, 300_007)])
def test_gram_cuda(dtype, m, p, poisoned_outputs):
    a = torch.randn(m, p, device="cuda").to(dtype)
    g = rnb.ops.gram(a, backend="cuda")
    torch.cuda.synchronize()
    assert g.dtype == torch.float64 and g.shape == (m, m)
    assert torch.equal(g, g.T), "A Aᵀ must be exactly symmetric"
    # Products are summed in fp32 before the fp64 fold: fp32-grade whatever the input dtype.
    assert_close(g, gram_ref(a), ACC_DTYPE, "gram")
    b = torch.randn(p, device="cuda").to(dtype)
    assert_close(rnb.ops.gram(a, b, backend="cuda"), gram_ref(a, b), ACC_DTYPE, "gram vector")
    bm = torch.randn(7, p, device="cuda").to(dtype)
    assert_close(rnb.ops.gram(a, bm, backend="cuda"), gram_ref(a, bm), ACC_DTYPE, "gram rows")


def test_tolerance_table_covers_tested_dtypes():
    assert all(d in TOL for d in DTYPES)
