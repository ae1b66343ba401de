"""Chunked fused linear cross-entropy against float64 ground truth, its per-domain statistics
against the tracker on the unfused head, and the tracker's loud failure when a fused loss
bypasses the tracked head's forward (a stand-in with Liger's access pattern, and Liger itself
when it is installed)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

# Without a GPU the Triton kernels (ours and Liger's) run in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn.functional as F  # noqa: E402
from _tol import assert_close  # noqa: E402
from torch import nn  # noqa: E402

import rnb_kernels  # noqa: E402
from rnb_kernels.balancer import Balancer  # noqa: E402
from rnb_kernels.integrations import fused_ce  # noqa: E402
from rnb_kernels.integrations.fused_ce import (  # noqa: E402
    FusedLinearCrossEntropyLoss,
    default_chunk_size,
    fused_linear_cross_entropy,
)
from rnb_kernels.mixing import RnB  # noqa: E402
from rnb_kernels.ops.cross_entropy import (  # noqa: E402
    cross_entropy_rows,
    cross_entropy_rows_grad_,
)
from rnb_kernels.tracking import DomainGradientTracker  # noqa: E402

M, V, H = 3, 37, 8
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return rnb_kernels.backends()["triton"].available


BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not _triton_ok(), reason="no Triton")),
]


def _inputs(n=11, dtype=torch.float32, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / 2).to(dtype)
    b = torch.randn(V, generator=g).to(dtype)
    t = torch.randint(0, V, (n,), generator=g)
    if ignore:
        t[torch.rand(n, generator=g) < 0.25] = -100
    return h, w, b, t


def _reference(h, w, b, t, reduction, grad_out):
    """float64 F.cross_entropy(F.linear(...)) and its gradients."""
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    loss = F.cross_entropy(F.linear(h64, w64, b64), t, reduction=reduction)
    loss.backward(grad_out.double())
    return loss.detach(), h64.grad, w64.grad, None if b64 is None else b64.grad


def _fused(h, w, b, t, reduction, grad_out, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, t, reduction=reduction, bias=b, **kw)
    loss.backward(grad_out.to(loss.dtype))
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


# --------------------------------------------------------------------------- per-chunk ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cross_entropy_rows_and_grad_match_float64(backend, dtype):
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(9, 150, generator=g) * 4).to(dtype)  # V not a multiple of any block
    t = torch.tensor([0, 149, -100, 3, 77, 64, 63, -100, 128])
    scale = torch.rand(9, generator=g)
    loss, lse = cross_entropy_rows(z, t, backend=backend)
    z64 = z.double().requires_grad_()
    ref = F.cross_entropy(z64, t, reduction="none")
    (ref * scale.double()).sum().backward()
    assert loss.dtype == lse.dtype == torch.float32
    assert_close(loss, ref.detach(), torch.float32, "loss")
    assert_close(lse, torch.logsumexp(z.double(), 1), torch.float32, "lse")
    out = z.clone()
    got = cross_entropy_rows_grad_(out, t, lse, scale, backend=backend)
    assert got is out and out.dtype == dtype
    assert_close(out, z64.grad, dtype, "dlogits")
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # ignored row: exactly zero


def test_cross_entropy_ops_reject_bad_arguments():
    z, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="targets"):
        cross_entropy_rows(z, t[:2])
    with pytest.raises(TypeError, match="targets"):
        cross_entropy_rows(z, t.float())
    with pytest.raises(TypeError, match="scale"):
        cross_entropy_rows_grad_(z, t, torch.zeros(3), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous rows"):
        cross_entropy_rows_grad_(torch.randn(5, 3).T, t, torch.zeros(3), torch.ones(3))


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [1, 4, 64], ids=["chunk1", "chunk4", "chunk-all"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_loss_and_grads_match_float64_fp32(reduction, chunk, bias, backend):
    h, w, b, t = _inputs()
    b = b if bias else None
    g_out = torch.tensor(0.7) if reduction != "none" else torch.rand(len(t))
    ref = _reference(h, w, b, t, reduction, g_out)
    got = _fused(h, w, b, t, reduction, g_out, chunk_size=chunk, backend=backend)
    for name, x, r in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, ref):
        if r is None:
            assert x is None
            continue
        assert x.dtype == torch.float32
        # fp32 to 1e-5 relative to the reference's scale (tests/_tol.py).
        assert_close(x, r, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_loss_and_grads_16bit_within_documented_tolerance(dtype):
    """16-bit inputs: logits rounded like F.linear's, softmax and sums in fp32. Compared with
    float64 on the same rounded inputs, within the dtype's tolerance (tests/_tol.py)."""
    h, w, b, t = _inputs(n=40, dtype=dtype)
    g_out = torch.tensor(1.0)
    ref = _reference(h, w, None, t, "mean", g_out)
    got = _fused(h, w, None, t, "mean", g_out, chunk_size=16)
    for name, x, r in zip(("loss", "grad_hidden", "grad_weight"), got, ref):
        assert x.dtype == dtype
        assert_close(x, r, dtype, name)
    # ... and no worse than the unfused computation in the same dtype.
    unfused = _reference_in_dtype(h, w, t)
    for name, x, u, r in zip(("loss", "grad_hidden", "grad_weight"), got, unfused, ref):
        err_f = float((x.double() - r).abs().max())
        err_u = float((u.double() - r).abs().max())
        assert err_f <= 2 * err_u + 1e-6, f"{name}: fused {err_f:.2e} vs unfused {err_u:.2e}"


