"""Embedding quality scores against known labels (no optional dependencies)."""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd

from ..errors import InvalidDataError

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
    x = _embedding(embedding)
    k = _k(k, len(x))
    x = x - x.mean(0)  # same distances; centring keeps the expanded formula's digits
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
    codes, _ = _codes(labels, "labels")
    _same_length(codes, embedding, "labels", "embedding")
    neighbours = codes[knn_indices(embedding, k)]
    votes = np.apply_along_axis(np.bincount, 1, neighbours, minlength=codes.max() + 1)
    return float((votes.argmax(1) == codes).mean())


def batch_mixing(embedding: np.ndarray, batches, cell_types=None, k: int = 15) -> float:
    """How well batches mix: k-NN batch-prediction accuracy, computed within each cell type.

    1.0 means neighbours always share the batch (no mixing); the value for perfect mixing is
    about the share of the largest batch. Lower is better mixed. NaN when there is nothing
    to mix: a single batch, or no cell type with more than ``k + 1`` cells and two batches.
    """
    batches, _ = _codes(batches, "batches")
    embedding = _embedding(embedding)
    _same_length(batches, embedding, "batches", "embedding")
    if cell_types is None:
        if len(np.unique(batches)) < 2:
            return float("nan")
        return knn_label_accuracy(embedding, batches, k)
    types, _ = _codes(cell_types, "cell_types")
    _same_length(types, embedding, "cell_types", "embedding")
    scores, weights = [], []
    for t in np.unique(types):
        mask = types == t
        if mask.sum() > k + 1 and len(np.unique(batches[mask])) > 1:
            scores.append(knn_label_accuracy(embedding[mask], batches[mask], k))
            weights.append(mask.sum())
    return float(np.average(scores, weights=weights)) if scores else float("nan")


def _codes(labels, name: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of a 1-D label vector (any dtype, categorical, mixed); no missing values."""
    values = labels.to_numpy() if hasattr(labels, "to_numpy") else labels
    if not isinstance(values, pd.Categorical):
        values = np.asarray(values)
        if values.ndim != 1:
            raise InvalidDataError(f"{name} must be 1-D, got shape {values.shape}.")
    if len(values) == 0:
        raise InvalidDataError(f"{name} is empty.")
    try:  # sorted codes, as np.unique gave (k-NN votes break ties by the lowest code)
        codes, uniques = pd.factorize(values, sort=True)
    except TypeError:  # mixed types cannot be sorted
        codes, uniques = pd.factorize(values, sort=False)
    if (codes < 0).any():
        raise InvalidDataError(
            f"{name} has {int((codes < 0).sum())} missing values (NaN/None); drop those cells."
        )
    return codes.astype(np.int64), np.asarray(uniques)


def _embedding(embedding) -> np.ndarray:
    x = np.asarray(embedding, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or len(x) == 0:
        raise InvalidDataError(f"embedding must be (n_cells, n_dims), got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise InvalidDataError("embedding has non-finite values (NaN/inf).")
    return x


def _k(k, n: int) -> int:
    if not (isinstance(k, numbers.Integral) and not isinstance(k, bool) and 1 <= k < n):
        raise InvalidDataError(f"k={k!r} must be an integer in [1, n_cells - 1] ({n - 1}).")
    return int(k)


def _same_length(a, b, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise InvalidDataError(f"{name_a} has {len(a)} entries but {name_b} has {len(b)}.")


def kmeans(
    embedding: np.ndarray, n_clusters: int, seed: int = 0, n_iter: int = 100, n_init: int = 5
) -> np.ndarray:
    """Lloyd's k-means with k-means++ starts; returns cluster codes (best of ``n_init``)."""
    x = _embedding(embedding)
    if not (
        isinstance(n_clusters, numbers.Integral)
        and not isinstance(n_clusters, bool)
        and 1 <= n_clusters <= len(x)
    ):
        raise InvalidDataError(
            f"n_clusters={n_clusters!r} must be an integer in [1, n_cells] ({len(x)})."
        )
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        centers = [x[rng.integers(len(x))]]
        for _ in range(1, n_clusters):
            d = ((x[:, None, :] - np.asarray(centers)[None]) ** 2).sum(-1).min(1)
            # fewer distinct points than clusters: every point is a centre already
            p = d / d.sum() if d.sum() > 0 else None
            centers.append(x[rng.choice(len(x), p=p)])
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
    ca, _ = _codes(a, "labels_true")
    cb, _ = _codes(b, "labels_pred")
    _same_length(ca, cb, "labels_true", "labels_pred")
    table = np.zeros((ca.max() + 1, cb.max() + 1))
    np.add.at(table, (ca, cb), 1)
    return table


def adjusted_rand_index(labels_true, labels_pred) -> float:
    """Adjusted Rand index (1 = identical partitions, ~0 = random)."""
    table = _contingency(labels_true, labels_pred)
    comb = lambda v: (v * (v - 1) / 2).sum()  # noqa: E731
    sum_ij, sum_a, sum_b = comb(table), comb(table.sum(1)), comb(table.sum(0))
    n = table.sum()
    if n < 2:  # a single cell: one partition, identical by definition (as sklearn)
        return 1.0
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
