"""Thin helpers over ``torch.distributed`` used by the tracker, the sampler and the balancer.

Every helper is a no-op (or returns the single-process answer) when ``torch.distributed`` is not
available or not initialised, so the same training script runs on one process and on many.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

logger = logging.getLogger(__name__)


def is_initialized() -> bool:
    """True when a default process group exists."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size(group=None) -> int:
    """Number of ranks in ``group`` (default: all; 1 without an initialised process group)."""
    return torch.distributed.get_world_size(group) if is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    return torch.distributed.get_rank() if is_initialized() else 0


def _comm_device(t: torch.Tensor) -> torch.device:
    """The device a collective on ``t`` must run on for the current backend.

    NCCL only reduces CUDA tensors and Gloo only CPU ones (for the ops used here), so a tensor on
    the wrong side is staged through a copy.
    """
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if "gloo" in str(backend) else t.device


def all_reduce_sum_(tensors: Iterable[torch.Tensor], group=None) -> None:
    """Sum each tensor over the ranks of ``group`` (default: all), in place. No-op on a single
    process or a one-rank group.

    Args:
        tensors: tensors of identical shapes and dtypes on every rank of ``group`` (same order
            everywhere).
        group: a ``ProcessGroup`` (e.g. a DeviceMesh dimension's ``get_group()``) or ``None``.
    """
    if not is_initialized() or world_size(group) == 1:
        return
    for t in tensors:
        dev = _comm_device(t)
        if t.device == dev and t.is_contiguous():
            torch.distributed.all_reduce(t, group=group)
        else:
            staged = t.to(dev).contiguous()
            torch.distributed.all_reduce(staged, group=group)
            t.copy_(staged)


def check_consistent(values: torch.Tensor, name: str) -> None:
    """Verify that ``values`` is bit-identical on every rank; raise ``RuntimeError`` if not.

    Two all-reduces (MAX and MIN of the float64 values): equal results mean every rank holds the
    same numbers. ``-0.0``/``+0.0`` compare equal, which is harmless for mixture weights.

    Example:
        >>> check_consistent(torch.tensor([0.5, 0.5], dtype=torch.float64), "weights")
    """
    if not is_initialized() or world_size() == 1:
        return
    v = values.detach().to(torch.float64).reshape(-1)
    hi, lo = v.clone(), v.clone()
    dev = _comm_device(v)
    hi, lo = hi.to(dev), lo.to(dev)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        diff = float((hi - lo).abs().max())
        raise RuntimeError(
            f"{name} differ across ranks (max spread {diff:.3e}) on rank {rank()}; every rank "
            "must feed identical statistics to the mixer"
        )
