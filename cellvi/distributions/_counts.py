"""Count distributions as torch ``Distribution`` objects (sampling, moments, log-prob)."""

from __future__ import annotations

import warnings

import torch
from torch.distributions import Distribution, constraints

from ._functional import log_mixture_nb, log_nb_positive, log_poisson, log_zinb_positive

__all__ = ["NegativeBinomial", "ZeroInflatedNegativeBinomial", "Poisson", "NegativeBinomialMixture"]

_GAMMA_CLAMP = 1e8


def _gamma_poisson(mu: torch.Tensor, theta: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """NB draws as Poisson(Gamma(shape θ, rate θ/μ)); the Gamma draw is clamped at 1e8."""
    concentration = theta.expand(shape) if theta.shape != shape else theta
    rate = concentration / mu.expand(shape)
    gamma = torch.distributions.Gamma(concentration, rate).sample()
    return torch.poisson(torch.clamp(gamma, max=_GAMMA_CLAMP))


def _check_value(dist: Distribution, value: torch.Tensor) -> None:
    """With ``validate_args``, warn (as scvi-tools does) on values outside the support
    (negative or non-integer counts): the densities are still evaluated there."""
    if dist._validate_args:
        try:
            dist._validate_sample(value)
        except ValueError:
            warnings.warn(
                "The value argument must be within the support of the distribution "
                "(non-negative integers).",
                UserWarning,
                stacklevel=3,
            )


class NegativeBinomial(Distribution):
    """Negative binomial with mean ``mu`` and inverse dispersion ``theta``.

    Variance is ``mu + mu² / theta``. ``scale`` optionally carries the normalised
    frequencies ρ the mean was built from.
    """

    arg_constraints = {"mu": constraints.greater_than_eq(0), "theta": constraints.positive}
    support = constraints.nonnegative_integer

    def __init__(self, mu, theta, scale=None, validate_args: bool = False):
        self.mu, self.theta = torch.broadcast_tensors(mu, theta)
        self.scale = scale
        super().__init__(batch_shape=self.mu.shape, validate_args=validate_args)

    @property
    def mean(self):
        return self.mu

    @property
    def variance(self):
        return self.mu + self.mu.pow(2) / self.theta

    def log_prob(self, value):
        _check_value(self, value)
        return log_nb_positive(value, self.mu, self.theta)

    @torch.inference_mode()
    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        return _gamma_poisson(self.mu, self.theta, shape)


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """NB with an extra zero gate of probability ``sigmoid(zi_logits)``.

    Mean ``(1−π)μ``, variance ``(1−π)μ(μ+θ+πμθ)/θ``.
    """

    arg_constraints = {
        "mu": constraints.greater_than_eq(0),
        "theta": constraints.positive,
        "zi_logits": constraints.real,
    }

    def __init__(self, mu, theta, zi_logits, scale=None, validate_args: bool = False):
        # all three broadcast together, and zi_logits is set before the argument check reads it
        mu, theta, self.zi_logits = torch.broadcast_tensors(mu, theta, zi_logits)
        super().__init__(mu, theta, scale=scale, validate_args=validate_args)

    @property
    def zi_probs(self):
        return torch.sigmoid(self.zi_logits)

    @property
    def mean(self):
        return (1 - self.zi_probs) * self.mu

    @property
    def variance(self):
        pi = self.zi_probs
        return (1 - pi) * self.mu * (self.mu + self.theta + pi * self.mu * self.theta) / self.theta

    def log_prob(self, value):
        _check_value(self, value)
        return log_zinb_positive(value, self.mu, self.theta, self.zi_logits)

    @torch.inference_mode()
    def sample(self, sample_shape=torch.Size()):
        counts = super().sample(sample_shape)
        gate = torch.bernoulli(self.zi_probs.expand(counts.shape))
        return torch.where(gate.bool(), torch.zeros_like(counts), counts)


class Poisson(torch.distributions.Poisson):
    """Poisson with rate ``rate`` that also carries ``scale`` (ρ) and ``mu`` (= rate)."""

    def __init__(self, rate, scale=None, validate_args: bool = False):
        super().__init__(rate, validate_args=validate_args)
        self.scale = scale

    @property
    def mu(self):
        return self.rate

    def log_prob(self, value):
        _check_value(self, value)
        return log_poisson(value, self.rate)

    @torch.inference_mode()
    def sample(self, sample_shape=torch.Size()):
        return torch.poisson(
            torch.clamp(self.rate.expand(self._extended_shape(sample_shape)), max=_GAMMA_CLAMP)
        )


class NegativeBinomialMixture(Distribution):
    """Mixture of two NBs sharing ``theta1`` (or ``theta2`` for the second component).

    ``sigmoid(mixture_logits)`` is the probability of the first component.
    """

    arg_constraints = {}
    support = constraints.nonnegative_integer

    def __init__(self, mu1, mu2, theta1, mixture_logits, theta2=None, validate_args: bool = False):
        self.mu1, self.mu2, self.theta1, self.mixture_logits = torch.broadcast_tensors(
            mu1, mu2, theta1, mixture_logits
        )
        self.theta2 = theta2
        super().__init__(batch_shape=self.mu1.shape, validate_args=validate_args)

    @property
    def mixture_probs(self):
        return torch.sigmoid(self.mixture_logits)

    @property
    def mean(self):
        pi = self.mixture_probs
        return pi * self.mu1 + (1 - pi) * self.mu2

    def log_prob(self, value):
        _check_value(self, value)
        return log_mixture_nb(
            value, self.mu1, self.mu2, self.theta1, self.mixture_logits, self.theta2
        )

    @torch.inference_mode()
    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        first = torch.bernoulli(self.mixture_probs.expand(shape)).bool()
        mu = torch.where(first, self.mu1.expand(shape), self.mu2.expand(shape))
        theta = self.theta1 if self.theta2 is None else torch.where(first, self.theta1, self.theta2)
        return _gamma_poisson(mu, theta.expand(shape), shape)
