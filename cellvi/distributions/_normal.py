"""Gaussian likelihood over the raw counts (SCVI's experimental ``gene_likelihood="normal"``)."""

from __future__ import annotations

import math

import torch

__all__ = ["Normal", "log_normal_density"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def log_normal_density(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Elementwise ``log N(x; mu, sigma²)`` (``sigma`` is the standard deviation).

    Examples
    --------
    >>> import torch
    >>> round(float(log_normal_density(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0))), 4)
    -0.9189
    """
    z = (x - mu) / sigma
    return -0.5 * z * z - torch.log(sigma) - _HALF_LOG_2PI


class Normal(torch.distributions.Normal):
    """Normal with mean ``mu`` and standard deviation ``sigma`` that also carries ρ.

    As in the count distributions, ``mu`` is the rate ``e^l ρ``; the normalised frequencies
    ρ it was built from are kept as ``rho`` (``scale`` keeps torch's meaning, the standard
    deviation). Draws are real numbers and may be negative.
    """

    def __init__(self, mu, sigma, rho=None, validate_args: bool = False):
        super().__init__(mu, sigma, validate_args=validate_args)
        self.rho = rho

    @property
    def mu(self):
        return self.loc

    def log_prob(self, value):
        return log_normal_density(value, self.loc, self.scale)
