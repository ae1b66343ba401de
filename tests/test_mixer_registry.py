"""Adding a mixer is one file: a toy mixer and a toy statistic, defined here alone, driven
through the Balancer (docs/mixers.md walks through the same steps)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnb_kernels as rnb
from rnb_kernels.balancer import needs_tracker, unregister_statistic
from rnb_kernels.mixing import Mixer, register_mixer, unregister_mixer


@pytest.fixture
def toy_registered():
    """Register a toy statistic and two toy mixers; remove them afterwards."""

    @rnb.register_statistic("worst_domain")
    def _worst(balancer):
        losses = balancer.domain_losses()
        return int(torch.nan_to_num(losses, nan=-float("inf")).argmax())

    @register_mixer
    class Greedy(Mixer):
        """All weight on the domain with the highest mean training loss this round."""

        name = "toy-greedy"
        requires = ("worst_domain",)

        def update(self, worst_domain):
            w = torch.zeros(self.num_domains, dtype=torch.float64)
            w[worst_domain] = 1.0
            return self._commit(w)

    @register_mixer
    class GramDiag(Mixer):
        """Weights proportional to the per-domain squared gradient norms (a gradient statistic,
        so the Balancer must build a tracker on its own)."""

        name = "toy-gramdiag"
        requires = ("gram",)

        def update(self, gram):
            d = torch.as_tensor(gram, dtype=torch.float64).diagonal()
            return self._commit(d / d.sum())

    yield Greedy, GramDiag
    unregister_mixer("toy-greedy")
    unregister_mixer("toy-gramdiag")
    unregister_statistic("worst_domain")


def _data(g, m=3, n=24):
    """Domain d's targets have scale d + 1: domain m-1 has the largest loss and gradients."""
    x = torch.randn(n, 5, generator=g)
    ids = torch.arange(n) % m
    y = torch.randn(n, 2, generator=g) * (ids[:, None] + 1).float() * 3
    return x, y, ids


def test_toy_mixer_and_statistic_run_through_the_balancer(toy_registered):
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 2)
    mixer = rnb.build_mixer("toy-greedy", rnb.MixingContext(num_domains=3, update_every=2))
    balancer = rnb.Balancer(model, mixer)
    assert balancer.tracker is None and not needs_tracker(mixer)  # a loss statistic
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # frozen: losses stay known
    x, y, ids = _data(g)
    expect = torch.stack([((model(x) - y) ** 2).sum(1)[ids == d].mean() for d in range(3)])
    for _ in range(2):
        with balancer.step(ids) as s:
            loss = ((model(x) - y) ** 2).sum(1)
            s.record_loss(loss)
            loss.mean().backward()
        w = balancer.optimizer_step(opt)
    assert w is not None  # the round closed after update_every=2 steps
    assert int(w.argmax()) == int(expect.argmax()) == 2
    assert w.tolist() == [0.0, 0.0, 1.0]


def test_gradient_toy_mixer_gets_a_tracker_and_the_true_gram(toy_registered):
    g = torch.Generator().manual_seed(1)
    model = nn.Linear(5, 2, bias=False)
    mixer = rnb.build_mixer("toy-gramdiag", 3)
    balancer = rnb.Balancer(model, mixer)
    assert balancer.tracker is not None and needs_tracker(mixer)
    x, y, ids = _data(g)
    with balancer.step(ids):
        ((model(x) - y) ** 2).sum().backward()
    w = balancer.update()
    # Independent float64 ground truth: one gradient per domain, no tracker.
    norms = []
    for d in range(3):
        xd, yd = x[ids == d].double(), y[ids == d].double()
        wd = model.weight.detach().double().requires_grad_()
        (gd,) = torch.autograd.grad(((xd @ wd.T - yd) ** 2).sum(), wd)
        norms.append(float((gd**2).sum()))
    expect = torch.tensor(norms, dtype=torch.float64) / sum(norms)
    torch.testing.assert_close(w, expect, rtol=1e-5, atol=0)


def test_unknown_statistic_and_duplicate_names_are_clear_errors(toy_registered):
    class Needs(Mixer):
        requires = ("no-such-stat",)

        def update(self, **stats):
            return self.weights

    with pytest.raises(ValueError, match=r"unknown statistics \['no-such-stat'\]"):
        rnb.Balancer(nn.Linear(2, 2), Needs(num_domains=2))
    with pytest.raises(ValueError, match="'toy-greedy' is taken"):

        @register_mixer
        class Other(Mixer):
            name = "toy-greedy"

            def update(self, **stats):
                return self.weights

    with pytest.raises(ValueError, match="already registered"):
        rnb.register_statistic("gram")(lambda b: None)


def test_register_mixer_checks_the_class_and_its_name():
    """Only Mixer subclasses with a non-empty name register; the errors say which rule broke."""
    from rnb_kernels.mixing import get_mixer, mixer_names

    with pytest.raises(
        TypeError, match=r"^register_mixer takes a Mixer subclass, got <class 'int'>$"
    ):
        register_mixer(int)
    with pytest.raises(TypeError, match=r"^register_mixer takes a Mixer subclass, got 5$"):
        register_mixer(5)

    class Nameless(Mixer):
        def update(self, **stats):
            return self.weights

    with pytest.raises(
        ValueError, match=r"^Nameless: a registered mixer needs a non-empty `name`$"
    ):
        register_mixer(Nameless)
    assert "" not in mixer_names()
    # An explicit name wins over the class attribute, and is written back onto the class.
    try:
        register_mixer(name="toy-explicit")(Nameless)
        assert get_mixer("toy-explicit") is Nameless and Nameless.name == "toy-explicit"
        assert mixer_names()[-1] == "toy-explicit"
    finally:
        unregister_mixer("toy-explicit")
    assert "toy-explicit" not in mixer_names()
    unregister_mixer("toy-explicit")  # removing a name that is not registered is a no-op
    assert "toy-explicit" not in mixer_names()


def test_get_and_build_mixer_reject_non_names_and_non_contexts():
    from rnb_kernels.mixing import build_mixer, get_mixer

    with pytest.raises(TypeError, match=r"^name must be a str, got int$"):
        get_mixer(3)
    with pytest.raises(ValueError, match=r"^unknown mixer 'nope'; registered: \["):
        get_mixer("nope")
    with pytest.raises(TypeError, match=r"^context must be a MixingContext, got str$"):
        build_mixer("stratified", "3")
    with pytest.raises(TypeError, match=r"^context must be a MixingContext, got bool$"):
        build_mixer("stratified", True)
    assert build_mixer("stratified", 3).weights.tolist() == [1 / 3] * 3
