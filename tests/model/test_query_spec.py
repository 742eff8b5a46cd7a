"""Reference mapping against persistence.md §3: labels never extended, a query given as a
data module or registry, freezing kept through save/load, padded genes sparse."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import cellvi
from cellvi.dataloaders import AnnDataModule
from cellvi.errors import InvalidDataError, SetupError
from cellvi.model import SCANVI, SCVI


@pytest.fixture
def ref_and_query(tmp_path):
    adata = cellvi.data.simulate(
        n_cells=300, n_genes=60, n_batches=3, n_cell_types=3, n_de_genes_per_type=5, seed=0
    )
    ref = adata[adata.obs["batch"] != "batch_2"].copy()
    query = adata[adata.obs["batch"] == "batch_2"].copy()
    with cellvi.settings.override(progress_bar_style="none", logging_dir=str(tmp_path / "logs")):
        yield ref, query


def _scvi(ref, **setup):
    SCVI.setup_anndata(ref, batch_key="batch", **setup)
    model = SCVI(ref, n_hidden=16, n_latent=4, dispersion="gene-batch")
    model.train(max_epochs=1)
    return model


def test_scvi_query_never_extends_labels(ref_and_query):
    ref, query = ref_and_query
    reference = _scvi(ref, labels_key="cell_type")
    known = query.copy()
    q = SCVI.load_query_data(known, reference)
    assert q.summary_stats["n_labels"] == 3 and q.summary_stats["n_batch"] == 3
    novel = query.copy()
    novel.obs["cell_type"] = novel.obs["cell_type"].astype(str)
    novel.obs.iloc[:10, novel.obs.columns.get_loc("cell_type")] = "novel"
    with pytest.raises(InvalidDataError, match="never adds labels"):
        SCVI.load_query_data(novel, reference)


def test_load_query_data_signature_follows_the_spec():
    names = list(inspect.signature(SCVI.load_query_data).parameters)
    assert names[:15] == [
        "adata",
        "reference_model",
        "registry",
        "inplace_subset_query_vars",
        "accelerator",
        "device",
        "unfrozen",
        "freeze_dropout",
        "freeze_expression",
        "freeze_decoder_first_layer",
        "freeze_batchnorm_encoder",
        "freeze_batchnorm_decoder",
        "freeze_classifier",
        "transfer_batch",
        "datamodule",
    ]


def test_query_from_a_datamodule_grows_batches_and_trains(ref_and_query, tmp_path):
    ref, query = ref_and_query
    reference = _scvi(ref)
    reference.save(tmp_path / "ref")
    dm = AnnDataModule(query.copy(), batch_key="batch")
    # the module encodes only its own batch: a registry whose codes would be misread
    with pytest.raises(SetupError, match="do not start with the reference's"):
        SCVI.load_query_data(reference_model=reference, registry=dm.registry)
    with pytest.raises(ValueError, match="not both"):
        SCVI.load_query_data(query.copy(), reference, registry=dm.registry)
    q = SCVI.load_query_data(reference_model=tmp_path / "ref", datamodule=dm)
    assert dm.registry["field_registries"]["batch"]["state_registry"]["categorical_mapping"] == [
        "batch_0",
        "batch_1",
        "batch_2",
    ]
    assert q.summary_stats["n_batch"] == 3 and q.adata is None
    with pytest.raises(ValueError, match="transfer_batch=False"):
        SCVI.load_query_data(reference_model=reference, registry=dm.registry, transfer_batch=False)
    px_r = q.module.px_r.detach().clone()
    q.train(max_epochs=2, datamodule=dm, plan_kwargs={"weight_decay": 0.0})
    assert torch.equal(q.module.px_r.detach()[:, :2], px_r[:, :2])
    assert not torch.equal(q.module.px_r.detach()[:, 2], px_r[:, 2])
    z = q.get_latent_representation(dataloader=dm.inference_dataloader())
    assert z.shape == (query.n_obs, 4) and np.isfinite(z).all()
    # the module's registry now follows the reference: usable as registry= too
    again = SCVI.load_query_data(reference_model=reference, registry=dm.registry)
    assert again.summary_stats["n_batch"] == 3


@pytest.mark.parametrize("model_cls", [SCVI, SCANVI])
def test_saved_query_model_keeps_its_freezing(ref_and_query, tmp_path, model_cls):
    ref, query = ref_and_query
    if model_cls is SCANVI:
        ref.obs["labels"] = ref.obs["cell_type"].astype(str)
        query.obs["labels"] = "Unknown"
        SCANVI.setup_anndata(
            ref, labels_key="labels", unlabeled_category="Unknown", batch_key="batch"
        )
        reference = SCANVI(ref, n_hidden=16, n_latent=4, dispersion="gene-batch")
        reference.train(max_epochs=1)
    else:
        reference = _scvi(ref)
    q = model_cls.load_query_data(query, reference, freeze_dropout=True)
    q.train(max_epochs=1, plan_kwargs={"weight_decay": 0.0})
    q.save(tmp_path / "query", save_anndata=True)
    loaded = model_cls.load(tmp_path / "query")
    trainable = {n: p.requires_grad for n, p in q.module.named_parameters()}
    assert {n: p.requires_grad for n, p in loaded.module.named_parameters()} == trainable
    assert all(m.p == 0 for m in loaded.module.modules() if isinstance(m, torch.nn.Dropout))
    before = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    with pytest.warns(UserWarning, match="already trained"):
        loaded.train(max_epochs=1, plan_kwargs={"weight_decay": 0.01})
    after = loaded.module.state_dict()
    for name, is_trainable in trainable.items():
        if not is_trainable:
            assert torch.equal(before[name], after[name]), name
    running = "z_encoder.encoder.blocks.0.batch_norm.running_mean"
    assert torch.equal(before[running], after[running])
    # the reference's dispersion columns stay exact (weight decay included), the new one trains
    assert torch.equal(after["px_r"][:, :2], reference.module.px_r.detach())
    assert not torch.equal(after["px_r"][:, 2], before["px_r"][:, 2])


def test_padded_genes_of_a_dense_query_are_sparse(ref_and_query):
    ref, query = ref_and_query
    reference = _scvi(ref)
    dense = query[:, 5:].copy()
    dense.X = dense.X.toarray()
    dense.layers["counts"] = dense.X.copy()
    out = SCVI.prepare_query_anndata(dense, reference, inplace=False)
    assert sp.issparse(out.X) and sp.issparse(out.layers["counts"])
    np.testing.assert_array_equal(out.X.toarray(), np.c_[np.zeros((100, 5)), dense.X])
    assert out.X.dtype == dense.X.dtype
    # only reordered, nothing padded: a dense matrix stays dense
    shuffled = query[:, ::-1].copy()
    shuffled.X = shuffled.X.toarray()
    SCVI.prepare_query_anndata(shuffled, reference)
    assert isinstance(shuffled.X, np.ndarray)
    np.testing.assert_array_equal(shuffled.X, query.X.toarray())


def test_a_padded_query_keeps_its_gene_annotations_writable(ref_and_query, tmp_path):
    import anndata

    ref, query = ref_and_query
    reference = _scvi(ref)
    part = query[:, 5:].copy()
    part.var["note"] = [f"n{i}" for i in range(part.n_vars)]
    part.var["count"] = np.arange(part.n_vars)
    out = SCVI.prepare_query_anndata(part, reference, inplace=False)
    assert out.var["is_de"].dtype == "boolean" and out.var["count"].dtype == "Int64"
    assert out.var["is_de"].iloc[:5].isna().all() and not out.var["is_de"].iloc[5:].isna().any()
    out.write_h5ad(tmp_path / "q.h5ad")  # the padded rows made bool/text columns object
    back = anndata.read_h5ad(tmp_path / "q.h5ad")
    assert back.var["note"].iloc[5] == "n0" and back.var["count"].iloc[6] == 1


def test_prepare_query_with_counts_only_in_a_layer(ref_and_query):
    ref, query = ref_and_query
    ref.layers["counts"] = ref.X.copy()
    SCVI.setup_anndata(ref, layer="counts", batch_key="batch")
    reference = SCVI(ref, n_hidden=16, n_latent=4)
    reference.train(max_epochs=1)
    sub = query[:, 4:].copy()
    sub.layers["counts"], sub.X = sub.X.copy(), None
    SCVI.prepare_query_anndata(sub, reference)
    assert sub.X is None and list(sub.var_names) == list(ref.var_names)
    np.testing.assert_array_equal(sub.layers["counts"][:, 4:].toarray(), query.X[:, 4:].toarray())
    assert SCVI.load_query_data(sub, reference).summary_stats["n_batch"] == 3
