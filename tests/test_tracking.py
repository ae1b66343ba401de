"""DomainGradientTracker: per-domain gradients against brute force, param.grad identity, tied
weights, micro-batches, autocast, checkpointing, sketch statistics, target row, persistence."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings

import numpy as np
import pytest
import torch

# Triton reads TRITON_INTERPRET when it is imported: without a GPU, run its kernels in the
# interpreter (the same switch as tests/test_triton_ops.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn.functional as F
from _optest import GemmShapes
from _tol import assert_close
from torch import nn
from torch.utils.checkpoint import checkpoint

import rnb_kernels
from rnb_kernels.ops.reference import count_sketch_ref, gram_ref, sketch_hash_ref
from rnb_kernels.ops.sketch_hash import bias_hash
from rnb_kernels.tracking import DomainGradientTracker
from rnb_kernels.tracking.ids import per_sample_counts, validate_domain_ids

M = 4  # domains


class MLP(nn.Module):
    """Three Linear layers on [B, T, D] inputs; the middle block can be checkpointed."""

    def __init__(self, bias: bool = True, ckpt: bool = False, d: int = 6, h: int = 12, o: int = 5):
        super().__init__()
        self.inp = nn.Linear(d, h, bias=bias)
        self.mid = nn.Linear(h, h, bias=bias)
        self.head = nn.Linear(h, o, bias=bias)
        self.ckpt = ckpt

    def _block(self, h):
        return torch.tanh(self.mid(h))

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = checkpoint(self._block, h, use_reentrant=False) if self.ckpt else self._block(h)
        return self.head(h)


class TiedLM(nn.Module):
    """GPT-2-style: lm_head.weight is the token embedding."""

    def __init__(self, vocab: int = 11, d: int = 8):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.block = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens):
        return self.lm_head(torch.tanh(self.block(self.wte(tokens))))


def token_losses(model: nn.Module, batch) -> torch.Tensor:
    """Per-token loss [B, T] for MLP (squared output) or TiedLM (next-token CE)."""
    if isinstance(model, TiedLM):
        logits = model(batch)
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            batch[:, 1:].reshape(-1),
            reduction="none",
        ).view(batch.shape[0], -1)
    return model(batch).square().sum(-1)


def brute_force(model: nn.Module, module_names, batches, token_ids) -> torch.Tensor:
    """float64 [m, P]: for each domain, one separate backward of that domain's share of the loss,
    taken down to each tracked layer's output; dW = dyᵀ x from the captured layer input."""
    ref = copy.deepcopy(model).double()
    mods = dict(ref.named_modules())
    out = torch.zeros(M, 0, dtype=torch.float64)
    per_layer = []
    for name in module_names:
        mod = mods[name]
        rows = torch.zeros(
            M,
            mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0),
            dtype=torch.float64,
        )
        per_layer.append((mod, rows))
    for batch, ids in zip(batches, token_ids):
        captured = {}

        def hook(mod, inp, outp, captured=captured):
            captured[mod] = (inp[0], outp)

        handles = [mod.register_forward_hook(hook) for mod, _ in per_layer]
        if batch.is_floating_point():
            batch = batch.double()
        losses = token_losses(ref, batch)
        for h in handles:
            h.remove()
        for d in range(M):
            share = (losses * (ids[:, : losses.shape[1]] == d)).sum()
            for mod, rows in per_layer:
                x, y = captured[mod]
                (dy,) = torch.autograd.grad(share, y, retain_graph=True)
                x2, dy2 = x.detach().reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
                g = [(dy2.T @ x2).reshape(-1)]
                if mod.bias is not None:
                    g.append(dy2.sum(0))
                rows[d] += torch.cat(g)
    return torch.cat([out] + [rows for _, rows in per_layer], 1)


def per_token(ids: torch.Tensor, t: int) -> torch.Tensor:
    return ids[:, None].expand(-1, t) if ids.dim() == 1 else ids


ID_KINDS = ["per-sample", "per-token", "with-ignored"]


def make_ids(kind: str, b: int, t: int, g: torch.Generator) -> torch.Tensor:
    if kind == "per-sample":
        return torch.randint(0, M, (b,), generator=g)
    ids = torch.randint(0, M, (b, t), generator=g)
    if kind == "with-ignored":
        ids[torch.rand(b, t, generator=g) < 0.3] = -1
        ids[0] = -1  # a sample with no tracked token at all
    return ids


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", ID_KINDS)
@pytest.mark.parametrize("modules", [None, ["inp", "head"]], ids=["last-linear", "two-layers"])
def test_exact_matches_brute_force_two_micro_batches(bias, kind, modules):
    g = torch.Generator().manual_seed(1)
    model = MLP(bias=bias)
    ref_model = copy.deepcopy(model)
    tracker = DomainGradientTracker(model, M, modules=modules)
    b, t = 5, 3
    batches = [torch.randn(b, t, 6, generator=g) for _ in range(2)]
    ids = [make_ids(kind, b, t, g) for _ in range(2)]
    for x, i in zip(batches, ids):
        with tracker.domains(i):
            token_losses(model, x).sum().backward()
    names = tracker.module_names
    expected = brute_force(ref_model, names, batches, [per_token(i, t) for i in ids])
    assert_close(tracker.domain_grads(), expected, torch.float32, "domain_grads")
    assert_close(tracker.gram(), gram_ref(expected), torch.float32, "gram")
    counts = sum(
        torch.stack([(per_token(i, t) == d).any(1).sum() for d in range(M)]).double() for i in ids
    )
    assert torch.equal(tracker.counts(), counts)
    tracker.remove()


def test_tied_lm_head_tracks_only_the_head_usage():
    g = torch.Generator().manual_seed(2)
    model = TiedLM()
    untracked = copy.deepcopy(model)
    tracker = DomainGradientTracker(model, M)  # modules=None: the last nn.Linear, lm_head
    assert tracker.module_names == ["lm_head"]
    tokens = torch.randint(0, 11, (3, 7), generator=g)
    ids = make_ids("with-ignored", 3, 6, g)  # per-token ids for the 6 predicted positions
    with tracker.domains(torch.cat([ids, torch.full((3, 1), -1)], 1)):
        token_losses(model, tokens).sum().backward()
    token_losses(untracked, tokens).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), untracked.named_parameters()):
        assert torch.equal(p.grad, q.grad), n  # embedding + head shares, exactly as untracked
    expected = brute_force(untracked, ["lm_head"], [tokens], [ids])
    assert_close(tracker.domain_grads(), expected, torch.float32, "tied lm_head")
    # The full gradient of the shared weight is NOT what is tracked: the embedding share is not.
    full = untracked.wte.weight.grad.reshape(-1).double()
    assert not torch.allclose(tracker.domain_grads().sum(0).double(), full)


def test_hf_gpt2_tied_lm_head():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=37, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    untracked = copy.deepcopy(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    tracker = DomainGradientTracker(model, M)
    assert tracker.module_names == ["lm_head"]
    tokens = torch.randint(0, 37, (3, 9))
    ids = torch.tensor([0, 2, 2])
    with tracker.domains(ids):
        model(tokens, labels=tokens).loss.backward()
    untracked(tokens, labels=tokens).loss.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), untracked.named_parameters()):
        assert torch.equal(p.grad, q.grad), n
    # Brute force: per domain, d(domain share of the loss)/d(logits), times the final hidden state.
    out = untracked(tokens, labels=tokens, output_hidden_states=True)
    h, logits = out.hidden_states[-1].detach().double(), out.logits
    lp = F.cross_entropy(
        logits[:, :-1].reshape(-1, 37), tokens[:, 1:].reshape(-1), reduction="none"
    ).view(3, -1)
    grads = tracker.domain_grads()
    for d in range(M):
        share = (lp * (ids == d)[:, None]).sum() / lp.numel()
        (dy,) = torch.autograd.grad(share, logits, retain_graph=True)
        ref = dy.double().reshape(-1, 37).T @ h.reshape(-1, 16)
        assert_close(grads[d], ref.reshape(-1), torch.float32, f"gpt2 domain {d}")
    tracker.remove()
    assert "forward" not in model.lm_head.__dict__


