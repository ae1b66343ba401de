"""R&B / DGA for a Hugging Face ``transformers.Trainer`` in a few lines.

Three pieces, usable together (:class:`BalancedTrainer`) or on their own:

* :class:`MixingCallback` — a ``TrainerCallback`` that closes a mixing round every
  ``update_every`` optimizer steps (``balancer.after_step()``), logs the mixture (max weight,
  entropy) with the Trainer's logs, and releases the tracker at the end.
* the sampler wiring — the training dataloader draws from a
  :class:`~rnb_kernels.MixtureSampler` that follows the mixer's current weights.
* the backward wiring — each micro-batch's ``training_step`` runs inside
  ``balancer.step(domain_ids)``, so the tracker sees the per-domain gradients of the LM head
  during the backward the Trainer already runs; the domain column is removed from the batch
  before it reaches ``model(**inputs)``.

Example:
    >>> from rnb_kernels import RnB
    >>> from rnb_kernels.integrations.hf import BalancedTrainer
    >>> mixer = RnB(m, eval_proportions=p_eval, lam=2.0, update_every=20)  # doctest: +SKIP
    >>> trainer = BalancedTrainer(model=model, args=args, train_dataset=ds,  # doctest: +SKIP
    ...                           mixer=mixer, domain_column="domain")
    >>> trainer.train()  # doctest: +SKIP
    >>> trainer.balancer.mixer.weights  # doctest: +SKIP

The dataset needs an integer ``domain`` column (``[0, m)``, ``-1`` = in no domain).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "rnb_kernels.integrations.hf needs transformers: pip install 'rnb_kernels[hf]'"
    ) from exc

from ..balancer import Balancer
from ..mixing.base import Mixer

logger = logging.getLogger(__name__)

__all__ = ["BalancedTrainer", "MixingCallback", "domain_labels"]


def domain_labels(dataset: Any, column: str = "domain") -> np.ndarray:
    """``int64[n]`` domain column of a ``datasets.Dataset`` (or any dataset of dicts)."""
    if hasattr(dataset, "column_names") and column in dataset.column_names:
        return np.asarray(dataset[column], dtype=np.int64)
    try:
        return np.asarray([int(dataset[i][column]) for i in range(len(dataset))], dtype=np.int64)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"dataset has no integer column {column!r}") from exc


class MixingCallback(TrainerCallback):
    """Closes a mixing round every ``update_every`` optimizer steps and logs the mixture.

    Args:
        balancer: the :class:`~rnb_kernels.Balancer` whose ``step()`` wraps each backward.
    """

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer

    def on_step_end(self, args, state, control, **kwargs):
        self.balancer.after_step()
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            w = self.balancer.mixer.weights.numpy()
            nz = w[w > 0]
            logs["mixture_max_weight"] = float(w.max())
            # Entropy relative to uniform: 1 = uniform mixture, 0 = a single domain.
            logs["mixture_entropy"] = (
                float(-(nz * np.log(nz)).sum() / math.log(w.size)) if w.size > 1 else 1.0
            )
            logs["mixture_updates"] = self.balancer.num_rounds
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.balancer.close()
        return control


class BalancedTrainer(Trainer):
    """``transformers.Trainer`` whose data mixture is steered by a mixer (R&B, DGA, ...).

    Args:
        mixer: a :class:`~rnb_kernels.mixing.Mixer` (``RnB``, ``DGA``, ``ODM``, ...).
        domain_column: integer domain column of ``train_dataset``.
        tracker: forwarded to :class:`~rnb_kernels.Balancer` (``None`` = the model's last
            ``nn.Linear``, i.e. the LM head, exact mode; or a dict such as
            ``{"mode": "sketch"}``).
        target_fn: DGA: ``target_fn() -> loss`` of a specific-set batch (see
            :class:`~rnb_kernels.Balancer`).
        balancer_kwargs: more :class:`~rnb_kernels.Balancer` arguments (``log_dir``...).
        sampler_kwargs: more :class:`~rnb_kernels.MixtureSampler` arguments.
        **kwargs: everything ``transformers.Trainer`` takes.

    Attributes:
        balancer: the :class:`~rnb_kernels.Balancer`; ``balancer.history`` holds every update.
    """

    def __init__(
        self,
        *args: Any,
        mixer: Mixer,
        domain_column: str = "domain",
        tracker: Any = None,
        target_fn: Any = None,
        balancer_kwargs: dict[str, Any] | None = None,
        sampler_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.train_dataset is None:
            raise ValueError("train_dataset is required (its domain column drives the mixture)")
        self.domain_column = domain_column
        self._labels = domain_labels(self.train_dataset, domain_column)
        self.balancer = Balancer(
            self.model, mixer, tracker=tracker, target_fn=target_fn, **(balancer_kwargs or {})
        )
        self._sampler_kwargs = dict(sampler_kwargs or {})
        self.add_callback(MixingCallback(self.balancer))

    # The domain column must survive column pruning (the model's forward does not accept it).
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if (
            self._signature_columns is not None
            and self.domain_column not in self._signature_columns
        ):
            self._signature_columns = [*self._signature_columns, self.domain_column]

    def _get_train_sampler(self, train_dataset=None):
        return self.balancer.make_sampler(
            self._labels,
            batch_size=self.args.per_device_train_batch_size,
            seed=self.args.seed,
            **self._sampler_kwargs,
        )

    def training_step(self, model, inputs, *args, **kwargs):
        ids = inputs.get(self.domain_column)
        if ids is None:
            raise ValueError(f"batch has no {self.domain_column!r} column")
        ids = (
            torch.as_tensor(ids)
            .reshape(-1)
            .to(self.balancer.tracker.device if self.balancer.tracker is not None else "cpu")
        )
        with self.balancer.step(ids) as s:
            self._step_handle = s
            try:
                return super().training_step(model, inputs, *args, **kwargs)
            finally:
                self._step_handle = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != self.domain_column}
        handle = getattr(self, "_step_handle", None)
        if handle is not None and "losses" in self.balancer.mixer.requires and "labels" in inputs:
            # ODM needs per-sample losses; recompute them from the logits the forward produced.
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            handle.record_loss(_per_sample_lm_loss(outputs.logits, inputs["labels"]))
            return (loss, outputs) if return_outputs else loss
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )


def _per_sample_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``float32[B]`` mean next-token loss per sequence (HF convention: labels unshifted)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    n = (shift_labels != -100).sum(1).clamp_min(1)
    return (tok.sum(1) / n).detach()
