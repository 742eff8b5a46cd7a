"""The one base class of user-facing models: data bookkeeping, device, history, training."""

from __future__ import annotations

import logging
import warnings
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .._constants import REGISTRY_KEYS
from .._settings import settings
from ..data import AnnDataManager
from ..data._manager import UUID_KEY
from ..errors import CellviWarning, SetupError
from ._history import _without_last_rows, append_history, run_history
from ._query_api import QueryMixin
from ._registry import ManagerStore, check_registry_compatible

__all__ = ["BaseModel"]

logger = logging.getLogger("cellvi")


class BaseModel(QueryMixin):
    """Shared machinery of cellvi models; subclasses add ``setup_anndata`` and the module.

    Subclasses define ``_module_from_manager`` (or ``_module_from_summary``) and the
    fields of their setup. Learned state ends in ``_`` and is set only by training or
    loading.
    """

    _store: ClassVar[ManagerStore]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._store = ManagerStore(cls.__name__)

    def __init__(self, adata=None, *, registry: dict | None = None):
        self.adata = adata
        self.adata_manager: AnnDataManager | None = None
        if adata is not None:
            self.adata_manager = self._store.get(adata)
            self.registry_ = self.adata_manager.registry
        elif registry is not None:
            self.registry_ = registry
        else:
            warnings.warn(
                f"{type(self).__name__}() without data is experimental: the module is built "
                "from the data module passed to train(datamodule=dm). Prefer "
                f"{type(self).__name__}(adata) or {type(self).__name__}(registry=dm.registry).",
                CellviWarning,
                stacklevel=3,
            )
            self.registry_ = None
        self.is_trained_ = False
        self.history_: dict[str, pd.DataFrame] = {}
        self.train_indices_ = self.validation_indices_ = self.test_indices_ = None
        self.run_dir_: str | None = None
        self._history_before_failed_run: dict | None = None
        # the optimiser state and (epochs, steps) trained behind the current weights, for
        # train(resume=True) and save(save_optimizer_state=True)
        self._optimizer_state: dict | None = None
        self._training_progress: tuple[int, int] = (0, 0)
        # the KL warm-up that training used ({"n_epochs_kl_warmup": .., "n_steps_kl_warmup":
        # ..}): train(resume=True) keeps it rather than fitting a new one to the longer run
        self._kl_warmup: dict | None = None
        self.module: torch.nn.Module | None = None

    # ----------------------------------------------------------------- setup
    @classmethod
    def _register_manager(cls, manager: AnnDataManager) -> None:
        cls._store.add(manager)

    @property
    def summary_stats(self) -> dict:
        """Counts describing the registered data (``n_cells``, ``n_vars``, ``n_batch`` ...)."""
        if self.registry_ is None:
            raise SetupError(
                f"This {type(self).__name__} has no data yet: train it with "
                "model.train(datamodule=dm) first."
            )
        regs = self.registry_["field_registries"]
        out: dict[str, Any] = {}
        for field in regs.values():
            out.update(field.get("summary_stats", {}))
        return out

    @property
    def registry(self) -> dict:
        """The data registry the model was built with (plain, JSON-like)."""
        return self.registry_

    def get_state_registry(self, key: str) -> dict:
        """State of one registered field (categories, column names, ...)."""
        return self.registry_["field_registries"][key]["state_registry"]

    def get_setup_arg(self, name: str):
        """One argument of the setup call, as the user passed it."""
        return self.registry_["setup_args"][name]

    def get_anndata_manager(self, adata=None, required: bool = False) -> AnnDataManager | None:
        """The manager that registered ``adata`` (default: the model's AnnData) for this model
        class, or None when there is none (``required=True`` raises a :class:`SetupError`).

        Unlike an analysis call on ``adata``, this never registers it.
        """
        if adata is None or adata is self.adata:
            if self.adata_manager is None and required:
                raise SetupError("This model has no AnnData; pass the AnnData to look up.")
            return self.adata_manager
        return self._store.get(adata, required=required)

    def get_from_registry(self, adata, registry_key: str):
        """The array ``adata`` registered under ``registry_key`` (``"X"``, ``"batch"``,
        ``"labels"``, ...) for this model class, as stored in the AnnData."""
        manager = self.get_anndata_manager(adata, required=True)
        return manager.get_from_registry(registry_key)

    def view_anndata_setup(self, adata=None, hide_state_registries: bool = False) -> None:
        """Print how ``adata`` (default: the model's AnnData) is registered.

        Raises
        ------
        ValueError
            For data this model has not registered (viewing never registers it).
        """
        manager = self.adata_manager if adata is None else self.get_anndata_manager(adata)
        if manager is None and adata is not None:
            raise ValueError(
                f"This AnnData is not registered with this {type(self).__name__}; run an output "
                "on it (e.g. model.get_latent_representation(adata)) or "
                f"{type(self).__name__}.setup_anndata(adata, ...) first."
            )
        if manager is None:
            raise SetupError("This model has no AnnData; pass adata= to view its setup.")
        manager.view_registry(hide_state_registries=hide_state_registries)

    def _bind_registry(self, registry: dict) -> None:
        """Build the deferred module of a model created without data (``Model()``)."""
        self.registry_ = registry
        self.module = self._build_module()
        self._registry_bound()

    def _registry_bound(self) -> None:
        """Hook: state derived from the registry once it is known."""

    def _attach_manager(self, manager: AnnDataManager, what: str) -> AnnDataManager:
        """Use data registered by a data module, after checking it fits this model."""
        if self.registry_ is None:
            self._bind_registry(manager.registry)
        check_registry_compatible(self.registry_, manager.registry, what)
        if manager.registry["setup_args"] == self.registry_["setup_args"]:
            self._register_manager(manager)
        return manager

    def _data_source(self, adata, indices, dataloader):
        """``(adata, indices)`` for an analysis call that may name a data module loader."""
        if dataloader is None:
            return adata, indices
        if adata is not None:
            raise ValueError("Pass either adata= or dataloader=, not both.")
        if indices is not None:
            raise ValueError(
                "Choose cells in the loader instead of indices=: "
                "dm.inference_dataloader(indices=...)."
            )
        # a data module's inference loader, or an AnnDataLoader (as in scvi-tools): the cells
        # it holds are computed in cellvi's own minibatches
        manager = getattr(dataloader, "manager", None) or getattr(dataloader, "adata_manager", None)
        if manager is None or not hasattr(dataloader, "indices"):
            raise TypeError(
                "dataloader= takes a data module's loader, dm.inference_dataloader(), or a "
                f"cellvi.dataloaders.AnnDataLoader; got {type(dataloader).__name__}."
            )
        self._attach_manager(manager, "the dataloader's data")
        return manager.adata, dataloader.indices

    def _manager_for(self, adata) -> AnnDataManager:
        """The manager of ``adata`` for this model, transferring the setup when needed."""
        if adata is None or adata is self.adata:
            if self.adata_manager is None:
                raise SetupError(
                    "This model has no AnnData: pass adata=, or dataloader="
                    "dm.inference_dataloader() for a model trained on a data module."
                )
            self.adata_manager.validate()
            return self.adata_manager
        manager = self._store.get(adata, required=False)
        if manager is None or manager.registry["setup_args"] != self.registry_["setup_args"]:
            manager = self._transfer_setup(adata)
        return manager

    def _transfer_setup(self, adata, **kwargs) -> AnnDataManager:
        """Register ``adata`` with this model's setup (``data.md`` §1.1).

        A view is first turned into an actual object in place (its parent is left untouched),
        and a copy of registered data gets a UUID of its own, so that the original keeps its
        manager.
        """
        if getattr(adata, "is_view", False):
            logger.info("Received a view of an AnnData; making it a copy in place.")
            # a view of a backed="r" AnnData: only its cells are read into memory
            backed = getattr(adata, "isbacked", False)
            adata._init_as_actual(adata.to_memory() if backed else adata.copy())
            adata.uns.pop(UUID_KEY, None)  # the parent's id: the copy gets its own
        elif self._store.holds_another(adata):
            adata.uns.pop(UUID_KEY, None)
        if self.adata_manager is not None:
            manager = self.adata_manager.transfer_fields(adata, **kwargs)
        else:
            manager = self._build_manager(self.registry_["setup_args"])
            manager.register_fields(adata, source_registry=self.registry_, **kwargs)
        self._register_manager(manager)
        return manager

    @classmethod
    def _build_manager(cls, setup_args: dict) -> AnnDataManager:
        raise NotImplementedError

    def _tensor_store(self, manager: AnnDataManager):
        """The registered arrays of ``manager`` as contiguous tensors.

        Built once and reused while the registered arrays are unchanged, so a count matrix
        assigned after training (``adata.X = ...``, a new layer) is read anew, as scvi-tools
        reads its AnnData at every call. (Covariates are copies made at setup, there as here.)
        """
        from ..dataloaders import TensorStore

        fingerprint = _registry_fingerprint(manager)
        cached = getattr(self, "_store_cache", None)
        if cached is not None and cached[0] is manager and _same_sources(cached[1], fingerprint):
            return cached[2]
        store = TensorStore.from_manager(manager)
        self._store_cache = (manager, fingerprint, store)
        return store

    # ---------------------------------------------------------------- device
    @property
    def device(self) -> torch.device:
        """Device of the module's parameters."""
        return next(self.module.parameters()).device

    def to_device(self, device: str | torch.device) -> None:
        """Move the module to ``device`` (e.g. ``"cpu"``, ``"cuda:0"``)."""
        self.module.to(torch.device(device))

    # ------------------------------------------------------------ save/load
    def save(
        self,
        dir_path,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        save_kwargs: dict | None = None,
        legacy_mudata_format: bool = False,
        datamodule=None,
        save_optimizer_state: bool = False,
        **anndata_write_kwargs,
    ):
        """Save the model as a directory (``model.pt`` plus optionally ``adata.h5ad``).

        The file holds tensors and JSON-like data only and is read back without executing
        code. The directory is written to a temporary sibling first and swapped in, so an
        interrupted save never leaves a half-written model.

        Parameters
        ----------
        dir_path
            Target directory.
        prefix
            Prepended to file names (``"ref_"`` → ``ref_model.pt``).
        overwrite
            Write into an existing directory: this prefix's earlier ``model.pt`` and
            ``adata.h5ad`` are replaced or removed (no stale data survives); other files,
            such as another prefix's model, stay.
        save_anndata
            Also write the model's AnnData.
        save_kwargs
            Passed to ``torch.save``; a ``pickle_module`` or a ``pickle_protocol`` other than 2
            is refused (the file must stay readable by the safe, weights-only reader).
        legacy_mudata_format, datamodule
            Accepted for scvi-tools compatibility. cellvi models hold AnnData (the MuData
            name layout does not apply), and a model trained on a data module keeps that
            module's shape facts in its registry, so neither is needed.
        save_optimizer_state
            Also store the optimiser state and training progress, so that the loaded model's
            ``train(resume=True)`` continues Adam and the KL warm-up.
        **anndata_write_kwargs
            Passed to ``AnnData.write_h5ad`` (e.g. ``compression="gzip"``).
        """
        from ._save_load import save_model

        return save_model(
            self,
            dir_path,
            prefix=prefix,
            overwrite=overwrite,
            save_anndata=save_anndata,
            save_kwargs=save_kwargs,
            anndata_write_kwargs=anndata_write_kwargs,
            save_optimizer_state=save_optimizer_state,
        )

    @classmethod
    def load(
        cls,
        dir_path,
        adata=None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        check_var_names: str = "error",
        allow_pickle: bool = False,
        backup_url=None,
        datamodule=None,
        allowed_classes_names_list: list[str] | None = None,
        sha256: str | None = None,
    ):
        """Load a saved model; ``adata`` is validated against the saved setup.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        adata
            Data to attach (None: the saved ``adata.h5ad`` if any, else registry only).
        accelerator, device
            Where to put the weights (one device).
        prefix
            File-name prefix used at save time.
        check_var_names
            ``"error"`` (default) or ``"warn"`` when gene names/order differ.
        allow_pickle
            Read files that contain pickled Python objects (unsafe; only for files you
            trust).
        backup_url
            Where to copy ``{prefix}model.pt`` from when ``dir_path`` lacks it: a local path
            or ``file://`` URL (a shared drive, a mirror). cellvi never uses the network, so
            an ``http(s)`` URL is refused with the command to download it yourself.
        datamodule
            For a model trained on a data module: that module (instead of ``adata``), whose
            genes and categories are checked against the saved registry; outputs then take
            ``dataloader=datamodule.inference_dataloader()``.
        allowed_classes_names_list
            Other class names whose saved models this class may load.
        sha256
            The expected SHA-256 of ``{prefix}model.pt`` (hex); a file that differs, copied
            from ``backup_url`` or already there, is refused before it is read.
        """
        from ._save_load import load_model

        return load_model(
            cls,
            dir_path,
            adata,
            accelerator=accelerator,
            device=device,
            prefix=prefix,
            check_var_names=check_var_names,
            allow_pickle=allow_pickle,
            backup_url=backup_url,
            sha256=sha256,
            datamodule=datamodule,
            allowed_classes_names_list=allowed_classes_names_list,
        )

    @classmethod
    def load_registry(cls, dir_path, prefix: str | None = None) -> dict:
        """The data registry of a saved model, without building it."""
        from ._save_load import load_registry

        return load_registry(dir_path, prefix)

    @classmethod
    def view_setup_args(cls, dir_path, prefix: str | None = None) -> None:
        """Print the setup method and arguments a saved model was registered with."""
        from ._save_load import view_setup_args

        view_setup_args(dir_path, prefix)

    def _load_weights_from(self, dir_path) -> None:
        """Load the weights of a saved model directory into this model's module."""
        from ..io import read_model_file

        content = read_model_file(dir_path)
        self.module.load_state_dict(content["model_state_dict"])

    # --------------------------------------------------------------- history
    @property
    def is_trained(self) -> bool:
        """Whether ``train`` finished at least once (or a trained model was loaded)."""
        return self.is_trained_

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch metrics: ``{name: DataFrame}`` indexed by ``epoch``."""
        return self.history_

    @property
    def train_indices(self) -> np.ndarray | None:
        """Positions of the training cells of the last run."""
        return self.train_indices_

    @property
    def validation_indices(self) -> np.ndarray | None:
        """Positions of the validation cells of the last run."""
        return self.validation_indices_

    @property
    def test_indices(self) -> np.ndarray | None:
        """Positions of the test cells of the last run."""
        return self.test_indices_

    def _history_before(self, run, *, resumed: bool) -> dict:
        """The history a run's rows are appended to (``run``: its ``resumed_rows`` and
        ``run_dir``)."""
        if resumed and run.resumed_rows is not None and str(run.run_dir) == self.run_dir_:
            # this model's history ends with the rows the checkpoint brings back: replace them
            return _without_last_rows(self.history_, *run.resumed_rows)
        if resumed and self._history_before_failed_run is not None:
            return self._history_before_failed_run
        return self.history_

    def _record_run(self, result, *, resumed: bool) -> None:
        """Fold a run's outcome into the model (called on success and on failure)."""
        base = self._history_before(result, resumed=resumed)
        self.history_ = append_history(base, run_history(result.history_rows, result.step_rows))
        self.run_dir_ = str(result.run_dir)
        if result.completed:
            self._history_before_failed_run = None
            self.train_indices_ = np.asarray(result.train_idx)
            self.validation_indices_ = np.asarray(result.val_idx)
            self.test_indices_ = np.asarray(result.test_idx)
            self.is_trained_ = True
            self.trainer = result.trainer
        else:
            self._history_before_failed_run = base
        if result.optimizer_state and result.optimizer_state["state"]:  # it took steps
            self._optimizer_state = result.optimizer_state
            self._training_progress = tuple(result.progress)
        self.module.eval()

    def __repr__(self) -> str:
        stats = self.summary_stats
        return (
            f"{type(self).__name__} on {stats.get('n_cells', '?')} cells x "
            f"{stats.get('n_vars', '?')} genes, {stats.get('n_batch', 1)} batch(es); "
            f"trained: {self.is_trained_}"
        )


