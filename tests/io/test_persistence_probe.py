"""Persistence defects found by a probe: crash-safe swaps, damaged files, attributes that must
survive a save, registrations kept by loading a copy, and what best-model checkpoints hold."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import cellvi
from cellvi.errors import ModelFileError
from cellvi.io import read_model_file, write_model_dir
from cellvi.model import SCANVI, SCVI


def _data():
    return cellvi.data.simulate(
        n_cells=300, n_genes=60, n_batches=2, n_cell_types=3, n_de_genes_per_type=5, seed=0
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2-epoch SCVI saved to ``<dir>/m``; returns (model, its directory)."""
    root = tmp_path_factory.mktemp("saved")
    with cellvi.settings.override(progress_bar_style="none", logging_dir=root / "log"):
        adata = _data()
        SCVI.setup_anndata(adata, batch_key="batch")
        model = SCVI(adata, n_hidden=16, n_latent=4)
        model.train(max_epochs=2, save_resume_checkpoint=False)
    model.save(root / "m")
    return model, root / "m"


# ------------------------------------------------------------------ atomic directory swap
def test_a_failure_between_the_two_renames_puts_the_previous_save_back(tmp_path, monkeypatch):
    import cellvi.io._atomic as atomic

    write_model_dir(tmp_path / "m", state_dict={"w": torch.ones(2)}, var_names=[], attr_dict={})
    real, calls = os.replace, []

    def replace(src, dst):  # the old directory moves aside, then the new one fails to move in
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the two-rename fallback
    with pytest.raises(KeyboardInterrupt):
        write_model_dir(
            tmp_path / "m",
            state_dict={"w": torch.zeros(2)},
            var_names=[],
            attr_dict={},
            overwrite=True,
        )
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing hidden left over
    torch.testing.assert_close(
        read_model_file(tmp_path / "m")["model_state_dict"]["w"], torch.ones(2)
    )


def test_overwrite_does_not_replace_a_regular_file(tmp_path):
    (tmp_path / "results.h5ad").write_text("user data")
    with pytest.raises(ModelFileError, match="is a file, not a model directory"):
        write_model_dir(
            tmp_path / "results.h5ad", state_dict={}, var_names=[], attr_dict={}, overwrite=True
        )
    assert (tmp_path / "results.h5ad").read_text() == "user data"


def test_an_empty_model_file_says_so(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.pt").write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"is empty \(0 bytes\)"):
        read_model_file(tmp_path / "m")


# --------------------------------------------------------------- damaged or edited files
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("attr_dict"), "has no attr_dict"),
        (lambda c: c.update(attr_dict=[1, 2]), "has no attr_dict"),
        (lambda c: c.update(model_state_dict=[1]), "model_state_dict is not a dictionary"),
        (lambda c: c["attr_dict"].pop("registry_"), "no data registry"),
        (lambda c: c["attr_dict"].update(registry_="x"), "no data registry"),
        (lambda c: c["attr_dict"]["registry_"].pop("setup_args"), "has no setup_args"),
        (lambda c: c["attr_dict"].pop("init_params_"), "no init_params_"),
        (lambda c: c["attr_dict"].update(history_={"elbo": 5}), "history_ is not"),
        (
            lambda c: c["attr_dict"].update(
                train_indices_={"__ndarray__": [], "dtype": "int64", "shape": [10**12]}
            ),
            "cannot be decoded",
        ),
        (
            lambda c: c["attr_dict"]["init_params_"]["non_kwargs"].update(bogus=1),
            "init params stored in .* do not fit SCVI",
        ),
    ],
)
def test_a_damaged_file_is_a_model_file_error_naming_the_part(saved, tmp_path, edit, message):
    model, path = saved
    shutil.copytree(path, tmp_path / "m")
    content = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    edit(content)
    torch.save(content, tmp_path / "m" / "model.pt")
    with pytest.raises(ModelFileError, match=message):
        SCVI.load(tmp_path / "m", adata=model.adata.copy())


def test_load_registry_of_a_file_without_registry_is_a_model_file_error(saved, tmp_path):
    _, path = saved
    shutil.copytree(path, tmp_path / "m")
    content = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    del content["attr_dict"]["registry_"]
    torch.save(content, tmp_path / "m" / "model.pt")
    with pytest.raises(ModelFileError, match="no data registry"):
        SCVI.load_registry(tmp_path / "m")


# ------------------------------------------------------------ what loading keeps and sets
def test_loading_with_a_copy_leaves_the_original_set_up(saved):
    model, path = saved
    loaded = SCVI.load(path, adata=model.adata.copy())
    again = SCVI(model.adata, n_hidden=16, n_latent=4)  # the original keeps its registration
    assert again.adata is model.adata and loaded.adata is not model.adata


