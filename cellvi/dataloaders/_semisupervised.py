"""Semi-supervised splitting (``data.md`` §2.2): labeled and unlabeled cells split apart."""

from __future__ import annotations

import numpy as np
import torch

from .._constants import REGISTRY_KEYS
from .._settings import settings
from ..errors import check_count
from ._blocks import BlockShuffleSampler, BufferedStoreDataset
from ._samplers import minibatch_bounds
from ._splitter import DataSplitter, split_sizes

__all__ = ["SemiSupervisedDataSplitter", "LabeledStream"]


class LabeledStream:
    """Per-epoch labeled minibatches, at most ``n_samples_per_label`` cells per class.

    The subset is redrawn from ``(seed, epoch)`` each epoch; iteration cycles so it can be
    zipped with the (longer) stream of all cells. With counts on disk the minibatches are
    block-shuffled and read a buffer at a time, like the training stream (``chunk_size``,
    ``buffer_size``: see :class:`BlockShuffleSampler`), not a random row at a time. Under
    DDP (``rank``, ``world_size``) every rank takes its own share of the epoch's subset, as
    it does of all cells (every rank takes the whole subset when it has fewer cells than
    there are ranks).
    """

    def __init__(
        self,
        store,
        indices,
        labels,
        batch_size,
        n_samples_per_label,
        seed,
        chunk_size: int | None = None,
        buffer_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.rank, self.world_size = int(rank), int(world_size)
        self.store, self.indices, self.labels = store, np.asarray(indices), np.asarray(labels)
        self.batch_size, self.n_per_label, self.seed = batch_size, n_samples_per_label, seed
        self.chunk_size = chunk_size or settings.dl_chunk_size
        self.buffer_size = buffer_size or settings.dl_buffer_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def subset(self) -> np.ndarray:
        """Labeled cells used this epoch (capped per class, shuffled)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.n_per_label is None:
            chosen = self.indices
        else:
            parts = []
            for label in np.unique(self.labels):
                cells = self.indices[self.labels == label]
                take = min(self.n_per_label, len(cells))
                parts.append(rng.choice(cells, size=take, replace=False))
            chosen = np.concatenate(parts)
        return rng.permutation(chosen)

    def cycle(self):
        """Minibatches of this epoch's subset, over and over; never one of a single cell
        (merged into the one before; a lone labeled cell comes twice, which leaves its mean
        classification loss unchanged and keeps batch normalisation working)."""
        cells = self.subset()  # the same on every rank (seed and epoch)
        if len(cells) >= self.world_size > 1:
            cells = cells[self.rank :: self.world_size]
        if len(cells) == 1:
            cells = np.repeat(cells, 2)
        # in memory, or just two cells (e.g. the lone one twice): plain gathers; on disk the
        # training stream's buffered reads
        if not self.store.on_disk or len(cells) == 2:
            while True:
                for start, stop in minibatch_bounds(len(cells), self.batch_size):
                    yield self.store.gather(torch.as_tensor(cells[start:stop]))
        sampler = BlockShuffleSampler(
            cells,
            self.batch_size,
            True,
            chunk_size=self.chunk_size,
            buffer_size=self.buffer_size,
            seed=self.seed,
        )
        sampler.set_epoch(self.epoch)
        dataset = BufferedStoreDataset(self.store)
        while True:
            for item in sampler:
                yield dataset[item]


class _PairedLoader:
    """Yields ``{"full": batch, "labeled": batch}``: every training minibatch with a labeled
    minibatch drawn from the cycling labeled stream."""

    def __init__(self, full_loader, labeled: LabeledStream):
        self.full_loader, self.labeled = full_loader, labeled
        self.sampler = full_loader.sampler  # Lightning sets the epoch here

    def __len__(self) -> int:
        return len(self.full_loader)

    def __iter__(self):
        self.labeled.set_epoch(self.sampler.epoch)
        stream = self.labeled.cycle()
        for batch in self.full_loader:
            yield {"full": batch, "labeled": next(stream)}


class SemiSupervisedDataSplitter(DataSplitter):
    """:class:`DataSplitter` that splits labeled and unlabeled cells separately.

    Both groups are split with the same fractions, so every set keeps the labeled ratio.
    The training loader pairs each minibatch with a labeled one (capped at
    ``n_samples_per_label`` cells per class, redrawn every epoch). Without labeled cells it
    behaves like :class:`DataSplitter`.

    Parameters
    ----------
    manager
        Data manager whose ``labels`` state has an ``unlabeled_category`` (last code).
    n_samples_per_label
        Cap of labeled cells per class and epoch (None: all).
    **kwargs
        :class:`DataSplitter` arguments.
    """

    def __init__(self, manager, n_samples_per_label: int | None = None, **kwargs):
        if n_samples_per_label is not None:
            n_samples_per_label = check_count(n_samples_per_label, "n_samples_per_label")
        self.n_samples_per_label = n_samples_per_label
        labels = np.asarray(manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel()
        state = manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
        mapping = list(state["categorical_mapping"])
        unlabeled = state.get("unlabeled_category")
        code = mapping.index(unlabeled) if unlabeled in mapping else -1
        self.labels = labels
        self.labeled_mask = labels != code
        super().__init__(manager, **kwargs)

    def _groups(self) -> tuple[np.ndarray, np.ndarray]:
        return np.flatnonzero(self.labeled_mask), np.flatnonzero(~self.labeled_mask)

    def _split_sizes(self) -> tuple[int, int]:
        """Sums of the per-group sizes, so the last-batch rule sees the real training set."""
        sizes = [
            split_sizes(len(group), self.train_size, self.validation_size)
            for group in self._groups()
            if len(group)
        ]
        return sum(t for t, _ in sizes), sum(v for _, v in sizes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_idx is not None or self.external_indexing is not None:
            super().setup(stage)  # restored split, or the user's own indices
            return
        rng = np.random.RandomState(self.split_seed)
        train, val, test = [], [], []
        for group in self._groups():
            if not len(group):
                continue
            n_train, n_val = split_sizes(len(group), self.train_size, self.validation_size)
            order = rng.permutation(group) if self.shuffle_set_split else group
            val.append(order[:n_val])
            train.append(order[n_val : n_val + n_train])
            test.append(order[n_val + n_train :])
        moved = sum(len(t) for t in train) - self.n_train  # the last-batch rule's cells
        if moved > 0:  # taken from the end: unlabeled training cells when there are any
            cells = np.concatenate(train)
            train, val = [cells[:-moved]], [*val, cells[-moved:]]
        self.train_idx, self.val_idx, self.test_idx = (
            np.concatenate(parts).astype(np.int64) if parts else np.array([], dtype=np.int64)
            for parts in (train, val, test)
        )

    def train_dataloader(self):
        full = super().train_dataloader()
        labeled = self.train_idx[self.labeled_mask[self.train_idx]]
        if not len(labeled):
            return full
        rank, world_size = self._rank_world()
        stream = LabeledStream(
            self.store,
            labeled,
            self.labels[labeled],
            self.batch_size,
            self.n_samples_per_label,
            self.split_seed,
            chunk_size=self.chunk_size,
            buffer_size=self.buffer_size,
            rank=rank,
            world_size=world_size,
        )
        return _PairedLoader(full, stream)
