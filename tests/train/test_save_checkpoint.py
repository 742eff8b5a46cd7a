"""SaveCheckpoint: scvi-tools' signature, filename templates, top-k, refused and ignored options."""

from __future__ import annotations

import os

import pytest

from cellvi.model import SCVI
from cellvi.train import SaveCheckpoint


def test_the_signature_is_scvi_tools_positional_order(tmp_path):
    cb = SaveCheckpoint(tmp_path, "best-{epoch}", "elbo_validation", True, True)
    assert cb.dirpath == str(tmp_path)
    assert cb.filename == "best-{epoch}"
    assert cb.monitor == "elbo_validation"
    assert cb.load_best_on_end and cb.check_nan_gradients
    assert cb.save_top_k == 1 and cb.mode == "min"  # Lightning's defaults


@pytest.mark.parametrize("name", ["save_weights_only", "save_last"])
def test_save_weights_only_and_save_last_are_ignored_with_a_runtime_warning(name):
    with pytest.warns(RuntimeWarning, match=rf"SaveCheckpoint: {name}=True is ignored"):
        cb = SaveCheckpoint(**{name: True})
    assert not cb.save_weights_only and not cb.save_last


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"every_n_train_steps": 5}, TypeError, r"unsupported argument\(s\) \['every_n_train"),
        ({"save_on_train_epoch_end": True}, TypeError, "only these ModelCheckpoint arguments"),
        ({"mode": "best"}, ValueError, "mode='best'; use 'min' or 'max'"),
        ({"save_top_k": -2}, ValueError, r"save_top_k=-2 must be an integer >= -1"),
        ({"filename": ""}, TypeError, "filename='' must be a non-empty string"),
    ],
)
def test_unsupported_or_bad_options_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        SaveCheckpoint(**kwargs)


def test_filename_save_top_k_and_mode_are_honoured(sim_tiny, tmp_path):
    SCVI.setup_anndata(sim_tiny, batch_key="batch")
    model = SCVI(sim_tiny, n_hidden=16, n_latent=4)
    cb = SaveCheckpoint(
        dirpath=tmp_path / "best",
        filename="best-{epoch}",
        monitor="elbo_validation",
        save_top_k=2,
        mode="max",
    )
    model.train(max_epochs=4, callbacks=[cb])
    elbo = model.history["elbo_validation"]["elbo_validation"].to_numpy()
    kept = sorted(int(e) for e in elbo.argsort()[-2:])  # the two largest: mode="max"
    assert sorted(os.listdir(tmp_path / "best")) == [f"best-epoch={e}" for e in kept]
    assert cb.best_model_path == str(tmp_path / "best" / f"best-epoch={int(elbo.argmax())}")
    assert float(cb.best_model_score) == pytest.approx(elbo.max(), rel=1e-6)
    assert SCVI.load(cb.best_model_path, adata=sim_tiny.copy()).is_trained
