"""Fit diagnostics: ELBO, reconstruction error, importance-sampled marginal likelihood."""

from __future__ import annotations

import math

import numpy as np
import torch

from .._constants import REGISTRY_KEYS
from ..errors import check_count
from ..module import log_normal
from ._batches import eval_mode, inference_batches

__all__ = ["get_elbo", "get_reconstruction_error", "get_marginal_ll"]

_PASS_ELEMENTS = 2**20  # values per (draws, cells, genes) tensor of one marginal-ll step


def _per_cell_losses(model, adata, indices, batch_size):
    rec, kl = [], []
    with eval_mode(model.module):
        for batch in inference_batches(model, adata, indices, batch_size):
            out = model.module(batch, kl_weight=1.0)
            rec.append(out.reconstruction_loss.cpu())
            kl.append(out.kl_local.cpu())
    return _cat(rec), _cat(kl)


def _cat(parts: list[torch.Tensor]) -> np.ndarray:
    return torch.cat(parts).numpy() if parts else np.empty(0, dtype=np.float32)


def _mean(values: np.ndarray, what: str) -> float:
    if len(values) == 0:
        raise ValueError(
            f"indices selects no cells, and the mean {what} of zero cells is undefined; pass "
            "at least one cell (or return_mean=False for an empty array)."
        )
    # NumPy's float (a Python float too): .item() works, as on scvi-tools' tensors
    return np.float64(values.mean())


def get_elbo(model, adata=None, indices=None, batch_size=None, return_mean: bool = True):
    """ELBO per cell, ``-(reconstruction + local KL)`` with KL weight 1; higher is better."""
    rec, kl = _per_cell_losses(model, adata, indices, batch_size)
    elbo = -(rec + kl)
    return _mean(elbo, "ELBO") if return_mean else elbo


def get_reconstruction_error(
    model, adata=None, indices=None, batch_size=None, return_mean: bool = True
):
    """Negative log-likelihood: ``{"reconstruction_loss": value}``; lower is better."""
    rec, _ = _per_cell_losses(model, adata, indices, batch_size)
    return {"reconstruction_loss": _mean(rec, "reconstruction error") if return_mean else rec}


def latent_draws(module, inf: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` draws ``(k, cells, d)`` of each cell's Gaussian posterior ``u ~ q(u | x)`` and
    the latent the decoder takes: ``z = u``, or ``softmax(u)`` for a logistic-normal latent.

    Densities (prior, posterior) are evaluated at ``u``: the N(0, I) prior and the ELBO's KL
    live in that space, and ``z`` is a deterministic function of it, so ``p(x)`` needs no
    change-of-variables term.
    """
    qz_m, qz_v = inf["qz_m"], inf["qz_v"]
    u = torch.addcmul(qz_m, qz_v.sqrt(), torch.randn(k, *qz_m.shape, device=qz_m.device))
    z = torch.softmax(u, dim=-1) if module.config.latent_distribution == "ln" else u
    return u, z


def log_prior_z(module, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``log p(z)`` of each draw, ``(k, cells)``: the module's own prior when it has one
    (SCANVI's hierarchical prior over labels and ``z2``, at ``z``), else N(0, I) at ``u``."""
    own = getattr(module, "log_prior", None)
    if own is not None:
        return own(z)
    return log_normal(u, torch.zeros_like(u), torch.ones_like(u))


def get_marginal_ll(
    model,
    adata=None,
    indices=None,
    n_mc_samples: int = 1000,
    batch_size=None,
    return_mean: bool = True,
    n_mc_samples_per_pass: int = 1,
):
    """Importance-sampled ``log p(x)`` (``models.md`` §1): K draws from q, split in passes.

    ``logsumexp_k[log p(u_k) + log p(x | z_k, l_k) − log q(u_k | x) (+ library terms)] − log K``
    with ``u_k`` the Gaussian draws and ``z_k`` the decoder's latent (see :func:`latent_draws`).
    For SCANVI ``p(u_k)`` is its hierarchical prior over labels and ``z2``
    (``SCANVAE.log_prior``), not N(0, I).
    """
    module = model.module
    n_mc_samples = check_count(n_mc_samples, "n_mc_samples")
    per_pass = min(check_count(n_mc_samples_per_pass, "n_mc_samples_per_pass"), n_mc_samples)
    results = []
    with eval_mode(module):
        per_cell = module.n_input * max(per_pass, 2)
        for batch in inference_batches(
            model, adata, indices, batch_size, elements_per_cell=per_cell
        ):
            log_w = []
            done = 0
            n_cells = len(batch[REGISTRY_KEYS.BATCH_KEY])
            # a pass's (draws, cells, genes) tensors stay cache-sized: fewer draws per step
            step = min(per_pass, max(1, _PASS_ELEMENTS // (n_cells * module.n_input)))
            while done < n_mc_samples:
                k = min(step, n_mc_samples - done)
                # z is drawn by latent_draws; inference draws only the library (two
                # draws at least, so that its sample axis exists)
                inf = module.inference(batch, n_samples=max(k, 2), sample_z=False)
                u, z = latent_draws(module, inf, k)
                library = inf["library"][:k]
                gen = module.generative(z, library, batch)
                ll = module.log_likelihood(batch[REGISTRY_KEYS.X_KEY], gen)
                qz_m, qz_v = inf["qz_m"], inf["qz_v"]
                log_pz = log_prior_z(module, u, z)
                log_qz = log_normal(u, qz_m, qz_v)
                w = log_pz + ll - log_qz
                if inf["ql_m"] is not None:
                    b = batch[REGISTRY_KEYS.BATCH_KEY].reshape(-1)
                    prior_m = module.library_log_means[0, b].unsqueeze(-1)
                    prior_v = module.library_log_vars[0, b].unsqueeze(-1)
                    w = (
                        w
                        + log_normal(library, prior_m, prior_v)
                        - log_normal(library, inf["ql_m"], inf["ql_v"])
                    )
                log_w.append(w)
                done += k
            stacked = torch.cat(log_w, dim=0)  # (K, cells)
            results.append((torch.logsumexp(stacked, 0) - math.log(n_mc_samples)).cpu())
    values = _cat(results)
    return _mean(values, "marginal log-likelihood") if return_mean else values
