"""The tracker's target row: record_target's arguments and errors, masks, loss scales, and
target_alignment against independently computed gradients."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
from _optest import GemmShapes
from torch import nn

from rnb_kernels import DomainGradientTracker

M = 3


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 11))


def _head_grad(net: nn.Sequential, loss: torch.Tensor) -> torch.Tensor:
    """float64 flattened ``[d loss / d W_head | d loss / d b_head]``, by plain autograd."""
    gw, gb = torch.autograd.grad(loss, [net[2].weight, net[2].bias])
    return torch.cat([gw.reshape(-1), gb]).double()


def test_record_target_rejects_bad_losses():
    net = _net()
    tr = DomainGradientTracker(net, M, mode="exact")
    with pytest.raises(TypeError, match="loss must be a torch.Tensor, got float"):
        tr.record_target(1.0)
    with torch.no_grad():
        frozen = net(torch.randn(2, 5)).sum()
    with pytest.raises(
        ValueError, match=r"^loss does not require grad \(was it computed under no_grad\?\)$"
    ):
        tr.record_target(frozen)
    untracked_only = net[0](torch.randn(2, 5)).sum()  # never reaches the tracked head
    with pytest.raises(
        ValueError,
        match=r"^loss does not depend on any tracked module \(a fused linear cross-entropy that "
        r"reads the head's weight directly bypasses it: use "
        r"rnb_kernels\.integrations\.fused_ce\.fused_linear_cross_entropy\(\.\.\., tracker=\)\)$",
    ):
        tr.record_target(untracked_only)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        tr.record_target(net(torch.randn(2, 5)).sum(), mask=torch.tensor([0, 1]))
    assert float(tr.target_count()) == 0.0
    assert not bool(tr.target_grad().any())


def test_record_target_equals_autograd_and_leaves_grads_alone():
    net = _net()
    tr = DomainGradientTracker(net, M, mode="exact")
    x = torch.randn(4, 5)
    tr.record_target(net(x).square().sum())
    want = _head_grad(net, net(x).square().sum())
    torch.testing.assert_close(tr.target_grad().double(), want, rtol=1e-5, atol=1e-6)
    assert float(tr.target_count()) == 4.0
    assert all(p.grad is None for p in net.parameters())


def test_record_target_mask_keeps_only_the_masked_samples():
    net = _net()
    tr = DomainGradientTracker(net, M, mode="exact")
    x = torch.randn(5, 5)
    mask = torch.tensor([True, False, True, True, False])
    tr.record_target(net(x).square().sum(1).sum(), mask=mask)
    want = _head_grad(net, net(x[mask]).square().sum())
    torch.testing.assert_close(tr.target_grad().double(), want, rtol=1e-5, atol=1e-6)
    assert float(tr.target_count()) == 3.0


def test_record_target_sums_a_non_scalar_loss():
    net = _net()
    a = DomainGradientTracker(net, M, mode="exact")
    x = torch.randn(4, 5)
    a.record_target(net(x).square().sum(1))  # [4]: its sum is differentiated
    got = a.target_grad().clone()
    a.reset()
    a.record_target(net(x).square().sum())
    assert torch.equal(got, a.target_grad())


def test_record_target_grad_scale_is_undone():
    net = _net()
    tr = DomainGradientTracker(net, M, mode="exact")
    x = torch.randn(4, 5)
    tr.record_target(net(x).sum() * 4.0, grad_scale=4.0)
    scaled = tr.target_grad().clone()
    tr.reset()
    tr.record_target(net(x).sum())
    torch.testing.assert_close(scaled, tr.target_grad(), rtol=1e-6, atol=0)


def test_record_target_frees_the_graph_unless_asked():
    net = _net()
    tr = DomainGradientTracker(net, M, mode="exact")
    loss = net(torch.randn(3, 5)).sum()
    tr.record_target(loss)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    loss = net(torch.randn(3, 5)).sum()
    tr.record_target(loss, retain_graph=True)
    loss.backward()  # the graph is still there
    assert net[2].weight.grad is not None


def test_record_target_runs_no_input_gradient_of_the_last_tracked_layer():
    """anchor-only backward: the head's dy @ W (inner size 11 = K_out) is never formed."""
    net = _net()
    tr = DomainGradientTracker(net, M, mode="exact")
    loss = net(torch.randn(3, 5)).sum()
    with GemmShapes() as rec:
        tr.record_target(loss)
    assert 11 not in rec.inner, rec.inner
    assert 3 in rec.inner  # the head's dyᵀ x over the 3 rows


