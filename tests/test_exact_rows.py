"""Projected mode's exact rows: which rows are kept, what the Gram estimates are then, and that
the raw projection, resume and the switch behave.

Every expected value is computed here in float64 from the micro-batches' own ``(x, dy)``: the
per-domain gradient sums by ``segmented_wgrad_ref`` and the projection by the dense
``projection_matrix_ref``, never by the tracker's code.
"""

from __future__ import annotations

import pytest
import torch
from _tol import assert_close
from torch import nn

from rnb_kernels.ops.reference import bias_grads_ref, projection_matrix_ref, segmented_wgrad_ref
from rnb_kernels.ops.sketch_hash import PROJ_IN, PROJ_OUT, round_seed
from rnb_kernels.tracking import DomainGradientTracker

M, K_IN, K_OUT, N, P, H = 3, 6, 48, 12, 8, 5


def _model(seed: int = 0, bias: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, K_IN), nn.Tanh(), nn.Linear(K_IN, K_OUT, bias=bias))


def _step(model, tracker, x, ids, heavy_cols: int = 3):
    """One micro-batch whose loss puts most of the gradient on a few output rows (as frequent
    tokens do in an LM head); returns the head's ``(x, dy)`` in float64."""
    seen = {}
    h = model[2].register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0].detach()))
    out = model(x)
    out.retain_grad()
    w = torch.ones(K_OUT)
    w[:heavy_cols] = 30.0
    with tracker.domains(ids):
        (out.pow(2) * w).sum().backward()
    h.remove()
    model.zero_grad()
    return seen["x"].double(), out.grad.double()


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(N, 5, generator=g), torch.randint(0, M, (N,), generator=g)) for _ in range(n)
    ]


def _per_domain(seen, bias: bool) -> torch.Tensor:
    """float64 ``[m, K_OUT, K_IN']``: the round's per-domain gradient sums (bias as a column)."""
    total = 0
    for xi, dy, ids in seen:
        g = segmented_wgrad_ref(xi, dy, ids, M)[1]
        if bias:
            g = torch.cat([g, bias_grads_ref(dy, ids, M)[..., None]], -1)
        total = total + g
    return total


def _gram_with_rows(
    g: torch.Tensor, heavy: torch.Tensor, seed: int, layer: int = 0
) -> torch.Tensor:
    """The estimator's definition: exact Gram of the heavy rows plus the Gram of the projection
    of every other row."""
    rest = g.clone()
    rest[:, heavy] = 0
    p_out = projection_matrix_ref(K_OUT, P, seed, layer, 0, PROJ_OUT)
    proj = (p_out @ rest).reshape(M, -1)
    ex = g[:, heavy].reshape(M, -1)
    return proj @ proj.T + ex @ ex.T


def _head_gram(slot) -> torch.Tensor:
    """The head's share of the tracker's Gram, from its row blocks (float64)."""
    return sum(part.double() @ part.double().T for part in slot.gram_parts("domain"))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("modules", [["2"], ["0", "2"]], ids=["head", "two-layers"])
