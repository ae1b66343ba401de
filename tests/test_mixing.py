"""Mixers (R&B, DGA, DGADistribution, Stratified, Static, ODM) and the Balancer."""

from __future__ import annotations

import copy
import json
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from rnb_kernels.balancer import Balancer
from rnb_kernels.mixing import (
    DGA,
    ODM,
    DGADistribution,
    RnB,
    Static,
    Stratified,
    domain_gradient_alignment,
)
from rnb_kernels.tracking import DomainGradientTracker

F64 = torch.float64


def hand_rnb(G, n, p_eval, lam):
    """The R&B formula of docs/design.md, written out with numpy."""
    G, n, p = np.asarray(G, float), np.asarray(n, float), np.asarray(p_eval, float)
    p = p / p.sum()
    inv = np.array([1.0 / c if c > 0 else 0.0 for c in n])
    Gm = G * np.outer(inv, inv)
    v = Gm @ p
    z = lam * v / np.linalg.norm(v)
    e = np.exp(z - z.max())
    return e / e.sum()


def spd(m, seed):
    g = np.random.default_rng(seed)
    a = g.normal(size=(m, 3 * m))
    return a @ a.T


@pytest.mark.parametrize("lam", [0.5, 3.0])
@pytest.mark.parametrize("empty_domain", [False, True], ids=["all-seen", "one-empty"])
def test_rnb_matches_formula(lam, empty_domain):
    m = 5
    G = spd(m, 1)
    n = np.array([3.0, 1.0, 7.0, 2.0, 4.0])
    if empty_domain:
        n[2] = 0.0
    p_eval = [0.1, 0.2, 0.3, 0.0, 0.4]
    mixer = RnB(m, eval_proportions=p_eval, lam=lam)
    w = mixer.update(gram=torch.tensor(G), counts=torch.tensor(n))
    assert w.dtype == F64
    np.testing.assert_allclose(w.numpy(), hand_rnb(G, n, p_eval, lam), rtol=1e-12, atol=1e-15)
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-12)
    # Overwrite, no carry-over: a second update with the same inputs gives the same weights.
    assert torch.equal(mixer.update(gram=torch.tensor(G), counts=torch.tensor(n)), w)
    assert mixer.num_updates == 2


def test_rnb_zero_gp_keeps_weights_and_nonfinite_gram_skips():
    mixer = RnB(3, eval_proportions=[1.0, 0.0, 0.0], init_weights=[0.2, 0.3, 0.5])
    before = mixer.weights
    # Domain 0 (the only evaluated one) had no samples: G p_eval = 0.
    w = mixer.update(gram=torch.eye(3, dtype=F64), counts=torch.tensor([0.0, 2.0, 2.0]))
    assert torch.equal(w, before) and mixer.skipped_updates == 1
    bad = torch.eye(3, dtype=F64)
    bad[1, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gram"):
        w = mixer.update(gram=bad, counts=torch.ones(3))
    assert torch.equal(w, before)
    assert mixer.skipped_updates == 2 and mixer.num_updates == 0
    assert "non-finite" in mixer.last_skip_reason


@pytest.mark.parametrize("ema", [1.0, 0.1, 0.5])
def test_dga_step_and_ema_match_formula(ema):
    alpha = np.array([0.5, 0.3, 0.2])
    a = np.array([0.4, -1.0, 2.0])
    eta = 0.7
    mixer = DGA(3, step_size=eta, ema=ema, init_weights=alpha, normalize="none")
    w = mixer.update(alignment=torch.tensor(a))
    hat = alpha * np.exp(eta * a)
    hat /= hat.sum()
    np.testing.assert_allclose(w.numpy(), (1 - ema) * alpha + ema * hat, rtol=1e-12)


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e4])
def test_dga_max_normalisation_is_scale_free(scale):
    """Default normalize="max": alignments are divided by the running max of |a|, so the
    weights do not depend on the gradient scale, and a later, smaller alignment takes a
    proportionally smaller step."""
    alpha = np.array([0.5, 0.3, 0.2])
    a1, a2 = np.array([0.4, -1.0, 2.0]), np.array([0.5, 0.1, -0.2])
    mixer = DGA(3, step_size=0.7, ema=1.0, init_weights=alpha)
    w1 = mixer.update(alignment=torch.tensor(a1 * scale)).numpy()
    w2 = mixer.update(alignment=torch.tensor(a2 * scale)).numpy()
    e1 = alpha * np.exp(0.7 * a1 / 2.0)
    e1 /= e1.sum()
    e2 = e1 * np.exp(0.7 * a2 / 2.0)  # the running max is still 2.0
    e2 /= e2.sum()
    np.testing.assert_allclose(w1, e1, rtol=1e-12)
    np.testing.assert_allclose(w2, e2, rtol=1e-12)
    restored = DGA(3, step_size=0.7, ema=1.0)
    restored.load_state_dict(mixer.state_dict())
    assert restored.scale == mixer.scale == 2.0 * scale


def test_dga_ema_smooths():
    """With β < 1 each step moves only a β fraction of the way; the EMA path is smoother."""
    a = torch.tensor([1.0, -1.0])
    raw, smooth = DGA(2, step_size=2.0, ema=1.0), DGA(2, step_size=2.0, ema=0.1)
    w_raw, w_smooth = [raw.weights], [smooth.weights]
    for sign in (1, -1, 1, -1, 1, -1):
        w_raw.append(raw.update(alignment=sign * a))
        w_smooth.append(smooth.update(alignment=sign * a))
        alpha_prev = w_smooth[-2]
        hat = alpha_prev * torch.exp(2.0 * sign * a)
        hat /= hat.sum()
        torch.testing.assert_close(w_smooth[-1], 0.9 * alpha_prev + 0.1 * hat)
    jumps = lambda ws: max(float((x - y).abs().max()) for x, y in zip(ws, ws[1:]))  # noqa: E731
    assert jumps(w_smooth) < 0.25 * jumps(w_raw)


def test_dga_sums_are_divided_by_counts():
    mixer = DGA(3, step_size=1.0, ema=1.0)
    ref = DGA(3, step_size=1.0, ema=1.0)
    sums = torch.tensor([6.0, 3.0, 5.0], dtype=F64)
    counts = torch.tensor([2.0, 3.0, 0.0], dtype=F64)
    w = mixer.update(alignment=sums, counts=counts, target_count=4.0)
    w_ref = ref.update(alignment=torch.tensor([6 / 8, 3 / 12, 0.0]))  # empty domain: mean 0
    torch.testing.assert_close(w, w_ref, rtol=1e-14, atol=0)
    assert torch.equal(mixer.update(alignment=sums, counts=counts, target_count=0.0), w)


