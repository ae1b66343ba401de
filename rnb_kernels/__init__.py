"""rnb_kernels: online data mixing (R&B, DGA) for foundation-model training.

Importing this package is cheap and probes no hardware: Triton, the CUDA extension and the
optional extras (scikit-learn, sentence-transformers, transformers) load on first use. The
public names below resolve lazily (PEP 562), so ``rnb.RnB`` imports ``rnb_kernels.mixing``
only when first touched.
"""

from __future__ import annotations

import importlib

from . import ops
from ._backends import BackendStatus, BackendUnavailableError, backends

__version__ = "0.1.0"

_LAZY = {
    "DomainGradientTracker": "rnb_kernels.tracking",
    "validate_domain_ids": "rnb_kernels.tracking",
    "Mixer": "rnb_kernels.mixing",
    "MixingContext": "rnb_kernels.mixing",
    "register_mixer": "rnb_kernels.mixing",
    "build_mixer": "rnb_kernels.mixing",
    "mixer_names": "rnb_kernels.mixing",
    "register_statistic": "rnb_kernels.balancer",
    "RnB": "rnb_kernels.mixing",
    "DGA": "rnb_kernels.mixing",
    "DGADistribution": "rnb_kernels.mixing",
    "Stratified": "rnb_kernels.mixing",
    "Static": "rnb_kernels.mixing",
    "ODM": "rnb_kernels.mixing",
    "MixtureSampler": "rnb_kernels.sampling",
    "Balancer": "rnb_kernels.balancer",
    "regroup": "rnb_kernels.regroup",
    "Partition": "rnb_kernels.regroup",
}

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "__version__",
    "backends",
    "ops",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        # For "regroup" the import below binds the subpackage here; the function replaces it,
        # and the subpackage is callable anyway (see rnb_kernels.regroup).
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rnb_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