@pytest.mark.parametrize("mode", ["exact", "sketch"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_param_grad_bit_identical(mode, bias, ckpt):
    g = torch.Generator().manual_seed(3)
    model = MLP(bias=bias, ckpt=ckpt)
    untracked = copy.deepcopy(model)
    tracker = DomainGradientTracker(
        model, M, modules=["inp", "mid", "head"], mode=mode, sketch_dim=64
    )
    for _ in range(2):  # gradient accumulation over two micro-batches
        x = torch.randn(4, 3, 6, generator=g)
        ids = make_ids("with-ignored", 4, 3, g)
        with tracker.domains(ids):
            token_losses(model, x).mean().backward()
        token_losses(untracked, x).mean().backward()
    x2d = torch.randn(5, 6, generator=g)  # 2-D input, backward outside any context
    token_losses(model, x2d).sum().backward()
    token_losses(untracked, x2d).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), untracked.named_parameters()):
        assert torch.equal(p.grad, q.grad), n


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_bitwise_grad_false_sums_the_domain_products(mode):
    """bitwise_grad=False: param.grad equal to untracked at fp32 tolerance (and not computed by
    a GEMM over all rows), statistics equal to the bitwise tracker's."""
    g = torch.Generator().manual_seed(3)
    model = MLP(bias=True)
    untracked, bitwise = copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(modules=["inp", "mid", "head"], mode=mode, sketch_dim=64, reseed=False)
    tracker = DomainGradientTracker(model, M, bitwise_grad=False, **kw)
    ref_tracker = DomainGradientTracker(bitwise, M, **kw)
    assert tracker.bitwise_grad is False and ref_tracker.bitwise_grad is True
    for _ in range(2):
        x = torch.randn(4, 3, 6, generator=g)
        ids = make_ids("with-ignored", 4, 3, g)
        with tracker.domains(ids):
            token_losses(model, x).mean().backward()
        with ref_tracker.domains(ids):
            token_losses(bitwise, x).mean().backward()
        token_losses(untracked, x).mean().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), untracked.named_parameters()):
        assert_close(p.grad, q.grad.double(), torch.float32, n)
    assert_close(tracker.gram(), ref_tracker.gram(), torch.float32, "gram")
    # 20 rows (no layer width is 20): one dyᵀx over all of them per tracked layer, or none.
    x = torch.randn(4, 5, 6, generator=g)
    ids = torch.tensor([0, 1, 1, 2])
    for tr, net, full in ((tracker, model, 0), (ref_tracker, bitwise, 3)):
        with GemmShapes() as rec, tr.domains(ids):
            token_losses(net, x).mean().backward()
        assert rec.inner.count(20) == full, rec.inner
    with pytest.raises(TypeError, match="bitwise_grad must be a bool"):
        DomainGradientTracker(copy.deepcopy(untracked), M, bitwise_grad=0)
    tracker.remove()
    ref_tracker.remove()


def test_checkpointing_elsewhere_matches_brute_force():
    g = torch.Generator().manual_seed(4)
    model = MLP(ckpt=True)
    ref_model = copy.deepcopy(model)
    tracker = DomainGradientTracker(model, M, modules=["inp", "head"])
    x = torch.randn(4, 3, 6, generator=g)
    ids = make_ids("per-token", 4, 3, g)
    with tracker.domains(ids):
        token_losses(model, x).sum().backward()
    expected = brute_force(ref_model, ["inp", "head"], [x], [ids])
    assert_close(tracker.domain_grads(), expected, torch.float32, "checkpointed model")


def test_autocast_bf16_cpu():
    g = torch.Generator().manual_seed(5)
    model = MLP()
    untracked = copy.deepcopy(model)
    tracker = DomainGradientTracker(model, M)
    x = torch.randn(4, 3, 6, generator=g)
    ids = make_ids("per-sample", 4, 3, g)
    captured = {}
    untracked.head.register_forward_hook(lambda mod, i, o: captured.update(x=i[0], y=o))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with tracker.domains(ids):
            token_losses(model, x).float().sum().backward()
        losses = token_losses(untracked, x).float()
    losses.sum().backward(retain_graph=True)
    for (n, p), (_, q) in zip(model.named_parameters(), untracked.named_parameters()):
        assert p.grad.dtype == torch.float32
        assert torch.equal(p.grad, q.grad), n
    # Brute force on the same bf16 activations: per domain dy (bf16) against x cast to bf16.
    xb = captured["x"].detach().to(torch.bfloat16).double().reshape(-1, 12)
    grads = tracker.domain_grads()
    for d in range(M):
        share = (losses * (ids == d)[:, None]).sum()
        (dy,) = torch.autograd.grad(share, captured["y"], retain_graph=True)
        dy2 = dy.double().reshape(-1, 5)
        ref = torch.cat([(dy2.T @ xb).reshape(-1), dy2.sum(0)])
        assert_close(grads[d], ref, torch.float32, f"bf16 domain {d}")


def test_backward_outside_context_is_untracked():
    model = MLP()
    tracker = DomainGradientTracker(model, M)
    token_losses(model, torch.randn(3, 2, 6)).sum().backward()
    assert torch.equal(tracker.counts(), torch.zeros(M, dtype=torch.float64))
    assert torch.equal(tracker.gram(), torch.zeros(M, M, dtype=torch.float64))
    assert float(tracker.domain_grads().abs().sum()) == 0.0


def test_bias_hash_is_the_augmented_column():
    bucket, sign = sketch_hash_ref(7, 6, 50, seed=3, layer=2)
    b, s = bias_hash(7, 5, 50, seed=3, layer=2)
    assert torch.equal(b, bucket[:, 5])
    assert torch.equal(s.double(), sign[:, 5])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_sketch_equals_count_sketch_and_gram_within_bound(bias):
    g = torch.Generator().manual_seed(6)
    model = MLP(bias=bias, h=40, o=30)
    k = 1024
    exact_model = copy.deepcopy(model)
    sk = DomainGradientTracker(
        model, M, modules=["mid", "head"], mode="sketch", sketch_dim=k, seed=11
    )
    ex = DomainGradientTracker(exact_model, M, modules=["mid", "head"])
    for _ in range(2):
        x = torch.randn(6, 4, 6, generator=g)
        ids = make_ids("with-ignored", 6, 4, g)
        for mdl, tr in ((model, sk), (exact_model, ex)):
            with tr.domains(ids):
                token_losses(mdl, x).sum().backward()
    # Deterministic part: the sketch is exactly the count-sketch of [dW | db] per layer.
    grads = ex.domain_grads().double()
    off, expected = 0, []
    for layer, mod in enumerate([exact_model.mid, exact_model.head]):
        ko, ki = mod.weight.shape
        w = grads[:, off : off + ko * ki].view(M, ko, ki)
        off += ko * ki
        if bias:
            w = torch.cat([w, grads[:, off : off + ko].view(M, ko, 1)], 2)
            off += ko
        expected.append(count_sketch_ref(w, k, seed=11, layer=layer))
    assert_close(sk.domain_sketches(), torch.cat(expected, 1), torch.float32, "sketch")
    # Statistical part: |G_sketch - G| within 6 sigma of the count-sketch variance, where
    # var ≈ Σ_layers (|g_a|²|g_b|² + <g_a,g_b>²) / k.
    var = torch.zeros(M, M, dtype=torch.float64)
    off = 0
    for mod in (exact_model.mid, exact_model.head):
        p = mod.weight.numel() + (mod.bias.numel() if bias else 0)
        gl = grads[:, off : off + p]
        off += p
        gg = gl @ gl.T
        n2 = gg.diagonal()
        var += (n2[:, None] * n2[None, :] + gg.square()) / k
    err = (sk.gram() - ex.gram()).abs()
    z = err / var.sqrt().clamp(min=1e-30)
    assert float(z.max()) < 6.0, f"max z-score {float(z.max()):.2f}"


