"""Data modules: registered data that models use through a registry, without an AnnData of theirs.

A data module registers its cells once (counts checked, categories coded) and exposes the
resulting ``registry``; ``Model(adata=None, registry=dm.registry)`` builds a model from it,
``model.train(datamodule=dm)`` trains on it and ``dataloader=dm.inference_dataloader()`` runs
inference over it. :class:`SomaDataModule` does this for a TileDB-SOMA query.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .._settings import settings
from ..data import AnnDataManager, standard_fields
from ..errors import MissingKeyError
from ._tensors import TensorStore

__all__ = ["AnnDataModule", "InferenceLoader", "SomaDataModule"]

SOMA_BATCH_COLUMN = "_cellvi_soma_batch"


class InferenceLoader:
    """Minibatches of chosen cells of a data module, in order (for ``dataloader=``).

    Attributes
    ----------
    manager
        The data module's registered manager.
    indices
        Positions of the cells, in output order.
    """

    def __init__(self, manager, store: TensorStore, indices, batch_size: int):
        self.manager, self.store = manager, store
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            yield self.store.gather(torch.as_tensor(self.indices[start : start + self.batch_size]))


def _positions(indices, n_obs: int) -> np.ndarray:
    """Cell positions from ``indices``: integer positions, or a boolean mask over all cells."""
    arr = np.asarray(indices)
    if arr.dtype == bool:
        if arr.ndim != 1 or len(arr) != n_obs:
            raise ValueError(
                f"indices is a boolean mask of shape {arr.shape}; a mask needs one entry per "
                f"cell ({n_obs})."
            )
        return np.flatnonzero(arr).astype(np.int64)
    arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"indices must be integer cell positions or a boolean mask; got dtype {arr.dtype}."
        )
    return arr.astype(np.int64)


class AnnDataModule:
    """Register an AnnData (in memory, on disk or over SOMA) for registry-based models.

    Parameters
    ----------
    adata
        The data; counts in ``X`` or ``layers[layer]``.
    batch_key, labels_key
        ``obs`` columns of batches and labels.
    unlabeled_category
        With ``labels_key``: the label of unlabeled cells (makes the registry usable by SCANVI).
    layer
        Layer with the counts.
    train_size, validation_size, split_seed, batch_size
        Split and minibatches used by ``model.train(datamodule=...)``.

    Examples
    --------
    >>> import cellvi
    >>> adata = cellvi.data.simulate(n_cells=200, n_genes=80, seed=0)
    >>> dm = AnnDataModule(adata, batch_key="batch")
    >>> dm.n_obs, dm.n_vars, dm.n_batch
    (200, 80, 2)
    """

    def __init__(
        self,
        adata,
        batch_key: str | None = None,
        labels_key: str | None = None,
        unlabeled_category=None,
        layer: str | None = None,
        train_size: float = 0.9,
        validation_size: float | None = None,
        split_seed: int | None = None,
        batch_size: int | None = None,
    ):
        setup_args = {
            "layer": layer,
            "batch_key": batch_key,
            "labels_key": labels_key,
            "size_factor_key": None,
            "categorical_covariate_keys": None,
            "continuous_covariate_keys": None,
        }
        if labels_key is not None and unlabeled_category is not None:
            setup_args["unlabeled_category"] = unlabeled_category
        self.manager = AnnDataManager(
            standard_fields(setup_args),
            {
                "model_name": type(self).__name__,
                "setup_method_name": "setup_datamodule",
                "setup_args": setup_args,
            },
        ).register_fields(adata)
        self.train_size, self.validation_size = train_size, validation_size
        self.split_seed = settings.seed if split_seed is None else split_seed
        self.batch_size = batch_size or settings.batch_size
        self._store: TensorStore | None = None

    @property
    def adata(self):
        return self.manager.adata

    @property
    def registry(self) -> dict:
        """The registry to build models from (``Model(adata=None, registry=dm.registry)``)."""
        return self.manager.registry

    @property
    def n_obs(self) -> int:
        return int(self.manager.summary_stats["n_cells"])

    @property
    def n_vars(self) -> int:
        return int(self.manager.summary_stats["n_vars"])

    @property
    def n_batch(self) -> int:
        return int(self.manager.summary_stats["n_batch"])

    @property
    def n_labels(self) -> int:
        return int(self.manager.summary_stats["n_labels"])

    @property
    def var_names(self) -> pd.Index:
        return self.adata.var_names

    @property
    def store(self) -> TensorStore:
        """The registered arrays (counts stay where they are: memory, disk or SOMA)."""
        if self._store is None:
            self._store = TensorStore.from_manager(self.manager)
        return self._store

    def inference_dataloader(self, indices=None, batch_size: int | None = None) -> InferenceLoader:
        """Cells ``indices`` (positions or a boolean mask; default all, in order) for
        ``model.get_...(dataloader=...)``."""
        idx = np.arange(self.n_obs) if indices is None else _positions(indices, self.n_obs)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_obs):
            raise IndexError(f"indices must lie in [0, {self.n_obs}).")
        return InferenceLoader(
            self.manager, self.store, idx, batch_size or max(1024, self.batch_size)
        )


class SomaDataModule(AnnDataModule):
    """A TileDB-SOMA query as a data module (optional extra ``tiledbsoma``).

    Parameters
    ----------
    uri
        The SOMA experiment.
    measurement_name, X_name
        Measurement and ``X`` layer with raw counts.
    obs_value_filter, var_value_filter
        SOMA value filters selecting cells and genes.
    batch_column_names
        ``obs`` columns whose values, joined by ``"//"``, define the batch of a cell.
    labels_column, unlabeled_category
        Cell labels (and the unlabeled label, for SCANVI).
    train_size, validation_size, split_seed, batch_size
        As in :class:`AnnDataModule`.

    Examples
    --------
    ``dm = SomaDataModule(uri, batch_column_names=["donor", "assay"])``, then
    ``model = SCVI(adata=None, registry=dm.registry)``, ``model.train(datamodule=dm)`` and
    ``model.get_latent_representation(dataloader=dm.inference_dataloader())``.
    """

    def __init__(
        self,
        uri: str,
        measurement_name: str = "RNA",
        X_name: str = "raw",
        obs_value_filter: str | None = None,
        var_value_filter: str | None = None,
        batch_column_names: list[str] | None = None,
        labels_column: str | None = None,
        unlabeled_category=None,
        train_size: float = 0.9,
        validation_size: float | None = None,
        split_seed: int | None = None,
        batch_size: int | None = None,
    ):
        from ..data._soma import read_soma

        self.uri = str(uri)
        adata = read_soma(
            uri,
            measurement_name,
            X_name,
            obs_value_filter=obs_value_filter,
            var_value_filter=var_value_filter,
        )
        batch_key = None
        if batch_column_names:
            missing = [c for c in batch_column_names if c not in adata.obs]
            if missing:
                raise MissingKeyError(
                    f"batch columns {missing} are not in the SOMA obs of {uri}; have "
                    f"{[c for c in adata.obs.columns if c != 'soma_joinid']}."
                )
            joined = adata.obs[list(batch_column_names)].astype(str).agg("//".join, axis=1)
            adata.obs[SOMA_BATCH_COLUMN] = pd.Categorical(joined)
            batch_key = SOMA_BATCH_COLUMN
        super().__init__(
            adata,
            batch_key=batch_key,
            labels_key=labels_column,
            unlabeled_category=unlabeled_category,
            train_size=train_size,
            validation_size=validation_size,
            split_seed=split_seed,
            batch_size=batch_size,
        )
