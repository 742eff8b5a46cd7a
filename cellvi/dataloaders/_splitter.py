"""Train/validation/test splitting as a Lightning data module (``data.md`` §2)."""

from __future__ import annotations

import math
import numbers
import warnings

import lightning.pytorch as pl
import numpy as np
import torch

from .._settings import settings
from ..errors import InvalidDataError, TrainingWarning, check_count
from ._identity import data_identity
from ._loader import make_dataloader
from ._tensors import TensorStore

__all__ = ["DataSplitter", "split_sizes"]


def split_sizes(n_obs: int, train_size: float, validation_size: float | None) -> tuple[int, int]:
    """``(n_train, n_val)``: ``ceil(train_size * n)``; validation ``floor`` or the rest."""
    if not 0 < train_size <= 1:
        raise ValueError(f"train_size={train_size} must be in (0, 1].")
    n_train = math.ceil(train_size * n_obs)
    if validation_size is None:
        n_val = n_obs - n_train
    else:
        if not 0 <= validation_size < 1:
            raise ValueError(f"validation_size={validation_size} must be in [0, 1).")
        if train_size + validation_size > 1:
            raise ValueError(
                f"train_size + validation_size = {train_size} + {validation_size} exceeds 1 "
                "(train_size defaults to 0.9); lower one of them."
            )
        n_val = math.floor(validation_size * n_obs)
        # ceil of a product rounded up by floating point (0.56 * 25 = 14.000000000000002)
        # would promise more cells than remain after validation
        n_train = min(n_train, n_obs - n_val)
    return n_train, n_val


