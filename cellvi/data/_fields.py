"""Fields: one registered piece of an AnnData (a layer, an obs column, a set of columns).

A field validates its piece, writes what models read (integer codes, copies) onto the AnnData
and returns a *state*: plain JSON-like data that is saved with the model and lets the same
encoding be replayed on new data (:meth:`BaseField.transfer_field`).
"""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import CELLVI_PREFIX, REGISTRY_KEYS
from ..errors import (
    CellviWarning,
    InvalidDataError,
    MissingKeyError,
    SetupError,
    SmallCategoryWarning,
)
from ._backed import as_row_source, is_on_disk
from ._checks import check_count_matrix, check_nonempty_rows, check_var_names, plain
from ._checks import sorted_values as _sorted
from ._collection import missing_column_error as _missing_column
from ._view import state_table

__all__ = [
    "BaseField",
    "LayerField",
    "CategoricalObsField",
    "LabelsWithUnlabeledObsField",
    "MIN_CELLS_PER_CATEGORY",
]

MIN_CELLS_PER_CATEGORY = 3
_STACK = 6  # warnings point past field -> manager -> setup_anndata to the user's line


class BaseField:
    """One registered piece of an AnnData.

    Attributes
    ----------
    registry_key : str
        Name of the data in the registry and in minibatches (``"X"``, ``"batch"``, ...).
    attr_name, attr_key : str, str or None
        Where the registered data live: ``adata.<attr_name>[<attr_key>]``.
    is_empty : bool
        ``True`` for an optional field given ``None``: no data, absent from minibatches.
    """

    registry_key: str
    attr_name: str = "obs"
    attr_key: str | None = None

    @property
    def is_empty(self) -> bool:
        return False

    def data_registry(self) -> dict:
        """``{"attr_name", "attr_key"}``, or ``{}`` for an empty field."""
        return {} if self.is_empty else {"attr_name": self.attr_name, "attr_key": self.attr_key}

    def validate_field(self, adata) -> None:
        """Raise a clear error if ``adata`` lacks what this field needs."""

    def register_field(self, adata) -> dict:
        """Validate ``adata``, write what the field stores on it and return the state."""
        self.validate_field(adata)
        return {}

    def transfer_field(self, state: dict, adata_target) -> dict:
        """Register ``adata_target`` following a source ``state`` (same encodings)."""
        return self.register_field(adata_target)

    def get_field_data(self, adata):
        """The registered data of this field on ``adata``."""
        return getattr(adata, self.attr_name)[self.attr_key]

    def get_summary_stats(self, state: dict) -> dict:
        """Summary statistics (``n_*``) this field contributes."""
        return {}

    def view_state_registry(self, state: dict):
        """A rich table describing ``state``, or ``None``."""
        return None


