"""Embedding quality scores against known labels (no optional dependencies)."""

from __future__ import annotations

import numpy as np

__all__ = ["knn_label_accuracy", "batch_mixing", "knn_indices"]


def knn_indices(embedding: np.ndarray, k: int = 15, chunk: int = 2048) -> np.ndarray:
    """Indices of the ``k`` nearest neighbours of every cell (itself excluded), Euclidean."""
    x = np.asarray(embedding, dtype=np.float64)
    sq = (x**2).sum(1)
    out = np.empty((x.shape[0], k), dtype=np.int64)
    for start in range(0, x.shape[0], chunk):
        block = x[start : start + chunk]
        d = sq[start : start + chunk, None] + sq[None, :] - 2 * block @ x.T
        d[np.arange(len(block)), np.arange(start, start + len(block))] = np.inf
        part = np.argpartition(d, k, axis=1)[:, :k]
        order = np.take_along_axis(d, part, 1).argsort(1)
        out[start : start + chunk] = np.take_along_axis(part, order, 1)
    return out


def knn_label_accuracy(embedding: np.ndarray, labels, k: int = 15) -> float:
    """Leave-one-out k-NN majority-vote accuracy of ``labels`` on ``embedding``."""
    codes, _ = _codes(labels)
    neighbours = codes[knn_indices(embedding, k)]
    votes = np.apply_along_axis(np.bincount, 1, neighbours, minlength=codes.max() + 1)
    return float((votes.argmax(1) == codes).mean())


def batch_mixing(embedding: np.ndarray, batches, cell_types=None, k: int = 15) -> float:
    """How well batches mix: k-NN batch-prediction accuracy, computed within each cell type.

    1.0 means neighbours always share the batch (no mixing); the value for perfect mixing is
    about the share of the largest batch. Lower is better mixed.
    """
    batches = np.asarray(batches)
    if cell_types is None:
        return knn_label_accuracy(embedding, batches, k)
    types = np.asarray(cell_types)
    scores, weights = [], []
    for t in np.unique(types):
        mask = types == t
        if mask.sum() > k + 1 and len(np.unique(batches[mask])) > 1:
            scores.append(knn_label_accuracy(embedding[mask], batches[mask], k))
            weights.append(mask.sum())
    return float(np.average(scores, weights=weights)) if scores else float("nan")


def _codes(labels) -> tuple[np.ndarray, np.ndarray]:
    uniques, codes = np.unique(np.asarray(labels), return_inverse=True)
    return codes.astype(np.int64), uniques
