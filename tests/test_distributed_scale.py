"""The tracker at scale, on two gloo ranks on the CPU, against single-process float64-checked
ground truth computed here over the union of the ranks' data:

* FSDP2 (``fully_shard`` on the body's layers, the head and the root; tracker on the head):
  ``param.grad`` equals an untracked FSDP2 run, ``gram()`` / ``target_alignment()`` equal one
  process over the union of the data, for exact and sketch mode;
* FSDP2 with the chunked fused cross-entropy computing the head's loss (head in the root's
  FSDP group, its forward never called): statistics equal the unfused single-process head;
* a vocabulary-parallel head (``ColwiseParallel`` on ``lm_head``, 2-way, uneven shards): each
  rank holds ``V / 2`` rows and sees its shard of ``dy``; partial Grams (exact) and shard
  sketches (hashed by global row) combine into the unsharded model's statistics;
* the ``torchrun`` examples (DDP, FSDP2, FSDP2 + TP head) at tiny size.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _spawn import free_port, spawn_ranks
from _tol import assert_close
from torch import nn

from rnb_kernels.tracking import DomainGradientTracker

ROOT = Path(__file__).resolve().parents[1]
WORLD, M, D, HID, V, B, T = 2, 3, 6, 8, 13, 4, 3  # V = 13: uneven vocabulary shards (7 + 6)
MODES = ["exact", "sketch", "projected"]
K, PROJ = 64, 8  # sketch_dim; proj_dim (< V: a real projection)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")


class Net(nn.Module):
    """body (two Linear + tanh) -> head; ``loss`` is the summed next-token-style CE."""

    def __init__(self, bias: bool = False, fused: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(D, HID), nn.Tanh(), nn.Linear(HID, HID), nn.Tanh())
        self.head = nn.Linear(HID, V, bias=bias)
        self.fused = fused
        self.tracker: DomainGradientTracker | None = None

    def forward(self, x, t):
        h = self.body(x)
        if self.fused:  # the head's weight is read directly; its forward never runs
            return self.tracker.fused_cross_entropy(h, t, reduction="sum", chunk_size=5)
        return F.cross_entropy(self.head(h).flatten(0, 1), t.flatten(), reduction="sum")


def _data(seed: int, batch: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, T, D, generator=g)
    t = torch.randint(0, V, (batch, T), generator=g)
    ids = torch.randint(-1, M, (batch, T), generator=g)
    return x, t, ids


def _round(model, tracker, batches, target, fn=None):
    """Two micro-batches and a target loss; the statistics a mixer would read."""
    fn = model if fn is None else fn
    for x, t, ids in batches:
        with tracker.domains(ids):
            fn(x, t).backward()
    tracker.record_target(fn(*target))
    return {
        "gram": tracker.gram(),
        "gram_vector": tracker.gram_vector(torch.tensor([0.5, 0.3, 0.2])),
        "alignment": tracker.target_alignment(),
        "counts": tracker.counts(),
        "memory": tracker.memory_bytes(),
    }


class Bypass(Net):
    """The head's loss reads ``head.weight`` directly (a fused cross-entropy's pattern)."""

    def forward(self, x, t):
        z = self.body(x).flatten(0, 1) @ self.head.weight.T
        return F.cross_entropy(z, t.flatten(), reduction="sum")


def _one_block(model, tracker, batch) -> None:
    x, t, ids = batch
    with tracker.domains(ids):
        model(x, t).backward()


def _error(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is what the test reads
        return f"{type(e).__name__}: {e}"
    return "no error"


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        g = p.grad
        out[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


# Global data: two micro-batches of WORLD * B samples and a target batch; rank r owns rows
# [r B, (r + 1) B) under data parallelism, everything under tensor parallelism.
BATCHES = [_data(s, WORLD * B) for s in (1, 2)]
TARGET = _data(3, WORLD * B)[:2]


def _mine(rank: int):
    sl = slice(rank * B, (rank + 1) * B)
    return [(x[sl], t[sl], i[sl]) for x, t, i in BATCHES], (TARGET[0][sl], TARGET[1][sl])


def _fsdp(model: nn.Module, head_alone: bool = True) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in (model.body[0], model.body[2]):
        fully_shard(layer)
    if head_alone:
        fully_shard(model.head)
    return fully_shard(model)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        _work(rank, out_dir)
        # Models must be gone before the group: gloo teardown with live DDP/FSDP state aborts
        # now and then on torch 2.13 CPU (see examples/common.py: shutdown).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _work(rank: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    res: dict = {}
    batches, target = _mine(rank)
    for mode in MODES:
        # FSDP2, tracker built on the sharded model (DTensor parameters).
        model = _fsdp(Net())
        tr = DomainGradientTracker(model, M, modules="head", mode=mode, sketch_dim=K, proj_dim=PROJ)
        res[f"fsdp-{mode}"] = _round(model, tr, batches, target)
        res[f"fsdp-{mode}"]["grads"] = _grads(model)
        # FSDP2 + fused CE: the head shares the root's FSDP group.
        model = _fsdp(Net(fused=True), head_alone=False)
        model.tracker = DomainGradientTracker(
            model, M, modules="head", mode=mode, sketch_dim=K, proj_dim=PROJ
        )
        res[f"fsdp-fused-{mode}"] = _round(model, model.tracker, batches, target)
        res[f"fsdp-fused-{mode}"]["grads"] = _grads(model)
    plain = _fsdp(Net())
    for x, t, _ in batches:
        plain(x, t).backward()
    res["fsdp-untracked-grads"] = _grads(plain)
    # A fused loss that reads the head's weight directly (Liger's pattern) under FSDP2: the
    # sharded weight never receives autograd's gradient, the model's forward still ran.
    model = _fsdp(Bypass(), head_alone=False)
    tr = DomainGradientTracker(model, M, modules="head")
    res["fsdp-bypass"] = _error(lambda: _one_block(model, tr, batches[0]))

    # Vocabulary-parallel head: both ranks see the whole batch.
    mesh = init_device_mesh("cpu", (WORLD,))
    for bias in (False, True):
        for mode in MODES:
            model = Net(bias=bias)
            parallelize_module(model, mesh, {"head": ColwiseParallel(output_layouts=Replicate())})
            tr = DomainGradientTracker(
                model, M, modules="head", mode=mode, sketch_dim=K, proj_dim=PROJ
            )
            r = _round(model, tr, BATCHES, TARGET)
            r["grads"] = _grads(model)
            r["local_rows"] = tr._slots[0].local_rows
            try:
                tr.domain_grads()
                r["domain_grads"] = "no error"
            except RuntimeError as e:
                r["domain_grads"] = str(e)
            res[f"tp-{mode}-{'bias' if bias else 'nobias'}"] = r
    # A row-wise (input-dim) sharded head is refused with the layer's name.
    from torch.distributed.tensor.parallel import RowwiseParallel

    model = Net()
    parallelize_module(model, mesh, {"head": RowwiseParallel(input_layouts=Replicate())})
    tr = DomainGradientTracker(model, M, modules="head")
    res["tp-rowwise"] = _error(lambda: _one_block(model, tr, BATCHES[0]))
    # torch.compile of the vocabulary-parallel model: the row-sharded head runs eagerly.
    model = Net()
    parallelize_module(model, mesh, {"head": ColwiseParallel(output_layouts=Replicate())})
    tr = DomainGradientTracker(model, M, modules="head", sketch_dim=K, proj_dim=PROJ)
    compiled = torch.compile(model, backend="aot_eager")
    res["tp-compiled"] = _round(model, tr, BATCHES, TARGET, compiled)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    spawn_ranks(_worker, (free_port(), str(out)), WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single(mode: str, bias: bool = False) -> dict:
    """One process over the union of the data (the ground truth of every distributed run)."""
    model = Net(bias=bias)
    tr = DomainGradientTracker(model, M, modules="head", mode=mode, sketch_dim=K, proj_dim=PROJ)
    res = _round(model, tr, BATCHES, TARGET)
    res["grads"] = _grads(model)
    return res


def _check_stats(got: dict, ref: dict, what: str) -> None:
    for key in ("gram", "gram_vector", "alignment"):
        assert_close(got[key], ref[key], torch.float32, f"{what} {key}")
    assert torch.equal(got["counts"], ref["counts"]), f"{what} counts"


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_statistics_equal_one_process_over_the_union(ranks, mode):
    ref = _single(mode)
    for r in ranks:
        _check_stats(r[f"fsdp-{mode}"], ref, f"fsdp {mode}")
    assert torch.equal(ranks[0][f"fsdp-{mode}"]["gram"], ranks[1][f"fsdp-{mode}"]["gram"])


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_param_grads_equal_an_untracked_fsdp2_run(ranks, mode):
    for r in ranks:
        got, plain = r[f"fsdp-{mode}"]["grads"], r["fsdp-untracked-grads"]
        assert got.keys() == plain.keys()
        for name in got:
            assert torch.equal(got[name], plain[name]), name


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_with_fused_cross_entropy_equals_the_unfused_head(ranks, mode):
    ref = _single(mode)
    for r in ranks:
        got = r[f"fsdp-fused-{mode}"]
        _check_stats(got, ref, f"fsdp fused {mode}")
        # FSDP2 averages gradients over the ranks; the union's sum is twice that.
        for name, g in got["grads"].items():
            assert_close(g * WORLD, ref["grads"][name].double(), torch.float32, name)


def test_fsdp2_memory_per_rank_follows_the_formulas(ranks):
    rows = M + 1  # domains + the target row
    for r in ranks:
        assert r["fsdp-exact"]["memory"] == rows * V * HID * 4
        assert r["fsdp-sketch"]["memory"] == rows * K * 4
        # The projection, the exact rows (min(64, V): every row of this small head) and the
        # rows' fp32 energy.
        assert r["fsdp-projected"]["memory"] == rows * (PROJ + min(64, V)) * HID * 4 + V * 4


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("mode", MODES)
def test_vocab_parallel_head_equals_the_unsharded_model(ranks, mode, bias):
    ref = _single(mode, bias)
    key = f"tp-{mode}-{'bias' if bias else 'nobias'}"
    for r in ranks:
        _check_stats(r[key], ref, key)
        for name, g in r[key]["grads"].items():
            assert_close(g, ref["grads"][name].double(), torch.float32, f"{key} {name}")


def test_fsdp2_bypass_of_the_head_is_caught(ranks):
    for r in ranks:
        assert r["fsdp-bypass"].startswith("RuntimeError") and "head.forward" in r["fsdp-bypass"]


def test_row_wise_sharded_head_is_refused_by_name(ranks):
    for r in ranks:
        msg = r["tp-rowwise"]
        assert msg.startswith("NotImplementedError") and "head" in msg and "Shard(0)" in msg


def test_vocab_parallel_head_under_torch_compile(ranks):
    ref = _single("exact")
    for r in ranks:
        _check_stats(r["tp-compiled"], ref, "tp compiled")


def test_vocab_parallel_exact_keeps_only_the_local_rows(ranks):
    local = [r["tp-exact-bias"]["local_rows"] for r in ranks]
    assert local == [7, 6]  # torch.chunk-style uneven shards of V = 13
    mem = [r["tp-exact-bias"]["memory"] for r in ranks]
    assert mem == [(M + 1) * n * (HID + 1) * 4 for n in local]
    assert "row-sharded" in ranks[0]["tp-exact-bias"]["domain_grads"]
    # Projected and sketch states do not depend on the rows a rank holds.
    assert [r["tp-projected-bias"]["memory"] for r in ranks] == [(M + 1) * PROJ * (HID + 1) * 4] * 2


# --------------------------------------------------------------------------- examples

EXAMPLES = {
    "ddp": ["ddp.py"],
    "fsdp2": ["fsdp2.py"],
    "fsdp2-fused": ["fsdp2.py", "--fused-ce"],
    "fsdp2-tp": ["fsdp2_tp.py"],
    "fsdp2-tp-sketch": ["fsdp2_tp.py", "--mode", "sketch"],
    "fsdp2-tp-projected": ["fsdp2_tp.py", "--mode", "projected"],
}


def _run_example(args: list[str], out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
        "--master_port", str(free_port()), str(ROOT / "examples" / args[0]), *args[1:],
        "--tiny", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples")
    return {k: _run_example(a, out / f"{k}.json") for k, a in EXAMPLES.items()}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_runs_under_torchrun(examples, name):
    res = examples[name]
    assert res["world_size"] == WORLD and len(res["weights"]) == 4  # start + 3 rounds
    for w in res["weights"]:
        assert abs(sum(w) - 1) < 1e-9 and min(w) >= 0
    assert res["weights"][-1] != res["weights"][0]  # the mixture moved
    assert len(res["tracker_bytes_per_rank"]) == WORLD and min(res["tracker_bytes_per_rank"]) > 0


def test_examples_agree_across_parallelisms(examples):
    """Same global data and model: DDP and FSDP2 (with the head's loss unfused or fused) give
    the same mixtures up to float rounding of the training itself."""
    ref = torch.tensor(examples["ddp"]["weights"])
    for name in ("fsdp2", "fsdp2-fused"):
        torch.testing.assert_close(torch.tensor(examples[name]["weights"]), ref, rtol=0, atol=1e-5)


def test_example_memory_per_rank_follows_the_formulas(examples):
    rows, vocab, hidden, k = 3 + 1, 16, 8, 64  # --tiny sizes; m = 3 domains + target row
    assert examples["fsdp2"]["tracker_bytes_per_rank"] == [rows * vocab * hidden * 4] * WORLD
    shard = rows * (vocab // WORLD) * hidden * 4
    assert examples["fsdp2-tp"]["tracker_bytes_per_rank"] == [shard] * WORLD
    assert examples["fsdp2-tp-sketch"]["tracker_bytes_per_rank"] == [rows * k * 4] * WORLD
    proj = rows * 4 * hidden * 4  # --tiny proj_dim = 4, lm_head without bias
    assert examples["fsdp2-tp-projected"]["tracker_bytes_per_rank"] == [proj] * WORLD
