"""``train(resume=True)`` and ``save(save_optimizer_state=True)``: continued training keeps
Adam's moments and the KL warm-up's position (training.md and persistence.md, "Where cellvi
goes further")."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import cellvi
from cellvi.errors import TrainingWarning
from cellvi.model import SCANVI, SCVI

PLAN = {"n_epochs_kl_warmup": 4}


def _data(seed=0):
    return cellvi.data.simulate(n_cells=150, n_genes=50, n_batches=2, n_cell_types=2, seed=seed)


def _scvi(adata=None):
    adata = _data() if adata is None else adata
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata, n_latent=3)


def _train(model, epochs, **kwargs):
    """Train quietly: a first 1-2 epoch run warns that the 4-epoch warm-up will not finish."""
    with cellvi.settings.override(progress_bar_style="none"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The KL warm-up lasts", TrainingWarning)
        model.train(max_epochs=epochs, plan_kwargs=PLAN, save_resume_checkpoint=False, **kwargs)


def _steps(model) -> int:
    return int(model._optimizer_state["state"][0]["step"])


def test_resume_continues_the_kl_warmup_and_adam(recwarn):
    model = _scvi()
    _train(model, 2)
    steps = _steps(model)
    assert steps > 0
    with cellvi.settings.override(progress_bar_style="none"):  # 2 + 2 epochs: no warning
        model.train(max_epochs=2, plan_kwargs=PLAN, save_resume_checkpoint=False, resume=True)
    assert not [w for w in recwarn if issubclass(w.category, TrainingWarning)]
    kl = model.history["kl_weight"]["kl_weight"].tolist()
    assert kl == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert _steps(model) == 2 * steps  # Adam's step count went on
    assert model.history["elbo_train"].index.tolist() == [0, 1, 2, 3]


def test_training_again_without_resume_restarts_and_says_so():
    model = _scvi()
    _train(model, 2)
    with pytest.warns(TrainingWarning, match="resume=True"):
        _train(model, 2)
    kl = model.history["kl_weight"]["kl_weight"].tolist()
    assert kl == pytest.approx([0.0, 0.25, 0.0, 0.25])


def test_saved_optimizer_state_comes_back_and_resumes(tmp_path):
    model = _scvi()
    _train(model, 2)
    model.save(tmp_path / "m", save_optimizer_state=True)
    loaded = SCVI.load(tmp_path / "m", adata=model.adata)
    for a, b in zip(
        model._optimizer_state["state"].values(),
        loaded._optimizer_state["state"].values(),
        strict=True,
    ):
        assert all(torch.equal(a[k], b[k]) for k in a)
    _train(loaded, 1, resume=True)
    assert loaded.history["kl_weight"]["kl_weight"].tolist() == pytest.approx([0.0, 0.25, 0.5])
    assert _steps(loaded) == 3 * _steps(model) // 2
    # a plain save keeps the file as before: no optimizer state
    model.save(tmp_path / "plain")
    assert SCVI.load(tmp_path / "plain", adata=model.adata)._optimizer_state is None


def test_resume_needs_a_state_and_no_checkpoint(tmp_path):
    model = _scvi()
    with pytest.raises(ValueError, match="resume=True"):
        _train(model, 1, resume=True)  # never trained
    _train(model, 1)
    model.save(tmp_path / "m")
    loaded = SCVI.load(tmp_path / "m", adata=model.adata)
    with pytest.raises(ValueError, match="save_optimizer_state=True"):
        _train(loaded, 1, resume=True)
    with pytest.raises(ValueError, match="ckpt_path"):
        _train(model, 1, resume=True, ckpt_path=str(tmp_path / "x.ckpt"))
    with pytest.raises(ValueError, match="save_optimizer_state=True"):
        loaded.save(tmp_path / "again", save_optimizer_state=True)
    assert not (tmp_path / "again").exists()


def test_scanvi_resumes_too():
    adata = _data(seed=3)
    SCANVI.setup_anndata(
        adata, batch_key="batch", labels_key="cell_type", unlabeled_category="unknown"
    )
    model = SCANVI(adata, n_latent=3)
    _train(model, 2)
    steps = _steps(model)
    _train(model, 1, resume=True)
    assert _steps(model) == steps + steps // 2
    assert np.isfinite(model.get_latent_representation()).all()


def test_a_state_that_does_not_fit_the_model_is_refused_before_training():
    model = _scvi()
    _train(model, 1)
    state = model._optimizer_state
    key = next(iter(state["state"]))
    state["state"][key]["exp_avg"] = torch.zeros(7, 3)  # another model's shape
    with pytest.raises(ValueError, match="does not match this model's"):
        _train(model, 1, resume=True)
    assert len(model.history["elbo_train"]) == 1


def _train_default_warmup(model, epochs, **kwargs):
    with cellvi.settings.override(progress_bar_style="none"):
        model.train(max_epochs=epochs, **kwargs)


def test_a_shortened_default_warmup_is_kept_by_resume_save_load_and_ckpt_path(tmp_path):
    # 4 epochs shorten the default 400-epoch warm-up to 3; continuing for 4 more must not
    # fit a new, longer warm-up to 8 epochs (the weight fell back from 1 to 0.667)
    model = _scvi()
    with cellvi.settings.override(logging_dir=tmp_path / "runs"):
        _train_default_warmup(model, 4)
    first = model.history["kl_weight"]["kl_weight"].tolist()
    assert first == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    model.save(tmp_path / "m", save_optimizer_state=True)
    _train_default_warmup(model, 4, resume=True, save_resume_checkpoint=False)
    assert model.history["kl_weight"]["kl_weight"].tolist()[4:] == pytest.approx([1.0] * 4)
    loaded = SCVI.load(tmp_path / "m", adata=model.adata)
    _train_default_warmup(loaded, 2, resume=True, save_resume_checkpoint=False)
    assert loaded.history["kl_weight"]["kl_weight"].tolist()[4:] == pytest.approx([1.0] * 2)
    # a checkpoint continued with a larger max_epochs keeps the warm-up it was trained with
    ckpt = next((tmp_path / "runs").glob("*/checkpoints/last.ckpt"))
    fresh = _scvi(model.adata.copy())
    _train_default_warmup(fresh, 6, ckpt_path=str(ckpt), save_resume_checkpoint=False)
    assert fresh.history["kl_weight"]["kl_weight"].tolist() == pytest.approx(first + [1.0] * 2)
    # a warm-up the user sets for the continued run is used as given
    with pytest.warns(TrainingWarning, match="only reaches 0.5"):
        _train_default_warmup(
            model,
            1,
            resume=True,
            save_resume_checkpoint=False,
            plan_kwargs={"n_epochs_kl_warmup": 16},
        )
    assert model.history["kl_weight"]["kl_weight"].tolist()[-1] == pytest.approx(8 / 16)


def test_resuming_with_another_kind_of_optimiser_says_so():
    model = _scvi()
    _train(model, 1)
    sgd = {"optimizer": "Custom", "optimizer_creator": lambda p: torch.optim.SGD(p, lr=1e-3)}
    with pytest.raises(ValueError, match="not SGD's .*lacks dampening, momentum"):
        with cellvi.settings.override(progress_bar_style="none"):
            model.train(max_epochs=1, resume=True, plan_kwargs=sgd, save_resume_checkpoint=False)
    # AdamW keeps Adam's moments: accepted
    with cellvi.settings.override(progress_bar_style="none"):
        model.train(
            max_epochs=1,
            resume=True,
            plan_kwargs={"optimizer": "AdamW", "n_epochs_kl_warmup": 2},
            save_resume_checkpoint=False,
        )
    assert model.history["kl_weight"]["kl_weight"].tolist() == pytest.approx([0.0, 0.5])
