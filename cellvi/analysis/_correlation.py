"""Gene-gene correlation of the model's denoised expression (``analysis.md`` §3)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..errors import check_count
from ._batches import eval_mode, inference_batches, resolve_indices
from ._expression import transform_batch_codes

__all__ = ["get_feature_correlation_matrix"]


def _rank_columns(x: np.ndarray) -> np.ndarray:
    """Average ranks of each column (ties share their mean rank), for Spearman."""
    from scipy.stats import rankdata

    return rankdata(x, axis=0)


def get_feature_correlation_matrix(
    model,
    adata=None,
    indices=None,
    n_samples: int = 10,
    batch_size: int = 64,
    rna_size_factor: float = 1000,
    transform_batch=None,
    correlation_type: str = "spearman",
) -> pd.DataFrame:
    """Genes x genes correlation of denoised expression draws.

    For each cell and each of ``n_samples`` posterior draws of z, expression is drawn from
    ``Gamma(shape θ, rate θ / (rna_size_factor · ρ))`` (the count model without its Poisson
    noise, at a common library size); the draws of all cells are stacked and correlated
    across them (``"spearman"`` or ``"pearson"``). With several ``transform_batch`` values
    the matrices are averaged. Holds ``n_samples x n_cells x n_genes`` draws at once.
    """
    if correlation_type not in ("spearman", "pearson"):
        raise ValueError(f"correlation_type={correlation_type!r}: use 'spearman' or 'pearson'.")
    n_samples = check_count(n_samples, "n_samples")
    n_cells = len(resolve_indices(indices, model._manager_for(adata).summary_stats["n_cells"]))
    if n_cells * n_samples < 2:
        raise ValueError(
            f"indices selects {n_cells} cell(s) and n_samples={n_samples}: a correlation needs "
            "at least 2 draws; select more cells or raise n_samples."
        )
    if not rna_size_factor > 0:
        raise ValueError(f"rna_size_factor={rna_size_factor!r} must be positive.")
    module = model.module
    likelihood = module.config.gene_likelihood
    if likelihood not in ("nb", "zinb"):
        why = {
            "poisson": "a Poisson model has no dispersion θ",
            "normal": "a 'normal' model's θ is the standard deviation of a Gaussian",
        }.get(likelihood, f"gene_likelihood={likelihood!r} has no NB dispersion θ")
        raise ValueError(
            f"The feature correlation draws from Gamma(θ, θ/μ), and {why}. Use a model with "
            "gene_likelihood='nb' or 'zinb'."
        )
    matrices = []
    for code in transform_batch_codes(model, transform_batch):
        draws = []
        with eval_mode(module):
            for batch in inference_batches(model, adata, indices, batch_size, sparse_x=True):
                inf = module.inference(batch, n_samples=n_samples)
                gen = module.generative(inf["z"], inf["library"], batch, transform_batch=code)
                theta = gen["theta"].expand_as(gen["scale"])
                rate = theta / (rna_size_factor * gen["scale"])
                sample = torch.distributions.Gamma(theta, rate).sample()
                draws.append(sample.reshape(-1, sample.shape[-1]).cpu().numpy())
        data = np.concatenate(draws, axis=0).astype(np.float64)
        if correlation_type == "spearman":
            data = _rank_columns(data)
        matrices.append(np.corrcoef(data, rowvar=False))
    names = model.registry_["field_registries"]["X"]["state_registry"]["column_names"]
    return pd.DataFrame(np.mean(matrices, axis=0), index=names, columns=names, copy=False)
