"""Which backends can run here, and why not. Nothing is probed at import time."""

from __future__ import annotations

import importlib
import os
from typing import NamedTuple

import torch

BACKENDS = ("cuda", "triton", "torch")
REBUILD_HINT = (
    "build it from source on a machine with the CUDA toolkit (nvcc on PATH or CUDA_HOME set): "
    "pip install --no-build-isolation -e .  (RNB_CUDA_ARCHS='80;90' picks the architectures)"
)


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run on this machine or these tensors."""


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def _load_extension():
    """Import ``rnb_kernels._C`` or return the error that stopped it."""
    try:
        return importlib.import_module("rnb_kernels._C"), None
    except ImportError as e:  # not built, or built against a missing runtime
        return None, e


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_status(name: str) -> BackendStatus:
    """Status of one backend: ``"torch"``, ``"triton"`` or ``"cuda"``."""
    if name == "torch":
        from .ops.cpu_fold import compiled_folds, fold_threads

        folds = (
            f"CPU folds compiled (rnb_kernels._cpu, threads={fold_threads()})"
            if compiled_folds()
            else "CPU folds by index_add_ (rnb_kernels._cpu not built, or RNB_CPU_FOLDS=0)"
        )
        return BackendStatus(True, f"PyTorch ops; runs on every device; {folds}")
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return BackendStatus(False, f"Triton is not installed ({e}); pip install triton")
        if torch.cuda.is_available():
            return BackendStatus(True, "Triton on the GPU")
        if triton_interpreter():
            return BackendStatus(True, "Triton interpreter on the CPU (TRITON_INTERPRET=1; slow)")
        return BackendStatus(
            False, "no CUDA device; set TRITON_INTERPRET=1 to run Triton kernels on the CPU"
        )
    if name == "cuda":
        ext, err = _load_extension()
        if ext is None:
            return BackendStatus(
                False, f"extension rnb_kernels._C not built ({err}); {REBUILD_HINT}"
            )
        archs = ",".join(ext.built_archs())
        if torch.version.cuda is None:
            return BackendStatus(
                False,
                f"_C is built (sm {archs}) but this torch is a CPU-only build; "
                "install a CUDA build of torch to use it",
            )
        if not torch.cuda.is_available():
            return BackendStatus(False, f"_C is built (sm {archs}) but no CUDA device is visible")
        return BackendStatus(True, f"compiled kernels for sm {archs}")
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def backends() -> dict[str, BackendStatus]:
    """Report which backends are usable here and why not.

    Example:
        >>> import rnb_kernels as rnb
        >>> rnb.backends()["torch"].available
        True
    """
    return {name: backend_status(name) for name in BACKENDS}
