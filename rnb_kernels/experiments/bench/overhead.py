"""``rnb bench overhead``: end-to-end training-step cost of per-domain gradient tracking.

All variants run in the same process on the same model, batch and domain ids, interleaved
round-robin (so thermal/frequency drift and other load hit every variant alike), and each is
reported as a ratio to the untracked step measured alongside it:

* ``untracked`` — forward, backward, optimizer step.
* ``exact/<backend>``, ``sketch/<backend>`` — the same step under
  :class:`~rnb_kernels.DomainGradientTracker` on the LM head, with the round's
  ``gram()`` + ``reset()`` amortised every ``update_every`` steps (what a mixer needs).
* ``anchor/extra-backward`` — the step, then one extra backward per domain present in the
  batch for that domain's gradient of the tracked weight (DoGE / the DGA paper's way).
  The weight is tied to the token embedding, so each extra backward runs through the whole
  network, as it does for any tied LM.
* ``anchor/torch.func`` — the step, then per-sample gradients of the tracked weight with
  ``vmap(grad(...))`` summed per domain (the generic per-sample-gradient recipe).

Rows are appended to ``benchmarks/results/overhead_{cpu,gpu}.csv`` with the machine,
versions and git SHA.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..harness import append_csv, machine_info, results_dir
from ..models import GPT, GPTConfig, per_sample_loss

logger = logging.getLogger(__name__)

__all__ = ["OverheadConfig", "PRESETS", "add_arguments", "run", "run_overhead"]


@dataclass
class OverheadConfig:
    """Model and batch shape of the benchmark (``T`` tokens per sample, ``m`` domains)."""

    vocab_size: int = 8192
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    context: int = 64
    batch_size: int = 16
    num_domains: int = 16
    update_every: int = 10
    sketch_dim: int = 8192
    steps: int = 10  # timed steps per variant per round
    rounds: int = 3
    warmup: int = 2
    device: str = "cpu"
    dtype: str = "float32"  # autocast dtype on GPU: "bfloat16"


PRESETS: dict[str, OverheadConfig] = {
    # A few seconds: what the test suite runs.
    "tiny": OverheadConfig(
        vocab_size=512, n_embd=32, n_layer=1, n_head=2, context=16, batch_size=4,
        num_domains=4, sketch_dim=1024, steps=2, rounds=2, warmup=1, update_every=2,
    ),
    # A few minutes on a 2-core CPU: the row recorded for every change.
    "cpu": OverheadConfig(),
    # DESIGN.md section 5: GPT-2-small-sized, seq 1024, micro-batch 8, m = 64, bf16.
    "gpu": OverheadConfig(
        vocab_size=50257, n_embd=768, n_layer=12, n_head=12, context=1024, batch_size=8,
        num_domains=64, sketch_dim=1 << 20, steps=10, rounds=5, warmup=3, update_every=10,
        device="cuda", dtype="bfloat16",
    ),
}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _usable_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Backends that can run *fast* here; the rest with the reason they are skipped."""
    from ..._backends import backends

    usable, skipped = [], {}
    for name, st in backends().items():
        if name == "torch":
            usable.append(name)
        elif device.type != "cuda":
            # The Triton interpreter runs on CPU but is a correctness tool, orders of magnitude
            # slower than any real kernel: timing it would say nothing about overhead.
            skipped[name] = "CPU tensors: only the torch backend runs natively"
        elif st.available:
            usable.append(name)
        else:
            skipped[name] = st.reason
    return usable, skipped


