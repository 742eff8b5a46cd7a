"""SCANVI defects found by a probe: scvi-tools' classifier_parameters / y_prior module options,
the library KL under the KL warm-up (models.md §2), and from_scvi_model on data whose genes or
batches do not fit the SCVI weights; plus the logged classification metrics checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss
from torch.distributions import Categorical, Normal
from torch.distributions import kl_divergence as kl

import cellvi
from cellvi._constants import REGISTRY_KEYS as K
from cellvi.errors import CellviWarning, SetupError
from cellvi.model import SCANVI, SCVI


def _sim(seed: int = 0):
    adata = cellvi.data.simulate(
        n_cells=300, n_genes=60, n_batches=2, n_cell_types=3, n_de_genes_per_type=5, seed=seed
    )
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[np.random.default_rng(0).random(adata.n_obs) > 0.3] = "Unknown"
    adata.obs["labels"] = labels
    return adata


@pytest.fixture
def quiet(tmp_path):
    with cellvi.settings.override(progress_bar_style="none", logging_dir=str(tmp_path)):
        yield tmp_path


def _tensors(adata, n: int = 12) -> dict[str, torch.Tensor]:
    x = adata.X[:n]
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    col = lambda key: torch.as_tensor(adata.obs[key].to_numpy()[:n]).reshape(-1, 1)  # noqa: E731
    return {
        K.X_KEY: torch.as_tensor(x, dtype=torch.float32),
        K.BATCH_KEY: col("_cellvi_batch"),
        K.LABELS_KEY: col("_cellvi_labels"),
    }


def _hand_loss(mod, t, inf, gen, kl_weight, seed):
    """models.md §2 written with torch.distributions; ``seed`` fixes the z2 draw."""
    z1 = inf["z"]
    n, k = z1.shape[0], mod.n_classes
    probs = torch.softmax(mod.classifier(z1), -1)
    ys = torch.arange(k).repeat_interleave(n).reshape(-1, 1)
    z1s = z1.repeat(k, 1)
    torch.manual_seed(seed)
    q2_m, q2_v, z2 = mod.encoder_z2_z1(z1s, ys)
    h = mod.decoder_z1_z2(z2, ys)
    p1 = Normal(mod.pz1_mean(h), mod.pz1_var(h).exp().sqrt())
    log_pz1 = p1.log_prob(z1s).sum(-1).view(k, n).t()
    rec = (
        -mod.log_likelihood(t[K.X_KEY], gen)
        + Normal(inf["qz_m"], inf["qz_v"].sqrt()).log_prob(z1).sum(-1)
        - (log_pz1 * probs).sum(1)
    )
    kl_z2 = kl(Normal(q2_m, q2_v.sqrt()), Normal(0.0, 1.0)).sum(-1).view(k, n).t()
    uniform = torch.full((1, k), 1 / k)
    prior = Categorical(probs=getattr(mod, "y_prior", uniform).expand(n, k))
    kl_local = (kl_z2 * probs).sum(1) + kl(Categorical(probs=probs), prior)
    b = t[K.BATCH_KEY].ravel()
    prior_l = Normal(
        mod.library_log_means[0, b].unsqueeze(-1), mod.library_log_vars[0, b].unsqueeze(-1).sqrt()
    )
    kl_l = kl(Normal(inf["ql_m"], inf["ql_v"].sqrt()), prior_l).sum(-1)
    return rec, kl_local + kl_l, torch.mean(rec + kl_weight * (kl_local + kl_l))


@pytest.mark.parametrize("y_prior", [None, [0.2, 0.3, 0.5]])
def test_scanvi_loss_matches_the_spec_with_the_library_kl_warmed_up(y_prior):
    adata = _sim()
    SCANVI.setup_anndata(adata, "labels", "Unknown", batch_key="batch")
    extra = {} if y_prior is None else {"y_prior": y_prior}
    model = SCANVI(adata, n_hidden=16, n_latent=4, use_observed_lib_size=False, **extra)
    mod = model.module.eval()
    t = _tensors(adata)
    with torch.no_grad():
        inf = mod.inference(t)
        gen = mod.generative(inf["z"], inf["library"], t)
        torch.manual_seed(3)
        out = mod.loss(t, inf, gen, kl_weight=0.3)
        rec, kl_all, loss = _hand_loss(mod, t, inf, gen, 0.3, seed=3)
    torch.testing.assert_close(out.reconstruction_loss, rec, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out.kl_local, kl_all, rtol=1e-4, atol=1e-3)
    # kl = Σ_y q KL_z2 + KL(q(y) ‖ y_prior) + KL_l, all of it times β_t (as scvi-tools)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-3)


def test_scanvi_takes_classifier_parameters_and_y_prior(quiet):
    adata = _sim()
    SCANVI.setup_anndata(adata, "labels", "Unknown")
    model = SCANVI(
        adata,
        n_hidden=16,
        n_latent=4,
        classifier_parameters={"n_hidden": 8, "n_layers": 2, "dropout_rate": 0.0},
        y_prior=torch.tensor([[0.2, 0.3, 0.5]]),
    )
    fc, head = model.module.classifier
    assert len(fc.blocks) == 2 and head.in_features == 8 and head.out_features == 3
    torch.testing.assert_close(model.module.y_prior, torch.tensor([[0.2, 0.3, 0.5]]))
    # scvi-tools: n_layers=0 (or linear_classifier=True) gives one linear layer
    linear = SCANVI(adata, n_hidden=16, n_latent=4, classifier_parameters={"n_layers": 0})
    assert isinstance(linear.module.classifier, torch.nn.Linear)
    assert isinstance(
        SCANVI(adata, n_hidden=16, n_latent=4, linear_classifier=True).module.classifier,
        torch.nn.Linear,
    )
    model.train(max_epochs=1)
    model.save(quiet / "m")
    loaded = SCANVI.load(quiet / "m", adata=adata)
    assert loaded.classifier_parameters == {"n_hidden": 8, "n_layers": 2, "dropout_rate": 0.0}
    torch.testing.assert_close(loaded.module.y_prior, model.module.y_prior)
    np.testing.assert_allclose(
        loaded.predict(soft=True).to_numpy(), model.predict(soft=True).to_numpy(), atol=1e-6
    )
    with pytest.raises(TypeError, match=r"unknown key\(s\) \['width'\]"):
        SCANVI(adata, classifier_parameters={"width": 3})
    with pytest.raises(ValueError, match="logits"):
        SCANVI(adata, classifier_parameters={"logits": False})
    with pytest.raises(ValueError, match="2 values but there are 3"):
        SCANVI(adata, y_prior=[0.5, 0.5])
    with pytest.raises(ValueError, match="sum to 1"):
        SCANVI(adata, y_prior=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="> 0"):
        SCANVI(adata, y_prior=[0.0, 0.5, 0.5])


@pytest.fixture
def scvi_model(quiet):
    adata = _sim()
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=4)
    model.train(max_epochs=1)
    return model


def test_from_scvi_model_refuses_data_that_does_not_fit_the_scvi_weights(scvi_model):
    fewer = _sim()[:, :50].copy()
    with pytest.raises(SetupError, match="adata has 50 genes, the SCVI model 60"):
        SCANVI.from_scvi_model(scvi_model, "Unknown", labels_key="labels", adata=fewer)
    renamed = _sim()
    renamed.var_names = [f"g{i}" for i in range(renamed.n_vars)]
    with pytest.raises(SetupError, match="differ from position 0 on"):
        SCANVI.from_scvi_model(scvi_model, "Unknown", labels_key="labels", adata=renamed)
    one_batch = _sim()
    one_batch = one_batch[one_batch.obs["batch"] == "batch_1"].copy()
    with pytest.raises(SetupError, match="'batch' categories"):
        SCANVI.from_scvi_model(scvi_model, "Unknown", labels_key="labels", adata=one_batch)
    # the same genes and batches in another object: weights copied, outputs equal
    same = _sim()
    model = SCANVI.from_scvi_model(scvi_model, "Unknown", labels_key="labels", adata=same)
    with pytest.warns(CellviWarning, match="not been trained"):  # as scvi-tools warns
        latent = model.get_latent_representation()
    np.testing.assert_allclose(latent, scvi_model.get_latent_representation(same))


def test_logged_validation_metrics_match_a_hand_computation(quiet):
    adata = _sim()
    SCANVI.setup_anndata(adata, "labels", "Unknown", batch_key="batch")
    model = SCANVI(adata, n_hidden=16, n_latent=4)
    model.train(max_epochs=1, check_val_every_n_epoch=1, train_size=0.7)
    codes = adata.obs["_cellvi_labels"].to_numpy()
    val = model.validation_indices[codes[model.validation_indices] < model.n_classes]
    y = codes[val]
    probs = model.predict(indices=val, soft=True).to_numpy()
    pred = probs.argmax(1)
    conf = probs.max(1)
    bins = np.minimum((conf * 10).astype(int), 9)
    ece = sum(abs(conf[bins == b].sum() - (pred == y)[bins == b].sum()) for b in range(10))
    h = {k: float(v.iloc[-1, 0]) for k, v in model.history.items()}
    assert h["validation_accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert h["validation_f1_score"] == pytest.approx(f1_score(y, pred, average="micro"))
    assert h["validation_classification_loss"] == pytest.approx(
        log_loss(y, probs, labels=range(model.n_classes)), rel=1e-4
    )
    assert h["validation_calibration_error"] == pytest.approx(ece / len(y), abs=1e-5)
