"""SCVI training: history, indices, repeated training, budget traps, argument precedence."""

from __future__ import annotations

import numpy as np
import pytest

import cellvi
from cellvi.errors import NonFiniteLossError, TrainingWarning
from cellvi.model import SCVI
from cellvi.model._training import default_max_epochs


def _model(adata, **kwargs):
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata, n_hidden=16, n_latent=4, **kwargs)


def test_train_records_history_indices_and_trained_flag(sim_tiny):
    model = _model(sim_tiny)
    model.train(max_epochs=3, plan_kwargs={"n_epochs_kl_warmup": 2}, check_val_every_n_epoch=1)
    assert model.is_trained
    for name in (
        "train_loss",
        "elbo_train",
        "reconstruction_loss_train",
        "kl_local_train",
        "kl_global_train",
        "kl_weight",
        "elbo_validation",
        "validation_loss",
    ):
        assert name in model.history, name
        assert list(model.history[name].index) == [0, 1, 2]
        assert model.history[name].index.name == "epoch"
    assert model.history["kl_weight"]["kl_weight"].tolist() == [0.0, 0.5, 1.0]
    n = sim_tiny.n_obs
    all_idx = np.concatenate([model.train_indices, model.validation_indices, model.test_indices])
    assert sorted(all_idx.tolist()) == list(range(n))
    assert len(model.train_indices) == int(np.ceil(0.9 * n))


def test_history_is_written_to_run_dir_every_epoch(sim_tiny):
    model = _model(sim_tiny)
    model.train(max_epochs=2)
    import pandas as pd

    on_disk = pd.read_csv(f"{model.run_dir_}/history.csv")
    assert on_disk["epoch"].tolist() == [0, 1]
    np.testing.assert_allclose(on_disk["elbo_train"], model.history["elbo_train"]["elbo_train"])


def test_plain_training_and_outputs_raise_no_warnings(sim_small):
    """A well-posed run is quiet: training, the common outputs and DE raise no warnings, so
    third-party deprecation notices do not reach the user either."""
    import warnings

    model = _model(sim_small)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.train(max_epochs=2, check_val_every_n_epoch=1, early_stopping=True)
        model.get_latent_representation()
        model.get_normalized_expression()
        model.differential_expression(groupby="cell_type", group1="type_0")


