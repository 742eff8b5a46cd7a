"""Training through torch.compile (plan_kwargs={"compile": True})."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import cellvi
from cellvi.errors import CountsWarning
from cellvi.model import SCVI


def _model(adata, **kwargs):
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata, n_hidden=32, n_latent=4, **kwargs)


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_compiled_training_reaches_the_eager_elbo_without_recompiling(sim_small):
    import torch._dynamo
    from torch._dynamo.utils import counters

    # 480 training cells in minibatches of 100: the last one (80 cells) runs eagerly
    kwargs = {"max_epochs": 12, "batch_size": 100, "train_size": 0.8, "validation_size": 0.2}
    warmup = {"n_epochs_kl_warmup": 6}  # the KL weight changes every epoch
    eager = _model(sim_small.copy())
    eager.train(**kwargs, plan_kwargs=warmup)
    torch._dynamo.reset()
    counters.clear()
    compiled = _model(sim_small.copy())
    compiled.train(**kwargs, plan_kwargs={**warmup, "compile": True})

    assert counters["stats"]["unique_graphs"] == 1
    assert compiled.history["kl_weight"]["kl_weight"].tolist()[:3] == [0.0, 1 / 6, 2 / 6]
    ours = compiled.get_elbo(indices=compiled.validation_indices)
    theirs = eager.get_elbo(indices=eager.validation_indices)
    assert np.isfinite(ours)
    assert abs(ours - theirs) / abs(theirs) < 0.02
    ours, theirs = (m.history["elbo_train"]["elbo_train"] for m in (compiled, eager))
    assert ours.iloc[-1] < 0.9 * ours.iloc[0]
    assert abs(ours.iloc[-1] - theirs.iloc[-1]) / theirs.iloc[-1] < 0.02


def test_compile_without_a_cpp_compiler_fails_before_training(sim_tiny, monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    model = _model(sim_tiny)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        model.train(max_epochs=1, plan_kwargs={"compile": True})
    assert not model.is_trained


def test_compile_kwargs_must_be_a_mapping(sim_tiny):
    model = _model(sim_tiny)
    with pytest.raises(TypeError, match="compile_kwargs"):
        model.train(max_epochs=1, plan_kwargs={"compile_kwargs": "reduce-overhead"})


def test_compile_refuses_non_integer_counts_before_training(sim_tiny):
    sim_tiny.X = sim_tiny.X.astype(np.float32) * 1.5
    with pytest.warns(CountsWarning):
        model = _model(sim_tiny)
    with pytest.raises(ValueError, match="non-integer values"):
        model.train(max_epochs=1, plan_kwargs={"compile": True})
    assert not model.is_trained


def test_compile_warns_when_counts_were_never_scanned(sim_tiny):
    from cellvi.errors import TrainingWarning
    from cellvi.model._training import _check_integer_counts

    model = _model(sim_tiny)
    manager = model.adata_manager
    _check_integer_counts(manager)  # scanned at setup, all whole numbers: silent
    del manager.registry["field_registries"]["X"]["state_registry"]["n_non_integer"]
    with pytest.warns(TrainingWarning, match="not scanned"):
        _check_integer_counts(manager)


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_a_compiled_run_resumes_eagerly_and_an_eager_one_compiled(sim_small, tmp_path):
    kwargs = {"batch_size": 100, "plan_kwargs": {"n_epochs_kl_warmup": 2}}
    compiled = {"batch_size": 100, "plan_kwargs": {"n_epochs_kl_warmup": 2, "compile": True}}
    with cellvi.settings.override(logging_dir=tmp_path / "compiled"):
        _model(sim_small.copy()).train(max_epochs=2, **compiled)
    (ckpt,) = (tmp_path / "compiled").glob("*/checkpoints/last.ckpt")
    # the checkpoint holds the module's tensors once, under the names an eager plan uses
    names = list(torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"])
    assert names and all(n.startswith("module.") for n in names)
    resumed = _model(sim_small.copy())
    resumed.train(max_epochs=3, ckpt_path=str(ckpt), **kwargs)
    assert len(resumed.history["elbo_train"]) == 3
    with cellvi.settings.override(logging_dir=tmp_path / "eager"):
        _model(sim_small.copy()).train(max_epochs=2, **kwargs)
    (ckpt,) = (tmp_path / "eager").glob("*/checkpoints/last.ckpt")
    again = _model(sim_small.copy())
    again.train(max_epochs=3, ckpt_path=str(ckpt), **compiled)
    assert len(again.history["elbo_train"]) == 3
