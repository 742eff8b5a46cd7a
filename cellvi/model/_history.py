"""Training history: per-metric DataFrames built from per-epoch rows, joined across runs."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

__all__ = ["history_from_rows", "append_history", "run_history"]


def history_from_rows(rows: Sequence[dict], *, first_epoch: int = 0) -> dict[str, pd.DataFrame]:
    """Per-metric DataFrames (index ``epoch``) from per-epoch rows."""
    out: dict[str, pd.DataFrame] = {}
    names = sorted({k for r in rows for k in r} - {"epoch"})
    for name in names:
        epochs = [first_epoch + r["epoch"] for r in rows if name in r]
        values = [r[name] for r in rows if name in r]
        frame = pd.DataFrame({name: values}, index=pd.Index(epochs, name="epoch"))
        out[name] = frame
    return out


def run_history(history_rows: Sequence[dict], step_rows: Sequence[dict]) -> dict:
    """A run's history tables: the epoch rows, plus ``train_loss_step`` (index ``step``) when
    per-step losses were recorded."""
    new = history_from_rows(history_rows)
    if step_rows:
        steps = [r["step"] for r in step_rows]
        losses = [r["train_loss_step"] for r in step_rows]
        new["train_loss_step"] = pd.DataFrame(
            {"train_loss_step": losses}, index=pd.Index(steps, name="step")
        )
    return new


def append_history(
    old: dict[str, pd.DataFrame], new: dict[str, pd.DataFrame]
) -> dict[str, pd.DataFrame]:
    """Concatenate a later run's history after an earlier one; metrics new in either are kept."""
    if not old:
        return new
    offsets: dict[str, int] = {}  # per index kind: "epoch" metrics and "step" metrics
    for df in old.values():
        if len(df):
            kind = df.index.name or "epoch"
            offsets[kind] = max(offsets.get(kind, 0), 1 + int(df.index.max()))
    merged = dict(old)
    for name, frame in new.items():
        kind = frame.index.name or "epoch"
        shifted = frame.copy()
        shifted.index = pd.Index(shifted.index + offsets.get(kind, 0), name=kind)
        merged[name] = pd.concat([old[name], shifted]) if name in old else shifted
    return merged


def _without_last_rows(history: dict, n_epochs: int, n_steps: int) -> dict:
    """``history`` without its last ``n_epochs`` epochs and ``n_steps`` steps."""
    ends: dict[str, int] = {}
    for df in history.values():
        if len(df):
            kind = df.index.name or "epoch"
            ends[kind] = max(ends.get(kind, 0), 1 + int(df.index.max()))
    out = {}
    for name, df in history.items():
        kind = df.index.name or "epoch"
        kept = df[df.index < ends.get(kind, 0) - (n_steps if kind == "step" else n_epochs)]
        if len(kept):
            out[name] = kept
    return out
