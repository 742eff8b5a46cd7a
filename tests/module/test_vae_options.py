"""VAE options of the models.md table: the 'normal' likelihood, var_activation and the
pass-through dicts (extra_encoder_kwargs, extra_decoder_kwargs, batch_embedding_kwargs).
SCVI/SCANVI with these options (training, save/load, from_scvi_model, compile) are tested in
tests/model/test_scvi_module_options.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F

from cellvi.module import VAE, VAEConfig

N_CELLS, N_GENES = 24, 15


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((N_CELLS, N_GENES), 4.0), generator=g)
    x[:, 0] += 1  # no empty cell
    return {
        "X": x,
        "batch": torch.randint(0, 2, (N_CELLS, 1), generator=g),
        "labels": torch.zeros(N_CELLS, 1, dtype=torch.long),
    }


def _module(**options) -> VAE:
    torch.manual_seed(0)
    lib = {}
    if options.get("use_observed_lib_size") is False:
        lib = {"library_log_means": torch.zeros(1, 2), "library_log_vars": torch.ones(1, 2)}
    module = VAE(N_GENES, VAEConfig(n_hidden=8, n_latent=3, **options), n_batch=2, **lib)
    return module.eval()


# ---------------------------------------------------------------- normal likelihood
@pytest.mark.parametrize("dispersion", ["gene", "gene-batch", "gene-cell"])
@pytest.mark.parametrize("n_samples", [1, 3])
def test_normal_log_likelihood_is_scipy_norm_on_raw_counts(dispersion, n_samples):
    module = _module(gene_likelihood="normal", dispersion=dispersion)
    tensors = _batch()
    with torch.no_grad():
        inf = module.inference(tensors, n_samples=n_samples)
        gen = module.generative(inf["z"], inf["library"], tensors)
        ours = module.log_likelihood(tensors["X"], gen)
    mean = (inf["library"].exp() * gen["scale"]).numpy()  # μ = e^l ρ, as for the counts
    sd = gen["theta"].expand_as(gen["scale"]).numpy()  # σ = exp(px_r)
    expected = stats.norm.logpdf(tensors["X"].numpy(), loc=mean, scale=sd).sum(-1)
    assert ours.shape == ((n_samples, N_CELLS) if n_samples > 1 else (N_CELLS,))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5)
    if dispersion == "gene":
        torch.testing.assert_close(gen["theta"], module.px_r.exp())
    dist = module.likelihood(gen)
    np.testing.assert_allclose(dist.log_prob(tensors["X"]).sum(-1).numpy(), expected, rtol=1e-5)
    torch.testing.assert_close(dist.rho, gen["scale"])


def test_normal_likelihood_needs_no_zero_inflation_head_output():
    module = _module(gene_likelihood="normal")
    tensors = _batch()
    out = module(tensors)
    assert torch.isfinite(out.loss)
    inf = module.inference(tensors)
    assert module.generative(inf["z"], inf["library"], tensors)["dropout_logits"] is None


# ---------------------------------------------------------------- var_activation
@pytest.mark.parametrize("value", ["softplus", F.softplus])
def test_softplus_var_activation_gives_softplus_of_the_variance_head(value):
    module = _module(var_activation=value, use_observed_lib_size=False)
    assert module.config.var_activation == "softplus"
    tensors = _batch()
    with torch.no_grad():
        inf = module.inference(tensors)
        for enc, key in ((module.z_encoder, "qz_v"), (module.l_encoder, "ql_v")):
            head = enc.var_encoder(enc.encoder(torch.log1p(tensors["X"])))
            torch.testing.assert_close(inf[key], F.softplus(head) + 1e-4)
            assert not torch.allclose(inf[key], head.exp() + 1e-4)


@pytest.mark.parametrize("value", [None, "exp", torch.exp])
def test_default_var_activation_is_exp(value):
    module = _module(var_activation=value)
    assert module.config.var_activation == (None if value is None else "exp")
    assert module.z_encoder.var_activation is torch.exp


def test_var_activation_rejects_other_callables_naming_the_accepted_ones():
    with pytest.raises(ValueError, match=r"var_activation=.*\['exp', 'softplus'\]"):
        VAEConfig(var_activation=torch.sigmoid)
    with pytest.raises(ValueError, match="var_activation='relu' is not supported"):
        VAEConfig(var_activation="relu")


# ---------------------------------------------------------------- pass-through dicts
def _activations(fc) -> set[type]:
    return {type(block["activation"]) for block in fc.blocks if "activation" in block}


def test_extra_kwargs_reach_encoder_and_decoder():
    module = _module(
        n_layers=2,
        use_observed_lib_size=False,
        extra_encoder_kwargs={"activation_fn": nn.LeakyReLU, "bias": False},
        extra_decoder_kwargs={"activation_fn": "elu", "use_activation": True},
    )
    assert module.config.extra_encoder_kwargs == {"activation_fn": "leaky_relu", "bias": False}
    for enc in (module.z_encoder, module.l_encoder):
        assert _activations(enc.encoder) == {nn.LeakyReLU}
        assert all(block["linear"].linear.bias is None for block in enc.encoder.blocks)
    assert _activations(module.decoder.px_decoder) == {nn.ELU}
    assert module.decoder.px_decoder.blocks[0]["linear"].linear.bias is not None
    assert torch.isfinite(module(_batch()).loss)


def test_use_activation_false_drops_the_activation():
    module = _module(extra_decoder_kwargs={"use_activation": False})
    assert _activations(module.decoder.px_decoder) == set()
    assert _activations(module.z_encoder.encoder) == {nn.ReLU}


def test_var_eps_and_embedding_dim_from_the_dicts_set_their_fields():
    cfg = VAEConfig(
        batch_representation="embedding",
        extra_encoder_kwargs={"var_eps": 1e-6},
        batch_embedding_kwargs={"embedding_dim": 7, "max_norm": 1.0},
    )
    assert cfg.var_eps == 1e-6 and cfg.batch_embedding_dim == 7
    module = VAE(N_GENES, cfg, n_batch=2)
    assert module.z_encoder.var_eps == 1e-6
    assert module.batch_embedding.weight.shape == (2, 7)
    assert module.batch_embedding.max_norm == 1.0
    with pytest.raises(ValueError, match=r"var_eps=0.001 and extra_encoder_kwargs\['var_eps'\]"):
        VAEConfig(var_eps=1e-3, extra_encoder_kwargs={"var_eps": 1e-6})


@pytest.mark.parametrize(
    ("arg", "value", "error", "match"),
    [
        ("extra_encoder_kwargs", {"n_layers": 2}, TypeError, r"'n_layers'.*Give n_layers="),
        ("extra_decoder_kwargs", {"var_eps": 1e-3}, TypeError, r"'var_eps'; valid keys are \["),
        ("batch_embedding_kwargs", {"sparse": True}, TypeError, r"'sparse'.*'embedding_dim'"),
        ("extra_decoder_kwargs", {"activation_fn": "swish"}, ValueError, "'relu', 'leaky_relu'"),
        ("extra_encoder_kwargs", {"bias": 0}, ValueError, "must be True or False"),
        ("batch_embedding_kwargs", {"embedding_dim": 0}, ValueError, "positive integer"),
        ("extra_encoder_kwargs", "relu", TypeError, "must be a dict"),
    ],
)
def test_pass_through_dicts_reject_bad_keys_and_values(arg, value, error, match):
    with pytest.raises(error, match=match):
        VAEConfig(**{arg: value})
