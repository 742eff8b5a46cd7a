"""Per-cell count log-likelihoods with hand-written gradients (the training hot path).

A training step of SCVI spends about half its time in the likelihood. These functions take
``log μ`` (no lossy ``log(exp(·))``), evaluate the log-gamma terms only at nonzero counts
(they cancel at zero), reduce over genes inside the kernel and compute the backward pass
from closed-form derivatives, which roughly halves the number of full-size tensor passes.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["zinb_log_likelihood", "nb_log_likelihood", "poisson_log_likelihood"]


def _nonzero_parts(x: torch.Tensor, theta: torch.Tensor, nonzero: torch.Tensor):
    rows, cols = nonzero.nonzero(as_tuple=True)
    x_nz = x[rows, cols]
    theta_nz = theta[cols] if theta.dim() == 1 else theta[rows, cols]
    return rows, cols, x_nz, theta_nz


def _at_nonzeros(fn, theta: torch.Tensor, theta_nz: torch.Tensor, rows, cols) -> torch.Tensor:
    """``fn(θ)`` at the nonzero entries; evaluated once per gene when θ is per gene."""
    if theta.dim() == 1:
        return fn(theta)[cols]
    return fn(theta_nz)


def _theta_grad(dense: torch.Tensor, theta: torch.Tensor, rows, cols, sparse: torch.Tensor):
    if theta.dim() == 1:
        return dense.sum(0).index_add(0, cols, sparse)
    return dense.index_put((rows, cols), sparse, accumulate=True)


class _ZINB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, log_mu, theta, zi_logits):
        mu = log_mu.exp()
        t = theta + mu
        log_t = t.log()
        log_ratio = theta.log() - log_t  # log(θ / (θ + μ))
        a = torch.addcmul(-zi_logits, theta, log_ratio)
        softplus_a = F.softplus(a)
        mask = (x > 0).to(x.dtype)
        dense = softplus_a - F.softplus(-zi_logits) + mask * (a - softplus_a) + x * (log_mu - log_t)
        rows, cols, x_nz, th_nz = _nonzero_parts(x, theta, mask.bool())
        lgammas = (
            torch.lgamma(x_nz + th_nz)
            - torch.lgamma(x_nz + 1)
            - _at_nonzeros(torch.lgamma, theta, th_nz, rows, cols)
        )
        ll = dense.sum(-1).index_add(0, rows, lgammas)
        ctx.save_for_backward(
            x, mu, t, log_ratio, a, zi_logits, theta, mask, rows, cols, x_nz, th_nz
        )
        return ll

    @staticmethod
    def backward(ctx, grad):
        x, mu, t, log_ratio, a, zi_logits, theta, mask, rows, cols, x_nz, th_nz = ctx.saved_tensors
        g = grad.unsqueeze(-1)  # (cells, 1)
        sig_a = torch.sigmoid(a)
        s = torch.addcmul(sig_a, mask, 1 - sig_a)  # 1 where x > 0, sigmoid(a) where x = 0
        inv_t = t.reciprocal()
        grad_log_mu = g * theta * inv_t * (x - mu * s)
        grad_logits = g * ((1 - mask) * (1 - sig_a) - torch.sigmoid(zi_logits))
        dense_theta = g * (s * (log_ratio + mu * inv_t) - x * inv_t)
        digammas = (
            torch.digamma(x_nz + th_nz) - _at_nonzeros(torch.digamma, theta, th_nz, rows, cols)
        ) * grad[rows]
        grad_theta = _theta_grad(dense_theta, theta, rows, cols, digammas)
        return None, grad_log_mu, grad_theta, grad_logits


class _NB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, log_mu, theta):
        mu = log_mu.exp()
        t = theta + mu
        log_t = t.log()
        log_ratio = theta.log() - log_t
        dense = theta * log_ratio + x * (log_mu - log_t)
        rows, cols, x_nz, th_nz = _nonzero_parts(x, theta, x > 0)
        lgammas = (
            torch.lgamma(x_nz + th_nz)
            - torch.lgamma(x_nz + 1)
            - _at_nonzeros(torch.lgamma, theta, th_nz, rows, cols)
        )
        ll = dense.sum(-1).index_add(0, rows, lgammas)
        ctx.save_for_backward(x, mu, t, log_ratio, theta, rows, cols, x_nz, th_nz)
        return ll

    @staticmethod
    def backward(ctx, grad):
        x, mu, t, log_ratio, theta, rows, cols, x_nz, th_nz = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        inv_t = t.reciprocal()
        grad_log_mu = g * theta * inv_t * (x - mu)
        dense_theta = g * (log_ratio + (mu - x) * inv_t)
        digammas = (
            torch.digamma(x_nz + th_nz) - _at_nonzeros(torch.digamma, theta, th_nz, rows, cols)
        ) * grad[rows]
        return None, grad_log_mu, _theta_grad(dense_theta, theta, rows, cols, digammas)


def zinb_log_likelihood(
    x: torch.Tensor, log_mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor
) -> torch.Tensor:
    """``Σ_g log ZINB(x_ng; e^{log_mu}, θ, logits)`` per cell, shape ``(cells,)``.

    ``x``, ``log_mu``, ``zi_logits``: ``(cells, genes)``; ``theta``: ``(genes,)`` or
    ``(cells, genes)``.
    """
    return _ZINB.apply(x, log_mu, theta.expand_as(x) if theta.dim() == 2 else theta, zi_logits)


def nb_log_likelihood(x: torch.Tensor, log_mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``Σ_g log NB(x_ng; e^{log_mu}, θ)`` per cell, shape ``(cells,)``."""
    return _NB.apply(x, log_mu, theta)


def poisson_log_likelihood(x: torch.Tensor, log_mu: torch.Tensor) -> torch.Tensor:
    """``Σ_g log Poisson(x_ng; e^{log_mu})`` per cell; ``lgamma(x+1)`` only at nonzeros."""
    rows, cols = (x > 0).nonzero(as_tuple=True)
    dense = (x * log_mu - log_mu.exp()).sum(-1)
    return dense.index_add(0, rows, -torch.lgamma(x[rows, cols] + 1))