def test_dga_nonfinite_alignment_skips():
    mixer = DGA(2, step_size=1.0)
    before = mixer.weights
    with pytest.warns(RuntimeWarning, match="non-finite"):
        w = mixer.update(alignment=torch.tensor([float("inf"), 0.0]))
    assert torch.equal(w, before) and mixer.skipped_updates == 1


def test_dga_converges_to_target_mixture_linear_regression():
    """DGA paper, Theorem 1 setting: linear regression, domain i has parameter θ_i (orthonormal),
    the specific set is mix(α*) of the domains. Our gradient source: the tracker's per-domain
    sums of the training batches plus a recorded target row."""
    torch.manual_seed(0)
    d = m = 3
    B, K, steps = 128, 4, 400
    theta = torch.eye(d)
    alpha_star = torch.tensor([0.6, 0.3, 0.1], dtype=F64)
    model = nn.Linear(d, 1, bias=False)
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.5 / B)
    tracker = DomainGradientTracker(model, m)
    mixer = DGA(m, step_size=1.0, ema=0.5, update_every=K)
    g = torch.Generator().manual_seed(1)

    def batch(p, n):
        dom = torch.multinomial(p.float(), n, replacement=True, generator=g)
        x = torch.randn(n, d, generator=g)
        return x, (x * theta[dom]).sum(1, keepdim=True), dom

    start = float((mixer.weights - alpha_star).abs().sum())
    late = []
    for step in range(1, steps + 1):
        x, y, dom = batch(mixer.weights, B)
        with tracker.domains(dom):
            (0.5 * (model(x) - y).square().sum()).backward()
        opt.step()
        opt.zero_grad()
        if mixer.should_update(step):
            xs, ys, _ = batch(alpha_star, 2 * B)
            tracker.record_target(0.5 * (model(xs) - ys).square().sum())
            mixer.update(
                alignment=tracker.target_alignment(),
                counts=tracker.counts(),
                target_count=tracker.target_count(),
            )
            tracker.reset()
            if step > steps // 2:
                late.append(mixer.weights)
    final = float((mixer.weights - alpha_star).abs().sum())
    avg = float((torch.stack(late).mean(0) - alpha_star).abs().sum())
    assert start > 0.5
    assert final < 0.12, mixer.weights
    assert avg < 0.04, torch.stack(late).mean(0)


def test_extra_pass_alignment_equals_tracker_sums():
    """The paper's extra forward/backward per domain and our free sums agree on a model whose
    only parameters are the tracked Linear."""
    g = torch.Generator().manual_seed(3)
    model = nn.Linear(5, 2)
    tracker = DomainGradientTracker(model, 3)
    batches = [(torch.randn(4, 5, generator=g), torch.randn(4, 2, generator=g)) for _ in range(3)]
    target = (torch.randn(6, 5, generator=g), torch.randn(6, 2, generator=g))

    def loss_fn(mdl, b):
        return (mdl(b[0]) - b[1]).square().sum(1).mean()

    paper = domain_gradient_alignment(model, loss_fn, batches + [None], target)
    assert paper[3] == 0.0
    for i, b in enumerate(batches):
        with tracker.domains(torch.full((4,), i)):
            (model(b[0]) - b[1]).square().sum().backward()
    tracker.record_target((model(target[0]) - target[1]).square().sum())
    ours = tracker.target_alignment() / (tracker.counts() * tracker.target_count())
    torch.testing.assert_close(ours, paper[:3], rtol=1e-5, atol=1e-6)


def test_dga_distribution_sampling_and_projection():
    B = DGADistribution.default_bases([0, 0, 3, 3, 3, 1], coarse_of_fine=[0, 0, 1, 1])
    expected = torch.tensor(
        [[2 / 6, 1 / 6, 0, 3 / 6], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]], dtype=F64
    )
    torch.testing.assert_close(B, expected)
    mixer = DGADistribution(B, step_size=0.5, ema=1.0, init_weights=[0.2, 0.3, 0.5])
    torch.testing.assert_close(mixer.sampling_weights, torch.tensor([0.2, 0.3, 0.5], dtype=F64) @ B)
    fine = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    ref = DGA(3, step_size=0.5, ema=1.0, init_weights=[0.2, 0.3, 0.5])
    w = mixer.update(alignment=fine)  # cluster level: projected as B @ a
    torch.testing.assert_close(w, ref.update(alignment=B @ fine))
    w2 = mixer.update(alignment=torch.tensor([0.1, 0.2, 0.3]), level="basis")
    torch.testing.assert_close(w2, ref.update(alignment=torch.tensor([0.1, 0.2, 0.3])))
    assert math.isclose(float(mixer.sampling_weights.sum()), 1.0)


def test_baselines():
    assert Stratified(4).weights.tolist() == [0.25] * 4
    assert Stratified(4).update(gram=torch.eye(4)).tolist() == [0.25] * 4
    assert Static([1, 3]).weights.tolist() == [0.25, 0.75]
    assert Static.natural([100, 300, 600]).weights.tolist() == [0.1, 0.3, 0.6]
    assert Static.importance([0, 2, 2, 2], num_domains=3).weights.tolist() == [0.25, 0.0, 0.75]


def test_odm_matches_exp3_and_favours_high_loss():
    m = 3
    mixer = ODM(m, smoothing=0.9)
    rewards = np.zeros(m)
    pi = np.full(m, 1 / m)
    losses = np.array([3.0, 1.0, 0.5])
    for t in range(1, 30):
        w = mixer.update(losses=torch.tensor(losses), counts=torch.tensor([4.0, 4.0, 0.0]))
        seen = np.array([True, True, False])
        rewards[seen] = 0.9 * rewards[seen] + 0.1 * losses[seen] / pi[seen]

        def eps(s):
            return min(1 / m, math.sqrt(math.log(m) / (m * s)))

        e = np.exp(eps(t) * rewards - (eps(t) * rewards).max())
        pi = (1 - m * eps(t + 1)) * e / e.sum() + eps(t + 1)
        pi /= pi.sum()
        np.testing.assert_allclose(w.numpy(), pi, rtol=1e-12)
    assert w[0] > w[1] > w[2]  # unobserved domain keeps its (zero) reward
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        mixer.update(losses=torch.tensor([float("nan"), 1.0, 1.0]), counts=torch.ones(3))


