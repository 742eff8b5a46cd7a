"""Callbacks: per-epoch history on disk, loud early stopping, best-model checkpoints."""

from __future__ import annotations

import contextvars
import csv
import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, ModelCheckpoint

from ..errors import TrainingWarning

__all__ = [
    "HistoryWriter",
    "LoudEarlyStopping",
    "BestModelCheckpoint",
    "ResumeCheckpoint",
    "SaveCheckpoint",
    "write_history_csv",
]

logger = logging.getLogger("cellvi")

# what a best-model checkpoint being written goes with: the run's history rows and split so
# far (read by the model's save, persistence.md "Where cellvi goes further")
_CHECKPOINT_RUN: contextvars.ContextVar = contextvars.ContextVar("cellvi_checkpoint_run")


def current_checkpoint_run():
    """The run state of the best-model checkpoint being written, or None outside one."""
    return _CHECKPOINT_RUN.get(None)


def _run_so_far(trainer: pl.Trainer):
    from types import SimpleNamespace

    plan = trainer.lightning_module
    data = getattr(trainer, "datamodule", None)
    return SimpleNamespace(
        history_rows=[dict(r) for r in getattr(plan, "history_rows", [])],
        step_rows=[dict(r) for r in getattr(plan, "step_rows", [])],
        resumed_rows=getattr(plan, "resumed_rows", None),
        run_dir=trainer.default_root_dir,
        train_idx=getattr(data, "train_idx", None),
        val_idx=getattr(data, "val_idx", None),
        test_idx=getattr(data, "test_idx", None),
    )


class HistoryWriter(pl.Callback):
    """Writes every epoch's metrics to ``<run_dir>/history.csv`` as soon as they are final.

    The file is rewritten atomically each epoch (it is small), so a killed process leaves
    the history up to its last finished epoch on disk.
    """

    def __init__(self, run_dir: str | Path):
        super().__init__()
        self.path = Path(run_dir) / "history.csv"

    def on_epoch_metrics(self, trainer, pl_module, row: dict) -> None:
        if not trainer.is_global_zero:
            return
        write_history_csv(self.path, pl_module.history_rows)


def write_history_csv(path: str | Path, rows: list[dict]) -> None:
    """Write per-epoch history rows as CSV (``epoch`` first), atomically."""
    path = Path(path)
    columns = ["epoch"] + sorted({k for r in rows for k in r} - {"epoch"})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class LoudEarlyStopping(EarlyStopping):
    """Lightning's early stopping plus a warm-up and a report of why and when it stopped.

    Parameters
    ----------
    warmup_epochs
        The first ``warmup_epochs`` checks (validation runs, or epochs when a training metric
        is monitored) never stop training and set no best value. The number of checks seen
        is part of the callback's state, so a resumed run (``ckpt_path``) keeps counting;
        a run resumed from a checkpoint written after the decision to stop trains no further.
    **kwargs
        ``monitor``, ``min_delta``, ``patience``, ``mode`` of Lightning's ``EarlyStopping``.
    """

    def __init__(self, *, warmup_epochs: int = 0, **kwargs):
        super().__init__(check_finite=True, **kwargs)
        self.warmup_epochs = warmup_epochs
        self.checks_seen = 0
        self.best_epoch: int | None = None
        self.stop_reason: str | None = None

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        self.checks_seen += 1
        if self.checks_seen <= self.warmup_epochs:
            return
        before = self.best_score.clone()
        super()._run_early_stopping_check(trainer)
        if self.best_score is not None and not bool(before == self.best_score):
            self.best_epoch = trainer.current_epoch
        if trainer.should_stop and self.stop_reason is None:
            value = trainer.callback_metrics.get(self.monitor)
            self.stop_reason = (
                f"{self.monitor} did not improve by more than {abs(self.min_delta)} for "
                f"{self.patience} checks"
                if value is not None and math.isfinite(float(value))
                else f"{self.monitor} became non-finite"
            )

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(
            best_epoch=self.best_epoch, stop_reason=self.stop_reason, checks_seen=self.checks_seen
        )
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.checks_seen = state_dict.pop("checks_seen", 0)
        self.best_epoch = state_dict.pop("best_epoch", None)
        self.stop_reason = state_dict.pop("stop_reason", None)
        # Lightning restores the checkpoint's patience too; this run's own (an explicit
        # early_stopping_patience, or the default) is the one it continues with
        patience = self.patience
        super().load_state_dict(state_dict)
        if state_dict.get("patience", patience) != patience:
            warnings.warn(
                f"The resumed checkpoint's early stopping had patience="
                f"{state_dict['patience']}; this run continues with patience={patience} "
                f"(its {self.wait_count} check(s) without improvement so far count).",
                TrainingWarning,
                stacklevel=2,
            )
        self.patience = patience

    def on_train_start(self, trainer, pl_module):
        # resumed (ckpt_path) from a checkpoint written after this callback decided to stop,
        # by a run interrupted before it ended: the resumed run stops there too
        if self.stop_reason is not None:
            trainer.should_stop = True

    def report(self) -> str | None:
        """A sentence for the user, or None if training was not stopped early."""
        if self.stop_reason is None:
            return None
        best = float(self.best_score)
        return (
            f"Early stopping at epoch {self.stopped_epoch + 1}: {self.stop_reason}. Best "
            f"{self.monitor}={best:.6g} at epoch {(self.best_epoch or 0) + 1}."
        )

    def on_train_end(self, trainer, pl_module):
        message = self.report()
        if message and trainer.is_global_zero:
            logger.info(message)
            from .._settings import settings

            if settings.show_progress:
                from rich.console import Console

                Console().print(message, soft_wrap=True)


