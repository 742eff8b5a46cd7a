"""Failures keep work, resume is exact, NaNs are caught at their step, seeds reproduce."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from _callbacks import NanGradientAt, PoisonAt, SignalAtEpoch, resume_checkpoint

from cellvi.errors import NonFiniteLossError, TrainingError, TrainingWarning
from cellvi.model import SCVI


def _model(adata):
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata, n_hidden=16, n_latent=4)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def test_sigterm_keeps_finished_epochs_and_names_the_resume_checkpoint(sim_tiny):
    model = _model(sim_tiny)
    with pytest.raises(TrainingError, match="interrupted by SIGTERM") as info:
        model.train(max_epochs=5, callbacks=[SignalAtEpoch(3)])
    notes = "\n".join(info.value.__notes__)
    assert "end of epoch 3" in notes and "ckpt_path=" in notes and "last.ckpt" in notes
    assert list(model.history["elbo_train"].index) == [0, 1, 2]
    assert not model.is_trained
    assert len(info.value.cellvi_history) == 3


def test_ctrl_c_is_caught_without_exiting_the_process(sim_tiny):
    model = _model(sim_tiny)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job
    with pytest.raises(TrainingError, match="interrupted by SIGINT"):
        model.train(max_epochs=4, callbacks=[SignalAtEpoch(1, signal.SIGINT)])
    assert list(model.history["elbo_train"].index) == [0]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back


def test_interrupted_then_resumed_run_equals_uninterrupted_run(sim_tiny):
    kwargs = {
        "max_epochs": 4,
        "check_val_every_n_epoch": 1,
        "plan_kwargs": {"n_epochs_kl_warmup": 3},
    }
    reference = _model(sim_tiny.copy())
    reference.train(**kwargs)

    model = _model(sim_tiny.copy())
    with pytest.raises(TrainingError) as info:
        model.train(**kwargs, callbacks=[SignalAtEpoch(2)])
    model.train(**kwargs, ckpt_path=resume_checkpoint(info.value))

    for name, ref_value in _weights(reference).items():
        torch.testing.assert_close(_weights(model)[name], ref_value, rtol=0, atol=0, msg=name)
    for metric in ("elbo_train", "elbo_validation", "kl_weight"):
        np.testing.assert_array_equal(model.history[metric].index, reference.history[metric].index)
        np.testing.assert_allclose(model.history[metric][metric], reference.history[metric][metric])
    np.testing.assert_array_equal(model.train_indices, reference.train_indices)


def test_nan_loss_is_caught_at_its_step_and_weights_roll_back(sim_tiny):
    model = _model(sim_tiny)
    poison = PoisonAt(epoch=1, batch_idx=0)
    with pytest.raises(
        NonFiniteLossError,
        match=r"in epoch 2 \(history index 1\), step 3 of the run \(minibatch 1 of the "
        r"epoch\)\..*Batch categories in it: "
        r"\['batch_0', 'batch_1'\].*not raw counts",
    ):
        model.train(max_epochs=3, batch_size=96, callbacks=[poison])
    poison.assert_rolled_back(model)
    assert all(torch.isfinite(p).all() for p in model.module.parameters())
    assert list(model.history["elbo_train"].index) == [0]


def test_same_seed_gives_identical_latents(sim_tiny):
    latents = []
    for _ in range(2):
        model = _model(sim_tiny.copy())
        model.train(max_epochs=3)
        latents.append(model.get_latent_representation())
    np.testing.assert_array_equal(latents[0], latents[1])


def test_different_seed_gives_different_latents(sim_tiny):
    import cellvi

    model = _model(sim_tiny.copy())
    model.train(max_epochs=2)
    with cellvi.settings.override(seed=7):
        other = _model(sim_tiny.copy())
        other.train(max_epochs=2)
    assert not np.allclose(model.get_latent_representation(), other.get_latent_representation())


def test_a_nan_gradient_under_a_finite_loss_is_caught_and_weights_roll_back(sim_tiny):
    model = _model(sim_tiny)
    poison = NanGradientAt(epoch=1, batch_idx=1)
    with pytest.raises(
        NonFiniteLossError,
        match=r"training gradient became NaN/inf in epoch 2 \(history index 1\), step 4 of "
        r"the run \(minibatch 2 of the epoch\)",
    ):
        model.train(max_epochs=3, batch_size=96, callbacks=[poison])
    poison.assert_rolled_back(model)
    assert list(model.history["elbo_train"].index) == [0]


def test_without_the_gradient_check_nan_weights_never_become_the_rollback_state(sim_tiny):
    # the NaN gradient of the epoch's last step makes the weights NaN while every loss of the
    # epoch was finite: the epoch must not end (and be snapshotted) on those weights
    model = _model(sim_tiny)
    poison = NanGradientAt(epoch=1, batch_idx=1)
    with pytest.raises(
        NonFiniteLossError,
        match=r"weights became NaN/inf during epoch 2 \(history index 1; decoder.px_scale_",
    ):
        model.train(
            max_epochs=3,
            batch_size=96,
            callbacks=[poison],
            plan_kwargs={"check_gradients": False},
        )
    poison.assert_rolled_back(model)
    assert all(torch.isfinite(p).all() for p in model.module.parameters())
    assert list(model.history["elbo_train"].index) == [0]


def test_a_checkpoint_this_model_cannot_resume_from_is_refused_before_training(sim_tiny, tmp_path):
    import cellvi

    with cellvi.settings.override(logging_dir=tmp_path):
        _model(sim_tiny.copy()).train(max_epochs=2)
    (ckpt,) = tmp_path.glob("*/checkpoints/last.ckpt")
    other = sim_tiny.copy()
    SCVI.setup_anndata(other, batch_key="batch")
    wider = SCVI(other, n_hidden=16, n_latent=5)
    with pytest.raises(ValueError, match=r"another architecture.*is \(4, 16\) there, \(5, 16\)"):
        wider.train(max_epochs=3, ckpt_path=str(ckpt))
    assert not wider.is_trained and "elbo_train" not in wider.history
    fewer = _model(sim_tiny[: sim_tiny.n_obs // 2].copy())
    with pytest.raises(ValueError, match=r"written for other data: \d+ cells there, \d+ here\."):
        fewer.train(max_epochs=3, ckpt_path=str(ckpt))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _model(sim_tiny.copy()).train(max_epochs=3, ckpt_path=str(tmp_path / "nope.ckpt"))
    # same tensor shapes, other settings: accepted before the settings were stored
    for setting in ({"gene_likelihood": "nb"}, {"latent_distribution": "ln"}):
        other = sim_tiny.copy()
        SCVI.setup_anndata(other, batch_key="batch")
        name, value = next(iter(setting.items()))
        with pytest.raises(ValueError, match=f"other settings: {name}=.* there, '{value}' here"):
            SCVI(other, n_hidden=16, n_latent=4, **setting).train(max_epochs=3, ckpt_path=str(ckpt))
    # optimiser settings come from the checkpoint's state: a new lr is named, not ignored
    with pytest.warns(TrainingWarning, match=r"its settings: lr=0.001 \(not 0.05\)"):
        _model(sim_tiny.copy()).train(max_epochs=3, ckpt_path=str(ckpt), plan_kwargs={"lr": 0.05})


def test_a_checkpoint_with_the_old_forward_alias_still_resumes(sim_tiny, tmp_path):
    import cellvi

    with cellvi.settings.override(logging_dir=tmp_path):
        _model(sim_tiny.copy()).train(max_epochs=2)
    (ckpt,) = tmp_path.glob("*/checkpoints/last.ckpt")
    state = torch.load(ckpt, weights_only=True)
    weights = state["state_dict"]
    # older cellvi wrote every module tensor twice: also under the "_forward." alias
    weights.update({"_forward." + k[len("module.") :]: v for k, v in list(weights.items())})
    torch.save(state, ckpt)
    model = _model(sim_tiny.copy())
    model.train(max_epochs=3, ckpt_path=str(ckpt))
    assert list(model.history["elbo_train"].index) == [0, 1, 2]


def test_a_one_cell_batch_gets_a_usable_library_prior(tmp_path):
    """With a learned library, a batch of one cell (or of equal totals) has no estimable
    variance: the prior keeps variance 1 instead of 0 (an infinite KL at the first step)."""
    import warnings

    import cellvi

    adata = cellvi.data.simulate(
        n_cells=200, n_genes=40, n_batches=2, n_cell_types=2, n_de_genes_per_type=5, seed=0
    )
    batch = adata.obs["batch"].astype(str).to_numpy()
    batch[0] = "lonely"
    adata.obs["batch"] = batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small-category warning
        SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=4, use_observed_lib_size=False)
    lonely = list(model.adata_manager.get_state_registry("batch")["categorical_mapping"])
    code = lonely.index("lonely")
    assert float(model.module.library_log_vars[0, code]) == 1.0
    with cellvi.settings.override(progress_bar_style="none", logging_dir=tmp_path):
        model.train(max_epochs=1)
    assert np.isfinite(model.history["elbo_train"].to_numpy()).all()
