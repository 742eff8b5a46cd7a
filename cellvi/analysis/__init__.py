"""Downstream analyses on fitted models: latent space, expression, DE, diagnostics."""

from ._batches import eval_mode, inference_batches, resolve_indices
from ._latent import get_latent_representation
from ._metrics import batch_mixing, knn_indices, knn_label_accuracy

__all__ = [
    "batch_mixing",
    "eval_mode",
    "get_latent_representation",
    "inference_batches",
    "knn_indices",
    "knn_label_accuracy",
    "resolve_indices",
]
