"""``cellvi.model.train_in_subprocess``: DDP training in fresh torchrun processes, the result
loaded back into the calling session's model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cellvi
from cellvi.model import SCVI, train_in_subprocess
from cellvi.train import SaveCheckpoint

pytestmark = pytest.mark.ddp


@pytest.fixture
def model(tmp_path):
    adata = cellvi.data.simulate(n_cells=300, n_genes=40, n_de_genes_per_type=5, seed=0)
    SCVI.setup_anndata(adata, batch_key="batch")
    with cellvi.settings.override(logging_dir=tmp_path):
        yield SCVI(adata, n_hidden=16, n_latent=3)


def test_a_run_in_fresh_processes_comes_back_into_the_model(model):
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    warmup = {"n_epochs_kl_warmup": 3}
    train_in_subprocess(model, nproc_per_node=2, max_epochs=2, plan_kwargs=warmup)
    assert model.is_trained and model.trainer is None
    assert model.history["elbo_train"].index.tolist() == [0, 1]
    split = np.concatenate([model.train_indices, model.validation_indices])
    assert sorted(split.tolist()) == list(range(model.adata.n_obs))
    after = model.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert np.isfinite(model.get_latent_representation()).all()
    # the optimiser state came back too: a resumed launch continues the warm-up
    train_in_subprocess(model, nproc_per_node=2, max_epochs=1, resume=True, plan_kwargs=warmup)
    kl = model.history["kl_weight"]["kl_weight"].tolist()
    assert kl == pytest.approx([0.0, 1 / 3, 2 / 3])


def test_a_failed_run_leaves_the_model_unchanged_and_shows_the_error(model):
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"(?s)failed.*the model is unchanged.*lr"):
        train_in_subprocess(model, nproc_per_node=2, max_epochs=1, plan_kwargs={"lr": -1.0})
    assert not model.is_trained
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())


def test_bad_launches_are_refused_before_anything_starts(model):
    with pytest.raises(ValueError, match=r"sets \['strategy'\] itself"):
        train_in_subprocess(model, strategy="ddp")
    with pytest.raises(ValueError, match=r"does not take \['ckpt_path'\].*resume=True"):
        train_in_subprocess(model, ckpt_path="last.ckpt")
    with pytest.raises(ValueError, match=r"\['callbacks'\] are not plain values"):
        train_in_subprocess(model, callbacks=[SaveCheckpoint()])
    with pytest.raises(ValueError, match="at least 1"):
        train_in_subprocess(model, nproc_per_node=0)
    with pytest.raises(ValueError, match="would only compete"):
        train_in_subprocess(model, nproc_per_node=4096)
