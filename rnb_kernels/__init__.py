"""rnb_kernels: online data mixing (R&B, DGA) for foundation-model training.

Importing this package is cheap and probes no hardware: Triton, the CUDA extension and the
optional extras (scikit-learn, sentence-transformers, transformers) load on first use.
"""

from __future__ import annotations

from . import ops
from ._backends import BackendStatus, BackendUnavailableError, backends

__version__ = "0.1.0"

__all__ = ["BackendStatus", "BackendUnavailableError", "__version__", "backends", "ops"]
