"""Known-answer wiring tests: Balancer -> statistics -> mixer, checked from the outside.

A real (small) language model is trained through the :class:`~rnb_kernels.Balancer` and its
:class:`~rnb_kernels.MixtureSampler` on domains whose token distributions genuinely differ.
Alongside, every statistic a mixer needs is recomputed independently: a float64 copy of the
model at the same parameters, one ``torch.autograd.grad`` per domain (no tracker anywhere), and
the mixers' formulas written out here in numpy. After each round the Balancer's weights must
equal that formula's output. A Balancer that hands a mixer the wrong counts, the wrong sign or
the wrong domain's statistics fails here, and so does one whose statistics are fp32-grade where
the claim is float64 (the formulas amplify nothing, so the tolerances are tight).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from rnb_kernels import DGA, ODM, Balancer, RnB
from rnb_kernels.mixing import domain_gradient_alignment

M = 4  # domains
SLICE = 8  # vocabulary tokens per domain
V = M * SLICE
T = 8  # tokens per sequence
B = 12  # batch size
N_PER_DOMAIN = 60
# Weights from fp32 statistics (the tracker's accumulators) against the float64 formula:
# relative errors of ~1e-6 in G or the alignment move a weight by < 1e-5.
W_ATOL = 2e-5


class TinyLM(nn.Module):
    """Embedding -> tanh(Linear) -> LM head (the head is the tracked layer)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(tokens))))


def corpus(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Domain d lives in its own vocabulary slice and walks it with its own stride, so both the
    token distribution and the next-token rule differ between domains."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(M).repeat_interleave(N_PER_DOMAIN)
    start = torch.randint(0, SLICE, (len(labels), 1), generator=g)
    stride = (labels[:, None] + 1) * torch.arange(T)[None, :]
    noise = (torch.rand(len(labels), T, generator=g) < 0.2).long()
    tokens = (start + stride + noise) % SLICE + SLICE * labels[:, None]
    perm = torch.randperm(len(labels), generator=g)
    return tokens[perm], labels[perm]


def per_sample_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over each sequence: ``[len(x)]``."""
    logits = model(x[:, :-1])
    tok = nn.functional.cross_entropy(
        logits.reshape(-1, V), x[:, 1:].reshape(-1), reduction="none"
    ).view(len(x), -1)
    return tok.sum(1)


def mean_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return per_sample_loss(model, x).mean()


def f64(model: nn.Module) -> nn.Module:
    """A float64 copy of the model at its current parameters (no tracker: a deepcopy of a
    tracked model would carry the swapped forward, so copy the state into a fresh model)."""
    ref = TinyLM().double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return ref


def head_grad(ref: nn.Module, x: torch.Tensor, reduce=per_sample_loss) -> np.ndarray:
    """float64 gradient of ``sum(loss)`` w.r.t. the head's weight and bias, flattened as the
    tracker orders them (weight row-major, then bias)."""
    loss = reduce(ref, x).sum()
    gw, gb = torch.autograd.grad(loss, [ref.head.weight, ref.head.bias])
    return torch.cat([gw.reshape(-1), gb]).numpy()


def full_grad(ref: nn.Module, x: torch.Tensor) -> np.ndarray:
    loss = mean_loss(ref, x)
    gs = torch.autograd.grad(loss, list(ref.parameters()))
    return torch.cat([g.reshape(-1) for g in gs]).numpy()


class RoundStats:
    """Independent per-round statistics: per-domain gradient sums (float64) and counts."""

    def __init__(self, p: int) -> None:
        self.sums = np.zeros((M, p))
        self.counts = np.zeros(M)
        self.loss_sums = np.zeros(M)

    def add(self, model: nn.Module, x: torch.Tensor, ids: torch.Tensor) -> None:
        ref = f64(model)
        for d in range(M):
            rows = ids == d
            if bool(rows.any()):
                self.sums[d] += head_grad(ref, x[rows])
                self.counts[d] += int(rows.sum())
                with torch.no_grad():
                    self.loss_sums[d] += float(per_sample_loss(ref, x[rows]).sum())


# ------------------------------------------------------------------ the formulas, in numpy


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def rnb_formula(sums: np.ndarray, counts: np.ndarray, p_eval, lam: float) -> np.ndarray:
    """R&B (Ge et al.): G of mean gradients, p' = softmax(lam * G p / ||G p||)."""
    p = np.asarray(p_eval, dtype=np.float64)
    p = p / p.sum()
    means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 0.0)
    v = (means @ means.T) @ p
    return softmax(lam * v / np.linalg.norm(v))