class LayerField(BaseField):
    """The count matrix: ``adata.X`` (``layer=None``) or ``adata.layers[layer]``.

    Parameters
    ----------
    registry_key
        Registry key, normally ``"X"``.
    layer
        Layer holding the matrix; ``None`` means ``adata.X``.
    is_count_data
        Default ``True``: check the whole matrix for raw counts at registration
        (see :func:`~cellvi.data.check_count_matrix`).
    allow_empty_rows
        Default ``False``; ``True`` accepts zero-count cells (with size factors registered).

    Examples
    --------
    >>> import anndata, numpy as np
    >>> adata = anndata.AnnData(np.ones((4, 3), dtype=np.float32))
    >>> LayerField("X", None).register_field(adata)["n_vars"]
    3
    """

    def __init__(
        self,
        registry_key: str,
        layer: str | None,
        is_count_data: bool = True,
        *,
        allow_empty_rows: bool = False,
    ):
        self.registry_key, self.layer, self.is_count_data = registry_key, layer, is_count_data
        self.allow_empty_rows = allow_empty_rows
        self.attr_name = "X" if layer is None else "layers"
        self.attr_key = layer

    @property
    def location(self) -> str:
        return "adata.X" if self.layer is None else f"adata.layers[{self.layer!r}]"

    def get_field_data(self, adata):
        return adata.X if self.layer is None else adata.layers[self.layer]

    def validate_field(self, adata) -> int:
        """Check the matrix; returns how many values are not whole numbers."""
        if self.layer is not None and self.layer not in adata.layers:
            collection = "cellvi_collection" in getattr(adata, "uns", {})
            hint = (
                " A collection from read_collection(..., layer=) holds that layer's counts in X:"
                " set it up with layer=None."
                if collection
                else ""
            )
            raise MissingKeyError(
                f"layer {self.layer!r} not found. Available layers: {list(adata.layers.keys())}"
                f" (or layer=None for adata.X).{hint}"
            )
        if self.get_field_data(adata) is None:
            raise InvalidDataError(f"{self.location} is empty; put the counts there first.")
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise InvalidDataError(
                f"{self.location} has shape {tuple(adata.shape)}: cellvi needs at least one cell "
                "and one gene. Check the filtering or subsetting that produced this AnnData."
            )
        check_var_names(adata.var_names)
        matrix = self.get_field_data(adata)
        if is_on_disk(matrix):
            matrix = as_row_source(matrix, self.location)  # dense/CSC on disk: refused now
        if not self.is_count_data:
            return 0
        parts = getattr(matrix, "parts_for_checks", None)
        check = partial(check_count_matrix, allow_empty_rows=self.allow_empty_rows)
        if parts is None:
            return check(matrix, self.location)
        n_non_integer = sum(check(part, where) for part, where in parts(self.location))
        maps = getattr(matrix, "column_maps", None) or []
        if not self.allow_empty_rows and any(m is not None for m in maps):  # joined genes
            check_nonempty_rows(matrix.row_sums(), self.location)
        return n_non_integer

    def _prepare(self, adata) -> None:
        matrix = self.get_field_data(adata)
        if isinstance(matrix, np.ndarray) and not matrix.flags.c_contiguous:
            matrix = np.ascontiguousarray(matrix)  # row slicing of minibatches needs C order
            if self.layer is None:
                adata.X = matrix
            else:
                adata.layers[self.layer] = matrix
        elif sparse.issparse(matrix) and matrix.format != "csr":
            warnings.warn(
                f"{self.location} is a sparse {matrix.format.upper()} matrix; CSR trains faster "
                f"({self.location} = {self.location}.tocsr()).",
                CellviWarning,
                stacklevel=_STACK,
            )

    def register_field(self, adata) -> dict:
        n_non_integer = self.validate_field(adata)
        self._prepare(adata)
        return {
            "n_obs": int(adata.n_obs),
            "n_vars": int(adata.n_vars),
            "column_names": [str(v) for v in adata.var_names],
            "n_non_integer": int(n_non_integer),
        }

    def transfer_field(self, state, adata_target, *, check_var_names: str = "error") -> dict:
        expected = state["n_vars"]
        fix = "Align the genes with cellvi.model.SCVI.prepare_query_anndata(adata, reference)."
        if adata_target.n_vars != expected:
            raise SetupError(
                f"The data have {adata_target.n_vars} genes but the model expects {expected}. {fix}"
            )
        source = np.asarray(state["column_names"], dtype=object)
        target = np.asarray([str(v) for v in adata_target.var_names], dtype=object)
        differ = np.flatnonzero(source != target)
        if differ.size:
            shown = ", ".join(
                f"position {i}: {target[i]!r} instead of {source[i]!r}" for i in differ[:3]
            )
            message = (
                f"{differ.size} of {expected} gene names differ from the model's (in name or "
                f"order), e.g. {shown}. {fix}"
            )
            if check_var_names == "error":
                raise SetupError(message + " (check_var_names='warn' only warns.)")
            warnings.warn(message, CellviWarning, stacklevel=_STACK)
        return self.register_field(adata_target)

    def get_summary_stats(self, state):
        return {"n_cells": state["n_obs"], "n_vars": state["n_vars"]}


