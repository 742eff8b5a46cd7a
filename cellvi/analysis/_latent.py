"""Latent representations."""

from __future__ import annotations

import math

import numpy as np
import torch

from .._constants import REGISTRY_KEYS
from ..errors import check_count
from ._batches import eval_mode, inference_batches, resolve_indices

__all__ = [
    "get_batch_representation",
    "get_latent_library_size",
    "get_latent_representation",
]


def get_latent_representation(
    model,
    adata=None,
    indices=None,
    give_mean: bool = True,
    mc_samples: int = 5000,
    batch_size: int | None = None,
    return_dist: bool = False,
):
    """Posterior of ``z`` per cell (``analysis.md`` §2).

    Returns an array ``(n_cells, n_latent)``: the posterior mean (for a logistic-normal latent,
    the mean of the softmax over ``mc_samples`` draws), or one draw when ``give_mean=False``;
    with ``return_dist=True`` a tuple ``(means, variances)`` of the Gaussian.

    The logistic-normal mean has no closed form. Its draws are ``μ + σ ε`` with one fixed set
    of ``mc_samples`` quasi-random standard-normal points ``ε`` shared by all cells (see
    :func:`normal_points`): the result is the same at every call, whatever the batch size,
    subset or storage of the counts, and about ten times closer to the exact mean than
    independent draws of the same number.
    """
    module = model.module
    mc_samples = check_count(mc_samples, "mc_samples")
    means, variances, out = [], [], []
    ln = module.config.latent_distribution == "ln"
    with eval_mode(module):
        draws = mc_samples * module.config.n_latent if ln and give_mean else 0
        eps = normal_points(mc_samples, module.config.n_latent) if draws else None
        for batch in inference_batches(
            model, adata, indices, batch_size, sparse_x=True, elements_per_cell=draws
        ):
            inf = module.inference(batch, library=False, sample_z=not (give_mean or return_dist))
            qz_m, qz_v = inf["qz_m"], inf["qz_v"]
            if return_dist:
                means.append(qz_m.cpu())
                variances.append(qz_v.cpu())
                continue
            if give_mean:
                if ln:
                    eps = eps.to(qz_m.device)
                    draws = torch.addcmul(qz_m, qz_v.sqrt(), eps[:, None, :])
                    out.append(torch.softmax(draws, dim=-1).mean(0).cpu())
                else:
                    out.append(qz_m.cpu())
            else:
                out.append(inf["z"].cpu())
    empty = np.zeros((0, module.config.n_latent), np.float32)  # no cells selected
    if return_dist:
        if not means:
            return empty, empty.copy()
        return torch.cat(means).numpy(), torch.cat(variances).numpy()
    return torch.cat(out).numpy() if out else empty


def normal_points(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``n`` quasi-random points of a standard normal in ``dim`` dimensions, ``(n, dim)``.

    A scrambled Sobol sequence mapped through the normal quantile function: averages of a
    smooth function over these points converge like ``1/n`` rather than ``1/√n``.

    Examples
    --------
    >>> pts = normal_points(4096, 2)
    >>> [round(float(v), 2) for v in pts.mean(0)], [round(float(v), 2) for v in pts.std(0)]
    ([0.0, 0.0], [1.0, 1.0])
    """
    engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
    u = engine.draw(n, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    return (math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)).float()


def get_latent_library_size(
    model, adata=None, indices=None, give_mean: bool = True, batch_size: int | None = None
) -> np.ndarray:
    """Library size per cell, shape ``(n_cells, 1)`` (``analysis.md`` §3).

    ``give_mean=True`` needs a learned library (``use_observed_lib_size=False``) and returns
    the mean ``exp(μ_l + σ_l² / 2)`` of its log-normal posterior; ``give_mean=False`` returns
    ``exp(l)``: the observed total count (also for a model with size factors, whose ``l``
    is the size factor), or one posterior draw.
    """
    module = model.module
    if give_mean and module.config.use_observed_lib_size:
        raise ValueError(
            "give_mean=True asks for the posterior mean of a learned library size, but this "
            "model uses the observed one (use_observed_lib_size=True); use give_mean=False "
            "for each cell's observed total."
        )
    out = []
    # with size factors the model's library is the size factor; the observed total is what
    # this reports (as scvi-tools does, whose library is always the total)
    totals = getattr(module, "use_size_factor_key", False)
    with eval_mode(module):
        for batch in inference_batches(model, adata, indices, batch_size, sparse_x=True):
            if totals and not give_mean:
                x = batch[REGISTRY_KEYS.X_KEY]
                rows = x.row_sums() if hasattr(x, "row_sums") else x.sum(1, keepdim=True)
                out.append(rows.float().cpu())
                continue
            inf = module.inference(batch)
            if give_mean:
                out.append(torch.exp(inf["ql_m"] + 0.5 * inf["ql_v"]).cpu())
            else:
                out.append(torch.exp(inf["library"]).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 1), np.float32)


def get_batch_representation(model, adata=None, indices=None, batch_size: int | None = None):
    """Each cell's learned batch embedding, shape ``(n_cells, batch_embedding_dim)``, for a
    model built with ``batch_representation="embedding"`` (scvi-tools'
    ``get_batch_representation``). ``batch_size`` is accepted for compatibility: the
    embeddings are one table lookup.

    Raises
    ------
    ValueError
        For a model with one-hot batches, which have no learned representation.
    """
    module = model.module
    table = getattr(module, "batch_embedding", None)
    if not getattr(module, "use_batch_embedding", False) or table is None:
        raise ValueError(
            "get_batch_representation needs a model built with batch_representation="
            "'embedding'; this one encodes batches one-hot, which learns no representation."
        )
    if batch_size is not None:
        check_count(batch_size, "batch_size")
    manager = model._manager_for(adata)
    idx = resolve_indices(indices, manager.summary_stats["n_cells"])
    codes = np.asarray(manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)).reshape(-1)[idx]
    weight = table.weight.detach()
    rows = weight[torch.as_tensor(codes, dtype=torch.int64, device=weight.device)]
    return rows.float().cpu().numpy()
