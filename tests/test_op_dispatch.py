"""Backend dispatch, the compiled extension's build/import/binding checks, the torch.library
registration of the ops, and the tolerance table every op test uses."""

from __future__ import annotations

import os

import pytest
import torch
from _optest import BACKENDS, device_of, nvcc_path
from _tol import TOL, assert_close

import rnb_kernels as rnb
from rnb_kernels.ops import domain_sketch, gram, segmented_wgrad


def _inputs():
    x = torch.randn(8, 5)
    dy = torch.randn(8, 3)
    ids = torch.tensor([0, 1, 2, -1, 0, 1, 2, 2])
    acc = torch.randn(3, 3, 5)
    return x, dy, ids, acc


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize(
    "usable,op,want",
    [
        ({"triton", "cuda"}, "segmented_wgrad", "triton"),  # Triton measured faster on sm_90
        ({"triton", "cuda"}, "gram", "triton"),
        ({"cuda"}, "domain_sketch", "cuda"),
        ({"cuda"}, "domain_projection", "torch"),  # no CUDA kernel for the projection
        (set(), "segmented_wgrad", "torch"),
    ],
)
def test_auto_order_on_gpu_tensors(monkeypatch, usable, op, want):
    from rnb_kernels.ops import _dispatch

    monkeypatch.setattr(_dispatch, "backend_available", lambda b: b == "torch" or b in usable)
    assert _dispatch.AUTO_ORDER == ("triton", "cuda", "torch")
    assert _dispatch.resolve_backend(op, "auto", torch.device("cuda")) == want
    assert _dispatch.resolve_backend(op, "auto", torch.device("cpu")) == "torch"


def test_backends_report():
    status = rnb.backends()
    assert set(status) == {"cuda", "triton", "torch"}
    assert status["torch"].available
    for s in status.values():
        assert isinstance(s.reason, str) and s.reason


@pytest.mark.hardware
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
@pytest.mark.parametrize("op", ["segmented_wgrad", "domain_sketch", "gram"])
def test_explicit_cuda_backend_unavailable_here(op):
    x, dy, ids = torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 1, -1, 0])
    reason = rnb.backends()["cuda"].reason
    with pytest.raises(rnb.BackendUnavailableError, match="backend 'cuda' cannot run here") as e:
        if op == "segmented_wgrad":
            segmented_wgrad(x, dy, ids, 2, backend="cuda")
        elif op == "domain_sketch":
            domain_sketch(x, dy, ids, 2, sketch_dim=8, backend="cuda")
        else:
            gram(x, backend="cuda")
    # The message carries the concrete reason (not built / CPU-only torch / no device).
    msg = str(e.value)
    assert reason in msg
    assert "pip install" in msg or "CUDA device" in msg or "CPU-only" in msg


@pytest.mark.hardware
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, dy, ids, acc = _inputs()
    with pytest.raises(rnb.BackendUnavailableError, match="TRITON_INTERPRET"):
        segmented_wgrad(x, dy, ids, 3, acc, backend="triton")


