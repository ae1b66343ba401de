"""One configuration for every experiment: corpus, model, training, methods, seeds.

:class:`ExperimentConfig` composes :class:`CorpusConfig` (what data, which scenario, how it
is split and regrouped), :class:`~rnb_kernels.experiments.models.ModelConfig` (the GPT-Neo
model) and :class:`TrainConfig`
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

from .models import GPT_NEO_125M, ModelConfig

__all__ = [
    "BENCH_METHODS",
    "BENCH_PRESETS",
    "DEFAULT_HPARAMS",
    "DEMO",
    "DEMO_METHODS",
    "QUICK",
    "DEFAULT_TARGETS",
    "SCENARIOS",
    "CorpusConfig",
    "ExperimentConfig",
    "TrainConfig",
]


SCENARIOS = ("target-shift", "in-distribution")


@dataclass(frozen=True)
class CorpusConfig:
    """Which corpus, how it is split, what the target is, and how it is regrouped.

    Every example of every original domain goes to exactly one of four disjoint sets
    (:func:`~rnb_kernels.experiments.data.prepare`):

    * **test** (``test_fraction`` of every domain): the reported evaluation; never used to
      choose anything;
    * **validation** (``val_fraction``): where hyper-parameters are chosen
      (``rnb bench sweep``);
    * **target sample** (``target_size`` examples): the small sample of the target data a
      mixer may look at (R&B's ``p_eval``, DGA's ``target_fn``, the oracle's weights);
    * **train**: the rest, the pool every method samples from.

    Scenarios:

    * ``"target-shift"`` (the DGA paper's setting): the pool holds every domain; the target
      domains are those whose name contains one of ``target`` (case-insensitive), and the
      validation / test / target sets are drawn from them only.
    * ``"in-distribution"`` (the R&B paper's setting): train and evaluate on the same domains;
      the target sample is drawn from every domain.

    Attributes:
        name: ``"ni"`` (Natural Instructions v1) or ``"fortunes"`` (Debian fortunes).
        scenario: ``"target-shift"`` or ``"in-distribution"``.
        target: name keywords of the target domains (target-shift only); empty = the
            corpus' default family (:data:`DEFAULT_TARGETS`). NI: ``("winogrande",)``, the 7
            Winogrande subtasks (7 of 61), chosen before any run as the NI v1 family whose
            inputs are single fill-in-the-blank sentences rather than passages, i.e. a
            target that differs from most of the pool. Fortunes: the computing family.
        max_per_task: NI examples kept per subtask (ignored for fortunes).
        max_examples: cap on the corpus after loading (seeded subsample).
        val_fraction, test_fraction: share of every domain held out for validation / test.
        eval_cap: at most this many texts in each of validation and test (seeded subsample).
        target_size: examples in the target sample.
        embedder: regroup embedder, ``"tfidf"`` or ``"minilm"`` (falls back to tfidf when
            MiniLM is not installed).
        k_range: ``(lo, hi)`` candidate cluster counts for the silhouette choice of ``k``.
        seed: the data seed: corpus subsample, splits, target sample and regrouping. It is
            fixed across a comparison's training seeds, so every seed is evaluated on the same
            test set and differences between methods are paired on it; the training seeds
            vary the model init, the sampling order and the target batches.
    """

    name: str = "ni"
    scenario: str = "target-shift"
    target: tuple[str, ...] = ()
    max_per_task: int = 300
    max_examples: int = 20000
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    eval_cap: int = 1000
    target_size: int = 256
    # TF-IDF+SVD: MiniLM embeds ~15 texts/s on a 2-core CPU, minutes for this corpus alone;
    # `--embedder minilm` uses it when the budget allows.
    embedder: str = "tfidf"
    # Chosen on the validation split (see DEFAULT_HPARAMS): (8, 32) over (8, 64) and (4, 16).
    k_range: tuple[int, int] = (8, 32)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in ("ni", "fortunes"):
            raise ValueError(f"corpus name must be 'ni' or 'fortunes'; got {self.name!r}")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}; got {self.scenario!r}")
        if isinstance(self.target, str):
            object.__setattr__(self, "target", (self.target,))
        if self.target_size < 1:
            raise ValueError(f"target_size must be >= 1; got {self.target_size}")

    @property
    def target_keywords(self) -> tuple[str, ...]:
        """The keywords that pick the target domains (``target`` or the corpus default)."""
        return tuple(self.target) or DEFAULT_TARGETS[self.name]


# The target family of each corpus (target-shift): NI v1's Winogrande subtasks; the fortunes'
# computing categories (linux, linuxcookie, debian, computers: 4 of 43).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "ni": ("winogrande",),
    "fortunes": ("linux", "debian", "computers"),
}


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
            ``"projected"`` by default: at the demo's size (LM head 2048 x 64, 32-61 domains)
            exact tracking cost R&B 1.18-1.22x stratified's CPU time and projected 0.93-1.04x
            (100-step runs interleaved, 3 repetitions), and its R&B weights stay within 0.01 of
            exact (``benchmarks/results/projection_error_cpu.md``).
        device: where the model and batches live (data stays on the CPU until batched).
    """

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 25
    update_every: int = 10
    extra_batch: int = 4
    tracker_mode: str = "projected"
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
DEMO_METHODS = ("stratified", "oracle", "dga", "rnb-original", "rnb-regrouped")
BENCH_METHODS = (
    "stratified", "oracle", "static", "odm", "dga-extra", "dga", "rnb-original", "rnb-regrouped",
)  # fmt: skip

# Mixer hyper-parameters by registered mixer name (a method name overrides its mixer's); a mixer
# not listed gets its constructor's defaults. Chosen by `rnb bench sweep --preset cpu --seeds 0,1`
# on the *validation* split of the NI target-shift scenario (benchmarks/results/mixing_sweep_cpu.md),
# never on the test split:
# * R&B: lam 5 on both domain spaces (2 barely moves the mixture; 10 and more collapse it onto
#   one or two domains, far worse than stratified); regrouped: rounds of 5 steps and k from
#   (8, 32) (CorpusConfig.k_range) beat 10 steps and (8, 64).
# * DGA: step 1 without EMA, rounds of 20 steps; every larger step concentrated the mixture on
#   4 of the 7 target tasks and lost to stratified.
# * ODM: smoothing 0.9, exploration 0.1 (all four settings are within noise of stratified); the
#   bandit observes every batch (as in the ODM paper), whatever the round length.
DEFAULT_HPARAMS: dict[str, dict[str, Any]] = {
    "rnb": {"lam": 5.0},
    "rnb-regrouped": {"update_every": 5},
    "dga": {"step_size": 1.0, "ema": 1.0, "update_every": 20},
    "odm": {"update_every": 1, "smoothing": 0.9, "exploration": 0.1},
}


def _default_hparams() -> dict[str, dict[str, Any]]:
    return {k: dict(v) for k, v in DEFAULT_HPARAMS.items()}


_SECTIONS = {"corpus": CorpusConfig, "model": ModelConfig, "train": TrainConfig}


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole comparison: data, model, training, which methods, which seeds.

    Attributes:
        corpus: :class:`CorpusConfig`.
        model: :class:`~rnb_kernels.experiments.models.ModelConfig` (GPT-Neo); ``vocab_size``
            is the cap of the compact vocabulary (the model gets the ids the corpus uses, at
            most this).
        train: :class:`TrainConfig`.
        methods: method names (:func:`~rnb_kernels.experiments.methods.get_method`): a named
            run such as ``"rnb-regrouped"`` or ``"dga-extra"``, or any registered mixer name.
        hparams: ``{mixer name: {hyper-parameter: value}}`` passed to the mixer's constructor;
            an entry under a method's name (``"rnb-original"``) overrides its mixer's.
        seeds: one run of every method per seed (model init, sampling order, target batches
            and tracker sketch follow the seed; the data preparation follows
            ``corpus.seed``).
    """

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    # GPT-Neo 2 x 64 over a 2048-id compact vocabulary, T=64: ~45 ms of one core per tracked
    # step, so the demo's 15 runs of 300 steps fit in minutes.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(vocab_size=2048))
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
            "model": self.model.to_dict(),
            "train": asdict(self.train),
            "methods": list(self.methods),
            "hparams": {k: dict(v) for k, v in self.hparams.items()},
            "seeds": list(self.seeds),
        }


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# The full demo: ~10 minutes on a 2-core CPU on Natural Instructions, target shift.
DEMO = ExperimentConfig(seeds=(0, 1, 2))

# `rnb demo --quick`: the CI-sized run, about a minute on fortunes.
QUICK = ExperimentConfig(
    corpus=CorpusConfig(
        name="fortunes",
        max_examples=3000,
        k_range=(4, 12),
        eval_cap=200,
        target_size=48,
    ),
    model=ModelConfig(vocab_size=1024, context=32, n_layer=1, n_head=2, n_embd=32),
    train=TrainConfig(steps=40, batch_size=16, eval_every=10, update_every=5),
    seeds=(0,),
)

BENCH_PRESETS: dict[str, ExperimentConfig] = {
    # What `rnb bench mixing` runs by default: the demo's model and budget, every method.
    "cpu": ExperimentConfig(methods=BENCH_METHODS, seeds=(0, 1, 2)),
    # Seconds: the test suite.
    "tiny": ExperimentConfig(
        corpus=CorpusConfig(
            max_per_task=20, max_examples=1200, k_range=(3, 6), eval_cap=80, target_size=16,
        ),
        model=ModelConfig(vocab_size=256, context=16, n_layer=1, n_head=1, n_embd=16),
        train=TrainConfig(steps=6, batch_size=8, eval_every=3, update_every=3),
        methods=BENCH_METHODS,
        seeds=(0, 1, 2),
    ),
    # GPT-Neo-125M (12 x 768, T=512, full GPT-2 vocabulary kept by a 50257 compact cap), the R&B
    # paper's model and batch 16 x 512 x 2000 steps, for a GPU.
    "gpu": ExperimentConfig(
        corpus=CorpusConfig(
            max_per_task=2000, max_examples=120000, embedder="minilm", k_range=(16, 128),
            eval_cap=6000, target_size=1024,
        ),
        model=GPT_NEO_125M,
        train=TrainConfig(
            steps=2000, batch_size=16, eval_every=250, update_every=50, lr=6e-4, device="cuda"
        ),
        methods=BENCH_METHODS,
        seeds=(0, 1, 2),
    ),
}  # fmt: skip
