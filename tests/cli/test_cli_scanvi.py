"""Command line with SCANVI: the labels it predicts are written for the data and the query."""

from __future__ import annotations

import anndata
import numpy as np
import pytest
from _workflows import write_workflow

import cellvi
from cellvi.cli import main
from cellvi.cli._schema import ConfigError, load_workflow


def _data(folder, hide: float):
    """Simulated counts split into ``data.h5ad`` (400 cells; ``cell_type`` is "Unknown" for
    a fraction ``hide`` of them) and an unlabelled ``query.h5ad`` (200 cells of the same
    types); the true type is kept in ``true_type``. Returns the reference's hidden cells."""
    adata = cellvi.data.simulate(
        n_cells=600, n_genes=60, n_batches=2, n_cell_types=3, n_de_genes_per_type=15, seed=0
    )
    adata.obs["true_type"] = adata.obs["cell_type"].astype(str)
    hidden = np.random.default_rng(0).random(adata.n_obs) < hide
    hidden[400:] = True
    labels = adata.obs["true_type"].to_numpy(dtype=object, copy=True)
    labels[hidden] = "Unknown"
    adata.obs["cell_type"] = labels
    adata[:400].copy().write_h5ad(folder / "data.h5ad")
    adata[400:].copy().write_h5ad(folder / "query.h5ad")
    return hidden[:400]


def _scanvi_workflow(tmp_path, outputs=""):
    hidden = _data(tmp_path, hide=0.3)
    path = write_workflow(
        tmp_path,
        (tmp_path / "data.h5ad").as_posix(),
        model='name = "SCANVI"\nn_hidden = 32\nn_latent = 5',
        setup='batch_key = "batch"\nlabels_key = "cell_type"\nunlabeled_category = "Unknown"',
        train="plan_kwargs = { lr = 0.01 }",
        outputs=outputs,
    )
    return path, hidden


def test_a_scanvi_run_writes_predicted_labels_for_its_cells_and_the_query(tmp_path):
    query = (tmp_path / "query.h5ad").as_posix()  # written by _scanvi_workflow
    mapping = f'reference_mapping = {{ query = "{query}", max_epochs = 5 }}'
    path, hidden = _scanvi_workflow(tmp_path, outputs=mapping)
    path.write_text(path.read_text().replace("max_epochs = 2", "max_epochs = 20"))
    assert load_workflow(path)["outputs"]["predictions"]  # on by default for SCANVI
    assert main(["run", str(path)]) == 0
    out = tmp_path / "out"
    for name in ("adata.h5ad", "query_adata.h5ad"):
        result = anndata.read_h5ad(out / name)
        predicted = result.obs["cellvi_prediction"]
        # the model's label order (scvi-tools' swap of the unlabeled category to the end)
        assert list(predicted.cat.categories) == ["type_2", "type_0", "type_1"]
        probabilities = result.obsm["cellvi_prediction_probabilities"]
        assert list(probabilities.columns) == list(predicted.cat.categories)
        np.testing.assert_allclose(probabilities.to_numpy().sum(1), 1.0, rtol=1e-5)
        best = probabilities.columns[probabilities.to_numpy().argmax(1)]
        assert (predicted.astype(str).to_numpy() == best).all()
        # the cells whose label was hidden get their true type back
        mask = hidden if name == "adata.h5ad" else np.ones(result.n_obs, bool)
        truth = result.obs["true_type"].to_numpy()[mask]
        accuracy = (predicted.astype(str).to_numpy()[mask] == truth).mean()
        assert accuracy > 0.9, (name, accuracy)


def test_predictions_can_be_turned_off_and_need_scanvi(tmp_path):
    path, _ = _scanvi_workflow(tmp_path, outputs="predictions = false")
    assert main(["run", str(path)]) == 0
    result = anndata.read_h5ad(tmp_path / "out" / "adata.h5ad")
    assert "cellvi_prediction" not in result.obs
    assert "cellvi_prediction_probabilities" not in result.obsm
    text = path.read_text().replace('name = "SCANVI"\n', "").replace("false", "true")
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"\[outputs\].predictions needs a classifier"):
        load_workflow(path)
