"""Per-cell count log-likelihoods with hand-written gradients (the training hot path).

A training step of SCVI spends about half its time in the likelihood. These functions take
``log μ`` (no lossy ``log(exp(·))``), evaluate the log-gamma terms only at nonzero counts
(they cancel at zero), reduce over genes inside the kernel and compute the backward pass
from closed-form derivatives, which roughly halves the number of full-size tensor passes.

``log(θ / (θ + μ))`` is taken as ``-softplus(log μ - log θ)``: the difference of two
logarithms loses all its digits in float32 once ``θ`` is large against ``μ`` (a Poisson-like
gene), and ``log1p(μ / θ)`` overflows once ``θ`` is tiny against ``μ``.

The log-gamma terms at the nonzero counts: for whole-number counts and a per-gene ``θ`` on
the CPU they are read from per-gene tables of ``Σ_{j<k} log(θ + j) - log k!`` and
``Σ_{j<k} 1/(θ + j)`` for counts up to ``TABLE_COUNTS`` (larger counts use the Stirling forms
of :mod:`._gammaless`), several times faster than ``lgamma``/``digamma`` at every nonzero;
otherwise ``lgamma``/``digamma`` at the nonzeros in float64 (in float32 their differences
lose all their digits once ``θ`` is large).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ._gammaless import digamma_difference, log_gamma_ratio

__all__ = ["zinb_log_likelihood", "nb_log_likelihood", "poisson_log_likelihood"]

TABLE_COUNTS = 32

# torch's softplus is linear above 20, dropping log1p(e^-u) ≈ 2e-9: multiplied by a count in
# x · (u - softplus(u)) = -x log1p(θ/μ) that is 1e-3 nats at x = 1e6 in float64; above 40 the
# dropped part is below float64 resolution (no extra cost: same kernel, later switch)
_SOFTPLUS_LINEAR = 40.0


def _nonzeros(positive: torch.Tensor):
    """Flat positions, rows and columns of the ``True`` entries of a ``(cells, genes)`` mask,
    in row-major order."""
    flat = positive.reshape(-1).nonzero().squeeze(1)
    rows = torch.div(flat, positive.shape[-1], rounding_mode="floor")
    return flat, rows, flat - rows * positive.shape[-1]


def _gamma_terms(x: torch.Tensor, theta: torch.Tensor, flat, cols, need_grad: bool):
    """At the nonzero counts ``x_nz``: ``lgamma(x+θ) - lgamma(θ) - lgamma(x+1)`` and (with
    ``need_grad``) its θ-derivative ``ψ(x+θ) - ψ(θ)``, else None."""
    x_nz = x.reshape(-1).index_select(0, flat)
    theta = theta.detach()
    if x_nz.dtype != theta.dtype:  # e.g. float32 counts with a float64 model
        dtype = torch.promote_types(x_nz.dtype, theta.dtype)
        x_nz, theta = x_nz.to(dtype), theta.to(dtype)
    if theta.dim() == 1 and x.device.type == "cpu":
        counts = x_nz.to(torch.int64)
        if bool((counts == x_nz).all()):
            return _from_tables(x_nz, counts, theta, cols, need_grad)
    # lgamma(x + θ) - lgamma(θ) cancels two numbers of size θ log θ: in float32 a large θ
    # (1e4: 1e-2 nats per count, 1e6: tens of nats per cell) leaves only rounding noise, and
    # so does ψ(x + θ) - ψ(θ) ≈ x / θ; the nonzeros are evaluated in float64 instead
    out_dtype = x_nz.dtype
    wide = out_dtype if x.device.type == "mps" else torch.float64  # no float64 on MPS
    x_nz = x_nz.to(wide)
    if theta.dim() == 1:
        theta = theta.to(wide)
        theta_nz = theta.index_select(0, cols)
        lg = torch.lgamma(x_nz + theta_nz) - torch.lgamma(x_nz + 1) - torch.lgamma(theta)[cols]
        dg = torch.digamma(x_nz + theta_nz) - torch.digamma(theta)[cols] if need_grad else None
    else:
        theta_nz = theta.reshape(-1).index_select(0, flat).to(wide)
        lg = torch.lgamma(x_nz + theta_nz) - torch.lgamma(x_nz + 1) - torch.lgamma(theta_nz)
        dg = torch.digamma(x_nz + theta_nz) - torch.digamma(theta_nz) if need_grad else None
    return lg.to(out_dtype), None if dg is None else dg.to(out_dtype)


def _from_tables(x_nz, counts, theta, cols, need_grad: bool):
    """:func:`_gamma_terms` for whole-number counts and a per-gene ``θ``: one gather per term
    from ``(TABLE_COUNTS + 1, genes)`` tables; counts beyond the table are patched in."""
    n_genes, k = theta.shape[0], TABLE_COUNTS
    steps = theta.double() + torch.arange(k, dtype=torch.float64).unsqueeze(1)  # θ + j
    log_fact = torch.lgamma(torch.arange(1, k + 2, dtype=torch.float64)).unsqueeze(1)
    idx = counts.clamp(max=k).mul_(n_genes).add_(cols)
    lg_table = torch.zeros(k + 1, n_genes, dtype=torch.float64)
    torch.cumsum(steps.log(), 0, out=lg_table[1:])
    lg = lg_table.sub_(log_fact).to(x_nz.dtype).reshape(-1).index_select(0, idx)
    dg = None
    if need_grad:
        dg_table = torch.zeros(k + 1, n_genes, dtype=torch.float64)
        torch.cumsum(steps.reciprocal(), 0, out=dg_table[1:])
        dg = dg_table.to(x_nz.dtype).reshape(-1).index_select(0, idx)
    big = (counts > k).nonzero().squeeze(1)
    if len(big):
        x_big, theta_big = x_nz[big], theta[cols[big]]
        lg[big] = log_gamma_ratio(x_big, theta_big)
        if need_grad:
            dg[big] = digamma_difference(x_big, theta_big)
    return lg, dg


def _theta_grad(dense: torch.Tensor, theta: torch.Tensor, flat, cols, sparse: torch.Tensor):
    if theta.dim() == 1:
        return dense.sum(0).index_add(0, cols, sparse)
    return dense.reshape(-1).index_add(0, flat, sparse).reshape(dense.shape)


def _nb_parts(log_mu: torch.Tensor, theta: torch.Tensor):
    """``μ``, ``θ + μ``, ``log(1 + μ/θ) = -log(θ / (θ + μ))`` and ``log(μ / (θ + μ))``."""
    u = log_mu - theta.log()  # log(μ / θ)
    log1p_ratio = F.softplus(u, threshold=_SOFTPLUS_LINEAR)
    mu = log_mu.exp()
    return mu, theta + mu, log1p_ratio, u.sub_(log1p_ratio)


class _ZINB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, log_mu, theta, zi_logits):
        mu, t, log1p_ratio, log_mu_share = _nb_parts(log_mu, theta)
        a = torch.addcmul(zi_logits, theta, log1p_ratio).neg_()  # θ log(θ/(θ+μ)) - logits
        softplus_a = F.softplus(a)
        positive = x > 0
        mask = positive.to(x.dtype)
        dense = softplus_a - F.softplus(-zi_logits) + mask * (a - softplus_a)
        dense = torch.addcmul(dense, x, log_mu_share)
        flat, rows, cols = _nonzeros(positive)
        lg, dg = _gamma_terms(x, theta, flat, cols, ctx.needs_input_grad[2])
        ll = dense.sum(-1).index_add(0, rows, lg)
        ctx.save_for_backward(x, mu, t, log1p_ratio, a, zi_logits, theta, mask, flat, rows, cols)
        ctx.dg = dg
        return ll

    @staticmethod
    def backward(ctx, grad):
        x, mu, t, log1p_ratio, a, zi_logits, theta, mask, flat, rows, cols = ctx.saved_tensors
        g = grad.unsqueeze(-1)  # (cells, 1)
        sig_a = torch.sigmoid(a)
        s = torch.addcmul(sig_a, mask, 1 - sig_a)  # 1 where x > 0, sigmoid(a) where x = 0
        inv_t = t.reciprocal()
        grad_log_mu = g * theta * inv_t * (x - mu * s)
        grad_logits = g * ((1 - mask) * (1 - sig_a) - torch.sigmoid(zi_logits))
        dense_theta = g * (s * (mu * inv_t - log1p_ratio) - x * inv_t)
        grad_theta = None
        if ctx.needs_input_grad[2]:
            grad_theta = _theta_grad(dense_theta, theta, flat, cols, ctx.dg * grad[rows])
        return None, grad_log_mu, grad_theta, grad_logits


class _NB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, log_mu, theta):
        mu, t, log1p_ratio, log_mu_share = _nb_parts(log_mu, theta)
        dense = torch.addcmul(-theta * log1p_ratio, x, log_mu_share)
        positive = x > 0
        flat, rows, cols = _nonzeros(positive)
        lg, dg = _gamma_terms(x, theta, flat, cols, ctx.needs_input_grad[2])
        ll = dense.sum(-1).index_add(0, rows, lg)
        ctx.save_for_backward(x, mu, t, log1p_ratio, theta, flat, rows, cols)
        ctx.dg = dg
        return ll

    @staticmethod
    def backward(ctx, grad):
        x, mu, t, log1p_ratio, theta, flat, rows, cols = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        inv_t = t.reciprocal()
        grad_log_mu = g * theta * inv_t * (x - mu)
        dense_theta = g * ((mu - x) * inv_t - log1p_ratio)
        grad_theta = None
        if ctx.needs_input_grad[2]:
            grad_theta = _theta_grad(dense_theta, theta, flat, cols, ctx.dg * grad[rows])
        return None, grad_log_mu, grad_theta


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
    return _NB.apply(x, log_mu, theta.expand_as(x) if theta.dim() == 2 else theta)


def poisson_log_likelihood(x: torch.Tensor, log_mu: torch.Tensor) -> torch.Tensor:
    """``Σ_g log Poisson(x_ng; e^{log_mu})`` per cell; ``lgamma(x+1)`` only at nonzeros."""
    flat, rows, _ = _nonzeros(x > 0)
    dense = (x * log_mu - log_mu.exp()).sum(-1)
    return dense.index_add(0, rows, -torch.lgamma(x.reshape(-1).index_select(0, flat) + 1))
