"""Aggregated posteriors and differential abundance of samples in the latent space.

The aggregated posterior of a group of cells is the equal-weight mixture of their posteriors
``q(u | x_i)``: a density over the latent space that is high where the group's cells are.
Evaluating every cell's posterior mean under each sample's mixture shows which samples
(donors, conditions) populate the region the cell sits in (scvi-tools'
``differential_abundance``).

Components are the Gaussian posteriors themselves or, with ``dof``, Student-t distributions
with the same location and scale (heavier tails, so a cell just outside a sample's cells is
not scored at minus infinity). The latent is the Gaussian one (``u``; for a logistic-normal
model the space before the softmax), where the posteriors are Gaussian.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import distributions as dist

from ..errors import check_count
from ._latent import get_latent_representation

__all__ = ["get_aggregated_posterior", "differential_abundance", "mixture_log_prob"]

_CHUNK_ELEMENTS = 2**20  # float64 values of one block: (cells, components[, dims])


def _check_dof(dof) -> float | None:
    if dof is None:
        return None
    if isinstance(dof, bool) or not isinstance(dof, int | float) or not math.isfinite(dof):
        raise ValueError(f"dof must be a positive number or None (Normal components), not {dof!r}.")
    if dof <= 0:
        raise ValueError(f"dof must be > 0 (Student-t degrees of freedom), not {dof!r}.")
    return float(dof)


def _posteriors(model, adata, indices, batch_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and standard deviations ``(cells, d)`` of the selected cells' posteriors."""
    means, variances = get_latent_representation(
        model, adata, indices, batch_size=batch_size, return_dist=True
    )
    return torch.from_numpy(means), torch.from_numpy(variances).sqrt()


def get_aggregated_posterior(
    model, adata=None, indices=None, batch_size: int | None = None, dof: float | None = 3.0
) -> dist.MixtureSameFamily:
    """The aggregated posterior of the cells ``indices`` (all by default) as a
    ``torch.distributions.MixtureSameFamily``: equal weights over the cells, each component
    the cell's posterior over the latent, Student-t with ``dof`` degrees of freedom (None:
    Normal). Its ``log_prob`` takes points ``(..., n_latent)``.

    scvi-tools 1.4.2 passes each posterior's variance where the component's scale goes; here
    the scale is the posterior's standard deviation.
    """
    dof = _check_dof(dof)
    loc, scale = _posteriors(model, adata, indices, batch_size)
    if len(loc) == 0:
        raise ValueError("indices selects no cells; an aggregated posterior needs at least one.")
    loc, scale = loc.double(), scale.double()
    components = dist.Normal(loc, scale) if dof is None else dist.StudentT(dof, loc, scale)
    weights = dist.Categorical(logits=torch.zeros(len(loc), dtype=torch.float64))
    return dist.MixtureSameFamily(weights, dist.Independent(components, 1))


