"""The tracked backward makes no host synchronisation: no Tensor.item/tolist/bool/int/float/
numpy call from the package's own code while a micro-batch runs (ids on a device would
otherwise stall the stream and forbid CUDA-graph capture). The torch backend reads segment
offsets on the host by design (documented), so this runs the Triton backend (interpreter on
the CPU) with the device-style deferred id check."""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from torch import nn  # noqa: E402

from rnb_kernels.tracking import DomainGradientTracker  # noqa: E402

_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
_PKG = os.path.dirname(sys.modules["rnb_kernels"].__file__)


class _HostReadCounter:
    """Patches Tensor methods that read device values on the host; counts calls whose caller is
    a file of the rnb_kernels package (Triton's interpreter and torch internals don't count)."""

    def __init__(self):
        self.calls: list[str] = []

    def __enter__(self):
        self._saved = {}
        for name in _HOST_READS:
            orig = getattr(torch.Tensor, name)
            self._saved[name] = orig

            def wrapped(t, *a, _orig=orig, _name=name, **k):
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(_PKG):
                    self.calls.append(f"{_name} from {caller}:{sys._getframe(1).f_lineno}")
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 24))


@pytest.mark.parametrize("mode", ["exact", "projected", "sketch"])
@pytest.mark.parametrize("per_token", [False, True])
def test_tracked_micro_batch_makes_no_host_reads(mode, per_token):
    model = _model()
    tracker = DomainGradientTracker(
        model, 5, modules=["0", "2"], mode=mode, sketch_dim=64, proj_dim=8, backend="triton",
        id_check="deferred",
    )  # fmt: skip
    x = torch.randn(4, 3, 8)
    ids = torch.tensor([[0, 1, -1], [4, 4, 2], [1, 1, 1], [-1, 3, 0]])
    ids = ids if per_token else ids[:, 0]
    for _ in range(2):  # the second micro-batch reuses every cache
        with _HostReadCounter() as counter:
            with tracker.domains(ids):
                model(x).square().sum().backward()
        assert counter.calls == [], counter.calls
    # The statistics are still right: the reads at the round's end do the host work.
    assert tracker.counts().sum() > 0


def test_counter_sees_a_host_read_from_package_code():
    """The instrument works: the torch backend's documented host read of segment offsets."""
    model = _model()
    tracker = DomainGradientTracker(model, 5, mode="exact", backend="torch")
    with _HostReadCounter() as counter:
        with tracker.domains(torch.tensor([0, 1, 2, 3])):
            model(torch.randn(4, 8)).sum().backward()
    assert any("tolist" in c and "grouping.py" in c for c in counter.calls), counter.calls


def test_balancer_validates_ids_once_per_micro_batch(monkeypatch):
    import rnb_kernels as rnb
    from rnb_kernels.tracking import ids as ids_mod

    calls = []
    orig = ids_mod.validate_domain_ids

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr("rnb_kernels.tracking.tracker.validate_domain_ids", counting)
    monkeypatch.setattr("rnb_kernels.balancer.validate_domain_ids", counting)
    model = _model()
    balancer = rnb.Balancer(model, rnb.RnB(num_domains=5, eval_proportions=[1] * 5))
    with balancer.step(torch.tensor([0, 1, 2, 3])) as s:
        out = model(torch.randn(4, 8))
        s.record_loss(out.square().mean(1).detach())
        out.sum().backward()
    assert len(calls) == 1