def test_rows_are_the_previous_rounds_heaviest_and_the_gram_uses_them(bias, modules):
    """With two tracked layers the head is slot 1, hashed with layer key 1: its exact rows'
    share must be taken out of the projection under that key."""
    model = _model(bias=bias)
    tr = DomainGradientTracker(
        model, M, modules=modules, mode="projected", proj_dim=P, exact_rows=H, seed=3
    )
    slot = tr._slots[-1]
    layer = slot.index
    batches = _batches(6)
    energy = torch.zeros(K_OUT, dtype=torch.float64)
    for r in range(3):
        seen = []
        for x, ids in batches[2 * r : 2 * r + 2]:
            xi, dy = _step(model, tr, x, ids)
            seen.append((xi, dy, ids))
            energy += (dy.T @ xi).square().sum(1)  # ‖dW_i‖² of this micro-batch
        g = _per_domain(seen, bias)
        seed = round_seed(3, r)
        if r == 0:
            # No energy measured yet: the plain projection's Gram.
            assert slot.heavy is None
            p_out = projection_matrix_ref(K_OUT, P, seed, layer, 0, PROJ_OUT)
            proj = (p_out @ g).reshape(M, -1)
            want = proj @ proj.T
        else:
            want = _gram_with_rows(g, slot.heavy, seed, layer)
        assert_close(_head_gram(slot), want, torch.float32, f"round {r}")
        if len(modules) == 1:
            assert_close(tr.gram(), want, torch.float32, f"round {r}, tracker")
        # The raw projection is still the projection of every row.
        got_p = slot.rows("domain").view(M, P, -1)
        want_p = projection_matrix_ref(K_OUT, P, seed, layer, 0, PROJ_OUT) @ g
        assert_close(got_p, want_p, torch.float32, f"round {r} projection")
        expected_heavy = torch.sort(torch.topk(energy, H).indices).values
        tr.reset()
        assert torch.equal(slot.heavy, expected_heavy), (r, slot.heavy, expected_heavy)
        energy.zero_()
    # The loss weights rows 0..2 30x: they must be among the kept rows.
    assert {0, 1, 2} <= set(slot.heavy.tolist())


def test_exact_rows_remove_heavy_collisions():
    """With the heavy rows kept exactly the Gram is much closer to the exact one than the plain
    projection's, over many hash seeds (each seed is one round)."""
    g = torch.Generator().manual_seed(5)
    # Gradients dominated by 6 heavy rows, as an LM head's are.
    grads = torch.randn(M, K_OUT, K_IN, generator=g, dtype=torch.float64) * 0.05
    heavy = torch.tensor([1, 7, 19, 23, 30, 44])
    grads[:, heavy] += torch.randn(M, len(heavy), K_IN, generator=g, dtype=torch.float64)
    exact = grads.reshape(M, -1) @ grads.reshape(M, -1).T
    err_plain, err_rows = [], []
    for seed in range(40):
        p_out = projection_matrix_ref(K_OUT, P, seed, 0, 0, PROJ_OUT)
        proj = (p_out @ grads).reshape(M, -1)
        err_plain.append(float((proj @ proj.T - exact).abs().max()))
        err_rows.append(float((_gram_with_rows(grads, heavy, seed) - exact).abs().max()))
    assert sum(err_rows) < 0.1 * sum(err_plain), (sum(err_rows), sum(err_plain))


def test_target_alignment_uses_the_same_split():
    model = _model()
    tr = DomainGradientTracker(
        model, M, modules="2", mode="projected", proj_dim=P, exact_rows=H, seed=1
    )
    batches = _batches(3, seed=1)
    _step(model, tr, *batches[0])
    tr.reset()  # round 1 keeps the rows measured in round 0
    xi, dy = _step(model, tr, *batches[1])
    x, _ = batches[2]
    seen = {}
    h = model[2].register_forward_hook(lambda mod, inp, o: seen.update(x=inp[0].detach()))
    out = model(x)
    out.retain_grad()
    w = torch.ones(K_OUT)
    w[:3] = 30.0
    with tr.target():
        (out.pow(2) * w).sum().backward()
    h.remove()
    xt, dyt = seen["x"].double(), out.grad.double()
    ids = batches[1][1]
    g = segmented_wgrad_ref(xi, dy, ids, M)[1]
    t = segmented_wgrad_ref(xt, dyt, torch.zeros(N, dtype=torch.int64), 1)[1]
    heavy = tr._slots[0].heavy
    seed = round_seed(1, 1)
    p_out = projection_matrix_ref(K_OUT, P, seed, 0, 0, PROJ_OUT)
    rest_g, rest_t = g.clone(), t.clone()
    rest_g[:, heavy] = 0
    rest_t[:, heavy] = 0
    want = (p_out @ rest_g).reshape(M, -1) @ (p_out @ rest_t).reshape(-1)
    want += g[:, heavy].reshape(M, -1) @ t[:, heavy].reshape(-1)
    assert_close(tr.target_alignment(), want, torch.float32, "target alignment")