class DataSplitter(pl.LightningDataModule):
    """Split cells into train/validation/test sets and serve fast loaders for each.

    Parameters
    ----------
    manager
        The data manager (anything with ``data_registry``/``get_from_registry``).
    train_size
        Fraction of training cells (default 0.9).
    validation_size
        Fraction of validation cells (default: all the rest).
    shuffle_set_split
        Permute cells before splitting (seeded).
    batch_size
        Minibatch size (default ``settings.batch_size``).
    drop_last
        Drop a short final training batch.
    split_seed
        Split and shuffle seed (default ``settings.seed``, i.e. 0: reproducible); saved with
        the model. ``seed`` is accepted as another name for it.
    external_indexing
        ``[train, validation, test]`` position arrays replacing the random split.
    distributed_sampler
        Shard training batches across DDP ranks.
    drop_dataset_tail
        With ``distributed_sampler``: drop instead of repeat the uneven tail.
    num_workers, pin_memory
        Loader settings.
    store
        A prebuilt :class:`TensorStore` (else built once from the manager).
    chunk_size, buffer_size
        Counts on disk: cells per contiguous read and cells shuffled together in memory
        (default ``settings.dl_chunk_size`` / ``settings.dl_buffer_size``).
    load_sparse_tensor
        Accepted for scvi-tools compatibility: sparse counts are always kept as CSR and
        densified one minibatch at a time, so the minibatches are the same either way.
    persistent_workers
        Keep loader workers across epochs (default ``settings.dl_persistent_workers``).
    """

    def __init__(
        self,
        manager,
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        batch_size: int | None = None,
        drop_last: bool = False,
        split_seed: int | None = None,
        external_indexing: list | None = None,
        distributed_sampler: bool = False,
        drop_dataset_tail: bool = False,
        num_workers: int | None = None,
        pin_memory: bool = False,
        store: TensorStore | None = None,
        chunk_size: int | None = None,
        buffer_size: int | None = None,
        load_sparse_tensor: bool = False,
        persistent_workers: bool | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        if seed is not None and split_seed is not None and seed != split_seed:
            raise ValueError(
                f"seed={seed!r} and split_seed={split_seed!r} name the same setting; give one."
            )
        split_seed = seed if split_seed is None else split_seed
        self.load_sparse_tensor = bool(load_sparse_tensor)
        self._identity: dict | None = None  # see _data_identity
        self.persistent_workers = persistent_workers
        self.chunk_size, self.buffer_size = chunk_size, buffer_size
        self.manager = manager
        self.train_size_is_default = train_size is None or train_size == 0
        self.train_size = 0.9 if self.train_size_is_default else float(train_size)
        self.validation_size = validation_size
        self.shuffle_set_split = shuffle_set_split
        self.batch_size = check_count(
            settings.batch_size if batch_size is None else batch_size, "batch_size"
        )
        self.drop_last = drop_last
        if split_seed is not None and (
            isinstance(split_seed, bool) or not isinstance(split_seed, numbers.Integral)
        ):
            raise ValueError(f"split_seed={split_seed!r} must be an integer (or None).")
        self.split_seed = settings.seed if split_seed is None else int(split_seed)
        if self.split_seed is None:
            self.split_seed = int(np.random.SeedSequence().entropy % (2**31))
        self.external_indexing = external_indexing
        self.distributed_sampler = distributed_sampler
        self.drop_dataset_tail = drop_dataset_tail
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._store = store
        self.n_obs = int(manager.summary_stats["n_cells"])
        self.train_idx = self.val_idx = self.test_idx = None
        if external_indexing is None:
            self.n_train, self.n_val = self._split_sizes()
            self._apply_last_batch_rule()

    def _split_sizes(self) -> tuple[int, int]:
        """``(n_train, n_val)`` before the last-batch rule."""
        return split_sizes(self.n_obs, self.train_size, self.validation_size)

    def _apply_last_batch_rule(self) -> None:
        if self.n_train < 2:
            raise InvalidDataError(
                f"Only {self.n_train} training cell(s) out of {self.n_obs}; training needs at "
                "least 2. Use more cells or a larger train_size."
            )
        self._check_drop_last(self.n_train)
        r = self.n_train % self.batch_size
        if self.drop_last or r not in (1, 2) or self.n_train - r < 2:
            return
        if not self.train_size_is_default:
            warnings.warn(
                f"The last training minibatch has {r} cell(s) (n_train={self.n_train}, "
                f"batch_size={self.batch_size}); cellvi merges a 1-cell batch into the previous "
                "one. Adjust train_size or batch_size to avoid tiny batches.",
                TrainingWarning,
                stacklevel=4,
            )
            return
        self.n_train -= r
        self.n_val += r
        warnings.warn(
            f"Moved {r} cell(s) from training to validation so the last training minibatch is "
            f"not tiny (n_train={self.n_train}, batch_size={self.batch_size}).",
            TrainingWarning,
            stacklevel=4,
        )

    def _check_drop_last(self, n_train: int) -> None:
        if self.drop_last and n_train < self.batch_size and not self.distributed_sampler:
            raise ValueError(
                f"drop_last=True with batch_size={self.batch_size} and {n_train} training "
                "cells leaves no training minibatch, so nothing would be trained. Lower "
                "batch_size or set drop_last=False."
            )

    # ----------------------------------------------------------------- split
    def setup(self, stage: str | None = None) -> None:
        if self.train_idx is not None:
            return
        if self.external_indexing is not None:
            self.train_idx, self.val_idx, self.test_idx = self._check_external()
            return
        order = np.arange(self.n_obs, dtype=np.int64)
        if self.shuffle_set_split:
            order = np.random.RandomState(self.split_seed).permutation(self.n_obs)
        self.val_idx = order[: self.n_val].astype(np.int64)
        self.train_idx = order[self.n_val : self.n_val + self.n_train].astype(np.int64)
        self.test_idx = order[self.n_val + self.n_train :].astype(np.int64)

    def _check_external(self):
        sets = list(self.external_indexing)
        if not isinstance(self.external_indexing, list | tuple) or not 1 <= len(sets) <= 3:
            raise ValueError("external_indexing must be a list [train, validation, test].")
        sets += [np.array([], dtype=np.int64)] * (3 - len(sets))
        names = ("train", "validation", "test")
        arrays = [self._positions(s, name) for s, name in zip(sets, names, strict=True)]
        for name, arr in zip(names, arrays, strict=True):
            if len(np.unique(arr)) != len(arr):
                raise ValueError(f"external_indexing: the {name} set has duplicated indices.")
            if arr.size and (arr.min() < 0 or arr.max() >= self.n_obs):
                raise ValueError(f"external_indexing: {name} indices outside [0, {self.n_obs}).")
        for i in range(3):
            for j in range(i + 1, 3):
                if np.intersect1d(arrays[i], arrays[j]).size:
                    raise ValueError(
                        f"external_indexing: the {names[i]} and {names[j]} sets overlap."
                    )
        covered = sum(a.size for a in arrays)
        if covered != self.n_obs:
            raise ValueError(
                f"external_indexing covers {covered} of {self.n_obs} cells; every cell must be "
                "in exactly one set."
            )
        if arrays[0].size < 2:
            raise InvalidDataError("external_indexing: the training set needs at least 2 cells.")
        self._check_drop_last(arrays[0].size)
        r = arrays[0].size % self.batch_size
        if r in (1, 2) and not self.drop_last:
            warnings.warn(
                f"The last training minibatch has {r} cell(s); consider another batch_size.",
                TrainingWarning,
                stacklevel=4,
            )
        return arrays

    def _positions(self, values, name: str) -> np.ndarray:
        """One set of ``external_indexing`` as int64 positions (a boolean mask is converted)."""
        arr = np.asarray(values if values is not None else [])
        if arr.dtype == bool:
            if arr.ndim != 1 or len(arr) != self.n_obs:
                raise ValueError(
                    f"external_indexing: the {name} set is a boolean mask of shape {arr.shape}; "
                    f"a mask needs one entry per cell ({self.n_obs})."
                )
            return np.flatnonzero(arr).astype(np.int64)
        arr = arr.ravel()
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            whole = np.issubdtype(arr.dtype, np.floating) and bool(
                np.all(np.isfinite(arr) & (arr == np.round(arr)))
            )
            if not whole:
                raise ValueError(
                    f"external_indexing: the {name} set must hold integer cell positions; got "
                    f"dtype {arr.dtype} (e.g. {arr[:3].tolist()})."
                )
        return arr.astype(np.int64)

    # --------------------------------------------------------------- loaders
    @property
    def store(self) -> TensorStore:
        if self._store is None:
            self._store = TensorStore.from_manager(self.manager)
        return self._store

    def _rank_world(self) -> tuple[int, int]:
        if self.distributed_sampler and self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def _loader(self, indices, shuffle: bool, train: bool):
        rank, world = self._rank_world()
        # validation and test cells are split exactly across ranks (their metrics are sums
        # over ranks); with fewer cells than ranks every rank takes them all, since a rank
        # without a batch would skip the loop and the others would wait for it
        exact = not train and world > 1
        if exact and len(indices) < world:
            rank, world = 0, 1
        return make_dataloader(
            self.store,
            indices,
            self.batch_size,
            shuffle,
            drop_last=self.drop_last if train else False,
            seed=self.split_seed,
            rank=rank,
            world_size=world,
            drop_dataset_tail=self.drop_dataset_tail,
            exact_shards=exact,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            chunk_size=self.chunk_size,
            buffer_size=self.buffer_size,
        )

    def train_dataloader(self):
        return self._loader(self.train_idx, shuffle=True, train=True)

    def val_dataloader(self):
        if self.val_idx is None or len(self.val_idx) == 0:
            return []
        return self._loader(self.val_idx, shuffle=False, train=False)

    def test_dataloader(self):
        if self.test_idx is None or len(self.test_idx) == 0:
            return []
        return self._loader(self.test_idx, shuffle=False, train=False)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Split indices and seed (tensors, so checkpoints load with ``weights_only``)."""
        if self.train_idx is None:
            return {}
        return {
            "split_seed": int(self.split_seed),
            "train_idx": torch.as_tensor(self.train_idx),
            "val_idx": torch.as_tensor(self.val_idx),
            "test_idx": torch.as_tensor(self.test_idx),
            # the data these positions refer to (a resume refuses other data)
            "data_identity": self._data_identity(),
            # what a resume with other values is told about
            "batch_size": int(self.batch_size),
            "train_size": float(self.train_size),
        }

    def _data_identity(self) -> dict:
        """:func:`data_identity` of the manager, computed once (a checkpoint is written every
        epoch; the data do not change during a run)."""
        if self._identity is None:
            self._identity = data_identity(self.manager)
        return self._identity

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.split_seed = int(state["split_seed"])
        self.train_idx = state["train_idx"].numpy().astype(np.int64)
        self.val_idx = state["val_idx"].numpy().astype(np.int64)
        self.test_idx = state["test_idx"].numpy().astype(np.int64)
