"""Downstream analyses on fitted models: latent space, expression, DE, diagnostics."""

from ._abundance import differential_abundance, get_aggregated_posterior, mixture_log_prob
from ._batches import eval_mode, inference_batch_size, inference_batches, resolve_indices
from ._correlation import get_feature_correlation_matrix
from ._de import check_de_request, differential_expression
from ._de_stats import credible_intervals, estimate_delta, estimate_pseudocount, fdr_calls
from ._diagnostics import get_elbo, get_marginal_ll, get_reconstruction_error
from ._expression import (
    get_likelihood_parameters,
    get_normalized_expression,
    posterior_predictive_sample,
)
from ._importance import get_importance_weights, pairwise_log_likelihood
from ._latent import get_batch_representation, get_latent_library_size, get_latent_representation
from ._metrics import (
    adjusted_rand_index,
    batch_mixing,
    kmeans,
    knn_indices,
    knn_label_accuracy,
    normalized_mutual_info,
)
from ._outliers import robust_inliers

__all__ = [
    "differential_abundance",
    "get_aggregated_posterior",
    "mixture_log_prob",
    "adjusted_rand_index",
    "kmeans",
    "normalized_mutual_info",
    "credible_intervals",
    "check_de_request",
    "differential_expression",
    "robust_inliers",
    "estimate_delta",
    "estimate_pseudocount",
    "fdr_calls",
    "get_elbo",
    "get_feature_correlation_matrix",
    "get_importance_weights",
    "pairwise_log_likelihood",
    "get_batch_representation",
    "get_latent_library_size",
    "get_likelihood_parameters",
    "get_marginal_ll",
    "get_normalized_expression",
    "get_reconstruction_error",
    "posterior_predictive_sample",
    "batch_mixing",
    "eval_mode",
    "get_latent_representation",
    "inference_batch_size",
    "inference_batches",
    "knn_indices",
    "knn_label_accuracy",
    "resolve_indices",
]