def test_odm_exploration_shortens_the_uniform_phase():
    """With the paper's rate (exploration=1) the policy is exactly uniform for K ln K updates;
    exploration c < 1 leaves it after c² K ln K and keeps a floor of ε_t per domain."""
    m = 20
    losses = torch.linspace(1.0, 3.0, m)
    paper, scaled = ODM(m), ODM(m, exploration=0.2)
    for _ in range(10):
        w_paper = paper.update(losses=losses, counts=torch.ones(m))
        w_scaled = scaled.update(losses=losses, counts=torch.ones(m))
    np.testing.assert_allclose(w_paper.numpy(), 1 / m)  # 10 < 20 ln 20 = 60
    assert float(w_scaled[-1]) > 1.1 / m and int(w_scaled.argmax()) == m - 1
    assert float(w_scaled.min()) >= scaled._eps(11) - 1e-12
    state = scaled.state_dict()
    again = ODM(m)
    again.load_state_dict(state)
    assert again.exploration == 0.2
    with pytest.raises(ValueError, match="exploration"):
        ODM(m, exploration=0.0)


def _drive(mixer, rng):
    m = mixer.num_domains
    if isinstance(mixer, RnB):
        return mixer.update(
            gram=torch.tensor(spd(m, int(rng.integers(1 << 30)))),
            counts=torch.tensor(rng.integers(0, 5, m).astype(float)),
        )
    if isinstance(mixer, DGADistribution):
        return mixer.update(alignment=torch.tensor(rng.normal(size=mixer.num_clusters)))
    if isinstance(mixer, DGA):
        return mixer.update(alignment=torch.tensor(rng.normal(size=m)))
    if isinstance(mixer, ODM):
        return mixer.update(losses=torch.tensor(rng.random(m) * 3), counts=torch.ones(m))
    return mixer.update()


MIXERS = {
    "rnb": lambda: RnB(4, eval_proportions=[0.1, 0.2, 0.3, 0.4], lam=2.0),
    "dga": lambda: DGA(4, step_size=0.3, ema=0.1),
    "dga-distribution": lambda: DGADistribution(
        DGADistribution.default_bases([0, 1, 1, 5], [0, 0, 1, 1, 2, 2]), step_size=0.3
    ),
    "odm": lambda: ODM(4),
    "stratified": lambda: Stratified(4),
    "static": lambda: Static([1, 2, 3, 4]),
}


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_state_dict_resumes_bit_exactly(name):
    a = MIXERS[name]()
    rng = np.random.default_rng(0)
    for _ in range(3):
        _drive(a, rng)
    state = copy.deepcopy(a.state_dict())
    rng_state = rng.bit_generator.state
    tail_a = [_drive(a, rng) for _ in range(3)]
    b = MIXERS[name]()
    b.load_state_dict(state)
    rng.bit_generator.state = rng_state
    tail_b = [_drive(b, rng) for _ in range(3)]
    for x, y in zip(tail_a, tail_b):
        assert torch.equal(x, y)
    assert math.isclose(float(b.weights.sum()), 1.0, rel_tol=1e-12)


def _assert_unchanged(mixer, before):
    assert torch.equal(mixer.weights, before["weights"])
    assert mixer.num_updates == before["num_updates"]
    assert mixer.skipped_updates == before["skipped_updates"]


BAD_UPDATES = [
    pytest.param(
        "rnb",
        dict(gram=torch.eye(3), counts=torch.ones(4)),
        ValueError,
        "gram",
        id="rnb-gram-shape",
    ),
    pytest.param(
        "rnb", dict(gram="eye", counts=torch.ones(4)), TypeError, "gram", id="rnb-gram-type"
    ),
    pytest.param(
        "rnb",
        dict(gram=torch.eye(4), counts=-torch.ones(4)),
        ValueError,
        "counts",
        id="rnb-negative-counts",
    ),
    pytest.param(
        "rnb",
        dict(gram=torch.eye(4), counts=torch.tensor([1.0, float("nan"), 1, 1])),
        ValueError,
        "counts",
        id="rnb-nan-counts",
    ),
    pytest.param(
        "dga", dict(alignment=torch.ones(3)), ValueError, "alignment", id="dga-alignment-shape"
    ),
    pytest.param(
        "dga",
        dict(alignment=torch.ones(4), counts=torch.ones(4)),
        ValueError,
        "target_count",
        id="dga-missing-target-count",
    ),
    pytest.param(
        "dga",
        dict(alignment=torch.ones(4), counts=torch.ones(4), target_count=-1.0),
        ValueError,
        "target_count",
        id="dga-negative-target-count",
    ),
    pytest.param(
        "dga",
        dict(alignment=torch.ones(4, dtype=torch.complex64)),
        TypeError,
        "alignment",
        id="dga-complex-alignment",
    ),
    pytest.param(
        "odm",
        dict(losses=torch.ones(4), counts=torch.ones(3)),
        ValueError,
        "counts",
        id="odm-counts-shape",
    ),
]


@pytest.mark.parametrize("name, kwargs, exc, word", BAD_UPDATES)
def test_bad_update_inputs_leave_state_unchanged(name, kwargs, exc, word):
    mixer = MIXERS[name]()
    _drive(mixer, np.random.default_rng(1))
    before = mixer.state_dict()
    with pytest.raises(exc, match=word):
        mixer.update(**kwargs)
    _assert_unchanged(mixer, before)


