"""The AnnData manager: registers fields, keeps the registry, transfers setups."""

from __future__ import annotations

import uuid
import warnings

import numpy as np
from scipy import sparse

from .._constants import CELLVI_PREFIX
from ..errors import CellviWarning, SetupError
from ._fields import BaseField

__all__ = ["AnnDataManager", "SummaryStats"]

UUID_KEY = f"{CELLVI_PREFIX}uuid"
MANAGER_UUID_KEY = f"{CELLVI_PREFIX}manager_uuid"


class SummaryStats(dict):
    """A dict of summary statistics that also allows attribute access (``stats.n_batch``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(f"no summary statistic {name!r}; have {list(self)}") from err


class AnnDataManager:
    """Records how an AnnData is set up for a model, and re-applies it to new data.

    Parameters
    ----------
    fields
        The fields to register, in order.
    setup_method_args
        ``{"model_name", "setup_method_name", "setup_args"}`` of the setup call.

    Examples
    --------
    >>> import cellvi
    >>> from cellvi.data import AnnDataManager, CategoricalObsField, LayerField
    >>> adata = cellvi.data.simulate(n_cells=100, n_genes=30, seed=0)
    >>> manager = AnnDataManager(
    ...     [LayerField("X", None), CategoricalObsField("batch", "batch")],
    ...     {"model_name": "SCVI", "setup_method_name": "setup_anndata", "setup_args": {}},
    ... )
    >>> manager.register_fields(adata).summary_stats.n_batch
    2
    """

    def __init__(self, fields: list[BaseField], setup_method_args: dict):
        self.fields = list(fields)
        self.setup_method_args = dict(setup_method_args)
        self.adata = None
        self._registry: dict | None = None
        self._manager_uuid = str(uuid.uuid4())
        self._source_registry: dict | None = None
        self._transfer_kwargs: dict = {}

    # --------------------------------------------------------------- register
    def register_fields(self, adata, source_registry: dict | None = None, **transfer_kwargs):
        """Validate and register ``adata`` (following ``source_registry`` when given)."""
        if self.adata is not None:
            raise SetupError("This manager already holds data; use transfer_fields for new data.")
        if getattr(adata, "is_view", False):
            raise SetupError(
                "The AnnData is a view of another object; cellvi must add columns to it. Pass a "
                "copy: adata = adata[idx].copy()."
            )
        self._prepare_matrix(adata)
        field_registries = {}
        for field in self.fields:
            if source_registry is None:
                state = field.register_field(adata)
            else:
                source = source_registry["field_registries"][field.registry_key]["state_registry"]
                state = field.transfer_field(source, adata, **transfer_kwargs)
            field_registries[field.registry_key] = {
                "data_registry": field.data_registry(),
                "state_registry": state,
                "summary_stats": field.get_summary_stats(state),
            }
        if UUID_KEY not in adata.uns:
            adata.uns[UUID_KEY] = str(uuid.uuid4())
        adata.uns[MANAGER_UUID_KEY] = self._manager_uuid
        from .. import __version__

        self._registry = {
            "cellvi_version": __version__,
            "model_name": self.setup_method_args.get("model_name"),
            "setup_method_name": self.setup_method_args.get("setup_method_name"),
            "setup_args": dict(self.setup_method_args.get("setup_args", {})),
            UUID_KEY: adata.uns[UUID_KEY],
            "field_registries": field_registries,
        }
        self.adata = adata
        self._source_registry = source_registry
        self._transfer_kwargs = transfer_kwargs
        _ = self.summary_stats  # raises on duplicated statistic names
        return self

    @staticmethod
    def _prepare_matrix(adata) -> None:
        x = adata.X
        if isinstance(x, np.ndarray) and not x.flags.c_contiguous:
            adata.X = np.ascontiguousarray(x)
        elif sparse.issparse(x) and not sparse.isspmatrix_csr(x) and x.format != "csr":
            warnings.warn(
                f"adata.X is a sparse {x.format.upper()} matrix; CSR trains faster "
                "(adata.X = adata.X.tocsr()).",
                CellviWarning,
                stacklevel=4,
            )

    def transfer_fields(self, adata_target, **kwargs) -> AnnDataManager:
        """A new manager for ``adata_target`` that follows this registry."""
        other = AnnDataManager(self.fields, self.setup_method_args)
        return other.register_fields(adata_target, source_registry=self.registry, **kwargs)

    def validate(self) -> None:
        """Re-register silently if another manager registered the same object since."""
        if self.adata is None:
            raise SetupError("This manager holds no data.")
        if self.adata.uns.get(MANAGER_UUID_KEY) != self._manager_uuid:
            adata, source, kwargs = self.adata, self._source_registry, self._transfer_kwargs
            self.adata = None
            self.register_fields(adata, source_registry=source, **kwargs)

    # ------------------------------------------------------------------ query
    @property
    def registry(self) -> dict:
        """Plain, JSON-compatible description of the setup."""
        if self._registry is None:
            raise SetupError("No data registered yet; call register_fields(adata).")
        return self._registry

    @property
    def data_registry(self) -> dict:
        """Registry keys that hold data → ``{"attr_name", "attr_key"}``."""
        regs = self.registry["field_registries"]
        return {k: v["data_registry"] for k, v in regs.items() if v["data_registry"]}

    @property
    def summary_stats(self) -> SummaryStats:
        """Merged summary statistics of all fields (``n_cells``, ``n_vars``, ``n_batch``...)."""
        stats = SummaryStats()
        for key, reg in self.registry["field_registries"].items():
            for name, value in reg["summary_stats"].items():
                if name in stats:
                    raise RuntimeError(f"Summary statistic {name!r} reported twice ({key}).")
                stats[name] = value
        return stats

    def get_state_registry(self, key: str) -> dict:
        """State of the field ``key`` (categories, column names...)."""
        return self.registry["field_registries"][key]["state_registry"]

    def get_setup_arg(self, name: str):
        """An argument of the setup call."""
        return self.registry["setup_args"][name]

    def get_from_registry(self, key: str):
        """The registered data of ``key`` as stored.

        Returns the count matrix as stored (ndarray or scipy sparse), single obs fields as
        ndarray ``(n_cells, 1)`` and joint obs fields as DataFrame.
        """
        reg = self.data_registry.get(key)
        if reg is None:
            raise KeyError(f"{key!r} holds no data; registered: {list(self.data_registry)}")
        attr, attr_key = reg["attr_name"], reg["attr_key"]
        if attr == "X":
            return self.adata.X
        container = getattr(self.adata, attr)
        value = container[attr_key]
        if attr == "obs":
            return value.to_numpy().reshape(-1, 1)
        return value

    def view_registry(self, hide_state_registries: bool = False) -> None:
        """Print the setup with rich tables."""
        from ._view import print_registry

        print_registry(self, hide_state_registries=hide_state_registries)
