"""SCVI and SCANVI with the module options of the models.md table (gene_likelihood='normal',
var_activation and the pass-through dicts): training, outputs, save/load, from_scvi_model and
compiled training. The module-level behaviour is in tests/module/test_vae_options.py."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import cellvi
from cellvi.errors import CountsWarning
from cellvi.model import SCANVI, SCVI

# every option away from its default, as a user of scvi-tools would write them
OPTIONS = {
    "var_activation": F.softplus,
    "encode_covariates": True,
    "batch_representation": "embedding",
    "extra_encoder_kwargs": {"activation_fn": nn.LeakyReLU, "var_eps": 1e-5},
    "extra_decoder_kwargs": {"bias": False},
    "batch_embedding_kwargs": {"embedding_dim": 3, "max_norm": 2.0},
}
# the same options as init_params_ records them (by name, plain data)
RECORDED = {
    "var_activation": "softplus",
    "extra_encoder_kwargs": {"activation_fn": "leaky_relu", "var_eps": 1e-5},
    "extra_decoder_kwargs": {"bias": False},
    "batch_embedding_kwargs": {"embedding_dim": 3, "max_norm": 2.0},
}


@pytest.fixture
def sim():
    adata = cellvi.data.simulate(n_cells=160, n_genes=48, n_batches=2, n_cell_types=2, seed=0)
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[np.random.default_rng(0).random(adata.n_obs) > 0.3] = "Unknown"
    adata.obs["labels"] = labels
    return adata


def _scvi(adata, **options):
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata, n_hidden=16, n_latent=4, **options)


def _activations(fc) -> set[type]:
    return {type(block["activation"]) for block in fc.blocks if "activation" in block}


def _assert_options_reach_the_module(module):
    assert module.config.var_activation == "softplus" and module.config.var_eps == 1e-5
    assert module.z_encoder.var_activation is F.softplus
    assert _activations(module.z_encoder.encoder) == {nn.LeakyReLU}
    assert all(block["linear"].linear.bias is None for block in module.decoder.px_decoder.blocks)
    assert module.batch_embedding.weight.shape == (2, 3)
    assert module.batch_embedding.max_norm == 2.0


# ---------------------------------------------------------------- normal likelihood
def test_scvi_normal_trains_and_gives_outputs(sim):
    model = _scvi(sim, gene_likelihood="normal")
    model.train(max_epochs=3, plan_kwargs={"n_epochs_kl_warmup": 2})
    rec = model.history["reconstruction_loss_train"]["reconstruction_loss_train"].to_numpy()
    assert np.isfinite(rec).all() and rec[-1] < rec[0]
    assert np.isfinite(model.get_elbo())
    assert model.posterior_predictive_sample().shape == sim.shape
    draws = model.posterior_predictive_sample(n_samples=2)
    assert draws.shape == (*sim.shape, 2)
    params = model.get_likelihood_parameters()
    assert set(params) == {"mean", "dispersions"} and params["mean"].shape == sim.shape
    norm = model.get_normalized_expression(return_numpy=True)
    np.testing.assert_allclose(norm.sum(1), 1.0, rtol=1e-4)  # ρ still sums to one


@pytest.mark.skipif(shutil.which("c++") is None, reason="compile=True needs a C++ compiler")
def test_scvi_normal_trains_compiled_on_non_integer_data(sim):
    from torch._dynamo.utils import counters

    # real-valued data: the Gaussian needs no whole numbers, unlike the count likelihoods'
    # compiled (lgamma-free) kernels, so compile=True must not refuse them
    sim.X = sim.X.astype(np.float32) * 1.5
    with pytest.warns(CountsWarning):
        model = _scvi(sim, gene_likelihood="normal")
    assert model.adata_manager.registry["field_registries"]["X"]["state_registry"]["n_non_integer"]
    torch._dynamo.reset()
    counters.clear()
    # aot_eager traces the same graph as Inductor without generating C++ (seconds, not a minute)
    plan = {"compile": True, "compile_kwargs": {"backend": "aot_eager"}}
    model.train(max_epochs=1, batch_size=48, plan_kwargs=plan)
    assert counters["stats"]["unique_graphs"] >= 1
    assert np.isfinite(model.history["elbo_train"]["elbo_train"]).all()


def test_compile_still_refuses_non_integer_data_for_count_likelihoods(sim):
    sim.X = sim.X.astype(np.float32) * 1.5
    with pytest.warns(CountsWarning):
        model = _scvi(sim, gene_likelihood="nb")
    with pytest.raises(ValueError, match="non-integer values"):
        model.train(max_epochs=1, plan_kwargs={"compile": True})
    assert not model.is_trained


def test_feature_correlation_refuses_the_normal_likelihood(sim):
    model = _scvi(sim, gene_likelihood="normal")
    with pytest.raises(ValueError, match="standard deviation of a Gaussian.*'nb' or 'zinb'"):
        model.get_feature_correlation_matrix()


# ---------------------------------------------------------------- SCVI with the options
def test_scvi_checks_options_before_training(sim):
    with pytest.raises(TypeError, match="extra_encoder_kwargs has an unsupported key 'depth'"):
        _scvi(sim, extra_encoder_kwargs={"depth": 3})


def test_scvi_options_train_and_survive_save_and_load(sim, tmp_path):
    model = _scvi(sim, gene_likelihood="normal", **OPTIONS)
    _assert_options_reach_the_module(model.module)
    model.train(max_epochs=3, plan_kwargs={"n_epochs_kl_warmup": 2})
    rec = model.history["reconstruction_loss_train"]["reconstruction_loss_train"].to_numpy()
    assert np.isfinite(rec).all() and rec[-1] < rec[0]
    assert {k: model.init_params_["non_kwargs"][k] for k in RECORDED} == RECORDED
    model.save(tmp_path / "m")
    loaded = SCVI.load(tmp_path / "m", adata=sim.copy())
    assert loaded.config_ == model.config_
    _assert_options_reach_the_module(loaded.module)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )


def test_unset_options_are_not_recorded(sim):
    recorded = _scvi(sim).init_params_["non_kwargs"]
    assert not set(RECORDED) & set(recorded)


# ---------------------------------------------------------------- SCANVI with the options
def test_scanvi_from_scvi_carries_the_options_trains_and_round_trips(sim, tmp_path):
    scvi_model = _scvi(sim, **OPTIONS)
    scvi_model.train(max_epochs=1)
    model = SCANVI.from_scvi_model(scvi_model, "Unknown", labels_key="labels")
    assert model.config_ == scvi_model.config_
    assert {k: model.init_params_["non_kwargs"][k] for k in RECORDED} == RECORDED
    _assert_options_reach_the_module(model.module)
    # the options only shape the SCVI part, so every SCVI tensor fits and is copied
    ours = model.module.state_dict()
    for name, value in scvi_model.module.state_dict().items():
        torch.testing.assert_close(ours[name], value)
    model.train(max_epochs=2, batch_size=32, plan_kwargs={"n_epochs_kl_warmup": 2})
    for key in ("elbo_train", "train_classification_loss"):
        values = model.history[key][key].to_numpy()
        assert np.isfinite(values).all() and values[-1] < values[0], key
    model.save(tmp_path / "m")
    loaded = SCANVI.load(tmp_path / "m", adata=sim.copy())
    assert loaded.config_ == model.config_
    _assert_options_reach_the_module(loaded.module)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    np.testing.assert_array_equal(loaded.predict(), model.predict())


def test_scanvi_takes_the_options_directly_and_checks_them(sim):
    SCANVI.setup_anndata(sim, labels_key="labels", unlabeled_category="Unknown", batch_key="batch")
    model = SCANVI(sim, n_hidden=16, n_latent=4, linear_classifier=True, **OPTIONS)
    _assert_options_reach_the_module(model.module)
    assert model.init_params_["non_kwargs"]["linear_classifier"] is True
    with pytest.raises(TypeError, match="batch_embedding_kwargs has an unsupported key 'sparse'"):
        SCANVI(sim, batch_embedding_kwargs={"sparse": True})
    with pytest.raises(ValueError, match="var_activation=.*is not supported"):
        SCANVI(sim, var_activation=torch.sigmoid)