@pytest.mark.parametrize("mode", ["exact", "projected", "sketch"])
def test_record_target_spends_no_gemm_on_the_discarded_weight_gradient(mode):
    """A target pass needs the head's statistics only: one product over its 3 rows (the
    target's share), not also the ``dyᵀ x`` a training backward returns as ``param.grad``."""
    net = _net()
    tr = DomainGradientTracker(net, M, mode=mode, sketch_dim=64, proj_dim=8)
    x = torch.randn(3, 5)
    with GemmShapes() as rec:
        tr.record_target(net(x).square().sum())
    assert rec.inner.count(3) == 1, rec.inner
    if mode == "exact":  # the statistics are the target's gradient all the same
        ref = _net()
        want = _head_grad(ref, ref(x).square().sum())
        torch.testing.assert_close(tr.target_grad().double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["exact", "projected", "sketch"])
def test_target_alignment_undoes_both_loss_scales(mode):
    """Domain rows at grad_scale 4 and the target at 2 give the alignment of unscaled ones."""
    kw = {"mode": mode, "sketch_dim": 64, "proj_dim": 8, "exact_rows": 2, "reseed": False}
    nets = [_net(), _net()]
    trs = [DomainGradientTracker(n, M, **kw) for n in nets]
    x, ids, xt = torch.randn(6, 5), torch.tensor([0, 0, 1, 2, 2, 1]), torch.randn(4, 5)
    for (net, tr), (ds, ts) in zip(zip(nets, trs), ((4.0, 2.0), (1.0, 1.0))):
        with tr.domains(ids, grad_scale=ds):
            (net(x).square().sum() * ds).backward()
        tr.record_target(net(xt).sum() * ts, grad_scale=ts)
    got, want = trs[0].target_alignment(), trs[1].target_alignment()
    assert got.dtype == torch.float64 and got.shape == (M,)
    assert bool(want.abs().gt(0).all())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    if mode == "exact":  # and against plain autograd, one backward per domain
        net = _net()
        tgt = _head_grad(net, net(xt).sum())
        for d in range(M):
            g = _head_grad(net, net(x[ids == d]).square().sum())
            torch.testing.assert_close(want[d], g @ tgt, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- statistics reads
def test_gram_vector_is_float64_and_undoes_the_loss_scale():
    nets = [_net(), _net()]
    trs = [DomainGradientTracker(n, M, mode="exact") for n in nets]
    x, ids = torch.randn(6, 5), torch.tensor([0, 0, 1, 2, 2, 1])
    for net, tr, s in zip(nets, trs, (8.0, 1.0)):
        with tr.domains(ids, grad_scale=s):
            (net(x).square().sum() * s).backward()
    c = [1 / 3, 2 / 7, 0.1]  # not fp32-representable: a float32 detour would show
    want = trs[1].gram() @ torch.tensor(c, dtype=torch.float64)
    got = trs[0].gram_vector(c)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(trs[1].gram_vector(c), want, rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match=r"coeffs must have shape \(3,\), got \(2,\)"):
        trs[0].gram_vector([1.0, 2.0])


def test_nonfinite_reads_are_counted_and_warned():
    net = _net()
    tr = DomainGradientTracker(net, M, mode="exact")  # skip_nonfinite="round": nothing dropped
    with tr.domains(torch.tensor([0, 1])):
        net(torch.tensor([[float("inf")] * 5, [1.0] * 5])).sum().backward()
    for k in (1, 2):
        with pytest.warns(RuntimeWarning, match=f"non-finite gram vector.*{k} so far"):
            tr.gram_vector([1.0, 0.0, 0.0])
        assert tr.nonfinite_rounds == k


def test_target_micro_batch_dropped_after_the_head_saw_it_is_not_counted():
    """skip_nonfinite='micro-batch': the head's backward is finite (tanh saturates the inf),
    the first layer's input is not, so the target micro-batch is dropped: no count."""
    net = _net()
    tr = DomainGradientTracker(net, M, modules=["0", "2"], mode="exact",
                               skip_nonfinite="micro-batch")  # fmt: skip
    x = torch.randn(3, 5)
    x[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        tr.record_target(net(x).sum())
    assert float(tr.target_count()) == 0.0 and tr.nonfinite_skips == 1
    tr.record_target(net(torch.randn(2, 5)).sum())
    assert float(tr.target_count()) == 2.0


def test_mode_specific_reads_name_their_mode():
    tr = DomainGradientTracker(_net(), M, mode="exact")
    with pytest.raises(RuntimeError, match=r"^domain_sketches\(\) needs mode='sketch'$"):
        tr.domain_sketches()
    with pytest.raises(RuntimeError, match=r"domain_projections\(\) needs mode='projected'"):
        tr.domain_projections()
    sk = DomainGradientTracker(_net(), M, mode="sketch")
    with pytest.raises(RuntimeError, match=r"domain_grads\(\) needs mode='exact'"):
        sk.domain_grads()


def test_target_alignment_is_float64_over_every_layer():
    """Two tracked layers, against float64 inner products of the exact rows; non-finite
    alignments are reported under their own name."""
    net = _net()
    tr = DomainGradientTracker(net, M, modules=["0", "2"], mode="exact")
    x, ids = torch.randn(6, 5), torch.tensor([0, 0, 1, 2, 2, 1])
    with tr.domains(ids):
        (net(x).square().sum() * 1e3).backward()  # large values: fp32 sums would round
    tr.record_target(net(torch.randn(4, 5)).sum() / 3)
    want = tr.domain_grads().double() @ tr.target_grad().double()
    got = tr.target_alignment()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    tr.reset()
    with tr.domains(torch.tensor([0, 1])):
        net(torch.tensor([[float("inf")] * 5, [1.0] * 5])).sum().backward()
    tr.record_target(net(torch.randn(2, 5)).sum())
    with pytest.warns(RuntimeWarning, match="^non-finite target alignment: a NaN/Inf gradient"):
        tr.target_alignment()


def test_finite_reads_are_silent_and_warnings_point_at_the_caller(caplog):
    net = _net()
    tr = DomainGradientTracker(net, M, mode="exact")
    with tr.domains(torch.tensor([0, 1])):
        net(torch.randn(2, 5)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr.gram_vector([1.0, 1.0, 1.0])
    assert tr.nonfinite_rounds == 0
    tr.reset()
    with tr.domains(torch.tensor([0, 1])):
        net(torch.tensor([[float("inf")] * 5, [1.0] * 5])).sum().backward()
    caplog.clear()
    with pytest.warns(RuntimeWarning) as rec:
        tr.gram_vector([1.0, 1.0, 1.0])
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampoline adds stack frames
        assert rec[0].filename == __file__  # stacklevel: the user's call, not the tracker
    msg = ("non-finite gram vector: a NaN/Inf gradient reached the tracked statistics this "
           "round; mixers skip such an update (1 so far)")  # fmt: skip
    assert str(rec[0].message) == msg
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [msg]


def test_deferred_bad_ids_are_reported_once_in_full():
    net = _net()
    tr = DomainGradientTracker(net, M, mode="exact", id_check="deferred")
    with tr.domains(torch.tensor([0, 7, 1, -3])):
        net(torch.randn(4, 5)).sum().backward()
    with pytest.raises(
        ValueError,
        match=r"^domain_ids: 2 id\(s\) outside \[-1, num_domains=3\) were passed to domains\(\) "
        r"this round; they were ignored \(treated as -1\), the statistics hold only the valid "
        r"ids$",
    ):
        tr.counts()
    assert tr.counts().tolist() == [1.0, 1.0, 0.0]  # reported once; the valid ids were kept


def test_row_sharded_layers_refuse_full_rows_by_name():
    """domain_grads() / target_grad() of exact mode need every row on this rank."""
    tr = DomainGradientTracker(_net(), M, modules=["0", "2"], mode="exact")
    tr._slots[1].tp_group = object()  # what bind_sharded leaves on a row-sharded layer
    tail = (r": tracked layers \['2'\] are row-sharded \(tensor parallel\), each rank holds "
            r"only its rows; use gram\(\), gram_vector\(\) or target_alignment\(\)$")  # fmt: skip
    with pytest.raises(RuntimeError, match=r"^domain_grads\(\)" + tail):
        tr.domain_grads()
    with pytest.raises(RuntimeError, match=r"^target_grad\(\)" + tail):
        tr.target_grad()
    sk = DomainGradientTracker(_net(), M, mode="sketch")
    sk._slots[0].tp_group = object()
    assert sk.target_grad().shape == (sk.sketch_dim,)  # a sketch row adds over shards anyway


def test_auto_mode_counts_the_bias():
    from rnb_kernels.tracking.tracker import AUTO_EXACT_MAX_ELEMENTS, resolve_mode

    side = int(AUTO_EXACT_MAX_ELEMENTS**0.5)  # weight alone exactly at the threshold
    assert side * side == AUTO_EXACT_MAX_ELEMENTS
    with_bias = nn.Linear(side, side, device="meta")
    without = nn.Linear(side, side, bias=False, device="meta")
    assert resolve_mode("auto", 1, [("l", without)]) == "exact"
    assert resolve_mode("auto", 1, [("l", with_bias)]) == "projected"


def test_fused_cross_entropy_picks_the_named_or_given_layer():
    import torch.nn.functional as F

    net = _net()
    tr = DomainGradientTracker(net, M, modules=["0", "2"], mode="exact")
    targets = torch.tensor([1, 0, 3])
    h2, h0 = torch.randn(3, 7), torch.randn(3, 5)
    for module, h, lin in ((None, h2, net[2]), ("2", h2, net[2]), (net[2], h2, net[2]),
                           ("0", h0, net[0]), (net[0], h0, net[0])):  # fmt: skip
        got = tr.fused_cross_entropy(h, targets, module=module)
        torch.testing.assert_close(got, F.cross_entropy(lin(h), targets), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"^module: 'nope' is not tracked by this tracker$"):
        tr.fused_cross_entropy(h2, targets, module="nope")


def test_validate_ids_names_its_argument():
    tr = DomainGradientTracker(_net(), M)
    with pytest.raises(ValueError, match=r"^domain_ids must lie in \[-1, num_domains=3\)"):
        tr.validate_ids(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"^ids must lie in"):
        tr.validate_ids(torch.tensor([0, 5]), name="ids")


@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ, reason="mutmut adds stack frames")
@pytest.mark.parametrize("path", ["domains", "record_target", "target"])
def test_dropped_micro_batch_warning_points_at_the_caller(path):
    net = _net()
    tr = DomainGradientTracker(net, M, skip_nonfinite="micro-batch")
    x = torch.full((2, 5), float("nan"))
    with pytest.warns(RuntimeWarning, match="non-finite activations") as rec:
        if path == "domains":
            with tr.domains(torch.tensor([0, 1])):
                net(x).sum().backward()
        elif path == "record_target":
            tr.record_target(net(x).sum())
        else:
            with tr.target():
                net(x).sum().backward()
    assert [w.filename for w in rec] == [__file__]
