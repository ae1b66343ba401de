"""group_rows / host_segments: the one row-grouping helper every backend uses."""

from __future__ import annotations

import pytest
import torch
from _optest import BACKENDS, device_of

from rnb_kernels.ops.grouping import group_rows, host_segments

# The index dtype each backend's launcher asks for (Triton takes int32 while N < 2**31).
INDEX_DTYPE = {"torch": torch.int64, "triton": torch.int32, "cuda": torch.int64}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n", [0, 1, 37, 1000])
def test_group_rows_is_a_stable_sort_with_segment_offsets(n, id_dtype, backend):
    m = 5
    ids = torch.randint(-1, m, (n,), dtype=id_dtype)
    order, bounds = group_rows(ids.to(device_of(backend)), m, INDEX_DTYPE[backend])
    order, bounds = order.cpu(), bounds.cpu()
    assert order.dtype == INDEX_DTYPE[backend] and bounds.dtype == INDEX_DTYPE[backend]
    assert bounds.shape == (m + 2,)
    # Brute force: rows of each id in original order, -1 first.
    expect = [i for d in range(-1, m) for i in range(n) if int(ids[i]) == d]
    assert order.tolist() == expect
    assert int(bounds[0]) == 0 and int(bounds[-1]) == n
    for s in range(m + 1):
        seg = order[bounds[s] : bounds[s + 1]].long()
        assert bool((ids[seg] == s - 1).all())
    assert [d for d, _, _ in host_segments(bounds)] == sorted({int(v) for v in ids} - {-1})


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_by_domain_known_answer(backend):
    ids = torch.tensor([2, -1, 0, 2, 0, -1, 2], device=device_of(backend))
    order, bounds = group_rows(ids, 4, index_dtype=INDEX_DTYPE[backend])
    assert order.tolist() == [1, 5, 2, 4, 0, 3, 6]
    assert bounds.tolist() == [0, 2, 4, 4, 7, 7]
    assert host_segments(bounds) == [(0, 2, 4), (2, 4, 7)]


def test_host_runs_groups_contiguous_runs_or_declines():
    from rnb_kernels.ops.grouping import host_runs

    ids = torch.tensor([2, 2, 2, -1, -1, 0, 0, 2, 2])
    assert host_runs(ids, min_mean_run=2) == [(0, [(5, 7)]), (2, [(0, 3), (7, 9)])]
    assert host_runs(ids, min_mean_run=3) is None  # 4 runs over 9 rows: too fragmented
    assert host_runs(torch.tensor([], dtype=torch.int64)) == []
    assert host_runs(torch.full((64,), -1), min_mean_run=32) == []
