"""DomainGradientTracker.state_dict / load_state_dict: every field restored, every bad state
rejected with a message naming what is wrong, and a rejected state never changes the tracker."""

from __future__ import annotations

import copy
import logging
import math
import os
import warnings

import pytest
import torch
from torch import nn

from rnb_kernels import DomainGradientTracker

M = 3


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 11))


def _trained(mode: str, **kw) -> DomainGradientTracker:
    """A tracker with something in every field: two rounds (so projected mode has heavy rows),
    a target row, loss-scaled buffers, a dropped non-finite micro-batch and a non-finite read."""
    net = _net()
    kw = {"modules": ["0", "2"], "mode": mode, "sketch_dim": 32, "proj_dim": 4,
          "exact_rows": 3, "skip_nonfinite": "micro-batch", **kw}  # fmt: skip
    tr = DomainGradientTracker(net, M, **kw)
    g = torch.Generator().manual_seed(1)
    for r in range(2):
        for _ in range(2):
            x = torch.randn(6, 5, generator=g)
            with tr.domains(torch.tensor([0, 0, 1, 2, 2, -1]), grad_scale=8.0):
                (net(x).square().sum() * 8.0).backward()
        if r == 0:
            tr.reset()
    with pytest.warns(RuntimeWarning, match="non-finite"), tr.domains(torch.ones(6).long()):
        net(torch.full((6, 5), math.nan)).sum().backward()  # dropped: counted in nonfinite_skips
    tr.record_target(net(torch.randn(4, 5, generator=g)).sum())
    tr.nonfinite_rounds = 2
    tr._synced = True
    return tr


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("mode", ["exact", "projected", "sketch"])
def test_round_trip_restores_every_field(mode):
    src = _trained(mode)
    state = src.state_dict()
    assert state["nonfinite_skips"] == 1 and state["nonfinite_rounds"] == 2
    assert state["synced"] is True and state["round"] == 1
    assert state["slots"][1]["scale"]["domain"] == 8.0 and state["slots"][1]["dirty"]["target"]
    if mode == "projected":
        assert state["slots"][1]["heavy"].shape == (3,)
        assert state["slots"][1]["energy"].abs().sum() > 0
    dst = DomainGradientTracker(_net(), M, **{k: v for k, v in _config(src).items()})
    dst.load_state_dict(state)
    assert _equal(dst.state_dict(), state)
    # Buffers are copies: the source moving on leaves the loaded tracker alone.
    src.reset()
    assert _equal(dst.state_dict(), state)


def _config(tr: DomainGradientTracker) -> dict:
    return {"modules": ["0", "2"], "mode": tr.mode, "sketch_dim": tr.sketch_dim,
            "proj_dim": tr.proj_dim, "exact_rows": tr.exact_rows, "seed": tr.seed,
            "reseed": tr.reseed}  # fmt: skip


def _drop(key):
    def edit(s):
        del s[key]

    return edit


def _set(path, value):
    def edit(s):
        d = s
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value(d[path[-1]]) if callable(value) else value

    return edit


BAD_STATES = [
    *[
        pytest.param("exact", _drop(k), ValueError, f"state is missing '{k}'", id=f"no-{k}")
        for k in ("mode", "num_domains", "sketch_dim", "seed", "modules")
    ],  # fmt: skip
    pytest.param("exact", _set(["mode"], "sketch"), ValueError, "configured as", id="mode"),
    pytest.param("exact", _set(["seed"], 7), ValueError, "configured as", id="seed"),
    pytest.param("exact", _set(["num_domains"], 4), ValueError, "configured as", id="m"),
    pytest.param("exact", _set(["modules"], ["2", "0"]), ValueError, "configured as", id="mods"),
    pytest.param("sketch", _set(["sketch_dim"], 64), ValueError, "configured as", id="k"),
    pytest.param("projected", _set(["proj_dim"], 8), ValueError, "configured as", id="proj"),
    pytest.param("projected", _set(["proj_in_dim"], 3), ValueError, "configured as", id="pin"),
    pytest.param("projected", _set(["exact_rows"], 2), ValueError, "configured as", id="rows"),
    pytest.param(
        "projected",
        _drop("proj_dim"),
        ValueError,
        r"configured as \('projected', 3, 0, \['0', '2'\], '<missing>', None, 3\), "
        r"not \('projected', 3, 0, \['0', '2'\], 4, None, 3\)$",
        id="no-proj-dim",
    ),  # fmt: skip
    # A state from before exact rows existed kept none: it does not fit 3 exact rows.
    pytest.param("projected", _drop("exact_rows"), ValueError, r"\(.*, 0\), not", id="old"),
    pytest.param(
        "exact",
        _set(["slots"], lambda s: s[:1]),
        ValueError,
        "state has 1 slots, this tracker 2",
        id="slots",
    ),  # fmt: skip
    pytest.param(
        "exact",
        _set(["slots", 1, "buffers", "domain"], lambda b: {}),
        ValueError,
        "state has no buffer domain/w for 2",
        id="no-buffer",
    ),  # fmt: skip
    pytest.param(
        "exact",
        _set(["slots", 0, "buffers", "target", "b"], torch.zeros(1, 6)),
        ValueError,
        r"buffer target/b of 0 has shape \(1, 6\), expected \(1, 7\)",
        id="buffer-shape",
    ),  # fmt: skip
    pytest.param(
        "projected",
        _set(["slots", 1, "heavy"], torch.tensor([0, 1])),
        ValueError,
        r"heavy rows of 2 must be 3 indices in \[0, 11\), got shape \(2,\)",
        id="heavy-shape",
    ),  # fmt: skip
    pytest.param(
        "projected",
        _set(["slots", 1, "heavy"], torch.tensor([0, 1, 11])),
        ValueError,
        "heavy rows of 2 must be 3 indices",
        id="heavy-high",
    ),  # fmt: skip
    pytest.param(
        "projected",
        _set(["slots", 1, "heavy"], torch.tensor([-1, 1, 2])),
        ValueError,
        "heavy rows of 2 must be 3 indices",
        id="heavy-negative",
    ),  # fmt: skip
    pytest.param(
        "projected",
        _set(["slots", 0, "energy"], torch.zeros(8)),
        ValueError,
        r"energy of 0 has shape \(8,\), expected \(7,\)",
        id="energy",
    ),  # fmt: skip
    pytest.param(
        "exact",
        _set(["counts"], torch.zeros(4, dtype=torch.float64)),
        ValueError,
        r"counts must have shape \(3,\)",
        id="counts",
    ),  # fmt: skip
]


