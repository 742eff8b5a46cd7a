"""Save/load and reference mapping across the SCVI/SCANVI module options (persistence.md
§1-3): exact round trips, grown tensors holding the reference's values block by block,
frozen weights bit-identical while the new slices train, freezing kept through save/load."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

import cellvi
from cellvi.errors import CellviWarning
from cellvi.model import SCANVI, SCVI

COVS = {"categorical_covariate_keys": ["cat1", "cat2"], "continuous_covariate_keys": ["cont1"]}

# (model class, setup arguments, model arguments): each combines several options
OPTION_SETS = {
    "gene-batch_learned-library_covariates_encoded_deep": (
        SCVI,
        COVS,
        {"dispersion": "gene-batch", "use_observed_lib_size": False, "encode_covariates": True},
    ),
    "gene-label_nb_ln_two-layers_shallow": (
        SCVI,
        {"labels_key": "cell_type", **COVS},
        {
            "dispersion": "gene-label",
            "gene_likelihood": "nb",
            "latent_distribution": "ln",
            "n_layers": 2,
            "deeply_inject_covariates": False,
            "use_batch_norm": "encoder",
            "use_layer_norm": "both",
        },
    ),
    "embedding_gene-cell_poisson_size-factor": (
        SCVI,
        {"size_factor_key": "sf", "categorical_covariate_keys": ["cat1"]},
        {
            "batch_representation": "embedding",
            "encode_covariates": True,
            "dispersion": "gene-cell",
            "gene_likelihood": "poisson",
        },
    ),
    "scanvi_gene-batch_learned-library_embedding_covariates": (
        SCANVI,
        COVS,
        {
            "dispersion": "gene-batch",
            "use_observed_lib_size": False,
            "batch_representation": "embedding",
            "encode_covariates": True,
        },
    ),
}


def _data():
    adata = cellvi.data.simulate(
        n_cells=300, n_genes=50, n_batches=4, n_cell_types=3, n_de_genes_per_type=5, seed=0
    )
    rng = np.random.default_rng(0)
    adata.obs["cat1"] = rng.choice(["a", "b"], adata.n_obs)
    adata.obs["cat2"] = rng.choice(["x", "y", "z"], adata.n_obs)
    adata.obs["cont1"] = rng.normal(size=adata.n_obs)
    adata.obs["sf"] = np.asarray(adata.X.sum(1)).ravel() / 500.0
    adata.obs["ct"] = adata.obs["cell_type"].astype(str)
    ref = adata[adata.obs["batch"] != "batch_3"].copy()
    ref.obs.iloc[:30, ref.obs.columns.get_loc("ct")] = "Unknown"
    query = adata[adata.obs["batch"] == "batch_3"].copy()
    # a new category of the first covariate: its rows go inside the covariate table
    query.obs["cat1"] = query.obs["cat1"].astype(str)
    query.obs.iloc[:20, query.obs.columns.get_loc("cat1")] = "c_new"
    return ref, query


@pytest.fixture(autouse=True)
def _quiet(tmp_path):
    with cellvi.settings.override(progress_bar_style="none", logging_dir=str(tmp_path / "logs")):
        yield


def _reference(cls, ref, setup, kwargs):
    if cls is SCANVI:
        SCANVI.setup_anndata(
            ref, batch_key="batch", labels_key="ct", unlabeled_category="Unknown", **setup
        )
    else:
        SCVI.setup_anndata(ref, batch_key="batch", **setup)
    model = cls(ref, n_hidden=16, n_latent=4, **kwargs)
    torch.manual_seed(0)
    model.train(max_epochs=2, batch_size=64)
    return model


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _clean(adata):
    """A copy without cellvi's registration columns (to mix cells of two AnnDatas)."""
    out = adata.copy()
    out.obs = out.obs[[c for c in out.obs.columns if not c.startswith("_cellvi")]]
    out.uns = {k: v for k, v in out.uns.items() if not k.startswith("_cellvi")}
    return out


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_save_load_and_query_mapping_across_options(name, tmp_path):
    cls, setup, kwargs = OPTION_SETS[name]
    ref, query = _data()
    model = _reference(cls, ref, setup, kwargs)
    model.save(tmp_path / "ref", save_anndata=True, save_optimizer_state=True)
    latent, expr = model.get_latent_representation(), model.get_normalized_expression()
    for adata in (None, ref.copy(), False):
        loaded = cls.load(tmp_path / "ref", adata=adata)
        state = _state(loaded)
        assert all(torch.equal(v, state[k]) for k, v in _state(model).items())
        on = ref if adata is False else None
        np.testing.assert_array_equal(loaded.get_latent_representation(on), latent)
        np.testing.assert_array_equal(loaded.get_normalized_expression(on), expr)
    # resumed after loading = resumed in memory
    loaded = cls.load(tmp_path / "ref", adata=ref.copy())
    for m in (model, loaded):
        torch.manual_seed(5)
        m.train(max_epochs=1, resume=True, batch_size=64)
    state = _state(loaded)
    assert all(torch.equal(v, state[k]) for k, v in _state(model).items())

    # query: new batch + new covariate category, mixed with reference cells (known codes,
    # categories listed in another order with an unused one)
    both = anndata.concat([_clean(ref[:40]), _clean(query)], merge="same")
    for key in ("batch", "cat1", "cat2"):
        values = both.obs[key].astype(str)
        both.obs[key] = pd.Categorical(values, categories=[*sorted(set(values))[::-1], "zz"])
    both.obs["ct"] = both.obs["ct"].astype(str)
    both.obs.iloc[40:, both.obs.columns.get_loc("ct")] = "Unknown"
    reference = cls.load(tmp_path / "ref", adata=ref.copy())  # as saved, before resuming
    ref_state = _state(reference)
    q = cls.load_query_data(both, tmp_path / "ref")
    assert q.summary_stats["n_batch"] == 4
    grown = set()
    for key, value in _state(q).items():
        old = ref_state[key]
        if value.shape == old.shape:
            assert torch.equal(value, old), key
            continue
        grown.add(key)
        if not key.endswith("cov_weight"):  # a covariate table grows block by block
            assert torch.equal(value[tuple(slice(0, n) for n in old.shape)], old), key
    assert grown == set(q.query_freezing_["grown"])
    # reference cells through the query model before training = through the reference (the
    # covariate tables' reference rows sit where the reference's codes read them)
    with pytest.warns(CellviWarning, match="on its query yet.*reference.s"):
        q_latent = q.get_latent_representation(both)[:40]
    with pytest.warns(CellviWarning, match="not been trained"):
        q_expr = q.get_normalized_expression(both, library_size=10.0).to_numpy()[:40]
    np.testing.assert_array_equal(q_latent, reference.get_latent_representation()[:40])
    expr_ref = reference.get_normalized_expression(library_size=10.0).to_numpy()[:40]
    np.testing.assert_array_equal(q_expr, expr_ref)
    before = _state(q)
    frozen = [k for k, p in q.module.named_parameters() if not p.requires_grad]
    blocks = dict(q.module._cellvi_reference_blocks)
    assert frozen and ("px_r" in blocks) == (kwargs.get("dispersion") == "gene-batch")
    torch.manual_seed(0)
    q.train(max_epochs=2, plan_kwargs={"weight_decay": 0.0}, batch_size=64)
    after = _state(q)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    for key, (kept, _) in blocks.items():
        assert torch.equal(after[key][kept], before[key][kept])
        assert not torch.equal(after[key][~kept], before[key][~kept])
    assert np.isfinite(q.get_latent_representation()).all()
    assert np.isfinite(q.get_latent_representation(ref)).all()
    if cls is SCANVI:
        assert q.predict().shape == (both.n_obs,)
    q.save(tmp_path / "query", save_anndata=True)
    reloaded = cls.load(tmp_path / "query")
    grads = {k: p.requires_grad for k, p in q.module.named_parameters()}
    assert grads == {k: p.requires_grad for k, p in reloaded.module.named_parameters()}
    assert set(reloaded.module._cellvi_reference_blocks) == set(blocks)


