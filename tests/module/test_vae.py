"""The SCVI module: configuration checks, shapes and a finite loss for every option."""

from __future__ import annotations

import pytest
import scipy.sparse as sp
import torch

from cellvi.dataloaders import SparseRows
from cellvi.module import VAE, LossOutput, VAEConfig, kl_normal_normal, kl_normal_standard

N_CELLS, N_GENES = 32, 20


def _batch(n_cat_covs: int = 0, n_cont: int = 0, size_factor: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((N_CELLS, N_GENES), 3.0), generator=g)
    x[:, 0] += 1  # no empty cell
    tensors = {
        "X": x,
        "batch": torch.randint(0, 3, (N_CELLS, 1), generator=g),
        "labels": torch.randint(0, 2, (N_CELLS, 1), generator=g),
    }
    if n_cat_covs:
        tensors["extra_categorical_covs"] = torch.randint(0, 4, (N_CELLS, n_cat_covs), generator=g)
    if n_cont:
        tensors["extra_continuous_covs"] = torch.randn(N_CELLS, n_cont, generator=g)
    if size_factor:
        tensors["size_factor"] = torch.rand(N_CELLS, 1, generator=g) + 0.5
    return tensors


def _module(options: dict) -> VAE:
    """A small module for ``_batch(n_cat_covs=1, n_cont=2)`` with the given config options."""
    lib_kwargs = {}
    if options.get("use_observed_lib_size") is False:
        lib_kwargs = {"library_log_means": torch.zeros(1, 3), "library_log_vars": torch.ones(1, 3)}
    return VAE(
        N_GENES,
        VAEConfig(n_hidden=16, n_latent=4, **options),
        n_batch=3,
        n_labels=2,
        n_continuous_cov=2,
        n_cats_per_cov=[4],
        **lib_kwargs,
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"dispersion": "gene-batch"},
        {"dispersion": "gene-label"},
        {"dispersion": "gene-cell"},
        {"gene_likelihood": "nb"},
        {"gene_likelihood": "poisson"},
        {"latent_distribution": "ln"},
        {"batch_representation": "embedding", "encode_covariates": True},
        {"encode_covariates": True, "deeply_inject_covariates": False, "n_layers": 2},
        {"use_batch_norm": "none", "use_layer_norm": "both"},
        {"use_observed_lib_size": False},
    ],
)
def test_vae_loss_is_finite_for_every_option(options):
    torch.manual_seed(0)
    module = _module(options)
    out = module(_batch(n_cat_covs=1, n_cont=2), kl_weight=0.5)
    assert isinstance(out, LossOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.reconstruction_loss.shape == (N_CELLS,)
    assert out.kl_local.shape == (N_CELLS,)
    out.loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_vae_rejects_unknown_likelihood_at_construction():
    with pytest.raises(ValueError, match="gene_likelihood='zip'.*choose one of"):
        VAEConfig(gene_likelihood="zip")


def test_vae_rejects_bad_dropout():
    with pytest.raises(ValueError, match=r"dropout_rate=1.5 must be in \[0, 1\)"):
        VAEConfig(dropout_rate=1.5)


def test_learned_library_needs_priors():
    with pytest.raises(ValueError, match="needs library_log_means"):
        VAE(N_GENES, VAEConfig(use_observed_lib_size=False))


def test_size_factors_replace_library_and_scale_is_softplus():
    module = VAE(N_GENES, VAEConfig(n_hidden=16, n_latent=4), n_batch=3, use_size_factor_key=True)
    tensors = _batch(size_factor=True)
    inf = module.inference(tensors)
    torch.testing.assert_close(inf["library"], torch.log(tensors["size_factor"]))
    gen = module.generative(inf["z"], inf["library"], tensors)
    assert (gen["scale"] > 0).all()


def test_observed_library_is_log_total_and_scale_sums_to_one():
    module = VAE(N_GENES, VAEConfig(n_hidden=16, n_latent=4), n_batch=3)
    module.eval()
    tensors = _batch()
    inf = module.inference(tensors)
    torch.testing.assert_close(inf["library"], torch.log(tensors["X"].sum(1, keepdim=True)))
    gen = module.generative(inf["z"], inf["library"], tensors)
    torch.testing.assert_close(gen["scale"].sum(-1), torch.ones(N_CELLS))
    torch.testing.assert_close(module.rate(gen), gen["scale"] * tensors["X"].sum(1, keepdim=True))


def test_transform_batch_changes_only_the_decoder_batch():
    torch.manual_seed(0)
    module = VAE(N_GENES, VAEConfig(n_hidden=16, n_latent=4), n_batch=3)
    module.eval()
    tensors = _batch()
    inf = module.inference(tensors)
    a = module.generative(inf["qz_m"], inf["library"], tensors, transform_batch=0)["scale"]
    b = module.generative(inf["qz_m"], inf["library"], tensors, transform_batch=2)["scale"]
    assert not torch.allclose(a, b)
    forced = dict(tensors, batch=torch.zeros_like(tensors["batch"]))
    c = module.generative(inf["qz_m"], inf["library"], forced)["scale"]
    torch.testing.assert_close(a, c)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"log_variational": False},
        {"encode_covariates": True},
        {"batch_representation": "embedding", "encode_covariates": True},
        {"use_observed_lib_size": False, "n_layers": 2},
    ],
)
def test_inference_on_sparse_rows_equals_dense(options):
    """Analyses hand sparse counts to the encoder; its outputs match the dense input's."""
    torch.manual_seed(0)
    module = _module(options)
    assert module.accepts_sparse_x
    module.eval()
    tensors = _batch(n_cat_covs=1, n_cont=2)
    tensors["X"][tensors["X"] < 3] = 0  # about half of the counts are zeros
    csr = sp.csr_matrix(tensors["X"].numpy())
    rows = SparseRows(
        torch.from_numpy(csr.data),
        torch.from_numpy(csr.indices),
        torch.from_numpy(csr.indptr),
        N_GENES,
    )
    with torch.inference_mode():
        dense = module.inference(tensors)
        sparse = module.inference({**tensors, "X": rows})
    library = ("library",) if module.observed_library else ("ql_m", "ql_v")  # not the draw
    for key in ("qz_m", "qz_v", *library):
        torch.testing.assert_close(sparse[key], dense[key], rtol=1e-5, atol=1e-5)