class DGAFormula:
    """DGA (Fan et al.): alpha_hat ∝ alpha * exp(eta * a); alpha <- (1 - ema) alpha + ema
    alpha_hat. ``normalize="max"`` (the mixer's default) first divides the alignments by the
    largest |alignment| seen so far; ``"none"`` is the paper's raw step."""

    def __init__(self, eta: float, ema: float, normalize: str = "max") -> None:
        self.eta, self.ema, self.normalize = eta, ema, normalize
        self.alpha = np.full(M, 1.0 / M)
        self.scale = 0.0

    def step(self, a: np.ndarray) -> np.ndarray:
        if self.normalize == "max":
            self.scale = max(self.scale, float(np.abs(a).max()))
            a = a / self.scale
        hat = self.alpha * np.exp(self.eta * (a - a.max()))
        hat = hat / hat.sum()
        new = (1 - self.ema) * self.alpha + self.ema * hat
        self.alpha = new / new.sum()
        return self.alpha


class Exp3:
    """ODM (Albalak et al., Alg. 1): EXP3 with smoothed importance-weighted loss rewards."""

    def __init__(self, k: int, smoothing: float) -> None:
        self.k, self.a = k, smoothing
        self.r = np.zeros(k)
        self.pi = np.full(k, 1.0 / k)
        self.t = 0

    def eps(self, t: int) -> float:
        return min(1.0 / self.k, math.sqrt(math.log(self.k) / (self.k * t)))

    def step(self, mean_losses: np.ndarray, counts: np.ndarray) -> np.ndarray:
        seen = counts > 0
        self.r[seen] = self.a * self.r[seen] + (1 - self.a) * mean_losses[seen] / self.pi[seen]
        self.t += 1
        e_t, e_next = self.eps(self.t), self.eps(self.t + 1)
        pi = (1 - self.k * e_next) * softmax(e_t * self.r) + e_next
        self.pi = pi / pi.sum()
        return self.pi


# ------------------------------------------------------------------ the training loop


def setup(mixer, seed: int = 0, **balancer_kw):
    torch.manual_seed(seed)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tokens, labels = corpus(seed)
    bal = Balancer(model, mixer, **balancer_kw)
    it = iter(bal.make_sampler(labels, batch_size=B, seed=seed))
    return model, opt, bal, tokens, labels, it


def train_rounds(model, opt, bal, tokens, labels, it, rounds, on_round):
    """Train ``rounds`` rounds; before each micro-batch's backward record the independent
    statistics; at each round's end call ``on_round(weights, stats, model)`` (after the
    optimizer step, where the Balancer's update reads the model)."""
    k = bal.update_every
    p = model.head.weight.numel() + model.head.bias.numel()
    for _ in range(rounds):
        stats = RoundStats(p)
        for step in range(k):
            idx = torch.tensor([next(it) for _ in range(B)])
            x, ids = tokens[idx], labels[idx]
            stats.add(model, x, ids)
            with bal.step(ids) as s:
                loss = per_sample_loss(model, x)
                s.record_loss(loss)
                loss.sum().backward()
            opt.step()
            opt.zero_grad()
            expected = on_round(stats, model) if step == k - 1 else None
            w = bal.after_step()
            if step < k - 1:
                assert w is None
            else:
                assert w is not None
                np.testing.assert_array_equal(bal.history[-1]["counts"], stats.counts)
                np.testing.assert_allclose(w.numpy(), expected, rtol=0, atol=W_ATOL)
    return bal


