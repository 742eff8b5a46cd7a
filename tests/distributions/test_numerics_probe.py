"""Edge cases found by probing the count likelihoods: float32 digits at a large per-cell
(or non-table) θ, softplus's linear switch, the Poisson ``eps``, and the distribution API."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from cellvi.distributions import (
    NegativeBinomial,
    NegativeBinomialMixture,
    Poisson,
    ZeroInflatedNegativeBinomial,
    log_nb_positive,
    log_poisson,
    log_zinb_positive,
    nb_log_likelihood,
    zinb_log_likelihood,
)
from cellvi.module import VAE, VAEConfig


def _counts(seed, n=16, g=50, non_integer=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, g, generator=gen) * 3, generator=gen)
    if non_integer:
        x = torch.where(x > 0, x + 0.5, x)
    return x, torch.randn(n, g, generator=gen)


@pytest.mark.parametrize("theta_value", [1e4, 1e6])
@pytest.mark.parametrize(("theta_2d", "non_integer"), [(True, False), (True, True), (False, True)])
def test_float32_lgamma_path_keeps_its_digits_at_a_large_theta(theta_value, theta_2d, non_integer):
    # per-cell θ (gene-batch/-label/-cell dispersion) or non-integer counts skip the float64
    # tables: lgamma(x+θ) - lgamma(θ) in float32 was 27 nats/cell off at θ = 1e6
    x, log_mu = _counts(0, non_integer=non_integer)
    shape = x.shape if theta_2d else x.shape[1:]
    th32 = torch.full(shape, theta_value, requires_grad=True)
    th64 = torch.full(shape, theta_value, dtype=torch.float64, requires_grad=True)
    logits = torch.full(x.shape, -2.0)
    for kernel, extra in ((nb_log_likelihood, ()), (zinb_log_likelihood, (logits,))):
        got = kernel(x, log_mu, th32, *extra)
        want = kernel(x.double(), log_mu.double(), th64, *(e.double() for e in extra))
        assert (got.double() - want).abs().max() < 2e-3
        (g32,) = torch.autograd.grad(got.sum(), th32)
        (g64,) = torch.autograd.grad(want.sum(), th64)
        assert (g32.double() - g64).abs().max() / g64.abs().max() < 0.1


def test_elementwise_float32_nb_and_zinb_keep_their_digits_at_a_huge_theta():
    # NB(θ = 1e8) is Poisson: log P(1; μ = 1) = -1 (was -19.4 in float32)
    one, mu, theta = torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1e8)
    assert abs(float(log_nb_positive(one, mu, theta)) + 1.0) < 1e-5
    assert abs(float(log_zinb_positive(one, mu, theta, torch.tensor(-40.0))) + 1.0) < 1e-5
    x = torch.tensor([0.0, 2.0, 7.0])
    got = log_nb_positive(x, torch.full((3,), 3.0), torch.full((3,), 1e4))
    want = stats.nbinom.logpmf(x.numpy(), 1e4, 1e4 / (1e4 + 3.0))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    assert got.dtype == torch.float32


def test_module_with_per_batch_dispersion_gives_the_float64_loss_in_float32():
    # gene-batch θ reaches the kernel per cell; a Poisson-like gene (θ = 1e5) must not blur it
    torch.manual_seed(0)
    module = VAE(30, VAEConfig(n_hidden=8, n_latent=3, dispersion="gene-batch"), n_batch=2)
    with torch.no_grad():
        module.px_r.fill_(float(np.log(1e5)))
    module.eval()
    x, _ = _counts(1, n=20, g=30)
    x[:, 0] += 1
    batch = {"X": x, "batch": torch.arange(20).remainder(2).reshape(-1, 1)}
    module64 = copy.deepcopy(module).double()
    batch64 = {"X": x.double(), "batch": batch["batch"]}
    torch.manual_seed(1)
    inf = module.inference(batch)
    gen = module.generative(inf["z"], inf["library"], batch)
    inf64 = {k: None if v is None else v.double() for k, v in inf.items()}
    gen64 = module64.generative(inf64["z"], inf64["library"], batch64)
    rec = module.loss(batch, inf, gen).reconstruction_loss.double()
    rec64 = module64.loss(batch64, inf64, gen64).reconstruction_loss
    assert (rec - rec64).abs().max() < 2e-3


def test_fused_nb_keeps_the_log1p_tail_of_a_huge_count_in_float64():
    # x · log(μ / (θ + μ)) with μ/θ > e^20: torch's softplus switched to linear and dropped
    # x · θ/μ (2e-4 nats at x = 1e6, μ = 50, θ = 1e-8)
    x = torch.tensor([[1e6, 1e6]], dtype=torch.float64)
    mu = torch.tensor([[50.0, 1e6]], dtype=torch.float64)
    theta = torch.tensor([1e-8, 1e-4], dtype=torch.float64)
    want = stats.nbinom.logpmf(x.numpy(), theta.numpy(), (theta / (theta + mu)).numpy()).sum()
    assert abs(float(nb_log_likelihood(x, mu.log(), theta)) - want) < 1e-7
    closed = torch.full(x.shape, -60.0, dtype=torch.float64)
    assert abs(float(zinb_log_likelihood(x, mu.log(), theta, closed)) - want) < 1e-7


def test_log_poisson_has_no_eps_and_finite_gradients_at_a_zero_rate():
    x = torch.tensor([0.0, 1.0, 3.0, 0.0])
    rate = torch.tensor([1e-8, 1e-8, 1e-6, 0.0], dtype=torch.float64, requires_grad=True)
    got = log_poisson(x.double(), rate)
    want = stats.poisson.logpmf(x.numpy(), rate.detach().numpy())
    np.testing.assert_allclose(got.detach().numpy()[:3], want[:3], rtol=1e-12)
    assert float(got[3].detach()) == 0.0  # P(0 | rate 0) = 1
    got.sum().backward()
    assert torch.isfinite(rate.grad).all()
    p = Poisson(torch.tensor([1e-8]))
    np.testing.assert_allclose(
        p.log_prob(torch.tensor([2.0])).numpy(), stats.poisson.logpmf(2, 1e-8), rtol=1e-6
    )


def test_zinb_validates_its_arguments_and_broadcasts_the_gate():
    d = ZeroInflatedNegativeBinomial(
        torch.ones(3), torch.ones(3), torch.zeros(3), validate_args=True
    )  # was AttributeError: zi_logits read before it was set
    assert d.zi_logits.shape == (3,)
    with pytest.raises(ValueError, match="theta"):
        ZeroInflatedNegativeBinomial(
            torch.ones(3), -torch.ones(3), torch.zeros(3), validate_args=True
        )
    gated = ZeroInflatedNegativeBinomial(torch.ones(4), torch.ones(4), torch.zeros(2, 4))
    assert gated.batch_shape == (2, 4)
    assert gated.sample((5,)).shape == (5, 2, 4)
    assert gated.mean.shape == gated.variance.shape == (2, 4)
    assert gated.log_prob(torch.zeros(2, 4)).shape == (2, 4)


@pytest.mark.parametrize(
    "make",
    [
        lambda v: NegativeBinomial(torch.ones(3), torch.ones(3), validate_args=v),
        lambda v: ZeroInflatedNegativeBinomial(
            torch.ones(3), torch.ones(3), torch.zeros(3), validate_args=v
        ),
        lambda v: Poisson(torch.ones(3), validate_args=v),
        lambda v: NegativeBinomialMixture(
            torch.ones(3), torch.ones(3) * 2, torch.ones(3), torch.zeros(3), validate_args=v
        ),
    ],
)
def test_log_prob_checks_the_support_only_when_asked(make):
    bad = torch.tensor([0.0, 0.5, 2.0])  # non-integer count
    with pytest.warns(UserWarning, match="support"):
        make(True).log_prob(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(False).log_prob(bad)
        make(True).log_prob(torch.tensor([0.0, 1.0, 2.0]))
