"""Mixture-weight updaters: R&B, DGA (and its distribution-reweighting variant) and baselines."""

from .base import Mixer
from .dga import DGA, DGADistribution, domain_gradient_alignment
from .odm import ODM
from .rnb import RnB
from .static import Static
from .stratified import Stratified

__all__ = [
    "DGA",
    "ODM",
    "DGADistribution",
    "Mixer",
    "RnB",
    "Static",
    "Stratified",
    "domain_gradient_alignment",
]