@pytest.mark.parametrize("mode", ["exact", "sketch"])
@pytest.mark.parametrize("how", ["record_target", "target_context"])
def test_target_row_and_alignment(mode, how):
    g = torch.Generator().manual_seed(7)
    model = MLP()
    ref_model = copy.deepcopy(model)
    tracker = DomainGradientTracker(model, M, mode=mode, sketch_dim=32)  # < P: collisions
    x = torch.randn(5, 3, 6, generator=g)
    ids = make_ids("per-sample", 5, 3, g)
    with tracker.domains(ids):
        token_losses(model, x).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    xs = torch.randn(3, 3, 6, generator=g)
    if how == "record_target":
        tracker.record_target(token_losses(model, xs).sum())
    else:
        with tracker.target():
            token_losses(model, xs).sum().backward()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.grad, b)  # the target backward left training gradients alone
    assert tracker.target_count() == 3.0
    # Brute force target gradient of the head (weight + bias).
    ref = copy.deepcopy(ref_model).double()
    token_losses(ref, xs.double()).sum().backward()
    tgt = torch.cat([ref.head.weight.grad.reshape(-1), ref.head.bias.grad])
    dom = brute_force(ref_model, ["head"], [x], [per_token(ids, 3)])
    if mode == "exact":
        assert_close(tracker.target_grad(), tgt, torch.float32, "target row")
        assert_close(tracker.target_alignment(), dom @ tgt, torch.float32, "alignment")
    else:
        n2 = dom.square().sum(1) * tgt.square().sum()
        sd = ((n2 + (dom @ tgt).square()) / 32).sqrt()
        err = (tracker.target_alignment() - dom @ tgt).abs()
        assert bool((err <= 6 * sd + 1e-6).all()), err / sd


def test_record_target_rejects_unrelated_loss():
    model = MLP()
    tracker = DomainGradientTracker(model, M)
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="tracked module"):
        tracker.record_target(w.square().sum())
    assert tracker.target_count() == 0.0


@pytest.mark.parametrize("scales", [(2.0**10, 2.0**7, 2.0**7), (2.0, 2.0)])
def test_grad_scale_is_undone_exactly(scales):
    g = torch.Generator().manual_seed(8)
    model, scaled_model = MLP(), None
    scaled_model = copy.deepcopy(model)
    plain = DomainGradientTracker(model, M)
    scaled = DomainGradientTracker(scaled_model, M)
    for scale in scales:
        x = torch.randn(4, 3, 6, generator=g)
        ids = make_ids("per-sample", 4, 3, g)
        with plain.domains(ids):
            token_losses(model, x).sum().backward()
        with scaled.domains(ids, grad_scale=scale):
            (token_losses(scaled_model, x).sum() * scale).backward()
    assert torch.equal(plain.domain_grads(), scaled.domain_grads())
    assert torch.equal(plain.gram(), scaled.gram())


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_nonfinite_micro_batch_is_skipped(mode):
    g = torch.Generator().manual_seed(9)
    model = MLP()
    tracker = DomainGradientTracker(
        model, M, mode=mode, sketch_dim=64, skip_nonfinite="micro-batch"
    )
    x = torch.randn(4, 3, 6, generator=g)
    ids = make_ids("per-sample", 4, 3, g)
    with tracker.domains(ids):
        token_losses(model, x).sum().backward()
    state = tracker.state_dict()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        with tracker.domains(ids):  # an overflowed (scaled) loss: dy is inf
            (token_losses(model, x).sum() * float("inf")).backward()
    assert not bool(torch.isfinite(model.head.weight.grad).all())  # the scaler still sees it
    assert tracker.nonfinite_skips == 1
    after = tracker.state_dict()
    assert torch.equal(after["counts"], state["counts"])
    for s0, s1 in zip(state["slots"], after["slots"]):
        for grp in s0["buffers"]:
            for key in s0["buffers"][grp]:
                assert torch.equal(s0["buffers"][grp][key], s1["buffers"][grp][key])


def test_counts_are_samples_not_tokens():
    model = MLP()
    tracker = DomainGradientTracker(model, M)
    ids = torch.tensor([[0, 0, -1], [1, 2, 2], [-1, -1, -1]])  # row 1 is a packed row: 1 and 2
    with tracker.domains(ids):
        token_losses(model, torch.randn(3, 3, 6)).sum().backward()
    assert tracker.counts().tolist() == [1.0, 1.0, 1.0, 0.0]


def test_remove_restores_module_exactly():
    model = MLP()
    head = model.head
    before = dict(head.__dict__)
    x = torch.randn(2, 3, 6)
    y0 = model(x)
    tracker = DomainGradientTracker(model, M, modules="*")
    assert "forward" in head.__dict__
    with pytest.raises(ValueError, match="already tracked"):
        DomainGradientTracker(model, M)
    tracker.remove()
    assert head.__dict__.keys() == before.keys()
    assert type(head).forward is nn.Linear.forward and head.forward.__func__ is nn.Linear.forward
    assert not head._forward_hooks and not head._forward_pre_hooks and not head._backward_hooks
    assert torch.equal(model(x), y0)
    with pytest.raises(RuntimeError, match="removed"):
        tracker.gram()
    DomainGradientTracker(model, M).remove()  # can be tracked again


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_state_dict_round_trip_is_bit_exact(mode):
    g = torch.Generator().manual_seed(10)
    a_model = MLP()
    b_model = copy.deepcopy(a_model)
    a = DomainGradientTracker(a_model, M, mode=mode, sketch_dim=128)
    b = DomainGradientTracker(b_model, M, mode=mode, sketch_dim=128)
    data = [
        (torch.randn(4, 3, 6, generator=g), make_ids("with-ignored", 4, 3, g)) for _ in range(3)
    ]
    for x, ids in data[:2]:
        with a.domains(ids, grad_scale=4.0):
            (token_losses(a_model, x).sum() * 4).backward()
    a.record_target(token_losses(a_model, data[0][0]).sum())
    b.load_state_dict(a.state_dict())
    for model, tr in ((a_model, a), (b_model, b)):
        with tr.domains(data[2][1]):
            token_losses(model, data[2][0]).sum().backward()
    assert torch.equal(a.gram(), b.gram())
    assert torch.equal(a.counts(), b.counts())
    assert torch.equal(a.target_alignment(), b.target_alignment())
    other = DomainGradientTracker(MLP(), M + 1, mode=mode, sketch_dim=128)
    with pytest.raises(ValueError, match="configured"):
        other.load_state_dict(a.state_dict())


BAD_CONSTRUCTOR = [
    pytest.param(dict(num_domains=0), ValueError, "num_domains", id="zero-domains"),
    pytest.param(dict(num_domains=2.0), TypeError, "num_domains", id="float-domains"),
    pytest.param(dict(mode="fast"), ValueError, "mode", id="bad-mode"),
    pytest.param(dict(sketch_dim=0), ValueError, "sketch_dim", id="zero-sketch-dim"),
    pytest.param(dict(modules="nothing*"), ValueError, "modules", id="unmatched-pattern"),
    pytest.param(dict(modules=[nn.Linear(2, 2)]), ValueError, "modules", id="foreign-module"),
    pytest.param(dict(modules=["*"], backend="gpu"), ValueError, "backend", id="bad-backend"),
    pytest.param(dict(seed=-1), ValueError, "seed", id="negative-seed"),
]


@pytest.mark.parametrize("kwargs, exc, word", BAD_CONSTRUCTOR)
def test_bad_constructor_arguments(kwargs, exc, word):
    model = MLP()
    kwargs = {"num_domains": M, **kwargs}
    with pytest.raises(exc, match=word):
        DomainGradientTracker(model, **kwargs)
    assert "forward" not in model.head.__dict__


def test_non_linear_module_is_rejected():
    model = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="nn.Linear"):
        DomainGradientTracker(model, M, modules="1")


