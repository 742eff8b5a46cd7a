"""One progress display per training run: a rich (or tqdm) bar on terminals, plain lines
otherwise."""

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

    On a terminal (or in Jupyter with ipywidgets) a single progress bar is drawn, rich's or,
    with ``style="tqdm"``, tqdm's; otherwise (cluster logs, Jupyter without ipywidgets, or
    ``style="plain"``) a plain line with the elapsed time and an estimate of the time left is
    printed about every tenth of the run, so logs stay short. Only rank 0 prints.

    Parameters
    ----------
    console
        A ``rich.console.Console`` (default: a new one on standard output).
    style
        ``"rich"``, ``"tqdm"`` or ``"plain"`` (default: ``cellvi.settings.progress_bar_style``,
        or ``"rich"`` when that is ``"none"``).
    """

    def __init__(self, console=None, style: str | None = None):
        super().__init__()
        if style is None:
            from .._settings import settings

            style = settings.progress_bar_style
            style = "rich" if style == "none" else style  # the callback exists: draw
        if style not in ("rich", "tqdm", "plain"):
            raise ValueError(f"style={style!r}: use 'rich', 'tqdm' or 'plain'.")
        self.style = style
        self._console = console
        self._progress = None
        self._task = None
        self._bar = None  # tqdm's
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
        live = self.console.is_terminal or (self.console.is_jupyter and _has_ipywidgets())
        if live and self.style == "tqdm":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=first, desc=f"Epoch {first}/{total}", dynamic_ncols=True
            )
        elif live and self.style == "rich":
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
            self.console.print(
                f"Training for {total} epochs (starting at epoch {first + 1}).", soft_wrap=True
            )

    def on_epoch_metrics(self, trainer, pl_module, row: dict) -> None:
        """Called by the training plan once an epoch's metrics are final."""
        if not trainer.is_global_zero:
            return
        done = row["epoch"] + 1
        text = _format_metrics(row)
        if self._progress is not None:
            self._progress.update(self._task, completed=done, metrics=text)
        elif self._bar is not None:
            self._bar.set_description(f"Epoch {done}/{trainer.max_epochs}", refresh=False)
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(done - self._bar.n)
        elif done % self._every == 0 or done == trainer.max_epochs:
            elapsed = time.perf_counter() - self._start
            # epochs run in this call so far; a resumed run starts at ``first``
            left = elapsed / max(done - self._first, 1) * (trainer.max_epochs - done)
            self.console.print(
                f"Epoch {done}/{trainer.max_epochs}  {_clock(elapsed)} (~{_clock(left)} left)"
                f"  {text}",
                soft_wrap=True,  # one line each in a log file, however long
            )

    def _close(self):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_train_end(self, trainer, pl_module):
        self._close()

    def on_exception(self, trainer, pl_module, exception):
        self._close()
