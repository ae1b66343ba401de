"""Per-domain gradient statistics collected inside the normal backward.

* :class:`DomainGradientTracker` (:mod:`.tracker`): the public tracker.
* :mod:`.linear`: the forward swap and the autograd Function of a tracked ``nn.Linear``.
* :mod:`.slot`: one tracked layer's buffers, loss-scale bookkeeping and op call.
* :mod:`.ids`: domain-id validation (:func:`validate_domain_ids`) and per-sample counts.
"""

from .ids import per_sample_counts, validate_domain_ids
from .tracker import DomainGradientTracker

__all__ = ["DomainGradientTracker", "per_sample_counts", "validate_domain_ids"]
