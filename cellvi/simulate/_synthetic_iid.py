"""``synthetic_iid``: structure-free data with the scvi-tools signature (API/crash tests)."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

from ..errors import InvalidDataError
from ._rna import _integer

__all__ = ["synthetic_iid"]


def synthetic_iid(
    batch_size: int = 200,
    n_genes: int = 100,
    n_proteins: int = 100,
    n_regions: int = 100,
    n_batches: int = 2,
    n_labels: int = 3,
    dropout_ratio: float = 0.7,
    sparse_format: str | None = None,
    generate_coordinates: bool = False,
    return_mudata: bool = False,
    *,
    rna_dist: str = "nb",
    seed: int = 0,
    batch_key: str = "batch",
    labels_key: str = "labels",
):
    """I.i.d. counts for shape, API and crash tests (``analysis.md`` §5.1); no structure.

    Every entry of ``X`` is ``NB(5, 0.3)`` (mean 11.7) kept with probability
    ``dropout_ratio`` (the name is inverted, as in the reference: 0.7 keeps 70 % of entries).
    ``n_obs = batch_size * n_batches``; batches are contiguous blocks, labels uniform at
    random. Never use it to judge accuracy.

    Parameters
    ----------
    batch_size
        Cells per batch.
    n_genes, n_proteins, n_regions
        Features of each modality (0 skips proteins/regions).
    n_batches, n_labels
        Number of batch and label categories (``n_labels=0``: no labels column).
    dropout_ratio
        Probability that an entry is kept.
    sparse_format
        ``None`` (dense), ``"csr_matrix"`` or ``"csc_matrix"``.
    generate_coordinates
        Add 2-D ``obsm["coordinates"]``.
    return_mudata
        Return a MuData with modalities ``rna``, ``protein_expression``, ``accessibility``.
    rna_dist
        ``"nb"`` or ``"normal"`` (N(5, 2)).
    seed
        Random seed.
    batch_key, labels_key
        Names of the obs columns.

    Examples
    --------
    >>> from cellvi.data import synthetic_iid
    >>> synthetic_iid().shape
    (400, 100)
    """
    if sparse_format not in (None, "csr_matrix", "csc_matrix"):
        raise InvalidDataError(
            f"sparse_format={sparse_format!r}: use None, 'csr_matrix' or 'csc_matrix'."
        )
    if rna_dist not in ("nb", "normal"):
        raise InvalidDataError(f"rna_dist={rna_dist!r}: use 'nb' or 'normal'.")
    for name, value, minimum in (
        ("batch_size", batch_size, 1),
        ("n_genes", n_genes, 1),
        ("n_proteins", n_proteins, 0),
        ("n_regions", n_regions, 0),
        ("n_batches", n_batches, 1),
        ("n_labels", n_labels, 0),
    ):
        _integer(name, value, minimum)
    if not 0 < dropout_ratio <= 1:
        raise InvalidDataError(f"dropout_ratio={dropout_ratio!r} must be in (0, 1].")
    rng = np.random.default_rng(seed)
    n_obs = batch_size * n_batches

    def counts(n_features: int, masked: bool) -> np.ndarray:
        values = rng.negative_binomial(5, 0.3, size=(n_obs, n_features)).astype(np.float32)
        if masked:
            values *= rng.binomial(1, dropout_ratio, size=values.shape)
        return values

    def fmt(matrix: np.ndarray):
        if sparse_format == "csr_matrix":
            return sparse.csr_matrix(matrix)
        if sparse_format == "csc_matrix":
            return sparse.csc_matrix(matrix)
        return matrix

    if rna_dist == "nb":
        x = counts(n_genes, masked=True)
        empty = np.flatnonzero(x.sum(axis=1) == 0)
        x[empty, 0] = 1.0  # guard: no all-zero cell (practically never needed)
    else:
        x = rng.normal(5, 2, size=(n_obs, n_genes)).astype(np.float32)
    columns = {
        batch_key: pd.Categorical(np.repeat([f"batch_{i}" for i in range(n_batches)], batch_size))
    }
    if n_labels:  # as in scvi-tools, n_labels=0 leaves out the labels column
        columns[labels_key] = pd.Categorical(
            rng.choice([f"label_{k}" for k in range(n_labels)], size=n_obs)
        )
    obs = pd.DataFrame(columns, index=[str(i) for i in range(n_obs)])
    var = pd.DataFrame(index=[f"gene_{i}" for i in range(n_genes)])
    adata = anndata.AnnData(X=fmt(x), obs=obs, var=var)
    protein = counts(n_proteins, masked=False) if n_proteins else None
    access = counts(n_regions, masked=True) if n_regions else None
    if protein is not None:
        adata.obsm["protein_expression"] = fmt(protein)
        adata.uns["protein_names"] = np.array([f"protein_{i}" for i in range(n_proteins)])
    if access is not None:
        adata.obsm["accessibility"] = fmt(access)
    if generate_coordinates:
        adata.obsm["coordinates"] = rng.normal(0, 1, size=(n_obs, 2)).astype(np.float32)
    if not return_mudata:
        return adata
    try:
        import mudata
    except ImportError as err:
        raise ImportError(
            "return_mudata=True needs the optional package mudata: pip install 'cellvi[mudata]'"
        ) from err
    mods = {"rna": anndata.AnnData(X=adata.X, var=var)}
    if protein is not None:
        mods["protein_expression"] = anndata.AnnData(X=fmt(protein))
    if access is not None:
        mods["accessibility"] = anndata.AnnData(X=fmt(access))
    mdata = mudata.MuData(mods)
    mdata.obs = obs.copy()
    return mdata
