"""Reference training loop: a GPT-Neo (``transformers``) trained under a data-mixing method
via the Balancer.

The pieces a user would copy:

* :func:`evaluate` — eval loss overall and per domain (token-weighted), from the logits.
* :func:`train` — the loop: :class:`~rnb_kernels.Balancer` draws each batch from the
  current mixture, tracks per-domain gradients of the LM head during the ordinary backward
  when the mixer needs them, and updates the mixture every ``update_every`` optimizer steps.
  tqdm progress, periodic eval, logs (``<name>.train.jsonl``, ``.eval.jsonl``,
  ``.weights.jsonl``, and the Balancer's ``<name>/mixture.{csv,jsonl}`` + TensorBoard) in
  ``out_dir``.
* :func:`run_methods` — every method of an :class:`~.config.ExperimentConfig` on one
  prepared corpus, the same model init, seed and token budget for each, evaluated on the
  validation split (``evaluate_on="val"``, hyper-parameter selection) or on the test split
  (``"test"``, reported numbers) — never both in one call, so a sweep cannot read the test
  split.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..balancer import Balancer
from .config import ExperimentConfig, TrainConfig
from .data import EncodedData, PreparedData
from .methods import (
    Method,
    build_method_mixer,
    get_method,
    needs_tracker,
    resolve_methods,
    uses_alignment,
)
from .models import IGNORE_INDEX, ModelConfig, build_model, lm_logits, per_sample_loss

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "evaluate", "run_methods", "train"]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: EncodedData,
    num_domains: int,
    batch_size: int = 256,
    groups: np.ndarray | None = None,
) -> tuple[float, np.ndarray]:
    """Token-weighted eval loss, overall and per domain.

    Args:
        data: eval rows.
        num_domains: number of groups ``g``.
        groups: ``int64[n]`` group per row (default ``data.domains``).

    Returns:
        ``(loss, per_domain)``: mean nats/token over all rows, and ``float64[g]`` per group
        (NaN for a group with no eval rows).
    """
    groups = data.domains if groups is None else np.asarray(groups, dtype=np.int64)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    tok_sum = np.zeros(num_domains, dtype=np.float64)
    tok_cnt = np.zeros(num_domains, dtype=np.float64)
    for s in range(0, len(data), batch_size):
        x = data.inputs[s : s + batch_size].to(dev)
        y = data.labels[s : s + batch_size].to(dev)
        n_tok = (y != IGNORE_INDEX).sum(1)
        loss = per_sample_loss(lm_logits(model, x), y) * n_tok
        g = groups[s : s + batch_size]
        np.add.at(tok_sum, g, loss.double().cpu().numpy())
        np.add.at(tok_cnt, g, n_tok.double().cpu().numpy())
    model.train(was_training)
    with np.errstate(invalid="ignore", divide="ignore"):
        per = tok_sum / tok_cnt
    return float(tok_sum.sum() / max(tok_cnt.sum(), 1.0)), per


@dataclass
class TrainResult:
    """What one run produced.

    Attributes:
        method: the run's name (e.g. ``"rnb-regrouped"``).
        num_domains: ``m``, domains the mixer saw.
        curve: the evaluation set of the curve (``"val"`` or ``"test"``).
        eval_steps, eval_losses: the eval curve on ``curve``.
        final: ``{split: final eval loss}`` (nats/token) for every evaluated split.
        per_domain: ``{split: float64[g]}`` final eval loss per reporting group (the
            original domains; NaN where the split has no rows).
        weight_steps, weights: mixture weights after each update (``float64[u, m]``; row 0 is
            the initial mixture at step 0).
        train_s: wall time of the optimisation loop (eval excluded): the full cost of the
            method, mixing included.
        train_cpu_s: CPU time of this process over the same loop (eval excluded): on a machine
            other processes keep busy, the steadier measure of the same cost.
        mix_s: part of ``train_s`` spent on the mixture: reading statistics, the mixer update,
            target-gradient recording (DGA) and the extra passes (DGA paper style).
        domain_counts: ``float64[m]`` samples drawn per domain over the run.
        skipped_updates: mixer updates skipped for numerical reasons.
        wall_s: wall time of the whole call (model build and evaluation included).
    """

    method: str
    num_domains: int = 0
    curve: str = ""
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    per_domain: dict[str, np.ndarray] = field(default_factory=dict)
    weight_steps: list[int] = field(default_factory=list)
    weights: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    train_s: float = 0.0
    train_cpu_s: float = 0.0
    mix_s: float = 0.0
    domain_counts: np.ndarray = field(default_factory=lambda: np.zeros(0))
    skipped_updates: int = 0
    wall_s: float = 0.0

    @property
    def final_eval(self) -> float:
        """Final loss on the curve's split."""
        return self.final.get(self.curve, float("nan"))

    @property
    def per_domain_eval(self) -> np.ndarray:
        """Per-domain final loss on the curve's split."""
        return self.per_domain.get(self.curve, np.zeros(0))

    @property
    def update_pct(self) -> float:
        """The update part only (``mix_s``), as a percentage of the rest of the loop. Not the
        cost of mixing: the tracker's work inside backward is outside ``mix_s``; the full cost
        is this run's ``train_s`` over the stratified run's (``compare.aggregate``'s ``cost``)."""
        base = self.train_s - self.mix_s
        return 100.0 * self.mix_s / base if base > 0 else float("nan")

    def summary(self, split: str | None = None) -> dict[str, Any]:
        """One results row for ``split`` (default the curve's): losses, timings, update
        counts and ``domains``."""
        split = split or self.curve
        per = self.per_domain.get(split, np.zeros(0))
        per = per[np.isfinite(per)]
        return {
            "method": self.method,
            "split": split,
            "eval_loss": self.final.get(split, float("nan")),
            "domain_mean": float(per.mean()) if per.size else float("nan"),
            "domain_worst": float(per.max()) if per.size else float("nan"),
            "train_s": self.train_s,
            "train_cpu_s": self.train_cpu_s,
            "mix_s": self.mix_s,
            "update_pct": self.update_pct,
            "updates": max(0, len(self.weight_steps) - 1),
            "skipped_updates": self.skipped_updates,
            "final_weight_max": float(self.weights[-1].max()) if self.weights.size else 1.0,
            "domains": self.num_domains,
        }


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases, LayerNorm gains and position embeddings (GPT-2/nanoGPT practice).
    seen: set[int] = set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "wpe" not in name else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _jsonl(path: Path | None, record: dict[str, Any]) -> None:
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def train(
    model_cfg: ModelConfig,
    train_data: EncodedData,
    evals: Mapping[str, EncodedData],
    method: str | Method,
    cfg: TrainConfig,
    *,
    target: EncodedData,
    seed: int = 0,
    hparams: Mapping[str, Mapping[str, Any]] | None = None,
    num_domains: int | None = None,
    num_groups: int | None = None,
    curve: str | None = None,
    domain_names: list[str] | None = None,
    name: str | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a fresh GPT-Neo (:func:`~rnb_kernels.experiments.models.build_model`) under one
    mixing method.

    Args:
        model_cfg: model size (a fresh model seeded with ``seed`` is built, so every
            method starts from the same weights).
        train_data: training rows; ``train_data.domains`` are the mixer's domains ``[0, m)``
            (already in the method's domain space: see :meth:`~.data.PreparedData.split`).
        evals: ``{split: rows}`` to evaluate, labelled with the reporting groups (the
            original domains), e.g. ``{"test": ...}``.
        method: a method name or :class:`~.methods.Method` (its mixer, gradient source and
            weights source are used here).
        cfg: optimisation / mixing settings.
        target: the target sample, labelled in the method's domain space: its histogram is
            R&B's ``p_eval`` and the oracle's weights; DGA aligns with its gradient.
        seed: model init, sampling, tracker sketch and target batches.
        hparams: ``{mixer name: {hyper-parameter: value}}`` (see
            :attr:`~.config.ExperimentConfig.hparams`).
        num_domains: ``m`` (default ``max(train_data.domains) + 1``).
        num_groups: reporting groups ``g`` (default: one past the largest eval label).
        curve: the split evaluated every ``cfg.eval_every`` steps (default the first of
            ``evals``); the others are evaluated at the end only.
        domain_names: the mixer's domain names, for the per-round log line.
        name: label of the run in results and logs (default the method's name).
        out_dir: where ``<name>.train.jsonl`` / ``.eval.jsonl`` / ``.weights.jsonl`` and the
            Balancer's logs (``<name>/``) go.
        progress: show a tqdm bar.

    Returns:
        :class:`TrainResult`.
    """
    t_call = time.perf_counter()
    method = get_method(method)
    if len(train_data) == 0 or not evals or any(len(e) == 0 for e in evals.values()):
        raise ValueError("train_data and every eval set must be non-empty")
    if len(target) == 0:
        raise ValueError("target must be non-empty")
    name = name or method.name
    curve = curve or next(iter(evals))
    if curve not in evals:
        raise ValueError(f"curve {curve!r} is not one of the eval sets {list(evals)}")
    m = int(num_domains if num_domains is not None else train_data.domains.max() + 1)
    p_eval = np.bincount(target.domains, minlength=m).astype(np.float64)
    g = int(
        num_groups
        if num_groups is not None
        else max(int(e.domains.max()) for e in evals.values()) + 1
    )
    logs = None
    if out_dir is not None:
        logs = Path(out_dir)
        logs.mkdir(parents=True, exist_ok=True)
        for suffix in ("train", "eval", "weights"):
            (logs / f"{name}.{suffix}.jsonl").unlink(missing_ok=True)

    torch.manual_seed(seed)
    dev = torch.device(cfg.device)
    model = build_model(model_cfg).to(dev)
    model.train()
    opt = _optimizer(model, cfg)
    mixer = build_method_mixer(
        method,
        num_domains=m,
        train_domains=train_data.domains,
        eval_proportions=p_eval,
        target_domains=target.domains,
        update_every=cfg.update_every,
        hparams=hparams,
    )
    # Separate stream so that target / extra-pass batches do not shift the training samples.
    aux_rng = np.random.default_rng(seed + 1)
    target_fn, alignment_fn = _gradient_sources(method, model, cfg, train_data, target, aux_rng, m)
    balancer = Balancer(
        model,
        mixer,
        tracker=(
            {"mode": cfg.tracker_mode, "backend": cfg.backend, "seed": seed}
            if needs_tracker(method)
            else None
        ),
        log_dir=None if logs is None else logs / name,
        target_fn=target_fn,
        alignment_fn=alignment_fn,
        domain_names=domain_names,
        log_name=name,
    )
    sampler = balancer.make_sampler(train_data.domains, batch_size=cfg.batch_size, seed=seed)
    batches = _batches(sampler, cfg.batch_size)
    res = TrainResult(method=name, num_domains=m, curve=curve)
    res.domain_counts = np.zeros(m)
    weights_hist = [mixer.sampling_weights.numpy().copy()]
    res.weight_steps = [0]

    def do_eval(step: int, split: str) -> None:
        loss, per = evaluate(model, evals[split], g)
        res.final[split] = loss
        res.per_domain[split] = per
        if split == curve:
            res.eval_steps.append(step)
            res.eval_losses.append(loss)
        _jsonl(logs and logs / f"{name}.eval.jsonl", {"step": step, split: loss})
        logger.debug("%s step %d: %s loss %.4f", name, step, split, loss)

    do_eval(0, curve)
    bar = tqdm_bar(cfg.steps, name, progress)
    t_start, c_start = time.perf_counter(), time.process_time()
    eval_s = eval_cpu_s = 0.0
    for step in range(cfg.steps):
        idx = next(batches)
        t_idx = torch.from_numpy(idx)
        x, y = train_data.inputs[t_idx].to(dev), train_data.labels[t_idx].to(dev)
        dom = train_data.domains[idx]
        np.add.at(res.domain_counts, dom, 1.0)
        # The five lines a user adds: step context, per-sample loss, after-step update.
        with balancer.step(torch.from_numpy(dom).to(dev)) as s:
            ps = per_sample_loss(lm_logits(model, x), y)
            s.record_loss(ps)
            loss = ps.mean()
            loss.backward()
        loss_v = loss.item()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = cfg.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        new_weights = balancer.optimizer_step(opt)
        if new_weights is not None:
            weights_hist.append(mixer.sampling_weights.numpy().copy())
            res.weight_steps.append(step + 1)
            _jsonl(
                logs and logs / f"{name}.weights.jsonl",
                {"step": step + 1, "weights": weights_hist[-1].round(6).tolist()},
            )
        _jsonl(
            logs and logs / f"{name}.train.jsonl",
            {"step": step + 1, "loss": loss_v, "lr": lr},
        )
        bar.set_postfix(loss=f"{loss_v:.3f}", refresh=False)
        bar.update(1)
        if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            t_eval, c_eval = time.perf_counter(), time.process_time()
            do_eval(step + 1, curve)
            eval_s += time.perf_counter() - t_eval
            eval_cpu_s += time.process_time() - c_eval
    res.train_s = time.perf_counter() - t_start - eval_s
    res.train_cpu_s = time.process_time() - c_start - eval_cpu_s
    bar.close()
    for split in evals:
        do_eval(cfg.steps, split)
    logger.info(
        "%s: %s", name,
        ", ".join(f"{k} loss {v:.4f}" for k, v in res.final.items()),
    )  # fmt: skip
    res.weights = np.stack(weights_hist)
    res.skipped_updates = mixer.skipped_updates
    res.mix_s = balancer.update_time_s
    balancer.close()
    res.wall_s = time.perf_counter() - t_call
    return res


def tqdm_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _batches(sampler: Any, batch_size: int):
    """Endless ``int64[B]`` index batches from a sampler (epochs continue its one stream)."""
    while True:
        buf: list[int] = []
        for i in sampler:
            buf.append(int(i))
            if len(buf) == batch_size:
                yield np.asarray(buf, dtype=np.int64)
                buf = []


def _gradient_sources(
    method: Method,
    model: torch.nn.Module,
    cfg: TrainConfig,
    train_data: EncodedData,
    target: EncodedData,
    rng: np.random.Generator,
    m: int,
) -> tuple[Any, Any]:
    """``(target_fn, alignment_fn)`` for the Balancer: the specific-set loss whose gradient the
    tracker records (gradient source ``"tracker"``), or the paper's extra-pass alignment
    function (``"extra"``); ``(None, None)`` for a mixer that uses no alignment."""
    if not uses_alignment(method):
        return None, None
    dev = torch.device(cfg.device)

    def batch_loss(mod: torch.nn.Module, batch: tuple[EncodedData, np.ndarray]) -> torch.Tensor:
        data, ix = batch
        t = torch.from_numpy(ix)
        return per_sample_loss(lm_logits(mod, data.inputs[t].to(dev)), data.labels[t].to(dev))

    def target_batch() -> tuple[EncodedData, np.ndarray]:
        return target, rng.choice(len(target), size=min(cfg.batch_size, len(target)), replace=False)

    if method.gradients == "tracker":
        # Summed per-sample losses: the tracker divides alignments by the sample counts.
        # Costs one forward and a backward that stops at the tracked LM head.
        return (lambda: batch_loss(model, target_batch()).sum()), None

    from ..mixing import domain_gradient_alignment

    members = [np.flatnonzero(train_data.domains == d) for d in range(m)]

    def alignment() -> torch.Tensor:
        # One batch per domain and one of the target set, each a full forward/backward
        # over all parameters, as in the DGA paper.
        batches = [
            (train_data, rng.choice(ix, size=min(cfg.extra_batch, ix.size), replace=False))
            if ix.size
            else None
            for ix in members
        ]
        return domain_gradient_alignment(
            model, lambda mod, b: batch_loss(mod, b).mean(), batches, target_batch()
        )

    return None, alignment


def run_methods(
    cfg: ExperimentConfig,
    prep: PreparedData,
    *,
    seed: int,
    evaluate_on: str = "test",
    log_dir: str | Path | None = None,
    progress: bool = True,
) -> Iterator[tuple[Method, TrainResult]]:
    """Train every method of ``cfg`` on one prepared corpus, one after the other.

    Every run starts from the same model init and gets the same seed and token budget;
    eval losses are always reported per original domain, so a regrouped run is compared on
    the same footing.

    Args:
        evaluate_on: ``"test"`` (reported results) or ``"val"`` (hyper-parameter
            selection); only that split is evaluated.

    Yields:
        ``(method, result)`` as each run finishes.
    """
    if evaluate_on not in ("val", "test"):
        raise ValueError(f"evaluate_on must be 'val' or 'test'; got {evaluate_on!r}")
    methods = resolve_methods(cfg.methods)  # fail before any training
    model_cfg = replace(cfg.model, vocab_size=prep.vocab.size)
    evals = {evaluate_on: prep.split(evaluate_on)}
    for method in methods:
        m = prep.num_domains(method.domains)
        logger.info("run %s: mixer %s on %d %s domains", method.name, method.mixer, m,
                    method.domains)  # fmt: skip
        result = train(
            model_cfg, prep.split("train", method.domains), evals, method, cfg.train,
            target=prep.split("target", method.domains), seed=seed, hparams=cfg.hparams,
            num_domains=m, num_groups=prep.num_original,
            domain_names=prep.domain_names(method.domains), name=method.name,
            out_dir=log_dir, progress=progress,
        )  # fmt: skip
        yield method, result
