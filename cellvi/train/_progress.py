"""One progress display per training run: a rich bar on terminals, plain lines otherwise."""

from __future__ import annotations

import time

import lightning.pytorch as pl

__all__ = ["EpochProgress"]

_SHOWN = ("train_loss", "elbo_train", "elbo_validation", "validation_accuracy")


def _format_metrics(row: dict) -> str:
    parts = [f"{k}={row[k]:.4g}" for k in _SHOWN if k in row]
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    """``12.3s`` under a minute, else ``m:ss`` or ``h:mm:ss``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _has_ipywidgets() -> bool:
    """Rich draws live bars in Jupyter through ipywidgets; without it, print lines."""
    import importlib.util

    return importlib.util.find_spec("ipywidgets") is not None


class EpochProgress(pl.Callback):
    """Shows ``Epoch i/N`` with elapsed/remaining time and the main losses.

    On a terminal (or in Jupyter with ipywidgets) a single rich progress bar is drawn;
    otherwise (cluster logs, Jupyter without ipywidgets) a plain line with the elapsed time
    and an estimate of the time left is printed about every tenth of the run, so logs stay
    short. Only rank 0 prints.

    Parameters
    ----------
    console
        A ``rich.console.Console`` (default: a new one on standard output).
    """

    def __init__(self, console=None):
        super().__init__()
        self._console = console
        self._progress = None
        self._task = None
        self._start = 0.0
        self._first = 0
        self._every = 1

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console()
        return self._console

    def on_train_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        self._start = time.perf_counter()
        total = trainer.max_epochs
        self._every = max(1, total // 10)
        first = self._first = trainer.current_epoch
        if self.console.is_terminal or (self.console.is_jupyter and _has_ipywidgets()):
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]Epoch {task.completed}/{task.total}"),
                BarColumn(),
                TimeElapsedColumn(),
                TextColumn("<"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}"),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=total, completed=first, metrics="")
        else:
            self.console.print(f"Training for {total} epochs (starting at epoch {first + 1}).")

    def on_epoch_metrics(self, trainer, pl_module, row: dict) -> None:
        """Called by the training plan once an epoch's metrics are final."""
        if not trainer.is_global_zero:
            return
        done = row["epoch"] + 1
        text = _format_metrics(row)
        if self._progress is not None:
            self._progress.update(self._task, completed=done, metrics=text)
        elif done % self._every == 0 or done == trainer.max_epochs:
            elapsed = time.perf_counter() - self._start
            # epochs run in this call so far; a resumed run starts at ``first``
            left = elapsed / max(done - self._first, 1) * (trainer.max_epochs - done)
            self.console.print(
                f"Epoch {done}/{trainer.max_epochs}  {_clock(elapsed)} (~{_clock(left)} left)"
                f"  {text}"
            )

    def _close(self):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def on_train_end(self, trainer, pl_module):
        self._close()

    def on_exception(self, trainer, pl_module, exception):
        self._close()
