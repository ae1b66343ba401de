"""MixtureSampler: proportions, without-replacement pools, proportional batches, live weights,
resume, rank streams and input validation."""

from __future__ import annotations

import copy
import itertools
import os
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from rnb_kernels.mixing import DGA, DGADistribution, Static
from rnb_kernels.sampling import MixtureSampler, _largest_remainder


def labels_of(sizes):
    return np.repeat(np.arange(len(sizes)), sizes)


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("mode", ["categorical", "proportional"])
@pytest.mark.parametrize("replacement", [False, True], ids=["no-replacement", "replacement"])
def test_deterministic_for_a_seed(mode, replacement):
    labels = labels_of([30, 50, 20])
    kw = dict(weights=[0.2, 0.5, 0.3], batch_size=8, mode=mode, replacement=replacement)
    a = take(MixtureSampler(labels, seed=5, **kw), 200)
    b = take(MixtureSampler(labels, seed=5, **kw), 200)
    c = take(MixtureSampler(labels, seed=6, **kw), 200)
    assert a == b and a != c


def test_categorical_frequencies_follow_weights():
    labels = labels_of([100, 300, 50, 200])
    w = np.array([0.1, 0.2, 0.3, 0.4])
    s = MixtureSampler(labels, weights=w, batch_size=16, seed=0, num_samples=20000)
    freq = np.bincount(labels[list(s)], minlength=4) / 20000
    np.testing.assert_allclose(freq, w, atol=0.015)


def test_without_replacement_within_a_domain_then_reshuffled():
    labels = labels_of([7, 5])
    s = MixtureSampler(labels, weights=[0.0, 1.0], batch_size=3, seed=1, num_samples=15)
    idx = list(s)
    first, second = idx[:5], idx[5:10]
    assert sorted(first) == list(range(7, 12)) and sorted(second) == list(range(7, 12))
    assert first != second  # reshuffled when exhausted


@pytest.mark.parametrize("b", [1, 7, 32])
def test_proportional_batches_use_largest_remainder_with_carry(b):
    labels = labels_of([100, 100, 100, 100])
    w = np.array([0.5, 0.3, 0.15, 0.05])
    s = MixtureSampler(
        labels, weights=w, batch_size=b, seed=0, mode="proportional", num_samples=b * 40
    )
    idx = np.array(list(s))
    doms = labels[idx].reshape(40, b)
    for row in doms:
        assert list(row) == sorted(row)  # grouped by domain
    first = np.bincount(doms[0], minlength=4)
    np.testing.assert_array_equal(first, _largest_remainder(b * w, b))
    total = np.bincount(doms.ravel(), minlength=4)
    assert np.all(np.abs(total - 40 * b * w) <= 1.0)  # carry: long-run counts within one


def test_largest_remainder_rule():
    np.testing.assert_array_equal(_largest_remainder(np.array([1.5, 1.5, 1.0]), 4), [2, 1, 1])
    np.testing.assert_array_equal(_largest_remainder(np.array([0.2, 0.7, 0.1]), 1), [0, 1, 0])
    np.testing.assert_array_equal(_largest_remainder(np.array([2.0, 6.0]), 8), [2, 6])


@pytest.mark.parametrize("mode", ["categorical", "proportional"])
def test_follows_mixer_weights_as_they_change(mode):
    labels = labels_of([40, 40, 40])
    mixer = DGA(3, step_size=1.0, ema=1.0, normalize="none")
    s = MixtureSampler(labels, weights=mixer, batch_size=4, seed=0, mode=mode)
    it = iter(s)
    first_batch = [next(it) for _ in range(4)]
    # Uniform weights at first: a batch of 4 from 3 equal domains is never all one domain in
    # proportional mode, and in categorical mode the fixed seed gives a mixed batch as well.
    assert len(set(labels[first_batch])) >= 2
    mixer.update(alignment=torch.tensor([-1e4, 1e4, -1e4]))  # all mass on domain 1
    nxt = [next(it) for _ in range(12)]
    assert set(labels[nxt]) == {1}


