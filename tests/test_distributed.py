"""Two-process gloo run on CPU: the tracker's statistics are all-reduced (equal to one process
over the union of the data) and every rank computes bit-identical weights."""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch
import torch.distributed as dist
from _spawn import free_port, spawn_ranks
from _tol import assert_close
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rnb_kernels import distributed as rdist
from rnb_kernels.balancer import Balancer
from rnb_kernels.mixing import RnB, Static
from rnb_kernels.tracking import DomainGradientTracker

WORLD, M, B, T, D = 2, 3, 4, 3, 6  # B samples per rank and micro-batch
P_EVAL = [0.5, 0.3, 0.2]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 10), nn.Tanh(), nn.Linear(10, 7))


def _data():
    """Two global micro-batches of 2B samples; rank r owns rows [rB, (r+1)B)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        ids = torch.randint(-1, M, (WORLD * B, T), generator=g)
        out.append((torch.randn(WORLD * B, T, D, generator=g), ids))
    return out


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.square().sum()


def _stats(model, micro_batches, mode):
    """Gram and counts after the first micro-batch, and again after the second (accumulated
    after a read)."""
    tracker = DomainGradientTracker(model, M, modules=["0", "2"], mode=mode, sketch_dim=128)
    res = {}
    for k, (x, ids) in enumerate(micro_batches):
        with tracker.domains(ids):
            _loss(model(x)).backward()
        res[f"gram{k}"], res[f"counts{k}"] = tracker.gram(), tracker.counts()
    res["weights"] = RnB(M, eval_proportions=P_EVAL, lam=2.0).update(
        gram=res["gram1"], counts=res["counts1"]
    )
    tracker.remove()
    return res


def _scaled_stats(model, micro_batches, scale: float):
    """Exact-mode Gram after both micro-batches, each backward run under loss scale ``scale``
    (declared to the tracker, which stores the statistics unscaled)."""
    tracker = DomainGradientTracker(model, M, modules=["0", "2"], mode="exact")
    for x, ids in micro_batches:
        with tracker.domains(ids, grad_scale=scale):
            (scale * _loss(model(x))).backward()
    out = tracker.gram()
    tracker.remove()
    return out


def _per_sample(out: torch.Tensor) -> torch.Tensor:
    return out.square().sum((1, 2))


def _exact_rows_rounds(model, micro_batches, read_before_reset: bool, heavy=None):
    """Projected mode with exact rows over two rounds: the rows kept in round 1 (chosen from
    round 0's energy, summed over ranks) and round 1's Gram. ``heavy`` forces round 1's rows
    (the single-process comparison)."""
    tracker = DomainGradientTracker(model, M, modules="2", mode="projected", proj_dim=4,
                                    exact_rows=3)  # fmt: skip
    for x, ids in micro_batches:
        with tracker.domains(ids):
            _loss(model(x)).backward()
    if read_before_reset:
        tracker.gram()
    tracker.reset()
    slot = tracker._slots[0]
    if heavy is not None:
        slot.heavy = heavy
    res = {"heavy": slot.heavy.clone()}
    for x, ids in micro_batches:
        with tracker.domains(ids):
            _loss(model(x)).backward()
    res["gram"] = tracker.gram()
    tracker.remove()
    return res


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        _work(rank, out_dir)
        # DDP must be gone before the group: a gloo group destroyed by DDP's reducer at frame
        # exit deadlocks now and then on torch 2.13 CPU (a work's destructor on gloo's thread
        # waits for the GIL the joining main thread holds).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _work(rank: int, out_dir: str) -> None:
    model = _model()
    ddp = DistributedDataParallel(model)
    mine = [(x[rank * B : (rank + 1) * B], i[rank * B : (rank + 1) * B]) for x, i in _data()]
    res = {}
    for mode in ("exact", "sketch"):
        res[mode] = _stats(ddp, mine, mode)
        rdist.check_consistent(res[mode]["weights"], "weights")
        ddp.zero_grad()
    try:  # the consistency check must catch ranks that disagree
        rdist.check_consistent(torch.tensor([float(rank)]), "probe")
        res["probe"] = "no error"
    except RuntimeError as e:
        res["probe"] = str(e)
    # Ranks under different loss scales (2 is a value a one-token mutant of `!= 1.0` can hit):
    # the buffers are brought to true units before the sum.
    res["scaled_gram"] = _scaled_stats(ddp, mine, (4.0, 2.0)[rank])
    ddp.zero_grad()
    for read_before_reset in (True, False):
        res[f"rows{read_before_reset}"] = _exact_rows_rounds(ddp, mine, read_before_reset)
        ddp.zero_grad()
    # A Balancer loop: sampler streams per rank, weights checked every round.
    labels = torch.arange(48) % M
    bal = Balancer(ddp, RnB(M, eval_proportions=P_EVAL, lam=2.0, update_every=1))
    sampler = bal.make_sampler(labels, batch_size=B, seed=0)
    it = iter(sampler)
    feats = torch.randn(48, T, D, generator=torch.Generator().manual_seed(2))
    drawn = []
    for _ in range(3):
        idx = [next(it) for _ in range(B)]
        drawn += idx
        with bal.step(labels[idx]) as s:
            out = ddp(feats[idx])
            s.record_loss(_per_sample(out).detach())
            _loss(out).backward()
        bal.after_step()
    res["balancer_weights"] = [h["weights"] for h in bal.history]
    res["balancer_losses"] = [h["loss"] for h in bal.history]
    res["drawn"] = drawn
    # A Balancer whose ranks compute different weights must stop, on every rank.
    bal = Balancer(model, Static([1.0 + rank, 1.0, 1.0]))
    try:
        bal.update()
        res["divergent"] = "no error"
    except RuntimeError as e:
        res["divergent"] = str(e)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    out = tmp_path_factory.mktemp("dist")
    spawn_ranks(_worker, (free_port(), str(out)), WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_ranks_hold_identical_weights_and_statistics(ranks, mode):
    r0, r1 = ranks[0][mode], ranks[1][mode]
    assert torch.equal(r0["weights"], r1["weights"])
    for key in ("gram0", "gram1", "counts0", "counts1"):
        assert torch.equal(r0[key], r1[key]), key


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_gram_equals_single_process_over_the_union(ranks, mode):
    single = _stats(_model(), _data(), mode)
    got = ranks[0][mode]
    for key in ("gram0", "gram1"):
        assert_close(got[key], single[key], torch.float32, f"{mode} {key}")
    for key in ("counts0", "counts1"):
        assert torch.equal(got[key], single[key]), key
    torch.testing.assert_close(got["weights"], single["weights"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("read_before_reset", [True, False])
def test_exact_rows_agree_across_ranks_and_with_one_process(ranks, read_before_reset):
    key = f"rows{read_before_reset}"
    r0, r1 = ranks[0][key], ranks[1][key]
    assert torch.equal(r0["heavy"], r1["heavy"]) and torch.equal(r0["gram"], r1["gram"])
    # The rows: the largest Σ ‖dW_i‖² over both ranks' micro-batches of round 0.
    energy = torch.zeros(7, dtype=torch.float64)
    for x, _ids in _data():
        for r in range(WORLD):
            model = _model()
            _loss(model(x[r * B : (r + 1) * B])).backward()
            energy += model[2].weight.grad.double().square().sum(1)
    want = torch.sort(torch.topk(energy, 3).indices).values
    assert torch.equal(r0["heavy"], want), (r0["heavy"], want)
    # Round 1's Gram is one process's over the union with the same rows (states are linear).
    single = _exact_rows_rounds(_model(), _data(), True, heavy=want)
    assert_close(r0["gram"], single["gram"], torch.float32, "exact rows gram")


def test_consistency_check_detects_divergent_ranks(ranks):
    assert all("differ across ranks" in r["probe"] for r in ranks)


def test_balancer_under_ddp(ranks):
    w0, w1 = ranks[0]["balancer_weights"], ranks[1]["balancer_weights"]
    assert len(w0) == 3 and w0 == w1  # bit-identical on both ranks after every round
    assert not set(ranks[0]["drawn"]) & set(ranks[1]["drawn"])  # disjoint sample streams
    # Each round's weights are those one process computes from the union of both ranks'
    # micro-batches (R&B normalises G p, so the ranks' sum and one process's sum agree).
    labels = torch.arange(48) % M
    feats = torch.randn(48, T, D, generator=torch.Generator().manual_seed(2))
    model = _model()
    bal = Balancer(model, RnB(M, eval_proportions=P_EVAL, lam=2.0, update_every=1))
    for step in range(3):
        idx = [i for r in ranks for i in r["drawn"][step * B : (step + 1) * B]]
        with bal.step(labels[idx]) as s:
            out = model(feats[idx])
            s.record_loss(_per_sample(out).detach())
            _loss(out).backward()
        bal.after_step()
    single = [h["weights"] for h in bal.history]
    # The per-domain losses of each round are the union's (record_loss sums all-reduced).
    assert ranks[0]["balancer_losses"] == ranks[1]["balancer_losses"]
    for got, want in zip(ranks[0]["balancer_losses"], [h["loss"] for h in bal.history]):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=0)
    for got, want in zip(w0, single):
        torch.testing.assert_close(
            torch.as_tensor(got), torch.as_tensor(want), rtol=1e-6, atol=1e-9
        )
    # The rounds moved the weights (a check that compares uniform with uniform proves nothing).
    assert max(abs(a - 1 / M) for a in torch.as_tensor(single[-1]).tolist()) > 1e-3


def test_balancer_stops_ranks_with_different_weights(ranks):
    for r in ranks:
        assert r["divergent"].startswith("mixture weights differ across ranks"), r["divergent"]


def test_ranks_under_different_loss_scales_sum_true_units(ranks):
    assert torch.equal(ranks[0]["scaled_gram"], ranks[1]["scaled_gram"])
    single = _stats(_model(), _data(), "exact")["gram1"]
    assert_close(ranks[0]["scaled_gram"], single, torch.float32, "scaled gram")


def test_helpers_are_no_ops_without_a_process_group():
    t = torch.ones(3)
    rdist.all_reduce_sum_([t])
    rdist.check_consistent(t, "t")
    assert t.tolist() == [1.0, 1.0, 1.0]
    assert rdist.world_size() == 1 and rdist.rank() == 0


def _hang(rank: int) -> None:
    time.sleep(600)


def test_spawn_ranks_fails_hung_ranks_at_its_deadline():
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="2 ranks still running after 3 s"):
        spawn_ranks(_hang, (), 2, deadline_s=3)
    assert time.monotonic() - start < 60
