"""SCVI and SCANVI on counts left on disk: training, inference, DE, resume, collections."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from _callbacks import SignalAtEpoch, resume_checkpoint

import cellvi
from cellvi.analysis import knn_label_accuracy
from cellvi.dataloaders import SemiSupervisedDataSplitter
from cellvi.errors import TrainingError
from cellvi.model import SCANVI, SCVI


def _write(adata, path):
    if str(path).endswith(".zarr"):
        with warnings.catch_warnings():  # anndata/zarr format-transition notices
            warnings.simplefilter("ignore", UserWarning)
            adata.write_zarr(path)
    else:
        adata.write_h5ad(path)
    return cellvi.data.read_backed(path)


@pytest.fixture
def sim():
    return cellvi.data.simulate(n_cells=600, n_genes=100, n_batches=2, n_cell_types=3, seed=0)


@pytest.mark.parametrize("suffix", ["h5ad", "zarr"])
def test_trained_on_disk_it_learns_and_infers_exactly_as_from_memory(sim, tmp_path, suffix):
    backed = _write(sim, tmp_path / f"sim.{suffix}")
    SCVI.setup_anndata(backed, batch_key="batch")
    model = SCVI(backed, n_latent=10)
    with cellvi.settings.override(dl_chunk_size=32, dl_buffer_size=256):
        model.train(max_epochs=40, plan_kwargs={"n_epochs_kl_warmup": 10})
    z = model.get_latent_representation()
    # same floor as the in-memory quality test: block shuffling does not hurt learning
    assert knn_label_accuracy(z, sim.obs["cell_type"].to_numpy()) >= 0.95
    SCVI.setup_anndata(sim, batch_key="batch")
    np.testing.assert_array_equal(z, model.get_latent_representation(sim))
    np.testing.assert_allclose(
        model.get_normalized_expression(indices=np.arange(50, 90)).to_numpy(),
        model.get_normalized_expression(sim, indices=np.arange(50, 90)).to_numpy(),
    )
    group = sim.obs["cell_type"].cat.categories[0]
    de_disk = model.differential_expression(groupby="cell_type", group1=group, mode="change")
    de_mem = model.differential_expression(sim, groupby="cell_type", group1=group, mode="change")
    np.testing.assert_allclose(
        de_disk.loc[de_mem.index, "raw_mean1"], de_mem["raw_mean1"], rtol=1e-12
    )
    np.testing.assert_allclose(de_disk.loc[de_mem.index, "proba_de"], de_mem["proba_de"])


@pytest.mark.parametrize("cls", [SCVI, SCANVI])
def test_resume_from_disk_is_exact(sim, tmp_path, cls):
    """Also for SCANVI, whose labeled minibatches are read from disk buffer by buffer."""
    sim = sim[:300].copy()
    sim.obs["labels"] = sim.obs["cell_type"].astype(str)
    sim.obs.loc[sim.obs_names[::3], "labels"] = "Unknown"
    path = tmp_path / "sim.h5ad"
    sim.write_h5ad(path)
    kwargs = {"max_epochs": 4, "plan_kwargs": {"n_epochs_kl_warmup": 3}}
    labels = {"labels_key": "labels", "unlabeled_category": "Unknown"} if cls is SCANVI else {}

    def model():
        adata = cellvi.data.read_backed(path)
        cls.setup_anndata(adata, batch_key="batch", **labels)
        return cls(adata, n_hidden=16, n_latent=4)

    with cellvi.settings.override(dl_chunk_size=16, dl_buffer_size=64):
        reference = model()
        reference.train(**kwargs)
        resumed = model()
        with pytest.raises(TrainingError) as info:
            resumed.train(**kwargs, callbacks=[SignalAtEpoch(2)])
        resumed.train(**kwargs, ckpt_path=resume_checkpoint(info.value))
    for name, value in reference.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[name], value, rtol=0, atol=0)


def test_loader_workers_reopen_the_file(sim, tmp_path):
    backed = _write(sim[:200].copy(), tmp_path / "w.h5ad")
    SCVI.setup_anndata(backed)
    model = SCVI(backed, n_hidden=16, n_latent=4)
    model.train(max_epochs=2, datasplitter_kwargs={"num_workers": 1})
    assert np.isfinite(model.history["elbo_train"]["elbo_train"]).all()


def test_save_and_load_with_data_on_disk(sim, tmp_path):
    backed = _write(sim[:200].copy(), tmp_path / "s.h5ad")
    SCVI.setup_anndata(backed, batch_key="batch")
    model = SCVI(backed, n_hidden=16, n_latent=4)
    model.train(max_epochs=2)
    model.save(tmp_path / "model")
    again = cellvi.data.read_backed(tmp_path / "s.h5ad")
    loaded = SCVI.load(tmp_path / "model", adata=again)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )


def test_one_model_over_a_collection_of_files(sim, tmp_path):
    parts = [sim[:250].copy(), sim[250:].copy()]
    paths = [tmp_path / "a.h5ad", tmp_path / "b.h5ad"]
    for part, path in zip(parts, paths):
        part.write_h5ad(path)
    coll = cellvi.data.read_collection(paths, label="file")
    SCVI.setup_anndata(coll, batch_key="file")
    model = SCVI(coll, n_latent=10)
    model.train(max_epochs=30, plan_kwargs={"n_epochs_kl_warmup": 10})
    z = model.get_latent_representation()
    assert knn_label_accuracy(z, sim.obs["cell_type"].to_numpy()) >= 0.9
    merged = sim.copy()
    merged.obs["file"] = coll.obs["file"].to_numpy()
    SCVI.setup_anndata(merged, batch_key="file")
    np.testing.assert_array_equal(z, model.get_latent_representation(merged))


def test_scanvi_on_disk_transfers_labels(sim, tmp_path):
    sim.obs["labels"] = sim.obs["cell_type"].astype(str)
    unlabeled = np.random.default_rng(0).random(sim.n_obs) < 0.5
    sim.obs.loc[unlabeled, "labels"] = "Unknown"
    backed = _write(sim, tmp_path / "l.h5ad")
    SCANVI.setup_anndata(
        backed, labels_key="labels", unlabeled_category="Unknown", batch_key="batch"
    )
    model = SCANVI(backed, n_latent=10)
    model.train(max_epochs=20, n_samples_per_label=50)
    predicted = model.predict()
    truth = sim.obs["cell_type"].astype(str).to_numpy()
    assert (predicted[unlabeled] == truth[unlabeled]).mean() >= 0.9


def test_scanvi_on_disk_reads_its_labeled_cells_a_buffer_at_a_time(sim, tmp_path, monkeypatch):
    """The labeled stream reads like the training stream: one read per pass over the labeled
    cells, not one random-row read per minibatch (which made SCANVI 3x slower on disk)."""
    sim.obs["labels"] = sim.obs["cell_type"].astype(str)
    sim.obs.loc[np.random.default_rng(0).random(sim.n_obs) < 0.5, "labels"] = "Unknown"
    backed = _write(sim, tmp_path / "l.h5ad")
    SCANVI.setup_anndata(
        backed, labels_key="labels", unlabeled_category="Unknown", batch_key="batch"
    )
    model = SCANVI(backed, n_latent=4)
    splitter = SemiSupervisedDataSplitter(model.adata_manager, batch_size=32)
    splitter.setup()
    loader = splitter.train_dataloader()
    reads = []
    source = type(splitter.store.tensors["X"].source)
    read_sorted = source._read_sorted

    def counted(self, rows):
        reads.append(len(rows))
        return read_sorted(self, rows)

    monkeypatch.setattr(source, "_read_sorted", counted)
    steps = list(loader)
    train = splitter.train_idx
    n_labeled = int((sim.obs["labels"].to_numpy()[train] != "Unknown").sum())
    passes = math.ceil(len(steps) / math.ceil(n_labeled / 32))
    assert passes >= 2 and len(steps) >= 15
    # the training stream's one buffer, then one read of all labeled cells per pass
    assert reads == [len(train)] + [n_labeled] * passes
    x = sim.X.toarray()
    for step in steps:
        batch = step["labeled"]
        cells = batch["ind_x"].ravel().numpy()
        assert (sim.obs["labels"].to_numpy()[cells] != "Unknown").all()
        np.testing.assert_array_equal(batch["X"].numpy(), x[cells])
