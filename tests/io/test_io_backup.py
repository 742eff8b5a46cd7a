"""load(backup_url=, sha256=, datamodule=, allowed_classes_names_list=) (persistence.md §2)."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

import cellvi
from cellvi.dataloaders import AnnDataModule
from cellvi.errors import ModelFileError, SetupError
from cellvi.model import SCVI


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("backup")
    adata = cellvi.data.synthetic_iid(batch_size=40, n_genes=20, n_batches=2)
    SCVI.setup_anndata(adata, batch_key="batch")
    with cellvi.settings.override(progress_bar_style="none", logging_dir=str(root / "logs")):
        model = SCVI(adata, n_hidden=8, n_latent=3)
        model.train(max_epochs=1)
    model.save(root / "ref")
    digest = hashlib.sha256((root / "ref" / "model.pt").read_bytes()).hexdigest()
    return root, adata, model.get_latent_representation(), digest


def test_a_missing_model_file_is_copied_from_a_local_backup(saved, tmp_path):
    root, adata, z, digest = saved
    for url in (str(root / "ref" / "model.pt"), (root / "ref" / "model.pt").as_uri()):
        target = tmp_path / url[-12:].replace("/", "_")
        loaded = SCVI.load(target, adata.copy(), backup_url=url, sha256=digest.upper())
        assert (target / "model.pt").is_file()
        np.testing.assert_array_equal(loaded.get_latent_representation(), z)


def test_a_backup_with_another_hash_is_refused_and_leaves_nothing(saved, tmp_path):
    root, adata, _, digest = saved
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(ModelFileError, match=f"not the expected {wrong}"):
        SCVI.load(tmp_path / "m", adata.copy(), backup_url=root / "ref" / "model.pt", sha256=wrong)
    assert list((tmp_path / "m").iterdir()) == []  # no half or mismatching copy
    # an existing file is checked too
    shutil.copytree(root / "ref", tmp_path / "present")
    with pytest.raises(ModelFileError, match="damaged or not the one you meant"):
        SCVI.load(tmp_path / "present", adata.copy(), sha256=wrong)
    SCVI.load(tmp_path / "present", adata.copy(), sha256=digest)


def test_backup_urls_and_hashes_are_checked(saved, tmp_path):
    root, adata, _, _ = saved
    with pytest.raises(ValueError, match="never uses the network.*curl"):
        SCVI.load(tmp_path / "m", adata.copy(), backup_url="https://example.org/model.pt")
    with pytest.raises(FileNotFoundError, match="names no file"):
        SCVI.load(tmp_path / "m", adata.copy(), backup_url=str(tmp_path / "nowhere.pt"))
    with pytest.raises(ValueError, match="64 hexadecimal"):
        SCVI.load(root / "ref", adata.copy(), sha256="abc")
    with pytest.raises(ModelFileError, match="model.pt"):  # no backup: the usual error
        SCVI.load(tmp_path / "m", adata.copy())


def test_allowed_class_names_let_another_class_load_the_file(saved):
    root, adata, z, _ = saved

    class MySCVI(SCVI):
        pass

    with pytest.raises(ModelFileError, match="holds a SCVI model"):
        MySCVI.load(root / "ref", adata.copy())
    with pytest.raises(ValueError, match="list of class names"):
        MySCVI.load(root / "ref", adata.copy(), allowed_classes_names_list="SCVI")
    mine = MySCVI.load(root / "ref", adata.copy(), allowed_classes_names_list=["SCVI"])
    assert type(mine) is MySCVI
    np.testing.assert_array_equal(mine.get_latent_representation(), z)


def test_a_model_trained_on_a_data_module_loads_with_that_module(tmp_path):
    adata = cellvi.data.synthetic_iid(batch_size=40, n_genes=20, n_batches=2)
    dm = AnnDataModule(adata, batch_key="batch", batch_size=32)
    with cellvi.settings.override(progress_bar_style="none", logging_dir=str(tmp_path / "logs")):
        model = SCVI(adata=None, registry=dm.registry, n_hidden=8, n_latent=3)
        model.train(max_epochs=1, datamodule=dm)
    z = model.get_latent_representation(dataloader=dm.inference_dataloader())
    model.save(tmp_path / "dm_model")
    with pytest.raises(ValueError, match="not both"):
        SCVI.load(tmp_path / "dm_model", adata, datamodule=dm)
    loaded = SCVI.load(tmp_path / "dm_model", datamodule=dm)
    np.testing.assert_allclose(
        loaded.get_latent_representation(dataloader=dm.inference_dataloader()), z, atol=1e-6
    )
    # a module of other genes does not fit the saved registry
    other = AnnDataModule(
        cellvi.data.synthetic_iid(batch_size=40, n_genes=25, n_batches=2), batch_key="batch"
    )
    with pytest.raises(SetupError, match="gene set of the data module does not match"):
        SCVI.load(tmp_path / "dm_model", datamodule=other)