BAD_IDS = [
    pytest.param(torch.tensor([0.0, 1.0, 1.0]), TypeError, "dtype", id="float-ids"),
    pytest.param(torch.tensor([True, False, True]), TypeError, "dtype", id="bool-ids"),
    pytest.param(torch.tensor([0, 4, 1]), ValueError, "num_domains", id="id-too-large"),
    pytest.param(torch.tensor([0, -2, 1]), ValueError, "num_domains", id="id-below-minus-one"),
    pytest.param(torch.zeros(3, 2, 1, dtype=torch.long), ValueError, "batch", id="3d-ids"),
    pytest.param(torch.zeros(0, dtype=torch.long), ValueError, "empty", id="empty-ids"),
    pytest.param("abc", TypeError, "domain_ids", id="string-ids"),
]


@pytest.mark.parametrize("ids, exc, word", BAD_IDS)
def test_bad_domain_ids_leave_state_unchanged(ids, exc, word):
    model = MLP()
    tracker = DomainGradientTracker(model, M)
    with pytest.raises(exc, match=word):
        with tracker.domains(ids):
            token_losses(model, torch.randn(3, 2, 6)).sum().backward()
    assert float(tracker.counts().sum()) == 0.0
    assert float(tracker.domain_grads().abs().sum()) == 0.0
    assert tracker._active is None


def test_ids_not_matching_the_batch_raise_in_backward():
    model = MLP()
    tracker = DomainGradientTracker(model, M)
    with pytest.raises(ValueError, match=r"domain_ids has shape \(1, 3\) \(3 tokens\) but the"):
        with tracker.domains(torch.tensor([[0, 1, 2]])):  # [1, 3] ids for a [2, 2] batch
            token_losses(model, torch.randn(2, 2, 6)).sum().backward()
    assert float(tracker.counts().sum()) == 0.0
    assert tracker._active is None


def test_contexts_do_not_nest():
    model = MLP()
    tracker = DomainGradientTracker(model, M)
    with tracker.domains(torch.tensor([0, 1])):
        with pytest.raises(RuntimeError, match="nest"):
            with tracker.domains(torch.tensor([0, 1])):
                pass


def test_gradscaler_loop_matches_unscaled_run_and_skips_overflow():
    g = torch.Generator().manual_seed(12)
    model = MLP()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    tracker = DomainGradientTracker(model, M, skip_nonfinite="micro-batch")
    tracker_ref = DomainGradientTracker(ref, M)
    for step in range(4):
        x = torch.randn(4, 3, 6, generator=g)
        ids = make_ids("with-ignored", 4, 3, g)
        overflow = step == 2
        with pytest.warns(RuntimeWarning) if overflow else contextlib.nullcontext():
            with tracker.domains(ids, grad_scale=scaler):  # scale changes every step
                loss = token_losses(model, x).sum()
                scaler.scale(loss * float("inf") if overflow else loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if not overflow:
            with tracker_ref.domains(ids):
                token_losses(ref, x).sum().backward()
            opt_ref.step()
            opt_ref.zero_grad()
    assert tracker.nonfinite_skips == 1
    assert torch.equal(tracker.counts(), tracker_ref.counts())
    assert_close(tracker.domain_grads(), tracker_ref.domain_grads(), torch.float32, "scaled")


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_triton_backend_through_the_tracker(mode):
    pytest.importorskip("triton", reason="Triton is not installed")
    status = rnb_kernels.backends()["triton"]
    if not status.available:
        pytest.skip(status.reason)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(13)
    model = MLP().to(dev)
    untracked, ref_model = copy.deepcopy(model), copy.deepcopy(model).cpu()
    tracker = DomainGradientTracker(model, M, mode=mode, sketch_dim=64, backend="triton")
    torch_model = copy.deepcopy(ref_model)
    torch_tracker = DomainGradientTracker(torch_model, M, mode=mode, sketch_dim=64)
    x = torch.randn(4, 5, 6, generator=g)
    ids = make_ids("with-ignored", 4, 5, g)
    with tracker.domains(ids):
        token_losses(model, x.to(dev)).sum().backward()
    with torch_tracker.domains(ids):
        token_losses(torch_model, x).sum().backward()
    token_losses(untracked, x.to(dev)).sum().backward()
    for p, q in zip(model.parameters(), untracked.parameters()):
        assert_close(p.grad.cpu(), q.grad.cpu().double(), torch.float32, "param.grad")
    assert_close(tracker.gram().cpu(), torch_tracker.gram(), torch.float32, "gram")
    if mode == "exact":
        expected = brute_force(ref_model, ["head"], [x], [ids])
        assert_close(tracker.domain_grads().cpu(), expected, torch.float32, "triton exact")


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_nonfinite_round_is_reported_and_the_mixer_skips_it(mode):
    """Default skip_nonfinite="round": no check in the backward; the round's statistics read
    reports the fault and R&B/DGA keep their weights."""
    g = torch.Generator().manual_seed(9)
    model = MLP()
    tracker = DomainGradientTracker(model, M, mode=mode, sketch_dim=64)
    x = torch.randn(4, 3, 6, generator=g)
    ids = make_ids("per-sample", 4, 3, g)
    with tracker.domains(ids):
        (token_losses(model, x).sum() * float("inf")).backward()
    assert not bool(torch.isfinite(model.head.weight.grad).all())  # the scaler still sees it
    with pytest.warns(RuntimeWarning, match="non-finite gram"):
        G = tracker.gram()
    assert tracker.nonfinite_rounds == 1
    mixer = rnb_kernels.RnB(num_domains=M, eval_proportions=[1.0] * M)
    before = mixer.weights
    with pytest.warns(RuntimeWarning, match="skipped"):
        after = mixer.update(gram=G, counts=tracker.counts())
    assert torch.equal(before, after) and mixer.skipped_updates == 1
    tracker.reset()
    with tracker.domains(ids):
        token_losses(model, x).sum().backward()
    assert bool(torch.isfinite(tracker.gram()).all())  # the next round is clean


def test_deferred_id_check_masks_bad_ids_and_raises_at_the_round_end():
    g = torch.Generator().manual_seed(2)
    model, ref = MLP(), MLP()
    ref.load_state_dict(model.state_dict())
    tracker = DomainGradientTracker(model, M, id_check="deferred")
    tracker_ref = DomainGradientTracker(ref, M)
    x = torch.randn(4, 3, 6, generator=g)
    bad = torch.tensor([0, M, 2, -5])  # M and -5 are out of range
    with tracker.domains(bad):
        token_losses(model, x).sum().backward()
    with tracker_ref.domains(torch.tensor([0, -1, 2, -1])):
        token_losses(ref, x).sum().backward()
    with pytest.raises(ValueError, match=r"domain_ids: 2 id\(s\) outside \[-1, num_domains=4\)"):
        tracker.counts()
    # Nothing out of range reached the buffers: the bad ids were treated as -1.
    assert torch.equal(tracker.counts(), tracker_ref.counts())
    assert torch.equal(tracker.domain_grads(), tracker_ref.domain_grads())


def test_gram_vector_equals_gram_times_coefficients():
    g = torch.Generator().manual_seed(4)
    model = MLP(h=20, o=9)
    tracker = DomainGradientTracker(model, M, modules=["mid", "head"])
    x = torch.randn(6, 3, 6, generator=g)
    with tracker.domains(make_ids("per-sample", 6, 3, g)):
        token_losses(model, x).sum().backward()
    c = torch.rand(M, generator=g, dtype=torch.float64)
    expect = gram_ref(tracker.domain_grads()) @ c
    got = tracker.gram_vector(c)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12 * float(expect.abs().max()))


