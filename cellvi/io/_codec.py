"""Plain-data codec: numpy arrays and DataFrames to JSON-like values and back."""

from __future__ import annotations

import math
from pathlib import PurePath

import numpy as np
import pandas as pd

__all__ = ["to_plain", "from_plain"]

_ARRAY, _FRAME, _FLOAT = "__ndarray__", "__dataframe__", "__float__"


def _float(value: float):
    """NaN/inf survive as tagged strings (JSON-safe)."""
    return value if math.isfinite(value) else {_FLOAT: repr(value)}


def to_plain(obj, _path: str = "root"):
    """Convert ``obj`` recursively into dict/list/str/int/float/bool/None.

    numpy arrays, numpy scalars, pandas DataFrames/Series/Index, tuples and paths are
    encoded so that :func:`from_plain` restores them; other types raise ``TypeError``.
    """
    if obj is None or isinstance(obj, bool | str | int):
        return obj
    if isinstance(obj, float):
        return _float(obj)
    if isinstance(obj, np.generic):
        return to_plain(obj.item(), _path)
    if isinstance(obj, np.ndarray):
        kind = "str" if obj.dtype.kind in "OUS" else str(obj.dtype)
        values = obj.astype(str) if kind == "str" else obj
        flat = [to_plain(v, _path) for v in values.ravel().tolist()]
        return {_ARRAY: flat, "dtype": kind, "shape": list(obj.shape)}
    if isinstance(obj, pd.DataFrame):
        return {
            _FRAME: {
                "columns": [to_plain(c, _path) for c in obj.columns],
                "index": to_plain(np.asarray(obj.index), _path),
                "index_name": obj.index.name,
                "data": {str(c): to_plain(obj[c].to_numpy(), _path) for c in obj.columns},
            }
        }
    if isinstance(obj, pd.Series | pd.Index):
        return to_plain(obj.to_numpy(), _path)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"{_path}: dictionary keys must be strings, got {key!r}.")
            out[key] = to_plain(value, f"{_path}.{key}")
        return out
    if isinstance(obj, list | tuple):
        return [to_plain(v, f"{_path}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"{_path}: cannot store a {type(obj).__name__} in a cellvi model file.")


def from_plain(obj):
    """Inverse of :func:`to_plain`."""
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _FLOAT in obj and len(obj) == 1:
        return float(obj[_FLOAT])
    if _ARRAY in obj and set(obj) == {_ARRAY, "dtype", "shape"}:
        values = [from_plain(v) for v in obj[_ARRAY]]
        dtype = str if obj["dtype"] == "str" else obj["dtype"]
        return np.asarray(values, dtype=dtype).reshape(obj["shape"])
    if _FRAME in obj and len(obj) == 1:
        spec = obj[_FRAME]
        index = pd.Index(from_plain(spec["index"]), name=spec["index_name"])
        columns = [from_plain(c) for c in spec["columns"]]
        data = {c: from_plain(spec["data"][str(c)]) for c in columns}
        return pd.DataFrame(data, index=index, columns=columns)
    return {k: from_plain(v) for k, v in obj.items()}
