"""``rnb bench overhead``: end-to-end training-step cost of per-domain gradient tracking.

Every variant trains its own copy of the same model (same init, batch and domain ids), and
the variants are timed interleaved, one mixing round each per round of the benchmark, in a
fresh random order every time (:func:`~rnb_kernels.experiments.harness.time_interleaved`), so
load from other processes and clock drift hit every variant alike. A timed unit is one mixing
round: ``update_every`` optimizer steps, including the round's ``gram()`` + ``reset()`` for
tracked variants, so the per-round cost a mixer pays is amortised into the per-step time and
not dropped as an outlier. Each variant is reported as the median over rounds of its time over
the untracked time of the same round, with a bootstrap CI
(:func:`~rnb_kernels.experiments.harness.ratio_ci`):

* ``untracked`` — forward, backward, optimizer step.
* ``untracked-copy`` — a second untracked copy, timed like every other variant: an A/A test.
  Its ratio is what the benchmark reads when there is no difference, so its distance from 1
  and its interval show how small an overhead this machine can resolve.
* ``exact/<backend>``, ``sketch/<backend>`` — the same step under
  :class:`~rnb_kernels.DomainGradientTracker` on the LM head.
* ``anchor/extra-backward`` — the step, then one extra backward per domain present in the
  batch for that domain's gradient of the tracked weight (DoGE / the DGA paper's way).
  The weight is tied to the token embedding, so each extra backward runs through the whole
  network, as it does for any tied LM.
* ``anchor/torch.func`` — the step, then per-sample gradients of the tracked weight with
  ``vmap(grad(...))`` summed per domain (the generic per-sample-gradient recipe).

The model is ``transformers``' GPT-Neo (:func:`~rnb_kernels.experiments.models.build_model`),
built from a config at the preset's size, its LM head tied to the token embedding.

Rows are appended to ``overhead_{cpu,gpu}.csv`` in the results directory (``--out``, see
:func:`~rnb_kernels.experiments.harness.results_dir`) with the environment columns.
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..._backends import BackendUnavailableError
from ..harness import append_csv, environment, ratio_ci, results_csv, summarize, time_interleaved
from ..models import ModelConfig, build_model, lm_logits, per_sample_loss

logger = logging.getLogger(__name__)

__all__ = ["PRESETS", "OverheadConfig", "add_arguments", "format_rows", "run", "run_overhead"]


def _tracker_modes() -> tuple[str, ...]:
    """The tracker's modes, its default ("auto", the size rule) first when it has one."""
    import inspect

    from ...tracking import DomainGradientTracker
    from ...tracking.slot import MODE_OPS

    default = inspect.signature(DomainGradientTracker).parameters["mode"].default
    return (*(["auto"] if default == "auto" else []), *MODE_OPS)


# Extra variants of a mode, named on the command line like a mode: projected mode without its
# exact rows, so their cost shows on its own; exact and sketch modes with the weight gradient
# summed from the per-domain products (bitwise_grad=False: one GEMM less, param.grad equal to
# untracked up to fp32 rounding).
MODE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "projected-plain": ("projected", {"exact_rows": 0}),
    "exact-summed": ("exact", {"bitwise_grad": False}),
    "sketch-summed": ("sketch", {"bitwise_grad": False}),
}
DEFAULT_MODES = (*_tracker_modes(), *MODE_VARIANTS)
# What the ratio column holds, written in every row. Rows without the column: before git
# 93bdbd2 the ratio of the medians; at 93bdbd2 (overhead_cpu.md runs 9-10) already this.
RATIO_STAT = "median of per-round ratios"


@dataclass(frozen=True)
class OverheadConfig:
    """Model and batch shape of the benchmark (``T`` tokens per sample, ``m`` domains).

    Attributes:
        update_every: optimizer steps per mixing round (one timed unit).
        rounds: timed rounds per variant (samples for the median and its CI).
        warmup: untimed rounds per variant first.
        dtype: autocast dtype on GPU (``"bfloat16"``); ``"float32"`` = no autocast.
    """

    vocab_size: int = 8192
    n_embd: int = 256
    n_layer: int = 2
    n_head: int = 4
    context: int = 128
    batch_size: int = 8
    num_domains: int = 16
    update_every: int = 10
    sketch_dim: int = 8192
    rounds: int = 15
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "float32"


