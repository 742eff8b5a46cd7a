"""Simulated data: a ground-truth simulator and structure-free smoke-test data."""

from ._rna import simulate, true_pairwise_log2fc
from ._synthetic_iid import synthetic_iid

__all__ = ["simulate", "synthetic_iid", "true_pairwise_log2fc"]