BAD_CONSTRUCTORS = [
    pytest.param(lambda: RnB(0, eval_proportions=[]), ValueError, "num_domains", id="rnb-zero-m"),
    pytest.param(
        lambda: RnB(2, eval_proportions=[0.0, 0.0]),
        ValueError,
        "eval_proportions",
        id="rnb-eval-sum-zero",
    ),
    pytest.param(
        lambda: RnB(2, eval_proportions=[1.0, -0.5]),
        ValueError,
        "eval_proportions",
        id="rnb-eval-negative",
    ),
    pytest.param(
        lambda: RnB(2, eval_proportions=[1.0, float("nan")]),
        ValueError,
        "eval_proportions",
        id="rnb-eval-nan",
    ),
    pytest.param(
        lambda: RnB(2, eval_proportions=[1.0, 1.0, 1.0]),
        ValueError,
        "eval_proportions",
        id="rnb-eval-length",
    ),
    pytest.param(
        lambda: RnB(2, eval_proportions=[1, 1], lam=0.0), ValueError, "lam", id="rnb-lam-zero"
    ),
    pytest.param(
        lambda: RnB(2, eval_proportions=[1, 1], update_every=0),
        ValueError,
        "update_every",
        id="rnb-update-every-zero",
    ),
    pytest.param(lambda: DGA(2, step_size=-1.0), ValueError, "step_size", id="dga-negative-eta"),
    pytest.param(lambda: DGA(2, step_size=1.0, ema=0.0), ValueError, "ema", id="dga-ema-zero"),
    pytest.param(lambda: DGA(2, step_size=1.0, ema=1.5), ValueError, "ema", id="dga-ema-big"),
    pytest.param(lambda: DGA(2, step_size="1"), TypeError, "step_size", id="dga-eta-str"),
    pytest.param(
        lambda: DGA(2, 1.0, init_weights=[float("inf"), 1.0]),
        ValueError,
        "init_weights",
        id="dga-init-inf",
    ),
    pytest.param(
        lambda: DGADistribution([[1.0, 0.0], [0.0, 0.0]], 1.0),
        ValueError,
        r"bases\[1\]",
        id="dgad-empty-basis",
    ),
    pytest.param(lambda: Static([0.0, 0.0]), ValueError, "weights", id="static-all-zero"),
    pytest.param(lambda: Static.natural([]), ValueError, "sizes", id="natural-empty"),
    pytest.param(lambda: ODM(3, smoothing=1.0), ValueError, "smoothing", id="odm-smoothing-one"),
    pytest.param(lambda: Stratified(2.5), TypeError, "num_domains", id="stratified-float-m"),
]


@pytest.mark.parametrize("make, exc, word", BAD_CONSTRUCTORS)
def test_bad_constructor_arguments(make, exc, word):
    with pytest.raises(exc, match=word):
        make()


def test_load_state_dict_rejects_foreign_state():
    a, b = RnB(3, eval_proportions=[1, 1, 1]), DGA(3, step_size=1.0)
    with pytest.raises(ValueError, match="RnB"):
        b.load_state_dict(a.state_dict())
    state = a.state_dict()
    state["weights"] = torch.tensor([0.5, 0.5, float("nan")], dtype=F64)
    before = a.state_dict()
    with pytest.raises(ValueError, match="weights"):
        a.load_state_dict(state)
    _assert_unchanged(a, before)


# ---------------------------------------------------------------------------- Balancer


class Tiny(nn.Module):
    def __init__(self, vocab=13, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens)))


def _corpus(n=240, m=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % m
    # Each domain draws from its own 4-token window of the vocabulary: distributions differ.
    tokens = (torch.randint(0, 4, (n, 6), generator=g) + labels[:, None] * 3) % 13
    return tokens, labels


def _run(balancer, model, opt, tokens, labels, sampler_iter, steps, B):
    for _ in range(steps):
        idx = torch.tensor([next(sampler_iter) for _ in range(B)])
        x, ids = tokens[idx], labels[idx]
        with balancer.step(ids) as s:
            logits = model(x[:, :-1])
            loss = (
                nn.functional.cross_entropy(
                    logits.reshape(-1, 13), x[:, 1:].reshape(-1), reduction="none"
                )
                .view(len(idx), -1)
                .mean(1)
            )
            s.record_loss(loss)
            loss.sum().backward()
        balancer.optimizer_step(opt)


@pytest.mark.parametrize("kind", ["rnb", "dga", "odm"])
def test_balancer_loop_logs_and_resumes_identically(kind, tmp_path):
    tokens, labels = _corpus()
    B, m = 8, 4

    def build(log_dir):
        torch.manual_seed(0)
        model = Tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if kind == "rnb":
            mixer = RnB(m, eval_proportions=[0.4, 0.3, 0.2, 0.1], lam=3.0, update_every=2)
            bal = Balancer(model, mixer, log_dir=log_dir)
        elif kind == "dga":
            mixer = DGA(m, step_size=5.0, ema=0.5, update_every=2)
            spe = tokens[labels == 1][:8]
            bal = Balancer(
                model,
                mixer,
                log_dir=log_dir,
                target_fn=lambda: nn.functional.cross_entropy(
                    model(spe[:, :-1]).reshape(-1, 13), spe[:, 1:].reshape(-1), reduction="sum"
                ),
            )
        else:
            bal = Balancer(model, ODM(m, update_every=2), log_dir=log_dir)
        sampler = bal.make_sampler(labels, batch_size=B, seed=3)
        return model, opt, bal, sampler

    model, opt, bal, sampler = build(tmp_path / "a")
    it = iter(sampler)
    _run(bal, model, opt, tokens, labels, it, 5, B)  # mid-round: 2 rounds + 1 step
    assert bal.num_rounds == 2 and len(bal.history) == 2
    ckpt = copy.deepcopy(
        {"bal": bal.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}
    )
    _run(bal, model, opt, tokens, labels, it, 5, B)
    next_a = [next(it) for _ in range(10)]
    weights_a = [h["weights"] for h in bal.history]

    model2, opt2, bal2, sampler2 = build(tmp_path / "b")
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    bal2.load_state_dict(ckpt["bal"])
    it2 = iter(sampler2)
    _run(bal2, model2, opt2, tokens, labels, it2, 5, B)
    assert [h["weights"] for h in bal2.history] == weights_a[2:]  # bit-identical floats
    assert [next(it2) for _ in range(10)] == next_a
    assert torch.equal(bal.mixer.weights, bal2.mixer.weights)

    rows = (tmp_path / "a" / "mixture.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,round,w0") and len(rows) == 1 + len(weights_a)
    recs = [
        json.loads(line) for line in (tmp_path / "a" / "mixture.jsonl").read_text().splitlines()
    ]
    assert [r["weights"] for r in recs] == weights_a
    assert all(len(r["loss"]) == m and r["update_time_s"] >= 0 for r in recs)
    assert sum(recs[0]["counts"]) > 0
    assert bal.update_time_s > 0
    if kind == "rnb":
        assert bal.mixer.num_updates == len(weights_a)
    bal.close()
    assert "forward" not in model.head.__dict__


def test_balancer_builds_a_tracker_only_when_needed():
    assert Balancer(Tiny(), RnB(4, eval_proportions=[1, 1, 1, 1])).tracker is not None
    assert Balancer(Tiny(), Stratified(4)).tracker is None
    assert Balancer(Tiny(), ODM(4)).tracker is None
    bal = Balancer(Tiny(), DGA(4, step_size=1.0), tracker={"mode": "sketch", "sketch_dim": 64})
    assert bal.tracker.mode == "sketch"
    with pytest.raises(ValueError, match="num_domains"):
        Balancer(Tiny(), Stratified(3), tracker=DomainGradientTracker(Tiny(), 4))
    with pytest.raises(TypeError, match="mixer"):
        Balancer(Tiny(), "rnb")
    with pytest.raises(ValueError, match="update_every"):
        Balancer(Tiny(), Stratified(4), update_every=0)


def test_balancer_record_loss_validates_shapes():
    bal = Balancer(Tiny(), ODM(4))
    with pytest.raises(ValueError, match="loss"):
        bal.record_loss(torch.ones(3), torch.tensor([0, 1]))
    bal.record_loss(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), torch.tensor([[0, 0], [2, -1]]))
    assert bal._loss_sums.tolist() == [4.0, 0.0, 5.0, 0.0]
    assert bal._loss_counts.tolist() == [2.0, 0.0, 1.0, 0.0]


