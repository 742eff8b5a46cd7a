"""Input checks run at registration, over the whole matrix, before anything trains.

The count check reads the matrix in row chunks (dense arrays, scipy sparse matrices, and
backed h5py/anndata datasets that support row slicing), so memory stays bounded and a bad value
in the last row is found as surely as one in the first.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
from scipy import sparse

from ..errors import CountsWarning, InvalidDataError

__all__ = [
    "check_count_matrix",
    "check_nonempty_rows",
    "check_var_names",
    "plain",
    "CHUNK_ROWS",
    "CHUNK_VALUES",
]

CHUNK_ROWS = 20_000  # rows per chunk of a sparse matrix
CHUNK_VALUES = 1 << 24  # values per chunk of a dense matrix (~64 MB of float32)
_STACK = 5  # check -> field -> manager -> setup_anndata -> user


def plain(value):
    """A JSON-compatible Python object from numpy/pandas scalars, arrays, tuples and dicts.

    Parameters
    ----------
    value
        Anything found in a registry or in setup arguments.

    Returns
    -------
    object
        ``value`` with numpy scalars turned into Python scalars, arrays/tuples/Index into
        lists and dict keys into ``str``; other objects unchanged.

    Examples
    --------
    >>> plain({"a": (np.int64(1), np.float32(0.5)), "b": np.array(["x"])})
    {'a': [1, 0.5], 'b': ['x']}
    """
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray | pd.Index):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def sorted_values(values) -> list:
    """``values`` sorted; mixed types (e.g. ``1`` and ``"a"``) are ordered by their text.

    Examples
    --------
    >>> sorted_values([2, "a", 1])
    [1, 2, 'a']
    """
    try:
        return sorted(values)
    except TypeError:  # mixed types (e.g. 1 and "a"): order by text
        return sorted(values, key=str)


def _chunks(matrix, n_rows: int, n_cols: int):
    """Yield ``(start, values, indptr)`` for sparse chunks or ``(start, block, None)``."""
    if sparse.issparse(matrix) and matrix.format != "csr":
        matrix = matrix.tocsr()  # CSC/COO: one conversion, then views (a warning says CSR)
    if sparse.issparse(matrix) and not matrix.has_canonical_format:
        matrix = matrix.copy()  # repeated (row, gene) entries are summed: check the sums
        matrix.sum_duplicates()
    if sparse.issparse(matrix):  # in memory: views of .data, no copies
        indptr = matrix.indptr
        for start in range(0, n_rows, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, n_rows)
            lo, hi = int(indptr[start]), int(indptr[stop])
            local = indptr[start : stop + 1].astype(np.int64) - lo
            yield start, np.asarray(matrix.data[lo:hi]), local
        return
    is_dense = isinstance(matrix, np.ndarray) or hasattr(matrix, "__array__")  # h5py too
    step = max(1, CHUNK_VALUES // max(n_cols, 1)) if is_dense else CHUNK_ROWS
    for start in range(0, n_rows, step):
        block = matrix[start : min(start + step, n_rows)]  # backed sparse → scipy, h5py → array
        if sparse.issparse(block):
            block = block.tocsr()
            yield start, np.asarray(block.data), block.indptr.astype(np.int64)
        else:
            yield start, np.asarray(block), None


def _chunk_stats(values: np.ndarray, indptr) -> tuple[np.ndarray, int, int, int]:
    """(empty-row mask, #negative, #non-finite, #non-integer) of one chunk."""
    if indptr is None:  # dense (rows, genes)
        empty = ~(values != 0).any(axis=1)
        values = values.ravel()
    else:  # CSR: count stored non-zeros per row with an exact integer cumulative sum
        nonzero = np.concatenate([[0], np.cumsum(values != 0, dtype=np.int64)])
        empty = (nonzero[indptr[1:]] - nonzero[indptr[:-1]]) == 0
    if values.dtype.kind in "biu":  # integers: always finite and whole
        n_negative = int((values < 0).sum()) if values.dtype.kind == "i" else 0
        return empty, n_negative, 0, 0
    finite = np.isfinite(values)
    n_nonfinite = int(values.size - np.count_nonzero(finite))
    good = values if n_nonfinite == 0 else values[finite]
    n_negative = int(np.count_nonzero(good < 0))
    n_nonint = int(np.count_nonzero(good != np.round(good)))
    return empty, n_negative, n_nonfinite, n_nonint


def check_count_matrix(matrix, location: str, *, allow_empty_rows: bool = False) -> int:
    """Check a count matrix entirely (chunked by rows) and explain any problem.

    Parameters
    ----------
    matrix
        Dense array, scipy sparse matrix, or a backed h5py/anndata dataset (row-sliceable).
    location
        How the user names the matrix in messages, e.g. ``"adata.layers['counts']"``.
    allow_empty_rows
        Default ``False``. ``True`` accepts cells with zero total counts: with registered size
        factors the library size is ``log(size factor)``, not ``log(total counts)``.

    Raises
    ------
    InvalidDataError
        If the matrix is not 2-D numeric, holds NaN or infinite values, negative values, or
        (unless ``allow_empty_rows``) has cells (rows) with zero total counts.

    Returns
    -------
    The number of values that are not whole numbers.

    Warns
    -----
    CountsWarning
        If some values are not whole numbers (allowed, e.g. for corrected counts, but the count
        likelihoods expect raw counts).

    Examples
    --------
    >>> check_count_matrix(np.array([[1, 0], [0, 2]]), "adata.X")
    0
    >>> check_count_matrix(np.array([[1, 0], [0, 0]]), "adata.X")
    Traceback (most recent call last):
    ...
    cellvi.errors.InvalidDataError: 1 cell(s) in adata.X have zero total counts ...
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
    if np.issubdtype(dtype, np.complexfloating):
        raise InvalidDataError(f"{location} has complex dtype {dtype}; counts must be real.")
    n_rows, n_cols = int(shape[0]), int(shape[1])
    n_neg = n_nan = n_nonint = 0
    empty_rows = []
    for start, values, indptr in _chunks(matrix, n_rows, n_cols):
        empty, neg, nan, nonint = _chunk_stats(values, indptr)
        n_neg, n_nan, n_nonint = n_neg + neg, n_nan + nan, n_nonint + nonint
        empty_rows.append(start + np.flatnonzero(empty))
    fix = "Pass the raw count matrix instead, e.g. setup_anndata(adata, layer='counts')."
    if n_nan:
        raise InvalidDataError(
            f"{location} contains {n_nan} NaN or infinite values; counts must be finite. {fix} "
            "(After anndata.concat(..., join='outer'), genes missing from a data set are NaN "
            "in a dense matrix: pass fill_value=0, or use join='inner'.)"
        )
    if n_neg:
        raise InvalidDataError(
            f"{location} contains {n_neg} negative values, so it is not a count matrix (it may "
            f"be scaled or centred). {fix}"
        )
    if n_nonint:
        warnings.warn(
            f"{location} contains {n_nonint} non-integer values; the count likelihoods expect "
            "raw integer counts (normalized or log-transformed data fit badly). Ignore this if "
            "you pass corrected counts on purpose; otherwise pass raw counts via layer=.",
            CountsWarning,
            stacklevel=_STACK,
        )
    if not allow_empty_rows:
        empty = np.concatenate(empty_rows) if empty_rows else np.array([], dtype=np.int64)
        _raise_empty(empty, location)
    return n_nonint


def check_nonempty_rows(totals: np.ndarray, location: str) -> None:
    """Every cell needs a positive total count (its library size enters as a log).

    Examples
    --------
    >>> check_nonempty_rows(np.array([3.0, 1.0]), "adata.X")
    """
    _raise_empty(np.flatnonzero(np.asarray(totals) <= 0), location)


def _raise_empty(empty: np.ndarray, location: str) -> None:
    if empty.size:
        # a matrix on disk is named with a note ("adata.X (f.h5ad [X])", "adata.X of f.h5ad
        # [X]"): the code hint needs the bare expression, and row_totals to read it by blocks
        expression = re.split(r" \(| of ", location, maxsplit=1)[0]
        on_disk = expression != location
        totals = (
            f"cellvi.data.row_totals({expression})"
            if on_disk
            else f"np.asarray({expression}.sum(axis=1)).ravel()"
        )
        raise InvalidDataError(
            f"{empty.size} cell(s) in {location} have zero total counts (first row positions: "
            f"{empty[:5].tolist()}); their library size is log(0). Remove them before setup, "
            f"e.g. `adata = adata[{totals} > 0].copy()` or "
            "`scanpy.pp.filter_cells(adata, min_counts=1)`, or register positive size factors "
            "with setup_anndata(..., size_factor_key=...), which replace the library size."
        )


def check_var_names(var_names: pd.Index) -> None:
    """Gene names must be unique: they identify genes when a setup is transferred.

    Parameters
    ----------
    var_names
        ``adata.var_names``.

    Raises
    ------
    InvalidDataError
        If some names occur more than once; the message names a few.

    Examples
    --------
    >>> check_var_names(pd.Index(["a", "b"]))
    """
    duplicated = var_names[var_names.duplicated()]
    if len(duplicated):
        raise InvalidDataError(
            f"adata.var_names has {len(duplicated)} duplicated name(s), e.g. "
            f"{list(duplicated.unique()[:5])}. Run `adata.var_names_make_unique()` first."
        )
