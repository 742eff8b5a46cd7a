"""``train(log_save_dir=...)``: a run's history written to a versioned folder on disk."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

from ..errors import TrainingWarning
from ..train._callbacks import write_history_csv
from ._history import run_history

__all__ = ["check_log_save_dir", "save_history_log"]


def check_log_save_dir(log_save_dir) -> None:
    """Refuse, before training, a ``log_save_dir`` the history could not be written to."""
    if log_save_dir is None:
        return
    path = Path(log_save_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"log_save_dir={str(log_save_dir)!r} is a file; pass a directory (it is created "
            "if missing) for lightning_logs/version_<k>/history.pkl."
        )


def _next_version_dir(root: Path) -> Path:
    """``<root>/lightning_logs/version_<k>``, k the next free number from 1 (created here)."""
    logs = root / "lightning_logs"
    logs.mkdir(parents=True, exist_ok=True)
    taken = [
        int(m.group(1))
        for p in logs.iterdir()
        if (m := re.fullmatch(r"version_(\d+)", p.name)) is not None
    ]
    k = max(taken, default=0) + 1
    while True:
        path = logs / f"version_{k}"
        try:
            path.mkdir()  # atomic: a concurrent run takes another number
            return path
        except FileExistsError:
            k += 1


def save_history_log(log_save_dir, result) -> Path | None:
    """Write a run's history to ``<log_save_dir>/lightning_logs/version_<k>/``:
    ``history.pkl`` (``{metric: DataFrame}`` as in ``model.history``) and ``history.csv``.

    Rank 0 only. A write that fails warns instead of losing the trained model.
    """
    trainer = getattr(result, "trainer", None)
    if trainer is not None and not trainer.is_global_zero:
        return None
    history = run_history(result.history_rows, result.step_rows)
    try:
        folder = _next_version_dir(Path(log_save_dir))
        with open(folder / "history.pkl", "wb") as fh:
            pickle.dump(history, fh)
        write_history_csv(folder / "history.csv", result.history_rows)
    except OSError as err:
        warnings.warn(
            f"log_save_dir={str(log_save_dir)!r}: the history could not be written ({err}); "
            "it is still in model.history.",
            TrainingWarning,
            stacklevel=2,
        )
        return None
    return folder