def _reference_in_dtype(h, w, t):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = F.cross_entropy(F.linear(h, w), t)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def test_batched_shape_and_module_form():
    h, w, _, t = _inputs(n=12)
    h3, t3 = h.view(3, 4, H), t.view(3, 4)
    per = fused_linear_cross_entropy(h3, w, t3, reduction="none", chunk_size=5)
    assert per.shape == (3, 4)
    ref = F.cross_entropy(F.linear(h.double(), w.double()), t, reduction="none").view(3, 4)
    assert_close(per, ref, torch.float32, "per-token")
    mod = FusedLinearCrossEntropyLoss(chunk_size=5)
    assert_close(
        mod(h3, w, t3), F.cross_entropy(F.linear(h.double(), w.double()), t), torch.float32
    )


def test_all_rows_ignored_gives_nan_like_f_cross_entropy():
    h, w, _, t = _inputs(n=4, ignore=False)
    t[:] = -100
    assert torch.isnan(fused_linear_cross_entropy(h, w, t))
    assert torch.isnan(F.cross_entropy(F.linear(h, w), t))


def test_never_materialises_more_than_one_chunk_of_logits(monkeypatch):
    seen = []
    real = fused_ce._logits

    def spy(h, w, b):
        z = real(h, w, b)
        seen.append(tuple(z.shape))
        return z

    monkeypatch.setattr(fused_ce, "_logits", spy)
    h, w, _, t = _inputs(n=50)
    h.requires_grad_()
    fused_linear_cross_entropy(h, w, t, chunk_size=8).backward()
    assert seen and max(s[0] for s in seen) <= 8 and all(s[1] == V for s in seen)
    assert len(seen) == 2 * 7  # 7 chunks, forward and backward


def test_default_chunk_size_keeps_logits_near_hidden_size():
    assert default_chunk_size(100_000, 50257, 768) == 2048  # Liger's rule: ~N·H floats
    assert default_chunk_size(8192, 50257, 768) == 256  # the floor
    assert default_chunk_size(3, 10, 100) == 3  # never more than N
    assert default_chunk_size(1, 10**6, 1) == 1


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": 2.0}, TypeError, "chunk_size"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index"),
        ({"domain_ids": torch.zeros(11, dtype=torch.long)}, ValueError, "tracker"),
        ({"tracker": object()}, TypeError, "tracker"),
    ],
)
def test_bad_arguments_are_named(kwargs, exc, word):
    h, w, _, t = _inputs()
    with pytest.raises(exc, match=word):
        fused_linear_cross_entropy(h, w, t, **kwargs)


def test_bad_tensors_are_named():
    h, w, _, t = _inputs()
    with pytest.raises(ValueError, match="targets"):
        fused_linear_cross_entropy(h, w, t[:-1])
    with pytest.raises(ValueError, match="targets must lie"):
        fused_linear_cross_entropy(h, w, torch.full_like(t, V))
    with pytest.raises(ValueError, match="hidden has 8 features"):
        fused_linear_cross_entropy(h, w[:, :-1], t)
    with pytest.raises(TypeError, match="share a dtype"):
        fused_linear_cross_entropy(h, w.double(), t)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_cross_entropy(h, w, t, bias=torch.zeros(V + 1))