@pytest.mark.filterwarnings("ignore:This SCVI is already trained")
def test_query_trains_at_64_and_bf16_true_precision(tmp_path):
    """The reference blocks of grown frozen tensors (here the gene-batch dispersion) were
    written back in float32 into weights Lightning had cast: training crashed with "Index
    put requires the source and destination dtypes match"."""
    ref, query = _data()
    SCVI.setup_anndata(ref, batch_key="batch")
    model = SCVI(ref, n_hidden=16, n_latent=4, dispersion="gene-batch")
    model.train(max_epochs=1, batch_size=64)
    q = SCVI.load_query_data(query, model)
    kept = q.module._cellvi_reference_blocks["px_r"][0]
    px_r = q.module.px_r.detach().clone()
    q.train(max_epochs=1, batch_size=64, precision="64-true", plan_kwargs={"weight_decay": 0.1})
    assert q.module.px_r.dtype == torch.float64
    assert torch.equal(q.module.px_r.detach()[kept].float(), px_r[kept])
    assert not torch.equal(q.module.px_r.detach()[~kept].float(), px_r[~kept])
    q.train(max_epochs=1, batch_size=64, precision="bf16-true")
    # back at float32, the reference block holds the reference's values again, exactly
    q.train(max_epochs=1, batch_size=64)
    assert q.module.px_r.dtype == torch.float32
    assert torch.equal(q.module.px_r.detach()[kept], px_r[kept])