def test_resume_keeps_rows_and_energy():
    batches = _batches(5, seed=2)
    model = _model()
    tr = DomainGradientTracker(model, M, modules="2", mode="projected", proj_dim=P, exact_rows=H)
    _step(model, tr, *batches[0])
    tr.reset()
    _step(model, tr, *batches[1])
    state = tr.state_dict()
    assert state["exact_rows"] == H and state["slots"][0]["heavy"] is not None
    _step(model, tr, *batches[2])
    want_gram = tr.gram()
    tr.reset()
    want_heavy = tr._slots[0].heavy.clone()

    model2 = _model()
    tr2 = DomainGradientTracker(model2, M, modules="2", mode="projected", proj_dim=P, exact_rows=H)
    tr2.load_state_dict(state)
    _step(model2, tr2, *batches[2])
    assert torch.equal(tr2.gram(), want_gram)
    tr2.reset()
    assert torch.equal(tr2._slots[0].heavy, want_heavy)


def test_row_energy_of_a_bf16_head_is_summed_in_fp32():
    """The energy that picks the rows is ``Σ ‖dW_i‖²`` of each micro-batch's gradient, the norm
    taken in fp32 even when the head (and so ``dW``) is bf16: a bf16 norm would be off by
    ~1e-3 relative, enough to reorder rows of similar energy."""
    model = _model().to(torch.bfloat16)
    tr = DomainGradientTracker(model, M, modules="2", mode="projected", proj_dim=P, exact_rows=H)
    want = torch.zeros(K_OUT, dtype=torch.float64)
    for x, ids in _batches(3, seed=4):
        out = model(x.to(torch.bfloat16))
        with tr.domains(ids):
            out.float().pow(2).sum().backward()
        want += model[2].weight.grad.double().square().sum(1)
        model.zero_grad()
    got = tr._slots[0].energy
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)
    tr.remove()


def test_state_of_another_exact_rows_is_refused_without_changes():
    model = _model()
    tr = DomainGradientTracker(model, M, modules="2", mode="projected", proj_dim=P, exact_rows=H)
    _step(model, tr, *_batches(1)[0])
    state = tr.state_dict()
    other = DomainGradientTracker(
        _model(), M, modules="2", mode="projected", proj_dim=P, exact_rows=H + 1
    )
    before = other.domain_projections().clone()
    with pytest.raises(ValueError, match="configured as"):
        other.load_state_dict(state)
    assert torch.equal(other.domain_projections(), before)
    bad = tr.state_dict()
    bad["slots"][0]["heavy"] = torch.tensor([0, 1, 2, 3, K_OUT])
    tr2 = DomainGradientTracker(
        _model(), M, modules="2", mode="projected", proj_dim=P, exact_rows=H
    )
    with pytest.raises(ValueError, match="heavy rows"):
        tr2.load_state_dict(bad)
    assert tr2._slots[0].heavy is None


def test_off_and_other_modes_keep_no_rows():
    batches = _batches(2)
    model = _model()
    tr = DomainGradientTracker(model, M, modules="2", mode="projected", proj_dim=P, exact_rows=0)
    assert "e" not in tr._slots[0].buf["domain"] and tr._slots[0].energy is None
    for x, ids in batches:
        _step(model, tr, x, ids)
        tr.reset()
    assert tr._slots[0].heavy is None
    for mode in ("exact", "sketch"):
        t = DomainGradientTracker(_model(), M, modules="2", mode=mode, exact_rows=H)
        assert t._slots[0].exact_rows == 0
    # More rows than the layer has: every row is kept (the Gram is then exact).
    model = _model()
    tr = DomainGradientTracker(model, M, modules="2", mode="projected", proj_dim=P, exact_rows=999)
    assert tr._slots[0].exact_rows == K_OUT
    xi, dy = _step(model, tr, *batches[0])
    tr.reset()
    xi, dy = _step(model, tr, *batches[1])
    g = segmented_wgrad_ref(xi, dy, batches[1][1], M)[1].reshape(M, -1)
    assert_close(tr.gram(), g @ g.T, torch.float32, "all rows exact")


