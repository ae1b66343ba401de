"""Balancer: tracker + mixer + sampler wired into a user's training loop in a few lines.

Example:
    >>> mixer = RnB(num_domains=m, eval_proportions=p_eval, lam=2.0, update_every=50)  # doctest: +SKIP
    >>> balancer = Balancer(model, mixer, log_dir="runs/rnb")  # doctest: +SKIP
    >>> loader = DataLoader(ds, batch_size=B,  # doctest: +SKIP
    ...                     sampler=balancer.make_sampler(labels, batch_size=B))
    >>> for batch in loader:  # doctest: +SKIP
    ...     with balancer.step(batch["domain"]) as s:
    ...         loss_vec = per_sample_loss(model, batch)
    ...         s.record_loss(loss_vec)
    ...         loss_vec.mean().backward()
    ...     optimizer.step(); optimizer.zero_grad()
    ...     balancer.after_step()
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import distributed as rdist
from .mixing.base import Mixer
from .sampling import MixtureSampler
from .tracking import DomainGradientTracker, validate_domain_ids

logger = logging.getLogger(__name__)

__all__ = [
    "Balancer",
    "Statistic",
    "needs_tracker",
    "register_statistic",
    "statistic_names",
    "unregister_statistic",
]


@dataclass(frozen=True)
class Statistic:
    """One named per-round statistic a mixer can ask for in ``Mixer.requires``.

    Attributes:
        name: the keyword it is passed to ``mixer.update`` under.
        compute: ``compute(balancer) -> value`` at the end of a round (after the all-reduce);
            ``None`` means "not available in this configuration" and the keyword is left out.
        needs_tracker: the statistic reads per-domain gradients, so a Balancer whose mixer
            requires it builds a :class:`~rnb_kernels.DomainGradientTracker`.
    """

    name: str
    compute: Callable[[Balancer], Any]
    needs_tracker: bool = False


_STATISTICS: dict[str, Statistic] = {}
_TB_MISSING_LOGGED = False


def register_statistic(name: str, *, needs_tracker: bool = False, replace: bool = False):
    """Decorator: register ``fn(balancer) -> value`` as the statistic ``name``.

    Example:
        >>> @register_statistic("loss_max")  # doctest: +SKIP
        ... def _(b):
        ...     return b.domain_losses().nan_to_num(0).max()
    """
    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty str")

    def wrap(fn: Callable[[Balancer], Any]) -> Callable[[Balancer], Any]:
        if name in _STATISTICS and not replace:
            raise ValueError(f"statistic {name!r} is already registered; pass replace=True")
        _STATISTICS[name] = Statistic(name, fn, needs_tracker)
        return fn

    return wrap


def statistic_names() -> tuple[str, ...]:
    """Names of every registered statistic."""
    return tuple(_STATISTICS)


def unregister_statistic(name: str) -> None:
    """Remove a registered statistic (tests that register toy statistics clean up with this)."""
    _STATISTICS.pop(name, None)


def needs_tracker(mixer: Mixer | type[Mixer]) -> bool:
    """Whether a mixer (or mixer class) requires a statistic that reads per-domain gradients,
    i.e. whether a :class:`Balancer` for it builds a :class:`DomainGradientTracker`."""
    return any(_STATISTICS[r].needs_tracker for r in mixer.requires if r in _STATISTICS)


# Built-in statistics. Gradient ones read the tracker; with ``alignment_fn`` (paper-style DGA)
# the alignment comes from that function as means, so counts / target_count are left out.
@register_statistic("gram", needs_tracker=True)
def _gram(b: Balancer) -> Any:
    return b.tracker.gram().cpu()


@register_statistic("gram_vec", needs_tracker=True)
def _gram_vec(b: Balancer) -> Any:
    # G c for the mixer's own coefficients (R&B: p_eval / counts), without forming G.
    return b.tracker.gram_vector(b.mixer.gram_coefficients(b.tracker.counts().cpu())).cpu()


@register_statistic("alignment", needs_tracker=True)
def _alignment(b: Balancer) -> Any:
    if b.alignment_fn is not None:
        return b.alignment_fn()
    return b.tracker.target_alignment().cpu()


@register_statistic("target_count", needs_tracker=True)
def _target_count(b: Balancer) -> Any:
    return None if b.tracker is None else b.tracker.target_count()


@register_statistic("counts")
def _counts(b: Balancer) -> Any:
    # Samples per domain: the tracker's when it exists, else what record_loss() saw.
    if b.alignment_fn is not None and "alignment" in b.mixer.requires:
        return None
    if b.tracker is not None:
        return b.tracker.counts().cpu()
    return b.loss_counts()


@register_statistic("losses")
def _losses(b: Balancer) -> Any:
    return b.domain_losses()


@register_statistic("loss_counts")
def _loss_counts(b: Balancer) -> Any:
    return b.loss_counts()


class _Step:
    """Handle yielded by :meth:`Balancer.step` (one micro-batch)."""

    def __init__(self, balancer: Balancer, domain_ids: torch.Tensor) -> None:
        self._balancer = balancer
        self.domain_ids = domain_ids

    def record_loss(self, loss: torch.Tensor) -> None:
        """Per-sample ``[B]`` or per-token ``[B, T]`` losses of this micro-batch (detached)."""
        self._balancer._record_loss(loss, self.domain_ids)


class Balancer:
    """Online data mixing around an existing training loop.

    Per micro-batch, ``with balancer.step(domain_ids):`` wraps the backward (the tracker records
    per-domain gradients); per optimizer step, ``balancer.after_step()`` counts steps and every
    ``update_every`` steps gathers the round's statistics (all-reduced under
    ``torch.distributed``), updates the mixer, checks that every rank got identical weights,
    resets the round and logs. A :class:`~rnb_kernels.MixtureSampler` built on the mixer (see
    :meth:`make_sampler`) follows the new weights from its next batch.

    What is gathered is what the mixer declares in ``mixer.requires``, looked up by name in the
    statistics registry (:func:`register_statistic`): ``gram``/``counts`` (R&B),
    ``alignment``/``counts``/``target_count`` (DGA, from the tracker's target row, or
    ``alignment_fn``), ``losses``/``counts`` (ODM, from :meth:`record_loss`).

    Args:
        model: the model (used to build the tracker).
        mixer: a :class:`~rnb_kernels.mixing.Mixer`.
        sampler: optional sampler to include in :meth:`state_dict`.
        tracker: ``None`` (built when the mixer needs gradients: last ``nn.Linear``, exact
            mode), a dict of :class:`~rnb_kernels.DomainGradientTracker` keyword arguments, or a
            tracker.
        update_every: optimizer steps per round (default ``mixer.update_every``).
        log_dir: directory for ``mixture.csv`` (weights per update), ``mixture.jsonl`` (weights,
            counts, per-domain loss, update time, skip counters) and TensorBoard scalars when
            ``torch.utils.tensorboard`` is importable. Written by rank 0 only.
        target_fn: DGA: ``target_fn() -> loss`` of a specific-set batch, recorded into the
            tracker's target row right before each update.
        alignment_fn: DGA, paper-style: ``alignment_fn() -> float [m]`` mean-gradient
            alignments (e.g. :func:`~rnb_kernels.mixing.domain_gradient_alignment`), used instead
            of the tracker.
        verify_ranks: after each update, all-reduce min/max of the weights and raise
            ``RuntimeError`` if ranks disagree (one tiny collective per round).
        domain_names: optional ``m`` names used in the per-round INFO line (default
            ``d0 .. d{m-1}``).
        log_name: optional run label prefixed to the per-round INFO line.

    Attributes:
        global_step: optimizer steps seen. update_time_s: total seconds spent in updates
            (statistics gathering + mixer), for overhead reporting. history: one dict per update.
    """

    def __init__(
        self,
        model: nn.Module,
        mixer: Mixer,
        sampler: MixtureSampler | None = None,
        tracker: DomainGradientTracker | dict[str, Any] | None = None,
        update_every: int | None = None,
        log_dir: str | os.PathLike | None = None,
        *,
        target_fn: Callable[[], torch.Tensor] | None = None,
        alignment_fn: Callable[[], Any] | None = None,
        verify_ranks: bool = True,
        domain_names: Sequence[str] | None = None,
        log_name: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(mixer, Mixer):
            raise TypeError(f"mixer must be a rnb_kernels Mixer, got {type(mixer).__name__}")
        if update_every is None:
            update_every = mixer.update_every
        if isinstance(update_every, bool) or not isinstance(update_every, int):
            raise TypeError(f"update_every must be an int, got {type(update_every).__name__}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        for name, fn in (("target_fn", target_fn), ("alignment_fn", alignment_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable")
        self.model = model
        self.mixer = mixer
        self.sampler = sampler
        self.update_every = update_every
        self.target_fn = target_fn
        self.alignment_fn = alignment_fn
        self.verify_ranks = bool(verify_ranks)
        unknown = [r for r in mixer.requires if r not in _STATISTICS]
        if unknown:
            raise ValueError(
                f"mixer {type(mixer).__name__} requires unknown statistics {unknown}; "
                f"registered: {list(_STATISTICS)} (see register_statistic)"
            )
        self.num_domains = mixer.stat_domains
        if domain_names is not None:
            domain_names = [str(n) for n in domain_names]
            if len(domain_names) != len(mixer.weights):
                raise ValueError(
                    f"domain_names has {len(domain_names)} entries; the mixer has "
                    f"{len(mixer.weights)} weights"
                )
        self.domain_names = domain_names
        self.log_name = log_name
        needs_grads = alignment_fn is None and needs_tracker(mixer)
        if isinstance(tracker, DomainGradientTracker):
            if tracker.num_domains != self.num_domains:
                raise ValueError(
                    f"tracker has num_domains={tracker.num_domains}, the mixer's statistics "
                    f"need {self.num_domains}"
                )
            self.tracker: DomainGradientTracker | None = tracker
        elif isinstance(tracker, dict):
            self.tracker = DomainGradientTracker(model, self.num_domains, **tracker)
        elif tracker is None:
            self.tracker = DomainGradientTracker(model, self.num_domains) if needs_grads else None
        else:
            raise TypeError(
                f"tracker must be None, a dict or a tracker, got {type(tracker).__name__}"
            )
        dev = self.tracker.device if self.tracker is not None else _model_device(model)
        self._loss_sums = torch.zeros(self.num_domains, dtype=torch.float64, device=dev)
        self._loss_counts = torch.zeros(self.num_domains, dtype=torch.float64, device=dev)
        self.global_step = 0
        self.num_rounds = 0
        self.update_time_s = 0.0
        self.history: list[dict[str, Any]] = []
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self._tb = None
        self._csv_header_done = False
        if self.log_dir is not None and rdist.rank() == 0:
            os.makedirs(self.log_dir, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(self.log_dir)
            except ImportError:
                global _TB_MISSING_LOGGED
                if not _TB_MISSING_LOGGED:  # once per process, not once per run
                    logger.info("tensorboard not installed; logging CSV and JSONL only")
                    _TB_MISSING_LOGGED = True

    # ------------------------------------------------------------------ loop hooks
    def make_sampler(
        self, domain_labels: Any, batch_size: int, seed: int = 0, **kwargs: Any
    ) -> MixtureSampler:
        """Build a :class:`~rnb_kernels.MixtureSampler` following this balancer's mixer (and
        keep it for :meth:`state_dict`)."""
        self.sampler = MixtureSampler(
            domain_labels, weights=self.mixer, batch_size=batch_size, seed=seed, **kwargs
        )
        return self.sampler

    @contextlib.contextmanager
    def step(self, domain_ids: Any, grad_scale: Any = None) -> Iterator[_Step]:
        """Context for one micro-batch: run its backward inside.

        Args:
            domain_ids: int ``[B]`` or ``[B, T]``, ``-1`` = ignore.
            grad_scale: float or ``GradScaler`` when the backward runs on a scaled loss.

        Yields:
            a handle whose ``record_loss(loss_per_sample)`` feeds per-domain losses.
        """
        # Validated once per micro-batch: by the tracker when there is one (its id_check),
        # else here; record_loss() through the handle reuses the result.
        if self.tracker is None:
            yield _Step(self, validate_domain_ids(domain_ids, self.num_domains))
            return
        ids = self.tracker.validate_ids(domain_ids)
        with self.tracker.domains(ids, grad_scale=grad_scale, validated=True):
            yield _Step(self, ids)

    def record_loss(self, loss: torch.Tensor, domain_ids: Any) -> None:
        """Accumulate per-domain loss sums: ``loss`` has the shape of ``domain_ids``
        (``[B]`` or ``[B, T]``); entries with id ``-1`` are ignored."""
        self._record_loss(loss, validate_domain_ids(domain_ids, self.num_domains))

    def _record_loss(self, loss: torch.Tensor, ids: torch.Tensor) -> None:
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__}")
        if tuple(loss.shape) != tuple(ids.shape):
            raise ValueError(
                f"loss has shape {tuple(loss.shape)} but domain_ids {tuple(ids.shape)}; "
                "pass per-sample or per-token losses (reduction='none')"
            )
        dev = self._loss_sums.device
        flat_ids = ids.reshape(-1).to(dev) + 1
        vals = loss.detach().reshape(-1).to(dev, torch.float64)
        sums = torch.zeros(self.num_domains + 1, dtype=torch.float64, device=dev)
        cnts = torch.zeros_like(sums)
        sums.index_add_(0, flat_ids, vals)
        cnts.index_add_(0, flat_ids, torch.ones_like(vals))
        self._loss_sums += sums[1:]
        self._loss_counts += cnts[1:]

    def record_target(self, loss: torch.Tensor, mask: Any = None) -> None:
        """DGA: record a specific-set loss's gradient into the tracker's target row."""
        if self.tracker is None:
            raise RuntimeError("record_target needs a tracker (the mixer uses no gradients)")
        self.tracker.record_target(loss, mask=mask)

    def after_step(self) -> torch.Tensor | None:
        """Call once per optimizer step; returns the new weights when a round closed."""
        self.global_step += 1
        if self.global_step % self.update_every == 0:
            return self.update()
        return None

    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, scaler: Any = None
    ) -> torch.Tensor | None:
        """``optimizer.step()`` (through ``scaler`` if given), ``zero_grad()``, then
        :meth:`after_step`."""
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return self.after_step()

    # ------------------------------------------------------------------ the update
    def loss_counts(self) -> torch.Tensor:
        """float64 ``[m]`` (CPU): entries :meth:`record_loss` saw per domain this round."""
        return self._loss_counts.detach().to("cpu", copy=True)

    def domain_losses(self) -> torch.Tensor:
        """float64 ``[m]`` (CPU): mean recorded loss per domain this round (NaN if none)."""
        n = self.loss_counts()
        return torch.where(n > 0, self._loss_sums.cpu() / n.clamp(min=1), float("nan"))

    def _gather(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tr = self.tracker
        if tr is not None:
            tr.sync()
        rdist.all_reduce_sum_([self._loss_sums, self._loss_counts])
        stats: dict[str, Any] = {}
        for name in self.mixer.requires:
            value = _STATISTICS[name].compute(self)
            if value is not None:
                stats[name] = value
        log: dict[str, torch.Tensor] = {
            "loss": self.domain_losses(),
            "loss_counts": self.loss_counts(),
        }
        if tr is not None:
            log["counts"] = tr.counts().cpu()
        return stats, log

    def update(self) -> torch.Tensor:
        """Close the round now: gather statistics, update the mixer, reset, log."""
        t0 = time.perf_counter()
        if self.target_fn is not None and self.tracker is not None:
            self.tracker.record_target(self.target_fn())
        stats, log = self._gather()
        weights = self.mixer.update(**stats)
        if self.verify_ranks:
            rdist.check_consistent(weights, "mixture weights")
        if self.tracker is not None:
            self.tracker.reset()
        self._loss_sums.zero_()
        self._loss_counts.zero_()
        dt = time.perf_counter() - t0
        self.update_time_s += dt
        self.num_rounds += 1
        record = {
            "step": self.global_step,
            "round": self.num_rounds,
            "weights": weights.tolist(),
            "counts": log["counts"].tolist() if "counts" in log else log["loss_counts"].tolist(),
            "loss": [None if v != v else float(v) for v in log["loss"].tolist()],
            "update_time_s": dt,
            "skipped_updates": self.mixer.skipped_updates,
            "nonfinite_skips": self.tracker.nonfinite_skips if self.tracker is not None else 0,
        }
        self.history.append(record)
        self._log(record)
        return weights

    def _log(self, record: dict[str, Any]) -> None:
        prefix = f"{self.log_name}: " if self.log_name else ""
        logger.info("%s%s", prefix, round_summary(record, names=self.domain_names))
        # The full vector goes to DEBUG and the log files, not the console.
        logger.debug("round %d weights %s", record["round"], record["weights"])
        if self.log_dir is None or rdist.rank() != 0:
            return
        path = os.path.join(self.log_dir, "mixture.csv")
        m = len(record["weights"])
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if not self._csv_header_done and f.tell() == 0:
                w.writerow(["step", "round", *[f"w{i}" for i in range(m)], "update_time_s"])
            self._csv_header_done = True
            w.writerow(
                [record["step"], record["round"], *record["weights"], record["update_time_s"]]
            )
        with open(os.path.join(self.log_dir, "mixture.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            for i, v in enumerate(record["weights"]):
                self._tb.add_scalar(f"mixture/w{i}", v, step)
            for i, v in enumerate(record["loss"]):
                if v is not None:
                    self._tb.add_scalar(f"loss/domain{i}", v, step)
            self._tb.add_scalar("mixture/update_time_s", record["update_time_s"], step)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Mixer, tracker, sampler and round state; restores the run bit-exactly."""
        return {
            "version": 1,
            "global_step": self.global_step,
            "num_rounds": self.num_rounds,
            "update_time_s": self.update_time_s,
            "loss_sums": self._loss_sums.clone(),
            "loss_counts": self._loss_counts.clone(),
            "mixer": self.mixer.state_dict(),
            "tracker": None if self.tracker is None else self.tracker.state_dict(),
            "sampler": None if self.sampler is None else self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if (state["tracker"] is None) != (self.tracker is None):
            raise ValueError("state and this balancer disagree on having a tracker")
        if state["sampler"] is not None and self.sampler is None:
            raise ValueError("state holds a sampler; build it (make_sampler) before loading")
        self.mixer.load_state_dict(state["mixer"])
        if self.tracker is not None:
            self.tracker.load_state_dict(state["tracker"])
        if self.sampler is not None and state["sampler"] is not None:
            self.sampler.load_state_dict(state["sampler"])
        self._loss_sums.copy_(state["loss_sums"])
        self._loss_counts.copy_(state["loss_counts"])
        self.global_step = int(state["global_step"])
        self.num_rounds = int(state["num_rounds"])
        self.update_time_s = float(state["update_time_s"])

    def close(self) -> None:
        """Flush TensorBoard and remove the tracker from the model."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.tracker is not None:
            self.tracker.remove()


def round_summary(record: dict[str, Any], top: int = 3, names: Sequence[str] | None = None) -> str:
    """One readable line per round: entropy as an effective number of domains, the heaviest
    domains (by ``names`` when given) and the update time (the full weights are in the logs).

    Example:
        >>> round_summary({"round": 2, "step": 20, "weights": [0.5, 0.25, 0.25],
        ...                "update_time_s": 0.0012})
        'round 2 (step 20): eff. domains 2.83/3, top d0=0.500 d1=0.250 d2=0.250, update 1.2 ms'
    """
    w = torch.tensor(record["weights"], dtype=torch.float64)
    p = w[w > 0]
    eff = float(torch.exp(-(p * p.log()).sum()))
    order = torch.argsort(w, descending=True, stable=True)[:top].tolist()
    label = (lambda i: names[i]) if names is not None else (lambda i: f"d{i}")
    heads = " ".join(f"{label(i)}={float(w[i]):.3f}" for i in order)
    return (
        f"round {record['round']} (step {record['step']}): eff. domains {eff:.2f}/{w.numel()}, "
        f"top {heads}, update {1e3 * record['update_time_s']:.1f} ms"
    )


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
