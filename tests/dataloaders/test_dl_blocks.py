"""Block-shuffled loading of counts on disk: coverage, determinism, contiguity, bounded buffers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cellvi
from cellvi.dataloaders import BlockShuffleSampler, TensorStore, make_dataloader


def _epoch(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("n,batch", [(1000, 64), (1001, 64), (1025, 128), (90, 32)])
def test_every_cell_once_per_epoch_and_length_matches(n, batch):
    indices = np.random.default_rng(0).permutation(5000)[:n]
    sampler = BlockShuffleSampler(indices, batch, True, chunk_size=50, buffer_size=300, seed=4)
    items = _epoch(sampler)
    cells = torch.cat([b for _, _, b, _ in items]).numpy()
    assert len(items) == len(sampler)
    assert sorted(cells) == sorted(indices)
    assert all(len(b) <= batch + 1 for _, _, b, _ in items) and all(
        len(b) > 1 for _, _, b, _ in items
    )
    for _, rows, batch_cells, _ in items:  # a minibatch is drawn from its buffer
        assert np.isin(batch_cells.numpy(), rows.numpy()).all()


def test_order_is_a_function_of_seed_and_epoch():
    def cells(seed, epoch):
        sampler = BlockShuffleSampler(
            np.arange(2000), 100, True, chunk_size=64, buffer_size=500, seed=seed
        )
        return torch.cat([b for _, _, b, _ in _epoch(sampler, epoch)])

    assert torch.equal(cells(1, 3), cells(1, 3))
    assert not torch.equal(cells(1, 3), cells(1, 4))
    assert not torch.equal(cells(1, 3), cells(2, 3))
    assert not torch.equal(cells(1, 3), torch.arange(2000))


def test_buffers_are_bounded_and_made_of_whole_chunks():
    sampler = BlockShuffleSampler(
        np.arange(10_000), 128, True, chunk_size=256, buffer_size=2048, seed=0
    )
    buffers = {key: rows for key, rows, _, _ in _epoch(sampler)}
    assert len(buffers) == 5
    for rows in buffers.values():
        assert len(rows) <= 2048
        runs = 1 + int((np.diff(rows.numpy()) != 1).sum())
        assert runs <= 2048 // 256 + 1  # contiguous reads: about one per chunk


def test_no_shuffle_reads_in_file_order():
    sampler = BlockShuffleSampler(np.arange(700)[::-1], 100, False, chunk_size=64, buffer_size=300)
    items = _epoch(sampler)
    assert torch.equal(torch.cat([b for _, _, b, _ in items]), torch.arange(700))
    assert all(torch.equal(rows, b) for _, rows, b, _ in items)  # one read per minibatch


def test_distributed_ranks_get_disjoint_equal_shares_of_whole_chunks():
    shares = []
    for rank in range(3):
        sampler = BlockShuffleSampler(
            np.arange(3000),
            100,
            True,
            chunk_size=100,
            buffer_size=400,
            seed=0,
            rank=rank,
            world_size=3,
        )
        items = _epoch(sampler, 2)
        assert len(items) == len(sampler)
        shares.append(torch.cat([b for _, _, b, _ in items]).numpy())
    assert len({len(s) for s in shares}) == 1
    assert len(np.unique(np.concatenate(shares))) == 3000


def test_disk_loader_yields_the_same_minibatches_as_memory(tmp_path):
    adata = cellvi.data.simulate(n_cells=500, n_genes=40, n_batches=2, n_cell_types=2, seed=1)
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    backed = cellvi.data.read_backed(path)
    arrays = {"X": backed.X, "batch": adata.obs["batch"].cat.codes.to_numpy()}
    disk = TensorStore(arrays)
    memory = TensorStore({**arrays, "X": adata.X})
    assert disk.on_disk == ["X"] and memory.on_disk == []
    loader = make_dataloader(disk, np.arange(500), 64, True, seed=3, chunk_size=32, buffer_size=128)
    seen = []
    for batch in loader:
        expected = memory.gather(batch["ind_x"].ravel())
        for key in ("X", "batch"):
            torch.testing.assert_close(batch[key], expected[key], rtol=0, atol=0)
        seen.append(batch["ind_x"].ravel())
    assert len(torch.cat(seen)) == 500
    sizes = []
    dataset = loader.dataset
    for item in loader.sampler:
        dataset[item]
        sizes.append(dataset._buffer["X"].shape[0] if dataset._buffer else 0)
    assert 0 < max(sizes) <= 128  # only the current buffer is in memory...
    assert sizes[-1] == 0  # ...and none once the epoch is over
