"""``ckpt_path=`` resumes only the run it was written by: the KL warm-up and progress of a
``resume=True`` run, the data it trained on, and this run's early-stopping patience."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from _callbacks import resume_checkpoint
from test_resume_probe import StopAt, _assert_same_run

import cellvi
from cellvi.errors import TrainingWarning
from cellvi.model import SCVI


def _data():
    return cellvi.data.simulate(
        n_cells=160, n_genes=30, n_batches=2, n_cell_types=2, n_de_genes_per_type=6, seed=1
    )


def _model(adata=None):
    adata = _data() if adata is None else adata
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata, n_hidden=16, n_latent=4)


def test_an_interrupted_resume_true_run_continues_its_warmup_from_the_checkpoint(tmp_path):
    first = _model()
    with pytest.warns(TrainingWarning, match="warm-up lasts 5 epochs"):
        first.train(max_epochs=3, plan_kwargs={"n_epochs_kl_warmup": 5})
    first.save(tmp_path / "m", save_optimizer_state=True)
    adata = first.adata

    reference = SCVI.load(tmp_path / "m", adata)
    reference.train(max_epochs=4, resume=True)
    model = SCVI.load(tmp_path / "m", adata)
    with pytest.raises(RuntimeError, match="stopped on purpose") as info:
        model.train(max_epochs=4, resume=True, callbacks=[StopAt(2, 1)])
    model.train(max_epochs=4, ckpt_path=resume_checkpoint(info.value))

    weights = model.history["kl_weight"]["kl_weight"].round(3).tolist()
    assert weights == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0]  # not back to 0.4 after epoch 5
    _assert_same_run(model, reference)
    assert model._training_progress == reference._training_progress
    assert model._training_progress[0] == 7


@pytest.fixture
def checkpoint():
    """A checkpoint of 2 of 4 epochs, with the AnnData it was written for."""
    model = _model()
    with pytest.raises(RuntimeError, match="stopped on purpose") as info:
        model.train(max_epochs=4, callbacks=[StopAt(2)])
    return resume_checkpoint(info.value), model.adata


def _genes_reversed(adata):
    return adata[:, ::-1].copy()


def _genes_renamed(adata):
    adata = adata.copy()
    adata.var_names = [f"other_{g}" for g in adata.var_names]
    return adata


def _batches_renamed(adata):
    adata = adata.copy()
    adata.obs["batch"] = adata.obs["batch"].astype(str) + "_x"
    return adata


def _cells_permuted(adata):
    return adata[np.random.default_rng(0).permutation(adata.n_obs)].copy()


def _more_cells(adata):
    extra = adata[:40].copy()
    extra.obs_names = [f"extra_{c}" for c in extra.obs_names]
    return ad.concat([adata, extra], merge="same")


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (_genes_reversed, "the genes or their order differ"),
        (_genes_renamed, "the genes or their order differ"),
        (_batches_renamed, "'batch' field differs"),
        (_cells_permuted, "another cell order"),
        (_more_cells, "160 cells there, 200 here"),
    ],
)
def test_a_checkpoint_of_other_data_is_refused_before_training(checkpoint, change, said):
    path, adata = checkpoint
    other = change(adata.copy())
    model = _model(other)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(ValueError, match="written for other data") as info:
        model.train(max_epochs=4, ckpt_path=path)
    assert said in str(info.value)
    assert all(torch.equal(model.module.state_dict()[k], v) for k, v in before.items())
    assert not model.is_trained_


def test_the_same_data_in_a_new_anndata_object_resumes(checkpoint):
    path, adata = checkpoint
    model = _model(adata.copy())
    model.train(max_epochs=4, ckpt_path=path)
    assert len(model.history["elbo_train"]) == 4


def test_resuming_with_another_patience_uses_it_and_says_so():
    early = {"early_stopping": True, "early_stopping_min_delta": 1e6}  # never improves
    model = _model()
    with pytest.raises(RuntimeError, match="stopped on purpose") as info:
        model.train(max_epochs=12, early_stopping_patience=100, **early, callbacks=[StopAt(1)])
    with pytest.warns(TrainingWarning, match="patience=100; this run continues with patience=2"):
        model.train(
            max_epochs=12,
            early_stopping_patience=2,
            **early,
            ckpt_path=resume_checkpoint(info.value),
        )
    # the first check sets the best value; two more without improvement stop the run
    assert len(model.history["elbo_train"]) == 3


def test_resuming_with_another_batch_size_or_train_size_says_what_happens(checkpoint):
    path, adata = checkpoint
    model = _model(adata.copy())
    with pytest.warns(TrainingWarning, match=r"batch_size=64 \(the checkpoint's run used 128\)"):
        model.train(max_epochs=3, batch_size=64, ckpt_path=path)
    model = _model(adata.copy())
    # (the run above went on in the checkpoint's folder: its last.ckpt now holds 3 epochs)
    with pytest.warns(TrainingWarning, match=r"train_size=0.5 is not applied: .* is kept"):
        model.train(max_epochs=4, train_size=0.5, ckpt_path=path)
    assert len(model.train_indices_) == 144  # the checkpoint's 90 % of 160 cells


def test_the_checkpoint_a_resume_starts_from_is_kept(checkpoint):
    path, adata = checkpoint
    original = Path(path).read_bytes()
    model = _model(adata.copy())
    model.train(max_epochs=3, ckpt_path=path)  # goes on in that folder: last.ckpt is rewritten
    assert Path(path).read_bytes() != original
    kept = Path(path).parent / "before_resume.ckpt"
    assert kept.read_bytes() == original
    again = _model(adata.copy())  # the abandoned resume, started again
    again.train(max_epochs=3, ckpt_path=str(kept))
    _assert_same_run(again, model)
    assert kept.read_bytes() == original  # resuming from the copy keeps it
