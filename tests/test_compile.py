"""torch.compile of a tracked model: no graph breaks from the tracker (counted with
``torch._dynamo.explain`` and Dynamo's counters), ``fullgraph=True`` compiles, no
recompilation across micro-batches and contexts, and the statistics and ``param.grad`` equal
eager execution. Also the chunked fused cross-entropy under ``fullgraph=True``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from _tol import assert_close
from torch import nn
from torch._dynamo.utils import counters

from rnb_kernels.tracking import DomainGradientTracker

M = 3


class Net(nn.Module):
    def __init__(self, fused: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.fused = fused
        self.tracker = None

    def forward(self, x, t):
        h = torch.tanh(self.mid(torch.tanh(self.inp(x))))
        if self.fused:
            return self.tracker.fused_cross_entropy(h, t, reduction="sum", chunk_size=5)
        return F.cross_entropy(self.head(h).flatten(0, 1), t.flatten(), reduction="sum")


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(4, 5, 6, generator=g)
        t = torch.randint(0, 11, (4, 5), generator=g)
        out.append((x, t, torch.randint(-1, M, (4, 5), generator=g)))
    return out


def _run(model, tracker, fn, batches):
    for x, t, ids in batches:
        with tracker.domains(ids):
            fn(x, t).backward()
    x, t, _ = batches[0]
    tracker.record_target(fn(x, t))
    return {
        "gram": tracker.gram(),
        "alignment": tracker.target_alignment(),
        "counts": tracker.counts(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
    }


def _tracked(mode, fused=False, modules=("inp", "head")):
    model = Net(fused)
    tracker = DomainGradientTracker(
        model, M, modules=list(modules), mode=mode, sketch_dim=64, proj_dim=4
    )
    model.tracker = tracker
    return model, tracker


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("fused", [False, True], ids=["linear-head", "fused-ce-head"])
def test_the_tracker_causes_no_graph_breaks(fused):
    modules = ("inp", "mid", "head")
    model, tracker = _tracked("exact", fused, modules)
    x, t, ids = _batches(1)[0]
    with tracker.domains(ids):  # inside a context too: the forward reads no context state
        explained = torch._dynamo.explain(model)(x, t)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    assert not counters["graph_break"]


@pytest.mark.parametrize("mode", ["exact", "sketch", "projected"])
@pytest.mark.parametrize("fused", [False, True], ids=["linear-head", "fused-ce-head"])
def test_compiled_statistics_equal_eager(mode, fused):
    batches = _batches()
    eager_model, eager_tr = _tracked(mode, fused)
    eager = _run(eager_model, eager_tr, eager_model, batches)
    model, tracker = _tracked(mode, fused)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = _run(model, tracker, compiled, batches)
    for key in ("gram", "alignment"):
        assert_close(got[key], eager[key], torch.float32, f"{mode} {key}")
    assert torch.equal(got["counts"], eager["counts"])
    for name, g in got["grads"].items():
        assert_close(g, eager["grads"][name].double(), torch.float32, name)
    # One forward graph for every micro-batch and context (domains, record_target).
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_inductor_compiled_statistics_equal_eager():
    batches = _batches(2)
    eager_model, eager_tr = _tracked("exact")
    eager = _run(eager_model, eager_tr, eager_model, batches)
    model, tracker = _tracked("exact")
    got = _run(model, tracker, torch.compile(model, fullgraph=True), batches)
    assert_close(got["gram"], eager["gram"], torch.float32, "inductor gram")
    assert_close(tracker.domain_grads(), eager_tr.domain_grads().double(), torch.float32)


def test_compiled_backward_outside_a_context_is_plain():
    model, tracker = _tracked("exact")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, t, _ = _batches(1)[0]
    compiled(x, t).backward()
    ref = copy.deepcopy(Net())
    ref(x, t).backward()
    assert float(tracker.gram().abs().sum()) == 0.0
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad.double(), torch.float32, n)


def test_compiled_bypass_is_still_caught_by_the_weight_gradient():
    """Compiled, the forward bookkeeping is off; a fused loss reading the head's weight is
    still caught through the gradient the weight receives."""

    class Bypass(Net):
        def forward(self, x, t):
            h = torch.tanh(self.mid(torch.tanh(self.inp(x))))
            z = h.flatten(0, 1) @ self.head.weight.T
            return F.cross_entropy(z, t.flatten())

    model = Bypass()
    tracker = DomainGradientTracker(model, M, modules="head")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, t, ids = _batches(1)[0]
    with pytest.raises(RuntimeError, match="head.forward was never called"):
        with tracker.domains(ids):
            compiled(x, t).backward()


# ids without "cuda": that keyword marks a test as needing a GPU (conftest.py).
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"], ids=["ext", "triton", "torch"])
def test_backend_resolution_traces_without_graph_breaks(backend):
    """Resolving a backend inside a compiled region is a constant for Dynamo: the extension's
    import and its status checks never reach the tracer (a traced ``importlib`` call broke the
    graph of every compiled op call on the CUDA backend, found on an H200), even when nothing
    was resolved eagerly first."""
    from rnb_kernels.ops import _dispatch

    _dispatch._cache.clear()
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        ok = _dispatch.has_impl("gram", backend) and _dispatch.backend_available(backend)
        return x + 1 if ok else x - 1

    want = _dispatch.has_impl("gram", backend) and _dispatch.backend_available(backend)
    assert torch.equal(f(torch.zeros(2)), torch.full((2,), 1.0 if want else -1.0))