@pytest.mark.parametrize("mode,edit,exc,match", BAD_STATES)
def test_bad_state_is_rejected_and_changes_nothing(mode, edit, exc, match):
    src = _trained(mode)
    dst = _trained(mode, seed=0)
    dst.reset()  # different contents from src, so a partial load would show
    before = dst.state_dict()
    bad = copy.deepcopy(src.state_dict())
    edit(bad)
    with pytest.raises(exc, match=match):
        dst.load_state_dict(bad)
    assert _equal(dst.state_dict(), before)


def test_state_must_be_a_dict():
    tr = _trained("exact")
    with pytest.raises(TypeError, match="state must be a dict, got list"):
        tr.load_state_dict([])


def test_settings_of_other_modes_do_not_matter():
    """Exact mode's buffers do not depend on sketch_dim / proj_dim / exact_rows."""
    src = _trained("exact")
    state = src.state_dict()
    dst = DomainGradientTracker(_net(), M, modules=["0", "2"], mode="exact", sketch_dim=99,
                                proj_dim=2, exact_rows=0)  # fmt: skip
    dst.load_state_dict(state)
    assert torch.equal(dst.gram(), src.gram())


def test_projected_without_exact_rows_loads_a_state_from_before_them():
    src = _trained("projected", exact_rows=0)
    state = src.state_dict()
    del state["exact_rows"]
    for s in state["slots"]:
        del s["heavy"], s["energy"]
    del state["nonfinite_rounds"], state["round"], state["reseed"]
    dst = DomainGradientTracker(_net(), M, modules=["0", "2"], mode="projected", proj_dim=4,
                                exact_rows=0, reseed=False)  # fmt: skip
    dst.load_state_dict(state)
    assert dst.nonfinite_rounds == 0 and dst._round == 0 and dst.nonfinite_skips == 1
    assert torch.equal(dst.domain_projections(), src.domain_projections())


def test_state_dict_version():
    assert _trained("exact").state_dict()["version"] == 3


@pytest.mark.parametrize("reseed", [True, False])
def test_state_without_reseed_was_saved_without_it(caplog, reseed):
    """States from before reseeding existed hashed every round with the seed (reseed=False)."""
    state = _trained("sketch", reseed=False).state_dict()
    del state["reseed"]
    dst = DomainGradientTracker(_net(), M, modules=["0", "2"], mode="sketch", sketch_dim=32,
                                reseed=reseed)  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rnb_kernels.tracking.tracker"):
        dst.load_state_dict(state)
    if reseed:
        assert "state was saved with reseed=False, this tracker has reseed=True: the rest of " \
            "the round is hashed with this tracker's setting" in caplog.text  # fmt: skip
    else:
        assert caplog.text == ""


def test_reseed_mismatch_warns_and_keeps_this_trackers_setting(caplog):
    src = _trained("sketch", reseed=True)
    dst = DomainGradientTracker(_net(), M, modules=["0", "2"], mode="sketch", sketch_dim=32,
                                reseed=False)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="rnb_kernels.tracking.tracker"):
        dst.load_state_dict(src.state_dict())
    assert "saved with reseed=True, this tracker has reseed=False" in caplog.text
    assert dst.reseed is False and dst._round == 1
    caplog.clear()
    same = DomainGradientTracker(_net(), M, modules=["0", "2"], mode="sketch", sketch_dim=32)
    with caplog.at_level(logging.WARNING, logger="rnb_kernels.tracking.tracker"):
        same.load_state_dict(src.state_dict())
    assert "reseed" not in caplog.text


