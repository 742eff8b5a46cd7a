"""Batch samplers whose order is a pure function of (seed, epoch): exact resume, DDP shards."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

__all__ = ["BatchIndexSampler", "minibatch_bounds"]

logger = logging.getLogger("cellvi")


def minibatch_bounds(
    n: int, batch_size: int, drop_last: bool = False, merge_single: bool = True
) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive minibatches over ``n`` cells.

    A short last minibatch is dropped with ``drop_last``; otherwise a last minibatch of a single
    cell is merged into the one before (batch normalisation cannot train on one cell), unless
    ``merge_single`` is False.

    Examples
    --------
    >>> minibatch_bounds(5, 2), minibatch_bounds(5, 2, drop_last=True)
    ([(0, 2), (2, 5)], [(0, 2), (2, 4)])
    """
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if bounds and drop_last and bounds[-1][1] - bounds[-1][0] < batch_size:
        bounds.pop()
    elif merge_single and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2] = (bounds[-2][0], bounds[-1][1])
        bounds.pop()
    return bounds


class BatchIndexSampler(torch.utils.data.Sampler):
    """Yields minibatches of cell positions (``LongTensor``) from ``indices``.

    Parameters
    ----------
    indices
        Positions of the cells to iterate.
    batch_size
        Minibatch size.
    shuffle
        Shuffle every epoch; the order depends only on ``seed`` and the epoch, so a run
        resumed from a checkpoint sees the same minibatches.
    drop_last
        Drop a short final batch. Otherwise a final batch of a single cell is merged into
        the previous one (batch norm cannot train on one cell).
    seed
        Seed of the shuffles.
    rank, world_size
        Distributed training: every rank iterates a disjoint share of the same order.
    drop_dataset_tail
        Distributed: drop the cells that do not divide evenly instead of repeating some.
    exact_shards
        Distributed: every cell goes to exactly one rank, neither repeated nor dropped, so
        shares may differ by one cell (validation and test sets, whose metrics are sums
        over ranks).
    """

    def __init__(
        self,
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
    ):
        self.indices = torch.as_tensor(np.ascontiguousarray(indices, dtype=np.int64))
        self.exact_shards = exact_shards
        self.batch_size = int(batch_size)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, int(seed or 0)
        self.rank, self.world_size = rank, world_size
        self.drop_dataset_tail = drop_dataset_tail
        self.epoch = 0
        self._merge_said = False

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order to produce (Lightning calls this every epoch)."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])

    def _shard(self) -> torch.Tensor:
        order = self.indices
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = order[torch.randperm(len(order), generator=gen)]
        if self.world_size == 1:
            return order
        n = len(order)
        if self.exact_shards:
            return order[self.rank : n : self.world_size]
        if self.drop_dataset_tail:
            per_rank = n // self.world_size
            order = order[: per_rank * self.world_size]
        else:
            per_rank = math.ceil(n / self.world_size)
            pad = per_rank * self.world_size - n
            if pad:
                order = torch.cat([order, order[:pad]])
        return order[self.rank : len(order) : self.world_size]

    def _bounds(self, n: int) -> list[tuple[int, int]]:
        return minibatch_bounds(n, self.batch_size, drop_last=self.drop_last)

    def __iter__(self):
        shard = self._shard()
        bounds = self._bounds(len(shard))
        if len(bounds) and bounds[-1][1] - bounds[-1][0] == self.batch_size + 1:
            if not self._merge_said:
                logger.info(
                    "The last minibatch would hold a single cell; it was merged into the one "
                    "before so batch normalisation can train on it."
                )
                self._merge_said = True
        for start, stop in bounds:
            yield shard[start:stop]

    def __len__(self) -> int:
        n = len(self.indices)
        if self.world_size > 1:
            n = n // self.world_size if self.drop_dataset_tail else math.ceil(n / self.world_size)
        return len(self._bounds(n))
