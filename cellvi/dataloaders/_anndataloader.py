"""``AnnDataLoader``: scvi-tools' loader (``data.md`` §3.1-3.2) over cellvi's tensor stores."""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from scipy import sparse

from .._constants import REGISTRY_KEYS
from .._settings import settings
from ..errors import check_count
from ._blocks import BlockShuffleSampler, BufferedStoreDataset
from ._datamodule import _positions
from ._loader import StoreDataset
from ._samplers import BatchIndexSampler, minibatch_bounds
from ._sparse import SparseRows
from ._tensors import _INT_KEYS, CSRTensor, DiskRows, TensorStore

__all__ = ["AnnDataLoader"]

# set by the loader itself (minibatches come from its batch sampler, one dataset call each)
_RESERVED_KWARGS = ("batch_sampler", "dataset")


def _identity(batch):
    """Collate function of ``iter_ndarray`` loaders (module level: picklable for workers)."""
    return batch


class _LoaderBatches:
    """Exact-size minibatches whose shuffle advances by itself every epoch.

    Unlike training loaders, a last minibatch of one cell is kept (as in scvi-tools). Without
    ``set_epoch`` calls (Lightning makes them), each new pass uses the next epoch's order, so a
    plain ``for`` loop over several epochs sees a new, reproducible order every time.
    """

    def _bounds(self, n: int) -> list[tuple[int, int]]:
        return minibatch_bounds(n, self.batch_size, self.drop_last, merge_single=False)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._epoch_given = True

    def __iter__(self):
        if getattr(self, "_started", False) and not getattr(self, "_epoch_given", False):
            self.epoch += 1
        self._started, self._epoch_given = True, False
        yield from super().__iter__()


class _Batches(_LoaderBatches, BatchIndexSampler):
    pass


class _BlockBatches(_LoaderBatches, BlockShuffleSampler):
    pass


class _UserBatches(torch.utils.data.Sampler):
    """A user's ``sampler`` as minibatches of cell positions.

    It yields positions into the loader's ``indices``: minibatches (sequences or tensors of
    positions) are passed on; single positions are grouped into minibatches of ``batch_size``.
    """

    def __init__(self, sampler, indices: torch.Tensor, batch_size: int, drop_last: bool):
        self.sampler, self.indices = sampler, indices
        self.batch_size, self.drop_last = batch_size, drop_last
        self._single = None  # whether the sampler yields single positions (known once iterated)

    @staticmethod
    def _is_single(item) -> bool:
        return isinstance(item, numbers.Integral) or (
            isinstance(item, torch.Tensor | np.ndarray) and item.ndim == 0
        )

    def _cells(self, positions) -> torch.Tensor:
        pos = torch.as_tensor(np.asarray(positions, dtype=np.int64).reshape(-1))
        n = len(self.indices)
        if len(pos) and (int(pos.min()) < 0 or int(pos.max()) >= n):
            raise IndexError(
                f"sampler yielded position {int(pos.max() if pos.max() >= n else pos.min())}; "
                f"positions index the loader's {n} cells (`indices`), so they must lie in "
                f"[0, {n})."
            )
        return self.indices[pos]

    def __iter__(self):
        pending = []
        for item in self.sampler:
            if self._single is None:
                self._single = self._is_single(item)
            if not self._single:
                yield self._cells(item)
                continue
            pending.append(int(item))
            if len(pending) == self.batch_size:
                yield self._cells(pending)
                pending = []
        if pending and not self.drop_last:
            yield self._cells(pending)

    def __len__(self) -> int:
        if self._single is None:
            if isinstance(self.sampler, torch.utils.data.BatchSampler):
                self._single = False
            else:
                first = next(iter(self.sampler), None)
                self._single = first is None or self._is_single(first)
        n = len(self.sampler)
        if not self._single:
            return n
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class _KeyedDataset(torch.utils.data.Dataset):
    """Minibatches of the requested keys in their requested dtypes (one gather per call)."""

    def __init__(self, store: TensorStore, dtypes: dict, sparse_keys, iter_ndarray: bool):
        self.store, self.dtypes = store, dtypes
        self.sparse_keys, self.iter_ndarray = tuple(sparse_keys), iter_ndarray
        self._memory = StoreDataset(store)
        self._buffered = BufferedStoreDataset(store) if store.on_disk else None

    def __len__(self) -> int:
        return self.store.n_obs

    def __getitem__(self, item) -> dict:
        if isinstance(item, tuple):  # a block-shuffled minibatch of counts on disk
            raw = self._buffered[item]
        else:
            idx = torch.as_tensor(np.asarray(item, dtype=np.int64).reshape(-1))
            raw = self.store.gather(idx, sparse_keys=self.sparse_keys)
        return {key: self._convert(key, raw[key]) for key in self.dtypes}

    def _convert(self, key: str, value):
        dtype = self.dtypes[key]
        if key in self.sparse_keys:
            if isinstance(value, torch.Tensor):  # read densely from a disk buffer
                csr = value.to_sparse_csr()
                parts = (csr.values(), csr.col_indices(), csr.crow_indices())
                value = SparseRows(*parts, n_cols=value.shape[1])
            if self.iter_ndarray:
                arrays = (t.numpy() for t in (value.values, value.indices, value.offsets))
                data, indices, indptr = arrays
                return sparse.csr_matrix(
                    (data.astype(dtype, copy=False), indices, indptr), shape=value.shape
                )
            with warnings.catch_warnings():  # torch: "Sparse CSR tensor support is in beta"
                warnings.filterwarnings("ignore", "Sparse CSR tensor support", UserWarning)
                return torch.sparse_csr_tensor(
                    value.offsets,
                    value.indices,
                    value.values.to(_torch_dtype(dtype)),
                    size=value.shape,
                    check_invariants=False,  # rows of a canonical CSR matrix
                )
        if self.iter_ndarray:
            return value.numpy().astype(dtype, copy=False)
        return value.to(_torch_dtype(dtype))


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def _key_dtypes(manager, data_and_attributes) -> dict:
    """``{registry_key: numpy dtype}`` of the keys to load, checked against the registry."""
    registered = list(manager.data_registry)

    def default(key):
        return np.dtype(np.int64 if key in _INT_KEYS else np.float32)

    if data_and_attributes is None:
        return {key: default(key) for key in registered}
    if isinstance(data_and_attributes, dict):
        requested = dict(data_and_attributes)
    elif isinstance(data_and_attributes, list | tuple):
        requested = {key: None for key in data_and_attributes}
    else:
        raise TypeError(
            "data_and_attributes must be a list of registry keys, a dict registry key -> "
            f"numpy dtype, or None (all keys); got {type(data_and_attributes).__name__}."
        )
    out = {}
    for key, dtype in requested.items():
        if key not in registered and key != REGISTRY_KEYS.INDICES_KEY:
            raise KeyError(
                f"data_and_attributes: {key!r} is not a registered key holding data; the "
                f"registered keys are {registered} (plus {REGISTRY_KEYS.INDICES_KEY!r}, the "
                "cell positions)."
            )
        try:
            out[key] = default(key) if dtype is None else np.dtype(dtype)
            _torch_dtype(out[key])
        except (TypeError, ValueError):
            raise TypeError(
                f"data_and_attributes[{key!r}]={dtype!r} is not a numeric numpy dtype "
                "(e.g. np.float32, np.int64)."
            ) from None
    return out