# ------------------------------------------- data-parallel sync, two identical ranks faked
@pytest.fixture
def two_ranks(monkeypatch):
    """``rnb_kernels.distributed`` as two ranks that saw the same data: an all-reduce doubles
    each tensor. Returns the list of ``(number of tensors, group)`` of every all-reduce."""
    from rnb_kernels import distributed as rdist

    calls = []

    def all_reduce_sum_(tensors, group=None):
        ts = list(tensors)
        calls.append((len(ts), group))
        for t in ts:
            t.mul_(2)

    monkeypatch.setattr(rdist, "is_initialized", lambda: True)
    monkeypatch.setattr(rdist, "world_size", lambda group=None: 2)
    monkeypatch.setattr(rdist, "all_reduce_sum_", all_reduce_sum_)
    return calls


def _feed(tr, net, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, generator=g)
    with tr.domains(torch.tensor([0, 0, 1, 2, 2, -1]), grad_scale=scale):
        (net(x).square().sum() * scale).backward()
    tr.record_target(net(torch.randn(4, 5, generator=g)).sum())


def _local(tr, read):
    """``read(tr)`` on this rank's own buffers (marked as already summed, so no all-reduce)."""
    tr._synced = True
    try:
        return read(tr)
    finally:
        tr._synced = False


def test_sync_sums_over_ranks_once_per_round(two_ranks):
    ref_net, net = _net(), _net()
    kw = {"modules": ["0", "2"], "mode": "exact"}
    ref = DomainGradientTracker(ref_net, M, **kw)  # one rank's statistics, read locally
    tr = DomainGradientTracker(net, M, **kw)
    _feed(ref, ref_net)
    _feed(tr, net, scale=8.0)  # buffers in loss-scaled units: normalised before the sum
    assert two_ranks == []
    assert torch.equal(tr.counts(), 2 * ref._counts)
    # counts, target count, then both groups' buffers of both slots (weight and bias).
    assert two_ranks == [(2 + 2 * 2 * 2, None)]
    gram = _local(ref, lambda t: t.gram())
    torch.testing.assert_close(tr.gram(), 4 * gram, rtol=1e-6, atol=0)
    align = _local(ref, lambda t: t.target_alignment())
    torch.testing.assert_close(tr.target_alignment(), 4 * align, rtol=1e-6, atol=0)
    assert float(tr.target_count()) == 2 * float(ref._target_count)
    assert len(two_ranks) == 1  # every read of the round used the one sum
    # More data after the sum: this rank keeps 1/2 of it, so the next sum adds the new part once.
    # (at a new loss scale: the summed buffers, in true units, are marked for rescaling)
    _feed(tr, net, scale=4.0, seed=1)
    _feed(ref, ref_net, seed=1)
    gram = _local(ref, lambda t: t.gram())
    torch.testing.assert_close(tr.gram(), 4 * gram, rtol=1e-6, atol=0)
    assert len(two_ranks) == 2
    tr.reset()
    ref.reset()
    assert tr._synced is False
    for sl in tr._slots:
        assert sl.scale == {"domain": 1.0, "target": 1.0}
        assert sl.dirty == {"domain": False, "target": False}
    _feed(tr, net, seed=2)
    _feed(ref, ref_net, seed=2)
    gram = _local(ref, lambda t: t.gram())
    torch.testing.assert_close(tr.gram(), 4 * gram, rtol=1e-6, atol=0)
    assert len(two_ranks) == 3


def test_reset_sums_the_rows_energy_when_nothing_was_read(two_ranks):
    """Projected exact rows: every rank must pick the same heavy rows, so reset() all-reduces
    the energies (once) unless a statistics read already summed them."""
    net = _net()
    tr = DomainGradientTracker(net, M, modules=["0", "2"], mode="projected", proj_dim=4,
                               exact_rows=3)  # fmt: skip
    _feed(tr, net)
    energies = [s.energy.clone() for s in tr._slots]
    energy_ids = [id(s.energy) for s in tr._slots]
    seen = []
    from rnb_kernels import distributed as rdist

    inner = rdist.all_reduce_sum_

    def spy(tensors, group=None):
        ts = list(tensors)
        seen.append([id(t) for t in ts])
        inner(ts, group)

    import rnb_kernels.tracking.tracker as tracker_mod

    tracker_mod.rdist.all_reduce_sum_, saved = spy, tracker_mod.rdist.all_reduce_sum_
    try:
        tr.reset()
    finally:
        tracker_mod.rdist.all_reduce_sum_ = saved
    assert seen == [energy_ids]
    for s, e in zip(tr._slots, energies):
        want = torch.sort(torch.topk(2 * e, 3).indices).values
        assert torch.equal(s.heavy, want)
    # After a read (which summed the energies with the statistics), reset() adds nothing.
    _feed(tr, net, seed=1)
    tr.gram()
    n = len(two_ranks)
    tr.reset()
    assert len(two_ranks) == n
    # Exact mode has no energies: reset() never all-reduces.
    ex = DomainGradientTracker(_net(), M, mode="exact")
    n = len(two_ranks)
    ex.reset()
    assert len(two_ranks) == n