def spe_batch(d: int, n: int = 10, seed: int = 1) -> torch.Tensor:
    tokens, labels = corpus(seed)
    return tokens[labels == d][:n]


# ------------------------------------------------------------------ R&B


@pytest.mark.parametrize("p_eval", [[0.4, 0.3, 0.2, 0.1], [0.0, 0.0, 1.0, 0.0]])
def test_rnb_weights_equal_formula_on_independent_statistics(p_eval):
    lam = 2.0
    mixer = RnB(M, eval_proportions=p_eval, lam=lam, update_every=2)
    parts = setup(mixer)

    def expected(stats, model):
        return rnb_formula(stats.sums, stats.counts, p_eval, lam)

    train_rounds(*parts, rounds=3, on_round=expected)


@pytest.mark.parametrize("d", range(M))
def test_rnb_eval_mass_on_one_domain_raises_it(d):
    p_eval = np.eye(M)[d]
    mixer = RnB(M, eval_proportions=p_eval, lam=2.0, update_every=2)
    model, opt, bal, tokens, labels, it = setup(mixer)
    train_rounds(model, opt, bal, tokens, labels, it, 2, lambda s, m: rnb_formula(
        s.sums, s.counts, p_eval, 2.0))  # fmt: skip
    w = mixer.weights.numpy()
    assert int(np.argmax(w)) == d and w[d] > 1.0 / M + 0.1, w


# ------------------------------------------------------------------ DGA


def _dga_target_fn_run(d, eta, ema, rounds, normalize="max"):
    spe = spe_batch(d)
    mixer = DGA(M, step_size=eta, ema=ema, update_every=2, normalize=normalize)
    holder: dict = {}
    model, opt, bal, tokens, labels, it = setup(
        mixer, target_fn=lambda: per_sample_loss(holder["model"], spe).sum()
    )
    holder["model"] = model
    formula = DGAFormula(eta, ema, normalize)
    trajectory = [formula.alpha]

    def expected(stats, model):
        g_t = head_grad(f64(model), spe)  # the target's gradient sum at the update's params
        n_t = len(spe)
        a = np.where(stats.counts > 0, stats.sums @ g_t / (np.maximum(stats.counts, 1) * n_t), 0.0)
        trajectory.append(formula.step(a))
        return trajectory[-1]

    train_rounds(model, opt, bal, tokens, labels, it, rounds, expected)
    return np.array(trajectory), mixer


@pytest.mark.parametrize("normalize, eta", [("max", 1.0), ("none", 0.05)])
def test_dga_target_row_weights_equal_formula(normalize, eta):
    _dga_target_fn_run(d=2, eta=eta, ema=0.5, rounds=3, normalize=normalize)


@pytest.mark.parametrize("d", range(M))
def test_dga_target_equal_to_a_domain_raises_it(d):
    traj, mixer = _dga_target_fn_run(d=d, eta=1.5, ema=1.0, rounds=3)
    assert traj[1, d] > 1.0 / M + 0.1, traj  # the first round moves toward the target
    for w in traj[1:]:  # and d stays the heaviest domain every round after
        assert int(np.argmax(w)) == d and w[d] > 1.0 / M, traj


def test_dga_paper_alignment_fn_weights_equal_formula():
    eta, ema, d_t = 0.5, 0.5, 1
    spe = spe_batch(d_t)
    probe_tokens, probe_labels = corpus(seed=2)
    probes = [probe_tokens[probe_labels == d][:6] for d in range(M)]
    holder: dict = {}
    mixer = DGA(M, step_size=eta, ema=ema, update_every=2, normalize="none")
    model, opt, bal, tokens, labels, it = setup(
        mixer,
        alignment_fn=lambda: domain_gradient_alignment(holder["model"], mean_loss, probes, spe),
    )
    holder["model"] = model
    assert bal.tracker is None  # the paper's source needs no tracker
    formula = DGAFormula(eta, ema, normalize="none")
    history = [formula.alpha]

    def expected(stats, model):
        ref = f64(model)
        g_t = full_grad(ref, spe)
        a = np.array([full_grad(ref, probes[d]) @ g_t for d in range(M)])
        history.append(formula.step(a))
        return history[-1]

    # Counts come from record_loss() here (no tracker): they still match the batches drawn.
    train_rounds(model, opt, bal, tokens, labels, it, 3, expected)
    w = np.array(history)[:, d_t]
    assert np.all(np.diff(w) > 0), w


