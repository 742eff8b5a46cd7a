"""Reference-mapping defects found by probing: freezing switches, weight decay on masked
blocks, argument checks, and what prepare_query_anndata keeps of the query."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellvi
from cellvi.model import SCANVI, SCVI


@pytest.fixture
def ref_and_query():
    adata = cellvi.data.simulate(n_cells=300, n_genes=60, n_batches=3, n_cell_types=3, seed=0)
    adata.obs["labels"] = adata.obs["cell_type"].astype(str)
    ref = adata[adata.obs["batch"] != "batch_2"].copy()
    query = adata[adata.obs["batch"] == "batch_2"].copy()
    query.obs["labels"] = "Unknown"
    return ref, query


def _scvi(ref, **kwargs):
    SCVI.setup_anndata(ref, batch_key="batch")
    model = SCVI(ref, n_hidden=16, n_latent=4, **kwargs)
    model.train(max_epochs=1)
    return model


def _scanvi(ref):
    SCANVI.setup_anndata(ref, labels_key="labels", unlabeled_category="Unknown", batch_key="batch")
    model = SCANVI(ref, n_hidden=16, n_latent=4)
    model.train(max_epochs=1)
    return model


def test_freeze_classifier_false_lets_the_classifier_train(ref_and_query):
    ref, query = ref_and_query
    reference = _scanvi(ref)
    q = SCANVI.load_query_data(query.copy(), reference, freeze_classifier=False)
    trainable = [n for n, p in q.module.named_parameters() if p.requires_grad]
    assert any(n.startswith("classifier") for n in trainable)
    frozen = SCANVI.load_query_data(query.copy(), reference)
    assert not any(p.requires_grad for p in frozen.module.classifier.parameters())


def test_scanvi_query_keeps_the_z1_z2_hierarchy_frozen(ref_and_query):
    ref, query = ref_and_query
    q = SCANVI.load_query_data(query, _scanvi(ref))
    for prefix in ("encoder_z2_z1", "decoder_z1_z2"):
        module = getattr(q.module, prefix)
        assert not any(p.requires_grad for p in module.parameters()), prefix
    before = {k: v.clone() for k, v in q.module.state_dict().items()}
    q.train(max_epochs=2, plan_kwargs={"weight_decay": 0.0})
    for name, value in q.module.state_dict().items():
        if name.startswith(("encoder_z2_z1", "decoder_z1_z2")) and value.is_floating_point():
            assert torch.equal(value, before[name]), name


@pytest.mark.parametrize(
    "plan_kwargs", [{}, {"weight_decay": 0.01}, {"optimizer": "AdamW", "weight_decay": 0.01}]
)
def test_masked_reference_block_stays_unchanged_under_weight_decay(ref_and_query, plan_kwargs):
    ref, query = ref_and_query
    reference = _scvi(ref, dispersion="gene-batch")
    q = SCVI.load_query_data(query, reference)
    px_r = q.module.px_r.detach().clone()
    q.train(max_epochs=2, plan_kwargs=plan_kwargs)
    after = q.module.px_r.detach()
    assert torch.equal(after[:, :2], px_r[:, :2])  # reference columns: bit-identical
    assert not torch.equal(after[:, 2], px_r[:, 2])  # the new batch's column trains
    torch.testing.assert_close(after[:, :2], reference.module.px_r.detach(), rtol=0, atol=0)


def test_missing_reference_or_adata_is_a_clear_error(ref_and_query):
    ref, query = ref_and_query
    reference = _scvi(ref)
    with pytest.raises(ValueError, match="reference"):
        SCVI.load_query_data(query, None)
    with pytest.raises(ValueError, match="AnnData"):
        SCVI.load_query_data(None, reference)
    with pytest.raises(ValueError, match="AnnData"):
        SCVI.load_query_data(reference_model=reference)


def test_transfer_batch_false_refuses_new_batches(ref_and_query):
    ref, query = ref_and_query
    reference = _scvi(ref)
    with pytest.raises(ValueError, match="batch_2"):
        SCVI.load_query_data(query.copy(), reference, transfer_batch=False)
    known = ref[ref.obs["batch"] == "batch_0"].copy()
    q = SCVI.load_query_data(known, reference, transfer_batch=False)
    assert q.summary_stats["n_batch"] == 2


def test_inplace_subset_query_vars_reorders_and_drops_genes(ref_and_query):
    ref, query = ref_and_query
    reference = _scvi(ref)
    shuffled = query[:, np.r_[30:60, 0:30]].copy()
    extra = sp.csr_matrix(np.ones((shuffled.n_obs, 1), dtype=shuffled.X.dtype))
    shuffled = cellvi_concat_extra_gene(shuffled, extra)
    q = SCVI.load_query_data(shuffled, reference, inplace_subset_query_vars=True)
    assert list(shuffled.var_names) == list(ref.var_names)
    assert q.adata is shuffled
    np.testing.assert_array_equal(shuffled.X.toarray(), query.X.toarray())
    short = query[:, 5:].copy()
    with pytest.raises(ValueError, match="prepare_query_anndata"):
        SCVI.load_query_data(short, reference, inplace_subset_query_vars=True)


def cellvi_concat_extra_gene(adata, column):
    import anndata

    out = anndata.AnnData(
        X=sp.hstack([adata.X, column]).tocsr(),
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=[*adata.var_names, "extra_gene"]),
    )
    return out


def test_prepare_query_keeps_gene_annotations_and_cell_graphs(ref_and_query):
    ref, query = ref_and_query
    reference = _scvi(ref)
    query.var["symbol"] = [f"S{i}" for i in range(query.n_vars)]
    query.varm["loadings"] = np.arange(query.n_vars * 2, dtype=float).reshape(-1, 2)
    query.obsp["connectivities"] = sp.identity(query.n_obs, format="csr")
    query.raw = query.copy()
    sub = query[:, np.r_[50:60, 5:45]].copy()  # genes 0-4 and 45-49 missing, order changed
    out = SCVI.prepare_query_anndata(sub, reference, inplace=False)
    assert list(out.var_names) == list(ref.var_names)
    assert out.var.loc["gene_7", "symbol"] == "S7"
    assert out.var.loc["gene_55", "symbol"] == "S55"
    assert out.var["symbol"].isna().sum() == 10
    np.testing.assert_array_equal(out.varm["loadings"][7], [14.0, 15.0])
    assert np.isnan(out.varm["loadings"][0]).all()
    assert "connectivities" in out.obsp and out.raw is not None
    SCVI.prepare_query_anndata(sub, reference)
    assert sub.var.loc["gene_20", "symbol"] == "S20" and "connectivities" in sub.obsp


def test_prepare_query_with_triplicated_identifiers(ref_and_query):
    ref, query = ref_and_query
    reference = _scvi(ref)
    query.var["symbol"] = list(query.var_names)
    query.var.iloc[[1, 2], query.var.columns.get_loc("symbol")] = "gene_0"  # 3 x "gene_0"
    query.var_names = [f"ENSG{i:05d}" for i in range(query.n_vars)]
    out = SCVI.prepare_query_anndata(query, reference, inplace=False)
    assert list(out.var_names) == list(ref.var_names)
    np.testing.assert_array_equal(out.X[:, 0].toarray(), query.X[:, 0].toarray())


def test_surgery_keeps_each_covariates_columns_with_its_categories(ref_and_query):
    ref, query = ref_and_query
    for adata in (ref, query):
        adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 2, "d1", "d2")
    SCVI.setup_anndata(ref, batch_key="batch", categorical_covariate_keys=["donor"])
    reference = SCVI(ref, n_hidden=16, n_latent=4, encode_covariates=True)
    reference.train(max_epochs=1)
    q = SCVI.load_query_data(query, reference)  # batch grows 2 -> 3, donor stays at 2
    for name in ("z_encoder.encoder.blocks.0.linear", "decoder.px_decoder.blocks.0.linear"):
        old = reference.module.get_submodule(name).cov_weight.detach()
        new = q.module.get_submodule(name).cov_weight.detach()
        assert new.shape[0] == 5
        torch.testing.assert_close(new[:2], old[:2], rtol=0, atol=0)  # batch_0, batch_1
        torch.testing.assert_close(new[3:], old[2:], rtol=0, atol=0)  # d1, d2
    # before query training, reference cells get the reference model's outputs
    cells = ref[:20].copy()
    with pytest.warns(UserWarning, match="not been trained"):
        z = q.get_latent_representation(cells)
        expr = q.get_normalized_expression(cells)
    np.testing.assert_allclose(z, reference.get_latent_representation(cells), rtol=1e-5)
    np.testing.assert_allclose(
        expr.to_numpy(), reference.get_normalized_expression(cells).to_numpy(), rtol=1e-4
    )