PRESETS: dict[str, OverheadConfig] = {
    # A few seconds: what the test suite runs.
    "tiny": OverheadConfig(
        vocab_size=512, n_embd=32, n_layer=1, n_head=2, context=16, batch_size=4,
        num_domains=4, sketch_dim=1024, rounds=3, warmup=1, update_every=2,
    ),
    # The CPU target shape (vocab 8192, width 256, 2 layers, 8 x 128 tokens, m = 16, a round
    # every 10 steps); ~10 minutes on a 2-core CPU: the row recorded for every change.
    "cpu": OverheadConfig(),
    # GPT-2-small-sized, sequence 1024, micro-batch 8, m = 64 domains, bf16 autocast: the
    # setting the step-time overhead target is stated for.
    "gpu": OverheadConfig(
        vocab_size=50257, n_embd=768, n_layer=12, n_head=12, context=1024, batch_size=8,
        num_domains=64, sketch_dim=1 << 20, rounds=10, warmup=2, update_every=10,
        device="cuda", dtype="bfloat16",
    ),
}  # fmt: skip


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


class _Variant:
    """One variant: its own copy of the model and optimizer, so all variants can live side by
    side (a module can be tracked by one tracker at a time) and be interleaved step by step."""

    def __init__(
        self,
        base: nn.Module,
        cfg: OverheadConfig,
        x: torch.Tensor,
        y: torch.Tensor,
        ids: torch.Tensor,
        amp: Any,
    ) -> None:
        self.cfg = cfg
        self.model = copy.deepcopy(base)  # keeps the tied embedding / LM head tied
        # SGD keeps optimizer time small and constant so the ratio isolates the backward cost.
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        self.x, self.y, self.ids, self.amp = x, y, ids, amp
        self.tracker: Any = None
        self.extra: Callable[[torch.Tensor], None] | None = None

    def _loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        with self.amp:
            ps = per_sample_loss(lm_logits(self.model, self.x), self.y)
        return ps.mean(), ps

    def step(self) -> None:
        loss, ps = self._loss()
        if self.extra is not None:
            self.extra(ps)
        if self.tracker is not None:
            with self.tracker.domains(self.ids):
                loss.backward()
        else:
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def round(self) -> None:
        """One mixing round: ``update_every`` steps, then what an R&B update reads (counts and
        ``G c`` in one pass over the statistics, as the Balancer does) and the reset."""
        for _ in range(self.cfg.update_every):
            self.step()
        if self.tracker is not None:
            counts = self.tracker.counts()
            c = torch.where(counts > 0, 1.0 / counts.clamp(min=1), 0.0)
            self.tracker.gram_vector(c.cpu())
            self.tracker.reset()

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.remove()


def _tracked(v: _Variant, mode: str, backend: str) -> _Variant:
    from ...tracking import DomainGradientTracker

    mode, options = MODE_VARIANTS.get(mode, (mode, {}))
    v.tracker = DomainGradientTracker(
        v.model, v.cfg.num_domains, mode=mode, backend=backend, sketch_dim=v.cfg.sketch_dim,
        **options,
    )  # fmt: skip
    return v


def _extra_backward(v: _Variant) -> _Variant:
    w = v.model.lm_head.weight

    def extra(ps: torch.Tensor) -> None:
        for d in torch.unique(v.ids).tolist():
            # The domain's summed loss: its gradient is that domain's gradient sum g_d.
            torch.autograd.grad(ps[v.ids == d].sum(), [w], retain_graph=True)

    v.extra = extra
    return v


