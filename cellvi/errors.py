"""Exception and warning classes of cellvi.

Every error raised for bad user input is a :class:`CellviError` that also derives from the
builtin class a user would expect (``ValueError``, ``KeyError``, ...), so ``except ValueError``
keeps working while ``except cellvi.errors.CellviError`` catches everything cellvi raises on
purpose.
"""

from __future__ import annotations

import numbers

__all__ = [
    "check_count",
    "CellviError",
    "InvalidDataError",
    "MissingKeyError",
    "SetupError",
    "TrainingError",
    "NonFiniteLossError",
    "ModelFileError",
    "CellviWarning",
    "CountsWarning",
    "SmallCategoryWarning",
    "TrainingWarning",
]


class CellviError(Exception):
    """Base class of every error cellvi raises on purpose."""


class InvalidDataError(CellviError, ValueError):
    """The data (counts, covariates, categories) cannot be used as given."""


class MissingKeyError(CellviError, KeyError):
    """A layer, obs column or other key named by the user does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class SetupError(CellviError, ValueError):
    """The AnnData was not set up, or set up in a way that conflicts with the model."""


class TrainingError(CellviError, RuntimeError):
    """Training stopped; the message says why, what was kept and how to resume."""


class NonFiniteLossError(TrainingError):
    """A loss or gradient became NaN or infinite during training."""


class ModelFileError(CellviError, ValueError):
    """A saved model file is missing, unsafe, corrupt or of an unknown format version."""


class CellviWarning(UserWarning):
    """Base class of cellvi's warnings."""


class CountsWarning(CellviWarning):
    """The registered matrix does not look like raw counts."""


class SmallCategoryWarning(CellviWarning):
    """A category has so few cells that training may suffer."""


class TrainingWarning(CellviWarning):
    """Something about the training configuration deserves attention."""


def check_count(value, name: str) -> int:
    """``value`` as a positive integer (a count: epochs, cells, samples), else a ``TypeError``
    or ``ValueError`` naming the argument ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be a positive integer.")
    if value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    return int(value)