def test_dga_distribution_drives_fine_clusters():
    labels = labels_of([20, 20, 20, 20])
    bases = DGADistribution.default_bases([3, 3], coarse_of_fine=[0, 0, 1, 1])
    mixer = DGADistribution(bases, step_size=1.0, init_weights=[1.0, 0.0, 0.0])
    idx = take(MixtureSampler(labels, weights=mixer, batch_size=4, seed=0), 40)
    assert set(labels[idx]) == {3}


@pytest.mark.parametrize("mode", ["categorical", "proportional"])
@pytest.mark.parametrize("replacement", [False, True], ids=["no-replacement", "replacement"])
def test_state_dict_resumes_to_identical_next_indices(mode, replacement):
    labels = labels_of([13, 29, 7])
    mixer = DGA(3, step_size=0.5, ema=0.5)
    a = MixtureSampler(
        labels,
        weights=mixer,
        batch_size=5,
        seed=2,
        mode=mode,
        replacement=replacement,
        num_samples=30,
    )
    it = iter(a)
    take_n = [next(it) for _ in range(37 % 30)]  # mid-batch, mid-epoch
    assert len(take_n) == 7
    mixer.update(alignment=torch.tensor([0.3, -0.2, 0.9]))
    state = copy.deepcopy(a.state_dict())
    rest_a = [next(it) for _ in range(23)] + take(a, 60)  # across the epoch boundary
    b = MixtureSampler(
        labels,
        weights=mixer,
        batch_size=5,
        seed=2,
        mode=mode,
        replacement=replacement,
        num_samples=30,
    )
    b.load_state_dict(state)
    rest_b = take(b, 23) + take(b, 60)
    assert rest_a == rest_b


def test_ranks_draw_disjoint_streams_with_the_same_weights():
    labels = labels_of([40, 40, 40])
    w = Static([0.5, 0.25, 0.25])
    s0 = MixtureSampler(labels, weights=w, batch_size=4, seed=0, num_replicas=2, rank=0)
    s1 = MixtureSampler(labels, weights=w, batch_size=4, seed=0, num_replicas=2, rank=1)
    a, b = take(s0, 20), take(s1, 20)
    assert not set(a) & set(b)
    assert a != b
    pools = set().union(*(set(p.tolist()) for p in s0._pools + s1._pools))
    assert pools == set(range(120))  # the rank slices partition every domain
    assert len(s0) == 60


def test_tiny_domain_shared_when_a_rank_slice_is_empty():
    labels = labels_of([1, 10])
    s1 = MixtureSampler(labels, weights=[1.0, 0.0], batch_size=2, seed=0, num_replicas=2, rank=1)
    assert set(take(s1, 6)) == {0}


def test_zero_weight_and_empty_domains():
    labels = labels_of([10, 0, 10])
    s = MixtureSampler(labels, weights=[0.0, 0.0, 1.0], batch_size=4, seed=0, num_samples=40)
    assert set(labels[list(s)]) == {2}
    with pytest.warns(RuntimeWarning, match="no examples"):
        s2 = MixtureSampler(labels, weights=[0.5, 0.5, 0.0], batch_size=4, seed=0)
        idx = take(s2, 20)
    assert set(labels[idx]) == {0}
    s3 = MixtureSampler(labels, weights=[0.0, 1.0, 0.0], batch_size=4, seed=0)
    with pytest.raises(ValueError, match="zero weight"), pytest.warns(RuntimeWarning):
        take(s3, 1)


def test_labels_minus_one_are_excluded_and_dataloader_works():
    labels = np.array([0, -1, 1, 1, -1, 0, 1, 0])
    data = TensorDataset(torch.arange(8))
    s = MixtureSampler(labels, weights=[0.5, 0.5], batch_size=2, seed=0, num_samples=8)
    got = torch.cat([b[0] for b in DataLoader(data, batch_size=2, sampler=s)]).tolist()
    assert len(got) == 8 and not {1, 4} & set(got)


