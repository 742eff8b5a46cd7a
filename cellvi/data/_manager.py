"""The AnnData manager: registers fields, keeps the registry, transfers setups."""

from __future__ import annotations

import inspect
import uuid
import warnings

from .._constants import CELLVI_PREFIX
from ..errors import CellviWarning, MissingKeyError, SetupError
from ._backed import close_disk_sources
from ._checks import plain
from ._fields import BaseField

__all__ = ["AnnDataManager", "SummaryStats", "TRANSFER_OPTIONS", "UUID_KEY", "MANAGER_UUID_KEY"]

UUID_KEY = f"{CELLVI_PREFIX}uuid"
MANAGER_UUID_KEY = f"{CELLVI_PREFIX}manager_uuid"
TRANSFER_OPTIONS = ("extend_categories", "allow_missing_labels", "check_var_names")
"""Keyword options of a transfer; each field receives those its ``transfer_field`` accepts."""


class SummaryStats(dict):
    """A dict of summary statistics that also allows attribute access (``stats.n_batch``).

    Examples
    --------
    >>> SummaryStats(n_batch=2).n_batch
    2
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(f"no summary statistic {name!r}; have {list(self)}") from err


def _transfer_options(field: BaseField, options: dict) -> dict:
    accepted = inspect.signature(field.transfer_field).parameters
    return {k: v for k, v in options.items() if k in accepted}


class AnnDataManager:
    """Records how an AnnData is set up for a model, and re-applies it to new data.

    Parameters
    ----------
    fields
        The fields to register, in order (distinct ``registry_key`` values).
    setup_method_args
        ``{"model_name", "setup_method_name", "setup_args"}`` of the setup call; setup
        arguments must be JSON-like (numpy scalars and tuples are converted).

    Attributes
    ----------
    adata : anndata.AnnData or None
        The registered object (``None`` until :meth:`register_fields`).
    fields : list of BaseField
        The fields, in order.

    Examples
    --------
    >>> import anndata, numpy as np, pandas as pd
    >>> from cellvi.data import AnnDataManager, CategoricalObsField, LayerField
    >>> obs = pd.DataFrame({"b": ["x", "y"] * 5}, index=[f"c{i}" for i in range(10)])
    >>> adata = anndata.AnnData(np.ones((10, 4), dtype=np.float32), obs=obs)
    >>> manager = AnnDataManager(
    ...     [LayerField("X", None), CategoricalObsField("batch", "b")],
    ...     {"model_name": "SCVI", "setup_method_name": "setup_anndata", "setup_args": {}},
    ... )
    >>> manager.register_fields(adata).summary_stats.n_batch
    2
    """

    def __init__(self, fields: list[BaseField], setup_method_args: dict):
        self.fields = list(fields)
        keys = [f.registry_key for f in self.fields]
        if len(set(keys)) != len(keys):
            raise SetupError(f"Fields have duplicated registry keys: {keys}.")
        self.setup_method_args = dict(setup_method_args)
        self.adata = None
        self._registry: dict | None = None
        self._manager_uuid = str(uuid.uuid4())
        self._source_registry: dict | None = None
        self._transfer_kwargs: dict = {}

    # --------------------------------------------------------------- register
    def register_fields(self, adata, source_registry: dict | None = None, **transfer_kwargs):
        """Validate ``adata`` and write the registered columns onto it.

        Parameters
        ----------
        adata
            An AnnData (not a view). Integer codes and copies are written into its ``obs``/
            ``obsm``; ``uns['_cellvi_uuid']`` is set once and ``uns['_cellvi_manager_uuid']``
            names this manager.
        source_registry
            Default ``None``. A registry to follow (transfer path): categories keep their
            codes and genes must match.
        **transfer_kwargs
            Only with ``source_registry``: ``extend_categories`` (default ``False``, append
            unseen categories), ``allow_missing_labels`` (default ``False``, query labels) and
            ``check_var_names`` (``"error"`` default, or ``"warn"``).

        Returns
        -------
        AnnDataManager
            ``self``.

        Raises
        ------
        SetupError
            If the manager already holds data, ``adata`` is a view, or the data conflict with
            ``source_registry``.
        TypeError
            For transfer options without ``source_registry``, or unknown options.
        """
        if self.adata is not None:
            raise SetupError(
                "This manager already holds data; use transfer_fields(adata) for new data."
            )
        if getattr(adata, "is_view", False):
            raise SetupError(
                "The AnnData is a view of another object; cellvi must add columns to it. Pass a "
                "copy: adata = adata[idx].copy()."
            )
        self._check_transfer_options(source_registry, transfer_kwargs)
        try:
            field_registries = self._register_each(adata, source_registry, transfer_kwargs)
        except BaseException:
            # fields before the failing one may have overwritten another manager's columns:
            # no manager owns the object now, so the last one re-registers it before use
            if hasattr(adata, "uns"):
                adata.uns.pop(MANAGER_UUID_KEY, None)
            raise
        if UUID_KEY not in adata.uns:
            adata.uns[UUID_KEY] = str(uuid.uuid4())
        adata.uns[MANAGER_UUID_KEY] = self._manager_uuid
        from .. import __version__

        self._registry = {
            "cellvi_version": __version__,
            "model_name": self.setup_method_args.get("model_name"),
            "setup_method_name": self.setup_method_args.get("setup_method_name"),
            "setup_args": plain(dict(self.setup_method_args.get("setup_args", {}))),
            UUID_KEY: adata.uns[UUID_KEY],
            "field_registries": field_registries,
        }
        self.adata = adata
        self._source_registry = source_registry
        self._transfer_kwargs = dict(transfer_kwargs)
        close_disk_sources(adata)  # the checks read the counts; the files need not stay open
        return self

    def _register_each(self, adata, source_registry, transfer_kwargs) -> dict:
        """Register (or transfer) every field in order; the field registries."""
        field_registries = {}
        for field in self.fields:
            if source_registry is None:
                state = field.register_field(adata)
            else:
                state = field.transfer_field(
                    self._source_state(source_registry, field.registry_key),
                    adata,
                    **_transfer_options(field, transfer_kwargs),
                )
            state = plain(state)
            field_registries[field.registry_key] = {
                "data_registry": field.data_registry(),
                "state_registry": state,
                "summary_stats": plain(field.get_summary_stats(state)),
            }
        _merge_stats(field_registries)  # raises on duplicated statistic names
        return field_registries

    @staticmethod
    def _check_transfer_options(source_registry, options: dict) -> None:
        unknown = sorted(set(options) - set(TRANSFER_OPTIONS))
        if unknown:
            raise TypeError(
                f"register_fields() got unknown option(s) {unknown}; valid: "
                f"{list(TRANSFER_OPTIONS)}."
            )
        if options and source_registry is None:
            raise TypeError(
                f"Options {sorted(options)} only apply when transferring a setup "
                "(source_registry=...)."
            )
        if options.get("check_var_names", "error") not in ("error", "warn"):
            raise ValueError(
                f"check_var_names must be 'error' or 'warn'; got {options['check_var_names']!r}."
            )

    @staticmethod
    def _source_state(source_registry: dict, key: str) -> dict:
        regs = source_registry.get("field_registries", {})
        if key not in regs:
            raise SetupError(
                f"The source registry has no field {key!r} (it has {list(regs)}); it was made "
                "for a different model or setup."
            )
        return regs[key]["state_registry"]

    def transfer_fields(self, adata_target, **kwargs) -> AnnDataManager:
        """A new manager registering ``adata_target`` with this manager's encodings.

        Parameters
        ----------
        adata_target
            The new AnnData (e.g. query data), same genes in the same order.
        **kwargs
            Transfer options, see :meth:`register_fields`.

        Returns
        -------
        AnnDataManager
            A new, registered manager.
        """
        other = AnnDataManager(self.fields, self.setup_method_args)
        return other.register_fields(adata_target, source_registry=self.registry, **kwargs)

    def validate(self) -> None:
        """Re-register silently if another manager registered the same object since.

        Another setup on the same AnnData overwrites the ``_cellvi_*`` columns; this restores
        this manager's encoding (warnings already shown at first registration are muted).

        Raises
        ------
        SetupError
            If the manager holds no data.
        """
        if self.adata is None:
            raise SetupError("This manager holds no data; call register_fields(adata) first.")
        registered = self.summary_stats.get("n_cells"), self.summary_stats.get("n_vars")
        if (self.adata.n_obs, self.adata.n_vars) != registered and None not in registered:
            raise SetupError(
                f"The AnnData has {self.adata.n_obs} cells x {self.adata.n_vars} genes but was "
                f"registered with {registered[0]} x {registered[1]}: it was subset or extended "
                "in place since setup_anndata. Run setup_anndata on it again and build a new "
                "model, or pass the data to the call (e.g. adata=...) instead."
            )
        if self.adata.uns.get(MANAGER_UUID_KEY) == self._manager_uuid:
            return
        adata, source, kwargs = self.adata, self._source_registry, self._transfer_kwargs
        self.adata = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CellviWarning)
                self.register_fields(adata, source_registry=source, **kwargs)
        finally:
            self.adata = adata

    # ------------------------------------------------------------------ query
    @property
    def registry(self) -> dict:
        """Plain, JSON-compatible description of the setup (saved with models)."""
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
        return _merge_stats(self.registry["field_registries"])

    def _lookup(self, mapping: dict, key: str, what: str):
        if key not in mapping:
            raise MissingKeyError(f"No {what} {key!r}; available: {list(mapping)}.")
        return mapping[key]

    def get_state_registry(self, key: str) -> dict:
        """State of the field ``key`` (categories, column names...).

        Raises
        ------
        MissingKeyError
            If no field has registry key ``key``.
        """
        regs = self.registry["field_registries"]
        return self._lookup(regs, key, "registered field")["state_registry"]

    def get_setup_arg(self, name: str):
        """The argument ``name`` of the setup call.

        Raises
        ------
        MissingKeyError
            If the setup call had no such argument.
        """
        return self._lookup(self.registry["setup_args"], name, "setup argument")

    def get_from_registry(self, key: str):
        """The registered data of ``key``.

        Returns
        -------
        numpy.ndarray, scipy.sparse matrix or pandas.DataFrame
            The count matrix as stored (ndarray or scipy sparse); single obs fields as an
            ndarray of shape ``(n_cells, 1)`` (int64 codes or float64 values); joint obs
            fields as a DataFrame.

        Raises
        ------
        MissingKeyError
            If ``key`` holds no data (unknown or an empty optional field).
        """
        self._lookup(self.data_registry, key, "registry key holding data")
        self.validate()  # another setup of the same object may have rewritten the columns
        field = next(f for f in self.fields if f.registry_key == key)
        return field.get_field_data(self.adata)

    def view_registry(self, hide_state_registries: bool = False) -> None:
        """Print the setup: version, setup call, summary statistics, data locations, states.

        Parameters
        ----------
        hide_state_registries
            Default ``False``. If ``True``, skip the per-field state tables.
        """
        from ._view import print_registry

        print_registry(self, hide_state_registries=hide_state_registries)


def _merge_stats(field_registries: dict) -> SummaryStats:
    stats = SummaryStats()
    for key, reg in field_registries.items():
        for name, value in reg["summary_stats"].items():
            if name in stats:
                raise RuntimeError(f"Summary statistic {name!r} is reported twice ({key}).")
            stats[name] = value
    return stats