@pytest.mark.parametrize("covariate", ["batch", "cat1"])
def test_query_onto_a_covariate_the_reference_had_one_category_of(covariate, tmp_path):
    """A reference with a single batch (or one category of a covariate) has no covariate
    table for it; the query's table was random for the reference's category too, so the
    reference's own cells moved (latent off by ~0.05) when mapped through the query model.
    Its row is now zero, as the reference's missing column was."""
    ref, query = _data()
    ref = ref[ref.obs["batch"] == "batch_0"].copy()
    ref.obs["cat1"] = "a"
    if covariate == "batch":  # a new batch
        query.obs["cat1"] = "a"
    else:  # a new category of cat1
        query.obs["batch"], query.obs["cat1"] = "batch_0", "b"
    SCVI.setup_anndata(ref, batch_key="batch", categorical_covariate_keys=["cat1"])
    model = SCVI(ref, n_hidden=16, n_latent=4, encode_covariates=True, use_observed_lib_size=False)
    model.train(max_epochs=1, batch_size=64)
    both = anndata.concat([_clean(ref[:40]), _clean(query)], merge="same")
    q = SCVI.load_query_data(both, model)
    table = q.module.decoder.px_decoder.blocks[0].linear.cov_weight.detach().clone()
    assert table.shape[0] == 2  # the grown covariate's two categories (the other: skipped)
    assert torch.equal(table[0], torch.zeros_like(table[0]))
    with pytest.warns(CellviWarning, match="not been trained"):
        latent = q.get_latent_representation(both)[:40]
    np.testing.assert_array_equal(latent, model.get_latent_representation()[:40])
    q.train(max_epochs=2, batch_size=64, plan_kwargs={"weight_decay": 0.0})
    assert not torch.equal(table[1], q.module.decoder.px_decoder.blocks[0].linear.cov_weight[1])
    q.save(tmp_path / "query", save_anndata=True)
    reloaded = SCVI.load(tmp_path / "query")
    grads = {k: p.requires_grad for k, p in q.module.named_parameters()}
    assert grads == {k: p.requires_grad for k, p in reloaded.module.named_parameters()}
