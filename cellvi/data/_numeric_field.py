"""A numeric ``obs`` column (continuous covariate or size factors), checked to be finite."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import InvalidDataError
from ._collection import missing_column_error
from ._fields import BaseField

__all__ = ["NumericalObsField"]


class NumericalObsField(BaseField):
    """A numeric obs column (e.g. size factors); finite, and > 0 if ``positive``.

    Parameters
    ----------
    registry_key
        Registry key, e.g. ``"size_factor"``.
    obs_key
        Column of ``adata.obs``; ``None`` gives an empty field (no data).
    positive
        Default ``False``. If ``True`` every value must be > 0.
    """

    def __init__(self, registry_key: str, obs_key: str | None, positive: bool = False):
        self.registry_key, self.obs_key, self.positive = registry_key, obs_key, positive
        self.attr_name, self.attr_key = "obs", obs_key

    @property
    def is_empty(self) -> bool:
        return self.obs_key is None

    def get_field_data(self, adata) -> np.ndarray:
        return adata.obs[self.obs_key].to_numpy(dtype=np.float64).reshape(-1, 1)  # (cells, 1)

    def validate_field(self, adata) -> None:
        if self.is_empty:
            return
        if self.obs_key not in adata.obs:
            raise missing_column_error(adata, self.obs_key)
        values = adata.obs[self.obs_key]
        # True/False flags are covariates of 1/0 (as scvi-tools reads them); never size factors
        flags = pd.api.types.is_bool_dtype(values)
        if not pd.api.types.is_numeric_dtype(values) or (flags and self.positive):
            what = "hold positive numbers (size factors)" if flags else "be numeric"
            raise InvalidDataError(
                f"obs column {self.obs_key!r} must {what}; it has dtype {values.dtype}."
            )
        values = values.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise InvalidDataError(
                f"obs column {self.obs_key!r} has {bad} NaN/infinite value(s); fill or drop "
                "those cells."
            )
        if self.positive and (n := int((values <= 0).sum())):
            raise InvalidDataError(
                f"obs column {self.obs_key!r} must be > 0 (size factors); {n} cell(s) are <= 0, "
                f"e.g. {list(adata.obs_names[values <= 0][:3])}. Recompute the size factors "
                "(e.g. each cell's total count / the median total) or drop those cells."
            )
        # minibatches carry float32: values beyond its range would become inf (or 0)
        with np.errstate(over="ignore", under="ignore"):
            single = values.astype(np.float32)
        lost = ~np.isfinite(single) | ((single == 0) & (values != 0))
        if n := int(lost.sum()):
            raise InvalidDataError(
                f"obs column {self.obs_key!r} has {n} value(s) outside the float32 range "
                f"(|x| up to {np.finfo(np.float32).max:.3g}, non-zero |x| from "
                f"{np.finfo(np.float32).tiny:.3g}), e.g. {values[lost][0]!r}; models read "
                "float32. Rescale the column (e.g. take its log)."
            )