class AnnDataLoader(torch.utils.data.DataLoader):
    """Minibatches ``{registry_key: tensor}`` of the cells of a registered AnnData.

    The scvi-tools loader, over cellvi's tensor stores: the registered arrays are gathered
    once into contiguous tensors (sparse counts stay CSR; counts on disk stay there) and each
    minibatch is one vectorised gather (a batch sampler, torch's auto-batching off).

    Parameters
    ----------
    adata_manager
        A registered manager, e.g. ``model.adata_manager``.
    indices
        Cell positions or a boolean mask over all cells (default: all cells, in order).
    batch_size
        Cells per minibatch; the last one may be smaller (kept even with one cell).
    shuffle
        Shuffle the cells; the order depends only on ``settings.seed`` and the epoch, which
        advances on each pass over the loader (``set_epoch`` also selects it). Counts on disk
        are block-shuffled (contiguous reads, see :class:`BlockShuffleSampler`).
    sampler
        Own sampling. It yields positions *into* ``indices`` (``0 .. len(indices) - 1``),
        either whole minibatches (lists or tensors of positions, e.g. a
        :class:`~torch.utils.data.BatchSampler`) or single positions (e.g.
        :class:`~torch.utils.data.SubsetRandomSampler`), then grouped into minibatches of
        ``batch_size`` (``drop_last`` applies). Not with ``shuffle`` or ``distributed_sampler``.
    drop_last
        Drop a short last minibatch.
    drop_dataset_tail
        With ``distributed_sampler``: drop the cells that do not divide evenly over the ranks
        instead of repeating some.
    data_and_attributes
        Registry keys to load: a list (int64 for ``batch``, ``labels``,
        ``extra_categorical_covs`` and ``ind_x``, float32 otherwise), a dict key -> numpy dtype,
        or None for every registered key. ``"ind_x"`` (cell positions) may always be asked for.
    iter_ndarray
        Yield numpy arrays (sparse counts: scipy CSR matrices) instead of tensors.
    distributed_sampler
        Each rank of the initialised ``torch.distributed`` process group iterates its own share
        of the cells (``batch_size`` is per rank).
    load_sparse_tensor
        Sparse counts come as ``torch.sparse_csr_tensor`` minibatches instead of dense ones.
    **dataloader_kwargs
        Passed to :class:`~torch.utils.data.DataLoader`; ``num_workers`` and
        ``persistent_workers`` default to ``settings.dl_num_workers`` and
        ``settings.dl_persistent_workers``.

    Examples
    --------
    >>> import cellvi
    >>> adata = cellvi.data.synthetic_iid(batch_size=50, n_genes=20, n_batches=2)
    >>> cellvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    >>> model = cellvi.model.SCVI(adata)
    >>> loader = AnnDataLoader(model.adata_manager, indices=[0, 1, 2, 60],
    ...                        batch_size=3, data_and_attributes=["X", "batch"])
    >>> [(tuple(b["X"].shape), b["batch"].ravel().tolist()) for b in loader]
    [((3, 20), [0, 0, 0]), ((1, 20), [1])]
    """

    def __init__(
        self,
        adata_manager,
        indices=None,
        batch_size: int = 128,
        shuffle: bool = False,
        sampler=None,
        drop_last: bool = False,
        drop_dataset_tail: bool = False,
        data_and_attributes: list[str] | dict | None = None,
        iter_ndarray: bool = False,
        distributed_sampler: bool = False,
        load_sparse_tensor: bool = False,
        **dataloader_kwargs,
    ):
        batch_size = check_count(batch_size, "batch_size")
        if sampler is not None and distributed_sampler:
            raise ValueError(
                "sampler and distributed_sampler=True both choose the minibatches; give one."
            )
        if sampler is not None and shuffle:
            raise ValueError(
                "shuffle=True with a sampler: the sampler sets the order; drop shuffle or "
                "shuffle inside the sampler."
            )
        reserved = [k for k in _RESERVED_KWARGS if k in dataloader_kwargs]
        if reserved:
            raise TypeError(
                f"AnnDataLoader sets {reserved} itself; use its batch_size/shuffle/sampler/"
                "drop_last arguments instead."
            )
        if iter_ndarray and "collate_fn" in dataloader_kwargs:
            raise ValueError("iter_ndarray=True sets collate_fn itself; give one of them.")
        n_obs = int(adata_manager.summary_stats["n_cells"])
        positions = np.arange(n_obs) if indices is None else _positions(indices, n_obs)
        if positions.size and (positions.min() < 0 or positions.max() >= n_obs):
            bad = positions[(positions < 0) | (positions >= n_obs)][0]
            raise IndexError(f"indices holds position {bad}; cells are numbered 0 to {n_obs - 1}.")
        self.indices = positions
        self.adata_manager = adata_manager  # outputs take the loader: model.get_...(dataloader=)
        dtypes = _key_dtypes(adata_manager, data_and_attributes)
        store = TensorStore.from_manager(
            adata_manager, [k for k in dtypes if k != REGISTRY_KEYS.INDICES_KEY]
        )
        sparse_keys = [
            k
            for k, t in store.tensors.items()
            if load_sparse_tensor and isinstance(t, CSRTensor | DiskRows)
        ]
        self.dataset = _KeyedDataset(store, dtypes, sparse_keys, iter_ndarray)
        batches = self._batches(
            store, sampler, batch_size, shuffle, drop_last, distributed_sampler, drop_dataset_tail
        )
        workers = dataloader_kwargs.pop("num_workers", settings.dl_num_workers)
        persistent = dataloader_kwargs.pop("persistent_workers", settings.dl_persistent_workers)
        if workers > 0 and not store.fork_safe:  # TileDB-SOMA: reopened in spawned workers
            dataloader_kwargs.setdefault("multiprocessing_context", "spawn")
        if iter_ndarray:
            dataloader_kwargs["collate_fn"] = _identity
        super().__init__(
            self.dataset,
            sampler=batches,
            batch_size=None,
            num_workers=workers,
            persistent_workers=bool(persistent) and workers > 0,
            **dataloader_kwargs,
        )

    def _batches(self, store, sampler, batch_size, shuffle, drop_last, distributed, tail):
        positions = torch.as_tensor(self.indices, dtype=torch.int64)
        if sampler is not None:
            return _UserBatches(sampler, positions, batch_size, drop_last)
        rank, world = 0, 1
        if distributed:
            dist = torch.distributed
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "distributed_sampler=True needs an initialised torch.distributed process "
                    "group (torch.distributed.init_process_group, or create the loader inside "
                    "a DDP run)."
                )
            rank, world = dist.get_rank(), dist.get_world_size()
        seed = settings.seed
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**31))
        common = dict(
            drop_last=drop_last, seed=seed, rank=rank, world_size=world, drop_dataset_tail=tail
        )
        if store.on_disk and shuffle:
            return _BlockBatches(
                positions,
                batch_size,
                shuffle,
                chunk_size=settings.dl_chunk_size,
                buffer_size=settings.dl_buffer_size,
                **common,
            )
        return _Batches(positions, batch_size, shuffle, **common)