BAD = [
    pytest.param(dict(domain_labels=[0.0, 1.0]), TypeError, "domain_labels", id="float-labels"),
    pytest.param(dict(domain_labels=[[0, 1]]), ValueError, "domain_labels", id="2d-labels"),
    pytest.param(dict(domain_labels=[]), TypeError, "domain_labels", id="empty-labels"),
    pytest.param(
        dict(domain_labels=np.array([], dtype=np.int64)), ValueError, "empty", id="empty-int-labels"
    ),
    pytest.param(dict(domain_labels=[0, 5]), ValueError, "num_domains", id="label-too-large"),
    pytest.param(
        dict(domain_labels=[0, -2]), ValueError, "domain_labels", id="label-below-minus-1"
    ),
    pytest.param(dict(weights=[0.5, -0.5]), ValueError, "weights", id="negative-weight"),
    pytest.param(dict(weights=[0.5, float("nan")]), ValueError, "weights", id="nan-weight"),
    pytest.param(dict(weights="ab"), TypeError, "weights", id="string-weights"),
    pytest.param(dict(batch_size=0), ValueError, "batch_size", id="zero-batch"),
    pytest.param(dict(batch_size=2.0), TypeError, "batch_size", id="float-batch"),
    pytest.param(dict(mode="greedy"), ValueError, "mode", id="bad-mode"),
    pytest.param(dict(num_replicas=2, rank=2), ValueError, "rank", id="rank-out-of-range"),
    pytest.param(dict(num_samples=0), ValueError, "num_samples", id="zero-samples"),
]


@pytest.mark.parametrize("kwargs, exc, word", BAD)
def test_bad_inputs(kwargs, exc, word):
    args = {"domain_labels": [0, 1, 1, 0], "weights": [0.5, 0.5], "batch_size": 2, **kwargs}
    with pytest.raises(exc, match=word):
        MixtureSampler(**args)


def test_mixer_weights_turning_bad_raise_without_advancing():
    class Src:
        weights = np.array([0.5, 0.5])

    src = Src()
    s = MixtureSampler([0, 1, 0, 1], weights=src, batch_size=2, seed=0, num_samples=100)
    it = iter(s)
    [next(it) for _ in range(2)]
    state = copy.deepcopy(s.state_dict())
    src.weights = np.array([float("nan"), 1.0])
    with pytest.raises(ValueError, match="weights"):
        next(it)
    after = s.state_dict()
    assert after["rng"] == state["rng"] and after["batches"] == state["batches"]


def test_load_state_dict_rejects_other_configuration():
    a = MixtureSampler([0, 1, 0, 1], weights=[0.5, 0.5], batch_size=2, seed=0)
    b = MixtureSampler([0, 1, 0, 1], weights=[0.5, 0.5], batch_size=3, seed=0)
    with pytest.raises(ValueError, match="configured"):
        b.load_state_dict(a.state_dict())


