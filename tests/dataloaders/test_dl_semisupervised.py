"""Semi-supervised splitting keeps the labeled ratio and caps labeled cells per class."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from cellvi.dataloaders import SemiSupervisedDataSplitter


class LabelManager:
    def __init__(self, n=400, seed=0):
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, 3, n)  # codes 0-2 labeled; 3 = unlabeled
        self.labels[: n // 2] = 3
        x = sp.csr_matrix(rng.poisson(2.0, (n, 10)).astype(np.float32) + 1)
        self.arrays = {"X": x, "labels": self.labels}
        self.data_registry = {"X": {}, "labels": {}}
        self.summary_stats = {"n_cells": n}

    def get_from_registry(self, key):
        return self.arrays[key]

    def get_state_registry(self, key):
        return {"categorical_mapping": ["A", "B", "C", "unk"], "unlabeled_category": "unk"}


def test_every_set_keeps_the_labeled_ratio():
    manager = LabelManager()
    splitter = SemiSupervisedDataSplitter(manager, train_size=0.8, validation_size=0.1)
    splitter.setup()
    for idx in (splitter.train_idx, splitter.val_idx, splitter.test_idx):
        assert abs((manager.labels[idx] != 3).mean() - 0.5) < 0.02
    all_idx = np.concatenate([splitter.train_idx, splitter.val_idx, splitter.test_idx])
    assert sorted(all_idx.tolist()) == list(range(400))


def test_training_batches_pair_with_capped_labeled_batches():
    manager = LabelManager()
    splitter = SemiSupervisedDataSplitter(manager, n_samples_per_label=5, batch_size=32)
    splitter.setup()
    loader = splitter.train_dataloader()
    seen = []
    for step in loader:
        assert set(step) == {"full", "labeled"}
        seen.append(step["labeled"]["ind_x"].ravel().numpy())
    labeled_cells = np.unique(np.concatenate(seen))
    assert len(labeled_cells) <= 15  # 3 classes x 5 cells
    assert (manager.labels[labeled_cells] != 3).all()
    counts = np.bincount(manager.labels[labeled_cells], minlength=3)
    assert (counts <= 5).all()
    loader.sampler.set_epoch(1)
    redrawn = np.unique(np.concatenate([s["labeled"]["ind_x"].ravel().numpy() for s in loader]))
    assert not np.array_equal(np.sort(redrawn), np.sort(labeled_cells))


def test_without_labeled_cells_it_is_a_plain_splitter():
    manager = LabelManager()
    manager.labels[:] = 3
    splitter = SemiSupervisedDataSplitter(manager)
    splitter.setup()
    batch = next(iter(splitter.train_dataloader()))
    assert "X" in batch


def test_external_indexing_is_kept_as_given():
    manager = LabelManager(n=40)
    train, val = np.arange(30), np.arange(30, 40)
    splitter = SemiSupervisedDataSplitter(manager, external_indexing=[train, val])
    splitter.setup()
    np.testing.assert_array_equal(splitter.train_idx, train)
    np.testing.assert_array_equal(splitter.val_idx, val)


def test_labeled_minibatches_never_hold_a_single_cell():
    manager = LabelManager()
    labeled = np.flatnonzero(manager.labels != 3)
    manager.labels[labeled[65:]] = 3  # 65 labeled cells: 64 + 1 at batch size 64
    splitter = SemiSupervisedDataSplitter(manager, train_size=1.0, batch_size=64)
    splitter.setup()
    sizes = [len(step["labeled"]["ind_x"]) for step in splitter.train_dataloader()]
    assert set(sizes) == {65}  # the single cell joined the minibatch before it
    manager.labels[labeled[1:]] = 3  # one labeled cell: it comes twice
    splitter = SemiSupervisedDataSplitter(manager, train_size=1.0, batch_size=64)
    splitter.setup()
    step = next(iter(splitter.train_dataloader()))
    assert step["labeled"]["ind_x"].ravel().tolist() == [labeled[0]] * 2