# ---------------------------------------------------------------------------- domain ids
IDS_ERRORS = [
    (([0, 1.5], 3), {}, TypeError, r"domain_ids must have an integer dtype, got torch.float32"),
    ((np.array(["a"]), 3), {}, TypeError, r"domain_ids must be an integer tensor, got ndarray"),
    (([object()], 3), {}, TypeError, r"domain_ids must be an integer tensor, got list"),
    (("ab", 3), {}, TypeError, r"domain_ids must be a torch.Tensor, got str"),
    ((torch.tensor([True]), 3), {}, TypeError,
     r"domain_ids must have an integer dtype, got torch.bool"),
    ((torch.tensor([1 + 1j]), 3), {}, TypeError,
     r"domain_ids must have an integer dtype, got torch.complex64"),
    ((torch.tensor([1, 0]), 3), {"mask": True}, TypeError,
     r"domain_ids must be a bool tensor, got torch.int64"),
    ((torch.zeros(1, 1, 1, dtype=torch.long), 3), {}, ValueError,
     r"domain_ids must be \[batch\] or \[batch, seq\], got shape \(1, 1, 1\)"),
    ((torch.zeros(0, dtype=torch.long), 3), {}, ValueError, r"domain_ids is empty"),
    ((torch.zeros(0, dtype=torch.bool), 3), {"mask": True}, ValueError, r"domain_ids is empty"),
    ((torch.tensor([-2, 0]), 3), {}, ValueError,
     r"domain_ids must lie in \[-1, num_domains=3\), found values in \[-2, 0\]"),
    ((torch.tensor([0, 3]), 3), {}, ValueError,
     r"domain_ids must lie in \[-1, num_domains=3\), found values in \[0, 3\]"),
    (([[1, 2, 3]], 2), {"name": "ids"}, ValueError,
     r"ids must lie in \[-1, num_domains=2\), found values in \[1, 3\]"),
    ((torch.tensor([0.5]), 3), {"name": "ids"}, TypeError,
     r"ids must have an integer dtype, got torch.float32"),
]  # fmt: skip


@pytest.mark.parametrize("args, kwargs, exc, message", IDS_ERRORS)
def test_validate_domain_ids_exact_errors(args, kwargs, exc, message):
    with pytest.raises(exc, match=f"^{message}$"):
        validate_domain_ids(*args, **kwargs)


def test_validate_domain_ids_values_masks_and_deferred_check():
    out = validate_domain_ids(torch.tensor([[0, 2], [-1, 1]], dtype=torch.int32), 3)
    assert out.dtype == torch.int64 and out.tolist() == [[0, 2], [-1, 1]]
    # The range ends are inclusive at -1 and exclusive at num_domains.
    assert validate_domain_ids(np.array([-1, 2], dtype=np.int16), 3).tolist() == [-1, 2]
    assert validate_domain_ids((0, 0), 1).tolist() == [0, 0]
    # mask=True: True -> domain 0, False -> -1 (ignored); no range check applies.
    m = validate_domain_ids(torch.tensor([True, False, True]), 1, mask=True)
    assert m.dtype == torch.int64 and m.tolist() == [0, -1, 0]
    # check_values=False defers the range check (the tracker does it at the round's end).
    late = validate_domain_ids(torch.tensor([0, 7]), 3, check_values=False)
    assert late.dtype == torch.int64 and late.tolist() == [0, 7]


def test_per_sample_counts_counts_rows_once_per_domain():
    assert per_sample_counts(torch.tensor([0, 2, -1, 2]), 3).tolist() == [1.0, 0.0, 2.0]
    c = per_sample_counts(torch.tensor([[0, 0, 1], [-1, -1, -1], [2, 1, -1]]), 3)
    assert c.dtype == torch.float64 and c.tolist() == [1.0, 2.0, 1.0]
    assert per_sample_counts(torch.tensor([-1, -1]), 2).tolist() == [0.0, 0.0]


# ------------------------------------------- the backward branch compiled graphs take


def _tracked_run(monkeypatch, compiled: bool, mode: str, bias: bool, per_token: bool, x_dim: int):
    """One tracked micro-batch; with ``compiled`` the Function's backward takes the branch that
    compiled graphs run (``torch.compiler.is_compiling()`` answers True during the backward)."""
    torch.manual_seed(0)
    model = MLP(bias=bias)
    tracker = DomainGradientTracker(model, M, mode=mode, proj_dim=16)
    x = torch.randn(3, 4, 6) if x_dim == 3 else torch.randn(5, 6)
    b = x.shape[0]
    ids = torch.tensor([[0, 3, -1, 3], [2, 2, 1, -1], [1, 0, 0, 2]]) if per_token else None
    if ids is None or x_dim == 2:
        ids = torch.tensor([0, 3, -1, 1, 2][:b])
    with tracker.domains(ids):
        loss = token_losses(model, x) if x_dim == 3 else model(x).square().sum(1)
        with monkeypatch.context() as mp:
            if compiled:
                mp.setattr(torch.compiler, "is_compiling", lambda: True)
            loss.sum().backward()
    stats = tracker.domain_grads() if mode == "exact" else tracker.domain_projections()
    return [p.grad.clone() for p in model.parameters()], stats, tracker.counts()