# --------------------------------------------------------------------------- statistics


class LM(nn.Module):
    """Embedding -> block -> lm_head; ``fused`` computes the loss with the fused CE."""

    def __init__(self, tied: bool = False, bias: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(V, H)
        self.block = nn.Linear(H, H)
        self.lm_head = nn.Linear(H, V, bias=bias)
        if tied:
            self.lm_head.weight = self.wte.weight

    def hidden(self, tokens):
        return torch.tanh(self.block(self.wte(tokens)))

    def forward(self, tokens, targets):
        logits = self.lm_head(self.hidden(tokens))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def _tokens(seed=3, b=4, t=6):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, V, (b, t), generator=g)
    tgt = torch.randint(0, V, (b, t), generator=g)
    tgt[torch.rand(b, t, generator=g) < 0.2] = -100
    ids = torch.randint(-1, M, (b, t), generator=g)
    return tok, tgt, ids


@pytest.mark.parametrize("mode", ["exact", "sketch", "projected"])
@pytest.mark.parametrize(
    "tied,bias", [(False, False), (True, False), (False, True)], ids=["untied", "tied", "bias"]
)
def test_statistics_equal_the_tracker_on_the_unfused_head(mode, tied, bias):
    unfused, fused = LM(tied, bias), LM(tied, bias)
    tr_u = DomainGradientTracker(
        unfused, M, modules="lm_head", mode=mode, sketch_dim=64, proj_dim=8
    )
    tr_f = DomainGradientTracker(fused, M, modules="lm_head", mode=mode, sketch_dim=64, proj_dim=8)
    for seed in (3, 4):  # two micro-batches
        tok, tgt, ids = _tokens(seed)
        with tr_u.domains(ids):
            unfused(tok, tgt).backward()
        with tr_f.domains(ids):
            h = fused.hidden(tok)
            tr_f.fused_cross_entropy(h, tgt, reduction="sum", chunk_size=5).backward()
    assert torch.equal(tr_f.counts(), tr_u.counts())
    assert_close(tr_f.gram(), tr_u.gram(), torch.float32, "gram")
    state = {
        "exact": "domain_grads",
        "sketch": "domain_sketches",
        "projected": "domain_projections",
    }
    got, ref = (getattr(t, state[mode])() for t in (tr_f, tr_u))
    assert_close(got, ref.double(), torch.float32, f"{mode} state")
    for p, q in zip(fused.parameters(), unfused.parameters()):
        assert_close(p.grad, q.grad.double(), torch.float32, "param.grad")


def test_exact_statistics_equal_float64_per_domain_gradients():
    model = LM()
    tr = DomainGradientTracker(model, M, modules="lm_head")
    tok, tgt, ids = _tokens()
    with tr.domains(ids):
        tr.fused_cross_entropy(model.hidden(tok), tgt, chunk_size=7).backward()
    h = model.hidden(tok).detach().double().reshape(-1, H)
    w = model.lm_head.weight.detach().double()
    z = h @ w.T
    valid = tgt.flatten() != -100
    n_valid = valid.sum()
    dz = (torch.softmax(z, 1) - F.one_hot(tgt.flatten().clamp(min=0), V)) * valid[:, None] / n_valid
    expected = torch.stack([(dz * (ids.flatten() == d)[:, None]).T @ h for d in range(M)])
    assert_close(tr.domain_grads().view(M, V, H), expected, torch.float32, "per-domain dW")


