"""Count log-likelihoods without ``lgamma``/``digamma``, for ``torch.compile``.

Under ``torch.compile`` the whole likelihood becomes one fused, vectorised loop, but
``lgamma`` and ``digamma`` are evaluated one element at a time there, and the gather-at-nonzeros
trick of :mod:`._fused` has data-dependent shapes. For integer counts the log-gamma terms have
a form built only from ``log`` and arithmetic (which vectorise, and whose derivatives are
again ``log``-free):

``lgamma(x + θ) - lgamma(θ) - lgamma(x + 1) = Σ_{k<x} log(θ + k) - log x!``

summed exactly for ``x ≤ K`` and, for larger counts, continued with the Stirling series, which
at arguments ``≥ K = 4`` is exact to float32 precision. The result is zero at ``x = 0``. The
continuation is written as a difference (``log1p`` of the relative step), so a huge ``θ`` does
not cancel two numbers of size ``θ log θ``. Its derivative in ``θ``,
``ψ(x + θ) - ψ(θ) = Σ_{k<x} 1/(θ + k)``, is built the same way (:func:`digamma_difference`).

Outside ``torch.compile`` the fused kernels of :mod:`._fused` read the same sums from
per-gene tables instead, and take ``lgamma``/``digamma`` in float64 beyond them.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

__all__ = [
    "digamma_difference",
    "log_factorial",
    "log_gamma_ratio",
    "nb_log_likelihood_gammaless",
    "poisson_log_likelihood_gammaless",
    "zinb_log_likelihood_gammaless",
]

_K = 4
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_FACT = [math.lgamma(k + 1) for k in range(_K + 1)]
_SOFTPLUS_LINEAR = 40.0  # as in ._fused: torch's default (20) drops log1p(e^-u) ≈ 2e-9


def _series(z: torch.Tensor) -> torch.Tensor:
    """``lgamma(z) - ((z - 1/2) log z - z + log(2π)/2)`` for ``z ≥ 4`` (to ``z^-7``; error
    below 4e-9)."""
    r = z.reciprocal()
    r2 = r * r
    return r * (1 / 12 - r2 * (1 / 360 - r2 * (1 / 1260 - r2 / 1680)))


def _stirling(z: torch.Tensor) -> torch.Tensor:
    """``lgamma(z)`` for ``z ≥ 4``."""
    return (z - 0.5) * z.log() - z + _HALF_LOG_2PI + _series(z)


def _psi_series(z: torch.Tensor) -> torch.Tensor:
    """``log z - ψ(z)`` for ``z ≥ 4`` (asymptotic series to ``z^-10``; error below 2e-9)."""
    r = z.reciprocal()
    r2 = r * r
    poly = 1 / 12 - r2 * (1 / 120 - r2 * (1 / 252 - r2 * (1 / 240 - r2 / 132)))
    return r * 0.5 + r2 * poly


def _split(x: torch.Tensor, theta: torch.Tensor, term):
    """``Σ_{k<min(x, K)} term(θ + k)``, and the tail's step ``d = max(x - K, 0)`` with its ends
    ``z0 = θ + K``, ``z1 = z0 + d``."""
    small = torch.zeros_like(x)
    for k in range(_K):
        small = small + torch.where(x > k, term(theta + k), 0.0)
    d = torch.clamp(x - _K, min=0)
    z0 = theta + _K
    return small, d, z0, z0 + d


def log_gamma_ratio(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``lgamma(x + θ) - lgamma(θ) - lgamma(x + 1)`` for integer counts ``x ≥ 0``.

    ``theta`` is ``(genes,)`` or broadcastable to ``x``.

    Examples
    --------
    >>> import torch, math
    >>> v = log_gamma_ratio(torch.tensor([0.0, 3.0, 50.0]), torch.tensor(2.5))
    >>> [round(float(a), 4) for a in v]
    [0.0, 1.8814, 5.6204]
    """
    small, d, z0, z1 = _split(x, theta, torch.log)
    # lgamma(z1) - lgamma(z0) (d = 0 where x ≤ K: the tail is 0)
    tail = (z0 - 0.5) * torch.log1p(d / z0) + d * (z1.log() - 1) + _series(z1) - _series(z0)
    return small + tail - log_factorial(x)


def digamma_difference(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``ψ(x + θ) - ψ(θ)`` (the ``θ``-derivative of :func:`log_gamma_ratio`) for integer
    counts ``x ≥ 0``; ``theta`` broadcastable to ``x``.

    Examples
    --------
    >>> import torch
    >>> v = digamma_difference(torch.tensor([0.0, 2.0, 50.0]), torch.tensor(2.5))
    >>> [round(float(a), 4) for a in v]
    [0.0, 0.6857, 3.2481]
    """
    small, d, z0, z1 = _split(x, theta, torch.reciprocal)
    return small + torch.log1p(d / z0) - _psi_series(z1) + _psi_series(z0)


def log_factorial(x: torch.Tensor) -> torch.Tensor:
    """``log x! = lgamma(x + 1)`` for integer counts, from a table and the Stirling series."""
    log_fact = torch.zeros_like(x)
    for k in range(_K):
        log_fact = torch.where(x > k, _LOG_FACT[k + 1], log_fact)
    x_big = torch.clamp(x, min=_K)
    return log_fact + _stirling(x_big + 1) - _stirling(torch.full_like(x, _K + 1))


def zinb_log_likelihood_gammaless(
    x: torch.Tensor, log_mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor
) -> torch.Tensor:
    """``Σ_g log ZINB`` per cell, like :func:`~cellvi.distributions.zinb_log_likelihood`."""
    u = log_mu - theta.log()  # log(μ / θ); softplus(u) = log(1 + μ/θ), as in the fused kernels
    log1p_ratio = F.softplus(u, threshold=_SOFTPLUS_LINEAR)
    a = -theta * log1p_ratio - zi_logits
    softplus_a = F.softplus(a)
    positive = x > 0
    ll = (
        softplus_a
        - F.softplus(-zi_logits)
        + torch.where(positive, a - softplus_a, 0.0)
        + x * (u - log1p_ratio)
        + log_gamma_ratio(x, theta)
    )
    return ll.sum(-1)


def nb_log_likelihood_gammaless(
    x: torch.Tensor, log_mu: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """``Σ_g log NB`` per cell, like :func:`~cellvi.distributions.nb_log_likelihood`."""
    u = log_mu - theta.log()
    log1p_ratio = F.softplus(u, threshold=_SOFTPLUS_LINEAR)
    ll = x * (u - log1p_ratio) - theta * log1p_ratio + log_gamma_ratio(x, theta)
    return ll.sum(-1)


def poisson_log_likelihood_gammaless(x: torch.Tensor, log_mu: torch.Tensor) -> torch.Tensor:
    """``Σ_g log Poisson`` per cell, like :func:`~cellvi.distributions.poisson_log_likelihood`."""
    return (x * log_mu - log_mu.exp() - log_factorial(x)).sum(-1)
