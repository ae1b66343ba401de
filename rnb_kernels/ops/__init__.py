"""Public ops. Each dispatches to a backend: ``"cuda"`` | ``"triton"`` | ``"torch"``."""

from .domain_projection import domain_projection
from .domain_sketch import domain_sketch
from .gram import gram
from .segmented_wgrad import segmented_wgrad

__all__ = ["domain_projection", "domain_sketch", "gram", "segmented_wgrad"]