class _Bench:
    """One model + batch shared by every variant, so only the tracking differs."""

    def __init__(self, cfg: OverheadConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        mcfg = GPTConfig(
            vocab_size=cfg.vocab_size, context=cfg.context, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_embd=cfg.n_embd,
        )  # fmt: skip
        self.model = GPT(mcfg).to(self.device)
        # SGD keeps optimizer time small and constant so the ratio isolates the backward cost.
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        B, T, V = cfg.batch_size, cfg.context, cfg.vocab_size
        self.x = torch.randint(0, V, (B, T), generator=g).to(self.device)
        self.y = torch.randint(0, V, (B, T), generator=g).to(self.device)
        self.ids = torch.randint(0, cfg.num_domains, (B,), generator=g).to(self.device)
        self.amp = (
            torch.autocast("cuda", dtype=getattr(torch, cfg.dtype))
            if self.device.type == "cuda" and cfg.dtype != "float32"
            else torch.autocast("cpu", enabled=False)
        )

    def _loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        with self.amp:
            ps = per_sample_loss(self.model(self.x), self.y)
        return ps.mean(), ps

    def _finish(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def untracked(self) -> Callable[[int], None]:
        def step(i: int) -> None:
            loss, _ = self._loss()
            loss.backward()
            self._finish()

        return step

    def tracked(self, mode: str, backend: str) -> tuple[Callable[[int], None], Callable[[], None]]:
        from ...tracking import DomainGradientTracker

        tr = DomainGradientTracker(
            self.model, self.cfg.num_domains, mode=mode, backend=backend,
            sketch_dim=self.cfg.sketch_dim,
        )  # fmt: skip
        K = self.cfg.update_every

        def step(i: int) -> None:
            loss, _ = self._loss()
            with tr.domains(self.ids):
                loss.backward()
            self._finish()
            if (i + 1) % K == 0:
                tr.gram()
                tr.reset()

        return step, tr.remove

    def extra_backward(self) -> Callable[[int], None]:
        w = self.model.lm_head.weight

        def step(i: int) -> None:
            loss, ps = self._loss()
            present = torch.unique(self.ids).tolist()
            for d in present:
                # Sum of the domain's per-sample losses: its gradient is g_d of DESIGN.md.
                torch.autograd.grad(ps[self.ids == d].sum(), [w], retain_graph=True)
            loss.backward()
            self._finish()

        return step

    def torch_func(self) -> Callable[[int], None]:
        from torch.func import functional_call, grad, vmap

        model = self.model
        name = "lm_head.weight"
        m = self.cfg.num_domains

        def sample_loss(w, x, y):
            params = {name: w, "tok_emb.weight": w}
            with self.amp:
                logits = functional_call(model, params, (x[None],), tie_weights=False)
                return per_sample_loss(logits, y[None])[0]

        per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))

        def step(i: int) -> None:
            loss, _ = self._loss()
            loss.backward()
            with warnings.catch_warnings():
                # vmap has no batching rule for fused SDPA and loops over samples instead; that
                # is the cost a torch.func user pays, so it is timed, only the warning is muted.
                warnings.filterwarnings("ignore", message=".*performance drop.*")
                g = per_sample_grad(model.lm_head.weight.detach(), self.x, self.y)  # [B, V, d]
            acc = torch.zeros((m, *g.shape[1:]), dtype=torch.float32, device=g.device)
            acc.index_add_(0, self.ids, g.float())
            self._finish()

        return step


