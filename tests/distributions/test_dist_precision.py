"""Float32 accuracy of the likelihoods where naive formulas lose their digits, and the fused
kernels' paths for the log-gamma terms (tables for whole counts, lgamma otherwise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import special

from cellvi.distributions import (
    log_nb_positive,
    log_zinb_positive,
    nb_log_likelihood,
    nb_log_likelihood_gammaless,
    zinb_log_likelihood,
    zinb_log_likelihood_gammaless,
)


def _nb64(x, log_mu, theta):
    """Exact NB log-likelihood per cell in float64 (scipy)."""
    x, mu = x.double().numpy(), log_mu.double().exp().numpy()
    th = np.broadcast_to(theta.double().numpy(), x.shape)
    ll = (
        th * -np.log1p(mu / th)
        + x * -np.log1p(th / mu)
        + special.gammaln(x + th)
        - special.gammaln(th)
        - special.gammaln(x + 1)
    )
    return ll.sum(-1)


def _counts(seed=0, n=8, g=50):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, g, generator=gen) * 3, generator=gen)
    return x, torch.randn(n, g, generator=gen)


NB_KERNELS = [nb_log_likelihood, nb_log_likelihood_gammaless]


@pytest.mark.parametrize("kernel", NB_KERNELS)
@pytest.mark.parametrize("theta", [1e3, 1e5, 1e7])
def test_float32_nb_keeps_its_digits_when_theta_dwarfs_mu(kernel, theta):
    # log(θ) - log(θ + μ) in float32 cancels to nothing here (1e7: 100 nats off per cell)
    x, log_mu = _counts()
    th = torch.full((x.shape[1],), theta)
    got = kernel(x, log_mu, th).double().numpy()
    assert np.abs(got - _nb64(x, log_mu, th)).max() < 5e-3


@pytest.mark.parametrize("kernel", [zinb_log_likelihood, zinb_log_likelihood_gammaless])
def test_float32_zinb_with_a_closed_gate_is_the_accurate_nb(kernel):
    x, log_mu = _counts(seed=1)
    th = torch.full((x.shape[1],), 1e6)
    closed = torch.full(x.shape, -40.0)  # sigmoid(-40): no zero inflation
    got = kernel(x, log_mu, th, closed).double().numpy()
    assert np.abs(got - _nb64(x, log_mu, th)).max() < 5e-3


@pytest.mark.parametrize("kernel", NB_KERNELS)
def test_float32_nb_stays_finite_and_right_when_theta_is_tiny(kernel):
    x, _ = _counts(seed=2)
    log_mu = torch.full(x.shape, float(np.log(1e6)))
    th = torch.full((x.shape[1],), 1e-30)  # μ / θ = 1e36 overflows float32 if formed
    got = kernel(x, log_mu, th).double().numpy()
    want = _nb64(x, log_mu, th)
    assert np.isfinite(got).all()
    assert (np.abs(got - want) / np.abs(want)).max() < 1e-4


def test_elementwise_nb_tends_to_poisson_in_float32():
    # P(0) of a Poisson(1) is e^-1; the terms of size lgamma(1e8) must not swamp it
    p0 = log_nb_positive(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1e8)).exp()
    assert abs(float(p0) - np.exp(-1)) < 1e-6
    p0 = log_zinb_positive(
        torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1e8), torch.tensor(-40.0)
    ).exp()
    assert abs(float(p0) - np.exp(-1)) < 1e-6


def _zinb_inputs(x, seed, theta_shape=None):
    gen = torch.Generator().manual_seed(seed)
    shape = theta_shape or (x.shape[1],)
    log_mu = (torch.randn(x.shape, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    theta = (torch.rand(shape, generator=gen, dtype=torch.float64) * 5 + 0.05).requires_grad_()
    logits = torch.randn(x.shape, generator=gen, dtype=torch.float64).requires_grad_()
    return log_mu, theta, logits


def test_fused_zinb_with_non_integer_counts_uses_lgamma_and_is_exact():
    gen = torch.Generator().manual_seed(3)
    x = torch.poisson(torch.rand(6, 20, generator=gen, dtype=torch.float64) * 5, generator=gen)
    x = torch.where(x > 0, x + 0.37, x)  # e.g. ambient-corrected counts
    log_mu, theta, logits = _zinb_inputs(x, 4)
    reference = log_zinb_positive(x, log_mu.exp(), theta, logits, eps=0.0).sum(-1)
    torch.testing.assert_close(zinb_log_likelihood(x, log_mu, theta, logits), reference)
    assert torch.autograd.gradcheck(
        lambda a, b, c: zinb_log_likelihood(x, a, b, c), (log_mu, theta, logits)
    )


def test_fused_kernels_read_counts_beyond_the_table_exactly():
    x = torch.tensor([[0.0, 1.0, 31.0, 32.0, 33.0, 500.0, 2e5]], dtype=torch.float64)
    log_mu, theta, logits = _zinb_inputs(x, 5)
    reference = log_zinb_positive(x, log_mu.exp(), theta, logits, eps=0.0).sum(-1)
    torch.testing.assert_close(zinb_log_likelihood(x, log_mu, theta, logits), reference)
    (grad,) = torch.autograd.grad(nb_log_likelihood(x, log_mu, theta).sum(), theta)
    xs, th = x.numpy()[0], theta.detach().numpy()
    mu = log_mu.detach().exp().numpy()[0]
    want = (
        special.digamma(xs + th) - special.digamma(th) - np.log1p(mu / th) + (mu - xs) / (th + mu)
    )
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-9, atol=1e-12)


def test_fused_zinb_without_a_dispersion_gradient_gives_the_same_values():
    x, _ = _counts(seed=6)
    x = x.double()
    log_mu, theta, logits = _zinb_inputs(x, 7)
    with_grad = zinb_log_likelihood(x, log_mu, theta, logits)
    fixed = zinb_log_likelihood(x, log_mu, theta.detach(), logits)
    torch.testing.assert_close(fixed, with_grad)
    grads = torch.autograd.grad(fixed.sum(), (log_mu, logits))
    want = torch.autograd.grad(with_grad.sum(), (log_mu, logits))
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b)


def test_float32_counts_with_float64_parameters_give_the_float64_result():
    x, _ = _counts(seed=8)
    log_mu, theta, logits = _zinb_inputs(x, 9)
    want = zinb_log_likelihood(x.double(), log_mu, theta, logits)
    torch.testing.assert_close(zinb_log_likelihood(x, log_mu, theta, logits), want)
    torch.testing.assert_close(
        nb_log_likelihood(x, log_mu, theta), nb_log_likelihood(x.double(), log_mu, theta)
    )
