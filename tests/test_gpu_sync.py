"""On a GPU, a tracked micro-batch never synchronises the host with the device.

``torch.cuda.set_sync_debug_mode("error")`` makes every synchronising CUDA call raise (a
``.item()``, a ``nonzero``, a blocking copy to the host ...). A tracked forward + backward runs
under it, for every mode and GPU backend, directly on the tracker and through the Balancer
(ids validated once, loss recorded on the device). The round's statistics read afterwards may
sync; that is outside the hot path. CPU machines check the same property with a host-read
counter (test_hot_path.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import rnb_kernels as rnb
from rnb_kernels.ops._dispatch import has_impl
from rnb_kernels.tracking import DomainGradientTracker
from rnb_kernels.tracking.slot import MODE_OPS

pytestmark = pytest.mark.cuda


@contextlib.contextmanager
def _sync_is_an_error():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 200)).cuda()


def _cases():
    for mode, op in MODE_OPS.items():
        for backend in ("triton", "cuda"):
            if has_impl(op, backend):
                yield pytest.param(mode, backend, id=f"{mode}-{backend}")


def _skip_if_unavailable(backend: str) -> None:
    status = rnb.backends()[backend]
    if not status.available:
        pytest.skip(f"{backend} backend unavailable: {status.reason}")


@pytest.mark.parametrize("per_token", [False, True], ids=["per-sample", "per-token"])
@pytest.mark.parametrize("mode,backend", list(_cases()))
def test_tracked_micro_batch_does_not_sync(mode, backend, per_token):
    _skip_if_unavailable(backend)
    model = _model()
    tracker = DomainGradientTracker(
        model, 7, modules=["0", "2"], mode=mode, sketch_dim=512, proj_dim=32, backend=backend
    )
    x = torch.randn(6, 5, 64, device="cuda")
    ids = torch.randint(-1, 7, (6, 5) if per_token else (6,), device="cuda")
    # The first micro-batch compiles kernels and fills caches; the next ones are the hot path.
    with tracker.domains(ids):
        model(x).square().mean().backward()
    with _sync_is_an_error():
        for _ in range(2):
            with tracker.domains(ids):
                model(x).square().mean().backward()
    counts = tracker.counts()  # the round's read: allowed to sync
    assert counts.sum().item() > 0
    assert torch.isfinite(tracker.gram()).all()


@pytest.mark.parametrize("mode,backend", list(_cases()))
def test_balancer_step_does_not_sync(mode, backend):
    _skip_if_unavailable(backend)
    model = _model()
    mixer = rnb.RnB(num_domains=7, eval_proportions=[1.0] * 7)
    balancer = rnb.Balancer(
        model, mixer, update_every=4,
        tracker=dict(mode=mode, backend=backend, sketch_dim=512, proj_dim=32),
    )  # fmt: skip
    x = torch.randn(6, 64, device="cuda")
    ids = torch.randint(0, 7, (6,), device="cuda")

    def micro_batch():
        with balancer.step(ids) as s:
            out = model(x)
            loss = out.square().mean(1)
            s.record_loss(loss.detach())
            loss.mean().backward()

    micro_batch()
    with _sync_is_an_error():
        micro_batch()
        micro_batch()
