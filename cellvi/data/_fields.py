"""Fields: one registered piece of an AnnData (a layer, an obs column, a set of columns)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .._constants import CELLVI_PREFIX
from ..errors import (
    CellviWarning,
    InvalidDataError,
    MissingKeyError,
    SetupError,
    SmallCategoryWarning,
)
from ._checks import check_count_matrix, check_var_names

__all__ = [
    "BaseField",
    "LayerField",
    "CategoricalObsField",
    "LabelsWithUnlabeledObsField",
    "NumericalObsField",
    "CategoricalJointObsField",
    "NumericalJointObsField",
    "ObsmField",
]

MIN_CELLS_PER_CATEGORY = 3


def _plain(value):
    """Python scalar of a numpy/pandas scalar (registries are JSON-like)."""
    return value.item() if hasattr(value, "item") else value


def _missing_column(adata, key: str, what: str = "obs column") -> MissingKeyError:
    cols = list(adata.obs.columns)
    shown = cols[:15] + (["..."] if len(cols) > 15 else [])
    return MissingKeyError(f"{what} {key!r} not found in adata.obs. Available columns: {shown}.")


class BaseField:
    """One registered piece of an AnnData.

    Attributes
    ----------
    registry_key
        Name of the tensor in a minibatch (``"X"``, ``"batch"``, ...).
    attr_name, attr_key
        Where the registered data live (``adata.<attr_name>[<attr_key>]``).
    """

    registry_key: str
    attr_name: str = "obs"
    attr_key: str | None = None

    @property
    def is_empty(self) -> bool:
        return False

    def data_registry(self) -> dict:
        if self.is_empty:
            return {}
        return {"attr_name": self.attr_name, "attr_key": self.attr_key}

    def validate_field(self, adata) -> None:
        """Raise a clear error if ``adata`` lacks what this field needs."""

    def register_field(self, adata) -> dict:
        """Validate, write what the field stores on ``adata``, return its state."""
        raise NotImplementedError

    def transfer_field(self, state: dict, adata_target, **kwargs) -> dict:
        """Register ``adata_target`` following a source state (same encodings)."""
        return self.register_field(adata_target)

    def get_summary_stats(self, state: dict) -> dict:
        return {}

    def view_state_registry(self, state: dict):
        return None


class LayerField(BaseField):
    """The count matrix: ``adata.X`` (``layer=None``) or ``adata.layers[layer]``."""

    def __init__(self, registry_key: str, layer: str | None, is_count_data: bool = True):
        self.registry_key, self.layer, self.is_count_data = registry_key, layer, is_count_data
        self.attr_name = "X" if layer is None else "layers"
        self.attr_key = layer

    @property
    def location(self) -> str:
        return "adata.X" if self.layer is None else f"adata.layers[{self.layer!r}]"

    def get(self, adata):
        return adata.X if self.layer is None else adata.layers[self.layer]

    def validate_field(self, adata) -> None:
        if self.layer is not None and self.layer not in adata.layers:
            raise MissingKeyError(
                f"layer {self.layer!r} not found. Available layers: {list(adata.layers.keys())}"
                " (or layer=None for adata.X)."
            )
        if self.get(adata) is None:
            raise InvalidDataError(f"{self.location} is empty; put the counts there first.")
        check_var_names(adata.var_names)
        if self.is_count_data:
            check_count_matrix(self.get(adata), self.location)

    def register_field(self, adata) -> dict:
        self.validate_field(adata)
        return {
            "n_obs": int(adata.n_obs),
            "n_vars": int(adata.n_vars),
            "column_names": [str(v) for v in adata.var_names],
        }

    def transfer_field(self, state, adata_target, check_var_names: str = "error", **kwargs):
        expected = state["n_vars"]
        if adata_target.n_vars != expected:
            raise SetupError(
                f"The data have {adata_target.n_vars} genes but the model expects {expected}. "
                "Align them first: cellvi.model.SCVI.prepare_query_anndata(adata, reference)."
            )
        source = np.asarray(state["column_names"])
        target = np.asarray([str(v) for v in adata_target.var_names])
        differ = np.flatnonzero(source != target)
        if differ.size:
            message = (
                f"{differ.size} of {expected} gene names differ from the model's (in name or "
                f"order), e.g. position {int(differ[0])}: {target[differ[0]]!r} instead of "
                f"{source[differ[0]]!r}. Reorder/pad the genes with "
                "cellvi.model.SCVI.prepare_query_anndata(adata, reference)."
            )
            if check_var_names == "error":
                raise SetupError(message + " (check_var_names='warn' only warns.)")
            warnings.warn(message, CellviWarning, stacklevel=6)
        return self.register_field(adata_target)

    def get_summary_stats(self, state):
        return {"n_cells": state["n_obs"], "n_vars": state["n_vars"]}


class CategoricalObsField(BaseField):
    """An obs column encoded as integer codes in ``obs['_cellvi_<registry_key>']``.

    ``obs_key=None`` registers a single category so the tensor always exists.
    """

    def __init__(self, registry_key: str, obs_key: str | None):
        self.registry_key, self.obs_key = registry_key, obs_key
        self.attr_name = "obs"
        self.attr_key = f"{CELLVI_PREFIX}{registry_key}"

    def _column(self, adata) -> pd.Series:
        if self.obs_key is None:
            return pd.Series(pd.Categorical(["0"] * adata.n_obs), index=adata.obs_names)
        if self.obs_key not in adata.obs:
            raise _missing_column(adata, self.obs_key)
        column = adata.obs[self.obs_key]
        n_missing = int(column.isna().sum())
        if n_missing:
            raise InvalidDataError(
                f"obs column {self.obs_key!r} has {n_missing} missing value(s) (NaN). Fill them "
                f"(e.g. adata.obs[{self.obs_key!r}] = adata.obs[{self.obs_key!r}].cat."
                "add_categories('unknown').fillna('unknown')) or drop those cells."
            )
        return column

    def _categories(self, column: pd.Series) -> list:
        if isinstance(column.dtype, pd.CategoricalDtype):
            used = set(column.unique())
            return [_plain(c) for c in column.cat.categories if c in used]
        return [_plain(c) for c in sorted(column.unique())]

    def _encode(self, adata, column: pd.Series, mapping: list) -> None:
        codes = pd.Categorical(column, categories=mapping).codes.astype(np.int64)
        adata.obs[self.attr_key] = codes

    def _warn_small(self, column: pd.Series) -> None:
        counts = column.value_counts()
        small = counts[(counts > 0) & (counts < MIN_CELLS_PER_CATEGORY)]
        if len(small) and self.obs_key is not None:
            shown = ", ".join(f"{k!r} ({v} cells)" for k, v in small.items())
            warnings.warn(
                f"obs column {self.obs_key!r} has categories with fewer than "
                f"{MIN_CELLS_PER_CATEGORY} cells: {shown}; training may suffer.",
                SmallCategoryWarning,
                stacklevel=6,
            )

    def register_field(self, adata) -> dict:
        column = self._column(adata)
        mapping = self._categories(column)
        self._warn_small(column)
        self._encode(adata, column, mapping)
        return {"categorical_mapping": mapping, "original_key": self.obs_key}

    def transfer_field(self, state, adata_target, extend_categories: bool = False, **kwargs):
        column = self._column(adata_target)
        mapping = list(state["categorical_mapping"])
        unseen = [c for c in self._categories(column) if c not in mapping]
        if unseen:
            if not extend_categories:
                raise InvalidDataError(
                    f"obs column {self.obs_key!r} has categories the model has not seen: "
                    f"{unseen[:5]}. Map them onto known ones, or add them to the model with "
                    "Model.load_query_data(...) (extend_categories=True)."
                )
            mapping = mapping + sorted(unseen, key=str)
        self._encode(adata_target, column, mapping)
        return {"categorical_mapping": mapping, "original_key": self.obs_key}

    def get_summary_stats(self, state):
        return {f"n_{self.registry_key}": len(state["categorical_mapping"])}

    def view_state_registry(self, state):
        from rich.table import Table

        table = Table(title=f"{self.registry_key} state registry")
        table.add_column("source column")
        table.add_column("category")
        table.add_column("code")
        for code, cat in enumerate(state["categorical_mapping"]):
            table.add_row(str(state["original_key"]) if code == 0 else "", str(cat), str(code))
        return table


class LabelsWithUnlabeledObsField(CategoricalObsField):
    """Labels where one category marks unlabeled cells; it always gets the highest code."""

    def __init__(self, registry_key: str, obs_key: str | None, unlabeled_category):
        super().__init__(registry_key, obs_key)
        self.unlabeled_category = unlabeled_category

    def _with_unlabeled_last(self, mapping: list) -> list:
        mapping = list(mapping)
        if self.unlabeled_category in mapping:
            i = mapping.index(self.unlabeled_category)
            mapping[i], mapping[-1] = mapping[-1], mapping[i]
        else:
            mapping.append(_plain(self.unlabeled_category))
        return mapping

    def register_field(self, adata) -> dict:
        column = self._column(adata)
        mapping = self._with_unlabeled_last(self._categories(column))
        self._warn_small(column)
        self._encode(adata, column, mapping)
        return {
            "categorical_mapping": mapping,
            "original_key": self.obs_key,
            "unlabeled_category": _plain(self.unlabeled_category),
        }

    def transfer_field(self, state, adata_target, allow_missing_labels: bool = False, **kwargs):
        if self.obs_key is not None and self.obs_key not in adata_target.obs:
            if not allow_missing_labels:
                raise _missing_column(adata_target, self.obs_key, "labels column")
            warnings.warn(
                f"labels column {self.obs_key!r} is absent; all cells are marked "
                f"{self.unlabeled_category!r}.",
                CellviWarning,
                stacklevel=6,
            )
            adata_target.obs[self.obs_key] = pd.Categorical(
                [self.unlabeled_category] * adata_target.n_obs
            )
        column = self._column(adata_target)
        mapping = list(state["categorical_mapping"])
        unseen = [c for c in self._categories(column) if c not in mapping]
        if unseen and not allow_missing_labels:
            raise InvalidDataError(
                f"labels column {self.obs_key!r} has labels the model has not seen: "
                f"{unseen[:5]}. Mark novel cells with the unlabeled category "
                f"{self.unlabeled_category!r}."
            )
        if unseen:  # query mapping: novel labels cannot be learned, they count as unlabeled
            n_cells = int(column.isin(unseen).sum())
            warnings.warn(
                f"labels column {self.obs_key!r}: {n_cells} query cell(s) carry labels the "
                f"reference never saw ({unseen[:5]}); they are treated as "
                f"{self.unlabeled_category!r} (the column itself is not changed).",
                CellviWarning,
                stacklevel=6,
            )
            column = column.astype(object).where(~column.isin(unseen), self.unlabeled_category)
        self._encode(adata_target, column, mapping)
        return dict(state)


class NumericalObsField(BaseField):
    """A numeric obs column (e.g. size factors); must be finite (and > 0 if ``positive``)."""

    def __init__(self, registry_key: str, obs_key: str | None, positive: bool = False):
        self.registry_key, self.obs_key, self.positive = registry_key, obs_key, positive
        self.attr_name, self.attr_key = "obs", obs_key

    @property
    def is_empty(self) -> bool:
        return self.obs_key is None

    def register_field(self, adata) -> dict:
        if self.is_empty:
            return {}
        if self.obs_key not in adata.obs:
            raise _missing_column(adata, self.obs_key)
        values = adata.obs[self.obs_key]
        if not pd.api.types.is_numeric_dtype(values):
            raise InvalidDataError(
                f"obs column {self.obs_key!r} must be numeric; it has dtype {values.dtype}."
            )
        bad = int((~np.isfinite(values.to_numpy(dtype=float))).sum())
        if bad:
            raise InvalidDataError(
                f"obs column {self.obs_key!r} has {bad} NaN/infinite value(s); fill or drop them."
            )
        if self.positive and (n := int((values <= 0).sum())):
            raise InvalidDataError(
                f"obs column {self.obs_key!r} must be > 0 (size factors); {n} cell(s) are <= 0."
            )
        return {}


class CategoricalJointObsField(BaseField):
    """Several categorical obs columns, codes in ``obsm['_cellvi_<registry_key>']``."""

    def __init__(self, registry_key: str, obs_keys: list[str] | None):
        self.registry_key = registry_key
        self.obs_keys = list(obs_keys) if obs_keys else []
        self.attr_name, self.attr_key = "obsm", f"{CELLVI_PREFIX}{registry_key}"

    @property
    def is_empty(self) -> bool:
        return not self.obs_keys

    def _fields(self):
        return {k: CategoricalObsField(f"{self.registry_key}_{k}", k) for k in self.obs_keys}

    def _store(self, adata, mappings: dict) -> None:
        frame = pd.DataFrame(index=adata.obs_names)
        for key, mapping in mappings.items():
            frame[key] = pd.Categorical(adata.obs[key], categories=mapping).codes.astype(np.int64)
        adata.obsm[self.attr_key] = frame

    def _state(self, mappings: dict) -> dict:
        return {
            "mappings": mappings,
            "field_keys": list(self.obs_keys),
            "n_cats_per_key": [len(m) for m in mappings.values()],
        }

    def register_field(self, adata) -> dict:
        if self.is_empty:
            return self._state({})
        mappings = {}
        for key, field in self._fields().items():
            column = field._column(adata)
            field._warn_small(column)
            mappings[key] = field._categories(column)
        self._store(adata, mappings)
        return self._state(mappings)

    def transfer_field(self, state, adata_target, extend_categories: bool = False, **kwargs):
        if self.is_empty:
            return self._state({})
        mappings = {}
        for key, field in self._fields().items():
            column = field._column(adata_target)
            mapping = list(state["mappings"][key])
            unseen = [c for c in field._categories(column) if c not in mapping]
            if unseen and not extend_categories:
                raise InvalidDataError(
                    f"covariate column {key!r} has categories the model has not seen: "
                    f"{unseen[:5]}; use Model.load_query_data(...) to add them."
                )
            mappings[key] = mapping + sorted(unseen, key=str)
        self._store(adata_target, mappings)
        return self._state(mappings)

    def get_summary_stats(self, state):
        return {f"n_{self.registry_key}": len(self.obs_keys)}


class NumericalJointObsField(BaseField):
    """Several numeric obs columns copied into ``obsm['_cellvi_<registry_key>']``."""

    def __init__(self, registry_key: str, obs_keys: list[str] | None):
        self.registry_key = registry_key
        self.obs_keys = list(obs_keys) if obs_keys else []
        self.attr_name, self.attr_key = "obsm", f"{CELLVI_PREFIX}{registry_key}"

    @property
    def is_empty(self) -> bool:
        return not self.obs_keys

    def register_field(self, adata) -> dict:
        if self.is_empty:
            return {"columns": []}
        for key in self.obs_keys:
            NumericalObsField(self.registry_key, key).register_field(adata)
        adata.obsm[self.attr_key] = adata.obs[self.obs_keys].astype(np.float32).copy()
        return {"columns": list(self.obs_keys)}

    def get_summary_stats(self, state):
        return {f"n_{self.registry_key}": len(self.obs_keys)}


class ObsmField(BaseField):
    """A matrix in ``adata.obsm[obsm_key]`` (e.g. protein counts)."""

    def __init__(self, registry_key, obsm_key, is_count_data=False, column_names_uns_key=None):
        self.registry_key, self.obsm_key = registry_key, obsm_key
        self.is_count_data, self.column_names_uns_key = is_count_data, column_names_uns_key
        self.attr_name, self.attr_key = "obsm", obsm_key

    def register_field(self, adata) -> dict:
        if self.obsm_key not in adata.obsm:
            raise MissingKeyError(
                f"obsm key {self.obsm_key!r} not found; available: {list(adata.obsm.keys())}."
            )
        value = adata.obsm[self.obsm_key]
        if self.is_count_data:
            check_count_matrix(value, f"adata.obsm[{self.obsm_key!r}]")
        if self.column_names_uns_key is not None:
            names = list(adata.uns[self.column_names_uns_key])
        elif isinstance(value, pd.DataFrame):
            names = list(value.columns)
        else:
            names = list(range(value.shape[1]))
        return {"column_names": [_plain(n) for n in names]}

    def transfer_field(self, state, adata_target, **kwargs):
        new = self.register_field(adata_target)
        if new["column_names"] != state["column_names"]:
            raise SetupError(
                f"adata.obsm[{self.obsm_key!r}] columns differ from the model's "
                f"({len(new['column_names'])} vs {len(state['column_names'])})."
            )
        return new

    def get_summary_stats(self, state):
        return {f"n_{self.registry_key}": len(state["column_names"])}