class CategoricalObsField(BaseField):
    """An obs column encoded as integer codes in ``obs['_cellvi_<registry_key>']``.

    Categories follow the column's own categorical order (unused ones dropped), otherwise its
    sorted unique values; position in ``categorical_mapping`` = code.

    Parameters
    ----------
    registry_key
        Registry key (``"batch"``, ``"labels"``).
    obs_key
        Column of ``adata.obs``; ``None`` registers one category ``"0"`` so the data exist.

    Examples
    --------
    >>> import anndata, numpy as np, pandas as pd
    >>> obs = pd.DataFrame({"b": list("yxyxyx")}, index=list("abcdef"))
    >>> adata = anndata.AnnData(np.ones((6, 2)), obs=obs)
    >>> CategoricalObsField("batch", "b").register_field(adata)["categorical_mapping"]
    ['x', 'y']
    >>> adata.obs["_cellvi_batch"].tolist()
    [1, 0, 1, 0, 1, 0]
    """

    def __init__(self, registry_key: str, obs_key: str | None):
        self.registry_key, self.obs_key = registry_key, obs_key
        self.attr_name = "obs"
        self.attr_key = f"{CELLVI_PREFIX}{registry_key}"

    def get_field_data(self, adata) -> np.ndarray:
        return adata.obs[self.attr_key].to_numpy(dtype=np.int64).reshape(-1, 1)  # (cells, 1)

    def validate_field(self, adata) -> None:
        self._column(adata)

    def _column(self, adata) -> pd.Series:
        if self.obs_key is None:
            return pd.Series(pd.Categorical(["0"] * adata.n_obs), index=adata.obs_names)
        if self.obs_key not in adata.obs:
            raise _missing_column(adata, self.obs_key)
        column = adata.obs[self.obs_key]
        n_missing = int(column.isna().sum())
        if n_missing:
            raise InvalidDataError(
                f"obs column {self.obs_key!r} has {n_missing} missing value(s) (NaN) out of "
                f"{adata.n_obs} cells. Fill them (e.g. adata.obs[{self.obs_key!r}] = "
                f"adata.obs[{self.obs_key!r}].astype(object).fillna('unknown')) or drop those "
                "cells."
            )
        values = column.cat.categories if hasattr(column, "cat") else column.unique()
        odd = next((v for v in values if not isinstance(plain(v), str | int | float)), None)
        if odd is not None:  # the categories are saved with the model as plain JSON-like data
            raise InvalidDataError(
                f"obs column {self.obs_key!r} holds {type(odd).__name__} values such as {odd!r}; "
                "categories must be text or numbers. Convert the column, e.g. "
                f"adata.obs[{self.obs_key!r}] = adata.obs[{self.obs_key!r}].astype(str)."
            )
        return column

    @staticmethod
    def _categories(column: pd.Series) -> list:
        if isinstance(column.dtype, pd.CategoricalDtype):
            used = set(column.unique())
            return [plain(c) for c in column.cat.categories if c in used]
        return [plain(c) for c in _sorted(column.unique())]

    def _encode(self, adata, column: pd.Series, mapping: list) -> None:
        codes = pd.Categorical(np.asarray(column, dtype=object), categories=mapping).codes
        adata.obs[self.attr_key] = codes.astype(np.int64)

    def _warn_small(self, column: pd.Series, skip=()) -> None:
        counts = column.value_counts()
        small = counts[(counts > 0) & (counts < MIN_CELLS_PER_CATEGORY)]
        small = small[[c not in skip for c in small.index]]
        if len(small) and self.obs_key is not None:
            shown = ", ".join(f"{plain(k)!r} ({v} cell{'s' * (v > 1)})" for k, v in small.items())
            warnings.warn(
                f"obs column {self.obs_key!r} has categories with fewer than "
                f"{MIN_CELLS_PER_CATEGORY} cells: {shown}; training may suffer (merge or drop "
                "them).",
                SmallCategoryWarning,
                stacklevel=_STACK,
            )

    def _state(self, mapping: list) -> dict:
        return {"categorical_mapping": mapping, "original_key": self.obs_key}

    def register_field(self, adata) -> dict:
        column = self._column(adata)
        mapping = self._categories(column)
        self._warn_small(column)
        self._encode(adata, column, mapping)
        return self._state(mapping)

    def _extended(self, mapping, column, extend_categories: bool, what: str) -> list:
        unseen = [c for c in self._categories(column) if c not in mapping]
        if unseen and self.registry_key == REGISTRY_KEYS.LABELS_KEY:
            # labels are never extended (persistence.md §3.2), also in query mapping
            raise InvalidDataError(
                f"labels column {self.obs_key!r} has label(s) the model has not seen: "
                f"{unseen[:5]}. Query mapping never adds labels; set those cells to one of the "
                f"model's labels ({list(mapping)[:5]}), or use SCANVI, whose unlabeled "
                "category marks novel cells."
            )
        as_text = {str(c): c for c in mapping}
        if retyped := [c for c in unseen if str(c) in as_text]:
            c = retyped[0]  # e.g. text "1" here, the number 1 in the model: not a new category
            raise InvalidDataError(
                f"{what} {self.obs_key!r} holds {c!r} ({type(c).__name__}) where the model has "
                f"{as_text[str(c)]!r} ({type(as_text[str(c)]).__name__}); convert the column to "
                f"the model's type, e.g. adata.obs[{self.obs_key!r}] = adata.obs[{self.obs_key!r}]"
                f".astype({type(as_text[str(c)]).__name__})."
            )
        if unseen and not extend_categories:
            raise InvalidDataError(
                f"{what} {self.obs_key!r} has {len(unseen)} value(s) the model has not seen: "
                f"{_shown(unseen)}. Map them onto known ones ({_shown(list(mapping))}), or "
                "add them to the model with "
                "Model.load_query_data(...), which uses extend_categories=True."
            )
        return list(mapping) + _sorted(unseen)

    def transfer_field(self, state, adata_target, *, extend_categories: bool = False) -> dict:
        column = self._column(adata_target)
        mapping = self._extended(
            state["categorical_mapping"], column, extend_categories, "obs column"
        )
        self._encode(adata_target, column, mapping)
        return self._state(mapping)

    def get_summary_stats(self, state):
        return {f"n_{self.registry_key}": len(state["categorical_mapping"])}

    def view_state_registry(self, state):
        rows = [
            [state["original_key"] if code == 0 else "", cat, code]
            for code, cat in enumerate(state["categorical_mapping"])
        ]
        title = f"{self.registry_key} State Registry"
        return state_table(title, ["Source Location", "Categories", "cellvi Encoding"], rows)


