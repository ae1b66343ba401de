"""Shared helpers of the per-op test files: the backend parametrization, inputs, brute force.

Every op test is parametrized over :data:`BACKENDS`:

* ``torch``: CPU tensors;
* ``triton``: Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by conftest.py
  before Triton is imported) or, with a GPU, the compiled kernels on CUDA tensors;
* ``cuda``: the compiled ``rnb_kernels._C`` kernels, marked ``cuda`` (skipped without a GPU;
  see conftest.py for what strict mode turns into a failure instead).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

HAS_GPU = torch.cuda.is_available()

BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]
# Production-sized cases: on the GPU backends only, and only where there is a GPU to run them
# (triton's interpreter would take minutes). Generated, not skipped at run time.
GPU_BACKENDS = [
    pytest.param("triton", id="triton", marks=pytest.mark.cuda),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def device_of(backend: str) -> str:
    """Where a backend's test tensors live."""
    if backend == "cuda" or (backend == "triton" and HAS_GPU):
        return "cuda"
    return "cpu"


def brute_force(x, dy, ids, m):
    """Row-by-row outer products in float64: shares no code with the library."""
    x, dy, ids = x.cpu(), dy.cpu(), ids.cpu()
    k_out, k_in = dy.shape[1], x.shape[1]
    dw = torch.zeros(k_out, k_in, dtype=torch.float64)
    per = torch.zeros(m, k_out, k_in, dtype=torch.float64)
    for n in range(x.shape[0]):
        outer = torch.outer(dy[n].double(), x[n].double())
        dw += outer
        if int(ids[n]) >= 0:
            per[int(ids[n])] += outer
    return dw, per


def make_ids(pattern: str, n: int, m: int, device="cpu") -> torch.Tensor:
    """Domain ids in ``[-1, m)`` following a pattern:

    ``mixed``/``random`` every domain and -1 shuffled; ``sorted`` already grouped;
    ``one-domain`` all in domain m-1; ``all-ignored`` all -1; ``empty-domains`` only even
    domains and -1; ``skip-even`` only odd domains; ``sparse`` only domains 1 and m-1 and -1;
    ``shuffled`` rows of each domain contiguous, domains in a shuffled order.
    """
    if pattern in ("mixed", "random"):
        ids = torch.randint(-1, m, (n,))
    elif pattern == "sorted":
        ids = torch.randint(-1, m, (n,)).sort().values
    elif pattern == "one-domain":
        ids = torch.full((n,), m - 1)
    elif pattern == "all-ignored":
        ids = torch.full((n,), -1)
    elif pattern == "empty-domains":
        ids = 2 * torch.randint(0, (m + 1) // 2, (n,))
        ids[torch.rand(n) < 0.2] = -1
    elif pattern == "skip-even":
        ids = (torch.randint(0, max(m // 2, 1), (n,)) * 2 + 1).clamp(max=m - 1)
    elif pattern == "sparse":
        ids = torch.tensor([1 % m, m - 1, -1])[torch.randint(0, 3, (n,))]
    elif pattern == "shuffled":
        ids = torch.randperm(m)[torch.sort(torch.randint(0, m, (n,))).values]
    else:
        raise ValueError(pattern)
    return ids.to(device)


def make_inputs(n, k_in, k_out, dtype, device="cpu", *, transposed=False, integer=False):
    """``x [n, k_in]``, ``dy [n, k_out]``; ``integer`` values keep every fp32 sum exact;
    ``transposed`` gives column-major views (the kernels take any strides)."""

    def rand(rows, cols):
        if integer:
            return torch.randint(-2, 3, (rows, cols)).to(dtype)
        return torch.randn(rows, cols).to(dtype)

    if transposed:
        x, dy = rand(k_in, n).T, rand(k_out, n).T
    else:
        x, dy = rand(n, k_in), rand(n, k_out)
    return x.to(device), dy.to(device)


def absent_domains(ids: torch.Tensor, m: int) -> list[int]:
    present = set(ids.tolist())
    return [d for d in range(m) if d not in present]


def nvcc_path() -> str | None:
    """The CUDA compiler setup.py would use, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def extension_error() -> str | None:
    """Why ``rnb_kernels._C`` does not import, or None."""
    try:
        import rnb_kernels._C  # noqa: F401
    except ImportError as e:
        return f"rnb_kernels._C is not built ({e})"
    return None


class GemmShapes:
    """Records the inner (reduction) size of every ``mm`` / ``addmm`` run inside it (through
    the profiler, which also sees into the custom ops), so a test can tell a full ``dyᵀ x``
    over all ``N`` rows from per-domain products."""

    def __enter__(self):
        self._prof = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
        )
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        self.inner = []
        for ev in self._prof.events():
            if ev.name in ("aten::mm", "aten::addmm", "aten::addmm_"):
                a = ev.input_shapes[0] if ev.name == "aten::mm" else ev.input_shapes[1]
                self.inner.append(int(a[1]))
        return False