# ------------------------------------------------------------------ ODM


def test_odm_weights_equal_exp3_on_independent_losses():
    smoothing = 0.5
    mixer = ODM(M, smoothing=smoothing, update_every=2)
    ref = Exp3(M, smoothing)

    def expected(stats, model):
        means = np.where(stats.counts > 0, stats.loss_sums / np.maximum(stats.counts, 1), 0.0)
        return ref.step(means, stats.counts)

    model, opt, bal, tokens, labels, it = setup(mixer)
    assert bal.tracker is None
    train_rounds(model, opt, bal, tokens, labels, it, 4, expected)


def test_independent_statistics_see_genuinely_different_domains():
    """Guard for the tests above: the domains' mean head gradients are far from parallel, so a
    statistic credited to the wrong domain changes the weights."""
    torch.manual_seed(0)
    model = TinyLM()
    tokens, labels = corpus()
    ref = f64(model)
    g = np.stack([head_grad(ref, tokens[labels == d][:20]) for d in range(M)])
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    cos = g @ g.T
    assert np.abs(cos - np.eye(M)).max() < 0.5, cos
    # Token distributions are disjoint slices of the vocabulary.
    for d in range(M):
        assert set(tokens[labels == d].unique().tolist()) <= set(range(d * SLICE, (d + 1) * SLICE))


def test_rnb_formula_is_not_invariant_to_counts():
    """The R&B check above can see wrong counts: with counts of 1 the formula's answer moves."""
    mixer = RnB(M, eval_proportions=[0.4, 0.3, 0.2, 0.1], lam=2.0, update_every=2)
    model, opt, bal, tokens, labels, it = setup(mixer)
    seen = {}

    def expected(stats, model):
        seen["stats"] = copy.deepcopy(stats)
        return rnb_formula(stats.sums, stats.counts, [0.4, 0.3, 0.2, 0.1], 2.0)

    train_rounds(model, opt, bal, tokens, labels, it, 1, expected)
    s = seen["stats"]
    right = rnb_formula(s.sums, s.counts, [0.4, 0.3, 0.2, 0.1], 2.0)
    wrong = rnb_formula(s.sums, np.ones(M), [0.4, 0.3, 0.2, 0.1], 2.0)
    assert np.abs(right - wrong).max() > 100 * W_ATOL


# ------------------------------------------------------------------ tracker statistics: float64


def test_tracker_gram_and_gram_vector_are_float64_accurate():
    """tracker.gram() / gram_vector() of its fp32 accumulators: float64 products summed in
    float64, per entry, on a layer wide enough (P = 131,584) that an fp32 Gram misses the bound
    by orders of magnitude. Domains get gradients of very different sizes (a small domain's
    entries are held to their own scale, not the large domain's)."""
    from _tol import EPS, assert_dot_close, exact_products

    from rnb_kernels import DomainGradientTracker

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 512))
    tracker = DomainGradientTracker(model, num_domains=4)
    x = torch.randn(24, 64)
    ids = torch.arange(24) % 4
    weight = torch.tensor([1e3, 1.0, 1e-3, 1.0])[ids]  # per-sample loss scale by domain
    with tracker.domains(ids):
        (model(x).square().sum(1) * weight).sum().backward()
    a = tracker.domain_grads()
    assert a.shape == (4, 256 * 512 + 512)
    assert_dot_close(tracker.gram(), a, None, torch.float64, "tracker.gram")
    c = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    ref, mag = exact_products(a)
    bound = 8.0 * a.shape[1] ** 0.5 * EPS[torch.float64] * (mag @ c) * 4
    assert bool(((tracker.gram_vector(c) - ref @ c).abs() <= bound).all())
    tracker.remove()
