"""Block-shuffled loading for counts on disk: contiguous reads, shuffling inside a memory buffer.

Each epoch the cells are cut into chunks of ``chunk_size`` consecutive rows; chunks are
shuffled, and the resulting order is cut into buffers of ``buffer_size`` cells (a whole number
of minibatches). A buffer is read from disk once (a few contiguous slices), its cells are
shuffled, and its minibatches are gathered from memory. Memory grows with the buffer, not with
the data set; the order is a pure function of (seed, epoch), so resumed runs see the same
minibatches.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._constants import REGISTRY_KEYS
from ._samplers import BatchIndexSampler
from ._tensors import CSRTensor, DiskRows, TensorStore

__all__ = ["BlockShuffleSampler", "BufferedStoreDataset"]


class BlockShuffleSampler(BatchIndexSampler):
    """Yields ``(buffer_key, buffer_rows, batch, last)``: a minibatch, the buffer it is drawn
    from, and whether it is the buffer's last minibatch (the buffer is then released).

    Parameters
    ----------
    indices, batch_size, shuffle, drop_last, seed, rank, world_size, drop_dataset_tail, exact_shards
        As in :class:`BatchIndexSampler`; distributed ranks receive contiguous shares of the
        chunk order, so each rank still reads whole chunks.
    chunk_size
        Consecutive cells read together (default ``settings.dl_chunk_size``).
    buffer_size
        Cells held in memory and shuffled together; rounded down to a multiple of
        ``batch_size`` (at least one minibatch). Without ``shuffle`` (validation, test) a
        buffer is a single minibatch.
    """

    def __init__(
        self,
        indices,
        batch_size: int,
        shuffle: bool,
        *,
        chunk_size: int,
        buffer_size: int,
        **kwargs,
    ):
        super().__init__(indices, batch_size, shuffle, **kwargs)
        if chunk_size < 1 or buffer_size < 1:
            raise ValueError(f"chunk_size={chunk_size} and buffer_size={buffer_size} must be >= 1.")
        self.chunk_size = int(chunk_size)
        # without shuffling, cells come in file order: each minibatch is one contiguous read
        # and nothing needs to be held beyond it
        buffer = int(buffer_size) if shuffle else self.batch_size
        self.buffer_cells = max(1, buffer // self.batch_size) * self.batch_size

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7_919 + salt)

    def _shard(self) -> torch.Tensor:
        order = torch.sort(self.indices).values
        if self.shuffle and len(order) > self.chunk_size:
            chunks = list(torch.split(order, self.chunk_size))
            perm = torch.randperm(len(chunks), generator=self._generator(0))
            order = torch.cat([chunks[i] for i in perm.tolist()])
        if self.world_size == 1:
            return order
        n = len(order)
        if self.exact_shards:  # contiguous shares of sizes differing by at most one
            lo, hi = (n * r // self.world_size for r in (self.rank, self.rank + 1))
            return order[lo:hi]
        if self.drop_dataset_tail:
            per_rank = n // self.world_size
        else:
            per_rank = math.ceil(n / self.world_size)
            pad = per_rank * self.world_size - n
            if pad:
                order = torch.cat([order, order[:pad]])
        return order[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self):
        shard = self._shard().clone()
        bounds = self._bounds(len(shard))
        buffers: dict[int, list[tuple[int, int]]] = {}
        for start, stop in bounds:
            buffers.setdefault(start // self.buffer_cells, []).append((start, stop))
        for number, batches in buffers.items():
            lo, hi = batches[0][0], batches[-1][1]
            if self.shuffle:
                gen = self._generator(1 + number * 104_729 + self.rank)
                shard[lo:hi] = shard[lo:hi][torch.randperm(hi - lo, generator=gen)]
            rows = torch.sort(shard[lo:hi]).values
            key = (self.epoch, self.rank, number)
            for i, (start, stop) in enumerate(batches):
                yield key, rows, shard[start:stop], i == len(batches) - 1


class BufferedStoreDataset(torch.utils.data.Dataset):
    """Minibatches from a :class:`TensorStore` whose counts are on disk.

    Items are ``(buffer_key, buffer_rows, batch, last)`` from :class:`BlockShuffleSampler`:
    the on-disk arrays of a buffer are read once (when its key first appears) and held as
    in-memory CSR until its last minibatch; the other registered arrays are gathered from
    memory as usual. Plain index tensors are also accepted (rows read directly).
    """

    def __init__(self, store: TensorStore):
        self.store = store
        self._key = None
        self._rows = None
        self._buffer: dict[str, CSRTensor] = {}

    def __len__(self) -> int:
        return self.store.n_obs

    def _load(self, key, rows: torch.Tensor) -> None:
        self._buffer = {}  # free the previous buffer before reading the next
        rows_np = rows.numpy()
        for name, tensor in self.store.tensors.items():
            if isinstance(tensor, DiskRows):
                self._buffer[name] = CSRTensor(tensor.source.read_rows(rows_np))
        self._rows, self._key = rows_np, key

    def __getitem__(self, item) -> dict[str, torch.Tensor]:
        if isinstance(item, torch.Tensor):
            return self.store.gather(item)
        key, rows, idx, last = item
        if key != self._key:
            self._load(key, rows)
        local = torch.from_numpy(np.searchsorted(self._rows, idx.numpy()))
        out = {}
        for name, tensor in self.store.tensors.items():
            if name in self._buffer:
                out[name] = self._buffer[name].rows(local)
            elif isinstance(tensor, CSRTensor):
                out[name] = tensor.rows(idx)
            else:
                out[name] = tensor[idx]
        out[REGISTRY_KEYS.INDICES_KEY] = idx.reshape(-1, 1)
        if last:  # nothing else is drawn from this buffer: free it now
            self._buffer, self._rows, self._key = {}, None, None
        return out