def test_scanvi_from_a_pretrained_scvi_keeps_that_flag_through_save_and_load(saved, tmp_path):
    model, path = saved
    scvi = SCVI.load(path, adata=model.adata.copy())
    scanvi = SCANVI.from_scvi_model(scvi, "unknown", labels_key="cell_type")
    assert scanvi.was_pretrained_
    scanvi.save(tmp_path / "s")
    loaded = SCANVI.load(tmp_path / "s", adata=scanvi.adata.copy())
    assert loaded.was_pretrained_  # so train()'s default epochs stay the fine-tuning ones
    assert not loaded.is_trained


# -------------------------------------------------------------------- best checkpoints
def test_best_checkpoints_hold_the_history_to_their_epoch_and_the_split(tmp_path):
    from cellvi.train import SaveCheckpoint

    adata = _data()
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=4)
    ckpt = SaveCheckpoint(dirpath=tmp_path / "best", monitor="elbo_validation", save_top_k=-1)
    model.train(max_epochs=2, callbacks=[ckpt], save_resume_checkpoint=False)
    for epoch in range(2):
        (name,) = [p for p in os.listdir(tmp_path / "best") if p.startswith(f"epoch={epoch}-")]
        loaded = SCVI.load(tmp_path / "best" / name, adata=adata.copy())
        for metric in ("elbo_train", "elbo_validation"):
            pd.testing.assert_frame_equal(
                loaded.history[metric], model.history[metric].iloc[: epoch + 1]
            )
        np.testing.assert_array_equal(loaded.train_indices, model.train_indices)
        np.testing.assert_array_equal(loaded.validation_indices, model.validation_indices)
    final = SCVI.load(tmp_path / "best" / name, adata=adata.copy())  # the last epoch's
    for key, value in model.module.state_dict().items():
        torch.testing.assert_close(final.module.state_dict()[key], value)


def test_epochs_without_validation_get_no_validation_monitored_checkpoint(tmp_path):
    """check_val_every_n_epoch=2: the metric of epoch 1 does not score epoch 2's weights."""
    from cellvi.train import SaveCheckpoint

    adata = _data()
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=4)
    ckpt = SaveCheckpoint(dirpath=tmp_path / "best", monitor="elbo_validation", save_top_k=-1)
    model.train(
        max_epochs=5, check_val_every_n_epoch=2, callbacks=[ckpt], save_resume_checkpoint=False
    )
    epochs = sorted(int(p.split("-")[0].split("=")[1]) for p in os.listdir(tmp_path / "best"))
    assert epochs == [1, 3]  # the validated epochs only


# ------------------------------------------------------------- saving into a shared folder
def test_overwrite_keeps_other_prefixes_and_files_but_not_stale_data(saved, tmp_path):
    """Prefixes exist to keep several models in one folder: a second model saved there with
    overwrite=True keeps the first (and the user's own files); only this prefix's earlier
    files are replaced, and its stale adata.h5ad is removed."""
    model, _ = saved
    folder = tmp_path / "results"
    model.save(folder, prefix="a_", save_anndata=True)
    (folder / "notes.txt").write_text("mine")
    model.save(folder, prefix="b_", overwrite=True, save_anndata=True)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["a_adata.h5ad", "a_model.pt", "b_adata.h5ad", "b_model.pt", "notes.txt"]
    model.save(folder, prefix="b_", overwrite=True)  # no AnnData this time: none stays
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["a_adata.h5ad", "a_model.pt", "b_model.pt", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine"
    for prefix in ("a_", "b_"):
        loaded = SCVI.load(folder, adata=model.adata, prefix=prefix)
        np.testing.assert_array_equal(
            loaded.get_latent_representation(), model.get_latent_representation()
        )


def test_a_folder_of_only_this_models_files_is_swapped_whole(saved, tmp_path):
    model, _ = saved
    folder = tmp_path / "m"
    model.save(folder, save_anndata=True)
    model.save(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["model.pt"]


def test_saving_into_the_working_directory(saved, tmp_path, monkeypatch):
    model, _ = saved
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    model.save(".", overwrite=True)  # was OSError EBUSY (a rename of ".")
    model.save(".", overwrite=True)
    assert sorted(p.name for p in work.iterdir()) == ["model.pt"]
    assert SCVI.load(".", adata=model.adata).is_trained


def test_a_saved_model_given_as_ckpt_path_is_named(saved):
    model, folder = saved
    for path in (folder, folder / "model.pt"):
        with pytest.raises(ValueError, match="is a saved model, not a training checkpoint"):
            model.train(max_epochs=1, ckpt_path=path)