def run_overhead(
    cfg: OverheadConfig,
    *,
    modes: tuple[str, ...] = ("exact", "sketch"),
    anchors: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Time every variant in one process; return one row per variant.

    Returns:
        rows with ``variant``, ``ms_per_step`` (median over rounds), ``ratio`` (to the
        untracked median), ``overhead_pct``, plus the config and the machine fields.
    """
    bench = _Bench(cfg, seed)
    dev = bench.device
    usable, skipped = _usable_backends(dev)
    for name, why in skipped.items():
        logger.info("backend %s skipped: %s", name, why)

    # Each variant is (name, factory); factories build their tracker anew every round because a
    # module can be tracked by one tracker at a time.
    variants: list[tuple[str, Callable[[], tuple[Callable[[int], None], Callable[[], None]]]]]
    variants = [("untracked", lambda: (bench.untracked(), lambda: None))]
    for mode in modes:
        for be in usable:
            variants.append((f"{mode}/{be}", lambda mode=mode, be=be: bench.tracked(mode, be)))
    if anchors:
        variants.append(("anchor/extra-backward", lambda: (bench.extra_backward(), lambda: None)))
        variants.append(("anchor/torch.func", lambda: (bench.torch_func(), lambda: None)))

    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    total = cfg.rounds * len(variants)
    bar = tqdm(total=total, desc="bench overhead", disable=not progress, leave=False)
    for _ in range(cfg.rounds):
        for name, factory in variants:
            step, cleanup = factory()
            try:
                for i in range(cfg.warmup):
                    step(i)
                _sync(dev)
                per = []
                for i in range(cfg.steps):
                    t = time.perf_counter()
                    step(cfg.warmup + i)
                    _sync(dev)
                    per.append(time.perf_counter() - t)
                # Per-step median inside a round removes one-off stalls; the median over rounds
                # then removes rounds hit by outside load.
                times[name].append(statistics.median(per))
            finally:
                cleanup()
            bar.update(1)
    bar.close()

    base = statistics.median(times["untracked"])
    info = machine_info(dev)
    rows = []
    for name, _ in variants:
        ms = statistics.median(times[name]) * 1e3
        rows.append(
            {
                "variant": name,
                "ms_per_step": round(ms, 4),
                "ratio": round(ms / (base * 1e3), 4),
                "overhead_pct": round(100 * (ms / (base * 1e3) - 1), 2),
                "ms_min": round(min(times[name]) * 1e3, 4),
                "ms_max": round(max(times[name]) * 1e3, 4),
                **{k: v for k, v in asdict(cfg).items()},
                "skipped_backends": "; ".join(f"{k}: {v}" for k, v in skipped.items()),
                **info,
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The printed table: variant, ms/step, ratio to untracked."""
    lines = [f"{'variant':24s} {'ms/step':>10s} {'ratio':>8s} {'overhead':>9s}"]
    for r in rows:
        lines.append(
            f"{r['variant']:24s} {r['ms_per_step']:10.2f} {r['ratio']:8.3f} "
            f"{r['overhead_pct']:8.2f}%"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="model/batch size")
    p.add_argument("--device", default=None, help="override the preset's device")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=None, help="round-robin repetitions")
    p.add_argument("--num-domains", type=int, default=None, help="m")
    p.add_argument("--modes", default="exact,sketch", help="tracker modes, comma-separated")
    p.add_argument("--no-anchors", action="store_true", help="skip the two anchor variants")
    p.add_argument(
        "--csv",
        default=None,
        help="append rows here (default benchmarks/results/overhead_<dev>.csv)",
    )
    p.add_argument("--no-save", action="store_true", help="print only; append no CSV rows")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    cfg = PRESETS[args.preset]
    over = {
        "device": args.device,
        "steps": args.steps,
        "rounds": args.rounds,
        "num_domains": args.num_domains,
    }
    cfg = OverheadConfig(**{**asdict(cfg), **{k: v for k, v in over.items() if v is not None}})
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        print(f"preset {args.preset!r} needs a CUDA device and none is available here")
        return 2
    modes = tuple(m for m in args.modes.split(",") if m)
    rows = run_overhead(cfg, modes=modes, anchors=not args.no_anchors, seed=args.seed)
    for r in rows:
        r["preset"] = args.preset
    print(f"machine: {rows[0]['machine']}  torch {rows[0]['torch']}  git {rows[0]['git_sha']}")
    print(
        f"model: V={cfg.vocab_size} d={cfg.n_embd} L={cfg.n_layer} T={cfg.context} "
        f"B={cfg.batch_size} m={cfg.num_domains} (LM head tracked, tied)"
    )
    print(format_rows(rows))
    if not args.no_save:
        kind = "gpu" if torch.device(cfg.device).type == "cuda" else "cpu"
        path = Path(args.csv) if args.csv else results_dir() / f"overhead_{kind}.csv"
        append_csv(path, rows)
        print(f"appended {len(rows)} rows to {path}")
    return 0
