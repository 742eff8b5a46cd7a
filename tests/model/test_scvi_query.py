"""Reference mapping: gene alignment, category growth, freezing, mapping quality."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import cellvi
from cellvi.analysis import batch_mixing, knn_indices
from cellvi.errors import CellviWarning
from cellvi.model import SCVI


@pytest.fixture
def ref_and_query():
    adata = cellvi.data.simulate(n_cells=900, n_genes=120, n_batches=3, n_cell_types=3, seed=3)
    ref = adata[adata.obs["batch"] != "batch_2"].copy()
    query = adata[adata.obs["batch"] == "batch_2"].copy()
    return ref, query


def _reference(ref, epochs=60):
    SCVI.setup_anndata(ref, batch_key="batch")
    model = SCVI(ref, n_latent=8, dispersion="gene-batch")
    model.train(max_epochs=epochs, plan_kwargs={"n_epochs_kl_warmup": min(10, epochs)})
    return model


def test_prepare_query_reorders_pads_and_drops_genes(tmp_path, ref_and_query):
    ref, query = ref_and_query
    model = _reference(ref, epochs=1)
    model.save(tmp_path / "ref")
    shuffled = query[:, np.r_[10:120, 0:5]].copy()  # 5 genes missing, order changed
    shuffled.var_names = list(shuffled.var_names[:-1]) + ["not_a_gene"]
    SCVI.prepare_query_anndata(shuffled, tmp_path / "ref")
    assert list(shuffled.var_names) == list(ref.var_names)
    missing = ["gene_4"] + [f"gene_{i}" for i in range(5, 10)]
    assert shuffled[:, missing].X.sum() == 0
    np.testing.assert_array_equal(
        shuffled[:, "gene_50"].X.toarray(), query[:, "gene_50"].X.toarray()
    )


@pytest.mark.parametrize("dtype", [object, "string", "category"])
def test_prepare_query_matches_by_an_identifier_column(ref_and_query, dtype):
    ref, query = ref_and_query
    model = _reference(ref, epochs=1)
    # text columns are "string" by default in pandas >= 3
    query.var["symbol"] = pd.Series(list(query.var_names), index=query.var_names, dtype=dtype)
    query.var_names = [f"ENSG{i:05d}" for i in range(query.n_vars)]
    out = SCVI.prepare_query_anndata(query, model, inplace=False)
    assert list(out.var_names) == list(ref.var_names) and out.X.sum() == query.X.sum()


def test_prepare_query_warns_on_low_overlap_and_fails_without_overlap(ref_and_query):
    ref, query = ref_and_query
    model = _reference(ref, epochs=1)
    with pytest.warns(CellviWarning, match=r"Only 20 of 120 reference genes"):
        SCVI.prepare_query_anndata(query[:, :20].copy(), model, inplace=False)
    other = query.copy()
    other.var_names = [f"x{i}" for i in range(other.n_vars)]
    with pytest.raises(ValueError, match="None of the reference genes"):
        SCVI.prepare_query_anndata(other, model)


def test_query_training_changes_only_permitted_weights(ref_and_query):
    ref, query = ref_and_query
    reference = _reference(ref, epochs=2)
    q = SCVI.load_query_data(query, reference)
    assert q.summary_stats["n_batch"] == 3
    before = {k: v.clone() for k, v in q.module.state_dict().items()}
    q.train(max_epochs=3, plan_kwargs={"weight_decay": 0.0})
    after = q.module.state_dict()
    frozen = [k for k, p in q.module.named_parameters() if not p.requires_grad]
    assert "decoder.px_scale_decoder.weight" in frozen
    assert "z_encoder.encoder.blocks.0.linear.linear.weight" in frozen
    for name in frozen:
        assert torch.equal(before[name], after[name]), name
    for name in ("z_encoder.encoder.blocks.0.batch_norm.running_mean",):
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(
        before["decoder.px_decoder.blocks.0.linear.cov_weight"],
        after["decoder.px_decoder.blocks.0.linear.cov_weight"],
    )
    # gene-batch dispersion grew by one column: the reference columns stay, the new one trains
    px_r_before, px_r_after = before["px_r"], after["px_r"]
    assert px_r_after.shape == (120, 3)
    assert torch.equal(px_r_before[:, :2], px_r_after[:, :2])
    assert not torch.equal(px_r_before[:, 2], px_r_after[:, 2])
    torch.testing.assert_close(px_r_after[:, :2], reference.module.px_r.detach())


def test_mapped_query_transfers_labels_and_mixes_with_reference(ref_and_query):
    ref, query = ref_and_query
    reference = _reference(ref, epochs=80)
    q = SCVI.load_query_data(query, reference)
    q.train(max_epochs=60, plan_kwargs={"weight_decay": 0.0})
    z_ref = reference.get_latent_representation()
    z_query = q.get_latent_representation()
    both = np.concatenate([z_ref, z_query])
    neighbours = knn_indices(both, k=15)[len(z_ref) :]
    ref_types = ref.obs["cell_type"].to_numpy()
    votes = []
    for row in neighbours:
        labels = ref_types[row[row < len(z_ref)]]
        votes.append(max(set(labels), key=list(labels).count) if len(labels) else "none")
    accuracy = (np.array(votes) == query.obs["cell_type"].to_numpy()).mean()
    # three well separated types: kNN transfer from reference neighbours is near perfect
    assert accuracy >= 0.9
    is_query = np.r_[np.zeros(len(z_ref)), np.ones(len(z_query))]
    types = np.r_[ref_types, query.obs["cell_type"].to_numpy()]
    # 1/3 query cells: kNN "is query" accuracy of 1.0 would mean no mixing at all
    assert batch_mixing(both, is_query, types) <= 0.9


def test_registry_lookups_find_each_anndata_manager_without_registering(sim_tiny):
    from cellvi.errors import SetupError
    from cellvi.model import SCANVI

    ref = sim_tiny.copy()
    SCVI.setup_anndata(ref, batch_key="batch")
    model = SCVI(ref, n_latent=4)
    assert model.get_anndata_manager() is model.adata_manager
    assert model.get_anndata_manager(ref) is model.adata_manager
    codes = model.get_from_registry(ref, "batch")
    expected = ref.obs["batch"].cat.codes.to_numpy()[:, None]
    np.testing.assert_array_equal(codes, expected)
    assert model.get_from_registry(ref, "X") is ref.X

    other = sim_tiny[:50].copy()
    SCVI.setup_anndata(other, batch_key="batch")
    assert model.get_anndata_manager(other).adata is other
    np.testing.assert_array_equal(model.get_from_registry(other, "batch"), expected[:50])

    fresh = sim_tiny[:20].copy()  # never set up: looked up, not registered
    assert model.get_anndata_manager(fresh) is None
    with pytest.raises(SetupError, match="setup_anndata"):
        model.get_from_registry(fresh, "X")
    assert model.get_anndata_manager(fresh) is None

    labelled = sim_tiny[:30].copy()  # set up for another model class only
    SCANVI.setup_anndata(labelled, labels_key="cell_type", unlabeled_category="Unknown")
    assert model.get_anndata_manager(labelled) is None
    with pytest.raises(SetupError, match="not set up for SCVI"):
        model.get_anndata_manager(labelled, required=True)
