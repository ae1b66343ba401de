"""A small GPT (decoder-only transformer) for the demo, the benchmarks and the tests.

Pre-LayerNorm blocks, learned positions, tied token embedding / LM head. The LM head is a
plain ``nn.Linear`` and the last ``nn.Linear`` registered in the model, so
:class:`~rnb_kernels.DomainGradientTracker` follows it by default (``modules=None``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig", "per_sample_loss", "per_token_loss"]

# Label value that contributes nothing to any loss (padding, or the first token of a text).
IGNORE_INDEX = -100


@dataclass
class GPTConfig:
    """Size of a :class:`GPT`.

    Attributes:
        vocab_size: number of token ids the model embeds and predicts.
        context: maximum sequence length ``T``.
        n_layer, n_head, n_embd: depth, heads and width (``n_embd % n_head == 0``).
        dropout: dropout on attention weights and residual branches.
        tie_embeddings: share ``lm_head.weight`` with ``tok_emb.weight`` (GPT-2 style).
        bias: biases in Linear layers and LayerNorms (the LM head never has one, as in GPT-2).
    """

    vocab_size: int = 50257
    context: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    dropout: float = 0.0
    tie_embeddings: bool = True
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.fc_out = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Sequences are right-padded, so the causal mask alone keeps real tokens from seeing
        # pads and the fused SDPA path needs no padding mask.
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln2(x)), approximate="tanh")))


class GPT(nn.Module):
    """Decoder-only transformer returning next-token logits.

    Example:
        >>> m = GPT(GPTConfig(vocab_size=100, context=16, n_layer=1, n_head=2, n_embd=32))
        >>> m(torch.randint(0, 100, (3, 16))).shape
        torch.Size([3, 16, 100])
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.context, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([_Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        # Registered last so "the last nn.Linear" (the tracker's default) is the LM head.
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init)
        # GPT-2's scaled init of residual projections keeps activations O(1) with depth.
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "fc_out.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init(mod: nn.Module) -> None:
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, 0.0, 0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Embedding):
            nn.init.normal_(mod.weight, 0.0, 0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once); without position embeddings by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits for every position.

        Args:
            idx: ``int64[B, T]`` token ids, ``T <= config.context``.

        Returns:
            ``float[B, T, vocab_size]`` logits; position ``t`` predicts token ``t + 1``.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be [B, T]; got shape {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.config.context:
            raise ValueError(f"sequence length {T} exceeds context {self.config.context}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


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
