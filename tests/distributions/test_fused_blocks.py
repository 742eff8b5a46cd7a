"""The fused count kernels over several cache-sized blocks of cells: the same values and
gradients as the elementwise formulas, whatever the block size, with and without autograd."""

import pytest
import torch

from cellvi.distributions import (
    _fused,
    log_nb_positive,
    log_zinb_positive,
    nb_log_likelihood,
    zinb_log_likelihood,
)


def _inputs(seed, theta_shape, n=13, g=15):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, g, generator=gen, dtype=torch.float64) * 6, generator=gen)
    x[4] = 0.0  # a cell without any count
    x[0, 2], x[7, 3] = 40.0, 900.0  # beyond the per-gene tables
    shape = (g,) if theta_shape == "gene" else (n, g)
    log_mu = (torch.randn(n, g, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    theta = (torch.rand(shape, generator=gen, dtype=torch.float64) * 5 + 0.05).requires_grad_()
    logits = torch.randn(n, g, generator=gen, dtype=torch.float64).requires_grad_()
    return x, log_mu, theta, logits


@pytest.mark.parametrize("theta_shape", ["gene", "cell-gene"])
@pytest.mark.parametrize("block_rows", [1, 5, 13, 100])
def test_blocks_of_any_size_give_the_reference_values_and_gradients(
    monkeypatch, theta_shape, block_rows
):
    x, log_mu, theta, logits = _inputs(0, theta_shape)
    monkeypatch.setattr(_fused, "BLOCK_BYTES", block_rows * x.shape[1] * 8)
    assert len(_fused._blocks(13, x.shape[1], torch.float64, x.device)) == -(-13 // block_rows)

    def zinb_ref():
        return log_zinb_positive(x, log_mu.exp(), theta, logits, eps=0.0).sum(-1)

    def nb_ref():
        return log_nb_positive(x, log_mu.exp(), theta, eps=0.0).sum(-1)

    torch.testing.assert_close(zinb_log_likelihood(x, log_mu, theta, logits), zinb_ref())
    torch.testing.assert_close(nb_log_likelihood(x, log_mu, theta), nb_ref())
    weights = torch.linspace(-1.0, 2.0, x.shape[0], dtype=torch.float64)
    for got, want, params in (
        (zinb_log_likelihood(x, log_mu, theta, logits), zinb_ref(), (log_mu, theta, logits)),
        (nb_log_likelihood(x, log_mu, theta), nb_ref(), (log_mu, theta)),
    ):
        grads = torch.autograd.grad((got * weights).sum(), params)
        wanted = torch.autograd.grad((want * weights).sum(), params)
        for a, b in zip(grads, wanted, strict=True):
            torch.testing.assert_close(a, b)
    if block_rows == 5:  # ragged: 5 + 5 + 3 rows
        assert torch.autograd.gradcheck(
            lambda a, b, c: zinb_log_likelihood(x, a, b, c), (log_mu, theta, logits)
        )


def test_without_autograd_the_values_are_those_of_the_training_pass():
    x, log_mu, theta, logits = _inputs(1, "gene", n=200, g=40)
    trained = zinb_log_likelihood(x, log_mu, theta, logits)
    assert trained.requires_grad
    with torch.no_grad():
        inferred = zinb_log_likelihood(x, log_mu, theta, logits)
    assert not inferred.requires_grad
    torch.testing.assert_close(inferred, trained.detach(), rtol=0, atol=0)


def test_a_second_backward_through_a_kept_graph_gives_the_same_gradients():
    x, log_mu, theta, logits = _inputs(2, "gene")
    ll = zinb_log_likelihood(x, log_mu, theta, logits).sum()
    first = torch.autograd.grad(ll, (log_mu, theta, logits), retain_graph=True)
    second = torch.autograd.grad(ll, (log_mu, theta, logits))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_leading_sample_axes_and_broadcast_gates_are_flattened_to_rows():
    x, log_mu, theta, _ = _inputs(3, "gene")
    draws = torch.stack([log_mu.detach(), log_mu.detach() + 0.3])  # (samples, cells, genes)
    gate = torch.linspace(-2.0, 2.0, x.shape[1], dtype=torch.float64)  # one logit per gene
    got = zinb_log_likelihood(x, draws, theta.detach(), gate)
    assert got.shape == (2, x.shape[0])
    for k in range(2):
        want = log_zinb_positive(x, draws[k].exp(), theta.detach(), gate.expand_as(x), eps=0.0)
        torch.testing.assert_close(got[k], want.sum(-1))


def test_bfloat16_inputs_fall_back_from_numpy_and_stay_close():
    x, log_mu, theta, logits = _inputs(4, "gene")
    want = zinb_log_likelihood(x, log_mu, theta, logits).detach()
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in (log_mu, theta, logits)]
    got = zinb_log_likelihood(x.to(torch.bfloat16), *low)
    got.float().sum().backward()
    assert all(torch.isfinite(t.grad.float()).all() for t in low)
    torch.testing.assert_close(got.double(), want, rtol=0.05, atol=1.0)


def test_a_nan_rate_gives_that_cell_nan_without_numpy_warnings():
    x, log_mu, theta, logits = _inputs(5, "gene")
    bad = log_mu.detach().clone()
    bad[2, 3] = float("nan")
    theta_bad = theta.detach().clone()
    theta_bad[2], theta_bad[3] = float("inf"), 0.0  # log-gamma terms +inf and -inf
    for ll in (
        zinb_log_likelihood(x, bad, theta.detach(), logits.detach()),
        nb_log_likelihood(x, bad, theta.detach()),
    ):
        assert torch.isnan(ll[2]) and torch.isfinite(ll[torch.arange(13) != 2]).all()
    assert (x[:, 2] * x[:, 3]).any()  # a cell where they meet: NaN
    ll = nb_log_likelihood(x, log_mu.detach(), theta_bad)
    assert not torch.isfinite(ll).all()  # reported, not hidden (the guardrail reads it)


def test_counts_that_require_grad_get_none_and_the_rates_their_gradient():
    x, log_mu, theta, logits = _inputs(6, "gene")
    counts = x.clone().requires_grad_()  # e.g. counts from a differentiable preprocessing step
    for params in ((log_mu, theta, logits), (log_mu.detach(), theta.detach(), logits.detach())):
        ll = zinb_log_likelihood(counts, *params)
        torch.testing.assert_close(ll.detach(), zinb_log_likelihood(x, *params).detach())
    (grad,) = torch.autograd.grad(zinb_log_likelihood(counts, log_mu, theta, logits).sum(), log_mu)
    assert torch.isfinite(grad).all()


def test_an_infinite_or_astronomical_count_takes_the_lgamma_route_not_the_tables():
    x, log_mu, theta, logits = _inputs(7, "gene")
    x[1, 5], x[2, 6] = float("inf"), 1e20  # beyond int64: the tables would read garbage
    ll = nb_log_likelihood(x, log_mu.detach(), theta.detach())
    assert not torch.isfinite(ll[1])
    want = log_nb_positive(x[2], log_mu[2].detach().exp(), theta.detach(), eps=0.0).sum()
    torch.testing.assert_close(ll[2], want)
    others = torch.ones(13, dtype=torch.bool)
    others[1] = False
    assert torch.isfinite(ll[others]).all()


def test_negative_counts_are_a_clear_error_not_an_index_error():
    from cellvi.errors import InvalidDataError

    x, log_mu, theta, logits = _inputs(0, "gene")
    x[2, 5] = -5.0  # e.g. the registered matrix edited after setup_anndata
    with pytest.raises(InvalidDataError, match="negative values \\(as low as -5\\)"):
        zinb_log_likelihood(x, log_mu, theta, logits)
