"""The torch backend's folds on CPU tensors, through the compiled ``rnb_kernels._cpu`` when it
is built, else through ``index_add_`` (same sums, another summation order).

A fold adds every column (projected mode) or every element (sketch mode) of a float32 tensor
into the bucket its hash names; it is the one extra pass over ``dy`` that tracking costs. The
compiled loops (``csrc/cpu/fold.cpp``) are 2x faster than ``index_add_`` on the 2-core CPU of
``benchmarks/results/overhead_cpu.md`` (``[1024, 8192] -> 256`` buckets: 1.6 against 3.3 ms;
a 2M-element sketch tile: 1.7 against 3.0 ms). They serve CPU tensors with unit column
stride (other float dtypes are converted to float32 first, as ``index_add_`` needs too); set
``RNB_CPU_FOLDS=0`` to use ``index_add_`` everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator

import torch

__all__ = ["compiled_folds", "fold_columns", "fold_flat", "index_add_folds"]

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


def fold_columns(
    t: torch.Tensor, index: torch.Tensor, index32: torch.Tensor, width: int
) -> torch.Tensor:
    """float32 ``[N, width]``: ``out[:, index[c]] += t[:, c]`` for every column ``c``.

    Args:
        t: ``[N, K]`` float tensor, any device and strides.
        index: int64 ``[K]`` in ``[0, width)`` on ``t``'s device (the ``index_add_`` path).
        index32: the same values as int32 (the compiled path reads 4 bytes per column). Not
            range-checked here: callers pass the tracker's cached hash indices.
        width: buckets.

    Example:
        >>> idx = torch.tensor([1, 0, 1])
        >>> fold_columns(torch.ones(2, 3), idx, idx.int(), 2).tolist()
        [[1.0, 2.0], [1.0, 2.0]]
    """
    n, k = t.shape
    t = t if t.dtype == torch.float32 else t.float()  # both paths sum in float32
    if _compiled_ok(t, index32, k, width) and t.stride(1) == 1 and t.stride(0) >= k:
        out = torch.empty(n, width, dtype=torch.float32, device=t.device)
        _extension().fold_columns(t.data_ptr(), n, k, t.stride(0), index32.data_ptr(),
                                  out.data_ptr(), width)  # fmt: skip
        return out
    out = torch.zeros(n, width, dtype=torch.float32, device=t.device)
    return out.index_add_(1, index, t)


def fold_flat(
    t: torch.Tensor, index: torch.Tensor, index32: torch.Tensor, width: int
) -> torch.Tensor:
    """float32 ``[width]``: ``out[index[i]] += t.flatten()[i]`` for every element ``i``.

    Args:
        t: float tensor of ``numel == index.numel()``, any device.
        index, index32: int64 and int32 ``[numel]`` in ``[0, width)``, as in
            :func:`fold_columns`.
        width: buckets.

    Example:
        >>> idx = torch.tensor([2, 0, 2, 2])
        >>> fold_flat(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), idx, idx.int(), 3).tolist()
        [2.0, 0.0, 8.0]
    """
    t = t if t.dtype == torch.float32 else t.float()  # both paths sum in float32
    if _compiled_ok(t, index32, t.numel(), width) and t.is_contiguous():
        out = torch.empty(width, dtype=torch.float32, device=t.device)
        _extension().fold_flat(t.data_ptr(), t.numel(), index32.data_ptr(), out.data_ptr(), width)
        return out
    out = torch.zeros(width, dtype=torch.float32, device=t.device)
    return out.index_add_(0, index, t.reshape(-1))