EXACT_ERRORS = [
    (dict(domain_labels=[0.0, 1.0]), TypeError, r"domain_labels must hold integers, got dtype float64"),
    (dict(domain_labels=[True, False]), TypeError, r"domain_labels must hold integers, got dtype bool"),
    (dict(domain_labels=[[0, 1]]), ValueError, r"domain_labels must be 1-D, got shape \(1, 2\)"),
    (dict(domain_labels=np.array([], dtype=np.int64)), ValueError, r"domain_labels is empty"),
    (dict(domain_labels=[0, -2]), ValueError, r"domain_labels must be >= -1, found -2"),
    (dict(domain_labels=[0, 5]), ValueError, r"domain_labels must be < num_domains=2, found 5"),
    (dict(domain_labels=[0, 1], num_domains=1), ValueError,
     r"domain_labels must be < num_domains=1, found 1"),
    (dict(batch_size=0), ValueError, r"batch_size must be >= 1, got 0"),
    (dict(batch_size=True), TypeError, r"batch_size must be an int, got bool"),
    (dict(batch_size=2.0), TypeError, r"batch_size must be an int, got float"),
    (dict(seed=-1), ValueError, r"seed must be >= 0, got -1"),
    (dict(seed=1.5), TypeError, r"seed must be an int, got float"),
    (dict(seed=False), TypeError, r"seed must be an int, got bool"),
    (dict(mode="greedy"), ValueError,
     r"mode must be one of \('categorical', 'proportional'\), got 'greedy'"),
    (dict(num_replicas=0), ValueError, r"num_replicas must be an int >= 1, got 0"),
    (dict(num_replicas=True), ValueError, r"num_replicas must be an int >= 1, got True"),
    (dict(num_replicas=2.0), ValueError, r"num_replicas must be an int >= 1, got 2.0"),
    (dict(num_replicas=2, rank=2), ValueError, r"rank must be an int in \[0, 2\), got 2"),
    (dict(num_replicas=2, rank=-1), ValueError, r"rank must be an int in \[0, 2\), got -1"),
    (dict(rank=True), ValueError, r"rank must be an int in \[0, 1\), got True"),
    (dict(rank=0.0), ValueError, r"rank must be an int in \[0, 1\), got 0.0"),
    (dict(num_samples=0), ValueError, r"num_samples must be an int >= 1, got 0"),
    (dict(num_samples=True), ValueError, r"num_samples must be an int >= 1, got True"),
    (dict(num_samples=2.0), ValueError, r"num_samples must be an int >= 1, got 2.0"),
    (dict(num_domains=0), ValueError, r"num_domains must be an int >= 1, got 0"),
    (dict(num_domains=True), ValueError, r"num_domains must be an int >= 1, got True"),
    (dict(num_domains=2.0), ValueError, r"num_domains must be an int >= 1, got 2.0"),
    (dict(weights="ab"), TypeError, r"weights must be a real vector, got str"),
    (dict(weights=[[0.5, 0.5]]), ValueError,
     r"weights must be a non-empty 1-D vector, got shape \(1, 2\)"),
    (dict(weights=[]), ValueError, r"weights must be a non-empty 1-D vector, got shape \(0,\)"),
    (dict(weights=[0.5, -0.5]), ValueError,
     r"weights must be finite and non-negative, got \[0.5, -0.5\]"),
    (dict(weights=[0.5, float("nan")]), ValueError,
     r"weights must be finite and non-negative, got \[0.5, nan\]"),
    (dict(weights=[0.5, float("inf")]), ValueError,
     r"weights must be finite and non-negative, got \[0.5, inf\]"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, exc, message", EXACT_ERRORS)
def test_bad_inputs_exact_messages(kwargs, exc, message):
    """Every constructor check names the argument and the offending value, in full."""
    args = {"domain_labels": [0, 1, 1, 0], "weights": [0.5, 0.5], "batch_size": 2, **kwargs}
    with pytest.raises(exc, match=f"^{message}$"):
        MixtureSampler(**args)


def test_weights_of_the_wrong_length_and_all_zero_weights_raise_on_draw():
    class Src:
        weights = np.array([0.5, 0.5])

    s = MixtureSampler([0, 1, 2, 2], weights=Src(), batch_size=2, num_domains=3)
    with pytest.raises(ValueError, match=r"^weights must have 3 entries \(num_domains\), got 2$"):
        s.current_weights()
    s = MixtureSampler([0, 1, 2, 2], weights=[0.5, 0.5], batch_size=2, num_domains=3)
    with pytest.raises(ValueError, match=r"^weights must have 3 entries, got 2$"):
        s.current_weights()
    s = MixtureSampler([0, 1], weights=[1.0, 0.0, 0.0], batch_size=2)
    assert s.current_weights().tolist() == [1.0, 0.0, 0.0]
    s = MixtureSampler([0, 1], weights=[0.0, 0.0], batch_size=2)
    with pytest.raises(ValueError, match=r"^weights: every domain with examples has zero weight$"):
        s.current_weights()


def test_empty_domain_with_weight_warns_once_and_is_renormalised_away(caplog):
    import logging
    import warnings

    s = MixtureSampler([0, 0, 2, 2], weights=[0.0, 1.0, 3.0], batch_size=2)
    msg = "domains [1] have positive weight but no examples; they are never drawn"
    with caplog.at_level(logging.WARNING, logger="rnb_kernels.sampling"):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            assert s.current_weights().tolist() == [0.0, 0.0, 1.0]
            assert s.current_weights().tolist() == [0.0, 0.0, 1.0]
    assert [(w.category, str(w.message)) for w in rec] == [(RuntimeWarning, msg)]
    assert [r.getMessage() for r in caplog.records] == [msg]
    # The caller's line, not the package's, also when drawn through iteration (inside the
    # sampler's generator). Under mutmut its trampoline's frames sit between, so not there
    # (benchmarks/replant.py plants the fixed stack level instead).
    if "MUTANT_UNDER_TEST" not in os.environ:
        assert rec[0].filename == __file__
    s = MixtureSampler([0, 0, 2, 2], weights=[0.0, 1.0, 3.0], batch_size=2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        first = next(iter(s))
    assert first in (2, 3) and [str(w.message) for w in rec] == [msg]
    if "MUTANT_UNDER_TEST" not in os.environ:
        assert [(w.filename, w.lineno) for w in rec] == [(__file__, line)]
    # Domains with examples keep their relative weights.
    s2 = MixtureSampler([0, 1, 1, 2], weights=torch.tensor([1.0, 3.0, 0.0]), batch_size=2)
    assert s2.current_weights().tolist() == [0.25, 0.75, 0.0]


def test_largest_remainder_pinned():
    assert _largest_remainder(np.array([0.5, 0.5, 0.0]), 3).tolist() == [2, 1, 0]  # tie -> lower
    assert _largest_remainder(np.array([1.0, 1.0, 1.0]), 2).tolist() == [1, 1, 0]
    assert _largest_remainder(np.array([-1.0, 3.0]), 4).tolist() == [0, 4]  # negatives clipped
    assert _largest_remainder(np.array([0.2, 0.3, 0.5]), 10).tolist() == [2, 3, 5]  # exact
    assert _largest_remainder(np.array([1.0, 2.0]), 5).dtype == np.int64
    # The unit goes to the largest *fractional part* (0.6), not the largest value (2.4).
    assert _largest_remainder(np.array([2.4, 0.6]), 3).tolist() == [2, 1]


def test_state_dict_contents_and_load_errors():
    s = MixtureSampler([0, 1, 1], weights=[0.5, 0.5], batch_size=2, seed=3, num_samples=5)
    assert len(s) == 5 and s.num_samples == 5
    s.set_epoch(4)
    assert s.epoch == 4
    st = s.state_dict()
    assert st["version"] == 1 and st["config"] == {
        "num_domains": 2, "batch_size": 2, "seed": 3, "replacement": False,
        "mode": "categorical", "num_replicas": 1, "rank": 0, "sizes": [1, 2],
    }  # fmt: skip
    assert st["orders"] == [None, None] and st["buffer"] == [] and st["pos"] == 0
    assert st["cursors"].tolist() == [0, 0] and st["carry"].tolist() == [0.0, 0.0]
    assert (st["yielded"], st["batches"]) == (0, 0)
    with pytest.raises(TypeError, match=r"^state must be a dict, got list$"):
        s.load_state_dict([1])
    with pytest.raises(ValueError, match=r"^state has 1 domain orders, expected 2$"):
        s.load_state_dict({**st, "orders": [None]})
    other = MixtureSampler([0, 1, 1], weights=[0.5, 0.5], batch_size=3, seed=3)
    with pytest.raises(
        ValueError,
        match=r"^state was saved by a sampler configured as \{'num_domains': 2, 'batch_size': 2, "
        r"'seed': 3, .*\}, not \{'num_domains': 2, 'batch_size': 3, 'seed': 3, .*\}$",
    ):
        other.load_state_dict(st)
    # A state saved before any draw (no domain order yet) loads and draws.
    s.load_state_dict(st)
    assert [int(i) in (0, 1, 2) for i in take(s, 4)] == [True] * 4
    s.load_state_dict(st)
    idx = take(s, 3)
    st = s.state_dict()
    assert (st["yielded"], st["pos"], st["batches"]) == (3, 1, 2)
    fresh = MixtureSampler([0, 1, 1], weights=[0.5, 0.5], batch_size=2, seed=3, num_samples=5)
    fresh.load_state_dict(st)
    assert fresh.state_dict()["buffer"] == st["buffer"] and len(idx) == 3
    assert list(fresh) == list(s)  # the remaining 2 indices of the epoch, identically


def test_largest_remainder_ties_go_to_the_lower_index_in_long_vectors():
    # 27 remainders in {0.25, 0.5, 0.75} summing to 14: the eleven 0.75s get a unit, then the
    # three lowest-indexed 0.5s (0, 10, 14). An unstable sort breaks these ties differently.
    q, h, t = 0.25, 0.5, 0.75
    target = np.array(
        [h, t, t, q, q, t, t, q, q, t, h, q, t, q, h, h, h, q, q, t, t, t, h, t, q, h, t]
    )
    want = [1 if v == t else 0 for v in target]
    for i in (0, 10, 14):
        want[i] = 1
    assert _largest_remainder(target, 14).tolist() == want


def test_zero_weight_domains_carry_no_rounding_debt():
    w = {"v": [0.5, 0.5]}
    s = MixtureSampler([0, 1, 0, 1], weights=lambda: w["v"], batch_size=1, mode="proportional",
                       num_samples=10)  # fmt: skip
    it = iter(s)
    assert next(it) in (0, 2)  # domain 0: the 0.5/0.5 tie goes to the lower index
    assert s.state_dict()["carry"].tolist() == [-0.5, 0.5]
    w["v"] = [1.0, 0.0]
    next(it)
    assert s.state_dict()["carry"].tolist() == [-0.5, 0.0]


def test_every_epoch_yields_num_samples_indices():
    s = MixtureSampler([0, 1, 0, 1], weights=[1, 1], batch_size=2, num_samples=3)
    first, second = list(s), list(s)
    assert len(first) == len(second) == 3 and first != second  # the stream continues


def test_empty_domain_warning_names_only_positive_weight_empty_domains():
    import warnings

    # Every domain has examples: no warning.
    s = MixtureSampler([0, 1, 2], weights=[1.0, 1.0, 1.0], batch_size=2)
    assert s.seed == 0 and s.state_dict()["config"]["seed"] == 0  # the default seed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert s.current_weights().tolist() == [1 / 3] * 3
        # An empty domain with zero weight: nothing to warn about either.
        z = MixtureSampler([0, 0, 2, 2], weights=[1.0, 0.0, 1.0], batch_size=2)
        assert z.current_weights().tolist() == [0.5, 0.0, 0.5]
    # Domains 1 (weight 1, empty) and 2 (weight 0, empty): only domain 1 is named.
    e = MixtureSampler([0, 3], weights=[1.0, 1.0, 0.0, 1.0], batch_size=2)
    with pytest.warns(RuntimeWarning) as rec:
        assert e.current_weights().tolist() == [0.5, 0.0, 0.0, 0.5]
    assert [str(w.message) for w in rec] == [
        "domains [1] have positive weight but no examples; they are never drawn"
    ]


def test_low_precision_tensor_weights_are_read_in_float64():
    # bfloat16 has no numpy dtype: the weights go through float64 first.
    s = MixtureSampler([0, 1], weights=torch.tensor([1.0, 3.0], dtype=torch.bfloat16), batch_size=2)
    assert s.current_weights().tolist() == [0.25, 0.75]


def test_weight_sources_flags_and_smallest_epoch():
    class OnlySampling:  # a mixer-like object exposing sampling_weights only
        sampling_weights = np.array([0.0, 1.0])

    src = OnlySampling()
    s = MixtureSampler([0, 1, 0, 1], weights=src, batch_size=2, num_samples=4)
    assert set(list(s)) <= {1, 3}
    src.sampling_weights = np.array([1.0, 0.0])  # followed live, not copied at construction
    assert set(list(s)) <= {0, 2}
    r = MixtureSampler([0, 1], weights=[1, 1], batch_size=2, replacement=True)
    assert r.replacement is True and r.state_dict()["config"]["replacement"] is True
    assert MixtureSampler([0, 1], weights=[1, 1], batch_size=2).replacement is False
    one = MixtureSampler([0, 1], weights=[1, 1], batch_size=2, num_samples=1)
    assert len(one) == 1 and len(list(one)) == 1