# ------------------------------------------------------------------------------ remove
def test_remove_unregisters_and_restores_and_says_when_forward_was_replaced(caplog):
    from rnb_kernels.tracking.linear import SLOTS

    net = _net()
    tr = DomainGradientTracker(net, M, modules=["0", "2"])
    keys = [s.key for s in tr._slots]
    assert all(k in SLOTS for k in keys)
    # Someone replaced one tracked forward after tracking began (e.g. another wrapper).
    net[2].forward = lambda x: x
    with caplog.at_level(logging.WARNING, logger="rnb_kernels.tracking.tracker"):
        tr.remove()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["2.forward was replaced after tracking began; restoring"]
    assert not any(k in SLOTS for k in keys)
    assert "forward" not in net[0].__dict__ and "forward" not in net[2].__dict__
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rnb_kernels.tracking.tracker"):
        tr.remove()  # idempotent, silent
    assert caplog.text == ""
    # A module that had its own forward attribute before tracking gets it back.
    own = _net()
    mine = own[2].forward
    own[2].forward = mine
    tr2 = DomainGradientTracker(own, M)
    assert own[2].__dict__["forward"] is not mine
    tr2.remove()
    assert own[2].__dict__["forward"] is mine


def test_remove_survives_a_deleted_forward_attribute(caplog):
    net = _net()
    tr = DomainGradientTracker(net, M)
    del net[2].forward  # the tracked forward removed by someone else: nothing left to pop
    with caplog.at_level(logging.WARNING, logger="rnb_kernels.tracking.tracker"):
        tr.remove()
    assert "forward" not in net[2].__dict__
    assert "2.forward was replaced after tracking began" in caplog.text


# --------------------------------- tensor parallelism faked: a row-sharded slot on two ranks
def _shard(tr, slot_index=1, tp_size=2):
    slot = tr._slots[slot_index]
    slot.tp_group, slot.tp_size = "tp-group", tp_size  # what bind_sharded leaves
    return slot


def test_sharded_exact_slot_sums_its_partial_grams_over_its_group(two_ranks):
    """Pure tensor parallelism (tp = world = 2): nothing is summed over data-parallel ranks;
    each read sums this slot's partial Gram / alignment / Gram vector over the TP group."""
    net = _net()
    tr = DomainGradientTracker(net, M, modules=["0", "2"], mode="exact")
    _feed(tr, net)
    local = {
        "gram": _local(tr, lambda t: t.gram()),
        "vec": _local(tr, lambda t: t.gram_vector([1.0, 2.0, 3.0])),
        "align": _local(tr, lambda t: t.target_alignment()),
    }
    # The sharded slot's own part (weight and bias blocks): the TP sum doubles it.
    g1 = sum(b.double() @ b.double().T for b in tr._slots[1].gram_parts("domain"))
    _shard(tr)
    assert tr._dp() == (None, 1)
    torch.testing.assert_close(tr.gram(), local["gram"] + g1, rtol=1e-6, atol=1e-6)
    assert two_ranks == [(1, "tp-group")]  # no data-parallel sum: only the slot's part
    c = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(tr.gram_vector(c), local["vec"] + g1 @ c, rtol=1e-6, atol=1e-6)
    tr.target_alignment()
    assert two_ranks == [(1, "tp-group")] * 3
    assert local["align"].shape == (M,)


def test_sharded_sketch_slot_is_summed_over_its_group_at_sync(two_ranks):
    net = _net()
    tr = DomainGradientTracker(net, M, modules=["0", "2"], mode="sketch", sketch_dim=16)
    _feed(tr, net)
    before = [t.clone() for t in tr._slots[1].tensors("domain")]
    _shard(tr)
    tr.counts()
    # counts and target count are not summed (dp size 1); the sharded slot's two groups are.
    assert two_ranks == [(1, "tp-group"), (1, "tp-group")]
    assert torch.equal(tr._slots[1].tensors("domain")[0], 2 * before[0])
    assert tr._slots[1].dirty == {"domain": True, "target": True}
    tr.gram()
    tr.target_alignment()
    assert len(two_ranks) == 2  # summed once, at sync: reads add no sum over the group


def test_a_one_rank_shard_sums_nothing(two_ranks, monkeypatch):
    from rnb_kernels import distributed as rdist

    net = _net()
    tr = DomainGradientTracker(net, M, modules=["0", "2"], mode="exact")
    _feed(tr, net)
    want = _local(tr, lambda t: t.gram())
    monkeypatch.setattr(rdist, "world_size", lambda group=None: 1)
    _shard(tr, tp_size=1)
    torch.testing.assert_close(tr.gram(), want, rtol=1e-12, atol=0)
    assert two_ranks == []


def test_no_process_group_means_one_rank():
    assert DomainGradientTracker(_net(), M)._dp() == (None, 1)


def test_partial_tensor_parallelism_needs_the_data_parallel_group(two_ranks, monkeypatch):
    from rnb_kernels import distributed as rdist

    tr = DomainGradientTracker(_net(), M, modules=["0", "2"], mode="exact")
    monkeypatch.setattr(rdist, "world_size", lambda group=None: 4)
    assert tr._dp() == (None, 4)  # nothing sharded: every rank holds different data
    _shard(tr)
    with pytest.raises(
        ValueError,
        match=r"^dp_group: tracked weights are row-sharded over \[2\] of 4 ranks; pass "
        r"DomainGradientTracker\(\.\.\., dp_group=\.\.\.\) \(the data-parallel group, e\.g\. "
        r"mesh\['dp'\]\)$",
    ):
        tr._dp()


