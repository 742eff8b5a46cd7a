"""The whole workflow on a CUDA device: training, resume, guardrails, outputs, DE, persistence.

Skipped where no CUDA device exists (CI machines have none); run on a GPU machine with
``pytest -m gpu tests/gpu``. The CPU tests check each behaviour exactly; these check that the
same behaviour holds with weights and minibatches on the GPU, and that models cross between
devices.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from _callbacks import PoisonAt, SignalAtEpoch, resume_checkpoint

import cellvi
from cellvi.analysis import knn_label_accuracy
from cellvi.dataloaders import CSRTensor
from cellvi.errors import NonFiniteLossError, TrainingError, TrainingWarning
from cellvi.model import SCANVI, SCVI
from cellvi.simulate import true_pairwise_log2fc

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU = {"accelerator": "gpu", "devices": 1}


def _auroc(scores, positive) -> float:
    ranks = pd.Series(scores).rank().to_numpy()
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _model(adata, **kwargs):
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata, **{"n_hidden": 32, "n_latent": 6, **kwargs})


def _weights(model):
    return {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}


@pytest.fixture(scope="module")
def gpu_fitted(tmp_path_factory):
    """SCVI trained on the GPU: 600 cells, 3 types, 2 batches, 200 genes, 100 epochs."""
    with cellvi.settings.override(
        logging_dir=tmp_path_factory.mktemp("runs"), progress_bar_style="none"
    ):
        adata = cellvi.data.simulate(n_cells=600, n_genes=200, n_batches=2, n_cell_types=3, seed=0)
        SCVI.setup_anndata(adata, batch_key="batch")
        model = SCVI(adata)
        model.train(max_epochs=100, plan_kwargs={"n_epochs_kl_warmup": 10}, **GPU)
    return model


def test_training_keeps_weights_on_the_gpu_and_reaches_the_cpu_elbo(sim_small):
    kwargs = {
        "max_epochs": 40,
        "check_val_every_n_epoch": 1,
        "plan_kwargs": {"n_epochs_kl_warmup": 5},
    }
    cpu = _model(sim_small.copy())
    cpu.train(accelerator="cpu", **kwargs)
    gpu = _model(sim_small.copy())
    gpu.train(**GPU, **kwargs)
    assert gpu.device.type == "cuda" and gpu.is_trained
    history = gpu.history["elbo_validation"]["elbo_validation"]
    assert np.isfinite(history).all() and history.iloc[-1] < 0.9 * history.iloc[0]
    ours = gpu.get_elbo(indices=gpu.validation_indices)
    theirs = cpu.get_elbo(indices=cpu.validation_indices)
    assert abs(ours - theirs) / abs(theirs) < 0.02
    with pytest.warns(TrainingWarning, match="already trained"):
        gpu.train(max_epochs=2, **GPU)  # training again appends, still on the GPU
    assert len(gpu.history["elbo_train"]) == 42 and gpu.device.type == "cuda"


def test_outputs_of_a_gpu_model_have_the_spec_shapes_and_separate_types(gpu_fitted):
    model = gpu_fitted
    n, g = model.adata.n_obs, model.adata.n_vars
    latent = model.get_latent_representation()
    assert latent.shape == (n, 10) and np.isfinite(latent).all()
    assert knn_label_accuracy(latent, model.adata.obs["cell_type"]) >= 0.9
    qz = model.get_latent_representation(return_dist=True)
    np.testing.assert_allclose(qz[0], latent, rtol=1e-6)
    assert model.device.type == "cuda"  # the weights stay where they were trained
    state = torch.cuda.get_rng_state()
    expr = model.get_normalized_expression(n_samples=3, transform_batch=["batch_0", "batch_1"])
    assert torch.equal(torch.cuda.get_rng_state(), state)  # seeded draws, caller's stream kept
    assert expr.shape == (n, g) and np.isfinite(expr.to_numpy()).all()
    np.testing.assert_allclose(expr.sum(axis=1), 1.0, rtol=1e-4)
    sample = model.posterior_predictive_sample(n_samples=2, indices=np.arange(50))
    assert sample.shape == (50, g, 2)
    params = model.get_likelihood_parameters(indices=np.arange(50))
    assert params["mean"].shape == (50, g) and np.isfinite(params["dispersions"]).all()
    assert np.isfinite(model.get_elbo()) and np.isfinite(model.get_marginal_ll(n_mc_samples=20))
    assert np.isfinite(model.get_reconstruction_error()["reconstruction_loss"])


def test_de_on_the_gpu_recovers_the_planted_genes(gpu_fitted):
    lfc = true_pairwise_log2fc(gpu_fitted.adata, "type_0", "type_1")
    de, null = (lfc.abs() > 1).to_numpy(), (lfc.abs() < 0.3).to_numpy()
    keep = de | null
    change = gpu_fitted.differential_expression(
        groupby="cell_type", group1="type_0", group2="type_1", mode="change"
    ).loc[lfc.index]
    assert _auroc(change["proba_de"].to_numpy()[keep], de[keep]) >= 0.95
    assert np.corrcoef(change["lfc_mean"], lfc)[0, 1] >= 0.9
    vanilla = gpu_fitted.differential_expression(
        groupby="cell_type", group1="type_0", group2="type_1", batch_correction=True
    ).loc[lfc.index]
    assert _auroc(vanilla["bayes_factor"].abs().to_numpy()[keep], de[keep]) >= 0.95
    every = gpu_fitted.differential_expression(groupby="cell_type")  # one-vs-rest
    assert set(every["comparison"]) == {f"type_{i} vs Rest" for i in range(3)}
    weighted = gpu_fitted.differential_expression(
        groupby="cell_type",
        group1="type_0",
        group2="type_1",
        mode="change",
        weights="importance",
        importance_weighting_kwargs={"max_cells": 64, "n_mc_samples": 50},
    ).loc[lfc.index]
    assert _auroc(weighted["proba_de"].to_numpy()[keep], de[keep]) >= 0.9


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_a_gpu_model_saved_loads_on_either_device_with_the_same_latents(
    gpu_fitted, tmp_path, target
):
    gpu_fitted.save(tmp_path / "m", save_anndata=True)
    loaded = SCVI.load(tmp_path / "m", accelerator=target)
    assert loaded.device.type == ("cuda" if target == "gpu" else "cpu")
    np.testing.assert_allclose(
        loaded.get_latent_representation(),
        gpu_fitted.get_latent_representation(),
        rtol=1e-4,
        atol=1e-5,
    )
    pd.testing.assert_frame_equal(loaded.history["elbo_train"], gpu_fitted.history["elbo_train"])


def test_a_cpu_model_moves_to_the_gpu_and_trains_on(sim_tiny, tmp_path):
    model = _model(sim_tiny)
    model.train(max_epochs=3, accelerator="cpu")
    before = model.get_latent_representation()
    model.to_device("cuda:0")
    np.testing.assert_allclose(model.get_latent_representation(), before, rtol=1e-4, atol=1e-5)
    with pytest.warns(TrainingWarning, match="already trained"):
        model.train(max_epochs=2, **GPU)
    assert model.device.type == "cuda" and len(model.history["elbo_train"]) == 5


def test_interrupted_then_resumed_gpu_run_matches_the_uninterrupted_run(sim_tiny):
    kwargs = {
        "max_epochs": 4,
        "check_val_every_n_epoch": 1,
        "plan_kwargs": {"n_epochs_kl_warmup": 3},
    }
    reference = _model(sim_tiny.copy())
    reference.train(**GPU, **kwargs)
    model = _model(sim_tiny.copy())
    with pytest.raises(TrainingError, match="interrupted by SIGTERM") as info:
        model.train(**GPU, **kwargs, callbacks=[SignalAtEpoch(2)])
    model.train(**GPU, **kwargs, ckpt_path=resume_checkpoint(info.value))
    assert model.device.type == "cuda"
    # GPU kernels may reduce in a different order from run to run (atomics), so the weights
    # agree to rounding rather than bit for bit as on the CPU
    for name, value in _weights(reference).items():
        torch.testing.assert_close(_weights(model)[name], value, rtol=1e-4, atol=1e-5, msg=name)
    np.testing.assert_allclose(
        model.history["elbo_validation"]["elbo_validation"],
        reference.history["elbo_validation"]["elbo_validation"],
        rtol=1e-4,
    )


def test_a_nan_on_the_gpu_is_caught_at_its_step_and_weights_roll_back(sim_tiny):
    model = _model(sim_tiny)
    poison = PoisonAt(epoch=1)
    with pytest.raises(
        NonFiniteLossError, match=r"epoch 2 \(history index 1\), step 3 .*not raw counts"
    ):
        model.train(max_epochs=3, batch_size=96, callbacks=[poison], **GPU)
    poison.assert_rolled_back(model)
    assert model.device.type == "cuda"


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_compiled_training_on_the_gpu_reaches_the_eager_elbo(sim_small):
    kwargs = {"max_epochs": 12, "batch_size": 100, "train_size": 0.8, "validation_size": 0.2}
    eager = _model(sim_small.copy())
    eager.train(**kwargs, plan_kwargs={"n_epochs_kl_warmup": 6}, **GPU)
    compiled = _model(sim_small.copy())
    compiled.train(**kwargs, plan_kwargs={"n_epochs_kl_warmup": 6, "compile": True}, **GPU)
    ours = compiled.get_elbo(indices=compiled.validation_indices)
    theirs = eager.get_elbo(indices=eager.validation_indices)
    assert np.isfinite(ours) and abs(ours - theirs) / abs(theirs) < 0.02


def test_sparse_rows_gathered_on_the_gpu_equal_the_cpu_rows():
    import scipy.sparse

    matrix = scipy.sparse.random(300, 50, density=0.2, format="csr", random_state=0)
    matrix.data = np.round(matrix.data * 20).astype(np.float32)
    on_cpu = CSRTensor(matrix)
    on_gpu = on_cpu.to("cuda")
    idx = torch.tensor([5, 0, 299, 5, 17, 120])
    torch.testing.assert_close(on_gpu.rows(idx.cuda()).cpu(), on_cpu.rows(idx))
    torch.testing.assert_close(
        on_gpu.sparse_rows(idx.cuda()).to_dense().cpu(), on_cpu.sparse_rows(idx).to_dense()
    )


def test_counts_on_disk_train_on_the_gpu(tmp_path):
    adata = cellvi.data.simulate(n_cells=600, n_genes=100, n_batches=2, n_cell_types=3, seed=0)
    adata.write_h5ad(tmp_path / "sim.h5ad")
    backed = cellvi.data.read_backed(tmp_path / "sim.h5ad")
    model = _model(backed, n_latent=10, n_hidden=128)
    model.train(max_epochs=60, plan_kwargs={"n_epochs_kl_warmup": 10}, **GPU)
    assert knn_label_accuracy(model.get_latent_representation(), adata.obs["cell_type"]) >= 0.9


def test_scanvi_and_query_mapping_on_the_gpu():
    adata = cellvi.data.simulate(n_cells=900, n_genes=120, n_batches=3, n_cell_types=3, seed=8)
    adata.obs["labels"] = adata.obs["cell_type"].astype(str)
    ref = adata[adata.obs["batch"] != "batch_2"].copy()
    query = adata[adata.obs["batch"] == "batch_2"].copy()
    truth = query.obs["cell_type"].astype(str).to_numpy()
    query.obs["labels"] = "Unknown"
    SCVI.setup_anndata(ref, batch_key="batch")
    scvi_ref = SCVI(ref, n_latent=8, dispersion="gene-batch")  # px_r grows for the query
    scvi_ref.train(max_epochs=60, plan_kwargs={"n_epochs_kl_warmup": 10}, **GPU)
    scvi_query = SCVI.load_query_data(query.copy(), scvi_ref)
    px_r = scvi_query.module.px_r.detach().clone()
    scvi_query.train(max_epochs=5, plan_kwargs={"weight_decay": 0.0}, **GPU)
    # the gradient mask (made before the move to the GPU) keeps the reference's columns
    torch.testing.assert_close(scvi_query.module.px_r[:, :2], px_r[:, :2], rtol=0, atol=0)
    assert not torch.equal(scvi_query.module.px_r[:, 2], px_r[:, 2])

    reference = SCANVI.from_scvi_model(scvi_ref, "Unknown", labels_key="labels")
    assert reference.device.type == "cuda"  # beside the SCVI it starts from
    reference.train(max_epochs=10, **GPU)
    q = SCANVI.load_query_data(query, reference)
    q.train(max_epochs=40, plan_kwargs={"weight_decay": 0.0}, **GPU)
    assert q.device.type == "cuda"
    assert (q.predict() == truth).mean() >= 0.9


@pytest.fixture
def restore_determinism_flags():
    """``deterministic=True`` makes Lightning switch torch's global flags: put them back."""
    cudnn = torch.backends.cudnn
    flags = (torch.are_deterministic_algorithms_enabled(), cudnn.benchmark, cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(flags[0])
    cudnn.benchmark, cudnn.deterministic = flags[1], flags[2]


def test_deterministic_gpu_runs_give_identical_weights_and_latents(
    sim_small, restore_determinism_flags
):
    # the default GPU run agrees to rounding only (see the resume test); with
    # deterministic=True two runs of one seed agree bit for bit, as on the CPU
    runs = []
    for _ in range(2):
        model = _model(sim_small.copy(), n_latent=8)
        model.train(max_epochs=4, batch_size=64, deterministic=True, **GPU)
        runs.append((_weights(model), model.get_latent_representation(), model.history))
    (weights_a, latent_a, history_a), (weights_b, latent_b, history_b) = runs
    for name, value in weights_a.items():
        assert torch.equal(weights_b[name], value), name
    np.testing.assert_array_equal(latent_a, latent_b)
    pd.testing.assert_frame_equal(history_a["elbo_train"], history_b["elbo_train"])
