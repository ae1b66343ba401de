"""The mixers' edges, each against a literal answer: why an update was skipped (the recorded
reason, and whether it warned or only logged), the exact error messages of bad arguments and
bad states, documented defaults, states saved before a field existed, and the formulas at
inputs the main tests do not reach (fractional counts, small exploration, one fine cluster)."""

from __future__ import annotations

import logging
import math
import re
import warnings

import pytest
import torch

from rnb_kernels.mixing import DGA, ODM, RnB
from rnb_kernels.mixing.dga import DGADistribution

INF = float("inf")
NAN = float("nan")


def _skips(mixer, update, reason: str, warns: bool, caplog) -> None:
    """``update()`` skips with ``reason``: weights unchanged, counted, and either a
    RuntimeWarning (and a warning log) or only an info log, each with the exact message."""
    before = mixer.weights
    msg = f"{type(mixer).__name__}: update skipped ({reason}); weights unchanged"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rnb_kernels"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = update()
    runtime = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert runtime == ([msg] if warns else [])
    levels = [r.levelno for r in caplog.records if r.getMessage() == msg]
    assert levels == [logging.WARNING if warns else logging.INFO]
    assert mixer.last_skip_reason == reason
    assert mixer.skipped_updates == 1 and mixer.num_updates == 0
    assert torch.equal(out, before) and torch.equal(mixer.weights, before)


# --------------------------------------------------------------------------- skip reasons


@pytest.mark.parametrize(
    "stats,reason,warns",
    [
        (dict(gram=torch.full((3, 3), NAN)), "non-finite gram", True),
        (dict(gram_vec=torch.tensor([1.0, INF, 0.0])), "non-finite gram", True),
        (
            dict(gram_vec=torch.tensor([1e300, 1e300, 0.0], dtype=torch.float64)),
            "non-finite G p_eval (overflow)",
            True,
        ),
        (dict(gram=torch.zeros(3, 3)), "||G p_eval|| = 0", False),
    ],
    ids=["gram", "gram_vec", "overflow", "zero"],
)
def test_rnb_skip_reasons(stats, reason, warns, caplog):
    mixer = RnB(3, eval_proportions=[1.0, 1.0, 1.0])
    counts = (
        torch.tensor([1e-160, 1e-160, 1.0], dtype=torch.float64)
        if reason.endswith("(overflow)")
        else None
    )
    counts = torch.ones(3) if counts is None else counts
    _skips(mixer, lambda: mixer.update(counts=counts, **stats), reason, warns, caplog)


def test_dga_skip_reasons(caplog):
    mixer = DGA(3)
    _skips(mixer, lambda: mixer.update(torch.tensor([NAN, 0.0, 1.0])),
           "non-finite gradient alignment", True, caplog)  # fmt: skip
    mixer = DGA(3, normalize="max")
    _skips(mixer, lambda: mixer.update(torch.zeros(3)), "all alignments are 0", False, caplog)
    mixer = DGA(3)
    _skips(mixer, lambda: mixer.update(torch.ones(3), counts=torch.ones(3), target_count=0.0),
           "no target gradient recorded (target_count = 0)", False, caplog)  # fmt: skip


def test_dga_distribution_skip_reasons(caplog):
    bases = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    mixer = DGADistribution(bases)
    _skips(mixer, lambda: mixer.update(torch.ones(3), counts=torch.ones(3), target_count=0),
           "no target gradient recorded (target_count = 0)", False, caplog)  # fmt: skip
    mixer = DGADistribution(bases)
    _skips(mixer, lambda: mixer.update(torch.tensor([0.0, INF, 1.0])),
           "non-finite gradient alignment", True, caplog)  # fmt: skip


