"""``save``'s scvi-tools signature (``save_kwargs``, AnnData write keywords) and
``view_setup_args``."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest

import cellvi
from cellvi.model import SCVI


@pytest.fixture(scope="module")
def model():
    adata = cellvi.data.simulate(n_cells=120, n_genes=60, n_batches=2, n_cell_types=2, seed=1)
    SCVI.setup_anndata(adata, batch_key="batch")
    m = SCVI(adata, n_latent=3)
    with cellvi.settings.override(progress_bar_style="none"):
        m.train(max_epochs=2, save_resume_checkpoint=False)
    return m


def test_anndata_write_keywords_reach_write_h5ad(model, tmp_path):
    model.save(tmp_path / "m", save_anndata=True, compression="gzip")
    with h5py.File(tmp_path / "m" / "adata.h5ad") as f:
        assert f["X"]["data"].compression == "gzip"
    loaded = SCVI.load(tmp_path / "m")
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )


def test_save_kwargs_reach_torch_save_and_compatibility_arguments_are_accepted(model, tmp_path):
    model.save(
        tmp_path / "m",
        save_kwargs={"pickle_protocol": 2, "_use_new_zipfile_serialization": True},
        legacy_mudata_format=True,
        datamodule=None,
    )
    loaded = SCVI.load(tmp_path / "m", adata=model.adata)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )


def test_save_kwargs_that_would_fail_or_need_unpickling_are_refused_before_writing(model, tmp_path):
    with pytest.raises(ValueError, match="pickle_module"):
        model.save(tmp_path / "a", save_kwargs={"pickle_module": pickle})
    with pytest.raises(ValueError, match="pickle_protocol"):
        model.save(tmp_path / "p", save_kwargs={"pickle_protocol": 4})
    with pytest.raises(TypeError, match="compression"):
        model.save(tmp_path / "b", save_kwargs={"compression": "gzip"})
    with pytest.raises(TypeError, match="save_kwargs must be a dict"):
        model.save(tmp_path / "c", save_kwargs=4)
    assert not any(tmp_path.iterdir())


def test_view_setup_args_prints_the_saved_setup(model, tmp_path, capsys):
    model.save(tmp_path / "m", prefix="ref_")
    SCVI.view_setup_args(tmp_path / "m", prefix="ref_")
    out = capsys.readouterr().out
    assert out.startswith("SCVI.setup_anndata(")
    assert "batch_key='batch'," in out
    assert "layer=None," in out


def test_viewing_the_setup_of_unregistered_data_is_an_error_and_registers_nothing(model):
    other = model.adata.copy()
    for key in [k for k in other.uns if k.startswith("_cellvi")]:
        del other.uns[key]
    other.obs = other.obs[[c for c in other.obs if not c.startswith("_cellvi")]]
    with pytest.raises(ValueError, match="not registered with this SCVI"):
        model.view_anndata_setup(other)
    assert not any(c.startswith("_cellvi") for c in other.obs)
    model.view_anndata_setup()  # its own data still prints


def test_init_params_in_the_specs_nested_layout_load(model, tmp_path):
    import torch

    model.save(tmp_path / "m")
    path = tmp_path / "m" / "model.pt"
    content = torch.load(path, weights_only=True)
    init = content["attr_dict"]["init_params_"]
    # persistence.md / scvi-tools: **kwargs stored under the variadic parameter's name
    init["kwargs"] = {"kwargs": {"n_latent": init["non_kwargs"].pop("n_latent")}}
    torch.save(content, path)
    loaded = SCVI.load(tmp_path / "m", adata=model.adata)  # "unexpected keyword 'kwargs'"
    assert loaded.module.config.n_latent == model.module.config.n_latent
