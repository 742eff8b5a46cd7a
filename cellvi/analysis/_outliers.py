"""Outlier cells of a group in latent space: a robust (minimum covariance determinant)
Gaussian envelope, as used by DE's ``filter_outlier_cells`` (``analysis.md`` §4.1).

The location and shape come from FastMCD (Rousseeuw & Van Driessen 1999): from random
``(p + 1)``-point starts, concentration steps keep the ``h = (n + p + 1) / 2`` points closest
in Mahalanobis distance until the covariance determinant stops falling; the best fit is then
re-weighted with the points inside the 97.5 % chi-square quantile. The ``contamination``
fraction of cells farthest from that fit are the outliers (the elliptic-envelope rule).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["robust_inliers"]


def robust_inliers(
    points: np.ndarray, contamination: float = 0.1, n_starts: int = 30, seed: int = 0
) -> np.ndarray | None:
    """Boolean mask of the inliers of ``points`` ``(n, p)``, or None when no robust fit exists
    (too few points for the dimension, or a singular covariance at every start).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> cloud = np.vstack([rng.normal(size=(95, 2)), rng.normal(8, 0.1, size=(5, 2))])
    >>> keep = robust_inliers(cloud)
    >>> bool(keep[:95].mean() > 0.85), bool(keep[95:].any())
    (True, False)
    """
    x = np.asarray(points, dtype=np.float64)
    n, p = x.shape
    if n < 2 * (p + 1):
        return None
    h = (n + p + 1) // 2
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_starts):
        start = rng.choice(n, size=p + 1, replace=False)
        fit = _concentrate(x, x[start], h)
        if fit is not None and (best is None or fit[2] < best[2]):
            best = fit
    if best is None:
        return None
    location, covariance, _ = best
    dist = _mahalanobis(x, location, covariance)
    if dist is None:
        return None
    # consistency factor, then re-weighting with the points inside the 97.5 % quantile
    dist = dist * (stats.chi2(p).ppf(0.5) / np.median(dist))
    core = x[dist < stats.chi2(p).ppf(0.975)]
    if len(core) > p:
        location, covariance = core.mean(0), np.cov(core, rowvar=False, bias=True)
        refit = _mahalanobis(x, location, covariance)
        dist = dist if refit is None else refit
    return dist <= np.percentile(dist, 100 * (1 - contamination))


def _concentrate(x, subset, h, max_steps: int = 30):
    """C-steps from ``subset``: ``(location, covariance, log det)`` or None if singular."""
    location, covariance = subset.mean(0), np.cov(subset, rowvar=False, bias=True)
    best = None
    for _ in range(max_steps):
        dist = _mahalanobis(x, location, covariance)
        if dist is None:
            return best
        keep = x[np.argpartition(dist, h - 1)[:h]]
        location, covariance = keep.mean(0), np.cov(keep, rowvar=False, bias=True)
        sign, logdet = np.linalg.slogdet(np.atleast_2d(covariance))
        if sign <= 0:
            return best
        if best is not None and logdet >= best[2] - 1e-12:
            break
        best = (location, covariance, logdet)
    return best


def _mahalanobis(x, location, covariance):
    """Squared Mahalanobis distances, or None for a singular covariance."""
    try:
        chol = np.linalg.cholesky(np.atleast_2d(covariance))
    except np.linalg.LinAlgError:
        return None
    z = np.linalg.solve(chol, (x - location).T)
    return (z * z).sum(0)