def test_balancer_paper_style_alignment_and_distribution_variant():
    tokens, labels = _corpus()
    model = Tiny()
    calls = []

    def alignment_fn():
        calls.append(1)
        return torch.tensor([1.0, 0.0, 0.0, -1.0])

    bal = Balancer(model, DGA(4, step_size=1.0, ema=1.0, update_every=1), alignment_fn=alignment_fn)
    assert bal.tracker is None
    with bal.step(labels[:8]):
        pass
    w = bal.after_step()
    ref = DGA(4, step_size=1.0, ema=1.0).update(alignment=torch.tensor([1.0, 0.0, 0.0, -1.0]))
    assert calls == [1] and torch.equal(w, ref)

    # Distribution reweighting: the tracker follows the k = 4 fine clusters in sketch mode.
    bases = DGADistribution.default_bases([0, 1, 1], coarse_of_fine=[0, 0, 1, 1])
    mixer = DGADistribution(bases, step_size=5.0, ema=1.0, update_every=1)
    spe = tokens[labels == 1][:4]
    bal = Balancer(
        model,
        mixer,
        tracker={"mode": "sketch", "sketch_dim": 256},
        target_fn=lambda: nn.functional.cross_entropy(
            model(spe[:, :-1]).reshape(-1, 13), spe[:, 1:].reshape(-1), reduction="sum"
        ),
    )
    assert bal.tracker.num_domains == 4
    idx = torch.arange(16)
    with bal.step(labels[idx]):
        x = tokens[idx]
        nn.functional.cross_entropy(
            model(x[:, :-1]).reshape(-1, 13), x[:, 1:].reshape(-1), reduction="sum"
        ).backward()
    w = bal.after_step()
    assert mixer.num_updates == 1 and not torch.equal(w, torch.full((3,), 1 / 3, dtype=F64))
    assert bal.history[0]["counts"] == [4.0, 4.0, 4.0, 4.0]
    bal.close()


def test_dga_default_moves_toward_the_target_domain_at_tiny_gradient_scale():
    """The issue that motivated normalize="max": final-layer alignments ~1e-4 left the paper's
    raw form at step_size=1 within ~1e-4 of uniform. Target = domain 2's data: the default
    raises domain 2's weight clearly, the raw form does not move."""
    g = torch.Generator().manual_seed(3)
    m, d = 3, 6
    centers = torch.randn(m, d, generator=g) * 3

    def batch(dom):
        x = torch.randn(dom.numel(), d, generator=g) * 0.1
        return x, centers[dom]

    results = {}
    for normalize in ("max", "none"):
        torch.manual_seed(0)
        model = nn.Linear(d, d)
        mixer = DGA(m, step_size=1.0, ema=0.5, update_every=1, normalize=normalize)
        tracker = DomainGradientTracker(model, m)
        for _ in range(6):
            dom = torch.arange(12) % m
            x, y = batch(dom)
            with tracker.domains(dom):
                (1e-4 * (model(x) - y).square().sum()).backward()  # tiny gradient scale
            xt, yt = batch(torch.full((12,), 2))
            tracker.record_target(1e-4 * (model(xt) - yt).square().sum())
            mixer.update(
                alignment=tracker.target_alignment(),
                counts=tracker.counts(),
                target_count=tracker.target_count(),
            )
            tracker.reset()
            model.zero_grad()
        tracker.remove()
        results[normalize] = mixer.weights
    assert float(results["max"][2]) > 0.6 and int(results["max"].argmax()) == 2
    assert float((results["none"] - 1 / 3).abs().max()) < 1e-3


def test_round_summary_is_one_short_line():
    from rnb_kernels.balancer import round_summary

    w = [0.0] * 61
    w[7], w[3] = 0.75, 0.25
    line = round_summary({"round": 5, "step": 50, "weights": w, "update_time_s": 0.5})
    assert "\n" not in line and len(line) < 120
    eff = float(np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))))
    assert f"eff. domains {eff:.2f}/61" in line
    assert "top d7=0.750 d3=0.250 d0=0.000" in line and "update 500.0 ms" in line


def test_balancer_round_line_names_domains(caplog):
    from rnb_kernels.balancer import round_summary

    rec = {"round": 1, "step": 5, "weights": [0.2, 0.8], "update_time_s": 0.001}
    assert "top winogrande=0.800 quoref=0.200" in round_summary(rec, names=["quoref", "winogrande"])
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="domain_names has 1 entries; the mixer has 2"):
        Balancer(model, Stratified(2), domain_names=["a"])
    bal = Balancer(model, Stratified(2), domain_names=["a", "b"], log_name="run7")
    with caplog.at_level(logging.INFO, logger="rnb_kernels.balancer"):
        bal.update()
    assert any(r.getMessage().startswith("run7: round 1 (step 0)") for r in caplog.records)