# ModelCheckpoint arguments that make sense when every checkpoint is a model directory
# written after a validation run; the others (step or time triggers, saving on exceptions)
# are refused rather than half-honoured.
CHECKPOINT_OPTIONS = (
    "mode",
    "save_top_k",
    "every_n_epochs",
    "verbose",
    "auto_insert_metric_name",
    "enable_version_counter",
)
_IGNORED_OPTIONS = {
    "save_weights_only": "every checkpoint is a full model directory (weights, registry, "
    "architecture), which Model.load needs",
    "save_last": "the run directory's checkpoints/last.ckpt already holds the last epoch, "
    "resumable with train(ckpt_path=...)",
}


def _checkpoint_options(options: dict, owner: str) -> dict:
    """``options`` for Lightning's ``ModelCheckpoint``: ignored ones dropped with a
    ``RuntimeWarning``, unsupported ones refused before training."""
    options = dict(options)
    for name, why in _IGNORED_OPTIONS.items():
        if name in options:
            value = options.pop(name)
            warnings.warn(
                f"{owner}: {name}={value!r} is ignored: {why}.", RuntimeWarning, stacklevel=4
            )
    unknown = sorted(set(options) - set(CHECKPOINT_OPTIONS))
    if unknown:
        raise TypeError(
            f"{owner} got unsupported argument(s) {unknown}. Each checkpoint is a model "
            "directory written after a validation run, so only these ModelCheckpoint "
            f"arguments apply: {list(CHECKPOINT_OPTIONS)}."
        )
    mode = options.get("mode", "min")
    if mode not in ("min", "max"):
        raise ValueError(f"{owner}: mode={mode!r}; use 'min' or 'max'.")
    top_k = options.get("save_top_k", 1)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
        raise ValueError(
            f"{owner}: save_top_k={top_k!r} must be an integer >= -1 (-1 keeps every "
            "checkpoint, 0 none, k the k best)."
        )
    return options


