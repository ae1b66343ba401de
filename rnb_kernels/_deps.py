"""Lazy imports of optional dependencies (the ``regroup`` and ``hf`` extras).

`import rnb_kernels` must stay light and work without scikit-learn, sentence-transformers,
pyarrow or datasets, so every such import goes through here, inside the function that needs
it. Shared by ``regroup/`` and ``datasets/``, which therefore need not import each other.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_INSTALL_HINT = "pip install 'rnb_kernels[regroup]'"


def require(module: str, *, what: str, extra: str = "regroup") -> ModuleType:
    """Import ``module`` or raise an ImportError that says which extra provides it.

    Example:
        >>> sk = require("sklearn.cluster", what="k-means clustering")
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = _INSTALL_HINT if extra == "regroup" else f"pip install 'rnb_kernels[{extra}]'"
        raise ImportError(
            f"{what} needs the optional package {module.split('.')[0]!r}, which is not "
            f"installed. Install it with: {hint}"
        ) from exc


def has_module(module: str) -> bool:
    """True when ``module`` can be imported (without raising on absence)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