# ---------------------------------------------------------------------------- Balancer contracts
BALANCER_ERRORS = [
    (lambda lin: Balancer("m", Stratified(2)), TypeError, r"model must be an nn.Module, got str"),
    (lambda lin: Balancer(lin, "x"), TypeError, r"mixer must be a rnb_kernels Mixer, got str"),
    (lambda lin: Balancer(lin, Stratified(2), update_every=True), TypeError,
     r"update_every must be an int, got bool"),
    (lambda lin: Balancer(lin, Stratified(2), update_every=2.0), TypeError,
     r"update_every must be an int, got float"),
    (lambda lin: Balancer(lin, Stratified(2), update_every=0), ValueError,
     r"update_every must be >= 1, got 0"),
    (lambda lin: Balancer(lin, Stratified(2), target_fn=3), TypeError, r"target_fn must be callable"),
    (lambda lin: Balancer(lin, Stratified(2), alignment_fn=3), TypeError,
     r"alignment_fn must be callable"),
    (lambda lin: Balancer(lin, Stratified(2), domain_names=["a"]), ValueError,
     r"domain_names has 1 entries; the mixer has 2 weights"),
    (lambda lin: Balancer(lin, Stratified(2), tracker=3), TypeError,
     r"tracker must be None, a dict or a tracker, got int"),
    (lambda lin: Balancer(lin, RnB(2, eval_proportions=[1, 1]),
                          tracker=DomainGradientTracker(lin, 3)), ValueError,
     r"tracker has num_domains=3, the mixer's statistics need 2"),
]  # fmt: skip


@pytest.mark.parametrize("make, exc, message", BALANCER_ERRORS)
def test_balancer_constructor_errors_exact(make, exc, message):
    with pytest.raises(exc, match=f"^{message}$"):
        make(nn.Linear(2, 2))


def test_balancer_defaults_and_tracker_choice():
    lin = nn.Linear(2, 2)
    b = Balancer(lin, Stratified(2, update_every=3))
    assert b.update_every == 3 and b.tracker is None and b.verify_ranks is True
    assert (b.global_step, b.num_rounds, b.update_time_s, b.history) == (0, 0, 0.0, [])
    assert b.log_dir is None and b.domain_names is None and b.num_domains == 2
    assert Balancer(lin, Stratified(2), update_every=5, verify_ranks=0).verify_ranks is False
    assert Balancer(lin, Stratified(2), domain_names=("a", 7)).domain_names == ["a", "7"]
    r = Balancer(lin, RnB(2, eval_proportions=[1, 1]))
    assert isinstance(r.tracker, DomainGradientTracker) and r.tracker.num_domains == 2
    # alignment_fn replaces the tracker for DGA; a dict builds one with those arguments.
    d = Balancer(lin, DGA(2, step_size=1.0), alignment_fn=lambda: torch.ones(2))
    assert d.tracker is None
    t = Balancer(nn.Linear(2, 2), Stratified(2), tracker={"mode": "exact"})
    assert isinstance(t.tracker, DomainGradientTracker) and t.tracker.num_domains == 2
    r.close()
    t.close()


def test_balancer_record_loss_means_counts_and_errors():
    b = Balancer(nn.Linear(2, 2), ODM(3))
    b.record_loss(torch.tensor([1.0, 3.0, 5.0, 7.0]), torch.tensor([0, 0, -1, 1]))
    b.record_loss(torch.tensor([[2.0, 4.0]]), torch.tensor([[1, 1]]))  # per-token
    assert b.loss_counts().tolist() == [2.0, 3.0, 0.0]
    got = b.domain_losses()
    assert got.dtype == torch.float64 and got[:2].tolist() == [2.0, 13.0 / 3] and got[2].isnan()
    with pytest.raises(TypeError, match=r"^loss must be a torch.Tensor, got list$"):
        b.record_loss([1.0], torch.tensor([0]))
    with pytest.raises(
        ValueError,
        match=r"^loss has shape \(2,\) but domain_ids \(1,\); pass per-sample or per-token "
        r"losses \(reduction='none'\)$",
    ):
        b.record_loss(torch.ones(2), torch.tensor([0]))
    with pytest.raises(RuntimeError, match=r"^record_target needs a tracker \(the mixer uses no"):
        b.record_target(torch.ones(()))
    assert b.loss_counts().tolist() == [2.0, 3.0, 0.0]  # errors changed nothing