class BestModelCheckpoint(ModelCheckpoint):
    """Keeps the best model(s) by ``monitor`` as cellvi model directories (not pickles).

    Each saved checkpoint is a directory written by ``save_fn(path)`` (the model's own safe
    ``save``), so it loads back with ``Model.load`` into a usable model. ``best_model_path``
    points at that directory, ``best_model_score`` holds its value. A checkpoint is written at
    the end of its epoch and carries the history up to that epoch and the run's split.

    Parameters
    ----------
    save_fn
        Callable writing a model directory at the given path.
    load_fn
        Callable loading the weights of a saved directory into the live module (used by
        ``load_best_on_end``).
    dirpath
        Folder of the checkpoints.
    filename
        Lightning filename template; default ``{epoch}-{step}-{<monitor>}``, giving
        directories such as ``epoch=3-step=120-validation_loss=1234.5``.
    monitor
        Metric to keep the best of (``"validation_loss"``).
    load_best_on_end
        Load the best weights into the model when training ends.
    **checkpoint_kwargs
        Lightning ``ModelCheckpoint`` arguments among :data:`CHECKPOINT_OPTIONS`: ``mode``
        (``"min"``), ``save_top_k`` (1), ``every_n_epochs``, ``verbose``,
        ``auto_insert_metric_name``, ``enable_version_counter``. ``save_weights_only`` and
        ``save_last`` are ignored with a ``RuntimeWarning``; other names raise ``TypeError``.

    ``save_fn``, ``load_fn`` and ``dirpath`` may be left out when the callback is handed to
    ``model.train(callbacks=[...])``: training binds them to the model and its run directory.
    """

    def __init__(
        self,
        *,
        save_fn: Callable[[str], None] | None = None,
        load_fn: Callable[[str], None] | None = None,
        dirpath: str | Path | None = None,
        filename: str | None = None,
        monitor: str = "validation_loss",
        load_best_on_end: bool = False,
        **checkpoint_kwargs,
    ):
        options = _checkpoint_options(checkpoint_kwargs, type(self).__name__)
        if filename is None:
            filename = "epoch={epoch}-step={step}-" + monitor + "={" + monitor + ":.6g}"
            options.setdefault("auto_insert_metric_name", False)
        elif not isinstance(filename, str) or not filename:
            raise TypeError(
                f"{type(self).__name__}: filename={filename!r} must be a non-empty string "
                "such as '{epoch}-{" + monitor + "}'."
            )
        super().__init__(
            dirpath=None if dirpath is None else str(dirpath),
            filename=filename,
            monitor=monitor,
            save_last=False,
            save_weights_only=False,
            # after the plan's on_train_epoch_end (monitoring callbacks run after the module):
            # the epoch's history row exists and goes into the checkpoint with its weights
            save_on_train_epoch_end=True,
            **options,
        )
        self.save_fn = save_fn
        self.load_fn = load_fn
        self._bound_by_training = save_fn is None  # rebound to the model of each train()
        self.load_best_on_end = load_best_on_end
        self.FILE_EXTENSION = ""

    def bind(self, save_fn, load_fn, dirpath: str | Path) -> None:
        """Attach the model's save/load functions (and a folder) where none were given."""
        if self._bound_by_training:
            self.save_fn, self.load_fn = save_fn, load_fn
        if self.dirpath is None:
            self.dirpath = str(dirpath)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        # a validation metric from an earlier epoch (check_val_every_n_epoch > 1) does not
        # score this epoch's weights: no checkpoint for them
        validated = getattr(self, "_validated_epoch", None) == trainer.current_epoch
        if "validation" in str(self.monitor) and not validated:
            return
        super().on_train_epoch_end(trainer, pl_module)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            token = _CHECKPOINT_RUN.set(_run_so_far(trainer))
            try:
                self.save_fn(filepath)
            finally:
                _CHECKPOINT_RUN.reset(token)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if trainer.is_global_zero and os.path.isdir(filepath):
            import shutil

            shutil.rmtree(filepath, ignore_errors=True)

    def on_train_end(self, trainer, pl_module):
        if self.load_best_on_end and self.best_model_path:
            self.load_fn(self.best_model_path)
            logger.info("Loaded the best weights from %s", self.best_model_path)

    def summary(self) -> str:
        """JSON line describing the best checkpoint."""
        score = None if self.best_model_score is None else float(self.best_model_score)
        return json.dumps({"best_model_path": self.best_model_path, "best_model_score": score})