def test_odm_skip_reasons(caplog):
    mixer = ODM(3)
    _skips(mixer, lambda: mixer.update(torch.ones(3), counts=torch.zeros(3)),
           "no domain observed in the round", False, caplog)  # fmt: skip
    mixer = ODM(3)
    _skips(mixer, lambda: mixer.update(torch.tensor([1.0, NAN, 1.0]), counts=torch.ones(3)),
           "non-finite loss", True, caplog)  # fmt: skip
    # A finite loss whose importance-weighted reward loss / pi overflows.
    mixer = ODM(3, smoothing=0.0)
    _skips(mixer, lambda: mixer.update(torch.tensor([1e308, 1.0, 1.0], dtype=torch.float64), counts=torch.ones(3)),
           "non-finite reward estimate", True, caplog)  # fmt: skip


# --------------------------------------------------------------------------- messages


def _raises(exc, message: str, fn) -> None:
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        fn()


def test_rnb_error_messages():
    mixer = RnB(3, eval_proportions=[1.0, 1.0, 1.0])
    _raises(TypeError, "update() needs counts", lambda: mixer.update(gram=torch.eye(3)))
    _raises(TypeError, "update() needs exactly one of gram or gram_vec",
            lambda: mixer.update(counts=torch.ones(3)))  # fmt: skip
    _raises(TypeError, "update() needs exactly one of gram or gram_vec",
            lambda: mixer.update(gram=torch.eye(3), gram_vec=torch.ones(3), counts=torch.ones(3)))  # fmt: skip
    _raises(ValueError, "gram_vec must have shape (3,), got (4,)",
            lambda: mixer.update(gram_vec=torch.ones(4), counts=torch.ones(3)))  # fmt: skip
    _raises(ValueError, "counts must be finite and non-negative, got [-1.0, 1.0, 1.0]",
            lambda: mixer.gram_coefficients(torch.tensor([-1.0, 1.0, 1.0])))  # fmt: skip
    assert mixer.skipped_updates == 0 and mixer.num_updates == 0


def test_dga_error_messages():
    _raises(ValueError, "normalize must be one of ('max', 'none'), got 'bad'",
            lambda: DGA(3, normalize="bad"))  # fmt: skip
    _raises(ValueError, "target_count is required when counts are given (domain sums)",
            lambda: DGA(3).update(torch.ones(3), counts=torch.ones(3)))  # fmt: skip
    _raises(ValueError, "target_count is required when counts are given (basis sums)",
            lambda: DGADistribution(torch.ones(2, 3)).update(
                torch.ones(2), counts=torch.ones(2), level="basis"))  # fmt: skip


def test_odm_error_messages():
    _raises(ValueError, "smoothing must be <= 1.0, got 1.5", lambda: ODM(3, smoothing=1.5))
    _raises(ValueError, "exploration must be > 0.0, got 0.0", lambda: ODM(3, exploration=0.0))


def test_dga_distribution_bases_shape():
    # One fine cluster is a valid (if trivial) basis matrix; so is a matching num_domains.
    assert DGADistribution(torch.ones(2, 1)).num_clusters == 1
    wide = torch.ones(2, 3)
    assert DGADistribution(wide, num_domains=2).num_domains == 2
    _raises(ValueError, "num_domains=3 but bases has 2 rows",
            lambda: DGADistribution(wide, num_domains=3))  # fmt: skip
    _raises(ValueError, "bases must be a non-empty [m, k] matrix, got (2, 0)",
            lambda: DGADistribution(torch.ones(2, 0)))  # fmt: skip
    assert DGADistribution(wide, normalize="none").normalize == "none"


# --------------------------------------------------------------------------- defaults and states


def test_documented_defaults():
    rnb = RnB(3, eval_proportions=[1.0, 1.0, 1.0])
    assert (rnb.lam, rnb.update_every) == (1.0, 1)
    odm = ODM(3)
    assert (odm.smoothing, odm.exploration, odm.update_every) == (0.9, 1.0, 1)
    dga = DGA(3)
    assert (dga.step_size, dga.ema, dga.normalize, dga.update_every) == (1.0, 0.1, "max", 1)


