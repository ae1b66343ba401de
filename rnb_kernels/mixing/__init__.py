"""Mixture-weight updaters: R&B, DGA (and its distribution-reweighting variant) and baselines.

Every mixer registers itself by name (:mod:`rnb_kernels.mixing.registry`); importing this package
registers the built-in ones.
"""

from .base import Mixer, MixingContext
from .dga import DGA, DGADistribution, domain_gradient_alignment
from .odm import ODM
from .registry import build_mixer, get_mixer, mixer_names, register_mixer, unregister_mixer
from .rnb import RnB
from .static import Static
from .stratified import Stratified

__all__ = [
    "DGA",
    "ODM",
    "DGADistribution",
    "Mixer",
    "MixingContext",
    "RnB",
    "Static",
    "Stratified",
    "build_mixer",
    "domain_gradient_alignment",
    "get_mixer",
    "mixer_names",
    "register_mixer",
    "unregister_mixer",
]


def _discover() -> None:
    """Import every other module of this package, so a mixer added as one file registers."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name not in ("base", "registry"):
            importlib.import_module(f"{__name__}.{info.name}")


_discover()