def test_sums_go_over_the_given_data_parallel_group(two_ranks, monkeypatch):
    net = _net()
    tr = DomainGradientTracker(net, M, modules=["0", "2"], mode="projected", proj_dim=4,
                               exact_rows=3)  # fmt: skip
    tr.dp_group = "dp-group"  # stands in for a ProcessGroup (the fake ignores what it is)
    from rnb_kernels import distributed as rdist

    sizes = {"dp-group": 2, None: 4}
    monkeypatch.setattr(rdist, "world_size", lambda group=None: sizes[group])
    assert tr._dp() == ("dp-group", 2)  # the size of the given group, not of the world
    _feed(tr, net)
    tr.reset()  # nothing read: the energies are summed over the dp group
    assert two_ranks == [(2, "dp-group")]
    _feed(tr, net, seed=1)
    tr.counts()
    assert [g for _, g in two_ranks] == ["dp-group", "dp-group"]
    energy = [s.energy.clone() for s in tr._slots]
    _feed(tr, net, seed=2)  # after a sum, this rank keeps 1/2 of the energies too
    assert all(torch.all(s.energy >= e / 2 - 1e-6) for s, e in zip(tr._slots, energy))


def test_pure_tensor_parallelism_sums_no_energy(two_ranks):
    """tp = world: no rank holds different data, so reset() sums no energies."""
    net = _net()
    tr = DomainGradientTracker(net, M, modules=["0", "2"], mode="projected", proj_dim=4,
                               exact_rows=3)  # fmt: skip
    _feed(tr, net)
    _shard(tr)
    tr.reset()
    assert two_ranks == []


# ------------------------------------------------- non-finite skips and the bypass evidence
def test_nonfinite_skips_count_up_and_are_reported_in_full(caplog):
    net = _net()
    tr = DomainGradientTracker(net, M, skip_nonfinite="micro-batch")
    for k in (1, 2):
        caplog.clear()
        with pytest.warns(RuntimeWarning) as rec, tr.domains(torch.tensor([0, 1])):
            net(torch.full((2, 5), math.nan)).sum().backward()
        msg = ("non-finite activations/gradients in a tracked layer: domain statistics of this "
               f"micro-batch skipped ({k} so far)")  # fmt: skip
        assert [str(w.message) for w in rec] == [msg]
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [msg]
    assert tr.nonfinite_skips == 2


def _bypassing_net():
    """Its forward reads the tracked head's weight without calling head.forward."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(5, 7), nn.Linear(7, 11)

        def forward(self, x):
            return torch.tanh(self.body(x)) @ self.head.weight.t()

    torch.manual_seed(0)
    return Net()


def test_a_model_that_ran_without_the_tracked_forward_is_a_bypass():
    """The backward runs after the block, so only the model having run can tell."""
    net = _bypassing_net()
    tr = DomainGradientTracker(net, M, modules=["head"])
    with pytest.raises(RuntimeError, match=r"^tracked layer\(s\) \['head'\]: inside "):
        with tr.domains(torch.tensor([0, 1])):
            net(torch.randn(2, 5))


@pytest.mark.parametrize("earlier_grad", [False, True], ids=["fresh-grad", "accumulated"])
def test_a_weight_gradient_without_the_tracked_forward_is_a_bypass(earlier_grad):
    """No model call inside the block: the head's weight getting a gradient (a new .grad, or
    an in-place accumulation into the one it had) is the evidence."""
    net = _bypassing_net()
    tr = DomainGradientTracker(net, M, modules=["head"])
    w = net.head.weight
    if earlier_grad:
        w.grad = torch.zeros_like(w)
    with pytest.raises(RuntimeError, match=r"^tracked layer\(s\) \['head'\]: inside "):
        with tr.domains(torch.tensor([0, 1])):
            (torch.randn(2, 7) @ w.t()).sum().backward()


def test_forwarded_but_unreached_warns_even_with_an_earlier_grad():
    """A tracked forward whose backward runs after the block is 'unreached' (a warning), not
    a bypass, also when the weight already holds a gradient from an earlier micro-batch."""
    net = _net()
    tr = DomainGradientTracker(net, M)
    net(torch.randn(2, 5)).sum().backward()  # outside any block: .grad exists now
    with pytest.warns(RuntimeWarning, match=r"^tracked layer\(s\) \['2'\] ran their forward"):
        with tr.domains(torch.tensor([0, 1])):
            out = net(torch.randn(2, 5))
    out.sum().backward()


def test_sketch_shard_keeps_half_after_a_sum(two_ranks):
    """After the TP sum of a sharded sketch, the next block keeps 1/tp of it on this rank."""
    ref_net, net = _net(), _net()
    kw = {"modules": ["0", "2"], "mode": "sketch", "sketch_dim": 16, "reseed": False}
    ref = DomainGradientTracker(ref_net, M, **kw)
    tr = DomainGradientTracker(net, M, **kw)
    _shard(tr)
    for seed in (0, 1):
        _feed(tr, net, seed=seed)
        _feed(ref, ref_net, seed=seed)
        tr.counts()
        want = 2 * ref._slots[1].tensors("domain")[0]
        torch.testing.assert_close(tr._slots[1].tensors("domain")[0], want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------- the end-of-block check, word for word
def _unreached_msg(block: str) -> str:
    return (
        f"tracked layer(s) ['2'] ran their forward inside {block} but no backward reached "
        "them inside the block: run loss.backward() inside the `with` block, or these "
        "statistics are lost"
    )


def _half_backward(net, x):
    """Forward through both tracked layers, backward from the first one's output only."""
    h = net[0](x)
    out = net[2](torch.tanh(h))
    h.sum().backward()
    return out


