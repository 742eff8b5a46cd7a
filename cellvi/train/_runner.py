"""Run one training: build the Lightning trainer, fit, and keep everything if it fails."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor

from .._settings import settings
from ..errors import NonFiniteLossError
from . import _callbacks
from ._callbacks import BestModelCheckpoint, HistoryWriter, LoudEarlyStopping, ResumeCheckpoint
from ._checks import ChecksPassed, check_callbacks, match_weights_to_precision, only_checking
from ._config import TrainerConfig
from ._devices import check_devices
from ._interrupts import InterruptGuard, TrainingInterrupted
from ._plan import TrainingPlan
from ._progress import EpochProgress
from ._resume_check import check_resume_checkpoint

__all__ = ["RunResult", "run_training", "TrainingInterrupted", "default_run_dir"]

logger = logging.getLogger("cellvi")

# Lightning's start-up chatter (device availability, tips) is not useful to cellvi users.
_LIGHTNING_LOGGERS = (
    "lightning.pytorch",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric",
    "lightning.fabric.utilities.rank_zero",
)


@dataclass
class RunResult:
    """What a training run leaves behind, whether it finished or not."""

    history_rows: list[dict]
    run_dir: Path
    step_rows: list[dict] = field(default_factory=list)
    train_idx: object = None
    val_idx: object = None
    test_idx: object = None
    trainer: pl.Trainer | None = None
    completed: bool = False
    resume_checkpoint: Path | None = None
    early_stopping: str | None = None
    best_checkpoint: str | None = None
    extra: dict = field(default_factory=dict)
    # with ckpt_path: the (epoch, step) rows of history the checkpoint brought back
    resumed_rows: tuple[int, int] | None = None
    # the optimiser state and (epochs, steps) trained that go with the kept weights
    optimizer_state: dict | None = None
    progress: tuple[int, int] | None = None


def default_run_dir(model_name: str) -> Path:
    """``<settings.logging_dir>/<model>_<timestamp>_<pid>``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return Path(settings.logging_dir) / f"{model_name}_{stamp}_{os.getpid()}"


def _tune_allocator() -> None:
    """Keep freed large blocks in the process (glibc): minibatch-sized tensors are reused
    every step, and returning them to the OS each time costs page faults on every step."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


_ALLOCATOR_TUNED = False


def _validation_needed(
    cfg: TrainerConfig, plan: TrainingPlan, checkpoint_monitor: str | None, external: list
) -> int | None:
    if cfg.check_val_every_n_epoch is not None:
        return cfg.check_val_every_n_epoch
    if cfg.early_stopping or checkpoint_monitor or plan.config.reduce_lr_on_plateau:
        return 1
    if any("validation" in metric for _, metric in external):
        return 1
    return None


def _lightning_monitors(cbs: list) -> list[tuple[str, str]]:
    """``(what, metric)`` for the user's own Lightning callbacks that watch a metric
    (``EarlyStopping``, ``ModelCheckpoint``), so that it is checked like cellvi's monitors."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    return [
        (f"a {type(cb).__name__} in callbacks monitoring", cb.monitor)
        for cb in cbs
        if isinstance(cb, EarlyStopping | ModelCheckpoint)
        and not isinstance(cb, BestModelCheckpoint)  # cellvi's own, checked as such
        and getattr(cb, "monitor", None)
    ]


def _check_monitors(
    cfg: TrainerConfig,
    plan: TrainingPlan,
    n_val: int,
    every: int | None,
    checkpoint_monitor: str | None,
    max_epochs: int,
    external: list,
):
    """Fail before training when a monitored metric would never be logged."""
    validating = every is not None and n_val > 0 and every <= max_epochs
    available = plan.metric_names(validation=validating)
    wanted = [(f"{what} {metric!r}", metric) for what, metric in external]
    if cfg.early_stopping:
        wanted.append(
            (f"early_stopping_monitor={cfg.early_stopping_monitor!r}", cfg.early_stopping_monitor)
        )
    if checkpoint_monitor:
        wanted.append((f"checkpointing_monitor={checkpoint_monitor!r}", checkpoint_monitor))
    if plan.config.reduce_lr_on_plateau:
        metric = plan.config.lr_scheduler_metric
        wanted.append((f"lr_scheduler_metric={metric!r}", metric))
    for arg, metric in wanted:
        if metric in available:
            continue
        if "validation" in metric and n_val == 0:
            raise ValueError(
                f"{arg} needs a validation set, but it is empty (or limit_val_batches=0 "
                "switched validation off). Use train_size < 1 (e.g. train_size=0.9) or "
                "monitor a training metric such as 'elbo_train'."
            )
        if "validation" in metric and every is not None and every > max_epochs:
            raise ValueError(
                f"{arg} is logged when validation runs, every "
                f"check_val_every_n_epoch={every} epochs, but max_epochs={max_epochs}, so it "
                f"never runs. Use check_val_every_n_epoch <= {max_epochs} (e.g. 1)."
            )
        raise ValueError(
            f"{arg} is never logged by this model.{plan.why_not_logged(metric)} "
            f"Metrics logged: {available}."
        )


