"""The lgamma-free likelihoods used under torch.compile, against lgamma and the fused kernels."""

from __future__ import annotations

import pytest
import torch
from scipy import special

from cellvi.distributions import (
    digamma_difference,
    log_factorial,
    log_gamma_ratio,
    nb_log_likelihood,
    nb_log_likelihood_gammaless,
    poisson_log_likelihood,
    poisson_log_likelihood_gammaless,
    zinb_log_likelihood,
    zinb_log_likelihood_gammaless,
)

COUNTS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 31, 100, 999, 12_345, 250_000]
THETAS = [1e-6, 1e-3, 0.05, 0.5, 1.0, 3.9999, 4.0, 17.0, 1e3, 1e6]


@pytest.mark.parametrize("theta", THETAS)
def test_log_gamma_ratio_matches_scipy_in_float64(theta):
    x = torch.tensor(COUNTS, dtype=torch.float64)
    got = log_gamma_ratio(x, torch.tensor(theta, dtype=torch.float64)).numpy()
    xn = x.numpy()
    want = special.gammaln(xn + theta) - special.gammaln(theta) - special.gammaln(xn + 1)
    scale = 1 + abs(want)
    assert (abs(got - want) / scale).max() < 1e-9
    assert got[0] == 0.0  # a zero count contributes nothing


@pytest.mark.parametrize("theta", THETAS)
def test_log_gamma_ratio_gradient_is_the_digamma_difference(theta):
    x = torch.tensor(COUNTS, dtype=torch.float64)
    t = torch.full_like(x, theta, requires_grad=True)
    log_gamma_ratio(x, t).sum().backward()
    want = special.digamma(x.numpy() + theta) - special.digamma(theta)
    assert abs(t.grad.numpy() - want).max() / (1 + abs(want).max()) < 1e-7
    assert float(t.grad[0]) == 0.0


@pytest.mark.parametrize("theta", THETAS)
def test_digamma_difference_matches_scipy_in_float64(theta):
    x = torch.tensor(COUNTS, dtype=torch.float64)
    got = digamma_difference(x, torch.tensor(theta, dtype=torch.float64)).numpy()
    want = special.digamma(x.numpy() + theta) - special.digamma(theta)
    assert (abs(got - want) / (1 + abs(want))).max() < 1e-9
    assert got[0] == 0.0


def test_log_gamma_ratio_float32_error_is_float32_rounding():
    x = torch.tensor(COUNTS[:-1], dtype=torch.float32)
    for theta in THETAS[:-1]:
        t = torch.tensor(theta)
        exact = log_gamma_ratio(x.double(), t.double())
        err = (log_gamma_ratio(x, t).double() - exact).abs()
        terms = torch.lgamma(x + t).abs() + torch.lgamma(t).abs() + torch.lgamma(x + 1).abs()
        assert (err <= 8 * 2**-23 * (1 + terms.double())).all(), theta


def _batch(seed, theta_2d):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(16, 30, generator=gen, dtype=torch.float64) * 4, generator=gen)
    x[0, :3] = torch.tensor([50.0, 900.0, 2e4])
    log_mu = (torch.randn(16, 30, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    shape = x.shape if theta_2d else (30,)
    theta = (torch.rand(shape, generator=gen, dtype=torch.float64) * 20 + 1e-3).requires_grad_()
    logits = torch.randn(16, 30, generator=gen, dtype=torch.float64).requires_grad_()
    return x, log_mu, theta, logits


def _grads(value, params):
    return torch.autograd.grad(value.sum(), params)


@pytest.mark.parametrize("theta_2d", [False, True])
def test_gammaless_zinb_equals_fused_kernel_with_gradients(theta_2d):
    x, log_mu, theta, logits = _batch(0, theta_2d)
    params = (log_mu, theta, logits)
    ours = zinb_log_likelihood_gammaless(x, log_mu, theta, logits)
    fused = zinb_log_likelihood(x, log_mu, theta, logits)
    torch.testing.assert_close(ours, fused)
    for a, b in zip(_grads(ours, params), _grads(fused, params), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("theta_2d", [False, True])
def test_gammaless_nb_equals_fused_kernel_with_gradients(theta_2d):
    x, log_mu, theta, _ = _batch(1, theta_2d)
    ours = nb_log_likelihood_gammaless(x, log_mu, theta)
    fused = nb_log_likelihood(x, log_mu, theta)
    torch.testing.assert_close(ours, fused)
    for a, b in zip(_grads(ours, (log_mu, theta)), _grads(fused, (log_mu, theta)), strict=True):
        torch.testing.assert_close(a, b)


def test_log_factorial_and_gammaless_poisson():
    x = torch.tensor(COUNTS, dtype=torch.float64)
    want = special.gammaln(x.numpy() + 1)
    assert (abs(log_factorial(x).numpy() - want) / (1 + want)).max() < 1e-9
    x, log_mu, _, _ = _batch(2, False)
    torch.testing.assert_close(
        poisson_log_likelihood_gammaless(x, log_mu), poisson_log_likelihood(x, log_mu)
    )
