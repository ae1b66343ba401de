"""The torch backend's folds on CPU tensors, through the compiled ``rnb_kernels._cpu`` when it
is built, else through ``index_add_`` (same sums, another summation order).

A fold adds every column (projected mode) or every element (sketch mode) of a float32 tensor
into the bucket its hash names; it is the one extra pass over ``dy`` that tracking costs. The
compiled loops (``csrc/cpu/fold.cpp``) serve CPU tensors with unit column stride (other float
dtypes are converted to float32 first, as ``index_add_`` needs too); set ``RNB_CPU_FOLDS=0``
to use ``index_add_`` everywhere. Measured on the 2-core CPU of
``benchmarks/results/overhead_cpu.md`` (``[1024, 8192]`` into 128 signed buckets and 64 kept
columns, right after a torch GEMM): ``index_add_`` and its fix-ups ~3.5 ms, the compiled fold
on one thread 2.2 ms, on PyTorch's two OpenMP workers 1.4-1.6 ms.

Both folds use PyTorch's intra-op threads (``torch.get_num_threads()``) when the module shares
PyTorch's OpenMP runtime, which :func:`fold_threads` checks once; otherwise one thread. Their
results do not depend on the number of threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch

__all__ = [
    "ColumnHash",
    "signed_route",
    "compiled_folds",
    "fold_columns",
    "fold_flat",
    "fold_threads",
    "index_add_folds",
]

_forced_index_add = False


@functools.lru_cache(maxsize=1)
def _extension():
    if os.environ.get("RNB_CPU_FOLDS", "1") in ("", "0"):
        return None
    try:
        return importlib.import_module("rnb_kernels._cpu")
    except ImportError:  # not built (RNB_SKIP_CPU_BUILD or no C++ compiler at install time)
        return None


def compiled_folds() -> bool:
    """Whether the folds run through ``rnb_kernels._cpu`` here (built, not disabled by
    ``RNB_CPU_FOLDS=0``, not inside :func:`index_add_folds`)."""
    return not _forced_index_add and _extension() is not None


@functools.lru_cache(maxsize=1)
def _shares_torch_openmp() -> bool:
    ext = _extension()
    ours = ext.openmp_symbol() if ext is not None else 0
    if not ours:
        return False
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        # dlsym through libtorch_cpu's handle resolves in its own dependencies: the OpenMP
        # runtime PyTorch's parallel ops use. Loaded already, so this only takes a reference.
        theirs = ctypes.cast(ctypes.CDLL(lib).omp_get_max_threads, ctypes.c_void_p).value
    except (OSError, AttributeError):  # another platform, or PyTorch built without OpenMP
        return False
    return theirs == ours


def fold_threads() -> int:
    """Threads the compiled folds run on: ``torch.get_num_threads()`` when
    ``rnb_kernels._cpu`` shares PyTorch's OpenMP runtime (its workers then take the blocks of
    rows), else 1. A second runtime's threads would fight PyTorch's spinning workers."""
    return torch.get_num_threads() if _shares_torch_openmp() else 1


@contextlib.contextmanager
def index_add_folds() -> Iterator[None]:
    """Within the block every fold goes through ``index_add_`` (A/B timing, debugging).

    Example:
        >>> with index_add_folds():
        ...     compiled_folds()
        False
    """
    global _forced_index_add
    before, _forced_index_add = _forced_index_add, True
    try:
        yield
    finally:
        _forced_index_add = before


def signed_route(bucket: torch.Tensor, sign: torch.Tensor, width: int) -> torch.Tensor:
    """int64 ``bucket + width · [sign < 0]``: a signed hash as an unsigned one over ``2 · width``
    buckets, negative items in the second block (one unsigned fold, then a subtraction of the
    two blocks, instead of a ``t * sign`` pass).

    Example:
        >>> signed_route(torch.tensor([1, 0]), torch.tensor([1.0, -1.0]), 2).tolist()
        [1, 2]
    """
    return bucket.to(torch.int64) + width * (sign < 0).to(torch.int64)


class ColumnHash(NamedTuple):
    """A (signed) count-sketch of ``K`` columns into ``width`` buckets, in the forms the two
    fold paths read; build it once per hash with :meth:`make` and cache it.

    Attributes:
        width: buckets.
        bucket32: int32 ``[K]`` bucket of each column, in ``[0, width)`` (compiled loops).
        sign: float32 ``[K]`` of ``±1``, or ``None`` for an unsigned fold.
        route: int64 ``[K]`` (``index_add_``): the bucket, or with ``sign`` its
            :func:`signed_route`.
    """

    width: int
    bucket32: torch.Tensor
    sign: torch.Tensor | None
    route: torch.Tensor

    @classmethod
    def make(cls, bucket: torch.Tensor, sign: torch.Tensor | None, width: int) -> ColumnHash:
        """From int64 ``bucket`` ``[K]`` in ``[0, width)`` and optional ``±1`` ``sign``
        ``[K]``, on the device of the tensors to fold.

        Example:
            >>> h = ColumnHash.make(torch.tensor([1, 0, 1]), torch.tensor([1.0, -1.0, -1.0]), 2)
            >>> h.route.tolist()
            [1, 2, 3]
        """
        bucket = bucket.to(torch.int64)
        if sign is None:
            return cls(width, bucket.to(torch.int32), None, bucket)
        sign = sign.to(torch.float32).contiguous()
        return cls(width, bucket.to(torch.int32), sign, signed_route(bucket, sign, width))


def _compiled_ok(t: torch.Tensor, index32: torch.Tensor, n_index: int, width: int) -> bool:
    # O(1) checks only: the loops read n_index contiguous int32 values and float32 rows.
    return (
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.numel() > 0
        and index32.dtype == torch.int32
        and index32.is_contiguous()
        and index32.numel() == n_index
        and width < 2**31
        and compiled_folds()
    )


def _fold_index_add(t: torch.Tensor, h: ColumnHash, keep: torch.Tensor | None) -> torch.Tensor:
    n, w = t.shape[0], h.width
    blocks = w if h.sign is None else 2 * w
    if keep is None:
        folded = torch.zeros(n, blocks, dtype=torch.float32, device=t.device)
        folded.index_add_(1, h.route, t)
    else:
        # The kept columns are folded into columns of their own (one index_add_ also gathers
        # them), then added to their buckets from that small copy.
        q = keep.shape[0]
        route = h.route.clone()
        route[keep] = torch.arange(blocks, blocks + q, device=t.device)
        folded = torch.zeros(n, blocks + q, dtype=torch.float32, device=t.device)
        folded.index_add_(1, route, t)
        folded[:, :blocks].index_add_(1, h.route.index_select(0, keep), folded[:, blocks:])
    if h.sign is None:
        return folded
    out = torch.empty(n, w + folded.shape[1] - blocks, dtype=torch.float32, device=t.device)
    torch.sub(folded[:, :w], folded[:, w:blocks], out=out[:, :w])
    out[:, w:] = folded[:, blocks:]
    return out


def fold_columns(t: torch.Tensor, h: ColumnHash, keep: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[N, width + q]``: ``out[:, bucket[c]] += sign[c] · t[:, c]`` for every column
    ``c`` (``sign = 1`` for an unsigned hash), beside the ``q`` columns ``t[:, keep]`` as they
    are.

    Args:
        t: ``[N, K]`` float tensor, any device and strides.
        h: the hash of ``t``'s ``K`` columns, on ``t``'s device (not range-checked here:
            callers pass the tracker's cached hashes).
        keep: int64 ``[q]`` distinct columns of ``t`` to copy out as well (projected mode's
            exact rows), on ``t``'s device.

    Compiled (CPU tensors with unit column stride): one pass over ``t`` does it all, on
    :func:`fold_threads` threads, with a result that does not depend on their number. Else
    ``index_add_``.

    Example:
        >>> h = ColumnHash.make(torch.tensor([1, 0, 1]), torch.tensor([1.0, 1.0, -1.0]), 2)
        >>> fold_columns(torch.tensor([[1.0, 2.0, 4.0]]), h, keep=torch.tensor([2])).tolist()
        [[2.0, -3.0, 4.0]]
    """
    n, k = t.shape
    t = t if t.dtype == torch.float32 else t.float()  # both paths sum in float32
    q = 0 if keep is None else keep.shape[0]
    if _compiled_ok(t, h.bucket32, k, h.width + q) and t.stride(1) == 1 and t.stride(0) >= k:
        out = torch.empty(n, h.width + q, dtype=torch.float32, device=t.device)
        keep32 = None if keep is None else keep.to(torch.int32).contiguous()
        _extension().fold_columns(
            t.data_ptr(), n, k, t.stride(0), h.bucket32.data_ptr(),
            0 if h.sign is None else h.sign.data_ptr(), h.width,
            0 if keep32 is None else keep32.data_ptr(), q, out.data_ptr(), out.stride(0),
            fold_threads(),
        )  # fmt: skip
        return out
    return _fold_index_add(t, h, keep)


def fold_flat(
    t: torch.Tensor, index: torch.Tensor, index32: torch.Tensor, width: int
) -> torch.Tensor:
    """float32 ``[width]``: ``out[index[i]] += t.flatten()[i]`` for every element ``i``.

    Args:
        t: float tensor of ``numel == index.numel()``, any device.
        index: int64 ``[numel]`` in ``[0, width)`` on ``t``'s device (the ``index_add_`` path).
        index32: the same values as int32 (the compiled loop; not range-checked here).
        width: buckets.

    Example:
        >>> idx = torch.tensor([2, 0, 2, 2])
        >>> fold_flat(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), idx, idx.int(), 3).tolist()
        [2.0, 0.0, 8.0]
    """
    t = t if t.dtype == torch.float32 else t.float()  # both paths sum in float32
    if _compiled_ok(t, index32, t.numel(), width) and t.is_contiguous():
        out = torch.empty(width, dtype=torch.float32, device=t.device)
        _extension().fold_flat(t.data_ptr(), t.numel(), index32.data_ptr(), out.data_ptr(), width,
                               fold_threads())  # fmt: skip
        return out
    out = torch.zeros(width, dtype=torch.float32, device=t.device)
    return out.index_add_(0, index, t.reshape(-1))