def _keep_starting_checkpoint(ckpt: Path, resume_dir: Path) -> None:
    """A resumed run goes on in its checkpoint's folder and overwrites ``last.ckpt`` each
    epoch: the checkpoint it starts from is copied to ``before_resume.ckpt`` first, so an
    abandoned resume (wrong settings, say) can be started again from there."""
    try:
        same_folder = ckpt.resolve().parent == resume_dir.resolve()
    except OSError:
        return
    if not same_folder or ckpt.name == "before_resume.ckpt" or not ckpt.is_file():
        return
    tmp = resume_dir / "before_resume.ckpt.tmp"
    shutil.copy2(ckpt, tmp)
    os.replace(tmp, resume_dir / "before_resume.ckpt")


def run_training(
    plan: TrainingPlan,
    datamodule: pl.LightningDataModule,
    *,
    max_epochs: int,
    accelerator: str = "auto",
    devices: int | str | list = "auto",
    config: TrainerConfig | None = None,
    callbacks: list | None = None,
    ckpt_path: str | os.PathLike | None = None,
    run_dir: Path,
    record: Callable[[RunResult], None],
    save_fn: Callable[[str], None] | None = None,
    load_fn: Callable[[str], None] | None = None,
) -> RunResult:
    """Fit ``plan`` on ``datamodule`` and hand the outcome to ``record`` (also on failure).

    On any exception (including Ctrl-C and SIGTERM) the module is rolled back to the weights
    at the end of the last finished epoch, the history of the finished epochs is passed to
    ``record``, and the exception is re-raised with notes saying what was kept and how to
    resume from ``<run_dir>/checkpoints/last.ckpt``.
    """
    cfg = config or TrainerConfig()
    check_devices(accelerator, devices)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path(run_dir)
    datamodule.setup("fit")
    val_idx = getattr(datamodule, "val_idx", None)
    n_val = 0 if val_idx is None else len(val_idx)
    extra = dict(cfg.extra_kwargs)
    cbs: list = check_callbacks(callbacks) + check_callbacks(
        extra.pop("callbacks", None), "trainer_config's callbacks"
    )
    if any(isinstance(cb, LearningRateMonitor) for cb in cbs):
        # Lightning's monitor needs a logger; the plan records the same lr-<optimizer> column
        cbs = [cb for cb in cbs if not isinstance(cb, LearningRateMonitor)]
        cfg = dataclasses.replace(cfg, learning_rate_monitor=True)
    external = _lightning_monitors(cbs)
    if extra.get("limit_val_batches") == 0:  # validation switched off in Lightning's terms
        n_val = 0
    supplied = [cb for cb in cbs if isinstance(cb, BestModelCheckpoint)]
    if supplied:
        checkpoint_monitor = supplied[0].monitor
    else:
        checkpoint_monitor = cfg.checkpointing_monitor if cfg.enable_checkpointing else None
    plan.observe_split(datamodule)
    every = _validation_needed(cfg, plan, checkpoint_monitor, external)
    _check_monitors(cfg, plan, n_val, every, checkpoint_monitor, max_epochs, external)
    match_weights_to_precision(plan.module, cfg.precision)
    if ckpt_path is not None:
        check_resume_checkpoint(ckpt_path, plan, datamodule, max_epochs)
    else:
        _check_finite_weights(plan)
    _tune_allocator()
    plan.module.train()
    plan.trained_on = None  # set by the process that trains (see _stay_on_training_device)
    plan.log_learning_rate = cfg.learning_rate_monitor or plan.config.reduce_lr_on_plateau
    plan.n_obs_training = len(datamodule.train_idx)
    plan.n_obs_validation = n_val

    guard = InterruptGuard()
    cbs.append(guard)
    cbs.append(HistoryWriter(run_dir))
    progress = (
        cfg.enable_progress_bar and cfg.progress_bar_refresh_rate == 1 and settings.show_progress
    )
    if progress and cfg.simple_progress_bar:
        cbs.append(EpochProgress())
    early = None
    if cfg.early_stopping:
        early = LoudEarlyStopping(
            monitor=cfg.early_stopping_monitor,
            min_delta=cfg.early_stopping_min_delta,
            patience=cfg.early_stopping_patience,
            mode=cfg.early_stopping_mode,
            warmup_epochs=cfg.early_stopping_warmup_epochs,
        )
        cbs.append(early)
    best = supplied[0] if supplied else None
    if checkpoint_monitor and (save_fn is None or load_fn is None):
        raise ValueError("Best-model checkpoints need a model that can save itself.")
    for cb in supplied:
        cb.bind(save_fn, load_fn, run_dir / "best")
    if cfg.enable_checkpointing and not supplied:
        best = BestModelCheckpoint(
            save_fn=save_fn,
            load_fn=load_fn,
            dirpath=run_dir / "best",
            monitor=cfg.checkpointing_monitor,
            load_best_on_end=cfg.load_best_on_end,
        )
        cbs.append(best)
    resume_dir = run_dir / "checkpoints"
    if cfg.save_resume_checkpoint:
        cbs.append(ResumeCheckpoint(resume_dir))

    quiet = [logging.getLogger(n) for n in _LIGHTNING_LOGGERS]
    old_levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.WARNING)
    # cellvi's Lightning defaults; the user's Lightning arguments (and logger) win
    trainer_kwargs = {
        "logger": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(run_dir),
        **extra,
    }
    if every is None or n_val == 0:  # nothing to validate: no empty validation loop
        trainer_kwargs.update(limit_val_batches=0, check_val_every_n_epoch=1)
    else:
        trainer_kwargs["check_val_every_n_epoch"] = every
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        precision=cfg.precision,
        deterministic=cfg.deterministic,
        gradient_clip_val=cfg.gradient_clip_val,
        callbacks=cbs,
        enable_checkpointing=True,
        enable_progress_bar=progress and not cfg.simple_progress_bar,
        use_distributed_sampler=False,
        **trainer_kwargs,
    )
    try:
        plan.check_rank_shares(datamodule, trainer.world_size)  # before any process starts
        if only_checking():  # `cellvi run --check`: every check passed, nothing is trained
            raise ChecksPassed
    except (ValueError, ChecksPassed):
        _restore_levels(quiet, old_levels)
        raise

    if ckpt_path is not None:
        _keep_starting_checkpoint(Path(ckpt_path), resume_dir)
    result = RunResult(history_rows=plan.history_rows, run_dir=run_dir, trainer=trainer)
    guard.trainer = trainer
    started = time.time()
    try:
        with guard, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*The number of training batches.*")
            # epoch metrics are logged after their sums were reduced across ranks
            warnings.filterwarnings("ignore", message=".*It is recommended to use `self.log.*")
            # Lightning's own pytree helper against newer torch; nothing the user can act on
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            if ckpt_path is not None:  # a resumed run goes on in its run directory, whose
                # best/ holds this run's own checkpoints (their ranking comes back with it)
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* not empty")
            trainer.fit(plan, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except BaseException as raised:
        exc = guard.as_interruption(raised)
        last = resume_dir / "last.ckpt"
        result.resume_checkpoint = last if last.exists() else None
        try:
            if plan.trained_on is None:  # spawned/forked workers trained, not this process
                _state_from_checkpoint(plan, result.resume_checkpoint, started)
            else:
                plan.restore_last_good_state()
                _stay_on_training_device(plan)
        except Exception as cleanup:  # e.g. a CUDA error left the device unusable
            exc.add_note(f"The weights could not be rolled back: {cleanup!r}")
        # the history that goes with the kept weights: a launching process takes both from
        # last.ckpt; history.csv alone (no checkpoint) would claim weights it does not hold
        result.history_rows = list(plan.history_rows)
        result.step_rows = list(plan.step_rows)
        result.resumed_rows = plan.resumed_rows
        result.optimizer_state, result.progress = plan.last_good_optimizer_state, plan.progress
        record(result)
        _annotate(exc, result, max_epochs)
        _load_best_after_failure(exc, supplied)
        plan.module.train()  # an untrained model stays in train mode (training.md §5)
        if exc is raised:
            raise
        raise exc from (exc.__cause__ or raised)
    finally:
        _restore_levels(quiet, old_levels)
    _stay_on_training_device(plan)
    if plan.trained_on is None:  # spawned/forked workers trained: their optimiser state
        _callbacks.optimizer_from_last_checkpoint(plan, resume_dir / "last.ckpt", started)
    result.history_rows = list(plan.history_rows) or _history_from_disk(run_dir)
    result.step_rows = list(plan.step_rows)
    result.resumed_rows = plan.resumed_rows
    result.optimizer_state, result.progress = plan.last_good_optimizer_state, plan.progress
    result.completed = True
    result.train_idx = datamodule.train_idx
    result.val_idx = datamodule.val_idx
    result.test_idx = datamodule.test_idx
    last = resume_dir / "last.ckpt"
    result.resume_checkpoint = last if last.exists() else None
    result.early_stopping = early.report() if early is not None else None
    result.best_checkpoint = best.best_model_path if best is not None else None
    record(result)
    return result


def _restore_levels(loggers: list, levels: list) -> None:
    for log, level in zip(loggers, levels, strict=True):
        log.setLevel(level)


def _check_finite_weights(plan: TrainingPlan) -> None:
    """Refuse to start from NaN/inf weights: the first step's loss would be NaN, and the
    guardrail's rollback would restore the same non-finite weights."""
    with torch.no_grad():
        bad = [n for n, p in plan.module.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteLossError(
            f"The model's weights are already NaN/inf before training ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}), so training cannot start from them. Build a "
            "new model, or load a saved one whose weights are finite."
        )


def _stay_on_training_device(plan: TrainingPlan) -> None:
    """Keep the weights where this process trained them: Lightning's teardown moves them to
    the CPU, and a model trained on a GPU should infer there too (as in scvi-tools). When
    spawned or forked workers trained, they stay on the CPU: starting CUDA in the launching
    process would stop it from forking workers for the next run."""
    device = plan.trained_on
    if device is not None and device.type != "cpu":
        plan.module.to(device)


def _state_from_checkpoint(plan: TrainingPlan, last: Path | None, started: float) -> None:
    """The launching process of ``ddp_spawn``/``ddp_notebook`` trained nothing itself: it
    takes rank 0's weights and history of the last finished epoch from this run's
    ``last.ckpt`` (written together, so they match)."""
    if last is None or last.stat().st_mtime < started:
        return
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    plan.load_state_dict(checkpoint["state_dict"])
    plan.history_rows = [dict(r) for r in checkpoint.get("cellvi_history_rows", [])]
    plan.step_rows = [dict(r) for r in checkpoint.get("cellvi_step_rows", [])]
    _callbacks.optimizer_from_checkpoint(plan, checkpoint)


def _load_best_after_failure(exc: BaseException, checkpoints: list) -> None:
    """``SaveCheckpoint(check_nan_gradients=True)``: a failed run ends on the best weights."""
    if isinstance(exc, KeyboardInterrupt | TrainingInterrupted):
        return
    for cb in checkpoints:
        if getattr(cb, "check_nan_gradients", False) and cb.best_model_path:
            cb.load_fn(cb.best_model_path)
            exc.add_note(
                "check_nan_gradients=True: the model then loaded the best checkpoint's "
                f"weights instead, from {cb.best_model_path}"
            )
            return


def _history_from_disk(run_dir: Path) -> list[dict]:
    """History written by rank 0 when spawned or forked workers trained (``ddp_spawn``,
    ``ddp_notebook``): the weights come back through Lightning, the history through here."""
    path = Path(run_dir) / "history.csv"
    if not path.exists():
        return []
    import pandas as pd

    frame = pd.read_csv(path)
    rows = []
    for record in frame.to_dict(orient="records"):
        rows.append(
            {k: (int(v) if k == "epoch" else float(v)) for k, v in record.items() if not pd.isna(v)}
        )
    return rows


def _annotate(exc: BaseException, result: RunResult, max_epochs: int) -> None:
    n_done = len(result.history_rows)
    rank = result.trainer.global_rank if result.trainer is not None else 0
    if not n_done:
        kept = (
            "No epoch of this run had finished, so the model keeps the weights this run "
            "started from."
        )
    elif rank == 0:
        kept = (
            f"Kept: the weights at the end of epoch {n_done} and the history of the {n_done} "
            f"finished epoch(s) (model.history; also {result.run_dir / 'history.csv'})."
        )
    else:  # only rank 0 writes the run folder
        kept = f"Kept: the weights and history of the {n_done} finished epoch(s) (model.history)."
    if rank > 0:
        todo = f"This is rank {rank}: rank 0's error names the checkpoint to resume from."
    elif result.resume_checkpoint is not None:
        todo = (
            f"To resume exactly where it stopped: model.train(max_epochs={max_epochs}, "
            f"ckpt_path='{result.resume_checkpoint}') with the same other arguments."
        )
    elif n_done:
        todo = "No resumable checkpoint was written (save_resume_checkpoint=False)."
    else:
        todo = "No resumable checkpoint was written (no epoch finished)."
    if hasattr(exc, "add_note"):
        exc.add_note(kept)
        exc.add_note(todo)
    exc.cellvi_history = result.history_rows
