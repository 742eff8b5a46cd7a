"""Count log-likelihoods without ``lgamma``/``digamma``, for ``torch.compile``.

Under ``torch.compile`` the whole likelihood becomes one fused, vectorised loop, but
``lgamma`` and ``digamma`` are evaluated one element at a time there, and the gather-at-nonzeros
trick of :mod:`._fused` has data-dependent shapes. For integer counts the log-gamma terms have
a form built only from ``log`` and arithmetic (which vectorise, and whose derivatives are
again ``log``-free):

``lgamma(x + θ) - lgamma(θ) - lgamma(x + 1) = Σ_{k<x} log(θ + k) - log x!``

summed exactly for ``x ≤ K`` and, for larger counts, continued with the Stirling series, which
at arguments ``≥ K = 4`` is exact to float32 precision. The result is zero at ``x = 0``.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

__all__ = [
    "log_factorial",
    "log_gamma_ratio",
    "nb_log_likelihood_gammaless",
    "poisson_log_likelihood_gammaless",
    "zinb_log_likelihood_gammaless",
]

_K = 4
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_FACT = [math.lgamma(k + 1) for k in range(_K + 1)]


def _stirling(z: torch.Tensor) -> torch.Tensor:
    """``lgamma(z)`` for ``z ≥ 4`` (Stirling series to ``z^-7``; error below 4e-9)."""
    r = z.reciprocal()
    r2 = r * r
    series = r * (1 / 12 - r2 * (1 / 360 - r2 * (1 / 1260 - r2 / 1680)))
    return (z - 0.5) * z.log() - z + _HALF_LOG_2PI + series


def log_gamma_ratio(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``lgamma(x + θ) - lgamma(θ) - lgamma(x + 1)`` for integer counts ``x ≥ 0``.

    ``theta`` is ``(genes,)`` or broadcastable to ``x``.

    Examples
    --------
    >>> import torch, math
    >>> v = log_gamma_ratio(torch.tensor([0.0, 3.0, 50.0]), torch.tensor(2.5))
    >>> [round(float(a), 4) for a in v]
    [0.0, 2.0794, 7.7004]
    """
    small = torch.zeros_like(x)
    for k in range(_K):
        small = small + torch.where(x > k, torch.log(theta + k), 0.0)
    x_big = torch.clamp(x, min=_K)  # = K where x ≤ K: the tail terms cancel exactly
    tail = _stirling(x_big + theta) - _stirling(theta + _K)
    return small + tail - log_factorial(x)


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
    log_t = (theta + log_mu.exp()).log()  # log(θ + μ)
    a = theta * (theta.log() - log_t) - zi_logits
    softplus_a = F.softplus(a)
    positive = x > 0
    ll = (
        softplus_a
        - F.softplus(-zi_logits)
        + torch.where(positive, a - softplus_a, 0.0)
        + x * (log_mu - log_t)
        + log_gamma_ratio(x, theta)
    )
    return ll.sum(-1)


def nb_log_likelihood_gammaless(
    x: torch.Tensor, log_mu: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """``Σ_g log NB`` per cell, like :func:`~cellvi.distributions.nb_log_likelihood`."""
    log_t = (theta + log_mu.exp()).log()
    ll = theta * (theta.log() - log_t) + x * (log_mu - log_t) + log_gamma_ratio(x, theta)
    return ll.sum(-1)


def poisson_log_likelihood_gammaless(x: torch.Tensor, log_mu: torch.Tensor) -> torch.Tensor:
    """``Σ_g log Poisson`` per cell, like :func:`~cellvi.distributions.poisson_log_likelihood`."""
    return (x * log_mu - log_mu.exp() - log_factorial(x)).sum(-1)
