"""Backend resolution: one table of implementations per op, imported lazily.

An implementation is named "module:function"; modules are imported on first use so that
``import rnb_kernels`` never imports Triton or loads the CUDA extension.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._backends import BACKENDS, BackendUnavailableError, backend_status

# backend="auto" on GPU tensors takes the first of these that implements the op and can run.
# Triton first: on an H200 its kernels and the tracked training step measured faster than the
# CUDA ones (benchmarks/results/gpu_checks.md); other architectures are unmeasured.
AUTO_ORDER = ("triton", "cuda", "torch")

_IMPLS: dict[str, dict[str, str]] = {
    "segmented_wgrad": {
        "torch": "rnb_kernels.ops.segmented_wgrad:segmented_wgrad_torch",
        "triton": "rnb_kernels.ops.triton.segmented_wgrad:segmented_wgrad_triton",
        "cuda": "rnb_kernels.ops.cuda:segmented_wgrad_cuda",
    },
    "domain_sketch": {
        "torch": "rnb_kernels.ops.domain_sketch:domain_sketch_torch",
        "triton": "rnb_kernels.ops.triton.domain_sketch:domain_sketch_triton",
        "cuda": "rnb_kernels.ops.cuda:domain_sketch_cuda",
    },
    # No compiled CUDA kernel: "auto" on a GPU resolves to Triton.
    "domain_projection": {
        "torch": "rnb_kernels.ops.domain_projection:domain_projection_torch",
        "triton": "rnb_kernels.ops.triton.projected:domain_projection_triton",
    },
    "cross_entropy_rows": {
        "torch": "rnb_kernels.ops.cross_entropy:cross_entropy_rows_torch",
        "triton": "rnb_kernels.ops.triton.cross_entropy:cross_entropy_rows_triton",
    },
    "cross_entropy_rows_grad_": {
        "torch": "rnb_kernels.ops.cross_entropy:cross_entropy_rows_grad_torch",
        "triton": "rnb_kernels.ops.triton.cross_entropy:cross_entropy_rows_grad_triton",
    },
    "gram": {
        "torch": "rnb_kernels.ops.gram:gram_torch",
        "triton": "rnb_kernels.ops.triton.gram:gram_triton",
        "cuda": "rnb_kernels.ops.cuda:gram_cuda",
    },
}

_cache: dict[tuple[str, str], Callable | None] = {}


def _load(op: str, backend: str) -> Callable | None:
    key = (op, backend)
    if key not in _cache:
        target = _IMPLS[op].get(backend)
        fn = None
        if target is not None:
            mod_name, fn_name = target.split(":")
            try:
                fn = getattr(importlib.import_module(mod_name), fn_name, None)
            except ImportError:
                fn = None
        _cache[key] = fn
    return _cache[key]


def _constant_for_dynamo(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)`` without its ``import torch._dynamo`` (which
    loads Triton), so ``import rnb_kernels`` stays light; it sets the same marker.
    ``test_backend_resolution_traces_without_graph_breaks`` checks that Dynamo honours it."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


# Both answers are constants of the process (what is installed and built); Dynamo takes them
# as such instead of tracing the imports behind them, which would break the graph.
@_constant_for_dynamo
def has_impl(op: str, backend: str) -> bool:
    """Whether ``op`` has a ``backend`` implementation in this installation."""
    return _load(op, backend) is not None


@_constant_for_dynamo
def backend_available(backend: str) -> bool:
    """``backend_status(backend).available`` (``backend`` one of ``BACKENDS``)."""
    return backend_status(backend).available


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Pick the backend for ``op`` on ``device``.

    ``"auto"``: the first of :data:`AUTO_ORDER` (triton > cuda > torch) that implements ``op``
    and can run, on GPU tensors; torch on CPU tensors. An explicit
    backend that cannot run raises :class:`BackendUnavailableError` saying what to do.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        for name in AUTO_ORDER:
            if has_impl(op, name) and backend_available(name):
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend != "torch":
        if not backend_available(backend):
            reason = backend_status(backend).reason
            raise BackendUnavailableError(f"backend {backend!r} cannot run here: {reason}")
        if not has_impl(op, backend):
            raise BackendUnavailableError(
                f"op {op!r} has no {backend!r} implementation in this build; use backend='torch'"
            )
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type == "cpu":
        from .._backends import triton_interpreter

        if not triton_interpreter():
            raise ValueError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)"
            )
    return backend


# Tensor types an op may hand to its implementation without the custom op (no subclass).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(*tensors: torch.Tensor) -> bool:
    """Whether a public op may call its implementation directly instead of its custom op: eager
    execution (not compiling, no dispatch mode such as a fake-tensor or tracing mode active)
    on plain tensors (no subclass such as ``DTensor``). The custom op is what the compiler
    needs (an opaque node with declared mutations); eagerly its dispatch is pure overhead,
    about 0.25 ms per call on the CPU, paid once per tracked layer and micro-batch."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return all(type(t) in _PLAIN for t in tensors)


def get_impl(op: str, backend: str) -> Callable:
    fn = _load(op, backend)
    if fn is None:
        raise BackendUnavailableError(f"op {op!r} has no {backend!r} implementation")
    return fn