def test_balancer_update_history_logs_and_state(tmp_path, caplog):
    b = Balancer(nn.Linear(2, 2), Stratified(2, update_every=2), log_dir=tmp_path / "run",
                 domain_names=["x", "y"], log_name="exp")  # fmt: skip
    assert b.after_step() is None and b.global_step == 1
    b.record_loss(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0, 1, 1]))
    with caplog.at_level(logging.INFO, logger="rnb_kernels.balancer"):
        w = b.after_step()
    assert w.tolist() == [0.5, 0.5] and b.num_rounds == 1 and b.global_step == 2
    rec = b.history[-1]
    assert (rec["step"], rec["round"], rec["weights"]) == (2, 1, [0.5, 0.5])
    assert rec["counts"] == [1.0, 2.0] and rec["loss"] == [1.0, 3.0]
    assert rec["skipped_updates"] == 0 and rec["nonfinite_skips"] == 0
    assert 0.0 <= rec["update_time_s"] < 60.0 and b.update_time_s == rec["update_time_s"]
    assert any(r.getMessage().startswith("exp: round 1 (step 2): eff. domains 2.00/2, top x=0.500")
               for r in caplog.records)  # fmt: skip
    assert b.loss_counts().tolist() == [0.0, 0.0]  # the round was reset
    # A round with no losses recorded logs null losses.
    b.update()
    assert b.history[-1]["loss"] == [None, None] and b.history[-1]["round"] == 2
    assert b.update_time_s == sum(r["update_time_s"] for r in b.history)  # accumulated
    rows = (tmp_path / "run" / "mixture.csv").read_text().splitlines()
    assert rows[0] == "step,round,w0,w1,update_time_s" and len(rows) == 3
    assert rows[1].startswith("2,1,0.5,0.5,") and rows[2].startswith("2,2,0.5,0.5,")
    lines = [json.loads(x) for x in (tmp_path / "run" / "mixture.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2] and lines[0]["loss"] == [1.0, 3.0]
    # State: round counters, loss sums and the mixer round-trip; bad states are refused.
    b.record_loss(torch.tensor([6.0]), torch.tensor([1]))
    st = b.state_dict()
    assert (st["version"], st["global_step"], st["num_rounds"]) == (1, 2, 2)
    assert st["loss_sums"].tolist() == [0.0, 6.0] and st["loss_counts"].tolist() == [0.0, 1.0]
    assert st["tracker"] is None and st["sampler"] is None and st["mixer"]["type"] == "Stratified"
    fresh = Balancer(nn.Linear(2, 2), Stratified(2, update_every=2))
    fresh.load_state_dict(st)
    assert (fresh.global_step, fresh.num_rounds, fresh.update_time_s) == (2, 2, b.update_time_s)
    assert fresh.domain_losses()[1].item() == 6.0 and fresh.loss_counts().tolist() == [0.0, 1.0]
    with pytest.raises(TypeError, match=r"^state must be a dict, got list$"):
        fresh.load_state_dict([1])
    with pytest.raises(ValueError, match=r"^state and this balancer disagree on having a tracker$"):
        fresh.load_state_dict({**st, "tracker": {}})
    with pytest.raises(ValueError, match=r"^state holds a sampler; build it \(make_sampler\)"):
        fresh.load_state_dict({**st, "sampler": {}})
    b.close()


def test_round_summary_pinned():
    from rnb_kernels.balancer import round_summary

    rec = {"round": 2, "step": 20, "weights": [0.5, 0.25, 0.25], "update_time_s": 0.0012}
    assert round_summary(rec) == (
        "round 2 (step 20): eff. domains 2.83/3, top d0=0.500 d1=0.250 d2=0.250, update 1.2 ms"
    )
    # exp(entropy) of (0.25, 0.75) = 1.7548; zero weights are left out of the entropy.
    rec = {"round": 5, "step": 7, "weights": [0.0, 0.25, 0.75, 0.0], "update_time_s": 0.5}
    assert round_summary(rec, top=2, names=list("abcd")) == (
        "round 5 (step 7): eff. domains 1.75/4, top c=0.750 b=0.250, update 500.0 ms"
    )


def test_register_statistic_checks_the_name():
    from rnb_kernels.balancer import register_statistic, statistic_names

    for bad in ("", 3):
        with pytest.raises(ValueError, match=r"^name must be a non-empty str$"):
            register_statistic(bad)
    with pytest.raises(
        ValueError, match=r"^statistic 'gram' is already registered; pass replace=True$"
    ):
        register_statistic("gram")(lambda b: None)
    assert {"gram", "gram_vec", "alignment", "target_count", "counts", "losses",
            "loss_counts"} <= set(statistic_names())  # fmt: skip


def test_balancer_loop_hooks_without_a_tracker():
    """step() validates ids and feeds record_loss; optimizer_step steps, zeroes, counts."""
    model = nn.Linear(2, 1)
    b = Balancer(model, ODM(2, update_every=2))
    with b.step([0, 1, -1]) as s:
        assert s.domain_ids.dtype == torch.int64 and s.domain_ids.tolist() == [0, 1, -1]
        s.record_loss(torch.tensor([1.0, 2.0, 9.0]))
    assert b.loss_counts().tolist() == [1.0, 1.0] and b.domain_losses().tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"^domain_ids must lie in \[-1, num_domains=2\)"):
        with b.step([0, 2]):
            pass
    model(torch.ones(1, 2)).sum().backward()
    before = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)

    class Scaler:
        calls: list[str] = []

        def step(self, o):
            self.calls.append("step")
            o.step()

        def update(self):
            self.calls.append("update")

    sc = Scaler()
    assert b.optimizer_step(opt, scaler=sc) is None and sc.calls == ["step", "update"]
    assert model.weight.grad is None and not torch.equal(model.weight, before)
    assert b.global_step == 1
    w = b.optimizer_step(opt)  # second step closes the round (update_every=2)
    assert w is not None and b.num_rounds == 1 and b.global_step == 2


def test_balancer_statistics_follow_the_configuration():
    from rnb_kernels.balancer import needs_tracker

    assert needs_tracker(RnB) and needs_tracker(DGA(2, step_size=1.0))
    assert not needs_tracker(ODM) and not needs_tracker(Stratified(2))
    # DGA with alignment_fn: alignment from the function, no counts / target_count.
    seen = {}

    class Spy(DGA):
        def update(self, **stats):
            seen.update(stats)
            return super().update(**stats)

    b = Balancer(
        nn.Linear(2, 2), Spy(2, step_size=1.0), alignment_fn=lambda: torch.tensor([1.0, -1.0])
    )
    w = b.update()
    assert set(seen) == {"alignment"} and seen["alignment"].tolist() == [1.0, -1.0]
    assert w[0] > w[1]
    # Without a tracker, counts are what record_loss saw.
    stats = {}

    class Spy2(ODM):
        def update(self, **kw):
            stats.update(kw)
            return super().update(**kw)

    o = Balancer(nn.Linear(2, 2), Spy2(2))
    o.record_loss(torch.tensor([3.0, 5.0, 7.0]), torch.tensor([1, 1, 0]))
    o.update()
    assert stats["counts"].tolist() == [1.0, 2.0] and stats["losses"].tolist() == [7.0, 4.0]


def test_balancer_csv_header_written_once_per_file(tmp_path):
    for _ in range(2):  # a second balancer appending to the same log_dir (a resumed run)
        b = Balancer(nn.Linear(2, 2), Stratified(3), log_dir=tmp_path)
        b.update()
        b.close()
    rows = (tmp_path / "mixture.csv").read_text().splitlines()
    assert rows[0] == "step,round,w0,w1,w2,update_time_s" and len(rows) == 3
    assert all(not r.startswith("step") for r in rows[1:])
    assert len((tmp_path / "mixture.jsonl").read_text().splitlines()) == 2


def test_balancer_make_sampler_follows_the_mixer_and_is_saved():
    b = Balancer(nn.Linear(2, 2), Static([0.0, 1.0]))
    s = b.make_sampler([0, 1, 0, 1], batch_size=2, seed=5, num_samples=3)
    assert b.sampler is s and s.seed == 5 and s.batch_size == 2 and len(s) == 3
    assert set(list(s)) <= {1, 3}  # weight only on domain 1
    assert Balancer(nn.Linear(2, 2), Static([1.0, 1.0])).make_sampler([0, 1], 2).seed == 0
    st = b.state_dict()
    assert st["sampler"]["config"]["seed"] == 5
    fresh = Balancer(nn.Linear(2, 2), Static([0.0, 1.0]))
    fresh.make_sampler([0, 1, 0, 1], batch_size=2, seed=5, num_samples=3)
    fresh.load_state_dict(st)
    assert fresh.sampler.state_dict()["rng"] == s.state_dict()["rng"]
    # A state saved without a sampler leaves this balancer's sampler as it is.
    before = fresh.sampler.state_dict()["rng"]
    fresh.load_state_dict({**st, "sampler": None})
    assert fresh.sampler.state_dict()["rng"] == before


