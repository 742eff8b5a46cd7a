"""Downstream analyses on fitted models: latent space, expression, DE, diagnostics."""

from ._batches import eval_mode, inference_batches, resolve_indices
from ._latent import get_latent_representation

__all__ = ["eval_mode", "get_latent_representation", "inference_batches", "resolve_indices"]
