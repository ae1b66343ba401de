"""One configuration for every experiment: corpus, model, training, methods, seeds.

:class:`ExperimentConfig` composes :class:`CorpusConfig` (what data, how it is regrouped),
:class:`~rnb_kernels.experiments.models.GPTConfig` (the model) and :class:`TrainConfig`
(optimisation and mixing cadence), plus the methods to compare
(:mod:`~rnb_kernels.experiments.methods`), each mixer's hyper-parameters and the seeds. Each
setting is defined in exactly one of these classes; the demo's presets (:data:`DEMO`,
:data:`QUICK`) and the mixing benchmark's (:data:`BENCH_PRESETS`) are instances.

Example:
    >>> cfg = QUICK.replace(methods=("stratified", "rnb-regrouped"), steps=20)
    >>> cfg.train.steps, cfg.corpus.name, cfg.model.n_layer
    (20, 'fortunes', 1)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .models import GPTConfig

__all__ = [
    "BENCH_METHODS",
    "BENCH_PRESETS",
    "DEFAULT_HPARAMS",
    "DEMO",
    "DEMO_METHODS",
    "QUICK",
    "CorpusConfig",
    "ExperimentConfig",
    "TrainConfig",
]


@dataclass(frozen=True)
class CorpusConfig:
    """Which corpus, how much of it, and how it is regrouped.

    Attributes:
        name: ``"ni"`` (Natural Instructions v1) or ``"fortunes"`` (Debian fortunes).
        max_per_task: NI examples kept per subtask (ignored for fortunes).
        max_examples: cap on the corpus after loading (seeded subsample).
        eval_fraction: share of every domain held out for evaluation.
        eval_cap: at most this many eval texts (seeded subsample).
        embedder: regroup embedder, ``"tfidf"`` or ``"minilm"`` (falls back to tfidf when
            MiniLM is not installed).
        k_range: ``(lo, hi)`` candidate cluster counts for the silhouette choice of ``k``.
    """

    name: str = "ni"
    max_per_task: int = 120
    max_examples: int = 8000
    eval_fraction: float = 0.1
    eval_cap: int = 1500
    # TF-IDF+SVD: MiniLM embeds ~15 texts/s on a 2-core CPU, minutes for this corpus alone;
    # `--embedder minilm` uses it when the budget allows.
    embedder: str = "tfidf"
    k_range: tuple[int, int] = (8, 64)

    def __post_init__(self) -> None:
        if self.name not in ("ni", "fortunes"):
            raise ValueError(f"corpus name must be 'ni' or 'fortunes'; got {self.name!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and mixing cadence shared by every method of a comparison.

    Attributes:
        steps: optimizer steps (token budget = ``steps * batch_size * context``).
        batch_size: sequences per step.
        lr, min_lr_frac, weight_decay, grad_clip: AdamW, linear warmup then cosine decay to
            ``lr * min_lr_frac``.
        warmup: warmup steps; ``None`` = ``max(1, steps // 15)``, so it follows ``steps``.
        eval_every: steps between evaluations (also evaluated at step 0 and at the end).
        update_every: ``K``, optimizer steps per mixture round.
        extra_batch: samples per domain in the extra passes of the ``"extra"`` gradient
            source (paper-style DGA).
        tracker_mode, backend: how per-domain gradients are tracked when a mixer needs them.
        device: where the model and batches live (data stays on the CPU until batched).
    """

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    update_every: int = 10
    extra_batch: int = 4
    tracker_mode: str = "exact"
    backend: str = "auto"
    device: str = "cpu"

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 15)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        warmup = self.warmup_steps
        if step < warmup:
            return self.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, self.steps - warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * cos)


# The demo's comparison, and every method the mixing benchmark runs by default.
DEMO_METHODS = ("stratified", "dga", "rnb-original", "rnb-regrouped")
BENCH_METHODS = (
    "stratified", "static", "odm", "dga-extra", "dga", "rnb-original", "rnb-regrouped",
)  # fmt: skip

# Mixer hyper-parameters by registered mixer name; a mixer not listed gets its defaults.
# ODM's bandit observes every batch (as in the ODM paper), whatever the round length.
DEFAULT_HPARAMS: dict[str, dict[str, Any]] = {
    "rnb": {"lam": 2.0},
    "dga": {"step_size": 1.0, "ema": 0.5},
    "odm": {"update_every": 1},
}


def _default_hparams() -> dict[str, dict[str, Any]]:
    return {k: dict(v) for k, v in DEFAULT_HPARAMS.items()}


