"""Data loaders: one dataset call per minibatch, no per-cell Python work."""

from __future__ import annotations

import warnings

import torch

from .._settings import settings
from ..errors import CellviWarning
from ._blocks import BlockShuffleSampler, BufferedStoreDataset
from ._samplers import BatchIndexSampler
from ._tensors import TensorStore

__all__ = ["make_dataloader", "StoreDataset"]


class StoreDataset(torch.utils.data.Dataset):
    """A dataset whose items are whole minibatches: ``dataset[idx_tensor]`` → dict."""

    def __init__(self, store: TensorStore):
        self.store = store

    def __len__(self) -> int:
        return self.store.n_obs

    def __getitem__(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.store.gather(idx)


def make_dataloader(
    store: TensorStore,
    indices,
    batch_size: int,
    shuffle: bool,
    *,
    drop_last: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_dataset_tail: bool = False,
    exact_shards: bool = False,
    num_workers: int | None = None,
    persistent_workers: bool | None = None,
    pin_memory: bool = False,
    chunk_size: int | None = None,
    buffer_size: int | None = None,
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` yielding minibatch dicts gathered from ``store``.

    Torch's automatic batching is off: the sampler yields index batches and the dataset
    gathers each in one vectorised call. When the counts are on disk, batches are
    block-shuffled (:class:`BlockShuffleSampler`; ``chunk_size``/``buffer_size`` default to
    ``settings.dl_chunk_size``/``settings.dl_buffer_size``).
    """
    common = dict(
        drop_last=drop_last,
        seed=seed,
        rank=rank,
        world_size=world_size,
        drop_dataset_tail=drop_dataset_tail,
        exact_shards=exact_shards,
    )
    if store.on_disk:
        sampler = BlockShuffleSampler(
            indices,
            batch_size,
            shuffle,
            chunk_size=chunk_size or settings.dl_chunk_size,
            buffer_size=buffer_size or settings.dl_buffer_size,
            **common,
        )
        dataset = BufferedStoreDataset(store)
    else:
        sampler = BatchIndexSampler(indices, batch_size, shuffle, **common)
        dataset = StoreDataset(store)
    workers = settings.dl_num_workers if num_workers is None else num_workers
    if store.on_disk and workers > 1:
        warnings.warn(
            f"num_workers={workers} with counts on disk: minibatches of one buffer go to "
            "different workers, so each worker reads every buffer. num_workers=1 already "
            "overlaps reading with training.",
            CellviWarning,
            stacklevel=3,
        )
    persistent = (
        settings.dl_persistent_workers if persistent_workers is None else persistent_workers
    )
    # a source that cannot be used after fork (TileDB-SOMA) is reopened in spawned workers
    # (kept alive across epochs: starting a spawned worker re-imports torch)
    context = "spawn" if workers > 0 and not store.fork_safe else None
    persistent = persistent or context == "spawn"
    return torch.utils.data.DataLoader(
        dataset,
        multiprocessing_context=context,
        sampler=sampler,
        batch_size=None,
        num_workers=workers,
        persistent_workers=persistent and workers > 0,
        pin_memory=pin_memory,
    )
