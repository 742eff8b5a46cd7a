"""Embedding quality scores against known labels (no optional dependencies)."""

from __future__ import annotations

import numpy as np

__all__ = [
    "adjusted_rand_index",
    "batch_mixing",
    "kmeans",
    "knn_indices",
    "knn_label_accuracy",
    "normalized_mutual_info",
]


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


def kmeans(
    embedding: np.ndarray, n_clusters: int, seed: int = 0, n_iter: int = 100, n_init: int = 5
) -> np.ndarray:
    """Lloyd's k-means with k-means++ starts; returns cluster codes (best of ``n_init``)."""
    x = np.asarray(embedding, dtype=np.float64)
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        centers = [x[rng.integers(len(x))]]
        for _ in range(1, n_clusters):
            d = ((x[:, None, :] - np.asarray(centers)[None]) ** 2).sum(-1).min(1)
            centers.append(x[rng.choice(len(x), p=d / d.sum())])
        centers = np.asarray(centers)
        for _ in range(n_iter):
            d = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
            codes = d.argmin(1)
            new = np.array(
                [
                    x[codes == k].mean(0) if (codes == k).any() else centers[k]
                    for k in range(n_clusters)
                ]
            )
            if np.allclose(new, centers):
                break
            centers = new
        inertia = d[np.arange(len(x)), codes].sum()
        if inertia < best_inertia:
            best, best_inertia = codes, inertia
    return best


def _contingency(a, b) -> np.ndarray:
    ca, _ = _codes(a)
    cb, _ = _codes(b)
    table = np.zeros((ca.max() + 1, cb.max() + 1))
    np.add.at(table, (ca, cb), 1)
    return table


def adjusted_rand_index(labels_true, labels_pred) -> float:
    """Adjusted Rand index (1 = identical partitions, ~0 = random)."""
    table = _contingency(labels_true, labels_pred)
    comb = lambda v: (v * (v - 1) / 2).sum()  # noqa: E731
    sum_ij, sum_a, sum_b = comb(table), comb(table.sum(1)), comb(table.sum(0))
    n = table.sum()
    expected = sum_a * sum_b / (n * (n - 1) / 2)
    maximum = (sum_a + sum_b) / 2
    return float((sum_ij - expected) / (maximum - expected)) if maximum != expected else 1.0


def normalized_mutual_info(labels_true, labels_pred) -> float:
    """Normalized mutual information (arithmetic-mean normalisation)."""
    p = _contingency(labels_true, labels_pred)
    p /= p.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum()
    ent = lambda q: -(q[q > 0] * np.log(q[q > 0])).sum()  # noqa: E731
    denom = (ent(pa) + ent(pb)) / 2
    return float(mi / denom) if denom > 0 else 1.0