_SECTIONS = {"corpus": CorpusConfig, "model": GPTConfig, "train": TrainConfig}


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole comparison: data, model, training, which methods, which seeds.

    Attributes:
        corpus: :class:`CorpusConfig`.
        model: :class:`~rnb_kernels.experiments.models.GPTConfig`; ``vocab_size`` is the cap
            of the compact vocabulary (the model gets the ids the corpus uses, at most this).
        train: :class:`TrainConfig`.
        methods: method names (:func:`~rnb_kernels.experiments.methods.get_method`): a named
            run such as ``"rnb-regrouped"`` or ``"dga-extra"``, or any registered mixer name.
        hparams: ``{mixer name: {hyper-parameter: value}}`` passed to the mixer's constructor.
        seeds: one run of every method per seed (corpus subsample, split, regrouping, model
            init and sampling all follow the seed).
    """

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: GPTConfig = field(default_factory=lambda: GPTConfig(vocab_size=4096))
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: tuple[str, ...] = DEMO_METHODS
    hparams: Mapping[str, Mapping[str, Any]] = field(default_factory=_default_hparams)
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("methods must name at least one method")
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A copy with fields changed; a field of a section is named directly.

        ``cfg.replace(steps=50, corpus="fortunes", methods=("toy",))`` changes
        ``train.steps``, ``corpus.name`` and ``methods``. ``None`` values are ignored, so
        unset command-line options can be passed straight through.
        """
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for key, value in changes.items():
            if value is None:
                continue
            if key in ("methods", "hparams", "seeds") or (
                key in _SECTIONS and not isinstance(value, str)
            ):
                top[key] = tuple(value) if key in ("methods", "seeds") else value
                continue
            if key == "corpus":  # the corpus by name, the usual override
                key = "name"
            owners = [s for s, cls in _SECTIONS.items() if key in _field_names(cls)]
            if len(owners) != 1:
                raise TypeError(f"ExperimentConfig has no setting {key!r}")
            sections[owners[0]][key] = value
        for name, fields in sections.items():
            if fields:
                top[name] = dataclasses.replace(top.get(name, getattr(self, name)), **fields)
        return dataclasses.replace(self, **top)

    def hparams_for(self, mixer: str) -> dict[str, Any]:
        """Hyper-parameters of mixer ``mixer`` (a fresh dict; empty when none are set)."""
        return dict(self.hparams.get(mixer, {}))

    def tokens_per_run(self) -> int:
        return self.train.steps * self.train.batch_size * self.model.context

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for ``meta.json`` and logs)."""
        return {
            "corpus": asdict(self.corpus),
            "model": asdict(self.model),
            "train": asdict(self.train),
            "methods": list(self.methods),
            "hparams": {k: dict(v) for k, v in self.hparams.items()},
            "seeds": list(self.seeds),
        }


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# The full demo: ~10 minutes on a 2-core CPU on Natural Instructions.
DEMO = ExperimentConfig()

# `rnb demo --quick`: the CI-sized run, about a minute on fortunes.
QUICK = ExperimentConfig(
    corpus=CorpusConfig(name="fortunes", max_examples=1500, k_range=(4, 12), eval_cap=300),
    model=GPTConfig(vocab_size=1024, context=32, n_layer=1, n_head=2, n_embd=32),
    train=TrainConfig(steps=40, batch_size=16, eval_every=20, update_every=5),
)

BENCH_PRESETS: dict[str, ExperimentConfig] = {
    # Minutes on a CPU: what `rnb bench mixing` runs by default.
    "cpu": ExperimentConfig(
        corpus=CorpusConfig(max_per_task=40, max_examples=2500, k_range=(8, 48), eval_cap=500),
        model=GPTConfig(vocab_size=2048, context=32, n_layer=1, n_head=2, n_embd=48),
        train=TrainConfig(steps=120, batch_size=16, eval_every=40, update_every=10),
        methods=BENCH_METHODS,
        seeds=(0, 1, 2),
    ),
    # Seconds: the test suite.
    "tiny": ExperimentConfig(
        corpus=CorpusConfig(max_examples=400, k_range=(3, 6), eval_cap=80),
        model=GPTConfig(vocab_size=256, context=16, n_layer=1, n_head=1, n_embd=16),
        train=TrainConfig(steps=6, batch_size=8, eval_every=3, update_every=3),
        methods=BENCH_METHODS,
        seeds=(0, 1, 2),
    ),
    # GPT-Neo-125M-like (12 x 768, full GPT-2 vocabulary kept by a 50257 compact cap) for a GPU.
    "gpu": ExperimentConfig(
        corpus=CorpusConfig(
            max_per_task=2000, max_examples=120000, embedder="minilm", k_range=(16, 128),
            eval_cap=6000,
        ),
        model=GPTConfig(vocab_size=50257, context=512, n_layer=12, n_head=12, n_embd=768),
        train=TrainConfig(
            steps=3000, batch_size=32, eval_every=250, update_every=50, lr=6e-4, device="cuda"
        ),
        methods=BENCH_METHODS,
        seeds=(0, 1, 2),
    ),
}  # fmt: skip