def mixture_log_prob(
    points: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, dof: float | None = None
) -> torch.Tensor:
    """``log`` of the equal-weight mixture of the diagonal components ``(loc, scale)``
    ``(k, d)`` at ``points`` ``(n, d)``, shape ``(n,)``, in float64.

    Normal components need no ``(n, k, d)`` tensor: the quadratic form of every pair is two
    matrix products. Student-t components are evaluated in blocks of bounded size.
    """
    points, loc, scale = points.double(), loc.double(), scale.double()
    n, d = points.shape
    k = len(loc)
    out = torch.empty(n, dtype=torch.float64)
    if dof is None:
        prec = scale.pow(-2)  # (k, d)
        # Σ_d (p - m)² / s² = p² · 1/s² - 2 p · m/s² + Σ_d m²/s²: two products per block
        const = -0.5 * (loc.square() * prec).sum(1) - scale.log().sum(1)
        const -= 0.5 * d * math.log(2 * math.pi) + math.log(k)
        prec_t, shift_t = prec.T.contiguous(), (loc * prec).T.contiguous()
        rows = max(1, _CHUNK_ELEMENTS // k)
        for start in range(0, n, rows):
            p = points[start : start + rows]
            terms = torch.addmm(const, p.square(), prec_t, alpha=-0.5).addmm_(p, shift_t)
            out[start : start + rows] = _logsumexp_rows(terms)
        return out
    norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    const = d * norm - scale.log().sum(1) - math.log(k)  # (k,)
    rows = max(1, _CHUNK_ELEMENTS // max(1, k * d))
    for start in range(0, n, rows):
        p = points[start : start + rows]
        z = (p[:, None, :] - loc[None]) / scale[None]  # (rows, k, d)
        log_kernel = torch.log1p(z.square_().div_(dof)).sum(2).mul_(-(dof + 1) / 2)
        out[start : start + rows] = _logsumexp_rows(log_kernel.add_(const))
    return out


def _logsumexp_rows(values: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the rows of ``values`` (overwritten): several times faster than
    ``torch.logsumexp`` on the CPU."""
    top = values.amax(1, keepdim=True).nan_to_num_(neginf=0.0)  # rows of -inf stay -inf
    return values.sub_(top).exp_().sum(1).log_().add_(top.squeeze(1))


def differential_abundance(
    model,
    adata=None,
    sample_key: str | None = None,
    batch_size: int | None = 128,
    num_cells_posterior: int | None = None,
    dof: float | None = None,
    seed: int | None = 0,
) -> pd.DataFrame:
    """Log density of each cell's posterior mean under each sample's aggregated posterior.

    Returns a DataFrame ``(cells, samples)`` (index the cell names, columns the values of
    ``adata.obs[sample_key]`` in order of appearance), also stored in
    ``adata.obsm["da_log_probs"]``. A cell scores high for the samples that have cells where
    it lies; comparing columns (e.g. the mean over the samples of each condition) shows which
    regions of the latent space a condition enriches or depletes.

    ``num_cells_posterior`` caps the cells that make up each sample's mixture: a random subset
    (seeded with ``seed``; None: NumPy's global stream) when a sample has more.
    """
    manager = model._manager_for(adata)
    adata = manager.adata
    if sample_key is None:
        raise ValueError(
            "differential_abundance needs sample_key=, the adata.obs column naming each cell's "
            "sample (e.g. donor or replicate)."
        )
    if sample_key not in adata.obs:
        raise KeyError(
            f"sample_key={sample_key!r} is not a column of adata.obs (columns: "
            f"{', '.join(map(str, adata.obs.columns[:10]))}"
            f"{' ...' if adata.obs.shape[1] > 10 else ''})."
        )
    samples = adata.obs[sample_key]
    if samples.isna().any():
        raise ValueError(
            f"adata.obs[{sample_key!r}] has {int(samples.isna().sum())} missing value(s); give "
            "every cell a sample (or pass a subset of the AnnData without them)."
        )
    if num_cells_posterior is not None:
        num_cells_posterior = check_count(num_cells_posterior, "num_cells_posterior")
    dof = _check_dof(dof)
    loc, scale = _posteriors(model, adata, None, batch_size)
    rng = np.random.default_rng(seed) if seed is not None else np.random
    names = list(pd.unique(samples.to_numpy()))
    codes = pd.Categorical(samples.to_numpy(), categories=names).codes
    columns = []
    for code in range(len(names)):
        members = np.flatnonzero(codes == code)
        if num_cells_posterior is not None and len(members) > num_cells_posterior:
            members = np.sort(rng.choice(members, num_cells_posterior, replace=False))
        members = torch.from_numpy(members)
        columns.append(mixture_log_prob(loc, loc[members], scale[members], dof).numpy())
    values = np.stack(columns, axis=1) if columns else np.zeros((len(loc), 0))
    frame = pd.DataFrame(values, index=adata.obs_names.copy(), columns=pd.Index(names))
    # h5ad files need string column names (a sample column may hold e.g. integers)
    adata.obsm["da_log_probs"] = frame.rename(columns=str)
    return frame