@pytest.mark.parametrize("kind", ["domains", "target"])
def test_unreached_layer_after_a_reached_one_is_reported_at_the_callers_line(kind, caplog):
    """Layer '0' accumulates and layer '2' (later in the slot order) ran its forward but no
    backward reached it: the warning names '2' and the block, points at this file, and is
    logged too."""
    net = _net()
    tr = DomainGradientTracker(net, M, modules=["0", "2"])
    block = tr.domains(torch.tensor([0, 1])) if kind == "domains" else tr.target()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with block:
            _half_backward(net, torch.randn(2, 5))
    msg = _unreached_msg(f"tracker.{kind}()")
    assert [str(w.message) for w in rec] == [msg]
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampoline adds stack frames
        assert rec[0].filename == __file__
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [msg]


def test_on_untracked_ignore_skips_the_end_of_block_check():
    net = _net()
    tr = DomainGradientTracker(net, M, modules=["0", "2"], on_untracked="ignore")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with tr.domains(torch.tensor([0, 1])):
            _half_backward(net, torch.randn(2, 5))
        bypass = _bypassing_net()
        tb = DomainGradientTracker(bypass, M, modules=["head"], on_untracked="ignore")
        with tb.domains(torch.tensor([0, 1])):
            bypass(torch.randn(2, 5)).sum().backward()
    assert [w for w in rec if w.category is RuntimeWarning] == []
    assert tb.untracked_micro_batches == 0


def test_bypass_warning_in_full(caplog):
    net = _bypassing_net()
    tr = DomainGradientTracker(net, M, modules=["head"], on_untracked="warn")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with tr.domains(torch.tensor([0, 1])):
            net(torch.randn(2, 5)).sum().backward()
    msg = (
        "tracked layer(s) ['head']: inside tracker.domains() the weight was used (the model "
        "ran, or head.weight received a gradient) but head.forward was never called, so the "
        "tracker recorded nothing for it and its per-domain statistics would silently be zero. "
        "The usual cause is a fused linear cross-entropy that reads head.weight directly, e.g. "
        "Liger-Kernel's LigerFusedLinearCrossEntropyLoss or "
        "apply_liger_kernel_to_*(fused_linear_cross_entropy=True), or a chunked loss of "
        "HF/torchtune. Compute the loss with rnb_kernels.integrations.fused_ce."
        "fused_linear_cross_entropy(hidden, head.weight, targets, tracker=tracker) (or "
        "tracker.fused_cross_entropy(hidden, targets)), which collects the statistics in its "
        "own backward, or switch the fused loss off. (on_untracked='warn' turns this error into "
        "a warning.)"
    )
    assert [str(w.message) for w in rec] == [msg]
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampoline adds stack frames
        assert rec[0].filename == __file__
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [msg]
    assert tr.untracked_micro_batches == 1
    with pytest.warns(RuntimeWarning), tr.domains(torch.tensor([1, 2])):
        net(torch.randn(2, 5)).sum().backward()
    assert tr.untracked_micro_batches == 2


# ------------------------------------------------- id checks
def test_eager_id_check_raises_and_deferred_masks_every_bad_id():
    """id_check='eager' raises on the spot (also for CPU ids); 'deferred' masks ids below -1
    or at/above m to -1 and adds their number up over micro-batches."""
    net = _net()
    eager = DomainGradientTracker(net, M, id_check="eager")
    with pytest.raises(ValueError, match=r"num_domains"):
        eager.validate_ids(torch.tensor([0, 3]))
    tr = DomainGradientTracker(_net(), M, id_check="deferred")
    ids = tr.validate_ids(torch.tensor([-2, -1, 0, 2, 3]))
    assert ids.tolist() == [-1, -1, 0, 2, -1]
    tr.validate_ids(torch.tensor([5, 1]))
    assert int(tr._bad_ids) == 3


