"""Training-plan configuration: warm-up schedule, validation of choices, config merging."""

from __future__ import annotations

import pytest
import torch

from cellvi.module import VAE, VAEConfig
from cellvi.train import TrainerConfig, TrainingPlan, TrainingPlanConfig, config_to_kwargs


def _plan(**cfg):
    return TrainingPlan(VAE(5, VAEConfig(n_hidden=4, n_latent=2)), TrainingPlanConfig(**cfg))


@pytest.mark.parametrize("epoch, expected", [(0, 0.0), (5, 0.5), (9, 0.9), (10, 1.0), (50, 1.0)])
def test_kl_weight_rises_linearly_over_warmup_epochs(monkeypatch, epoch, expected):
    plan = _plan(n_epochs_kl_warmup=10)
    monkeypatch.setattr(TrainingPlan, "current_epoch", property(lambda self: epoch))
    assert plan.kl_weight == pytest.approx(expected)


def test_kl_weight_uses_steps_only_without_epoch_warmup(monkeypatch):
    plan = _plan(n_epochs_kl_warmup=None, n_steps_kl_warmup=100, min_kl_weight=0.2)
    monkeypatch.setattr(TrainingPlan, "global_step", property(lambda self: 50))
    assert plan.kl_weight == pytest.approx(0.6)


def test_kl_weight_is_max_without_warmup():
    assert _plan(n_epochs_kl_warmup=0, max_kl_weight=0.7).kl_weight == pytest.approx(0.7)


def test_plan_config_rejects_min_above_max_kl():
    with pytest.raises(ValueError, match="min_kl_weight=0.9 is larger than max_kl_weight=0.5"):
        TrainingPlanConfig(min_kl_weight=0.9, max_kl_weight=0.5)


def test_plan_config_rejects_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer='SGD' is not supported"):
        TrainingPlanConfig(optimizer="SGD")


def test_custom_optimizer_needs_creator():
    with pytest.raises(ValueError, match="needs optimizer_creator"):
        TrainingPlanConfig(optimizer="Custom")


def test_custom_optimizer_creator_is_used():
    plan = _plan(optimizer="Custom", optimizer_creator=lambda p: torch.optim.SGD(p, lr=0.5))
    assert isinstance(plan.configure_optimizers(), torch.optim.SGD)


def test_adam_skips_frozen_parameters():
    plan = _plan()
    frozen = next(plan.module.parameters())
    frozen.requires_grad_(False)
    optimizer = plan.configure_optimizers()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(p is not frozen for p in params)


