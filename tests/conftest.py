"""Shared pytest set-up.

* A fixed seed for every test; Triton's interpreter on machines without a GPU (set before
  anything imports Triton), so the ``triton`` backend runs on CPU tensors.
* Skips of hardware-gated tests: ``cuda``-marked tests need a CUDA device, and those that run
  the compiled backend also need ``rnb_kernels._C``; a ``triton``-backend test needs Triton.
* **Strict mode** (``RNB_STRICT=1``, what CI runs): a test that would skip for any reason but
  missing hardware fails instead, saying what is missing (a corpus, an extra, Triton, ``_C``
  on a machine with nvcc ...). Only tests marked ``cuda`` (no GPU here) or ``hardware`` (they
  check the behaviour of the *other* kind of machine) may skip.
* The end of the run lists the skips counted by reason.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _optest import extension_error  # noqa: E402

STRICT = os.environ.get("RNB_STRICT", "0") not in ("", "0")
NO_GPU = "no CUDA device (torch.cuda.is_available() is False)"
# Skip reasons that describe the machine's hardware: the only ones strict mode accepts.
HARDWARE_MARKERS = ("cuda", "hardware")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def poisoned(monkeypatch):
    """Every float ``torch.empty`` (dW, Gram partials) and every output the CUDA launchers
    allocate starts as NaN: a kernel that skips a write cannot pass."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point() and not t.requires_grad:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)
    from rnb_kernels.ops import cuda as cuda_ops

    real = cuda_ops._empty
    monkeypatch.setattr(cuda_ops, "_empty", lambda *a, **k: real(*a, **k).fill_(float("nan")))


# ---------------------------------------------------------------------------- what can run


def _backend_param(item) -> str | None:
    spec = getattr(item, "callspec", None)
    return None if spec is None else spec.params.get("backend")


def _skip_reason(item) -> str | None:
    """Why this test cannot run on this machine (None: it can)."""
    backend = _backend_param(item)
    if "cuda" in item.keywords:
        if not torch.cuda.is_available():
            return NO_GPU
        if backend == "cuda" or item.path.name == "test_op_dispatch.py":
            return extension_error()
    if backend == "triton":
        from rnb_kernels import backends

        status = backends()["triton"]
        if not status.available:
            return f"triton backend unavailable: {status.reason}"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = _skip_reason(item)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


# ---------------------------------------------------------------------------- strict mode


def _is_hardware_skip(item, reason: str) -> bool:
    if reason == NO_GPU:
        return True
    return any(m in item.keywords for m in HARDWARE_MARKERS) and "not built" not in reason


def _skip_text(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _strict_message(reason: str) -> str:
    return (
        f"strict mode (RNB_STRICT=1): this test would have skipped: {reason}\n"
        "Everything but GPU hardware must be present in CI: `make setup` installs the extras, "
        "`make data` the corpora (fortunes via apt, the BIG-bench archive via pip download), "
        "and setup.py builds rnb_kernels._C when nvcc is found."
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if STRICT and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = _skip_text(rep.longrepr)
        if not _is_hardware_skip(item, reason):
            rep.outcome = "failed"
            rep.longrepr = _strict_message(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if STRICT and rep.skipped:  # a module-level importorskip / skip
        rep.outcome = "failed"
        rep.longrepr = _strict_message(_skip_text(rep.longrepr))


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    counts = Counter(_skip_text(r.longrepr) for r in skipped)
    tr = terminalreporter
    tr.section(f"skips by reason ({len(skipped)} in all{', strict mode' if STRICT else ''})")
    for reason, n in counts.most_common():
        tr.write_line(f"{n:5d}  {reason}")