# ------------------------------------------------- constructor arguments
BAD_ARGS = [
    (dict(model="m"), TypeError, "model must be an nn.Module, got str"),
    (dict(num_domains=2.0), TypeError, "num_domains must be an int, got float"),
    (dict(num_domains=True), TypeError, "num_domains must be an int, got bool"),
    (dict(num_domains=0), ValueError, "num_domains must be >= 1, got 0"),
    (dict(mode="fast"), ValueError,
     "mode must be 'auto' or one of ('exact', 'projected', 'sketch'), got 'fast'"),
    (dict(mode=None), ValueError,
     "mode must be 'auto' or one of ('exact', 'projected', 'sketch'), got None"),
    (dict(sketch_dim=1.5), TypeError, "sketch_dim must be an int, got float"),
    (dict(sketch_dim=0), ValueError, "sketch_dim must be >= 1, got 0"),
    (dict(proj_dim=True), TypeError, "proj_dim must be an int, got bool"),
    (dict(proj_dim=0), ValueError, "proj_dim must be >= 1, got 0"),
    (dict(proj_in_dim="4"), TypeError, "proj_in_dim must be None or an int, got str"),
    (dict(proj_in_dim=True), TypeError, "proj_in_dim must be None or an int, got bool"),
    (dict(proj_in_dim=0), ValueError, "proj_in_dim must be >= 1, got 0"),
    (dict(exact_rows=2.0), TypeError, "exact_rows must be an int, got float"),
    (dict(exact_rows=False), TypeError, "exact_rows must be an int, got bool"),
    (dict(exact_rows=-1), ValueError, "exact_rows must be >= 0, got -1"),
    (dict(seed=1.0), TypeError, "seed must be an int, got float"),
    (dict(seed=True), TypeError, "seed must be an int, got bool"),
    (dict(seed=-1), ValueError, "seed must lie in [0, 2**32), got -1"),
    (dict(seed=2**32), ValueError, "seed must lie in [0, 2**32), got 4294967296"),
    (dict(reseed=1), TypeError, "reseed must be a bool, got int"),
    (dict(bitwise_grad=0), TypeError, "bitwise_grad must be a bool, got int"),
    (dict(skip_nonfinite="always"), ValueError,
     "skip_nonfinite must be one of ('round', 'micro-batch') or True, got 'always'"),
    (dict(skip_nonfinite=False), ValueError,
     "skip_nonfinite must be one of ('round', 'micro-batch') or True, got False"),
    (dict(id_check="lazy"), ValueError,
     "id_check must be one of ('auto', 'eager', 'deferred'), got 'lazy'"),
    (dict(on_untracked="maybe"), ValueError,
     "on_untracked must be one of ('raise', 'warn', 'ignore'), got 'maybe'"),
    (dict(dp_group=5), TypeError,
     "dp_group must be None, a ProcessGroup or a 1-D DeviceMesh, got int"),
]  # fmt: skip


@pytest.mark.parametrize(
    "case", BAD_ARGS, ids=[f"{next(iter(c[0]))}={next(iter(c[0].values()))!r}" for c in BAD_ARGS]
)
def test_constructor_rejects_bad_arguments_by_exact_message(case):
    """Every argument is checked before the model is touched: no forward is replaced."""
    import re

    override, exc, msg = case
    net = _net()
    kw = {"model": net, "num_domains": M, **override}
    with pytest.raises(exc, match="^" + re.escape(msg) + "$"):
        DomainGradientTracker(**kw)
    assert all("forward" not in mod.__dict__ for mod in net.modules())