def test_inference_with_samples_adds_leading_axis():
    module = VAE(N_GENES, VAEConfig(n_hidden=16, n_latent=4), n_batch=3)
    module.eval()
    tensors = _batch()
    inf = module.inference(tensors, n_samples=7)
    assert inf["z"].shape == (7, N_CELLS, 4)
    gen = module.generative(inf["z"], inf["library"], tensors)
    assert gen["scale"].shape == (7, N_CELLS, N_GENES)


@pytest.mark.parametrize("options", [{}, {"use_observed_lib_size": False}])
@pytest.mark.parametrize("n_samples", [1, 3])
def test_inference_without_library_skips_only_the_library(options, n_samples):
    """``library=False`` (latents, normalized expression) leaves the posterior of z as is."""
    module = _module(options)
    module.eval()
    tensors = _batch(n_cat_covs=1, n_cont=2)
    with torch.inference_mode():
        torch.manual_seed(1)
        full = module.inference(tensors, n_samples=n_samples)
        torch.manual_seed(1)
        bare = module.inference(tensors, n_samples=n_samples, library=False)
        scale = module.generative(bare["z"], bare["library"], tensors, scale_only=True)["scale"]
        expected = module.generative(bare["z"], full["library"], tensors)["scale"]
    assert bare["library"] is None and bare["ql_m"] is None and bare["ql_v"] is None
    # z is the same draw unless a learned library's draw came between (several samples)
    same_draw = n_samples == 1 or module.observed_library
    for key in ("qz_m", "qz_v", *(("z",) if same_draw else ())):
        torch.testing.assert_close(bare[key], full[key], rtol=0, atol=0)
    assert bare["z"].shape == full["z"].shape
    torch.testing.assert_close(scale, expected)


def test_kl_helpers_match_torch_distributions():
    m, v = torch.randn(5, 3), torch.rand(5, 3) + 0.1
    pm, pv = torch.randn(5, 3), torch.rand(5, 3) + 0.1
    q = torch.distributions.Normal(m, v.sqrt())
    expected_std = torch.distributions.kl_divergence(q, torch.distributions.Normal(0, 1)).sum(-1)
    torch.testing.assert_close(kl_normal_standard(m, v), expected_std)
    p = torch.distributions.Normal(pm, pv.sqrt())
    torch.testing.assert_close(
        kl_normal_normal(m, v, pm, pv), torch.distributions.kl_divergence(q, p).sum(-1)
    )