class SaveCheckpoint(BestModelCheckpoint):
    """Best-model checkpoints for ``model.train(callbacks=[SaveCheckpoint(...)])``.

    Under scvi-tools' name and arguments: each checkpoint is a model directory (loads with
    ``Model.load``), named ``epoch=E-step=S-<monitor>=V`` in ``dirpath`` (default: the run
    directory's ``best/``). Supplying one switches checkpointing on (validation runs each
    epoch when ``monitor`` is a validation metric).

    Parameters
    ----------
    dirpath
        Folder of the checkpoints.
    filename
        Lightning filename template (default ``{epoch}-{step}-{<monitor>}``); e.g.
        ``"best-{epoch}"``. Metric names are inserted (``epoch=3``) unless
        ``auto_insert_metric_name=False``.
    monitor
        Metric to keep the best of (``"validation_loss"``).
    load_best_on_end
        Load the best weights into the model when training ends.
    check_nan_gradients
        If training then fails (a NaN loss or gradient, any error but an interrupt), load the
        best checkpoint's weights into the model rather than the last finite epoch's. NaN
        losses and gradients are always caught at the step they appear.
    **model_checkpoint_kwargs
        ``mode`` (``"min"`` or ``"max"``), ``save_top_k`` (1; -1 keeps all),
        ``every_n_epochs``, ``verbose``, ``auto_insert_metric_name``,
        ``enable_version_counter``. ``save_weights_only`` and ``save_last`` are ignored with
        a ``RuntimeWarning`` (a checkpoint is always a full model; the run's
        ``checkpoints/last.ckpt`` is the last epoch). Other names raise ``TypeError``.
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        filename: str | None = None,
        monitor: str = "validation_loss",
        load_best_on_end: bool = False,
        check_nan_gradients: bool = False,
        **model_checkpoint_kwargs,
    ):
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            load_best_on_end=load_best_on_end,
            **model_checkpoint_kwargs,
        )
        self.check_nan_gradients = check_nan_gradients


class ResumeCheckpoint(Checkpoint):
    """Writes ``last.ckpt`` after every epoch: everything needed to resume exactly.

    The file holds the weights, optimiser and scheduler state, loop counters, the split,
    callback states, the history so far and the RNG state. It is written to a temporary
    name and renamed, so a kill during the write leaves the previous checkpoint intact.
    As a Lightning ``Checkpoint`` it runs after the plan has finalised the epoch's metrics.
    """

    def __init__(self, dirpath: str | Path):
        super().__init__()
        self.dirpath = Path(dirpath)
        self.last_path = self.dirpath / "last.ckpt"

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        tmp = self.dirpath / "last.ckpt.tmp"
        trainer.save_checkpoint(str(tmp))
        if trainer.is_global_zero:
            os.replace(tmp, self.last_path)


def optimizer_from_checkpoint(plan, checkpoint: dict) -> None:
    """The optimiser state and training progress of rank 0 at ``checkpoint`` (what the
    launching process of spawned/forked workers keeps for ``train(resume=True)`` and
    ``save(..., save_optimizer_state=True)``; it ran no step itself)."""
    states = checkpoint.get("optimizer_states") or []
    progress = checkpoint.get("cellvi_progress")
    if states and progress is not None:
        state = states[0]
        plan.last_good_optimizer_state = {
            "state": state["state"],
            "param_groups": state["param_groups"],
        }
        plan.progress = (int(progress[0]), int(progress[1]))


def optimizer_from_last_checkpoint(plan, last: Path, started: float) -> None:
    """:func:`optimizer_from_checkpoint` from ``last`` if this run (begun at ``started``)
    wrote it."""
    if last.exists() and last.stat().st_mtime >= started:
        import torch

        checkpoint = torch.load(last, map_location="cpu", weights_only=True)
        optimizer_from_checkpoint(plan, checkpoint)