@pytest.mark.parametrize(
    "value, exc, match",
    [(-1, ValueError, "exact_rows must be >= 0"), (2.0, TypeError, "exact_rows"),
     (True, TypeError, "exact_rows")],
)  # fmt: skip
def test_bad_exact_rows_named(value, exc, match):
    with pytest.raises(exc, match=match):
        DomainGradientTracker(_model(), M, modules="2", mode="projected", exact_rows=value)


def test_proj_in_dim_rows_use_the_input_projection():
    model = _model(bias=True)
    tr = DomainGradientTracker(
        model, M, modules="2", mode="projected", proj_dim=P, proj_in_dim=4, exact_rows=H, seed=9
    )
    batches = _batches(2, seed=4)
    _step(model, tr, *batches[0])
    tr.reset()
    xi, dy = _step(model, tr, *batches[1])
    ids = batches[1][1]
    seed = round_seed(9, 1)
    heavy = tr._slots[0].heavy
    # Each domain's [K_out, K_in + 1] gradient (bias as a column), projected on the input side.
    g = torch.cat(
        [segmented_wgrad_ref(xi, dy, ids, M)[1], bias_grads_ref(dy, ids, M)[..., None]], -1
    )
    p_in = projection_matrix_ref(K_IN + 1, 4, seed, 0, 0, PROJ_IN)
    gi = g @ p_in.T  # [m, K_out, 4]
    want = _gram_with_rows(gi, heavy, seed)
    assert_close(tr.gram(), want, torch.float32, "proj_in_dim with exact rows")


def test_triton_backend_keeps_the_same_rows_and_gram():
    pytest.importorskip("triton", reason="Triton is not installed")
    import rnb_kernels

    status = rnb_kernels.backends()["triton"]
    if not status.available:
        pytest.skip(status.reason)
    trackers, models = [], []
    for backend in ("torch", "triton"):
        models.append(_model(bias=True))
        trackers.append(
            DomainGradientTracker(
                models[-1], M, modules="2", mode="projected", proj_dim=P, exact_rows=H,
                backend=backend,
            )
        )  # fmt: skip
    assert trackers[1]._slots[0].backend == "triton"
    for r, (x, ids) in enumerate(_batches(2, seed=7)):
        for model, tr in zip(models, trackers):
            _step(model, tr, x, ids)
        assert_close(trackers[1].gram(), trackers[0].gram().double(), torch.float32, f"r{r}")
        for tr in trackers:
            tr.reset()
        assert torch.equal(trackers[0]._slots[0].heavy, trackers[1]._slots[0].heavy)


def test_target_gradient_does_not_choose_the_rows():
    """Only the domains' gradient energy picks the next round's exact rows: a target gradient
    that is all on other rows (and far larger) changes nothing."""
    model = _model()
    tr = DomainGradientTracker(model, M, modules="2", mode="projected", proj_dim=P, exact_rows=H)
    slot = tr._slots[0]
    energy = torch.zeros(K_OUT, dtype=torch.float64)
    for x, ids in _batches(2):
        xi, dy = _step(model, tr, x, ids)
        energy += (dy.T @ xi).square().sum(1)
    w = torch.zeros(K_OUT)
    w[-H:] = 1e4  # the target's gradient: only the last rows, 10^4 x heavier
    x_t = torch.randn(N, 5)
    with tr.target():
        (model(x_t) * w).sum().backward()
    model.zero_grad()
    tr.reset()
    want = torch.sort(torch.topk(energy, H).indices).values
    assert torch.equal(slot.heavy, want)
    assert not set(slot.heavy.tolist()) & set(range(K_OUT - H, K_OUT))