def test_reduce_lr_on_plateau_monitors_configured_metric():
    plan = _plan(reduce_lr_on_plateau=True, lr_scheduler_metric="elbo_train")
    optimizer = plan.configure_optimizers()  # the plan steps the scheduler itself
    assert isinstance(plan.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert plan.lr_scheduler.optimizer is optimizer
    plan._step_lr_scheduler({"elbo_validation": 1.0})  # not the monitored metric: no step
    assert plan.lr_scheduler.best == float("inf")
    plan._step_lr_scheduler({"elbo_train": 1.0})
    assert plan.lr_scheduler.best == 1.0


def test_trainer_config_extra_kwargs_lose_to_named_fields():
    cfg = TrainerConfig(early_stopping=True, extra_kwargs={"early_stopping": False, "foo": 1})
    kwargs = cfg.to_kwargs()
    assert kwargs["early_stopping"] is True and kwargs["foo"] == 1


def test_config_to_kwargs_accepts_mappings_and_to_kwargs_objects():
    assert config_to_kwargs({"lr": 0.1}, "plan_config") == {"lr": 0.1}
    assert config_to_kwargs(TrainingPlanConfig(lr=0.2), "plan_config")["lr"] == 0.2
    with pytest.raises(TypeError, match="plan_config must be a mapping or an object with"):
        config_to_kwargs(42, "plan_config")


def test_progress_in_jupyter_draws_a_bar_or_prints_lines():
    import importlib.util

    from rich.console import Console

    from cellvi.train import EpochProgress

    class _Trainer:
        is_global_zero, max_epochs, current_epoch = True, 5, 0

    console = Console(force_jupyter=True, record=True)
    progress = EpochProgress(console=console)
    progress.on_train_start(_Trainer(), None)
    progress.on_epoch_metrics(_Trainer(), None, {"epoch": 4, "train_loss": 3.0})
    if importlib.util.find_spec("ipywidgets") is not None:
        assert progress._progress is not None  # a live rich bar, rendered by Jupyter
    else:  # no widgets: plain lines, which notebooks show as text
        assert progress._progress is None
        assert "Epoch 5/5" in console.export_text()
    progress.on_train_end(_Trainer(), None)


def test_plain_progress_lines_give_elapsed_and_estimated_time_left(monkeypatch):
    from rich.console import Console

    from cellvi.train import EpochProgress, _progress

    class _Trainer:  # resumed at epoch 2 of 12
        is_global_zero, max_epochs, current_epoch = True, 12, 2

    clock = iter([100.0, 100.0 + 2 * 45.0])  # two epochs take 90 s
    monkeypatch.setattr(_progress.time, "perf_counter", lambda: next(clock))
    console = Console(file=None, force_terminal=False, force_jupyter=False, record=True)
    progress = EpochProgress(console=console)
    progress.on_train_start(_Trainer(), None)
    progress.on_epoch_metrics(_Trainer(), None, {"epoch": 3, "train_loss": 3.0})
    line = console.export_text().splitlines()[-1]
    # 4 of 12 done, 2 of them in this run at 45 s each: 8 epochs (6:00) left
    assert line.startswith("Epoch 4/12  1:30 (~6:00 left)"), line
    assert _progress._clock(3725) == "1:02:05" and _progress._clock(7.25) == "7.2s"


class _TerminalTrainer:
    is_global_zero, max_epochs, current_epoch = True, 4, 0


def _terminal_console():
    from rich.console import Console

    return Console(force_terminal=True, force_jupyter=False, record=True, width=60)


def test_plain_style_prints_lines_even_on_a_terminal():
    from cellvi.train import EpochProgress

    console = _terminal_console()
    progress = EpochProgress(console=console, style="plain")
    progress.on_train_start(_TerminalTrainer(), None)
    assert progress._progress is None and progress._bar is None
    long = {"epoch": 3, "train_loss": 3.0, "elbo_train": 1234.5, "elbo_validation": 1240.25}
    progress.on_epoch_metrics(_TerminalTrainer(), None, long)
    line = console.export_text().splitlines()[-1]
    assert line.startswith("Epoch 4/4") and line.endswith("elbo_validation=1240")  # not wrapped
    progress.on_train_end(_TerminalTrainer(), None)


def test_tqdm_style_draws_a_tqdm_bar_on_a_terminal(capsys):
    from cellvi.train import EpochProgress

    progress = EpochProgress(console=_terminal_console(), style="tqdm")
    progress.on_train_start(_TerminalTrainer(), None)
    assert progress._bar is not None and progress._progress is None
    progress.on_epoch_metrics(_TerminalTrainer(), None, {"epoch": 1, "train_loss": 2.5})
    assert progress._bar.n == 2 and "train_loss=2.5" in str(progress._bar)
    progress.on_train_end(_TerminalTrainer(), None)
    assert progress._bar is None
    assert "Epoch 2/4" in capsys.readouterr().err


def test_the_tqdm_style_is_a_setting_and_unknown_styles_are_refused():
    import cellvi
    from cellvi.train import EpochProgress

    with cellvi.settings.override(progress_bar_style="tqdm"):
        assert EpochProgress().style == "tqdm"
    with pytest.raises(ValueError, match="progress_bar_style='fancy'"):
        cellvi.settings.progress_bar_style = "fancy"
    with pytest.raises(ValueError, match="style='none'"):
        EpochProgress(style="none")


def test_scvi_tools_settings_cellvi_does_not_offer_say_why():
    from cellvi.train._config import TrainingPlanConfig, build_dataclass

    with pytest.raises(TypeError, match="update_only_decoder' \\(it trains on minified"):
        build_dataclass(TrainingPlanConfig, {"update_only_decoder": True}, "plan_kwargs")
