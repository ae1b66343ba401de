"""A fresh hash every round (``reseed``): the round's seed, what each round's projected and
sketched states hold, the switch, and resuming mid-run."""

from __future__ import annotations

import pytest
import torch
from _tol import assert_close
from torch import nn

from rnb_kernels.ops.reference import domain_projection_ref, domain_sketch_ref
from rnb_kernels.ops.sketch_hash import round_seed
from rnb_kernels.tracking import DomainGradientTracker

M, K_IN, K_OUT, N = 3, 6, 40, 10


def test_round_seed_pinned_values():
    # Computed once from the definition and written here: a change of the derivation fails.
    assert [round_seed(0, r) for r in range(4)] == [0, 2462723854, 1020716019, 454327756]
    assert [round_seed(7, r) for r in range(3)] == [7, 1478832577, 746935934]
    assert round_seed(2**32 - 1, 5) == 4085280186
    # Distinct seeds per round, and in [0, 2**32).
    seeds = [round_seed(123, r) for r in range(200)]
    assert len(set(seeds)) == 200 and all(0 <= s < 2**32 for s in seeds)


def _head(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, K_IN), nn.Tanh(), nn.Linear(K_IN, K_OUT, bias=False))


def _round(model, tracker, x, ids):
    """One micro-batch; returns what the head's backward saw (x, dy) for the reference."""
    seen = {}
    head = model[2]
    h = head.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0].detach()))
    out = model(x)
    out.retain_grad()
    with tracker.domains(ids):
        out.pow(2).sum().backward()
    h.remove()
    return seen["x"].double(), out.grad.double()


@pytest.mark.parametrize("mode", ["projected", "sketch"])
@pytest.mark.parametrize("reseed", [True, False])
def test_each_round_is_hashed_with_its_seed(mode, reseed):
    model = _head()
    tr = DomainGradientTracker(
        model, M, modules="2", mode=mode, proj_dim=8, sketch_dim=32, seed=11, reseed=reseed
    )
    g = torch.Generator().manual_seed(0)
    for r in range(3):
        x = torch.randn(N, 5, generator=g)
        ids = torch.randint(0, M, (N,), generator=g)
        xi, dy = _round(model, tr, x, ids)
        seed = round_seed(11, r) if reseed else 11
        assert tr.hash_seed == seed
        if mode == "projected":
            ref = domain_projection_ref(xi, dy, ids, M, 8, seed=seed, layer=0)[1]
            got = tr.domain_projections().view(M, 8, K_IN)
        else:
            ref = domain_sketch_ref(xi, dy, ids, M, 32, seed=seed, layer=0)[1]
            got = tr.domain_sketches()
        assert_close(got, ref, torch.float32, f"{mode} round {r}")
        if reseed and r > 0:
            # The round is not hashed with the base seed: the states differ from that hash.
            if mode == "projected":
                base = domain_projection_ref(xi, dy, ids, M, 8, seed=11, layer=0)[1]
            else:
                base = domain_sketch_ref(xi, dy, ids, M, 32, seed=11, layer=0)[1]
            assert (got.double() - base).abs().max() > 1e-3
        model.zero_grad()
        tr.reset()


def test_exact_mode_is_unaffected():
    g = torch.Generator().manual_seed(1)
    x, ids = torch.randn(N, 5, generator=g), torch.randint(0, M, (N,), generator=g)
    grams = []
    for reseed in (True, False):
        model = _head()
        tr = DomainGradientTracker(model, M, modules="2", mode="exact", reseed=reseed)
        tr.reset()
        _round(model, tr, x, ids)
        grams.append(tr.gram())
    assert torch.equal(grams[0], grams[1])


def test_resume_mid_run_keeps_the_rounds_hash():
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(N, 5, generator=g), torch.randint(0, M, (N,), generator=g))
               for _ in range(4)]  # fmt: skip
    model = _head()
    tr = DomainGradientTracker(model, M, modules="2", mode="projected", proj_dim=8)
    for x, ids in batches[:2]:
        _round(model, tr, x, ids)
        tr.reset()
    _round(model, tr, *batches[2])  # round 2, mid-round
    state = tr.state_dict()
    saved_model = _head()  # the same weights: no optimizer step was taken
    assert state["round"] == 2 and state["reseed"] is True
    _round(model, tr, *batches[3])
    want = tr.domain_projections()

    tr2 = DomainGradientTracker(saved_model, M, modules="2", mode="projected", proj_dim=8)
    tr2.load_state_dict(state)
    assert tr2.hash_seed == round_seed(0, 2)
    _round(saved_model, tr2, *batches[3])
    assert torch.equal(tr2.domain_projections(), want)


def test_reseed_must_be_a_bool():
    with pytest.raises(TypeError, match="reseed"):
        DomainGradientTracker(_head(), M, modules="2", reseed=1)