def test_explicit_domain_ids_override_the_context_mapping():
    """Shifted next-token rows: the context holds [B, T] ids, the loss sees [B, T-1] rows."""
    model = LM()
    tr = DomainGradientTracker(model, M, modules="lm_head")
    tok, tgt, ids = _tokens()
    with tr.domains(ids):
        h = model.hidden(tok)[:, :-1]
        tr.fused_cross_entropy(h, tgt[:, 1:], domain_ids=ids[:, 1:], chunk_size=4).backward()
    ref_model = LM()
    tr_ref = DomainGradientTracker(ref_model, M, modules="lm_head")
    with tr_ref.domains(ids[:, 1:]):
        logits = ref_model.lm_head(ref_model.hidden(tok)[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten()).backward()
    assert_close(tr.domain_grads(), tr_ref.domain_grads().double(), torch.float32, "shifted")


@pytest.mark.parametrize("mode", ["exact", "sketch", "projected"])
def test_record_target_through_the_fused_loss(mode):
    unfused, fused = LM(), LM()
    tr_u = DomainGradientTracker(
        unfused, M, modules="lm_head", mode=mode, sketch_dim=64, proj_dim=8
    )
    tr_f = DomainGradientTracker(fused, M, modules="lm_head", mode=mode, sketch_dim=64, proj_dim=8)
    tok, tgt, ids = _tokens()
    with tr_u.domains(ids):
        unfused(tok, tgt).backward()
    with tr_f.domains(ids):
        tr_f.fused_cross_entropy(fused.hidden(tok), tgt, reduction="sum").backward()
    tok2, tgt2, _ = _tokens(seed=9)
    tr_u.record_target(unfused(tok2, tgt2))
    tr_f.record_target(tr_f.fused_cross_entropy(fused.hidden(tok2), tgt2, reduction="sum"))
    assert_close(tr_f.target_alignment(), tr_u.target_alignment(), torch.float32, "alignment")


def test_fused_loss_outside_a_context_is_plain():
    model = LM()
    tr = DomainGradientTracker(model, M, modules="lm_head")
    tok, tgt, _ = _tokens()
    tr.fused_cross_entropy(model.hidden(tok), tgt).backward()
    assert float(tr.gram().abs().sum()) == 0.0 and model.lm_head.weight.grad is not None


def test_fused_loss_rejects_an_untracked_weight():
    model = LM()
    tr = DomainGradientTracker(model, M, modules="block")
    tok, tgt, _ = _tokens()
    with pytest.raises(ValueError, match="weight is not the weight of a layer this tracker"):
        fused_linear_cross_entropy(model.hidden(tok), model.lm_head.weight, tgt, tracker=tr)


# --------------------------------------------------------------------------- bypass


class _StandInFusedCE(torch.autograd.Function):
    """Liger's access pattern: reads the head's weight directly, computes every gradient in
    the forward (chunk by chunk) and only scales them in the backward."""

    @staticmethod
    def forward(ctx, h, w, t):
        z = h @ w.T
        loss = F.cross_entropy(z, t)
        dz = (torch.softmax(z, 1) - F.one_hot(t, w.shape[0])) / len(t)
        ctx.save_for_backward(dz @ w, dz.T @ h)
        return loss

    @staticmethod
    def backward(ctx, g):
        gh, gw = ctx.saved_tensors
        return g * gh, g * gw, None


class BypassLM(LM):
    def forward(self, tokens, targets):
        h = self.hidden(tokens).flatten(0, 1)
        return _StandInFusedCE.apply(h, self.lm_head.weight, targets.flatten().clamp(min=0))


def _balancer_round(model, tracker=None):
    bal = Balancer(model, RnB(M, eval_proportions=[0.4, 0.3, 0.3], update_every=1), tracker=tracker)
    tok, tgt, ids = _tokens()
    with bal.step(ids[:, 0].clamp(min=0)):
        model(tok, tgt).backward()
    return bal


def test_balancer_raises_when_a_fused_loss_bypasses_the_head():
    with pytest.raises(RuntimeError) as err:
        _balancer_round(BypassLM())
    msg = str(err.value)
    assert "lm_head" in msg and "Liger" in msg and "fused_linear_cross_entropy" in msg


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_bypass_warns_and_is_counted_when_asked(tied):
    model = BypassLM(tied=tied)
    with pytest.warns(RuntimeWarning, match="lm_head.forward was never called"):
        bal = _balancer_round(model, tracker={"on_untracked": "warn"})
    assert bal.tracker.untracked_micro_batches == 1


def test_bypass_outside_the_models_forward_is_caught_by_the_weight_gradient():
    """The user calls the body and a fused loss directly: the tracked model's forward never
    runs; the head's weight still receives a gradient inside the block."""
    model = LM()
    tr = DomainGradientTracker(model, M, modules="lm_head")
    tok, tgt, ids = _tokens()
    with pytest.raises(RuntimeError, match="lm_head"):
        with tr.domains(ids):
            h = model.hidden(tok).flatten(0, 1)
            _StandInFusedCE.apply(h, model.lm_head.weight, tgt.flatten().clamp(min=0)).backward()


def test_the_packaged_fused_loss_satisfies_the_check_through_the_balancer():
    class FusedLM(LM):
        tracker = None

        def forward(self, tokens, targets):
            return self.tracker.fused_cross_entropy(self.hidden(tokens), targets)

    model = FusedLM()
    bal = Balancer(model, RnB(M, eval_proportions=[0.4, 0.3, 0.3], update_every=1))
    model.tracker = bal.tracker
    tok, tgt, ids = _tokens()
    with bal.step(ids):
        model(tok, tgt).backward()
    assert float(bal.tracker.gram().abs().sum()) > 0
    bal.after_step()


def test_forward_inside_backward_outside_warns():
    model = LM()
    tr = DomainGradientTracker(model, M, modules="lm_head")
    tok, tgt, ids = _tokens()
    with pytest.warns(RuntimeWarning, match="no backward reached them"):
        with tr.domains(ids):
            loss = model(tok, tgt)
    loss.backward()


def test_untracked_forward_and_backward_outside_is_silent_and_valid_usage_unchanged(recwarn):
    model = LM()
    tr = DomainGradientTracker(model, M, modules="lm_head")
    tok, tgt, ids = _tokens()
    loss = model(tok, tgt)  # forward outside, backward inside: supported
    with tr.domains(ids):
        loss.backward()
    assert float(tr.gram().abs().sum()) > 0
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_on_untracked_and_dp_group_are_validated():
    with pytest.raises(ValueError, match="on_untracked"):
        DomainGradientTracker(LM(), M, on_untracked="maybe")
    with pytest.raises(TypeError, match="dp_group"):
        DomainGradientTracker(LM(), M, dp_group="dp")


def test_liger_fused_linear_cross_entropy_is_caught():
    """Liger-Kernel's own fused loss (its Triton kernels run in the interpreter on the CPU)."""
    liger = pytest.importorskip("liger_kernel.transformers", reason="liger-kernel not installed")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Liger's kernels need a GPU or TRITON_INTERPRET=1")
    loss_fn = liger.LigerFusedLinearCrossEntropyLoss()

    class LigerLM(LM):
        def forward(self, tokens, targets):
            h = self.hidden(tokens).flatten(0, 1)
            return loss_fn(self.lm_head.weight, h, targets.flatten())

    model = LigerLM()
    ref = copy.deepcopy(model)
    tok, tgt, _ = _tokens()
    # Same loss as the unfused head: the model is sound, only the tracker would miss it.
    assert_close(
        model(tok, tgt), LM.forward(ref, tok, tgt).double() / (tgt != -100).sum(), torch.float32
    )
    with pytest.raises(RuntimeError, match="Liger"):
        _balancer_round(model)


def test_tracked_backward_walks_rows_in_domain_order(monkeypatch):
    """Each chunk's statistics update then spans about one domain: (chunk, domain) pairs stay
    near chunks + m instead of chunks x m."""
    calls = []
    real = fused_ce.tracked_wgrad

    def spy(x, dy, key, batch, lo=0, n=-1, ids=None):
        calls.append(ids.clone())
        return real(x, dy, key, batch, lo, n, ids)

    monkeypatch.setattr(fused_ce, "tracked_wgrad", spy)
    model = LM()
    tr = DomainGradientTracker(model, M, modules="lm_head")
    g = torch.Generator().manual_seed(5)
    tok = torch.randint(0, V, (8, 12), generator=g)
    ids = torch.randint(0, M, (8, 12), generator=g)  # shuffled domains
    with tr.domains(ids):
        tr.fused_cross_entropy(model.hidden(tok), tok, chunk_size=8).backward()
    assert len(calls) == 12
    assert torch.equal(torch.cat(calls), ids.flatten().sort().values)
    pairs = sum(len(c.unique()) for c in calls)
    assert pairs <= len(calls) + M - 1
