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


def _trainer(tmp_path, mixer, ds, trainer_cls=None, config_kw=None, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from rnb_kernels.integrations.hf import BalancedTrainer

    trainer_cls = trainer_cls or BalancedTrainer

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=101,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        **(config_kw or {}),
    )
    model = GPT2LMHeadModel(cfg)  # from a config: no weight download
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=6,
        learning_rate=1e-3, logging_steps=2, report_to=[], save_strategy="no",
        use_cpu=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    return trainer_cls(model=model, args=args, train_dataset=ds, mixer=mixer, **kw)


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


class _Recorded(torch.utils.data.Dataset):
    """A map-style dataset that records which rows the Trainer's dataloader read, in order."""

    def __init__(self, ds):
        self.rows = [ds[i] for i in range(len(ds))]
        self.read: list[int] = []

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.rows[i]


def _head_grad_sums(model, batch, m):
    """float64 per-domain sums of the LM head's weight gradient (its *use* in the head only:
    GPT-2 ties it to the embedding), one autograd.grad per domain on a float64 copy."""
    import copy

    ref = copy.deepcopy(model).double()
    for mod in ref.modules():  # a deepcopy keeps the tracker's swapped forward: drop it
        mod.__dict__.pop("forward", None)
    ids, dom = batch["input_ids"], batch["domain"].reshape(-1)
    w = ref.lm_head.weight.detach().clone().requires_grad_(True)
    out = np.zeros((m, w.numel()))
    with torch.enable_grad():
        hidden = ref.transformer(input_ids=ids).last_hidden_state
        for d in range(m):
            rows = dom == d
            if bool(rows.any()):
                logits = hidden[rows][:, :-1] @ w.T
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[rows][:, 1:].reshape(-1),
                    reduction="sum",
                )  # fmt: skip
                (g,) = torch.autograd.grad(loss, [w], retain_graph=True)
                out[d] = g.reshape(-1).numpy()
    return out


def test_trainer_credits_each_sample_to_its_domain_and_weights_equal_rnb_formula(tmp_path):
    """Per round: the tracker's counts are the dataset's domain column over the rows the
    dataloader drew, and the mixer's weights are R&B's formula on per-domain head gradients
    recomputed independently in float64 from the very batches the Trainer trained on."""
    from rnb_kernels import RnB
    from rnb_kernels.integrations.hf import BalancedTrainer

    ds, m = _dataset(n=96)
    rec = _Recorded(ds)
    p_eval = np.array([0.6, 0.3, 0.1])
    rounds: list[dict] = []

    class Probe(BalancedTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            step = self.state.global_step
            if step % 2 == 0:
                rounds.append({"sums": np.zeros((m, 101 * 64)), "counts": np.zeros(m)})
            rounds[-1]["sums"] += _head_grad_sums(model, inputs, m)
            rounds[-1]["counts"] += np.bincount(inputs["domain"].numpy(), minlength=m)
            return super().training_step(model, inputs, *args, **kwargs)

    mixer = RnB(m, eval_proportions=p_eval, lam=2.0, update_every=2)
    cfg = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # deterministic forward
    trainer = _trainer(tmp_path, mixer, rec, trainer_cls=Probe, config_kw=cfg)
    labels = np.asarray([r["domain"] for r in rec.rows])
    rec.read.clear()
    trainer.train()
    hist = trainer.balancer.history
    assert len(hist) == 3 == len(rounds)
    per_round = 2 * 8  # update_every x batch size
    for r, h in enumerate(hist):
        drawn = rec.read[r * per_round : (r + 1) * per_round]
        np.testing.assert_array_equal(h["counts"], np.bincount(labels[drawn], minlength=m))
        np.testing.assert_array_equal(rounds[r]["counts"], h["counts"])
        n, s = rounds[r]["counts"], rounds[r]["sums"]
        means = np.where(n[:, None] > 0, s / np.maximum(n, 1)[:, None], 0.0)
        v = means @ means.T @ (p_eval / p_eval.sum())
        z = 2.0 * v / np.linalg.norm(v)
        expect = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        np.testing.assert_allclose(h["weights"], expect, rtol=0, atol=2e-5)
    # The mixture is not uniform: the formula had something to act on.
    assert max(abs(w - 1 / m) for w in hist[-1]["weights"]) > 0.05
