"""Domain ids: validation (once per micro-batch) and per-sample counts, without host syncs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["per_sample_counts", "validate_domain_ids"]


def validate_domain_ids(
    ids: Any,
    num_domains: int,
    name: str = "domain_ids",
    *,
    mask: bool = False,
    check_values: bool = True,
) -> torch.Tensor:
    """Check per-sample ``[B]`` or per-token ``[B, T]`` domain ids and return them as int64.

    Args:
        ids: integer tensor / array / list with values in ``[-1, num_domains)`` (``-1`` =
            ignore), or, with ``mask=True``, a bool tensor (``True`` -> domain 0, ``False`` ->
            ``-1``).
        num_domains: ``m``.
        name: the argument name used in error messages.
        check_values: check the value range now (one reduction; a host sync when ``ids`` live
            on a GPU). The tracker passes ``False`` for GPU ids and checks them at the round's
            end instead (see ``DomainGradientTracker(id_check=...)``).

    Returns:
        int64 tensor of the same shape and device.

    Raises:
        TypeError: not a tensor-like of integers (or bools with ``mask=True``).
        ValueError: wrong number of dimensions, empty, or values out of range.

    Example:
        >>> validate_domain_ids([0, 2, -1], num_domains=3).tolist()
        [0, 2, -1]
    """
    if isinstance(ids, np.ndarray | list | tuple):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be an integer tensor, got {type(ids).__name__}") from e
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if mask:
        if ids.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got {ids.dtype}")
        ids = torch.where(ids, 0, -1).to(torch.int64)
    elif ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must have an integer dtype, got {ids.dtype}")
    if ids.dim() not in (1, 2):
        raise ValueError(f"{name} must be [batch] or [batch, seq], got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty")
    ids = ids.to(torch.int64)
    if check_values and not mask:
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        if lo < -1 or hi >= num_domains:
            raise ValueError(
                f"{name} must lie in [-1, num_domains={num_domains}), found values in [{lo}, {hi}]"
            )
    return ids


def per_sample_counts(ids: torch.Tensor, num_domains: int) -> torch.Tensor:
    """float64 ``[m]``: samples per domain. A row of per-token ids counts once in every domain
    that appears in it (a packed row with two documents counts in both).

    Scatter-based, so it never syncs (``torch.bincount`` sizes its output on the host).
    """
    if ids.dim() == 1:
        ids = ids[:, None]
    present = torch.zeros(ids.shape[0], num_domains + 1, dtype=torch.float64, device=ids.device)
    present.scatter_(1, ids + 1, 1.0)
    return present[:, 1:].sum(0)