def test_auto_uses_torch_on_cpu():
    x, dy, ids, _ = _inputs()
    dw_auto, acc_auto = segmented_wgrad(x, dy, ids, 3)
    dw_t, acc_t = segmented_wgrad(x, dy, ids, 3, backend="torch")
    assert torch.equal(dw_auto, dw_t) and torch.equal(acc_auto, acc_t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_pass_opcheck(backend):
    """Schema, fake implementation and aliasing of the torch.library ops are consistent."""
    from rnb_kernels.ops.domain_sketch import _domain_sketch_op
    from rnb_kernels.ops.gram import _gram_op
    from rnb_kernels.ops.segmented_wgrad import _segmented_wgrad_op

    dev = device_of(backend)
    x, dy, ids, acc = (t.to(dev) for t in _inputs())
    bias_acc = torch.zeros(3, dy.shape[1], device=dev)
    for b_acc in (None, bias_acc):
        torch.library.opcheck(
            _segmented_wgrad_op, (x, dy, ids, 3, acc, b_acc, backend, True, False)
        )
    for bias in (False, True):
        torch.library.opcheck(
            _domain_sketch_op,
            (x, dy, ids, 3, torch.zeros(3, 16, device=dev), 1, 0, bias, backend, True, False),
        )
    torch.library.opcheck(_gram_op, (acc.view(3, -1), None, backend, False))


class _Counted:
    """Stands in for a custom op: counts the calls that went through it, then runs it."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args):
        self.calls += 1
        return self.op(*args)


def _op_call(name):
    x, dy, ids, _ = _inputs()
    if name == "segmented_wgrad":
        return lambda: segmented_wgrad(x, dy, ids, 3)
    if name == "domain_sketch":
        return lambda: domain_sketch(x, dy, ids, 3, sketch_dim=16)
    return lambda: rnb.ops.domain_projection(x, dy, ids, 3, proj_dim=4)


@pytest.mark.parametrize("name", ["segmented_wgrad", "domain_sketch", "domain_projection"])
def test_eager_calls_skip_the_custom_op_and_traced_calls_use_it(monkeypatch, name):
    """Eagerly a public op calls its implementation (the custom op's dispatch costs ~0.25 ms a
    call); under a dispatch mode (fake tensors, tracing) or on tensor subclasses it must go
    through the custom op, the only form the compiler and subclasses understand."""
    import importlib

    from torch.utils._python_dispatch import TorchDispatchMode

    mod = importlib.import_module(f"rnb_kernels.ops.{name}")
    counted = _Counted(getattr(mod, f"_{name}_op"))
    monkeypatch.setattr(mod, f"_{name}_op", counted)
    call = _op_call(name)
    dw_eager, state_eager = call()
    assert counted.calls == 0

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with PassThrough():
        dw_mode, state_mode = call()
    assert counted.calls == 1
    assert torch.equal(dw_eager, dw_mode) and torch.equal(state_eager, state_mode)

    class Sub(torch.Tensor):
        pass

    x, dy, ids, _ = _inputs()
    assert not _dispatch_eager(x.as_subclass(Sub), dy)
    assert _dispatch_eager(x, torch.nn.Parameter(dy))


def _dispatch_eager(*tensors):
    from rnb_kernels.ops._dispatch import eager

    return eager(*tensors)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only plumbing")
@pytest.mark.hardware
def test_runnable_interprets_a_kernel_jitted_before_the_switch():
    # @triton.jit picks JIT vs interpreter when it decorates; a module imported before
    # TRITON_INTERPRET=1 was set must still run its kernels on CPU tensors.
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    from rnb_kernels.ops.triton._common import runnable

    def _twice(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < N), mask=offs < N)

    kernel = JITFunction(_twice)
    x, y = torch.randn(5), torch.zeros(5)
    runnable(kernel)[(1,)](x, y, 5, BLOCK=8)
    assert torch.equal(y, 2 * x)


# --------------------------------------------------------------------------- the extension


def _extension_expected() -> str | None:
    """Why the extension is legitimately absent here, or None if setup.py must have built it."""
    if os.environ.get("RNB_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "RNB_SKIP_CUDA_BUILD is set"
    if nvcc_path() is None:
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
        ext.domain_sketch(sketch=0, sketch_dim=0, seed=0, layer=0, row_offset=0, **base)
    with pytest.raises(RuntimeError, match="'domain_sketch'.*cudaErrorInvalidValue"):
        ext.domain_sketch(
            sketch=0, sketch_dim=8, seed=0, layer=0, row_offset=0, **{**base, "num_domains": 0}
        )
    with pytest.raises(RuntimeError, match="'domain_sketch'.*cudaErrorInvalidValue"):
        # A row shard whose last global row index does not fit the 32-bit hash key.
        ext.domain_sketch(sketch=0, sketch_dim=8, seed=0, layer=0, row_offset=2**32 - 1, **base)


def test_launcher_rejects_other_dtypes():
    from rnb_kernels.ops import cuda as cuda_ops

    assert cuda_ops.dtype_code(torch.zeros(1), "x") == 0
    assert cuda_ops.dtype_code(torch.zeros(1, dtype=torch.bfloat16), "x") == 2
    with pytest.raises(TypeError, match="x: the cuda backend takes"):
        cuda_ops.dtype_code(torch.zeros(1, dtype=torch.float64), "x")


# --------------------------------------------------------------------------- tolerances


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tolerance_table_accepts_rounding_to_dtype_and_rejects_coarser(dtype):
    """TOL[dtype] accepts a value rounded to ``dtype`` (what a correct kernel returns) and
    rejects the same value rounded one precision coarser: the table is tight enough to see a
    kernel that computes in a lower precision than it claims."""
    coarser = {torch.float32: torch.bfloat16, torch.bfloat16: None, torch.float16: None}
    ref = torch.randn(4096, dtype=torch.float64) * 3
    assert_close(ref.to(dtype), ref, dtype, "rounded to its own dtype")
    if coarser[dtype] is not None:
        with pytest.raises(AssertionError):
            assert_close(ref.to(coarser[dtype]), ref, dtype, "rounded coarser")
    # An error of 256 ulps of the dtype (x the scale) on one element is rejected too.
    eps = torch.finfo(dtype).eps
    bad = ref.clone()
    bad[7] += 256 * eps * max(float(ref.abs().max()), 1.0)
    with pytest.raises(AssertionError):
        assert_close(bad, ref, dtype, "one wrong element")
    assert set(TOL) >= {torch.float64, torch.float32, torch.bfloat16, torch.float16}
