"""Save/load round trips, transfer checks on new data, best-model checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellvi.errors import CellviWarning, InvalidDataError, SetupError
from cellvi.model import SCVI


@pytest.fixture
def trained(sim_tiny):
    SCVI.setup_anndata(sim_tiny, batch_key="batch")
    model = SCVI(sim_tiny, n_hidden=16, n_latent=4, dispersion="gene-batch")
    model.train(max_epochs=3)
    return model


def test_loaded_model_gives_identical_latents_and_keeps_history(trained, tmp_path):
    trained.save(tmp_path / "m")
    loaded = SCVI.load(tmp_path / "m", adata=trained.adata.copy())
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), trained.get_latent_representation()
    )
    assert loaded.is_trained
    np.testing.assert_array_equal(loaded.train_indices, trained.train_indices)
    np.testing.assert_allclose(
        loaded.history["elbo_train"]["elbo_train"], trained.history["elbo_train"]["elbo_train"]
    )
    assert loaded.init_params_ == trained.init_params_


def test_save_anndata_and_load_without_passing_it(trained, tmp_path):
    trained.save(tmp_path / "m", save_anndata=True)
    loaded = SCVI.load(tmp_path / "m")
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), trained.get_latent_representation()
    )


def test_load_without_data_warns_and_keeps_registry(trained, tmp_path):
    trained.save(tmp_path / "m")
    with pytest.warns(CellviWarning, match="loaded without data"):
        loaded = SCVI.load(tmp_path / "m")
    assert loaded.summary_stats["n_batch"] == 2
    assert SCVI.load_registry(tmp_path / "m")["setup_args"]["batch_key"] == "batch"


def test_load_rejects_permuted_genes(trained, tmp_path):
    trained.save(tmp_path / "m")
    other = trained.adata[:, ::-1].copy()
    with pytest.raises(SetupError, match="gene names differ.*prepare_query_anndata"):
        SCVI.load(tmp_path / "m", adata=other)


def test_load_rejects_unseen_batch(trained, tmp_path):
    trained.save(tmp_path / "m")
    other = trained.adata.copy()
    other.obs["batch"] = other.obs["batch"].cat.rename_categories(["batch_0", "batch_9"])
    with pytest.raises(InvalidDataError, match=r"not seen: \['batch_9'\].*extend_categories"):
        SCVI.load(tmp_path / "m", adata=other)


def test_outputs_on_new_data_transfer_the_setup(trained):
    other = trained.adata.copy()
    z = trained.get_latent_representation(other)
    np.testing.assert_allclose(z, trained.get_latent_representation(), rtol=1e-5, atol=1e-6)


def test_best_checkpoint_is_a_loadable_model_directory(sim_tiny):
    SCVI.setup_anndata(sim_tiny, batch_key="batch")
    model = SCVI(sim_tiny, n_hidden=16, n_latent=4)
    model.train(max_epochs=4, enable_checkpointing=True, load_best_on_end=True)
    best = model.trainer.checkpoint_callbacks
    paths = [cb.best_model_path for cb in best if getattr(cb, "best_model_path", "")]
    assert paths, "no best checkpoint written"
    loaded = SCVI.load(paths[0], adata=sim_tiny.copy())
    assert loaded.is_trained  # weights from training: no "not trained" warning on outputs
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), rtol=1e-5, atol=1e-6
    )


def test_a_supplied_save_checkpoint_switches_checkpointing_on(sim_tiny, tmp_path):
    from cellvi.train import SaveCheckpoint

    SCVI.setup_anndata(sim_tiny, batch_key="batch")
    model = SCVI(sim_tiny, n_hidden=16, n_latent=4)
    ckpt = SaveCheckpoint(dirpath=tmp_path / "best", monitor="elbo_validation")
    model.train(max_epochs=4, callbacks=[ckpt])  # validation is switched on for its monitor
    assert len(model.history["elbo_validation"]) == 4
    best_epoch = int(model.history["elbo_validation"]["elbo_validation"].to_numpy().argmin())
    assert ckpt.best_model_path.startswith(str(tmp_path / "best" / f"epoch={best_epoch}-"))
    assert SCVI.load(ckpt.best_model_path, adata=sim_tiny.copy()).is_trained


def test_check_nan_gradients_ends_a_failed_run_on_the_best_weights(sim_tiny):
    import lightning.pytorch as pl

    from cellvi.train import SaveCheckpoint

    class FailAtEpoch3(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 3:
                raise RuntimeError("disk full")

    SCVI.setup_anndata(sim_tiny, batch_key="batch")
    model = SCVI(sim_tiny, n_hidden=16, n_latent=4)
    ckpt = SaveCheckpoint(monitor="elbo_validation", mode="max", check_nan_gradients=True)
    with pytest.raises(RuntimeError, match="disk full") as err:
        model.train(max_epochs=6, callbacks=[ckpt, FailAtEpoch3()])
    assert "best checkpoint's weights" in "".join(err.value.__notes__)
    # mode="max" keeps the worst ELBO: epoch 0's, not the last finished epoch's weights
    assert ckpt.best_model_path.split("/")[-1].startswith("epoch=0-")
    best = SCVI.load(ckpt.best_model_path, adata=sim_tiny.copy())
    for name, value in best.module.state_dict().items():
        torch.testing.assert_close(model.module.state_dict()[name], value)