def test_balancer_tensorboard_scalars_and_missing_tensorboard(tmp_path, monkeypatch, caplog):
    """With a SummaryWriter (a recording stand-in here) every update logs the weights, the
    per-domain losses that exist and the update time; close() closes it."""
    import sys
    import types

    import rnb_kernels.balancer as bal_mod

    calls = []

    class Writer:
        def __init__(self, log_dir):
            calls.append(("init", str(log_dir)))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    b = Balancer(nn.Linear(2, 2), Stratified(2), log_dir=tmp_path)
    b.record_loss(torch.tensor([2.0]), torch.tensor([1]))
    b.global_step = 4
    b.update()
    b.close()
    b.close()  # idempotent
    t = b.history[0]["update_time_s"]
    assert calls == [
        ("init", str(tmp_path)),
        ("mixture/w0", 0.5, 4), ("mixture/w1", 0.5, 4),
        ("loss/domain1", 2.0, 4),  # domain 0 recorded no loss: nothing logged for it
        ("mixture/update_time_s", t, 4),
        ("close",),
    ]  # fmt: skip
    # Without tensorboard: one INFO line per process, CSV/JSONL still written.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(bal_mod, "_TB_MISSING_LOGGED", False)
    with caplog.at_level(logging.INFO, logger="rnb_kernels.balancer"):
        Balancer(nn.Linear(2, 2), Stratified(2), log_dir=tmp_path / "a")
        Balancer(nn.Linear(2, 2), Stratified(2), log_dir=tmp_path / "b")
    missing = [r for r in caplog.records if "tensorboard" in r.getMessage()]
    assert [r.getMessage() for r in missing] == [
        "tensorboard not installed; logging CSV and JSONL only"
    ]
    assert bal_mod._TB_MISSING_LOGGED is True and (tmp_path / "b").is_dir()


def test_balancer_on_a_model_without_parameters_keeps_losses_on_the_cpu():
    b = Balancer(nn.ReLU(), Stratified(2))
    b.record_loss(torch.tensor([1.0, 3.0]), torch.tensor([0, 0]))
    assert b._loss_sums.device.type == "cpu" and b.domain_losses()[0].item() == 2.0


def test_balancer_record_target_passes_loss_and_mask_to_the_tracker():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    b = Balancer(model, DGA(2, step_size=1.0))
    x = torch.randn(4, 3)
    b.record_target(model(x).pow(2).sum())
    assert b.tracker.target_count() == 4.0
    b.tracker.reset()
    b.record_target(model(x).pow(2).sum(), mask=torch.tensor([True, False, True, False]))
    assert b.tracker.target_count() == 2.0
    b.close()


def test_registered_statistic_keeps_its_name_and_tracker_need():
    from rnb_kernels.balancer import (
        _STATISTICS,
        needs_tracker,
        register_statistic,
        unregister_statistic,
    )
    from rnb_kernels.mixing import Mixer

    class NeedsToy(Mixer):
        requires = ("toy-grad-stat",)

        def update(self, **stats):
            return self.weights

    try:
        register_statistic("toy-grad-stat", needs_tracker=True)(lambda bal: None)
        assert _STATISTICS["toy-grad-stat"].name == "toy-grad-stat"
        assert needs_tracker(NeedsToy) is True
        register_statistic("toy-grad-stat", replace=True)(lambda bal: None)  # default: no
        assert needs_tracker(NeedsToy) is False
    finally:
        unregister_statistic("toy-grad-stat")
    unregister_statistic("toy-grad-stat")  # removing an unknown name is a no-op
    assert "toy-grad-stat" not in _STATISTICS and needs_tracker(NeedsToy) is False


def test_round_summary_defaults_to_three_heads_in_float64():
    from rnb_kernels.balancer import round_summary

    # exp(entropy) of (0.4, 0.3, 0.2, 0.1) = 3.5961; only the three heaviest are listed.
    rec = {"round": 1, "step": 1, "weights": [0.4, 0.3, 0.2, 0.1], "update_time_s": 0.0}
    assert round_summary(rec) == (
        "round 1 (step 1): eff. domains 3.60/4, top d0=0.400 d1=0.300 d2=0.200, update 0.0 ms"
    )
    # 0.0025 is printed from its float64 value (0.003); a float32 copy would print 0.002.
    rec = {"round": 1, "step": 1, "weights": [0.9975, 0.0025], "update_time_s": 0.0}
    assert round_summary(rec) == (
        "round 1 (step 1): eff. domains 1.02/2, top d0=0.998 d1=0.003, update 0.0 ms"
    )


def test_balancer_log_lines_without_a_run_label_and_debug_weights(caplog):
    b = Balancer(nn.Linear(2, 2), Stratified(2))
    with caplog.at_level(logging.DEBUG, logger="rnb_kernels.balancer"):
        b.update()
    msgs = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert msgs[0][0] == logging.INFO and msgs[0][1].startswith("round 1 (step 0): eff. domains")
    assert msgs[1] == (logging.DEBUG, "round 1 weights [0.5, 0.5]")


def test_balancer_record_reports_the_trackers_nonfinite_skips():
    b = Balancer(nn.Linear(2, 2), RnB(2, eval_proportions=[1, 1]))
    b.tracker.nonfinite_skips = 3  # as if three micro-batches had been dropped
    b.update()
    assert b.history[-1]["nonfinite_skips"] == 3
    b.close()


def test_balancer_keeps_what_it_is_given_and_accumulates_in_float64():
    from rnb_kernels.mixing import Mixer
    from rnb_kernels.sampling import MixtureSampler

    model = nn.Linear(2, 2)
    sampler = MixtureSampler([0, 1], weights=[1, 1], batch_size=2)
    tracker = DomainGradientTracker(model, 2)
    b = Balancer(model, RnB(2, eval_proportions=[1, 1]), sampler=sampler, tracker=tracker)
    assert b.model is model and b.sampler is sampler and b.tracker is tracker
    assert b.state_dict()["sampler"]["config"]["sizes"] == [1, 1]
    b.close()

    class Needs(Mixer):
        requires = ("no-such-stat",)

        def update(self, **stats):
            return self.weights

    with pytest.raises(
        ValueError,
        match=r"^mixer Needs requires unknown statistics \['no-such-stat'\]; registered: \[",
    ):
        Balancer(model, Needs(2))
    # Loss sums and counts are float64: 2**24 + 1 survives (a float32 sum would round it).
    o = Balancer(model, ODM(2))
    o.record_loss(torch.tensor([16777217.0], dtype=torch.float64), torch.tensor([0]))
    st = o.state_dict()
    assert st["loss_sums"].dtype == torch.float64 and st["loss_counts"].dtype == torch.float64
    assert o.domain_losses()[0].item() == 16777217.0
