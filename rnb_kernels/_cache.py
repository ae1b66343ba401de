"""Root of rnb_kernels' on-disk caches (embeddings, downloaded corpora).

Shared by ``regroup/`` (embedding cache) and ``datasets/`` (the BIG-bench archive), so neither
imports the other for it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """``$RNB_CACHE`` or ``~/.cache/rnb_kernels`` (not created here)."""
    env = os.environ.get("RNB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rnb_kernels"