def test_outputs_of_an_untrained_model_warn(sim_tiny):
    model = _model(sim_tiny)
    with pytest.warns(cellvi.errors.CellviWarning, match="trained yet: .*randomly"):
        model.get_latent_representation()
    model.train(max_epochs=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.get_latent_representation()


def test_validation_metrics_absent_by_default(sim_tiny):
    model = _model(sim_tiny)
    model.train(max_epochs=1)
    assert "elbo_validation" not in model.history


def test_training_again_appends_history_and_warns_of_the_restart(sim_tiny):
    model = _model(sim_tiny)
    model.train(max_epochs=2)
    with pytest.warns(TrainingWarning, match="already trained.*fresh optimiser state.*ckpt_path"):
        model.train(max_epochs=3)
    assert list(model.history["elbo_train"].index) == [0, 1, 2, 3, 4]


def test_lightning_arguments_cellvi_sets_can_be_overridden(sim_tiny, tmp_path):
    model = _model(sim_tiny)
    model.train(
        max_epochs=np.int64(2),  # numpy integers count as integers
        num_sanity_val_steps=2,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        check_val_every_n_epoch=1,
    )
    assert model.trainer.num_sanity_val_steps == 2
    assert len(model.history["elbo_validation"]) == 2  # sanity steps are not epochs


def test_split_arguments_in_datasplitter_kwargs_and_sampler_override_are_refused(sim_tiny):
    model = _model(sim_tiny)
    with pytest.raises(ValueError, match=r"datasplitter_kwargs sets \['train_size'\]"):
        model.train(max_epochs=1, datasplitter_kwargs={"train_size": 0.5})
    with pytest.raises(ValueError, match="use_distributed_sampler is set by cellvi"):
        model.train(max_epochs=1, use_distributed_sampler=True)
    assert not model.is_trained


def test_validation_every_epoch_without_validation_cells_runs_quietly(sim_tiny):
    model = _model(sim_tiny)
    model.train(max_epochs=2, train_size=1.0, check_val_every_n_epoch=1)  # no warning
    assert "elbo_validation" not in model.history


def test_a_nan_in_validation_cells_stops_training_with_a_clear_error(sim_tiny):
    adata = sim_tiny.copy()
    adata.X = adata.X.astype(np.float32)
    probe = _model(adata)
    probe.train(max_epochs=1, shuffle_set_split=False)  # the unshuffled split's cells
    cell = int(probe.validation_indices[0])
    model = _model(adata)
    adata.X.data[adata.X.indptr[cell]] = np.nan  # after setup's checks
    with pytest.raises(NonFiniteLossError, match="validation loss became NaN/inf.*itself"):
        model.train(max_epochs=3, check_val_every_n_epoch=1, shuffle_set_split=False)
    assert not model.is_trained


def test_elbo_improves_with_training(sim_small):
    model = _model(sim_small)
    model.train(max_epochs=30, plan_kwargs={"n_epochs_kl_warmup": 10})
    elbo = model.history["elbo_train"]["elbo_train"]
    assert elbo.iloc[-1] < 0.8 * elbo.iloc[0]


def test_early_stopping_without_validation_set_fails_before_training(sim_tiny):
    model = _model(sim_tiny)
    with pytest.raises(ValueError, match="needs a validation set, but it is empty"):
        model.train(max_epochs=2, train_size=1.0, early_stopping=True)
    assert not model.is_trained and model.history == {}


def test_validation_that_never_runs_within_max_epochs_fails_before_training(sim_tiny):
    model = _model(sim_tiny)
    with pytest.raises(ValueError, match="check_val_every_n_epoch=5 epochs, but max_epochs=2"):
        model.train(max_epochs=2, early_stopping=True, check_val_every_n_epoch=5)
    with pytest.raises(ValueError, match="lr_scheduler_metric='elbo_validation'"):
        model.train(
            max_epochs=2, check_val_every_n_epoch=3, plan_kwargs={"reduce_lr_on_plateau": True}
        )
    assert not model.is_trained and model.history == {}
    model.train(max_epochs=2, early_stopping=True, check_val_every_n_epoch=2)
    assert len(model.history["elbo_validation"]) == 1


def test_unknown_monitor_is_an_error_listing_metrics(sim_tiny):
    model = _model(sim_tiny)
    with pytest.raises(ValueError, match="'elbo_valdation' is never logged.*elbo_validation"):
        model.train(max_epochs=2, early_stopping=True, early_stopping_monitor="elbo_valdation")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_size": 0}, ValueError, "batch_size=0 must be a positive integer"),
        ({"batch_size": -5}, ValueError, "batch_size=-5 must be a positive integer"),
        ({"batch_size": 1.5}, TypeError, "batch_size=1.5 must be a positive integer"),
        ({"batch_size": 1}, ValueError, "batch normalisation .* at least 2 cells"),
        ({"plan_kwargs": {"lr": "1e-3"}}, TypeError, "lr='1e-3' \\(str\\) must be a number"),
        ({"plan_kwargs": {"n_epochs_kl_warmup": 2.5}}, TypeError, "must be an integer or None"),
        ({"early_stopping": "yes"}, TypeError, "early_stopping='yes' \\(str\\) must be True or"),
        ({"early_stopping_patience": "5"}, TypeError, "early_stopping_patience='5' \\(str\\)"),
    ],
)
def test_bad_training_arguments_fail_before_training(sim_tiny, kwargs, error, message):
    model = _model(sim_tiny)
    with pytest.raises(error, match=message):
        model.train(max_epochs=2, **kwargs)
    assert not model.is_trained and model.history == {}


def test_batch_size_one_trains_without_batch_norm(sim_tiny):
    model = _model(sim_tiny, use_batch_norm="none")
    model.train(max_epochs=1, batch_size=1, train_size=0.2)
    assert model.is_trained


def test_unknown_trainer_argument_suggests_the_right_one(sim_tiny):
    model = _model(sim_tiny)
    with pytest.raises(TypeError, match="'early_stoping'.*Did you mean 'early_stopping'"):
        model.train(max_epochs=1, early_stoping=True)


