"""The one method registry of the demo, ``rnb bench mixing`` and :func:`~.train.train`.

A *method* is a run of the comparison: ``(run name, mixer name, domain space, gradient
source, initial weights)``.

* The mixer comes from the library's registry (:func:`rnb_kernels.mixing.build_mixer`), so a
  mixer registered anywhere (:func:`rnb_kernels.mixing.register_mixer`) is a method at once.
* The domain space is ``"original"`` (the corpus' own domains) or ``"regrouped"`` (the
  clusters of :func:`rnb_kernels.regroup.regroup`).
* The gradient source says where a mixer that asks for per-domain gradient ``alignment``
  (DGA) gets it: ``"tracker"`` (the training backward, plus one target batch per round) or
  ``"extra"`` (the DGA paper's extra forward/backward per domain every round).
* The weights source says where a static mixer's weights come from: the mixer's own default
  (``static``: size-proportional) or ``"target"``: the target sample's histogram over the
  domains. ``oracle`` is ``static`` with target weights on the original domains: it trains on
  the target's own domains in the target's proportions, the reference a method that only
  sees a small target sample should approach.

Whether a run tracks gradients at all follows from the statistics the mixer declares in
``Mixer.requires`` (:func:`needs_tracker`), not from its name.

A method name is one of :data:`NAMED_METHODS`, or ``<mixer>`` with optional suffixes
``-original`` / ``-regrouped`` and ``-extra``: ``"toy"``, ``"toy-regrouped"``,
``"dga-regrouped-extra"``.

Example:
    >>> get_method("rnb-regrouped")
    Method(name='rnb-regrouped', mixer='rnb', domains='regrouped', gradients='tracker', weights='')
    >>> get_method("odm-regrouped").domains
    'regrouped'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..mixing import Mixer, MixingContext, build_mixer, get_mixer, mixer_names

__all__ = [
    "DOMAIN_SPACES",
    "GRADIENT_SOURCES",
    "NAMED_METHODS",
    "Method",
    "build_method_mixer",
    "get_method",
    "method_names",
    "needs_tracker",
    "resolve_methods",
    "uses_alignment",
]

DOMAIN_SPACES = ("original", "regrouped")
GRADIENT_SOURCES = ("tracker", "extra")


@dataclass(frozen=True)
class Method:
    """One run of a comparison.

    Attributes:
        name: the run's label in tables, logs and plots.
        mixer: a registered mixer name (:func:`rnb_kernels.mixing.mixer_names`).
        domains: ``"original"`` or ``"regrouped"``: which domain labels the sampler and the
            mixer see.
        gradients: ``"tracker"`` or ``"extra"``: where gradient alignments come from when the
            mixer requires ``"alignment"`` (ignored otherwise).
        weights: ``""`` (the mixer builds its own weights) or ``"target"``: the mixer gets
            ``weights=`` the target sample's domain histogram (``oracle``).
    """

    name: str
    mixer: str
    domains: str = "original"
    gradients: str = "tracker"
    weights: str = ""

    def __post_init__(self) -> None:
        if self.domains not in DOMAIN_SPACES:
            raise ValueError(f"domains must be one of {DOMAIN_SPACES}; got {self.domains!r}")
        if self.gradients not in GRADIENT_SOURCES:
            raise ValueError(f"gradients must be one of {GRADIENT_SOURCES}; got {self.gradients!r}")
        if self.weights not in ("", "target"):
            raise ValueError(f"weights must be '' or 'target'; got {self.weights!r}")

    @property
    def mixer_class(self) -> type[Mixer]:
        """The registered mixer class (raises ``ValueError`` if the name is not registered)."""
        return get_mixer(self.mixer)


NAMED_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("stratified", "stratified"),
        Method("static", "static"),
        Method("odm", "odm"),
        Method("dga", "dga"),
        Method("dga-extra", "dga", gradients="extra"),
        Method("rnb-original", "rnb"),
        Method("rnb-regrouped", "rnb", domains="regrouped"),
        Method("oracle", "static", weights="target"),
    )
}

_SUFFIXES = {"-original": ("domains", "original"), "-regrouped": ("domains", "regrouped"),
             "-extra": ("gradients", "extra")}  # fmt: skip


def get_method(name: str | Method) -> Method:
    """Resolve a method name (a :class:`Method` passes through).

    Raises:
        ValueError: neither a named method nor a registered mixer (with optional suffixes);
            the message lists both.
    """
    if isinstance(name, Method):
        return name
    if not isinstance(name, str) or not name:
        raise ValueError(f"a method name must be a non-empty str; got {name!r}")
    if name in NAMED_METHODS:
        return NAMED_METHODS[name]
    registered = mixer_names()
    base, parts = name, {}
    # A registered name wins over suffix parsing, so a mixer may itself contain a dash.
    while base not in registered:
        suffix = next((s for s in _SUFFIXES if base.endswith(s)), None)
        if suffix is None or _SUFFIXES[suffix][0] in parts:
            raise ValueError(
                f"unknown method {name!r}: use one of {list(NAMED_METHODS)} or a registered "
                f"mixer {list(registered)}, optionally with -original/-regrouped and -extra"
            )
        key, value = _SUFFIXES[suffix]
        parts[key] = value
        base = base[: -len(suffix)]
    return Method(name, base, **parts)


def resolve_methods(names: Sequence[str | Method]) -> list[Method]:
    """Resolve every name, or raise ``ValueError`` for the first unknown or repeated one (run
    names label logs and rows, so they must be distinct)."""
    methods = [get_method(n) for n in names]
    seen = [m.name for m in methods]
    dup = next((n for i, n in enumerate(seen) if n in seen[:i]), None)
    if dup is not None:
        raise ValueError(f"method {dup!r} is listed twice")
    return methods


def method_names() -> tuple[str, ...]:
    """The named methods, then every registered mixer that has no named method of its own."""
    named_mixers = {m.mixer for m in NAMED_METHODS.values()}
    return (*NAMED_METHODS, *(n for n in mixer_names() if n not in named_mixers))


def needs_tracker(method: str | Method) -> bool:
    """Whether the run must track per-domain gradients during the training backward.

    True when the mixer requires a statistic that reads the tracker (``gram``, ``alignment``,
    ...), unless those gradients come from the extra passes.
    """
    from ..balancer import needs_tracker as mixer_needs_tracker

    method = get_method(method)
    if method.gradients == "extra":
        return False
    # Unknown statistic names are left to the Balancer, whose error lists the registered ones.
    return mixer_needs_tracker(method.mixer_class)


def uses_alignment(method: str | Method) -> bool:
    """Whether the mixer consumes gradient alignments with a target set (DGA-like)."""
    return "alignment" in get_method(method).mixer_class.requires


def build_method_mixer(
    method: str | Method,
    *,
    num_domains: int,
    train_domains: np.ndarray,
    eval_proportions: np.ndarray,
    target_domains: np.ndarray,
    update_every: int,
    hparams: Mapping[str, Mapping[str, Any]] | None = None,
) -> Mixer:
    """Build the method's mixer for a run through the library's mixer registry.

    Args:
        method: a method name or :class:`Method`.
        num_domains: ``m`` in the method's domain space.
        train_domains: ``int64[n_train]`` domain of every training row (sizes for ``static``).
        eval_proportions: ``float[m]`` eval share per domain (R&B's ``p_eval``).
        target_domains: ``int64[n_target]`` domain of every target row.
        update_every: optimizer steps per round (a mixer's own ``update_every`` hyper-parameter
            overrides it).
        hparams: ``{mixer name: {hyper-parameter: value}}``; the method's mixer is read,
            then an entry under the method's own name (e.g. ``"rnb-original"``) overrides it.

    Raises:
        ValueError: the gradient source is ``"extra"`` but the mixer uses no alignment.
    """
    target_domains = np.asarray(target_domains, dtype=np.int64)
    method = get_method(method)
    if method.gradients == "extra" and not uses_alignment(method):
        raise ValueError(
            f"method {method.name!r}: gradient source 'extra' needs a mixer that requires "
            f"'alignment'; {method.mixer!r} requires {method.mixer_class.requires}"
        )
    context = MixingContext(
        num_domains=num_domains,
        eval_proportions=eval_proportions,
        domain_sizes=np.bincount(train_domains, minlength=num_domains).astype(np.float64),
        target_labels=target_domains,
        update_every=update_every,
    )
    hparams = hparams or {}
    hp = dict(hparams.get(method.mixer, {}))
    if method.name != method.mixer:
        hp.update(hparams.get(method.name, {}))
    if method.weights == "target":
        hp["weights"] = np.bincount(target_domains, minlength=num_domains).astype(np.float64)
    return build_mixer(method.mixer, context, **hp)
