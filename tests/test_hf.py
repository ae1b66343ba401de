"""The HF integration drives a real `transformers.Trainer` and the mixture changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")


def _dataset(n=64, T=16, vocab=101, m=3, seed=0):
    rng = np.random.default_rng(seed)
    domain = np.arange(n) % m
    # Each domain draws tokens from its own slice of the vocabulary, so the per-domain
    # gradients differ and the mixers have something to react to.
    ids = [(rng.integers(0, 30, T) + 30 * d).tolist() for d in domain]
    return datasets.Dataset.from_dict(
        {"input_ids": ids, "labels": ids, "domain": domain.tolist()}
    ), m


def _trainer(tmp_path, mixer, ds, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from rnb_kernels.integrations.hf import BalancedTrainer

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=101,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)  # from a config: no weight download
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=6,
        learning_rate=1e-3, logging_steps=2, report_to=[], save_strategy="no",
        use_cpu=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    return BalancedTrainer(model=model, args=args, train_dataset=ds, mixer=mixer, **kw)


def test_rnb_drives_trainer_and_mixture_changes(tmp_path):
    from rnb_kernels import RnB

    ds, m = _dataset()
    mixer = RnB(m, eval_proportions=[0.6, 0.3, 0.1], lam=2.0, update_every=2)
    trainer = _trainer(tmp_path, mixer, ds)
    w0 = mixer.weights.clone()
    out = trainer.train()
    assert out.global_step == 6
    assert trainer.balancer.num_rounds == 3
    w = mixer.weights
    assert torch.all(w >= 0) and float(w.sum()) == pytest.approx(1.0)
    assert float((w - w0).abs().max()) > 1e-3
    # The tracker saw every sample of every round (8 per step, 2 steps per round).
    counts = [sum(h["counts"]) for h in trainer.balancer.history]
    assert counts == [16.0, 16.0, 16.0]
    from rnb_kernels.integrations.hf import MixingCallback

    assert any(isinstance(c, MixingCallback) for c in trainer.callback_handler.callbacks)


def test_dga_with_target_drives_trainer(tmp_path):
    from rnb_kernels import DGA

    ds, m = _dataset()
    target = torch.tensor(ds[0:8]["input_ids"])  # a specific set of domain-0-like rows
    holder = {}

    def target_fn():
        model = holder["trainer"].model
        out = model(input_ids=target, labels=target)
        return out.loss * target.shape[0]

    mixer = DGA(m, step_size=50.0, ema=1.0, update_every=2)
    trainer = _trainer(tmp_path, mixer, ds, target_fn=target_fn)
    holder["trainer"] = trainer
    trainer.train()
    w = mixer.weights
    assert trainer.balancer.num_rounds == 3
    assert float((w - 1.0 / m).abs().max()) > 1e-3
    assert float(w.sum()) == pytest.approx(1.0)


def test_sampler_follows_weights(tmp_path):
    from rnb_kernels import Static

    ds, m = _dataset(n=90)
    trainer = _trainer(tmp_path, Static([1.0, 0.0, 0.0]), ds)
    loader = trainer.get_train_dataloader()
    batch = next(iter(loader))
    assert set(batch["domain"].tolist()) == {0}
