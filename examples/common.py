"""Shared pieces of the ``torchrun`` examples: a tiny GPT-style model, a synthetic corpus of
domains, the training loop around a :class:`rnb_kernels.Balancer`, and result reporting.

Each example (``ddp.py``, ``fsdp2.py``, ``fsdp2_tp.py``) only adds its parallelism; run one
with, e.g.::

    torchrun --nproc_per_node 2 examples/fsdp2.py --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rnb_kernels import Balancer, RnB


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="CI size: 16-token vocabulary, 6 steps")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--domains", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="sequences per data-parallel rank")
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--update-every", type=int, default=2)
    p.add_argument("--mode", choices=("exact", "sketch", "projected", "auto"), default="exact")
    p.add_argument("--sketch-dim", type=int, default=8192)
    p.add_argument("--proj-dim", type=int, default=128)
    p.add_argument("--fused-ce", action="store_true", help="chunked fused CE for the LM head")
    p.add_argument("--out", help="write a JSON summary here (rank 0)")
    args = p.parse_args()
    if args.tiny:
        args.steps, args.vocab, args.hidden, args.layers = 6, 16, 8, 1
        args.batch, args.seq, args.sketch_dim, args.proj_dim = 4, 6, 64, 4
    return args


def init_distributed() -> torch.device:
    """Process group from torchrun's environment: NCCL on GPUs, gloo on the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
        return torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("gloo")
    return torch.device("cpu")


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.proj(F.gelu(self.fc(self.ln(h))))


class TinyLM(nn.Module):
    """Embedding, MLP blocks, final norm and an ``lm_head``; ``forward`` returns the mean
    next-token loss. With ``fused_ce`` set to a tracker, the head's loss is the chunked fused
    cross-entropy, which collects the head's statistics itself (the head's forward never runs)."""

    def __init__(self, vocab: int, d: int, layers: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.fused_ce = None  # a DomainGradientTracker, when the fused loss is used

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.wte(tokens[:, :-1])
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        targets = tokens[:, 1:]
        if self.fused_ce is not None:
            return self.fused_ce.fused_cross_entropy(h, targets)
        logits = self.lm_head(h)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def corpus(args: argparse.Namespace, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` token sequences from ``m`` domains, the same on every rank (seeded). Domain ``d``
    follows its own noisy affine walk ``t' = (a_d t + c_d + u) mod V`` with ``u`` uniform in
    ``[0, 4)``: learnable bigram structure at any vocabulary size, no ``[V, V]`` table."""
    g = torch.Generator().manual_seed(0)
    m, v = args.domains, args.vocab
    labels = torch.arange(n) % m
    a = torch.randint(1, max(v, 2), (m,), generator=g)[labels]
    c = torch.randint(0, v, (m,), generator=g)[labels]
    seqs = torch.empty(n, args.seq + 1, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, v, (n,), generator=g)
    for t in range(args.seq):
        u = torch.randint(0, 4, (n,), generator=g)
        seqs[:, t + 1] = (a * seqs[:, t] + c + u) % v
    return seqs, labels


def make_balancer(model: nn.Module, args: argparse.Namespace, **tracker_kwargs) -> Balancer:
    """R&B on the LM head, evaluation mixture skewed toward domain 0."""
    p_eval = torch.linspace(2.0, 1.0, args.domains)
    mixer = RnB(args.domains, eval_proportions=p_eval, lam=2.0, update_every=args.update_every)
    tracker = {
        "modules": "lm_head",
        "mode": args.mode,
        "sketch_dim": args.sketch_dim,
        "proj_dim": args.proj_dim,
    }
    return Balancer(model, mixer, tracker={**tracker, **tracker_kwargs})


def train(model, balancer, args, device, dp_rank: int, dp_size: int) -> dict:
    """The loop a user writes: sampler from the balancer, ``step()`` around the backward,
    ``optimizer_step()`` closes rounds. Ranks of one tensor-parallel group (same ``dp_rank``)
    draw the same samples."""
    seqs, labels = corpus(args)
    sampler = balancer.make_sampler(
        labels, batch_size=args.batch, seed=0, num_replicas=dp_size, rank=dp_rank
    )
    it = iter(sampler)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    weights = [balancer.mixer.weights.tolist()]
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        idx = torch.tensor([next(it) for _ in range(args.batch)])
        tokens = seqs[idx].to(device)
        with balancer.step(labels[idx].to(device)):
            model(tokens).backward()
        if balancer.optimizer_step(opt) is not None:
            weights.append(balancer.mixer.weights.tolist())
    seconds = time.perf_counter() - t0
    # Per-rank numbers: the tracker's buffers (exact accounting) and the process's peak RSS.
    mine = {"tracker_bytes": balancer.tracker.memory_bytes(), "peak_rss_mb": _rss_mb()}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {
        "world_size": dist.get_world_size(),
        "mode": args.mode,
        "weights": weights,
        "tracker_bytes_per_rank": [r["tracker_bytes"] for r in everyone],
        "peak_rss_mb_per_rank": [round(r["peak_rss_mb"], 1) for r in everyone],
        "rss_mb_before_training": round(rss0, 1),
        "seconds": seconds,
    }


def shutdown() -> None:
    """Call after ``main()`` returned (its model, balancer and tracker are then unreferenced):
    collect them, synchronise, destroy the group. Tearing down with the model alive aborts
    torch 2.13's CPU/gloo runs now and then at exit ("terminate called without an active
    exception"; a bare DDP script shows it too)."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(result: dict, args: argparse.Namespace) -> None:
    if dist.get_rank() == 0:
        print(json.dumps(result, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f)