def test_unknown_plan_argument_suggests_the_right_one(sim_tiny):
    model = _model(sim_tiny)
    with pytest.raises(TypeError, match=r"'learning_rate'.*Valid: .*\blr\b"):
        model.train(max_epochs=1, plan_kwargs={"learning_rate": 1e-3})


def test_explicit_argument_overrides_config_only_when_given(sim_tiny):
    model = _model(sim_tiny)
    config = cellvi.train.TrainerConfig(
        early_stopping=True,
        early_stopping_patience=1,
        check_val_every_n_epoch=1,
        early_stopping_min_delta=1e9,  # nothing counts as improvement: stop after 1 check
    )
    model.train(max_epochs=20, trainer_config=config)
    assert len(model.history["elbo_train"]) < 20  # config's early stopping stayed on
    model2 = _model(sim_tiny)
    model2.train(max_epochs=4, trainer_config=config, early_stopping=False)
    assert len(model2.history["elbo_train"]) == 4


def test_default_epochs_never_collapse_to_one():
    assert default_max_epochs(1_000) == 400
    assert default_max_epochs(100_000) == 80
    assert default_max_epochs(10_000_000) == 10


def test_kl_warmup_longer_than_training_is_shortened_by_default(sim_tiny):
    model = _model(sim_tiny)
    model.train(max_epochs=8)
    weights = model.history["kl_weight"]["kl_weight"].tolist()
    assert weights[-1] == 1.0  # warm-up adapted to 6 epochs (0.75 x 8)


def test_kl_warmup_set_by_user_and_too_long_warns(sim_tiny):
    model = _model(sim_tiny)
    with pytest.warns(TrainingWarning, match="KL weight only reaches 0.02"):
        model.train(max_epochs=3, plan_kwargs={"n_epochs_kl_warmup": 100})


def test_latent_representation_shapes_and_determinism(sim_tiny):
    model = _model(sim_tiny)
    model.train(max_epochs=2)
    z = model.get_latent_representation()
    assert z.shape == (sim_tiny.n_obs, 4)
    np.testing.assert_array_equal(z, model.get_latent_representation())
    mean, var = model.get_latent_representation(return_dist=True)
    np.testing.assert_allclose(mean, z)
    assert (var > 0).all()
    sub = model.get_latent_representation(indices=[3, 1, 2], batch_size=2)
    np.testing.assert_allclose(sub, z[[3, 1, 2]], rtol=1e-5, atol=1e-6)


def test_reduce_lr_on_plateau_and_gradient_clipping_train(sim_tiny):
    model = _model(sim_tiny)
    model.train(
        max_epochs=3,
        plan_kwargs={"reduce_lr_on_plateau": True, "lr_patience": 0, "lr_factor": 0.5},
        gradient_clip_val=0.5,
    )
    assert "elbo_validation" in model.history  # the scheduler switched validation on
    lrs = [g["lr"] for g in model.trainer.optimizers[0].param_groups]
    assert lrs[0] <= 1e-3


def test_progress_prints_plain_lines_when_not_a_terminal(sim_tiny, capsys):
    model = _model(sim_tiny)
    with cellvi.settings.override(progress_bar_style="rich"):
        model.train(max_epochs=2)
    out = capsys.readouterr().out
    assert "Training for 2 epochs" in out and "Epoch 2/2" in out and "elbo_train=" in out


def test_progress_is_silent_at_warning_verbosity(sim_tiny, capsys):
    model = _model(sim_tiny)
    with cellvi.settings.override(progress_bar_style="rich", verbosity="warning"):
        model.train(max_epochs=2)
    assert "Epoch" not in capsys.readouterr().out


def test_progress_bar_refresh_rate_and_lightnings_per_step_bar(sim_tiny, capsys):
    from lightning.pytorch.callbacks import ProgressBar

    from cellvi.train import EpochProgress

    model = _model(sim_tiny)
    with cellvi.settings.override(progress_bar_style="rich"):
        model.train(max_epochs=2, progress_bar_refresh_rate=0)
        assert "Epoch" not in capsys.readouterr().out
        with pytest.warns(TrainingWarning, match="already trained"):
            model.train(max_epochs=1, simple_progress_bar=False)
    callbacks = model.trainer.callbacks
    assert any(isinstance(cb, ProgressBar) for cb in callbacks)
    assert not any(isinstance(cb, EpochProgress) for cb in callbacks)
    with pytest.raises(ValueError, match="progress_bar_refresh_rate=5: use 1"):
        model.train(max_epochs=1, progress_bar_refresh_rate=5)