def seed_torch(offset: int = 0) -> None:
    """Seed torch's global generator from ``settings.seed`` (no-op when it is None)."""
    if settings.seed is not None:
        torch.manual_seed(settings.seed + offset)


def _registry_fingerprint(manager: AnnDataManager) -> list:
    """What a manager's registry reads, to tell whether a cached store is still current: an
    in-memory count matrix as object identities (the matrix and, if sparse, its buffers;
    held, so a replaced matrix cannot reuse their addresses), the small per-cell fields
    (codes, covariates, size factors: built anew at each read) by content, counts on disk
    by kind only. About 0.1 ms."""
    out = []
    for key in manager.data_registry:
        value = manager.get_from_registry(key)
        if isinstance(value, pd.DataFrame):
            value = value.to_numpy()
        if key != REGISTRY_KEYS.X_KEY and isinstance(value, np.ndarray):
            out.append(("content", value.shape, value.dtype.str, value.tobytes()))
        elif not isinstance(value, np.ndarray) and not sp.issparse(value):
            # counts on disk: a new handle at each read (backed AnnData), and read-only
            out.append(("disk", type(value).__name__))
        else:
            buffers = [getattr(value, name, None) for name in ("data", "indices", "indptr")]
            out.append(("objects", value, *buffers))
    return out


def _same_sources(old: list, new: list) -> bool:
    if len(old) != len(new):
        return False
    for a, b in zip(old, new, strict=True):
        if a[0] != b[0] or len(a) != len(b):
            return False
        if a[0] == "objects" and any(x is not y for x, y in zip(a[1:], b[1:], strict=True)):
            return False
        if a[0] == "content" and a[1:] != b[1:]:
            return False
    return True
