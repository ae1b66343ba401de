"""Mixer contracts the formula tests do not reach (found by mutation testing, see
benchmarks/results/mutation.md): errors name the exact argument, saved state is validated
field by field and restored exactly, and every registered mixer builds from a MixingContext."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from rnb_kernels.mixing import (
    DGA,
    ODM,
    DGADistribution,
    MixingContext,
    RnB,
    Static,
    Stratified,
    build_mixer,
    get_mixer,
    mixer_names,
)
from rnb_kernels.mixing.base import as_float64, as_simplex, check_counts, check_float, check_int

F64 = torch.float64


# ------------------------------------------------------------------ errors name the argument


@pytest.mark.parametrize(
    "call, exc, message",
    [
        (lambda m: m.update(gram=torch.eye(3), counts=torch.ones(4)), ValueError,
         r"^gram must have shape \(4, 4\), got \(3, 3\)$"),
        (lambda m: m.update(gram=torch.eye(4), counts=torch.ones(3)), ValueError,
         r"^counts must have shape \(4,\), got \(3,\)$"),
        (lambda m: m.update(gram=torch.eye(4), counts=-torch.ones(4)), ValueError,
         r"^counts must be finite and non-negative"),
    ],
)  # fmt: skip
def test_rnb_errors_name_the_argument(call, exc, message):
    with pytest.raises(exc, match=message):
        call(RnB(4, eval_proportions=[1, 1, 1, 1]))


def test_dga_errors_name_the_argument():
    m = DGA(3, step_size=1.0)
    with pytest.raises(ValueError, match=r"^alignment must have shape \(3,\), got \(2,\)$"):
        m.update(alignment=torch.ones(2))
    with pytest.raises(ValueError, match=r"^counts must have shape \(3,\)"):
        m.update(alignment=torch.ones(3), counts=torch.ones(2), target_count=1.0)
    with pytest.raises(ValueError, match=r"^target_count must be >= 0.0, got -1.0$"):
        m.update(alignment=torch.ones(3), counts=torch.ones(3), target_count=-1.0)
    with pytest.raises(ValueError, match=r"^target_count is required when counts are given"):
        m.update(alignment=torch.ones(3), counts=torch.ones(3))
    with pytest.raises(ValueError, match=r"^target_count is only meaningful with counts"):
        m.update(alignment=torch.ones(3), target_count=2.0)
    with pytest.raises(ValueError, match=r"^step_size must be > 0.0, got 0.0$"):
        DGA(3, step_size=0.0)
    with pytest.raises(ValueError, match=r"^ema must be <= 1.0, got 1.5$"):
        DGA(3, step_size=1.0, ema=1.5)


def test_odm_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^losses must have shape \(3,\), got \(2,\)$"):
        ODM(3).update(losses=torch.ones(2), counts=torch.ones(3))
    with pytest.raises(ValueError, match=r"^counts must have shape \(3,\)"):
        ODM(3).update(losses=torch.ones(3), counts=torch.ones(2))
    with pytest.raises(ValueError, match=r"^smoothing must be < 1"):
        ODM(3, smoothing=1.0)
    with pytest.raises(ValueError, match=r"^smoothing must be >= 0.0, got -0.1$"):
        ODM(3, smoothing=-0.1)


def test_rnb_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^eval_proportions must have shape \(3,\)"):
        RnB(3, eval_proportions=[1, 1])
    with pytest.raises(ValueError, match=r"^eval_proportions must be non-negative"):
        RnB(3, eval_proportions=[1, -1, 1])
    with pytest.raises(ValueError, match=r"^lam must be > 0.0, got 0.0$"):
        RnB(3, eval_proportions=[1, 1, 1], lam=0.0)
    with pytest.raises(ValueError, match=r"^init_weights must sum to a positive number"):
        RnB(3, eval_proportions=[1, 1, 1], init_weights=[0, 0, 0])


# ------------------------------------------------------------------ state: validated, restored


def _rnb_state(**changes):
    s = RnB(3, eval_proportions=[3, 1, 0], lam=2.5).state_dict()
    s.update(changes)
    return s


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(eval_proportions=torch.tensor([1.0, -1.0, 1.0], dtype=F64)),
         r"^state\['eval_proportions'\] must be non-negative"),
        (dict(eval_proportions=torch.ones(2, dtype=F64)),
         r"^state\['eval_proportions'\] must have shape \(3,\)"),
        (dict(lam=0.0), r"^state\['lam'\] must be > 0.0, got 0.0$"),
        (dict(lam=float("inf")), r"^state\['lam'\] must be finite"),
    ],
)  # fmt: skip
def test_rnb_load_state_validates_each_field_before_changing_anything(changes, message):
    mixer = RnB(3, eval_proportions=[1, 1, 1], lam=1.0)
    before = mixer.state_dict()
    with pytest.raises(ValueError, match=message):
        mixer.load_state_dict(_rnb_state(**changes))
    after = mixer.state_dict()
    assert torch.equal(after["eval_proportions"], before["eval_proportions"])
    assert after["lam"] == before["lam"] and torch.equal(after["weights"], before["weights"])


def test_rnb_load_state_restores_hyperparameters_exactly():
    mixer = RnB(3, eval_proportions=[1, 1, 1], lam=1.0)
    mixer.load_state_dict(_rnb_state())
    assert mixer.lam == 2.5
    assert mixer.eval_proportions.dtype == F64
    assert mixer.eval_proportions.tolist() == [0.75, 0.25, 0.0]
    G = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    fresh = RnB(3, eval_proportions=[3, 1, 0], lam=2.5)
    n = torch.ones(3, dtype=F64)
    assert torch.equal(mixer.update(gram=G, counts=n), fresh.update(gram=G, counts=n))


def test_dga_load_state_restores_step_size_and_ema():
    """A DGA resumed from a checkpoint steps with the saved step size and EMA, as RnB and ODM
    restore theirs (state_dict promises a bit-exact resume)."""
    saved = DGA(3, step_size=3.0, ema=0.25)
    saved.update(alignment=torch.tensor([1.0, 0.0, -1.0]))
    other = DGA(3, step_size=1.0, ema=1.0)
    other.load_state_dict(saved.state_dict())
    assert (other.step_size, other.ema) == (3.0, 0.25)
    a = torch.tensor([0.2, -0.4, 0.1])
    assert torch.equal(other.update(alignment=a), saved.update(alignment=a))
    bad = saved.state_dict()
    bad["ema"] = 0.0
    with pytest.raises(ValueError, match=r"^state\['ema'\] must be > 0.0"):
        other.load_state_dict(bad)


def test_dga_distribution_load_state_restores_bases():
    b1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], dtype=F64)
    b2 = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.5, 0.0]], dtype=F64)
    saved, other = DGADistribution(b1, step_size=1.0), DGADistribution(b2, step_size=1.0)
    other.load_state_dict(saved.state_dict())
    assert torch.equal(other.bases, saved.bases)
    assert torch.equal(other.sampling_weights, saved.sampling_weights)
    bad = saved.state_dict()
    bad["bases"] = torch.ones(3, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"^state\['bases'\] must have shape \(2, 3\)"):
        other.load_state_dict(bad)


def test_odm_load_state_validates_rewards():
    s = ODM(3).state_dict()
    s["rewards"] = torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError, match=r"^state\['rewards'\] must have shape \(3,\)"):
        ODM(3).load_state_dict(s)


# ------------------------------------------------------------------ the registry


def test_every_builtin_mixer_is_registered_by_name():
    assert {"rnb", "dga", "dga-distribution", "odm", "static", "stratified"} <= set(mixer_names())
    assert get_mixer("rnb") is RnB and get_mixer("odm") is ODM
    with pytest.raises(ValueError, match=r"^unknown mixer 'nope'"):
        get_mixer("nope")


def test_build_mixer_reads_what_each_mixer_needs_from_the_context():
    ctx = MixingContext(
        num_domains=3, eval_proportions=[2.0, 1.0, 1.0], domain_sizes=[10, 30, 60],
        update_every=7,
    )  # fmt: skip
    rnb = build_mixer("rnb", ctx, lam=3.0)
    assert isinstance(rnb, RnB) and rnb.lam == 3.0 and rnb.update_every == 7
    assert rnb.eval_proportions.tolist() == [0.5, 0.25, 0.25]
    over = build_mixer("rnb", ctx, eval_proportions=[0, 0, 1], update_every=2)
    assert over.eval_proportions.tolist() == [0.0, 0.0, 1.0] and over.update_every == 2
    static = build_mixer("static", ctx)
    assert isinstance(static, Static) and static.weights.tolist() == [0.1, 0.3, 0.6]
    assert build_mixer("static", ctx, weights=[1, 1, 2]).weights.tolist() == [0.25, 0.25, 0.5]
    strat = build_mixer("stratified", ctx)
    assert isinstance(strat, Stratified) and strat.update_every == 7
    dga = build_mixer("dga", ctx, step_size=2.0)
    assert isinstance(dga, DGA) and dga.step_size == 2.0 and dga.update_every == 7
    assert isinstance(build_mixer("odm", 4), ODM)
    bases = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    dd = build_mixer("dga-distribution", ctx, bases=bases, step_size=1.0)
    assert dd.num_clusters == 3 and dd.update_every == 7


def test_build_mixer_says_what_is_missing():
    with pytest.raises(ValueError, match=r"^mixer 'rnb' needs MixingContext.eval_proportions$"):
        build_mixer("rnb", MixingContext(num_domains=3))
    with pytest.raises(ValueError, match=r"^mixer 'static' needs MixingContext.domain_sizes$"):
        build_mixer("static", MixingContext(num_domains=3))
    with pytest.raises(ValueError, match=r"^mixer 'dga-distribution' needs bases"):
        build_mixer("dga-distribution", MixingContext(num_domains=3), step_size=1.0)
    with pytest.raises(ValueError, match=r"^bases cover 2 clusters, the data has 3$"):
        build_mixer("dga-distribution", 3, bases=np.eye(2), step_size=1.0)
    with pytest.raises(TypeError, match=r"^context must be a MixingContext"):
        build_mixer("rnb", "three")


# ------------------------------------------------------------------ DGADistribution


def _dd(**kw):
    bases = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], dtype=F64)
    return DGADistribution(bases, step_size=1.0, **kw)


def test_dga_distribution_update_errors_and_skips_say_why():
    m = _dd()
    with pytest.raises(ValueError, match=r"^level must be 'cluster' or 'basis', got 'fine'$"):
        m.update(alignment=torch.ones(3), level="fine")
    with pytest.raises(ValueError, match=r"^target_count is required when counts are given "
                       r"\(basis sums\)$"):  # fmt: skip
        m.update(alignment=torch.ones(2), counts=torch.ones(2), level="basis")
    with pytest.raises(ValueError, match=r"\(cluster sums\)$"):
        m.update(alignment=torch.ones(3), counts=torch.ones(3))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no target yet is routine: no warning
        w = m.update(alignment=torch.ones(3), counts=torch.ones(3), target_count=0.0)
    assert m.last_skip_reason == "no target gradient recorded (target_count = 0)"
    assert torch.equal(w, m.weights) and m.skipped_updates == 1
    with pytest.warns(RuntimeWarning, match="non-finite gradient alignment"):
        m.update(alignment=torch.tensor([1.0, float("nan"), 0.0]))
    assert m.last_skip_reason == "non-finite gradient alignment" and m.skipped_updates == 2


def test_dga_distribution_cluster_alignments_project_onto_the_bases():
    m = _dd(ema=1.0, normalize="none")
    a = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    w = m.update(alignment=a)
    proj = torch.tensor([0.5, 0.5], dtype=F64)  # B · a
    want = torch.softmax(torch.log(torch.full((2,), 0.5, dtype=F64)) + proj, 0)
    torch.testing.assert_close(w, want, rtol=1e-15, atol=1e-15)
    m2 = _dd(ema=1.0, normalize="none")
    w2 = m2.update(alignment=torch.tensor([0.0, 1.0], dtype=F64), level="basis")
    torch.testing.assert_close(w2, torch.softmax(torch.tensor([0.0, 1.0], dtype=F64), 0))


def test_default_bases_checks_and_shapes():
    b = DGADistribution.default_bases([2], coarse_of_fine=[0, 0, 1])  # one specific example
    assert b.tolist() == [[0.0, 0.0, 1.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    bt = DGADistribution.default_bases(torch.tensor([0, 1]), torch.tensor([1, 1, 0]))
    assert bt.tolist() == [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]]
    with pytest.raises(TypeError, match=r"^coarse_of_fine must hold integers"):
        DGADistribution.default_bases([0], coarse_of_fine=[0.0, 1.0])
    with pytest.raises(TypeError, match=r"^specific_labels must hold integers"):
        DGADistribution.default_bases([0.5], coarse_of_fine=[0, 1])
    with pytest.raises(ValueError, match=r"^specific_labels must be a non-empty 1-D array"):
        DGADistribution.default_bases(np.array([], dtype=np.int64), coarse_of_fine=[0, 1])
    with pytest.raises(ValueError, match=r"^coarse_of_fine must be a non-empty 1-D array"):
        DGADistribution.default_bases([0], coarse_of_fine=[[0, 1]])
    with pytest.raises(ValueError, match=r"^coarse_of_fine must have num_fine=3 entries, got 2$"):
        DGADistribution.default_bases([0], coarse_of_fine=[0, 1], num_fine=3)
    with pytest.raises(ValueError, match=r"^specific_labels must lie in \[0, 2\), found \[0, 2\]$"):
        DGADistribution.default_bases([0, 2], coarse_of_fine=[0, 1])
    with pytest.raises(
        ValueError, match=r"^specific_labels must lie in \[0, 2\), found \[-1, 0\]$"
    ):
        DGADistribution.default_bases([-1, 0], coarse_of_fine=[0, 1])


def test_dga_distribution_from_context_takes_update_every_from_hparams_or_context():
    bases = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    ctx = MixingContext(num_domains=3, update_every=7)
    assert build_mixer("dga-distribution", ctx, bases=bases).update_every == 7
    m = build_mixer("dga-distribution", ctx, bases=bases, update_every=3, step_size=2.0)
    assert m.update_every == 3 and m.step_size == 2.0


def test_dga_distribution_constructor_defaults_and_checks():
    m = DGADistribution([[1.0, 0.0], [0.0, 1.0]])
    assert (m.step_size, m.ema, m.update_every, m.normalize) == (1.0, 0.1, 1, "max")
    d = DGA(2)
    assert (d.step_size, d.ema, d.update_every, d.normalize) == (1.0, 0.1, 1, "max")
    one = DGADistribution([[0.25, 0.75]])  # a single basis is allowed
    assert one.num_domains == 1 and one.sampling_weights.tolist() == [0.25, 0.75]
    with pytest.raises(TypeError, match=r"^bases must be a tensor"):
        DGADistribution("bases")
    for bad in (torch.ones(3), torch.ones(0, 3), torch.ones(2, 0)):
        with pytest.raises(ValueError, match=r"^bases must be a non-empty \[m, k\] matrix"):
            DGADistribution(bad)
    with pytest.raises(ValueError, match=r"^bases\[1\] must be non-negative"):
        DGADistribution([[1.0, 0.0], [-1.0, 2.0]])
    bad_state = DGADistribution([[1.0, 0.0], [0.0, 1.0]]).state_dict()
    bad_state["bases"] = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    with pytest.raises(ValueError, match=r"^state\['bases'\]\[1\] must sum to a positive"):
        DGADistribution([[1.0, 0.0], [0.0, 1.0]]).load_state_dict(bad_state)


# ------------------------------------------------------------------ the paper's gradient source


def _lin_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    unused = torch.nn.Parameter(torch.ones(2))  # requires grad, reached by no loss
    model.register_parameter("unused", unused)

    def loss_fn(mod, batch):
        x, y = batch
        return ((mod(x) - y) ** 2).mean()

    batches = [(torch.randn(5, 3), torch.randn(5, 2)) for _ in range(3)]
    target = (torch.randn(4, 3), torch.randn(4, 2))
    return model, loss_fn, batches, target


def _manual_alignment(model, loss_fn, batches, target, params):
    ps = [p for p in params]

    def g(b):
        gs = torch.autograd.grad(loss_fn(model, b), ps, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1).double()
                          for p, x in zip(ps, gs)])  # fmt: skip

    t = g(target)
    return torch.tensor([0.0 if b is None else float(g(b) @ t) for b in batches], dtype=F64)


def test_domain_gradient_alignment_values_params_and_empty_domains():
    from rnb_kernels.mixing import domain_gradient_alignment

    model, loss_fn, batches, target = _lin_setup()
    a = domain_gradient_alignment(model, loss_fn, batches, target)
    assert a.dtype == F64 and a.shape == (3,)
    params = [p for p in model.parameters() if p.requires_grad]
    want = _manual_alignment(model, loss_fn, batches, target, params)
    torch.testing.assert_close(a, want, rtol=1e-6, atol=1e-9)
    head = list(model[2].parameters())
    a_head = domain_gradient_alignment(model, loss_fn, batches, target, params=head)
    torch.testing.assert_close(a_head, _manual_alignment(model, loss_fn, batches, target, head),
                               rtol=1e-6, atol=1e-9)  # fmt: skip
    assert not torch.allclose(a_head, a)
    with_gap = domain_gradient_alignment(model, loss_fn, [batches[0], None, batches[2]], target)
    assert with_gap[1] == 0.0
    torch.testing.assert_close(with_gap[[0, 2]], a[[0, 2]], rtol=1e-12, atol=0.0)
    assert all(p.grad is None for p in model.parameters())  # no param.grad touched


def test_domain_gradient_alignment_rejects_bad_arguments():
    from rnb_kernels.mixing import domain_gradient_alignment as dga_align

    model, loss_fn, batches, target = _lin_setup()
    cases = [
        (("m", loss_fn, batches, target), {}, TypeError, r"^model must be an nn.Module, got str$"),
        ((model, "f", batches, target), {}, TypeError,
         r"^loss_fn must be callable: loss_fn\(model, batch\) -> scalar$"),
        ((model, loss_fn, "ab", target), {}, TypeError,
         r"^domain_batches must be a sequence with one batch per domain$"),
        ((model, loss_fn, iter(batches), target), {}, TypeError, r"^domain_batches must be"),
        ((model, loss_fn, [], target), {}, ValueError, r"^domain_batches is empty$"),
        ((model, loss_fn, batches, target), {"params": []}, ValueError,
         r"^params: no parameter requires grad$"),
        ((model, lambda m, b: m(b[0]), batches, target), {}, ValueError,
         r"^loss_fn must return a scalar tensor$"),
        ((model, lambda m, b: 1.0, batches, target), {}, ValueError,
         r"^loss_fn must return a scalar tensor$"),
    ]  # fmt: skip
    for args, kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            dga_align(*args, **kw)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^params: no parameter requires grad$"):
        dga_align(model, loss_fn, batches, target)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("step_size", 0.0, r"^state\['step_size'\] must be > 0.0, got 0.0$"),
        ("step_size", -1.0, r"^state\['step_size'\] must be > 0.0, got -1.0$"),
        ("ema", 0.0, r"^state\['ema'\] must be > 0.0, got 0.0$"),
        ("ema", 1.5, r"^state\['ema'\] must be <= 1.0, got 1.5$"),
        ("normalize", "sum", r"^state\['normalize'\] must be one of \('max', 'none'\), got 'sum'$"),
        ("scale", -1.0, r"^state\['scale'\] must be >= 0.0, got -1.0$"),
    ],
)
def test_dga_load_state_validates_each_field(field, value, message):
    saved = DGA(3, step_size=2.0, ema=0.5)
    saved.update(alignment=torch.tensor([1.0, 0.0, -1.0]))
    state = saved.state_dict()
    state[field] = value
    target = DGA(3, step_size=1.0, ema=1.0, normalize="none")
    before = target.state_dict()
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    after = target.state_dict()
    assert torch.equal(after.pop("weights"), before.pop("weights")) and after == before


def test_dga_load_state_restores_normalisation_and_scale():
    saved = DGA(3, step_size=2.0, ema=0.5)
    saved.update(alignment=torch.tensor([4.0, 0.0, -1.0]))
    assert saved.scale == 4.0
    other = DGA(3, normalize="none")
    other.load_state_dict(saved.state_dict())
    assert (other.normalize, other.scale) == ("max", 4.0)
    a = torch.tensor([1.0, 2.0, 0.5])
    assert torch.equal(other.update(alignment=a), saved.update(alignment=a))


def test_odm_two_domains_moves_and_one_domain_stays_put():
    """EXP3's exploration rate is min(1/K, sqrt(ln K / (K t))): with K = 2 it is below 1/2 from
    the second round on, so the policy leaves uniform; with K = 1 the weight stays 1."""
    two = ODM(2, smoothing=0.0)
    for _ in range(4):
        w = two.update(losses=[3.0, 1.0], counts=[1, 1])
    assert float(w[0]) > 0.55, w
    one = ODM(1)
    assert one.update(losses=[2.0], counts=[3]).tolist() == [1.0]


# ------------------------------------------------------------------ static baselines


def test_static_uniform_from_num_domains_is_stratified_exactly():
    for m in (1, 6, 7):  # 1/6 and 1/7 are where a renormalised vector would drift by an ulp
        s = Static(num_domains=m)
        assert s.num_domains == m and s.update_every == 1
        assert torch.equal(s.weights, Stratified(m).weights)
        assert s.weights.dtype == F64 and s.weights.tolist() == [1.0 / m] * m
    assert (
        Static([1, 3]).update_every == 1 and Static(num_domains=2, update_every=3).update_every == 3
    )
    assert Static([2.0], num_domains=1).weights.tolist() == [1.0]
    assert Static([1, 3], update_every=4).update_every == 4
    assert Stratified(3).update_every == 1 and Stratified(3, update_every=4).update_every == 4


@pytest.mark.parametrize(
    "make, exc, message",
    [
        (lambda: Static(), ValueError, r"^Static needs weights or num_domains$"),
        (lambda: Static(num_domains=0), ValueError, r"^num_domains must be >= 1, got 0$"),
        (lambda: Static(num_domains=2.0), TypeError, r"^num_domains must be an int, got float$"),
        (lambda: Static([1, 1], num_domains=0), ValueError, r"^num_domains must be >= 1, got 0$"),
        (lambda: Static([1, 1], num_domains="2"), TypeError, r"^num_domains must be an int, got str$"),
        (lambda: Static([1, 2, 3], num_domains=2), ValueError,
         r"^weights has 3 entries but num_domains=2$"),
        (lambda: Static("ab"), TypeError, r"^weights must be a tensor, numpy array or sequence"),
        (lambda: Static.natural("ab"), TypeError, r"^sizes must be a tensor, numpy array or sequence"),
        (lambda: Static.importance([0], 0), ValueError, r"^num_domains must be >= 1, got 0$"),
        (lambda: Static.importance([0], 1.0), TypeError, r"^num_domains must be an int, got float$"),
        (lambda: Static.importance([0.0, 1.0], 2), TypeError,
         r"^target_labels must be integers, got dtype float64$"),
        (lambda: Static.importance([True], 2), TypeError,
         r"^target_labels must be integers, got dtype bool$"),
        (lambda: Static.importance([[0, 1]], 2), ValueError,
         r"^target_labels must be a non-empty 1-D array, got \(1, 2\)$"),
        (lambda: Static.importance(np.zeros(0, dtype=np.int64), 2), ValueError,
         r"^target_labels must be a non-empty 1-D array, got \(0,\)$"),
        (lambda: Static.importance([0, 3], 3), ValueError,
         r"^target_labels must lie in \[0, 3\), found \[0, 3\]$"),
        (lambda: Static.importance([-1, 2], 3), ValueError,
         r"^target_labels must lie in \[0, 3\), found \[-1, 2\]$"),
    ],
)  # fmt: skip
def test_static_errors_name_the_argument(make, exc, message):
    with pytest.raises(exc, match=message):
        make()


def test_static_importance_counts_every_domain_including_absent_ones():
    # Domain 2 has no target example: it still gets a (zero) weight.
    s = Static.importance([0, 0, 1], num_domains=3)
    assert s.num_domains == 3 and s.weights.tolist() == [2 / 3, 1 / 3, 0.0]
    assert Static.importance([0], num_domains=1).weights.tolist() == [1.0]
    t = Static.importance(torch.tensor([1, 1, 0]), num_domains=2)
    assert t.weights.tolist() == [1 / 3, 2 / 3] and t.weights.dtype == F64
    u = Static.importance(np.array([3, 3], dtype=np.uint8), num_domains=4)
    assert u.weights.tolist() == [0.0, 0.0, 0.0, 1.0]


def test_static_state_round_trip_and_update_keeps_weights():
    a = Static([1, 3])
    assert a.update(gram=torch.eye(2), counts=torch.ones(2)).tolist() == [0.25, 0.75]
    b = Static(num_domains=2)
    b.load_state_dict(a.state_dict())
    assert b.weights.tolist() == [0.25, 0.75] and b.num_updates == 0
    bad = a.state_dict()
    bad["weights"] = torch.ones(3)
    with pytest.raises(
        ValueError, match=r"^state\['weights'\] must have shape \(2,\), got \(3,\)$"
    ):
        b.load_state_dict(bad)
    assert b.weights.tolist() == [0.25, 0.75]


# ------------------------------------------------------------------ Mixer base class


def test_should_update_closes_a_round_every_update_every_steps():
    assert [Stratified(2, update_every=3).should_update(s) for s in range(8)] == [
        False, False, False, True, False, False, True, False,
    ]  # fmt: skip
    assert [Stratified(2).should_update(s) for s in range(3)] == [False, True, True]


def test_skip_warns_at_the_callers_line_and_logs_the_reason(caplog):
    import logging
    import warnings

    m = RnB(2, eval_proportions=[1, 1])
    msg = "RnB: update skipped (non-finite gram); weights unchanged"
    with caplog.at_level(logging.INFO, logger="rnb_kernels.mixing.base"):
        with pytest.warns(RuntimeWarning) as rec:
            w = m.update(gram=torch.full((2, 2), float("nan")), counts=torch.ones(2))
    assert [str(r.message) for r in rec] == [msg]
    # stacklevel points the warning at the update() call, not at base.py (under mutmut, whose
    # trampolines add frames, only the second half can be checked).
    assert not rec[0].filename.endswith("base.py")
    if "MUTANT_UNDER_TEST" not in os.environ:
        assert rec[0].filename == __file__
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, msg)]
    assert w.tolist() == [0.5, 0.5] and m.skipped_updates == 1 and m.num_updates == 0
    # A benign skip (nothing to learn from) is logged at INFO and raises no warning.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rnb_kernels.mixing.base"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            m.update(gram=torch.zeros(2, 2), counts=torch.ones(2))
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "RnB: update skipped (||G p_eval|| = 0); weights unchanged")
    ]
    assert m.skipped_updates == 2 and m.last_skip_reason == "||G p_eval|| = 0"


BASE_HELPER_ERRORS = [
    (lambda: as_float64("x", "v"), TypeError,
     r"v must be a tensor, numpy array or sequence, got str"),
    (lambda: as_float64(["a"], "v"), TypeError,
     r"v must hold real numbers: could not convert string to float: .*'a'.*"),
    (lambda: as_float64(np.array([1 + 1j]), "v"), TypeError,
     r"v must hold real numbers: complex values \(complex128\)"),
    (lambda: as_float64(torch.tensor([1 + 1j]), "v"), TypeError,
     r"v must be real-valued, got torch.complex64"),
    (lambda: as_float64(torch.tensor([True]), "v"), TypeError,
     r"v must be real-valued, got torch.bool"),
    (lambda: as_float64([1, 2], "v", (3,)), ValueError, r"v must have shape \(3,\), got \(2,\)"),
    (lambda: as_simplex([[1.0]], "w"), ValueError,
     r"w must be a non-empty 1-D vector, got shape \(1, 1\)"),
    (lambda: as_simplex([], "w"), ValueError, r"w must be a non-empty 1-D vector, got shape \(0,\)"),
    (lambda: as_simplex([1, float("inf")], "w"), ValueError, r"w must be finite, got \[1.0, inf\]"),
    (lambda: as_simplex([1, -1], "w"), ValueError, r"w must be non-negative, got \[1.0, -1.0\]"),
    (lambda: as_simplex([0, 0], "w"), ValueError, r"w must sum to a positive number, got sum 0.0"),
    (lambda: as_simplex([1, 1], "w", 3), ValueError, r"w must have shape \(3,\), got \(2,\)"),
    (lambda: check_int(True, "n", 1), TypeError, r"n must be an int, got bool"),
    (lambda: check_int(2.0, "n", 1), TypeError, r"n must be an int, got float"),
    (lambda: check_int(0, "n", 1), ValueError, r"n must be >= 1, got 0"),
    (lambda: check_float(True, "x"), TypeError, r"x must be a number, got bool"),
    (lambda: check_float("1", "x"), TypeError, r"x must be a number, got str"),
    (lambda: check_float(float("nan"), "x"), ValueError, r"x must be finite, got nan"),
    (lambda: check_float(0.0, "x", low=0.0, low_open=True), ValueError, r"x must be > 0.0, got 0.0"),
    (lambda: check_float(-1.0, "x", low=0.0), ValueError, r"x must be >= 0.0, got -1.0"),
    (lambda: check_float(2.0, "x", high=1.0), ValueError, r"x must be <= 1.0, got 2.0"),
    (lambda: check_counts([1, float("nan")], "c", 2), ValueError,
     r"c must be finite and non-negative, got \[1.0, nan\]"),
    (lambda: check_counts([1, -1], "c", 2), ValueError,
     r"c must be finite and non-negative, got \[1.0, -1.0\]"),
    (lambda: check_counts([1], "c", 2), ValueError, r"c must have shape \(2,\), got \(1,\)"),
    (lambda: MixingContext(3).require("domain_sizes", "static"), ValueError,
     r"mixer 'static' needs MixingContext.domain_sizes"),
]  # fmt: skip


@pytest.mark.parametrize("call, exc, message", BASE_HELPER_ERRORS)
def test_base_input_checks_exact_messages(call, exc, message):
    with pytest.raises(exc, match=f"^{message}$"):
        call()


def test_base_input_checks_accept_and_convert():
    t = as_float64(np.array([1, 2], dtype=np.int32), "v", (2,))
    assert t.dtype == F64 and t.device.type == "cpu" and t.tolist() == [1.0, 2.0]
    src = torch.tensor([1.0, 2.0], requires_grad=True)
    out = as_float64(src, "v")
    assert not out.requires_grad and out.dtype == F64 and out.tolist() == [1.0, 2.0]
    assert as_float64((1, float("nan")), "v").isnan().tolist() == [False, True]  # passes through
    assert as_simplex([1, 3], "w", 2).tolist() == [0.25, 0.75]
    assert as_simplex(torch.tensor([0.0, 2.0]), "w").tolist() == [0.0, 1.0]
    assert check_int(np.int64(3), "n", 3) == 3 and type(check_int(np.int64(3), "n", 3)) is int
    assert check_float(0.0, "x", low=0.0) == 0.0 and check_float(1.0, "x", high=1.0) == 1.0
    assert check_float(np.float32(0.5), "x", low=0.0, low_open=True) == 0.5
    assert type(check_float(2, "x")) is float
    assert check_counts([0, 2], "c", 2).tolist() == [0.0, 2.0]
    ctx = MixingContext(3, domain_sizes=[1, 2, 3])
    assert ctx.require("domain_sizes", "static") == [1, 2, 3] and ctx.update_every == 1


def test_base_load_state_dict_checks_in_order_and_restores_exactly():
    s = Stratified(2)
    with pytest.raises(TypeError, match=r"^state must be a dict, got list$"):
        s.load_state_dict([1])
    bad = {**s.state_dict(), "type": "RnB"}
    with pytest.raises(ValueError, match=r"^state is for 'RnB', not 'Stratified'$"):
        s.load_state_dict(bad)
    bad = {**s.state_dict(), "num_domains": 3}
    with pytest.raises(ValueError, match=r"^state has num_domains=3, this mixer 2$"):
        s.load_state_dict(bad)
    bad = {**s.state_dict(), "weights": torch.tensor([1.0, -1.0])}
    with pytest.raises(ValueError, match=r"^state\['weights'\] must be non-negative"):
        s.load_state_dict(bad)
    bad = {**s.state_dict(), "weights": "ab"}
    with pytest.raises(TypeError, match=r"^state\['weights'\] must be a tensor, numpy array or"):
        s.load_state_dict(bad)
    bad = {**s.state_dict(), "weights": torch.ones(3)}
    with pytest.raises(
        ValueError, match=r"^state\['weights'\] must have shape \(2,\), got \(3,\)$"
    ):
        s.load_state_dict(bad)
    good = {
        "type": "Stratified", "num_domains": 2, "weights": [0.25, 0.75],
        "num_updates": 4, "skipped_updates": 2, "last_skip_reason": "why",
    }  # fmt: skip
    s.load_state_dict(good)
    got = s.state_dict()
    w = got.pop("weights")
    assert w.dtype == F64 and w.tolist() == [0.25, 0.75]
    assert got == {k: v for k, v in good.items() if k != "weights"}
    assert (s.num_updates, s.skipped_updates, s.last_skip_reason) == (4, 2, "why")


def test_mixer_repr_shows_at_most_eight_weights():
    assert repr(Stratified(4)) == "Stratified(num_domains=4, weights=[0.250, 0.250, 0.250, 0.250])"
    assert repr(Static([1, 1, 1, 1, 1, 1, 1, 1])) == (
        "Static(num_domains=8, weights=[0.125, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125])"
    )
    assert repr(Stratified(9)).endswith("0.111, ...])")  # more than eight: elided
    assert repr(Stratified(10)) == (
        "Stratified(num_domains=10, weights=[0.100, 0.100, 0.100, 0.100, 0.100, 0.100, 0.100, "
        "0.100, ...])"
    )


def test_mixer_init_defaults_checks_and_commit_dtype():
    from rnb_kernels.mixing import Mixer

    class Toy(Mixer):
        def update(self, w):
            return self._commit(w)

    t = Toy(3)
    assert t.update_every == 1 and t.num_updates == 0 and t.skipped_updates == 0
    assert t.last_skip_reason is None and t.state_dict()["last_skip_reason"] is None
    assert t.weights.tolist() == [1 / 3] * 3 and t.weights.dtype == F64
    with pytest.raises(ValueError, match=r"^update_every must be >= 1, got 0$"):
        Toy(3, update_every=0)
    with pytest.raises(ValueError, match=r"^num_domains must be >= 1, got 0$"):
        Toy(0)
    with pytest.raises(ValueError, match=r"^init_weights must have shape \(3,\), got \(2,\)$"):
        Toy(3, init_weights=[1.0, 1.0])
    assert Toy(2, init_weights=[1, 3]).weights.tolist() == [0.25, 0.75]
    # A float32 proposal is stored (and returned) as float64.
    out = t.update(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float32))
    assert out.dtype == F64 and t.weights.dtype == F64 and t.num_updates == 1
    assert t.weights.tolist() == [0.5, 0.25, 0.25]