def test_constructor_defaults_and_aliases(caplog):
    net = _net()
    tr = DomainGradientTracker(net, M)
    assert (tr.sketch_dim, tr.proj_dim, tr.proj_in_dim, tr.exact_rows) == (8192, 128, None, 64)
    assert (tr.seed, tr.reseed, tr.bitwise_grad, tr.backend) == (0, True, True, "auto")
    assert (tr.skip_nonfinite, tr.id_check, tr.on_untracked) == ("round", "auto", "raise")
    assert (tr.untracked_micro_batches, tr.nonfinite_skips, tr.nonfinite_rounds) == (0, 0, 0)
    assert tr.requested_mode == "auto" and tr.dp_group is None
    again = _net()
    assert DomainGradientTracker(again, M, skip_nonfinite=True).skip_nonfinite == "micro-batch"
    with pytest.raises(
        ValueError, match=r"^modules: Linear\(in_features=7, out_features=11, bias=True\) is "
        r"already tracked by another tracker$"
    ):  # fmt: skip
        DomainGradientTracker(net, M, modules=["2"])
    frozen = _net()
    frozen[0].weight.requires_grad_(False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rnb_kernels"):
        DomainGradientTracker(frozen, M, modules=["0", "2"])
    assert [r.getMessage() for r in caplog.records] == [
        "0.weight does not require grad: nothing will be tracked"
    ]


BAD_MODULES = [
    (lambda net: nn.Sequential(nn.Tanh()), None, ValueError,
     "modules: model has no nn.Linear to track; pass modules=..."),
    (lambda net: net, [], TypeError,
     "modules must be None, an nn.Module, a name pattern or a non-empty list"),
    (lambda net: net, 5, TypeError,
     "modules must be None, an nn.Module, a name pattern or a non-empty list"),
    (lambda net: net, [3], TypeError, "modules entries must be nn.Module or str, got int"),
    (lambda net: net, ["1"], TypeError, "modules: only nn.Linear can be tracked, got Tanh"),
    (lambda net: net, ["9"], ValueError, "modules: pattern '9' matches no submodule"),
    (lambda net: net, [nn.Linear(2, 2)], ValueError,
     "modules: Linear(in_features=2, out_features=2, bias=True) is not a submodule of model"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_MODULES, ids=[c[3][:40] for c in BAD_MODULES])
def test_modules_argument_errors_by_exact_message(case):
    import re

    build, modules, exc, msg = case
    with pytest.raises(exc, match="^" + re.escape(msg) + "$"):
        DomainGradientTracker(build(_net()), M, modules=modules)


def test_modules_given_as_module_objects():
    net = _net()
    tr = DomainGradientTracker(net, M, modules=[net[2], "0"])
    assert tr.module_names == ["0", "2"]
    assert DomainGradientTracker(_net(), M).module_names == ["2"]  # default: the last Linear


def test_removed_tracker_refuses_by_exact_message():
    tr = DomainGradientTracker(_net(), M)
    tr.remove()
    with pytest.raises(RuntimeError, match=r"^this tracker was removed; create a new one$"):
        tr.reset()


BAD_SCALES = [
    (True, TypeError, "grad_scale must be a float or a GradScaler, got bool"),
    ("2", TypeError, "grad_scale must be a float or a GradScaler, got str"),
    (0, ValueError, "grad_scale must be finite and > 0, got 0"),
    (-2.0, ValueError, "grad_scale must be finite and > 0, got -2.0"),
    (math.inf, ValueError, "grad_scale must be finite and > 0, got inf"),
    (math.nan, ValueError, "grad_scale must be finite and > 0, got nan"),
]


@pytest.mark.parametrize("case", BAD_SCALES, ids=[repr(c[0]) for c in BAD_SCALES])
def test_grad_scale_errors_by_exact_message(case):
    import re

    scale, exc, msg = case
    tr = DomainGradientTracker(_net(), M)
    with pytest.raises(exc, match="^" + re.escape(msg) + "$"):
        with tr.domains(torch.tensor([0, 1]), grad_scale=scale):
            pass


def test_grad_scale_as_a_tensor_or_an_int():
    """A tensor scale (what GradScaler keeps) is read as its float; an int is a float."""
    net = _net()
    tr = DomainGradientTracker(net, M, mode="exact")
    ref_net = _net()
    ref = DomainGradientTracker(ref_net, M, mode="exact")
    x = torch.randn(2, 5)
    for model, tracker, scale in ((net, tr, torch.tensor(4.0)), (ref_net, ref, 4)):
        with tracker.domains(torch.tensor([0, 1]), grad_scale=scale):
            (4.0 * model(x).sum()).backward()
    plain_net = _net()
    plain = DomainGradientTracker(plain_net, M, mode="exact")
    with plain.domains(torch.tensor([0, 1])):
        plain_net(x).sum().backward()
    assert torch.allclose(tr.gram(), plain.gram(), rtol=1e-6)
    assert torch.equal(tr.gram(), ref.gram())


def test_meta_device_model_is_refused_by_exact_message():
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 11))
    with pytest.raises(
        ValueError,
        match=r"^modules: 2\.weight is on the meta device; build the tracker after the model is "
        r"materialised \(to_empty\(\) / init\), so its buffers get a real device$",
    ):
        DomainGradientTracker(net, M)


def test_constructor_boundaries_are_accepted():
    """The smallest legal sizes and the largest seed build a working tracker."""
    for kw in (dict(num_domains=1), dict(sketch_dim=1, mode="sketch"), dict(proj_dim=1),
               dict(proj_in_dim=1, mode="projected"), dict(seed=2**32 - 1), dict(seed=64)):  # fmt: skip
        net = _net()
        tr = DomainGradientTracker(net, **{"num_domains": M, **kw})
        with tr.domains(torch.zeros(2, dtype=torch.long)):
            net(torch.randn(2, 5)).sum().backward()
        assert tr.counts()[0] == 2.0


def test_auto_mode_logs_its_choice(caplog):
    with caplog.at_level(logging.INFO, logger="rnb_kernels"):
        DomainGradientTracker(_net(), M)
    assert (
        "mode='auto' -> 'exact': m * P_tracked = 3 x 88 = 264 fp32 elements <= 16777216 "
        "(AUTO_EXACT_MAX_ELEMENTS)"
    ) in [r.getMessage() for r in caplog.records]
    big = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rnb_kernels"):
        tr = DomainGradientTracker(big, 2)
    assert tr.mode == "projected"
    assert (
        "mode='auto' -> 'projected': m * P_tracked = 2 x 16777216 = 33554432 fp32 elements > "
        "16777216 (AUTO_EXACT_MAX_ELEMENTS)"
    ) in [r.getMessage() for r in caplog.records]


def test_counters_have_their_dtypes():
    tr = DomainGradientTracker(_net(), M, id_check="deferred")
    assert tr.counts().dtype == torch.float64 and tr._bad_ids.dtype == torch.int64
    assert tr._target_count.dtype == torch.float64


def test_construction_is_logged_at_debug(caplog):
    with caplog.at_level(logging.DEBUG, logger="rnb_kernels"):
        DomainGradientTracker(_net(), M, modules=["0", "2"], mode="exact")
    assert "tracking ['0', '2'] in exact mode (m=3, P=130)" in [
        r.getMessage() for r in caplog.records
    ]
