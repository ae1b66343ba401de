"""Shared pytest set-up: a fixed seed for every test and clean skips of `cuda` tests."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def _skip_reason(item) -> str | None:
    """`cuda` tests need a CUDA device; those of the compiled backend also need rnb_kernels._C
    (Triton's GPU tests do not)."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if item.path.name == "test_cuda_ops.py":
        try:
            import rnb_kernels._C  # noqa: F401
        except ImportError as e:
            return f"rnb_kernels._C is not built ({e})"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords:
            reason = _skip_reason(item)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
