"""Rows grouped by domain: the one helper every backend uses.

``group_rows`` never synchronises with the host: it is a stable sort of the ids plus a
``searchsorted`` of the segment edges (``torch.bincount`` would sync on CUDA to size its output).
The kernels then gather rows of ``x`` and ``dy`` through ``order``; no ``[N, K]`` tensor is
permuted. Only the torch backend reads the offsets on the host (:func:`host_segments`), which is
one sync on a GPU and free on the CPU.
"""

from __future__ import annotations

import torch

__all__ = ["group_rows", "host_runs", "host_segments"]

# Contiguous runs are multiplied in place when they average at least this many rows; shorter
# runs make GEMMs too small to pay for skipping the gather.
MIN_MEAN_RUN = 32


def group_rows(
    domain_ids: torch.Tensor, num_domains: int, index_dtype: torch.dtype = torch.int64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable domain-grouped row order and segment offsets.

    Args:
        domain_ids: int32/int64 ``[N]`` in ``[-1, num_domains)``.
        num_domains: ``m``.
        index_dtype: dtype of both outputs (the Triton kernels take int32 when ``N < 2**31``).

    Returns:
        ``(order, bounds)``: ``order`` ``[N]`` permutation putting rows of one domain together
        (ignored ``-1`` rows first, original order kept within a domain) and ``bounds``
        ``[m + 2]`` offsets: segment ``s`` (domain ``s - 1``; segment 0 holds the ``-1`` rows)
        is ``order[bounds[s]:bounds[s + 1]]``.

    Example:
        >>> order, bounds = group_rows(torch.tensor([1, -1, 0, 1]), 3)
        >>> order.tolist(), bounds.tolist()
        ([1, 2, 0, 3], [0, 1, 2, 4, 4])
    """
    sorted_ids, order = torch.sort(domain_ids, stable=True)
    edges = torch.arange(-1, num_domains + 1, dtype=sorted_ids.dtype, device=sorted_ids.device)
    bounds = torch.searchsorted(sorted_ids, edges)
    return order.to(index_dtype), bounds.to(index_dtype)


def host_segments(bounds: torch.Tensor) -> list[tuple[int, int, int]]:
    """``[(domain, lo, hi), ...]`` for the non-empty domains (reads ``bounds`` on the host)."""
    b = bounds.tolist()
    return [(s - 1, b[s], b[s + 1]) for s in range(1, len(b) - 1) if b[s + 1] > b[s]]


def host_runs(
    domain_ids: torch.Tensor, min_mean_run: int = MIN_MEAN_RUN
) -> list[tuple[int, list[tuple[int, int]]]] | None:
    """Row ranges of each present domain as runs of equal ids in the *original* order, or
    ``None`` when the runs are too short to use directly (then gather with :func:`group_rows`).

    Per-sample ids broadcast over a sequence make one run per sample, so the torch backend can
    multiply views of ``x`` and ``dy`` without copying ``[N, K]`` rows into domain order. Reads
    the run boundaries on the host (one sync on a GPU, like :func:`host_segments`).

    Returns:
        ``[(domain, [(lo, hi), ...]), ...]`` for the domains present (``-1`` runs dropped), in
        increasing domain order.

    Example:
        >>> host_runs(torch.tensor([1, 1, 0, 0, 1, 1]), min_mean_run=2)
        [(0, [(2, 4)]), (1, [(0, 2), (4, 6)])]
    """
    n = domain_ids.shape[0]
    if n == 0:
        return []
    starts = (domain_ids[1:] != domain_ids[:-1]).nonzero().flatten() + 1
    if (starts.numel() + 1) * min_mean_run > n:
        return None
    edges = [0, *starts.tolist(), n]
    first = domain_ids[torch.tensor(edges[:-1], device=domain_ids.device)].tolist()
    spans: dict[int, list[tuple[int, int]]] = {}
    for d, lo, hi in zip(first, edges[:-1], edges[1:]):
        if d >= 0:
            spans.setdefault(d, []).append((lo, hi))
    return sorted(spans.items())
