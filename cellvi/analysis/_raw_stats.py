"""Per-gene raw-count summaries of cell groups for the DE table (``analysis.md`` §4.5)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["group_raw_stats"]

try:  # scipy's compiled kernels y += A @ x, called on a CSR matrix's buffers
    from scipy.sparse._sparsetools import csc_matvecs as _csc_matvecs
    from scipy.sparse._sparsetools import csr_matvec as _csr_matvec
except ImportError:  # pragma: no cover - a scipy that moved them: rows are gathered instead
    _csc_matvecs = _csr_matvec = None


def group_raw_stats(x, groups, chunk: int = 8192) -> list[dict[str, np.ndarray]]:
    """:func:`_raw_stats` of several groups of cells (position arrays) of one matrix.

    For a CSR matrix in memory, all groups are done in one pass over contiguous row ranges,
    without copying the groups' rows: each group is a weight vector over the cells (its
    multiplicities), and the per-gene sums are products ``rows.T @ weights`` by scipy's
    compiled kernel on the matrix's buffers. Products are float32 within ``chunk`` rows and
    accumulate in float64 across them. Other matrices (dense, on disk) read each group's rows.
    """
    if not (sp.issparse(x) and x.format == "csr") or _csc_matvecs is None:
        return [_raw_stats(x, idx) for idx in groups]
    n_obs, n_genes = x.shape
    k = len(groups)
    counts = np.zeros((n_obs, k), dtype=np.float32)  # multiplicity of each cell in each group
    for j, idx in enumerate(groups):
        counts[:, j] = np.bincount(np.asarray(idx, dtype=np.int64), minlength=n_obs)
    sums = np.zeros((n_genes, 3 * k))  # [raw sums, detections, normalized sums] per group
    ones = np.ones(n_genes, dtype=np.float32)
    indptr = x.indptr
    for a in range(0, n_obs, chunk):
        b = min(a + chunk, n_obs)
        p0, p1 = int(indptr[a]), int(indptr[b])
        ptr = indptr[a : b + 1] - p0
        genes = x.indices[p0:p1].astype(ptr.dtype, copy=False)  # one index type for the kernel
        values = np.asarray(x.data[p0:p1], dtype=np.float32)
        totals = np.zeros(b - a, dtype=np.float32)  # exact for integer totals below 2^24
        _csr_matvec(b - a, n_genes, ptr, genes, values, ones, totals)
        w = counts[a:b]
        weights = np.concatenate([w, w * (1e4 / np.maximum(totals, 1))[:, None]], axis=1)
        part = np.zeros((n_genes, 2 * k), dtype=np.float32)  # rows.T @ weights, in place
        _csc_matvecs(n_genes, b - a, 2 * k, ptr, genes, values, weights.ravel(), part.ravel())
        sums[:, :k] += part[:, :k]
        sums[:, 2 * k :] += part[:, k:]
        part = np.zeros((n_genes, k), dtype=np.float32)
        detected = (values != 0).astype(np.float32)
        _csc_matvecs(n_genes, b - a, k, ptr, genes, detected, np.ravel(w), part.ravel())
        sums[:, k : 2 * k] += part
    out = []
    for j, idx in enumerate(groups):
        n = max(len(idx), 1)
        out.append(
            {
                "raw_mean": sums[:, j] / n,
                "non_zeros_proportion": sums[:, k + j] / n,
                "raw_normalized_mean": sums[:, 2 * k + j] / n,
            }
        )
    return out


def _raw_stats(x, idx, chunk: int = 20_000) -> dict[str, np.ndarray]:
    """Per-gene mean count, detection rate and mean of counts x 1e4 / cell total.

    Rows are read ``chunk`` at a time, so a matrix on disk is never loaded whole.
    """
    n_genes = x.shape[1]
    idx = np.asarray(idx)
    sums = {
        k: np.zeros(n_genes) for k in ("raw_mean", "non_zeros_proportion", "raw_normalized_mean")
    }
    for start in range(0, len(idx), chunk):
        rows = idx[start : start + chunk]
        sub = x[np.sort(rows)]
        if not sp.issparse(sub):  # dense block: column sums directly
            sub = np.asarray(sub, dtype=np.float64)
            totals = np.maximum(sub.sum(1), 1)
            sums["raw_mean"] += sub.sum(0)
            sums["non_zeros_proportion"] += (sub > 0).sum(0)
            sums["raw_normalized_mean"] += (sub * (1e4 / totals)[:, None]).sum(0)
            continue
        sub = sub.tocsr()  # scipy's compiled sums and products; float64 accumulation
        totals = np.maximum(np.asarray(sub.sum(1, dtype=np.float64)).ravel(), 1)
        sums["raw_mean"] += np.asarray(sub.sum(0, dtype=np.float64)).ravel()
        stored = sub.indices if sub.data.all() else sub.indices[sub.data != 0]
        sums["non_zeros_proportion"] += np.bincount(stored, minlength=n_genes)
        sums["raw_normalized_mean"] += sub.T @ (1e4 / totals)
    n = max(len(idx), 1)
    return {k: v / n for k, v in sums.items()}
