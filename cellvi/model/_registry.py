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
            raise SetupError(
                f"This AnnData carries the cellvi id of data set up for {self.model_name}, but "
                "it is another object: it was probably copied after setup. Run "
                f"cellvi.model.{self.model_name}.setup_anndata on this object."
            )
        return manager
