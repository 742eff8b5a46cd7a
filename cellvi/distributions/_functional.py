"""Elementwise log-likelihoods of count distributions (``models.md`` §0).

The NB terms ``log(θ/(θ+μ))`` and ``log(μ/(θ+μ))`` are written as ``-log1p`` of a ratio, not
as differences of logarithms, which lose all their digits in float32 when one of ``θ`` and
``μ`` is small against the other (``eps`` keeps both ratios finite).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["log_nb_positive", "log_zinb_positive", "log_poisson", "log_mixture_nb"]


def log_nb_positive(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """``log NB(x; mean mu, inverse dispersion theta)`` elementwise.

    Examples
    --------
    >>> import torch
    >>> float(log_nb_positive(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1e8)).exp())
    0.36...
    """
    return (
        -theta * torch.log1p(mu / (theta + eps))
        - x * torch.log1p(theta / (mu + eps))
        + _log_gamma_ratio(x, theta)
    )


def log_zinb_positive(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    zi_logits: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``log ZINB(x; mu, theta, zero-inflation logits)`` elementwise.

    The gate probability is ``sigmoid(zi_logits)``; for ``x = 0`` the log-gamma terms cancel
    and are not evaluated.
    """
    softplus_neg_logits = F.softplus(-zi_logits)
    a = -zi_logits - theta * torch.log1p(mu / (theta + eps))
    case_zero = F.softplus(a) - softplus_neg_logits
    case_nonzero = (
        -softplus_neg_logits + a - x * torch.log1p(theta / (mu + eps)) + _log_gamma_ratio(x, theta)
    )
    return torch.where(x < 1e-8, case_zero, case_nonzero)


def _log_gamma_ratio(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    # grouped: added term by term to an O(1) value, lgamma(θ) of a huge θ would swamp it; and
    # in float64, as lgamma(x + θ) - lgamma(θ) keeps no digits in float32 once θ is large
    dtype = torch.promote_types(x.dtype, theta.dtype)
    if dtype != torch.float64 and x.device.type != "mps":  # no float64 on MPS
        x, theta = x.double(), theta.double()
    ratio = torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
    return ratio.to(dtype)


def log_poisson(x: torch.Tensor, rate: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``log Poisson(x; rate) = x log λ − λ − lgamma(x+1)`` elementwise (``models.md`` §0, as
    the fused kernel: no ``eps`` unless given). A zero rate is read as the smallest normal
    number, which keeps ``0 · log 0 = 0`` and the gradients finite."""
    log_rate = torch.log(torch.clamp(rate + eps, min=torch.finfo(rate.dtype).tiny))
    return x * log_rate - rate - torch.lgamma(x + 1)


def log_mixture_nb(
    x: torch.Tensor,
    mu1: torch.Tensor,
    mu2: torch.Tensor,
    theta1: torch.Tensor,
    mixture_logits: torch.Tensor,
    theta2: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Two-component NB mixture; ``sigmoid(mixture_logits)`` = P(component 1)."""
    log1 = log_nb_positive(x, mu1, theta1, eps)
    log2 = log_nb_positive(x, mu2, theta1 if theta2 is None else theta2, eps)
    stacked = torch.stack([log1, log2 - mixture_logits], dim=0)
    return torch.logsumexp(stacked, dim=0) - F.softplus(-mixture_logits)