@pytest.mark.parametrize("mode", ["exact", "projected"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["per-sample-3d", "per-token-3d", "per-sample-2d"])
def test_compiled_backward_branch_matches_eager(monkeypatch, mode, bias, layout):
    """TrackedLinear.backward's compiled-graph branch (no Python state read; the opaque
    ``rnb::tracked_wgrad`` op) gives the eager branch's gradients, statistics and counts."""
    per_token, x_dim = layout.startswith("per-token"), 3 if layout.endswith("3d") else 2
    eager = _tracked_run(monkeypatch, False, mode, bias, per_token, x_dim)
    comp = _tracked_run(monkeypatch, True, mode, bias, per_token, x_dim)
    for g_e, g_c in zip(eager[0], comp[0], strict=True):
        assert torch.equal(g_e, g_c)
    assert torch.equal(eager[1], comp[1]) and eager[1].abs().sum() > 0
    assert torch.equal(eager[2], comp[2]) and eager[2].sum() > 0


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-branch"])
def test_tracked_wgrad_and_rows_follow_the_context(monkeypatch, compiled):
    """The helpers the fused cross-entropy and compiled graphs call: ``tracked_rows`` maps the
    context's (or given) ids onto rows, ``-1`` outside a context; ``tracked_wgrad`` returns
    ``dyᵀx`` of a chunk of rows and adds each domain's share of that chunk only. Both
    branches: the direct call, and the opaque custom ops a compiled graph calls."""
    from rnb_kernels.tracking.linear import tracked_rows, tracked_wgrad

    if compiled:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    model = MLP(bias=False)
    tracker = DomainGradientTracker(model, M, modules=["head"], mode="exact")
    key = tracker._slots[0].key
    like = torch.zeros(1)
    assert torch.equal(tracked_rows(like, key, 6), torch.full((6,), -1))
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(6, 12, generator=g), torch.randn(6, 5, generator=g)
    plain = tracked_wgrad(x, dy, key, 2)
    assert torch.equal(plain, dy.t().mm(x)) and tracker.counts().sum() == 0
    ids = torch.tensor([3, 1])  # per sample: rows 0-2 -> 3, rows 3-5 -> 1
    with tracker.domains(ids):
        assert torch.equal(tracked_rows(like, key, 6), torch.tensor([3, 3, 3, 1, 1, 1]))
        given = torch.tensor([0, 2, 2])
        assert torch.equal(tracked_rows(like, key, 3, given), given)
        # Rows 2..4 of the 6: domains 3, 1, 1.
        dw = tracked_wgrad(x[2:5], dy[2:5], key, 2, lo=2, n=6)
        assert torch.equal(dw, dy[2:5].t().mm(x[2:5]))
        # Given ids instead of the context's: row 5 alone, credited to domain 0.
        tracked_wgrad(x[5:], dy[5:], key, 2, ids=torch.tensor([0]))
    with tracker.domains(torch.tensor([2, 0])):  # rows 0-2 -> 2, rows 3-5 -> 0
        # A chunk at the start of 6 rows (rows 0-1), and one at row 1 (row 1 only).
        tracked_wgrad(x[:2], dy[:2], key, 2, lo=0, n=6)
        tracked_wgrad(x[1:2], dy[1:2], key, 2, lo=1, n=6)
        # Per-token ids given for a chunk of 2 rows (rows 3-4 -> domains 2 and 2).
        tracked_wgrad(x[3:5], dy[3:5], key, 2, ids=torch.tensor([[2, 2]]))
    per = tracker.domain_grads().view(M, 5, 12).double()
    xd, dyd = x.double(), dy.double()
    assert_close(per[3], dyd[2:3].T @ xd[2:3], torch.float32, "domain 3: row 2 only")
    assert_close(per[1], dyd[3:5].T @ xd[3:5], torch.float32, "domain 1: rows 3-4")
    assert_close(per[0], dyd[5:].T @ xd[5:], torch.float32, "domain 0: row 5, given ids")
    rows2 = [0, 1, 1, 3, 4]  # the three calls of the second block
    assert_close(per[2], dyd[rows2].T @ xd[rows2], torch.float32, "domain 2: chunks")


def test_layers_seeing_different_row_counts_get_their_own_rows():
    """Per-sample ids map onto each tracked layer's own rows: a token-level layer sees B·T
    rows, a head after pooling sees B; the context's row cache is per row count."""

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Linear(6, 8)
            self.cls = nn.Linear(8, 3)

        def forward(self, x):
            return self.cls(torch.tanh(self.tok(x)).mean(1))

    torch.manual_seed(0)
    model = Pooled()
    tracker = DomainGradientTracker(model, M, modules=["tok", "cls"], mode="exact")
    x, ids = torch.randn(3, 5, 6), torch.tensor([2, 0, 2])
    with tracker.domains(ids):
        model(x).square().sum().backward()
    per = tracker.domain_grads().double()
    for d in range(M):
        sel = ids == d
        ref = torch.zeros_like(per[d])
        if sel.any():
            model.zero_grad()
            model(x[sel]).square().sum().backward()
            ref = torch.cat(
                [
                    p.grad.reshape(-1)
                    for p in (model.tok.weight, model.tok.bias, model.cls.weight, model.cls.bias)
                ]
            )
        assert_close(per[d], ref, torch.float32, f"domain {d}")


@pytest.mark.parametrize(
    "dtype,bias", [(torch.float64, True), (torch.float32, False)], ids=["float64", "no-bias"]
)
def test_autocast_casts_like_the_untracked_layer(dtype, bias):
    """Under autocast the tracked layer casts exactly as ``nn.Linear`` does: float64 is left
    alone (autocast never casts it), and a bias-free layer (bias None) goes to bf16."""
    torch.manual_seed(0)
    plain = MLP(bias=bias).to(dtype)
    tracked = copy.deepcopy(plain)
    tracker = DomainGradientTracker(tracked, M, mode="exact")
    x = torch.randn(2, 3, 6, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_p = plain(x)
        with tracker.domains(torch.tensor([0, 1])):
            out_t = tracked(x)
            out_t.float().sum().backward()
        out_p.float().sum().backward()
    want = torch.float64 if dtype == torch.float64 else torch.bfloat16
    assert out_t.dtype == want and torch.equal(out_t, out_p)
    for p, q in zip(plain.parameters(), tracked.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("x_dim", [3, 2, 1])
def test_compiled_backward_branch_counts_target_samples(monkeypatch, x_dim):
    """Under ``target()`` without a mask the target count is the batch read off ``x``
    (``x.shape[0]`` for ``[B, T, D]`` and ``[B, D]``, 1 for a single row ``[D]``), on the
    compiled-graph branch as eagerly."""

    def run(compiled):
        torch.manual_seed(0)
        model = MLP()
        tracker = DomainGradientTracker(model, M, mode="exact")
        x = {3: torch.randn(3, 4, 6), 2: torch.randn(5, 6), 1: torch.randn(6)}[x_dim]
        with tracker.target():
            loss = model(x).square().sum()
            with monkeypatch.context() as mp:
                if compiled:
                    mp.setattr(torch.compiler, "is_compiling", lambda: True)
                loss.backward()
        return tracker.target_count(), tracker.target_grad()

    (n_e, g_e), (n_c, g_c) = run(False), run(True)
    assert n_e == n_c == {3: 3.0, 2: 5.0, 1: 1.0}[x_dim]
    assert torch.equal(g_e, g_c) and g_e.abs().sum() > 0


@pytest.mark.parametrize(
    "name,want",
    [
        ("head", "head"),
        ("module.head", "head"),
        ("_orig_mod.head", "head"),
        ("module._orig_mod.module.blocks.0.mlp", "blocks.0.mlp"),
        ("_orig_mod.module", ""),
        ("module", ""),
        ("_orig_mod", ""),
        ("modules.head", "modules.head"),  # a prefix only with its dot
        ("head.module.x", "head.module.x"),  # only leading wrappers go
    ],
)
def test_canonical_name_strips_wrapper_prefixes(name, want):
    from rnb_kernels.tracking.linear import canonical_name

    assert canonical_name(name) == want


def test_rows_of_maps_ids_to_a_layers_rows_on_its_device():
    """Per-sample ids broadcast over each sample's rows, per-token ids flattened, no ids (an
    unmasked target) all 0; on the layer's device (meta here: a CPU run cannot tell a
    dropped device otherwise); a layout the ids do not fit is named."""
    from rnb_kernels.tracking.linear import DOMAIN, Context, rows_of

    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert rows_of(None, 3, cpu).tolist() == [0, 0, 0]
    assert rows_of(None, 3, cpu).dtype == torch.int64
    assert rows_of(torch.tensor([2, -1]), 6, cpu).tolist() == [2, 2, 2, -1, -1, -1]
    assert rows_of(torch.tensor([[1, 2], [3, -1]]), 4, cpu).tolist() == [1, 2, 3, -1]
    for ids in (None, torch.tensor([2, -1]), torch.tensor([[1, 2], [3, -1]])):
        out = rows_of(ids, 4, meta)
        assert out.device == meta and out.shape == (4,)
    ctx = Context(DOMAIN, torch.tensor([0, 1]), 1.0, anchor_only=False)
    assert ctx.rows(4, meta).device == meta and ctx.rows(4, cpu).tolist() == [0, 0, 1, 1]
    msg = (
        r"^domain_ids has 4 samples but the tracked layer saw 6 rows \(not a multiple\); "
        r"pass per-token ids \[batch, seq\] for this layout$"
    )
    with pytest.raises(ValueError, match=msg):
        rows_of(torch.arange(4), 6, cpu)
    msg = r"^domain_ids has shape \(2, 3\) \(6 tokens\) but the tracked layer saw 4 rows$"
    with pytest.raises(ValueError, match=msg):
        rows_of(torch.zeros(2, 3, dtype=torch.int64), 4, cpu)


def test_forward_without_weight_gradient_is_the_plain_layer():
    """Under no_grad, or with a frozen weight, the tracked forward is the module's own
    forward (same output, nothing recorded)."""
    torch.manual_seed(0)
    plain = MLP()
    tracked = copy.deepcopy(plain)
    tracker = DomainGradientTracker(tracked, M, modules=["inp", "mid", "head"], mode="exact")
    x = torch.randn(2, 3, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "forward ran but no backward reached" either
        with torch.no_grad(), tracker.domains(torch.tensor([0, 1])):
            assert torch.equal(tracked(x), plain(x))
    tracked.head.weight.requires_grad_(False)
    plain.head.weight.requires_grad_(False)
    with tracker.domains(torch.tensor([0, 1])):
        out = tracked(x)
        assert torch.equal(out, plain(x))
        out.sum().backward()
    assert tracked.head.weight.grad is None
    assert tracker.counts().sum() == 2  # the other layers were tracked


def test_forward_inside_block_without_backward_warns_not_raises():
    """A tracked forward inside the block whose backward runs after it is reported as
    unreached (a warning naming the layer), not as a bypassed layer (an error)."""
    model = MLP()
    tracker = DomainGradientTracker(model, M, modules=["head"])
    with pytest.warns(RuntimeWarning, match=r"\['head'\] ran their forward inside"):
        with tracker.domains(torch.tensor([0, 1])):
            out = token_losses(model, torch.randn(2, 3, 6)).sum()
    out.backward()
    assert tracker.counts().sum() == 0


def test_per_sample_ids_not_dividing_the_rows_name_both_counts():
    model = MLP()
    tracker = DomainGradientTracker(model, M)
    with pytest.raises(ValueError, match=r"domain_ids has 2 samples but the tracked layer saw 5 "):
        with tracker.domains(torch.tensor([0, 1])):
            model(torch.randn(5, 6)).sum().backward()
    assert tracker.counts().sum() == 0


@pytest.fixture
def one_rank_mesh():
    """A 1-process gloo group and 1-D CPU mesh (the sharded code paths in one process)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available():
        pytest.skip("no torch.distributed")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bias", [False, True])
def test_vocab_parallel_head_on_one_rank_equals_the_plain_head(one_rank_mesh, bias):
    """ColwiseParallel on a 1-rank mesh makes the head's weight a DTensor sharded on its rows:
    the tracker takes its sharded path (local tensors, a DTensor output) and must give the
    plain head's output, gradients and statistics."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.manual_seed(0)
    plain = MLP(bias=bias)
    sharded = copy.deepcopy(plain)
    parallelize_module(
        sharded, one_rank_mesh, {"head": ColwiseParallel(output_layouts=Replicate())}
    )
    t_plain = DomainGradientTracker(plain, M, modules=["head"], mode="exact")
    t_sharded = DomainGradientTracker(sharded, M, modules=["head"], mode="exact")
    x, ids = torch.randn(3, 4, 6), torch.tensor([1, -1, 3])
    outs = []
    for model, tracker in ((plain, t_plain), (sharded, t_sharded)):
        with tracker.domains(ids):
            out = model(x)
            out = out.full_tensor() if hasattr(out, "full_tensor") else out
            out.square().sum().backward()
        outs.append(out.detach())
    assert torch.equal(outs[0], outs[1])
    # Row shards expose no per-domain rows, only their products (summed over the mesh).
    assert_close(t_sharded.gram(), t_plain.gram(), torch.float32, "gram")
    assert t_plain.gram().abs().sum() > 0
    assert torch.equal(t_sharded.counts(), t_plain.counts())
    g = sharded.head.weight.grad
    g = g.full_tensor() if hasattr(g, "full_tensor") else g
    assert_close(g, plain.head.weight.grad.double(), torch.float32, "head.weight.grad")


def _rowwise_head(mesh):
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = MLP(bias=False)
    parallelize_module(model, mesh, {"head": RowwiseParallel()})
    return model


def test_sharded_head_layouts_the_tracker_refuses(one_rank_mesh):
    """Each sharded layout the tracker cannot follow is refused by name at the first forward,
    before any statistic is written: a weight sharded on its input dim (RowwiseParallel), a
    weight whose shape changed after the tracker was built, and a head that became row-sharded
    after statistics were accumulated."""
    import re

    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    x, ids = torch.randn(2, 3, 6), torch.tensor([0, 2])

    model = _rowwise_head(one_rank_mesh)
    tracker = DomainGradientTracker(model, M, modules=["head"], mode="exact")
    want = (
        "head: the tracked weight is a DTensor with placements (Shard(dim=1),) on a 1-D mesh; "
        "only row sharding on a 1-D mesh (Shard(0): ColwiseParallel, a vocabulary-parallel "
        "head) is supported"
    )
    with pytest.raises(NotImplementedError, match="^" + re.escape(want) + "$"):
        with tracker.domains(ids):
            model(x)

    torch.manual_seed(0)
    model = MLP(bias=False)
    tracker = DomainGradientTracker(model, M, modules=["head"], mode="exact")
    model.head.weight = nn.Parameter(
        distribute_tensor(torch.randn(7, 12), one_rank_mesh, [Shard(0)])
    )
    want = "head: the weight's logical shape changed from (5, 12) to (7, 12) after the tracker was built"
    with pytest.raises(ValueError, match="^" + re.escape(want) + "$"):
        with tracker.domains(ids):
            model(x)

    torch.manual_seed(0)
    model = MLP(bias=False)
    tracker = DomainGradientTracker(model, M, modules=["head"], mode="projected", proj_dim=4)
    with tracker.domains(ids):
        model(x).square().sum().backward()
    before = [t.clone() for t in tracker._slots[0].tensors("domain")]
    parallelize_module(model, one_rank_mesh, {"head": ColwiseParallel(output_layouts=Replicate())})
    want = (
        "head: statistics were accumulated before the weight became row-sharded; build the "
        "tracker after parallelize_module"
    )
    with pytest.raises(RuntimeError, match="^" + re.escape(want) + "$"):
        with tracker.domains(ids):
            model(x)
    after = tracker._slots[0].tensors("domain")
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_row_sharded_projected_slot_takes_the_local_layout(one_rank_mesh):
    """A projected head made row-sharded (ColwiseParallel) before any statistic: the slot binds
    the local rows, drops the exact rows (they would need agreement over the shards), and
    records the mesh; its Gram equals the plain head's."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.manual_seed(0)
    plain = MLP(bias=True)
    sharded = copy.deepcopy(plain)
    parallelize_module(
        sharded, one_rank_mesh, {"head": ColwiseParallel(output_layouts=Replicate())}
    )
    kw = dict(modules=["head"], mode="projected", proj_dim=4, exact_rows=2)
    t_plain = DomainGradientTracker(plain, M, **kw)
    t_sharded = DomainGradientTracker(sharded, M, **kw)
    x, ids = torch.randn(2, 3, 6), torch.tensor([0, 2])
    for model, tracker in ((plain, t_plain), (sharded, t_sharded)):
        with tracker.domains(ids):
            out = model(x)
            out = out.full_tensor() if hasattr(out, "full_tensor") else out
            out.square().sum().backward()
    slot = t_sharded._slots[0]
    assert slot.sharded and slot.tp_size == 1 and slot.row_offset == 0
    assert slot.local_rows == 5 and slot.exact_rows == 0 and "e" not in slot.buf["domain"]
    assert tuple(slot.buf["domain"]["p"].shape) == (M, 4, 13)
    assert_close(t_sharded.gram(), t_plain.gram(), torch.float32, "gram")


def test_sharded_tracker_rounds_before_the_first_forward(one_rank_mesh):
    """A tracker over a DTensor head has no buffers until the first forward shows the layout;
    closing a round (reset, with its choice of exact rows) and saving before that must work
    and leave the first forward free to bind the layout."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = MLP(bias=False)
    parallelize_module(model, one_rank_mesh, {"head": ColwiseParallel(output_layouts=Replicate())})
    tracker = DomainGradientTracker(model, M, modules=["head"], mode="projected", proj_dim=4)
    slot = tracker._slots[0]
    assert slot.buf == {} and slot.tensors("domain") == [] and slot.energy is None
    tracker.reset()
    assert slot.heavy is None and slot.buf == {}
    # A read before the first forward sees zero statistics in the full layout.
    assert torch.equal(tracker.gram(), torch.zeros(M, M, dtype=torch.float64))
    assert tuple(slot.buf["domain"]["p"].shape) == (M, 4, 12)
    with tracker.domains(torch.tensor([0, 2])):
        out = model(torch.randn(2, 3, 6))
        out = out.full_tensor() if hasattr(out, "full_tensor") else out
        out.square().sum().backward()
    assert slot.sharded and tracker.gram().abs().sum() > 0


@pytest.mark.parametrize("mode", ["exact", "projected", "sketch"])
def test_statistics_are_float32_whatever_the_default_dtype(mode):
    """Buffers are fp32 by contract (memory formulas, all-reduce sizes), also when a user set
    torch's default dtype to float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        tracker = DomainGradientTracker(MLP(bias=True), M, mode=mode, sketch_dim=16, proj_dim=4)
    finally:
        torch.set_default_dtype(old)
    slot = tracker._slots[0]
    assert {t.dtype for g in ("domain", "target") for t in slot.tensors(g)} == {torch.float32}
    assert slot.energy is None or slot.energy.dtype == torch.float32


def test_non_finite_row_energy_never_makes_a_row_heavy():
    """Rows whose energy is NaN or +inf (a non-finite gradient met with skip_nonfinite off)
    rank below every finite row when the next round's exact rows are chosen."""
    model = MLP(bias=False)
    tracker = DomainGradientTracker(model, M, modules=["head"], mode="projected", proj_dim=4,
                                    exact_rows=2)  # fmt: skip
    slot = tracker._slots[0]
    slot.energy.copy_(torch.tensor([float("nan"), 0.5, float("inf"), 0.2, 0.1]))
    tracker.reset()
    assert slot.heavy.tolist() == [1, 3]
    assert torch.equal(slot.energy, torch.zeros(5))


def test_tracked_rows_outside_a_context_are_ignored_rows():
    """The compiled path's row lookup outside any context: int64 ``-1`` (ignored) rows."""
    from rnb_kernels.tracking.linear import tracked_rows

    model = MLP()
    tracker = DomainGradientTracker(model, M, modules=["head"])
    rows = tracked_rows(torch.zeros(1), tracker._slots[0].key, 4)
    assert rows.dtype == torch.int64 and rows.tolist() == [-1, -1, -1, -1]
    with tracker.domains(torch.tensor([2, 0])):
        rows = tracked_rows(torch.zeros(1), tracker._slots[0].key, 4)
        assert rows.tolist() == [2, 2, 0, 0]
        ids = torch.tensor([[1, 3], [0, -1]])
        assert tracked_rows(torch.zeros(1), tracker._slots[0].key, 4, ids).tolist() == [1, 3, 0, -1]


def test_record_target_under_autocast():
    """record_target() reaches the tracked layers through the anchor on the autocast path too:
    the target row equals the same loss's recorded without autocast, within bf16 tolerance."""

    def target(amp: bool):
        torch.manual_seed(0)
        model = MLP()
        tracker = DomainGradientTracker(model, M, mode="exact")
        x = torch.randn(2, 3, 6)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = token_losses(model, x).float().sum()
        tracker.record_target(loss)
        return tracker.target_grad(), tracker.target_count()

    (g_amp, n_amp), (g, n) = target(True), target(False)
    assert n_amp == n == 2.0 and g.abs().sum() > 0
    assert_close(g_amp, g.double(), torch.bfloat16, "target row under autocast")


def test_tracked_wgrad_sets_the_target_batch():
    """Inside target() without a mask the count is the batch handed to tracked_wgrad (what the
    fused cross-entropy passes)."""
    from rnb_kernels.tracking.linear import tracked_wgrad

    model = MLP(bias=False)
    tracker = DomainGradientTracker(model, M, modules=["head"], mode="exact")
    x, dy = torch.randn(6, 12), torch.randn(6, 5)
    with tracker.target():
        tracked_wgrad(x, dy, tracker._slots[0].key, 3)
    assert tracker.target_count() == 3.0
    assert_close(tracker.target_grad().view(5, 12), dy.double().T @ x.double(), torch.float32)


@pytest.mark.parametrize("mode", ["exact", "projected", "sketch"])
def test_micro_batch_with_one_overflowed_entry_is_skipped(mode):
    """``skip_nonfinite="micro-batch"``: one +inf among finite values (its min is finite, its
    max is not) is enough to skip the micro-batch, leaving the statistics untouched."""
    g = torch.Generator().manual_seed(3)
    model = MLP()
    tracker = DomainGradientTracker(
        model, M, mode=mode, sketch_dim=64, proj_dim=8, skip_nonfinite="micro-batch"
    )
    x, ids = torch.randn(4, 3, 6, generator=g), make_ids("per-sample", 4, 3, g)
    with tracker.domains(ids):
        token_losses(model, x).sum().backward()
    state = tracker.state_dict()
    w = torch.ones(5)
    w[2] = float("inf")  # d loss / d out = w: one column +inf, the rest finite
    with pytest.warns(RuntimeWarning, match="non-finite"):
        with tracker.domains(ids):
            (model(x) * w).sum().backward()
    assert tracker.nonfinite_skips == 1
    after = tracker.state_dict()
    assert torch.equal(after["counts"], state["counts"])
    for s0, s1 in zip(state["slots"], after["slots"], strict=True):
        for grp in s0["buffers"]:
            for key in s0["buffers"][grp]:
                assert torch.equal(s0["buffers"][grp][key], s1["buffers"][grp][key])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "mode,extra",
    [("exact", {}), ("projected", {"exact_rows": 0}), ("projected", {"exact_rows": 3}),
     ("sketch", {})],
)  # fmt: skip
def test_memory_bytes_follow_the_formulas(mode, extra, bias):
    """``memory_bytes()`` against docs/distributed.md's per-mode formulas, with H' = K_in + bias:
    exact ``4 (m+1) K_out H'``, projected ``4 (m+1) (p+r) H' + 4 K_out`` (the energy only with
    exact rows r > 0), sketch ``4 (m+1) k``; summed over the tracked layers."""
    model = MLP(bias=bias)
    p, k = 4, 32
    tracker = DomainGradientTracker(
        model, M, modules=["mid", "head"], mode=mode, proj_dim=p, sketch_dim=k, **extra
    )
    with tracker.domains(torch.tensor([0, 1])):
        token_losses(model, torch.randn(2, 3, 6)).sum().backward()
    want = 0
    for k_in, k_out in ((12, 12), (12, 5)):
        h = k_in + bias
        if mode == "exact":
            want += 4 * (M + 1) * k_out * h
        elif mode == "projected":
            r = extra["exact_rows"]
            want += 4 * (M + 1) * (p + r) * h + (4 * k_out if r else 0)
        else:
            want += 4 * (M + 1) * k
    assert tracker.memory_bytes() == want


@pytest.mark.parametrize(
    "modules,n_first", [(["inp", "mid", "head"], 12 * 6 + 12), (["mid", "head"], 12 * 12 + 12)]
)
def test_record_target_reaches_every_tracked_layer(modules, n_first):
    """record_target() on two or three tracked layers: the input gradient is passed down so
    the deeper layers record too; the target row equals a target() block's on the same loss."""

    def row(record: bool):
        torch.manual_seed(0)
        model = MLP()
        tracker = DomainGradientTracker(model, M, modules=modules, mode="exact")
        x = torch.randn(2, 3, 6)
        if record:
            tracker.record_target(token_losses(model, x).sum())
        else:
            with tracker.target():
                token_losses(model, x).sum().backward()
        return tracker.target_grad()

    got, want = row(True), row(False)
    assert want[:n_first].abs().sum() > 0  # the first layer's weights and bias lead the row
    assert torch.equal(got, want)


def test_nonfinite_input_with_finite_output_gradient_is_skipped():
    """An inf in a tracked layer's input whose output gradient stays finite (tanh saturates)
    still makes ``dyᵀx`` non-finite: skip_nonfinite="micro-batch" checks both sides."""
    model = MLP()
    tracker = DomainGradientTracker(model, M, modules=["inp"], skip_nonfinite="micro-batch")
    x = torch.randn(2, 3, 6)
    x[0, 0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        with tracker.domains(torch.tensor([0, 1])):
            token_losses(model, x).sum().backward()
    assert tracker.nonfinite_skips == 1
    assert tracker.counts().sum() == 0 and not tracker.domain_grads().any()


def test_exact_rows_ignore_nonfinite_energy():
    """Rows whose energy is NaN or +inf (an overflowed round) are never chosen as exact rows:
    the heaviest finite ones are."""
    model = MLP()
    tracker = DomainGradientTracker(model, M, modules=["head"], mode="projected", exact_rows=2)
    slot = tracker._slots[0]
    slot.energy.copy_(torch.tensor([1.0, float("nan"), 5.0, float("inf"), 3.0]))
    slot.choose_heavy()
    assert slot.heavy.tolist() == [2, 4]


def test_dp_group_given_as_a_device_mesh(one_rank_mesh):
    """A 1-D DeviceMesh stands for its process group."""
    tracker = DomainGradientTracker(MLP(), M, dp_group=one_rank_mesh)
    assert tracker.dp_group is one_rank_mesh.get_group()
    assert isinstance(tracker.dp_group, torch.distributed.ProcessGroup)
