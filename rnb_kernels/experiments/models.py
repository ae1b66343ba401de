"""The models the demo and the benchmarks train: Hugging Face GPT-Neo, built from a config.

No weights are downloaded: :func:`build_model` builds ``transformers.GPTNeoForCausalLM`` from a
``GPTNeoConfig`` made out of a :class:`ModelConfig` and initialises it the way ``transformers``
does (seeded by the caller's ``torch.manual_seed``). :data:`GPT_NEO_125M` is the R&B paper's
architecture (12 layers x 768, 12 heads, alternating global / local attention with a 256-token
window, GPT-2 vocabulary); the CPU presets are the same architecture at a smaller width and
depth over a compact vocabulary (see :class:`~.tokenizer.CompactVocab`).

GPT-Neo's ``lm_head`` is an ``nn.Linear`` tied to the token embedding ``transformer.wte`` and it
is the model's last ``nn.Linear``, so :class:`~rnb_kernels.DomainGradientTracker` follows it by
default (``modules=None``); the tracker sees the head's *use* of the tied weight, the embedding
lookup's gradient flows into the same ``.grad`` untouched.

Per-sample losses are computed here from the model's logits (:func:`per_sample_loss`), not by
the model's own ``labels=`` path, which only returns the batch mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GPT_NEO_125M",
    "IGNORE_INDEX",
    "ModelConfig",
    "build_model",
    "lm_logits",
    "per_sample_loss",
    "per_token_loss",
]

# Label value that contributes nothing to any loss (padding, or the first token of a text).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ModelConfig:
    """Size of a GPT-Neo causal LM.

    Attributes:
        vocab_size: token ids the model embeds and predicts (the experiments use it as the cap
            of the compact vocabulary; the model gets the ids the corpus uses, at most this).
        context: tokens per sequence ``T`` (``max_position_embeddings``).
        n_layer, n_head, n_embd: depth, heads and width (``n_embd % n_head == 0``). Layers
            alternate global and local attention, as in GPT-Neo-125M; an odd ``n_layer``
            ends on a global layer.
        window_size: local attention window (256 in GPT-Neo-125M; irrelevant when
            ``context <= window_size``).
        dropout: embedding, attention and residual dropout (0 in these short runs).
    """

    vocab_size: int = 50257
    context: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    window_size: int = 256
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "n_layer", "n_head", "n_embd", "window_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")

    def attention_types(self) -> list:
        """GPT-Neo's ``attention_types``: ``[["global", "local"], n]`` pairs, plus one
        ``[["global"], 1]`` when ``n_layer`` is odd."""
        types: list = []
        if self.n_layer // 2:
            types.append([["global", "local"], self.n_layer // 2])
        if self.n_layer % 2:
            types.append([["global"], 1])
        return types

    def hf_config(self):
        """The ``transformers.GPTNeoConfig`` of this size (eager attention: GPT-Neo has no
        SDPA path in ``transformers``)."""
        from transformers import GPTNeoConfig

        cfg = GPTNeoConfig(
            vocab_size=self.vocab_size,
            max_position_embeddings=self.context,
            hidden_size=self.n_embd,
            num_layers=self.n_layer,
            num_heads=self.n_head,
            attention_types=self.attention_types(),
            window_size=self.window_size,
            embed_dropout=self.dropout,
            attention_dropout=self.dropout,
            resid_dropout=self.dropout,
            # Token 0 is EOS in the compact vocabulary (and ids only matter for generation).
            bos_token_id=0 if self.vocab_size < 50257 else 50256,
            eos_token_id=0 if self.vocab_size < 50257 else 50256,
            tie_word_embeddings=True,
            use_cache=False,
        )
        cfg._attn_implementation = "eager"
        return cfg

    def to_dict(self) -> dict:
        return {"arch": "gpt-neo", **asdict(self)}


# The R&B paper's model (GPT-Neo-125M's architecture; trained from scratch here, as there).
GPT_NEO_125M = ModelConfig(vocab_size=50257, context=512, n_layer=12, n_head=12, n_embd=768)


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised ``GPTNeoForCausalLM`` of size ``cfg`` (no download).

    Seed with ``torch.manual_seed`` before calling for a reproducible init.

    Example:
        >>> m = build_model(ModelConfig(vocab_size=100, context=16, n_layer=1, n_head=2,
        ...                             n_embd=32))
        >>> lm_logits(m, torch.randint(0, 100, (3, 16))).shape
        torch.Size([3, 16, 100])
        >>> m.lm_head.weight is m.transformer.wte.weight
        True
    """
    try:
        from transformers import GPTNeoForCausalLM
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the experiments train transformers' GPT-Neo: pip install 'rnb_kernels[demo]'"
        ) from exc
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no "initialising from scratch" chatter per run
    try:
        model = GPTNeoForCausalLM(cfg.hf_config())
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def lm_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``float[B, T, V]`` next-token logits of a causal LM (a ``transformers`` model, whose
    output carries ``.logits``, or any module returning the logits tensor).

    Sequences are right-padded and the attention is causal, so real tokens never attend to
    padding and no attention mask is needed.
    """
    out = model(input_ids=input_ids) if hasattr(model, "config") else model(input_ids)
    return out.logits if hasattr(out, "logits") else out


def per_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position, 0 where ``labels == -100``.

    Args:
        logits: ``float[B, T, V]``.
        labels: ``int64[B, T]``, already shifted (``labels[:, t]`` is the target of
            ``logits[:, t]``); ``-100`` marks positions that carry no loss.

    Returns:
        ``float32[B, T]``.
    """
    B, T, V = logits.shape
    return F.cross_entropy(
        logits.reshape(B * T, V).float(),
        labels.reshape(B * T),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(B, T)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of each sequence (what per-domain losses average).

    Args:
        logits: ``float[B, T, V]``.
        labels: ``int64[B, T]`` shifted targets, ``-100`` = ignored.

    Returns:
        ``float32[B]``; a sequence with no target tokens gets 0.
    """
    tok = per_token_loss(logits, labels)
    n = (labels != IGNORE_INDEX).sum(1).clamp_min(1)
    return tok.sum(1) / n