def test_a_plan_config_with_default_warmup_is_adapted_like_plan_kwargs(sim_tiny):
    from cellvi.train import TrainingPlanConfig

    model = _model(sim_tiny)
    model.train(max_epochs=4, plan_config=TrainingPlanConfig(lr=2e-3))  # no warning
    assert model.history["kl_weight"]["kl_weight"].iloc[-1] == pytest.approx(1.0)


def test_covariate_keys_given_as_one_string_are_one_column(sim_tiny):
    adata = sim_tiny.copy()
    adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 2, "d1", "d2")
    SCVI.setup_anndata(adata, batch_key="batch", categorical_covariate_keys="donor")
    model = SCVI(adata, n_latent=3)
    assert model.summary_stats["n_extra_categorical_covs"] == 1


def test_learned_library_size_conflicts_with_size_factors(sim_tiny):
    adata = sim_tiny.copy()
    adata.obs["sf"] = 1.0
    SCVI.setup_anndata(adata, batch_key="batch", size_factor_key="sf")
    with pytest.raises(ValueError, match="use_observed_lib_size=False.*size_factor_key"):
        SCVI(adata, use_observed_lib_size=False)


def test_step_warmup_history_records_the_weight_of_each_epochs_last_step(sim_tiny):
    model = _model(sim_tiny)
    model.train(
        max_epochs=3,
        batch_size=60,  # 180 training cells: 3 steps per epoch
        plan_kwargs={"n_epochs_kl_warmup": None, "n_steps_kl_warmup": 6},
    )
    weights = model.history["kl_weight"]["kl_weight"].to_numpy()
    np.testing.assert_allclose(weights, [2 / 6, 5 / 6, 1.0])


def test_the_learning_rate_joins_the_history_when_monitored_or_scheduled(sim_tiny):
    model = _model(sim_tiny)
    model.train(max_epochs=2, learning_rate_monitor=True, plan_kwargs={"lr": 2e-3})
    np.testing.assert_allclose(model.history["lr-Adam"]["lr-Adam"], [2e-3, 2e-3])
    scheduled = _model(sim_tiny)
    scheduled.train(
        max_epochs=6,
        plan_kwargs={
            "reduce_lr_on_plateau": True,
            "lr_patience": 1,
            "lr_threshold": 1e9,  # no epoch counts as an improvement: the LR keeps dropping
            "lr_scheduler_metric": "elbo_validation",
        },
    )
    lrs = scheduled.history["lr-Adam"]["lr-Adam"].to_numpy()
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < lrs[0]
    assert "lr-Adam" not in _trained_history_keys(sim_tiny)


def _trained_history_keys(adata):
    model = _model(adata)
    model.train(max_epochs=1)
    return set(model.history)


def test_on_step_records_every_steps_loss_and_appends_across_runs(sim_tiny, tmp_path):
    model = _model(sim_tiny)
    model.train(max_epochs=2, batch_size=60, plan_kwargs={"on_step": True})  # 3 steps/epoch
    steps = model.history["train_loss_step"]
    assert steps.index.name == "step" and list(steps.index) == list(range(6))
    # train_loss is the mean of the epoch's minibatch losses
    first = steps["train_loss_step"].iloc[:3].mean()
    assert first == pytest.approx(model.history["train_loss"]["train_loss"].iloc[0], rel=1e-5)
    model.save(tmp_path / "m")
    loaded = SCVI.load(tmp_path / "m", adata=sim_tiny)
    with pytest.warns(TrainingWarning, match="already trained"):
        loaded.train(max_epochs=1, batch_size=60, plan_kwargs={"on_step": True})
    assert list(loaded.history["train_loss_step"].index) == list(range(9))
    assert list(loaded.history["train_loss"].index) == [0, 1, 2]
    assert "train_loss_step" not in _trained_history_keys(sim_tiny)
