"""Count likelihoods against scipy, at limit cases, and against sample moments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from cellvi.distributions import (
    NegativeBinomial,
    NegativeBinomialMixture,
    Poisson,
    ZeroInflatedNegativeBinomial,
    log_mixture_nb,
    log_nb_positive,
    log_poisson,
    log_zinb_positive,
    nb_log_likelihood,
    poisson_log_likelihood,
    zinb_log_likelihood,
)

CASES = [  # (x, mu, theta): zeros, huge counts, tiny and huge dispersion, tiny means
    (0.0, 5.0, 2.0),
    (3.0, 5.0, 2.0),
    (1e5, 9e4, 10.0),
    (0.0, 1e-6, 1.0),
    (2.0, 1e-3, 1e-3),
    (7.0, 3.0, 1e-3),
    (4.0, 3.0, 1e6),
]


def _t(v):
    return torch.tensor(v, dtype=torch.float64)


@pytest.mark.parametrize("x, mu, theta", CASES)
def test_nb_log_prob_matches_scipy(x, mu, theta):
    expected = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    got = float(log_nb_positive(_t(x), _t(mu), _t(theta), eps=0.0))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("x, mu, theta", CASES)
def test_zinb_log_prob_matches_scipy_mixture(x, mu, theta):
    pi = 0.3
    nb = stats.nbinom.pmf(x, theta, theta / (theta + mu))
    expected = np.log((pi if x == 0 else 0.0) + (1 - pi) * nb)
    logit = np.log(pi / (1 - pi))
    got = float(log_zinb_positive(_t(x), _t(mu), _t(theta), _t(logit), eps=0.0))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_zinb_with_closed_gate_equals_nb():
    x = torch.tensor([0.0, 1.0, 5.0, 40.0])
    mu, theta = torch.full((4,), 6.0), torch.full((4,), 3.0)
    torch.testing.assert_close(
        log_zinb_positive(x, mu, theta, torch.full((4,), -30.0)), log_nb_positive(x, mu, theta)
    )


def test_nb_with_huge_theta_tends_to_poisson():
    x = torch.arange(0, 20, dtype=torch.float64)
    mu = torch.full_like(x, 4.0)
    nb = log_nb_positive(x, mu, torch.full_like(x, 1e7), eps=0.0)
    np.testing.assert_allclose(nb, stats.poisson.logpmf(x.numpy(), 4.0), atol=1e-4)


def test_poisson_matches_scipy():
    x = torch.tensor([0.0, 1.0, 10.0, 300.0], dtype=torch.float64)
    rate = torch.tensor([0.5, 2.0, 10.0, 280.0], dtype=torch.float64)
    np.testing.assert_allclose(
        log_poisson(x, rate, eps=0.0), stats.poisson.logpmf(x.numpy(), rate.numpy()), rtol=1e-10
    )


def test_nb_mixture_equals_manual_log_sum():
    x, mu1, mu2, theta = _t([0.0, 3.0]), _t([1.0, 2.0]), _t([20.0, 30.0]), _t([4.0, 4.0])
    logits = _t([0.4, -1.0])
    p = torch.sigmoid(logits)
    manual = torch.log(
        p * log_nb_positive(x, mu1, theta).exp() + (1 - p) * log_nb_positive(x, mu2, theta).exp()
    )
    torch.testing.assert_close(log_mixture_nb(x, mu1, mu2, theta, logits), manual)


def test_gradients_are_finite_at_edge_cases():
    x = torch.tensor([0.0, 1e5, 0.0, 3.0])
    mu = torch.tensor([1e-9, 1e5, 50.0, 1e-8], requires_grad=True)
    theta = torch.tensor([1e-3, 1e6, 1e-4, 1.0], requires_grad=True)
    logits = torch.zeros(4, requires_grad=True)
    log_zinb_positive(x, mu, theta, logits).sum().backward()
    for p in (mu, theta, logits):
        assert torch.isfinite(p.grad).all()


def _random_counts(n=12, g=15, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, g, generator=gen, dtype=torch.float64) * 6, generator=gen)
    x[:, 0] = 0.0
    x[0, 1] = 1e4
    log_mu = torch.randn(n, g, generator=gen, dtype=torch.float64) * 2
    return x, log_mu, gen


@pytest.mark.parametrize("theta_shape", ["gene", "cell-gene"])
def test_fused_zinb_equals_reference_and_has_correct_gradients(theta_shape):
    x, log_mu, gen = _random_counts()
    shape = (x.shape[1],) if theta_shape == "gene" else x.shape
    theta = (torch.rand(shape, generator=gen, dtype=torch.float64) * 5 + 0.05).requires_grad_()
    logits = torch.randn(x.shape, generator=gen, dtype=torch.float64).requires_grad_()
    log_mu.requires_grad_()
    reference = log_zinb_positive(x, log_mu.exp(), theta, logits, eps=0.0).sum(-1)
    torch.testing.assert_close(zinb_log_likelihood(x, log_mu, theta, logits), reference)
    assert torch.autograd.gradcheck(
        lambda a, b, c: zinb_log_likelihood(x, a, b, c), (log_mu, theta, logits)
    )


@pytest.mark.parametrize("theta_shape", ["gene", "cell-gene"])
def test_fused_nb_equals_reference_and_has_correct_gradients(theta_shape):
    x, log_mu, gen = _random_counts(seed=1)
    shape = (x.shape[1],) if theta_shape == "gene" else x.shape
    theta = (torch.rand(shape, generator=gen, dtype=torch.float64) * 5 + 0.05).requires_grad_()
    log_mu.requires_grad_()
    reference = log_nb_positive(x, log_mu.exp(), theta, eps=0.0).sum(-1)
    torch.testing.assert_close(nb_log_likelihood(x, log_mu, theta), reference)
    assert torch.autograd.gradcheck(lambda a, b: nb_log_likelihood(x, a, b), (log_mu, theta))


def test_fused_poisson_equals_reference():
    x, log_mu, _ = _random_counts(seed=2)
    torch.testing.assert_close(
        poisson_log_likelihood(x, log_mu), log_poisson(x, log_mu.exp(), eps=0.0).sum(-1)
    )


def test_nb_sample_moments():
    torch.manual_seed(0)
    dist = NegativeBinomial(mu=torch.full((200_000,), 8.0), theta=torch.full((200_000,), 2.0))
    draws = dist.sample()
    # 200k draws: standard error of the mean is sqrt(40/2e5) ~ 0.014, of the variance ~0.5
    assert float(draws.mean()) == pytest.approx(8.0, abs=0.07)
    assert float(draws.var()) == pytest.approx(float(dist.variance[0]), rel=0.05)


def test_zinb_sample_moments():
    torch.manual_seed(1)
    n = 200_000
    dist = ZeroInflatedNegativeBinomial(
        mu=torch.full((n,), 5.0), theta=torch.full((n,), 3.0), zi_logits=torch.full((n,), -0.5)
    )
    draws = dist.sample()
    assert float(draws.mean()) == pytest.approx(float(dist.mean[0]), rel=0.02)
    assert float(draws.var()) == pytest.approx(float(dist.variance[0]), rel=0.05)
    pi = float(torch.sigmoid(torch.tensor(-0.5)))
    p0 = pi + (1 - pi) * stats.nbinom.pmf(0, 3.0, 3.0 / 8.0)
    assert float((draws == 0).float().mean()) == pytest.approx(p0, abs=0.005)


def test_poisson_and_mixture_sample_means():
    torch.manual_seed(2)
    pois = Poisson(torch.full((100_000,), 3.0), scale=torch.full((100_000,), 0.1))
    assert float(pois.sample().mean()) == pytest.approx(3.0, abs=0.03)
    assert pois.mu is pois.rate
    mix = NegativeBinomialMixture(
        torch.full((100_000,), 2.0),
        torch.full((100_000,), 20.0),
        torch.full((100_000,), 5.0),
        torch.zeros(100_000),
    )
    assert float(mix.sample().mean()) == pytest.approx(11.0, rel=0.03)
