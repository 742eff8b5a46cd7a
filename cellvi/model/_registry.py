"""Bookkeeping between a model class and the AnnData objects set up for it."""

from __future__ import annotations

from typing import Any

from .._constants import CELLVI_PREFIX
from ..data import AnnDataManager
from ..errors import SetupError

__all__ = ["ManagerStore"]

_UUID_KEY = f"{CELLVI_PREFIX}uuid"


class ManagerStore:
    """The managers of one model class, keyed by the AnnData's cellvi UUID.

    ``setup_anndata`` puts a manager here; a model built on an AnnData looks it up, which is
    how ``SCVI(adata)`` knows how ``adata`` was registered.
    """

    def __init__(self, model_name: str):
        self.model_name = model_name
        self._managers: dict[str, AnnDataManager] = {}

    def add(self, manager: AnnDataManager) -> None:
        self._managers[manager.adata.uns[_UUID_KEY]] = manager

    def holds_another(self, adata: Any) -> bool:
        """Whether ``adata``'s cellvi UUID belongs to another object here (``adata`` is a copy
        or a view of data set up for this class)."""
        uuid = adata.uns.get(_UUID_KEY) if hasattr(adata, "uns") else None
        manager = self._managers.get(uuid) if uuid is not None else None
        return manager is not None and manager.adata is not adata

    def get(self, adata: Any, *, required: bool = True) -> AnnDataManager | None:
        uuid = adata.uns.get(_UUID_KEY) if hasattr(adata, "uns") else None
        manager = self._managers.get(uuid) if uuid is not None else None
        if manager is None:
            if not required:
                return None
            raise SetupError(
                f"This AnnData was not set up for {self.model_name}. Run "
                f"cellvi.model.{self.model_name}.setup_anndata(adata, ...) first."
            )
        if manager.adata is not adata:
            if not required:
                return None
            if getattr(adata, "is_view", False):
                raise SetupError(
                    f"This AnnData is a view of data set up for {self.model_name}; a model "
                    "needs an actual object. Copy it and set it up: adata = adata[idx].copy(); "
                    f"cellvi.model.{self.model_name}.setup_anndata(adata, ...)."
                )
            raise SetupError(
                f"This AnnData carries the cellvi id of data set up for {self.model_name}, but "
                "it is another object: it was probably copied after setup. Run "
                f"cellvi.model.{self.model_name}.setup_anndata on this object."
            )
        return manager


def _state(registry: dict, key: str) -> dict:
    return registry["field_registries"].get(key, {}).get("state_registry", {})


def _data_keys(registry: dict) -> set[str]:
    return {k for k, v in registry["field_registries"].items() if v.get("data_registry")}


def check_registry_compatible(model_registry: dict, data_registry: dict, what: str) -> None:
    """Raise if data registered elsewhere (a data module) does not fit a model's registry.

    Genes must match by name and order; batch and label categories must match in order
    (their integer codes index the model's embeddings and classifier).

    Raises
    ------
    SetupError
        Naming the first mismatch and what to do.
    """
    genes_model = list(_state(model_registry, "X").get("column_names", []))
    genes_data = list(_state(data_registry, "X").get("column_names", []))
    if genes_model != genes_data:
        if len(genes_model) != len(genes_data):
            detail = f"{len(genes_data)} genes, the model expects {len(genes_model)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(genes_model, genes_data)) if a != b)
            detail = f"gene {i} is {genes_data[i]!r}, the model expects {genes_model[i]!r}"
        raise SetupError(
            f"The gene set of {what} does not match the model's registry ({detail}). Build "
            "it over the model's genes, in the model's order (e.g. a var_value_filter selecting "
            "them)."
        )
    keys_model, keys_data = _data_keys(model_registry), _data_keys(data_registry)
    if keys_model != keys_data:
        raise SetupError(
            f"{what} registers {sorted(keys_data)} but the model was set up with "
            f"{sorted(keys_model)} (covariates or size factors differ); register the same "
            "fields for both."
        )
    for key, name in (("batch", "batch"), ("labels", "label")):
        cats_model = list(_state(model_registry, key).get("categorical_mapping", []))
        cats_data = list(_state(data_registry, key).get("categorical_mapping", []))
        if cats_model != cats_data:
            raise SetupError(
                f"The {name} categories of {what} {cats_data[:6]} differ from the model's "
                f"{cats_model[:6]}; codes would be misread. Use data with the same categories, "
                "or map new batches with load_query_data."
            )
