"""Host-side helpers shared by the Triton launchers (no kernels live here).

Nothing in this module validates values: the public ops did that before dispatching.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton

from ..._backends import triton_interpreter

# Triton autotunes per key; a fixed small config under the interpreter keeps CPU CI fast
# (the interpreter runs every program sequentially in numpy, so fewer, larger blocks win).
INTERPRET_SEGMENTED = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}
INTERPRET_GRAM = {"BLOCK_K": 32, "FOLD": 2}


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set *now* (read at call time, not import time)."""
    return triton_interpreter()


@functools.cache
def _interpreted(fn):
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


def runnable(kernel):
    """``kernel`` itself, or an interpreted copy when the interpreter was switched on after
    this module was imported (``@triton.jit`` decides JIT vs interpreter at decoration time).

    Our kernels call no other ``@triton.jit`` functions, which is what makes this copy valid.
    """
    if interpreting() and type(kernel).__name__ != "InterpretedFunction":
        return _interpreted(kernel.fn)
    return kernel


def interpreter_upcast(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands must be upcast to fp32 under the interpreter.

    Triton 3.x's interpreter multiplies bfloat16 blocks with ``np.matmul`` on their raw
    16-bit patterns (results off by ~1e10; float16 is fine). Upcasting bf16 operands to fp32
    is exact and gives what the tensor cores compute (exact products, fp32 accumulation);
    compiled kernels never take this path.
    """
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype, fp32: str) -> str:
    """``tl.dot`` input precision: 16-bit inputs go to tensor cores as they are; fp32 inputs
    must not silently drop to TF32 (Triton's default), so they get ``fp32`` ("ieee" or
    "tf32x3", both within fp32 tolerance of the float64 reference)."""
    return fp32 if dtype == torch.float32 else "tf32"


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton uses the current device), a no-op on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def num_sms(t: torch.Tensor) -> int:
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    # Interpreter: a handful of spans per Gram, each several folds long, so small test
    # shapes exercise both the span split and the fp32 -> fp64 fold.
    return 1


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
