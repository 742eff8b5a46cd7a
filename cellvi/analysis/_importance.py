"""Importance-weighted posterior samples of a cell group (``analysis.md`` §3, weights).

A group's pooled draws ``z_s`` (several per cell) are re-weighted towards the group's
aggregate posterior: with anchor cells ``a`` of the group and their marginal likelihoods
``p̂(x_a)``,

    log w_s = logsumexp_a[log N(z_s; 0, I) + log p(x_a | z_s) − log p̂(x_a)]
              − logsumexp_a log q(z_s | x_a)

where ``p(x_a | z_s)`` decodes ``z_s`` (ρ, dispersion, zero-inflation) and rescales ρ to the
anchor's total count. The likelihood matrix ``(draws, anchors)`` is built from matrix products
for every term that separates (``Σ_g x_ag log ρ_sg``, the zero-inflation terms, the Poisson
rate) and one elementwise pass for ``log(θ + μ)``, the only term that does not.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch.nn import functional as F

from .._constants import REGISTRY_KEYS
from ..errors import CellviWarning, check_count
from ._batches import eval_mode, inference_batches, private_rng
from ._diagnostics import get_marginal_ll, latent_draws, log_prior_z

__all__ = ["get_importance_weights", "importance_resample", "pairwise_log_likelihood"]

_LIKELIHOODS = ("zinb", "nb", "poisson")


def _check_model(model) -> None:
    config = model.module.config
    if config.gene_likelihood not in _LIKELIHOODS:
        raise ValueError(
            f"weights='importance' supports the count likelihoods {_LIKELIHOODS}; this model "
            f"uses {config.gene_likelihood!r}. Use weights='uniform'."
        )


def pairwise_log_likelihood(
    likelihood: str,
    x: torch.Tensor,
    log_rho: torch.Tensor,
    theta: torch.Tensor | None,
    zi_logits: torch.Tensor | None,
) -> torch.Tensor:
    """``L[s, a] = Σ_g log p(x_ag | μ = ρ_sg · Σ_g x_ag, θ_sg, π_sg)``, shape ``(S, A)``.

    ``x`` ``(A, G)`` anchor counts; ``log_rho`` ``(S, G)``; ``theta`` ``(G,)`` or ``(S, G)``;
    ``zi_logits`` ``(S, G)`` for ZINB. Per anchor, the only elementwise work is
    ``log(θ + μ)`` (and, for ZINB, the zero-count mixture); sums over genes are
    matrix-vector products. Keep ``S · G`` cache-sized (a few 10^5) for speed.
    """
    totals = x.sum(1)
    log_t = totals.clamp_min(1e-30).log()
    positive = (x > 0).to(x.dtype)
    ll = log_rho @ x.T + (totals * log_t)[None, :] - torch.lgamma(x + 1).sum(1)[None, :]
    if likelihood == "poisson":
        return ll - log_rho.exp().sum(1, keepdim=True) * totals[None, :]
    per_gene = theta.dim() == 1
    theta_log = theta * theta.log()
    if per_gene:  # the log-gamma ratio depends on the anchor only
        ll += (torch.lgamma(x + theta) - torch.lgamma(theta)).sum(1)[None, :]
    if likelihood == "zinb":  # θ log θ − softplus(w) at the nonzeros, −softplus(−w) at zeros
        ll += (theta_log - F.softplus(zi_logits)) @ positive.T
        ll -= F.softplus(-zi_logits) @ (1 - positive).T
        offset = theta_log - zi_logits  # a = θ log θ − θ log(θ + μ) − w at the zeros
    else:
        ll += theta_log.sum(-1)[:, None] if not per_gene else theta_log.sum()
    buffer = torch.empty_like(log_rho)
    for a in range(x.shape[0]):
        log_tm = torch.add(log_rho, log_t[a], out=buffer).exp_().add_(theta).log_()
        pos = positive[a]
        if per_gene:
            ll[:, a] -= log_tm @ ((x[a] + theta) * pos if likelihood == "zinb" else x[a] + theta)
        else:
            weight = theta * pos if likelihood == "zinb" else theta
            ll[:, a] -= (log_tm * weight).sum(1) + log_tm @ x[a]
            cols = pos.nonzero().squeeze(1)  # per-draw θ: the log-gamma ratio at the nonzeros
            th = theta[:, cols]
            ll[:, a] += (torch.lgamma(th + x[a, cols]) - torch.lgamma(th)).sum(1)
        if likelihood == "zinb":
            mixture = torch.addcmul(offset, theta.expand_as(log_tm), log_tm, value=-1)
            ll[:, a] += F.softplus(mixture) @ (1 - pos)
    return ll


def _anchors_data(model, adata, cells: np.ndarray) -> torch.Tensor:
    """The anchors' counts as a dense float32 ``(anchors, genes)`` tensor, in ``cells`` order."""
    batches = inference_batches(model, adata, cells)
    return torch.cat([b[REGISTRY_KEYS.X_KEY].float().cpu() for b in batches])