class LabelsWithUnlabeledObsField(CategoricalObsField):
    """Labels where one category marks unlabeled cells; it always gets the highest code.

    Parameters
    ----------
    registry_key
        Registry key, normally ``"labels"``.
    obs_key
        Column of ``adata.obs`` with the labels.
    unlabeled_category
        The value marking unlabeled cells. If present its slot is swapped with the last one
        (``[A, Unknown, B, C]`` → ``[A, C, B, Unknown]``), otherwise it is appended.

    Examples
    --------
    >>> import anndata, numpy as np, pandas as pd
    >>> labels = pd.Categorical(list("AUBC") * 3, categories=list("AUBC"))
    >>> obs = pd.DataFrame({"ct": labels}, index=[f"c{i}" for i in range(12)])
    >>> field = LabelsWithUnlabeledObsField("labels", "ct", "U")
    >>> field.register_field(anndata.AnnData(np.ones((12, 2)), obs=obs))["categorical_mapping"]
    ['A', 'C', 'B', 'U']
    """

    def __init__(self, registry_key: str, obs_key: str | None, unlabeled_category):
        super().__init__(registry_key, obs_key)
        if unlabeled_category is None or pd.isna(unlabeled_category):
            raise InvalidDataError(
                f"unlabeled_category={unlabeled_category!r}: it must be the label value that "
                "marks unlabeled cells, e.g. unlabeled_category='Unknown' (missing labels are "
                "not allowed; fill them with that value first)."
            )
        self.unlabeled_category = plain(unlabeled_category)

    def _state(self, mapping: list) -> dict:
        return {**super()._state(mapping), "unlabeled_category": self.unlabeled_category}

    def register_field(self, adata) -> dict:
        column = self._column(adata)
        mapping = self._categories(column)
        unlabeled = self.unlabeled_category
        same_text = [c for c in mapping if str(c) == str(unlabeled) and c != unlabeled]
        if unlabeled not in mapping and same_text:  # e.g. "-1" for the integer label -1
            raise InvalidDataError(
                f"unlabeled_category={unlabeled!r} ({type(unlabeled).__name__}) is not a value "
                f"of obs[{self.obs_key!r}], but {same_text[0]!r} "
                f"({type(same_text[0]).__name__}) is: pass unlabeled_category="
                f"{same_text[0]!r}, or those cells count as a class of their own."
            )
        if self.unlabeled_category in mapping:
            i = mapping.index(self.unlabeled_category)
            mapping[i], mapping[-1] = mapping[-1], mapping[i]
        else:
            mapping.append(self.unlabeled_category)
        self._warn_small(column, skip=(self.unlabeled_category,))
        self._encode(adata, column, mapping)
        return self._state(mapping)

    def transfer_field(self, state, adata_target, *, allow_missing_labels: bool = False) -> dict:
        """Encode the target's labels with the source codes.

        Unseen labels are an error (``data.md`` §1.3, also in query mapping: a label the
        reference never learned cannot be predicted or trained). With
        ``allow_missing_labels`` (query mapping) an absent column is filled with the
        unlabeled category, with a :class:`~cellvi.errors.CellviWarning`.
        """
        if self.obs_key is not None and self.obs_key not in adata_target.obs:
            if not allow_missing_labels:
                raise _missing_column(adata_target, self.obs_key, "labels column")
            warnings.warn(
                f"labels column {self.obs_key!r} is absent; all cells are marked "
                f"{self.unlabeled_category!r}.",
                CellviWarning,
                stacklevel=_STACK,
            )
            adata_target.obs[self.obs_key] = pd.Categorical(
                [self.unlabeled_category] * adata_target.n_obs
            )
        column = self._column(adata_target)
        mapping = list(state["categorical_mapping"])
        unseen = [c for c in self._categories(column) if c not in mapping]
        if unseen:
            n_cells = int(column.isin(unseen).sum())
            key, unlabeled = self.obs_key, self.unlabeled_category
            hint = (
                f", e.g. adata.obs[{key!r}] = adata.obs[{key!r}].astype(object).where("
                f"~adata.obs[{key!r}].isin({unseen!r}), {unlabeled!r})"
                if len(unseen) <= 5
                else ""
            )
            raise InvalidDataError(
                f"labels column {key!r} has labels the model has not seen: {unseen[:5]} "
                f"({n_cells} cell(s)). Mark novel cells with the unlabeled category "
                f"{unlabeled!r}{hint}."
            )
        self._encode(adata_target, column, mapping)
        return self._state(mapping)


def _shown(values: list, n: int = 8) -> str:
    """The first ``n`` values, and how many more there are."""
    head = ", ".join(repr(v) for v in values[:n])
    return f"[{head}" + (f", ... ({len(values) - n} more)]" if len(values) > n else "]")
