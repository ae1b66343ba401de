"""The mixer registry: every mixer is found by its name.

A mixer class registers itself with :func:`register_mixer` (a class decorator) in the file that
defines it. The :class:`~rnb_kernels.Balancer` reads what a mixer needs from the class itself
(:attr:`Mixer.requires`, :attr:`Mixer.stat_domains`); the experiments (``rnb demo``,
``rnb bench mixing``) and the HF integration build mixers by name through :func:`build_mixer`,
which calls :meth:`Mixer.from_context`. Adding a mixer is therefore one file plus its test (see
``docs/mixers.md``).

Example:
    >>> from rnb_kernels.mixing import build_mixer, MixingContext
    >>> build_mixer("stratified", MixingContext(num_domains=3)).weights.tolist()
    [0.3333333333333333, 0.3333333333333333, 0.3333333333333333]
"""

from __future__ import annotations

from typing import Any, TypeVar

from .base import Mixer, MixingContext

__all__ = ["build_mixer", "get_mixer", "mixer_names", "register_mixer", "unregister_mixer"]

_MIXERS: dict[str, type[Mixer]] = {}

M = TypeVar("M", bound=type[Mixer])


def register_mixer(cls: M | None = None, *, name: str | None = None, replace: bool = False):
    """Class decorator: make ``cls`` buildable by name (``name`` defaults to ``cls.name``).

    Raises:
        TypeError: ``cls`` is not a :class:`Mixer` subclass.
        ValueError: the name is empty or already taken (pass ``replace=True`` to re-register).
    """

    def wrap(c: M) -> M:
        if not (isinstance(c, type) and issubclass(c, Mixer)):
            raise TypeError(f"register_mixer takes a Mixer subclass, got {c!r}")
        key = name if name is not None else getattr(c, "name", "")
        if not isinstance(key, str) or not key:
            raise ValueError(f"{c.__name__}: a registered mixer needs a non-empty `name`")
        if key in _MIXERS and _MIXERS[key] is not c and not replace:
            raise ValueError(
                f"mixer name {key!r} is taken by {_MIXERS[key].__name__}; pass replace=True"
            )
        c.name = key
        _MIXERS[key] = c
        return c

    return wrap if cls is None else wrap(cls)


def unregister_mixer(name: str) -> None:
    """Remove a registered mixer (tests that register toy mixers clean up with this)."""
    _MIXERS.pop(name, None)


def mixer_names() -> tuple[str, ...]:
    """Names of every registered mixer, in registration order."""
    return tuple(_MIXERS)


def get_mixer(name: str) -> type[Mixer]:
    """The mixer class registered as ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    try:
        return _MIXERS[name]
    except KeyError:
        raise ValueError(f"unknown mixer {name!r}; registered: {list(_MIXERS)}") from None


def build_mixer(name: str, context: MixingContext | int, **hparams: Any) -> Mixer:
    """Build the mixer registered as ``name`` for a run described by ``context``.

    Args:
        name: a registered mixer name (:func:`mixer_names`).
        context: a :class:`MixingContext` (or just ``num_domains``) with what the data says:
            domain count, eval proportions, domain sizes, target labels.
        **hparams: the mixer's own hyper-parameters (e.g. ``lam`` for ``"rnb"``).
    """
    if isinstance(context, int) and not isinstance(context, bool):
        context = MixingContext(num_domains=context)
    if not isinstance(context, MixingContext):
        raise TypeError(f"context must be a MixingContext, got {type(context).__name__}")
    return get_mixer(name).from_context(context, **hparams)