def get_importance_weights(
    model,
    adata,
    cell_idx: np.ndarray,
    draws: dict[str, torch.Tensor],
    max_cells: int = 1024,
    truncation: bool = False,
    n_mc_samples: int = 500,
    n_mc_samples_per_pass: int = 250,
    seed: int = 0,
) -> np.ndarray:
    """Normalised importance weights of the pooled draws of the cells ``cell_idx``.

    ``draws`` holds, per draw, ``z`` ``(S, d)`` (the Gaussian draw ``u``, see
    :func:`~cellvi.analysis._diagnostics.latent_draws`), ``log_pz`` ``(S,)`` (the model's
    log prior of each draw, :func:`~cellvi.analysis._diagnostics.log_prior_z`),
    ``log_rho`` ``(S, G)``, ``theta`` (``(G,)`` or ``(S, G)``; absent for Poisson) and
    ``zi_logits`` ``(S, G)`` (ZINB), and per cell ``qz_m``/``qz_v`` ``(n, d)`` aligned with
    ``cell_idx``. ``max_cells`` anchors are drawn from the group; ``truncation`` raises
    log-weights below their log-mean to it (Ionides 2008).
    """
    _check_model(model)
    max_cells = check_count(max_cells, "max_cells")
    rng = np.random.default_rng(seed)
    n = len(cell_idx)
    anchors = (
        np.sort(rng.choice(n, size=max_cells, replace=False)) if n > max_cells else np.arange(n)
    )
    log_px = torch.as_tensor(
        get_marginal_ll(
            model,
            adata,
            cell_idx[anchors],
            n_mc_samples=n_mc_samples,
            return_mean=False,
            n_mc_samples_per_pass=n_mc_samples_per_pass,
        ),
        dtype=torch.float32,
    )
    x = _anchors_data(model, adata, cell_idx[anchors])
    qm, qv = draws["qz_m"][anchors], draws["qz_v"][anchors]
    lik = model.module.config.gene_likelihood
    z, theta, zl = draws["z"], draws.get("theta"), draws.get("zi_logits")
    log_w = torch.empty(len(z))
    draw_chunk = max(8, 2**18 // x.shape[1])  # (draws, genes) blocks of about 1 MB
    for s0 in range(0, len(z), draw_chunk):
        sl = slice(s0, s0 + draw_chunk)
        zs = z[sl]
        log_pz = draws["log_pz"][sl]
        diff = zs[:, None, :] - qm[None]  # (s, a, d)
        log_q = -0.5 * (diff.pow(2) / qv[None] + qv[None].log() + math.log(2 * math.pi)).sum(-1)
        th = theta if theta is None or theta.dim() == 1 else theta[sl]
        ll = pairwise_log_likelihood(
            lik, x, draws["log_rho"][sl], th, None if zl is None else zl[sl]
        )
        joint = log_pz[:, None] + ll - log_px[None, :]
        log_w[sl] = torch.logsumexp(joint, 1) - torch.logsumexp(log_q, 1)
    if truncation:
        tau = torch.logsumexp(log_w, 0) - math.log(len(log_w))
        log_w = log_w.clamp_min(tau)
    weights = torch.softmax(log_w.double(), 0).numpy()
    ess = 1.0 / float(np.sum(weights**2))
    if ess < max(10.0, 0.01 * len(weights)):
        warnings.warn(
            f"The importance weights collapsed onto about {ess:.1f} of {len(weights)} draws "
            "(effective sample size), so statistics resampled from them are over-confident. "
            "Try truncation=True, or weights='uniform'.",
            CellviWarning,
            stacklevel=2,
        )
    return weights


def importance_resample(
    model, adata, cell_idx, code, n_overall: int, seed: int, batch_size=None, **kwargs
) -> np.ndarray:
    """``n_overall`` ρ rows resampled by importance weight from ``n_overall // n + 1`` draws
    per cell of ``cell_idx`` decoded under the batch ``code`` (None: each cell's own)."""
    _check_model(model)
    for name in ("max_cells", "n_mc_samples", "n_mc_samples_per_pass"):
        if name in kwargs:  # refused before any sampling
            check_count(kwargs[name], name)
    module = model.module
    k = n_overall // len(cell_idx) + 1
    parts: dict[str, list] = {
        k_: [] for k_ in ("z", "log_pz", "log_rho", "theta", "zi_logits", "qz_m", "qz_v")
    }
    with private_rng(model.device), eval_mode(module):
        torch.manual_seed(seed)
        batches = inference_batches(
            model,
            adata,
            cell_idx,
            batch_size,
            sparse_x=True,
            elements_per_cell=3 * module.n_input * k,
        )
        for batch in batches:
            inf = module.inference(batch, library=False, sample_z=False)
            u, z = latent_draws(module, inf, k)  # (k, cells, d)
            zero_lib = torch.zeros(*z.shape[:-1], 1, device=z.device)
            px = module.generative(z, zero_lib, batch, transform_batch=code)
            parts["z"].append(_flat(u))  # draws cell-major: (cells · k, d)
            # the model's prior (SCANVI: its hierarchical prior), as in get_marginal_ll
            parts["log_pz"].append(log_prior_z(module, u, z).T.reshape(-1).cpu())
            parts["log_rho"].append(_flat(px["log_scale"]))
            theta = px["theta"]  # None for a Poisson likelihood
            if theta is not None:
                parts["theta"].append(
                    theta if theta.dim() == 1 else _flat(theta.expand_as(px["log_scale"]))
                )
            if px.get("dropout_logits") is not None:
                parts["zi_logits"].append(_flat(px["dropout_logits"]))
            parts["qz_m"].append(inf["qz_m"].cpu())
            parts["qz_v"].append(inf["qz_v"].cpu())
    draws = {
        key: (values[0].cpu() if key == "theta" and values[0].dim() == 1 else torch.cat(values))
        for key, values in parts.items()
        if values
    }
    with private_rng(model.device):  # the anchors' marginal likelihoods draw too
        torch.manual_seed(seed + 1)
        weights = get_importance_weights(
            model, adata, np.asarray(cell_idx), draws, seed=seed, **kwargs
        )
    chosen = np.random.default_rng(seed).choice(
        len(weights), size=n_overall, replace=True, p=weights
    )
    return draws["log_rho"][torch.from_numpy(chosen)].exp().numpy()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``(k, cells, G)`` → ``(cells · k, G)``, cell-major."""
    return t.transpose(0, 1).reshape(-1, t.shape[-1]).cpu()