def test_dga_state_from_before_normalize_and_scale():
    """A state saved before ``normalize`` and ``scale`` existed keeps the mixer's normalize
    and starts the running scale at 0."""
    old = DGA(3, normalize="max")
    old.update(torch.tensor([2.0, 0.0, -1.0]))
    state = old.state_dict()
    assert state["scale"] == 2.0
    del state["normalize"], state["scale"]
    mixer = DGA(3, normalize="none")
    mixer.load_state_dict(state)
    assert mixer.normalize == "none" and mixer.scale == 0.0
    assert torch.equal(mixer.weights, old.weights)


def test_odm_state_from_before_exploration():
    old = ODM(3, exploration=0.5)
    old.update(torch.tensor([1.0, 2.0, 3.0]), counts=torch.ones(3))
    state = old.state_dict()
    del state["exploration"]
    mixer = ODM(3, exploration=0.25)
    mixer.load_state_dict(state)
    assert mixer.exploration == 1.0


# --------------------------------------------------------------------------- formulas


def test_rnb_fractional_counts():
    """Counts below one sample (token-weighted ids give fractions) divide as they are."""
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    g = torch.tensor([[2.0, 0.5, -0.3], [0.5, 1.0, 0.2], [-0.3, 0.2, 3.0]], dtype=torch.float64)
    n = torch.tensor([0.25, 0.5, 3.0], dtype=torch.float64)
    mixer = RnB(3, eval_proportions=p, lam=1.5)
    got = mixer.update(gram=g, counts=n)
    g_mean = g / torch.outer(n, n)
    v = g_mean @ p
    want = torch.softmax(1.5 * v / v.norm(), 0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(mixer.gram_coefficients(n), p / n, rtol=1e-15, atol=0)


@pytest.mark.parametrize("exploration", [0.05, 1.0])
def test_odm_first_rounds_follow_the_exploration_schedule(exploration):
    """``eps_t = min(1/k, c sqrt(ln k / (k t)))`` from the first round: with a small
    exploration constant ``c`` it is below ``1/k`` already at ``t = 1``."""
    k, a = 4, 0.9
    mixer = ODM(k, smoothing=a, exploration=exploration)
    losses = [torch.tensor([1.0, 2.0, 0.5, 3.0]), torch.tensor([0.2, 2.5, 1.0, 0.1])]
    w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    r = torch.zeros(k, dtype=torch.float64)

    def eps(t):
        return min(1.0 / k, exploration * math.sqrt(math.log(k) / (k * t)))

    for t, loss in enumerate(losses, start=1):
        r = a * r + (1 - a) * loss.double() / w
        w = (1 - k * eps(t + 1)) * torch.softmax(eps(t) * r, 0) + eps(t + 1)
        torch.testing.assert_close(mixer.update(loss, counts=torch.ones(k)), w, rtol=1e-12,
                                   atol=1e-15)  # fmt: skip


def test_odm_single_domain_keeps_all_weight():
    mixer = ODM(1)
    for _ in range(3):
        assert mixer.update(torch.tensor([2.0]), counts=torch.ones(1)).tolist() == [1.0]


def test_dga_alignment_of_sums_with_fractional_counts():
    """``<g_i, g_spe> / (n_i · n_spe)`` also when the product is below one sample."""
    a_sum = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    n = torch.tensor([0.5, 0.25, 2.0], dtype=torch.float64)
    mixer, ref = DGA(3, step_size=0.7, ema=1.0, normalize="none"), DGA(3, step_size=0.7, ema=1.0,
                                                                         normalize="none")  # fmt: skip
    got = mixer.update(a_sum, counts=n, target_count=0.5)
    want = ref.update(a_sum / (n * 0.5))
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    assert not torch.allclose(got, DGA(3, step_size=0.7, ema=1.0, normalize="none").update(
        a_sum / (n * 0.5).clamp(min=1.0)))  # fmt: skip
