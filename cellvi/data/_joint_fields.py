"""Fields spanning several obs columns, and matrices in ``adata.obsm``."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .._constants import CELLVI_PREFIX
from ..errors import MissingKeyError, SetupError
from ._checks import check_count_matrix, plain
from ._fields import BaseField, CategoricalObsField
from ._numeric_field import NumericalObsField
from ._view import state_table

__all__ = ["CategoricalJointObsField", "NumericalJointObsField", "ObsmField"]


def _check_unique(obs_keys: list) -> None:
    dup = sorted({k for k in obs_keys if obs_keys.count(k) > 1}, key=str)
    if dup:
        raise SetupError(f"obs columns are listed more than once: {dup}; list each once.")


def _key_list(obs_keys) -> list[str]:
    """Column names as a list; a lone string is one column (not a list of its letters)."""
    if not obs_keys:
        return []
    if isinstance(obs_keys, str):
        return [obs_keys]
    return list(obs_keys)


class CategoricalJointObsField(BaseField):
    """Several categorical obs columns, codes in ``obsm['_cellvi_<registry_key>']``.

    Parameters
    ----------
    registry_key
        Registry key, normally ``"extra_categorical_covs"``.
    obs_keys
        Columns of ``adata.obs``; ``None`` or ``[]`` gives an empty field.
    """

    def __init__(self, registry_key: str, obs_keys: list[str] | None):
        self.registry_key = registry_key
        self.obs_keys = _key_list(obs_keys)
        _check_unique(self.obs_keys)
        self.attr_name, self.attr_key = "obsm", f"{CELLVI_PREFIX}{registry_key}"

    @property
    def is_empty(self) -> bool:
        return not self.obs_keys

    def _fields(self) -> dict[str, CategoricalObsField]:
        return {k: CategoricalObsField(f"{self.registry_key}_{k}", k) for k in self.obs_keys}

    def validate_field(self, adata) -> None:
        for field in self._fields().values():
            field.validate_field(adata)

    def _store(self, adata, columns: dict, mappings: dict) -> None:
        frame = pd.DataFrame(index=adata.obs_names)
        for key, mapping in mappings.items():
            codes = pd.Categorical(np.asarray(columns[key], dtype=object), categories=mapping)
            frame[key] = codes.codes.astype(np.int64)
        adata.obsm[self.attr_key] = frame

    def _state(self, mappings: dict) -> dict:
        return {
            "mappings": mappings,
            "field_keys": list(self.obs_keys),
            "n_cats_per_key": [len(m) for m in mappings.values()],
        }

    def register_field(self, adata) -> dict:
        columns = {k: f._column(adata) for k, f in self._fields().items()}
        mappings = {}
        for key, field in self._fields().items():
            field._warn_small(columns[key])
            mappings[key] = field._categories(columns[key])
        if not self.is_empty:
            self._store(adata, columns, mappings)
        return self._state(mappings)

    def transfer_field(self, state, adata_target, *, extend_categories: bool = False) -> dict:
        fields = self._fields()
        columns = {k: f._column(adata_target) for k, f in fields.items()}
        mappings = {
            key: field._extended(
                state["mappings"][key], columns[key], extend_categories, "covariate column"
            )
            for key, field in fields.items()
        }
        if not self.is_empty:
            self._store(adata_target, columns, mappings)
        return self._state(mappings)

    def get_summary_stats(self, state):
        return {f"n_{self.registry_key}": len(self.obs_keys)}

    def view_state_registry(self, state):
        if self.is_empty:
            return None
        rows = [
            [key if code == 0 else "", cat, code]
            for key, mapping in state["mappings"].items()
            for code, cat in enumerate(mapping)
        ]
        title = f"{self.registry_key} State Registry"
        return state_table(title, ["Source Location", "Categories", "cellvi Encoding"], rows)


class NumericalJointObsField(BaseField):
    """Several numeric obs columns copied (float32) into ``obsm['_cellvi_<registry_key>']``.

    Parameters
    ----------
    registry_key
        Registry key, normally ``"extra_continuous_covs"``.
    obs_keys
        Columns of ``adata.obs`` (each numeric and finite); ``None`` or ``[]``: empty field.
    """

    def __init__(self, registry_key: str, obs_keys: list[str] | None):
        self.registry_key = registry_key
        self.obs_keys = _key_list(obs_keys)
        _check_unique(self.obs_keys)
        self.attr_name, self.attr_key = "obsm", f"{CELLVI_PREFIX}{registry_key}"

    @property
    def is_empty(self) -> bool:
        return not self.obs_keys

    def validate_field(self, adata) -> None:
        for key in self.obs_keys:
            NumericalObsField(self.registry_key, key).validate_field(adata)

    def register_field(self, adata) -> dict:
        self.validate_field(adata)
        if not self.is_empty:
            adata.obsm[self.attr_key] = adata.obs[self.obs_keys].astype(np.float32).copy()
        return {"columns": list(self.obs_keys)}

    def get_summary_stats(self, state):
        return {f"n_{self.registry_key}": len(self.obs_keys)}

    def view_state_registry(self, state):
        if self.is_empty:
            return None
        title = f"{self.registry_key} State Registry"
        return state_table(title, ["Source Location"], [[c] for c in state["columns"]])


class ObsmField(BaseField):
    """A matrix in ``adata.obsm[obsm_key]`` (e.g. protein counts).

    Parameters
    ----------
    registry_key
        Registry key, e.g. ``"proteins"``.
    obsm_key
        Key of ``adata.obsm``.
    is_count_data
        Default ``False``. If ``True``, run the count checks on the matrix.
    column_names_uns_key
        Key of ``adata.uns`` with the column names; default: DataFrame columns, else 0..k-1.
    """

    def __init__(
        self,
        registry_key: str,
        obsm_key: str,
        is_count_data: bool = False,
        column_names_uns_key: str | None = None,
    ):
        self.registry_key, self.obsm_key = registry_key, obsm_key
        self.is_count_data, self.column_names_uns_key = is_count_data, column_names_uns_key
        self.attr_name, self.attr_key = "obsm", obsm_key

    def validate_field(self, adata) -> None:
        if self.obsm_key not in adata.obsm:
            raise MissingKeyError(
                f"obsm key {self.obsm_key!r} not found; available: {list(adata.obsm.keys())}."
            )
        if self.column_names_uns_key is not None and self.column_names_uns_key not in adata.uns:
            raise MissingKeyError(
                f"uns key {self.column_names_uns_key!r} (column names of "
                f"adata.obsm[{self.obsm_key!r}]) not found; available: {list(adata.uns.keys())}."
            )
        if self.is_count_data:
            check_count_matrix(adata.obsm[self.obsm_key], f"adata.obsm[{self.obsm_key!r}]")

    def register_field(self, adata) -> dict:
        self.validate_field(adata)
        value = adata.obsm[self.obsm_key]
        if self.column_names_uns_key is not None:
            names = list(adata.uns[self.column_names_uns_key])
        elif isinstance(value, pd.DataFrame):
            names = list(value.columns)
        else:
            names = list(range(value.shape[1]))
        return {"column_names": [plain(n) for n in names]}

    def transfer_field(self, state, adata_target) -> dict:
        new = self.register_field(adata_target)
        expected, received = state["column_names"], new["column_names"]
        if received != expected:
            raise SetupError(
                f"adata.obsm[{self.obsm_key!r}] has columns {received[:5]} "
                f"({len(received)} in all) but the model expects {expected[:5]} "
                f"({len(expected)} in all), in the same order."
            )
        return new

    def get_summary_stats(self, state):
        return {f"n_{self.registry_key}": len(state["column_names"])}
