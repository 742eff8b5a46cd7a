"""Input checks run at registration, over the whole matrix, before anything trains."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import sparse

from ..errors import CountsWarning, InvalidDataError

__all__ = ["check_count_matrix", "check_var_names", "CHUNK_ROWS"]

CHUNK_ROWS = 20_000

_FILTER_HINT = (
    "Remove them before setup, e.g. `adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0]"
    ".copy()` or `scanpy.pp.filter_cells(adata, min_counts=1)`."
)


def _row_chunks(matrix, n_rows: int):
    for start in range(0, n_rows, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, n_rows)
        yield start, matrix[start:stop]


def _chunk_stats(block) -> tuple[np.ndarray, int, int, int]:
    """(row totals, #negative, #non-finite, #non-integer) of one row block."""
    if sparse.issparse(block):
        block = block.tocsr() if not sparse.isspmatrix_csr(block) else block
        values = np.asarray(block.data)
        lengths = np.diff(block.indptr.astype(np.int64))
        rows = np.repeat(np.arange(block.shape[0], dtype=np.int64), lengths)
        finite = np.isfinite(values)
        totals = np.bincount(rows, weights=np.where(finite, values, 0), minlength=block.shape[0])
    else:
        values = np.asarray(block)
        finite = np.isfinite(values)
        totals = np.where(finite, values, 0).sum(axis=1, dtype=np.float64)
        values = values.ravel()
        finite = finite.ravel()
    n_nonfinite = int(values.size - finite.sum())
    good = values[finite]
    n_negative = int((good < 0).sum())
    if np.issubdtype(good.dtype, np.integer):
        n_nonint = 0
    else:
        n_nonint = int((good != np.round(good)).sum())
    return np.asarray(totals), n_negative, n_nonfinite, n_nonint


def check_count_matrix(matrix, location: str) -> None:
    """Check a count matrix entirely (chunked by rows) and explain any problem.

    Raises
    ------
    InvalidDataError
        Not 2-D numeric; negative values; NaN or infinite values; cells with zero counts.

    Warns
    -----
    CountsWarning
        Non-integer values (allowed, e.g. for corrected counts, but likely a mistake).
    """
    shape = getattr(matrix, "shape", None)
    dtype = getattr(matrix, "dtype", None)
    if shape is None or len(shape) != 2:
        raise InvalidDataError(
            f"{location} must be a 2-D matrix (cells x genes); got shape {shape}."
        )
    if dtype is None or not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
        raise InvalidDataError(
            f"{location} has dtype {dtype}; cellvi needs a numeric count matrix (e.g. float32 "
            "or int32). Convert it with `.astype(np.float32)`."
        )
    n_rows = shape[0]
    n_neg = n_nan = n_nonint = 0
    zero_cells = []
    for start, block in _row_chunks(matrix, n_rows):
        totals, neg, nan, nonint = _chunk_stats(block)
        n_neg, n_nan, n_nonint = n_neg + neg, n_nan + nan, n_nonint + nonint
        zero_cells.append(start + np.flatnonzero(totals == 0))
    if n_nan:
        raise InvalidDataError(
            f"{location} contains {n_nan} NaN or infinite values. Counts must be finite: pass "
            "the raw count matrix (e.g. layer='counts') instead of transformed values."
        )
    if n_neg:
        raise InvalidDataError(
            f"{location} contains {n_neg} negative values, so it is not a count matrix (it may "
            "be scaled or log-transformed). Pass raw counts, e.g. setup_anndata(adata, "
            "layer='counts')."
        )
    if n_nonint:
        warnings.warn(
            f"{location} contains {n_nonint} non-integer values; the count likelihoods expect "
            "raw integer counts. Ignore this if you pass corrected counts on purpose.",
            CountsWarning,
            stacklevel=4,
        )
    zeros = np.concatenate(zero_cells) if zero_cells else np.array([], dtype=np.int64)
    if zeros.size:
        raise InvalidDataError(
            f"{zeros.size} cell(s) in {location} have zero total counts (first positions: "
            f"{zeros[:5].tolist()}); their library size is log(0). {_FILTER_HINT}"
        )


def check_var_names(var_names: pd.Index) -> None:
    """Gene names must be unique (they identify genes when data are transferred)."""
    duplicated = var_names[var_names.duplicated()]
    if len(duplicated):
        raise InvalidDataError(
            f"adata.var_names has {len(duplicated)} duplicated name(s), e.g. "
            f"{list(duplicated.unique()[:5])}. Run `adata.var_names_make_unique()` first."
        )