def _torch_func(v: _Variant) -> _Variant:
    from torch.func import functional_call, grad, vmap

    model, m = v.model, v.cfg.num_domains

    def sample_loss(w, x, y):
        params = {"lm_head.weight": w, "transformer.wte.weight": w}
        with v.amp:
            out = functional_call(model, params, (), {"input_ids": x[None]}, tie_weights=False)
            return per_sample_loss(out.logits, y[None])[0]

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def extra(ps: torch.Tensor) -> None:
        with warnings.catch_warnings():
            # vmap has no batching rule for fused SDPA and loops over samples instead; that
            # is the cost a torch.func user pays, so it is timed, only the warning is muted.
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            g = per_sample_grad(model.lm_head.weight.detach(), v.x, v.y)  # [B, V, d]
        acc = torch.zeros((m, *g.shape[1:]), dtype=torch.float32, device=g.device)
        acc.index_add_(0, v.ids, g.float())

    v.extra = extra
    return v


def run_overhead(
    cfg: OverheadConfig,
    *,
    modes: tuple[str, ...] = DEFAULT_MODES,
    anchors: bool = True,
    control: bool = True,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time every variant interleaved in one process; return one row per variant.

    ``control`` adds ``untracked-copy``, a second untracked copy (the A/A test).

    Returns:
        rows with ``variant``; ``ms_per_step`` (median over rounds) with ``ms_q25`` /
        ``ms_q75`` and its bootstrap CI ``ms_ci_low`` / ``ms_ci_high``; ``ratio``, the median
        over rounds of the variant's time over untracked's in the same round, with
        ``ratio_ci_low`` / ``ratio_ci_high``; ``overhead_pct``; the config and the environment
        columns.
    """
    dev = torch.device(cfg.device)
    usable, skipped = _usable_backends(dev)
    for name, why in skipped.items():
        logger.info("backend %s skipped: %s", name, why)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = build_model(
        ModelConfig(vocab_size=cfg.vocab_size, context=cfg.context, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, n_embd=cfg.n_embd)
    ).to(dev)  # fmt: skip
    B, T, V = cfg.batch_size, cfg.context, cfg.vocab_size
    x = torch.randint(0, V, (B, T), generator=g).to(dev)
    y = torch.randint(0, V, (B, T), generator=g).to(dev)
    ids = torch.randint(0, cfg.num_domains, (B,), generator=g).to(dev)
    amp = (
        torch.autocast("cuda", dtype=getattr(torch, cfg.dtype))
        if dev.type == "cuda" and cfg.dtype != "float32"
        else torch.autocast("cpu", enabled=False)
    )

    def new() -> _Variant:
        return _Variant(base, cfg, x, y, ids, amp)

    variants: dict[str, _Variant] = {"untracked": new()}
    if control:
        variants["untracked-copy"] = new()
    try:
        for mode in modes:
            for be in usable:
                try:
                    variants[f"{mode}/{be}"] = _tracked(new(), mode, be)
                except BackendUnavailableError as e:  # e.g. projected mode has no CUDA kernel
                    logger.info("variant %s/%s skipped: %s", mode, be, e)
        if anchors:
            variants["anchor/extra-backward"] = _extra_backward(new())
            variants["anchor/torch.func"] = _torch_func(new())
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
        times = time_interleaved(
            {name: v.round for name, v in variants.items()},
            cfg.rounds,
            cfg.warmup,
            sync,
            seed=seed,
            progress="overhead rounds",
        )
    finally:
        for v in variants.values():
            v.close()

    env = environment(dev)
    K = cfg.update_every
    rows = []
    for name, samples in times.items():
        per_step = [s / K * 1e3 for s in samples]
        s = summarize(per_step)
        ratio, lo, hi = ratio_ci(samples, times["untracked"])
        rows.append(
            {
                "variant": name,
                "ms_per_step": round(s.median, 4),
                "ms_q25": round(s.q25, 4), "ms_q75": round(s.q75, 4),
                "ms_ci_low": round(s.ci_low, 4), "ms_ci_high": round(s.ci_high, 4),
                "ratio": round(ratio, 4), "ratio_stat": RATIO_STAT,
                "ratio_ci_low": round(lo, 4), "ratio_ci_high": round(hi, 4),
                "overhead_pct": round(100 * (ratio - 1), 2),
                **asdict(cfg),
                "skipped_backends": "; ".join(f"{k}: {v}" for k, v in skipped.items()),
                **env,
            }
        )  # fmt: skip
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The printed table: variant, ms/step (median) with its IQR, ratio to untracked (median
    of the per-round ratios) with its 95% CI."""
    lines = [f"{'variant':24s} {'ms/step':>10s} {'IQR':>19s} {'ratio':>7s} {'95% CI':>15s}"]
    for r in rows:
        lines.append(
            f"{r['variant']:24s} {r['ms_per_step']:10.2f} "
            f"{r['ms_q25']:9.2f}-{r['ms_q75']:<9.2f} {r['ratio']:7.3f} "
            f"{r['ratio_ci_low']:7.3f}-{r['ratio_ci_high']:<7.3f}"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="model/batch size")
    p.add_argument("--device", default=None, help="override the preset's device")
    p.add_argument("--rounds", type=int, default=None, help="timed mixing rounds per variant")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds per variant")
    p.add_argument("--update-every", type=int, default=None, help="steps per mixing round")
    p.add_argument("--num-domains", type=int, default=None, help="m")
    p.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help="tracker modes, comma-separated (auto = the tracker's default for this layer; "
        "projected-plain = projected without exact rows; exact-summed / sketch-summed = "
        "bitwise_grad=False)",
    )
    p.add_argument("--no-anchors", action="store_true", help="skip the two anchor variants")
    p.add_argument(
        "--no-control",
        action="store_true",
        help="skip untracked-copy, the second untracked copy (the A/A test of the benchmark)",
    )
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--csv", default=None, help="append rows to this file instead")
    p.add_argument("--no-save", action="store_true", help="print only; append no CSV rows")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    over = {
        "device": args.device,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "update_every": args.update_every,
        "num_domains": args.num_domains,
    }
    cfg = replace(PRESETS[args.preset], **{k: v for k, v in over.items() if v is not None})
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        print(f"preset {args.preset!r} needs a CUDA device and none is available here")
        return 2
    modes = tuple(m for m in args.modes.split(",") if m)
    rows = run_overhead(
        cfg, modes=modes, anchors=not args.no_anchors, control=not args.no_control, seed=args.seed
    )
    for r in rows:
        r["preset"] = args.preset
    e = rows[0]
    dirty = "+dirty" if e["git_dirty"] is True else ""
    print(
        f"{e['hardware']} ({e['threads']} threads)  torch {e['torch']}  git {e['git_sha']}{dirty}"
    )
    print(
        f"model: V={cfg.vocab_size} d={cfg.n_embd} L={cfg.n_layer} T={cfg.context} "
        f"B={cfg.batch_size} m={cfg.num_domains} (LM head tracked, tied); "
        f"{cfg.rounds} rounds of {cfg.update_every} steps per variant, interleaved; ratio = "
        "median over rounds of the variant's time / untracked's in the same round"
    )
    print(format_rows(rows))
    aa = next((r for r in rows if r["variant"] == "untracked-copy"), None)
    if aa is not None:
        spread = max(abs(aa["ratio_ci_low"] - 1), abs(aa["ratio_ci_high"] - 1))
        print(
            f"A/A: a second untracked copy reads {aa['ratio']:.3f} "
            f"[{aa['ratio_ci_low']:.3f}, {aa['ratio_ci_high']:.3f}]; differences under "
            f"~{100 * spread:.1f}% are within this run's noise"
        )
    if not args.no_save:
        path = Path(args.csv) if args.csv else results_csv("overhead", cfg.device, args.out)
        append_csv(path, rows)
        print(f"appended {len(rows)} rows to {path}")
    return 0
