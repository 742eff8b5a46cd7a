"""Negative-binomial RNA counts with planted cell types, DE genes and batch effects."""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

from ..errors import InvalidDataError

__all__ = ["simulate", "true_pairwise_log2fc"]

_CHUNK = 10_000
_MAX_COUNT = np.iinfo(np.int32).max


def _check(name: str, ok: bool, value, allowed: str) -> None:
    if not ok:
        raise InvalidDataError(f"{name}={value!r} is invalid: {allowed}.")


def _integer(name: str, value, minimum: int) -> int:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    _check(name, ok, value, f"an integer >= {minimum}")
    return int(value)


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)


def _real(name: str, value) -> float:
    _check(name, _finite(value), value, "a finite number")
    return float(value)


def _pair(name: str, value) -> tuple[float, float]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        lo = hi = None
    ok = _finite(lo) and _finite(hi)
    _check(name, ok, value, "need a (low, high) pair of finite numbers")
    return float(lo), float(hi)


def _balanced(rng: np.random.Generator, n: int, k: int, probs: np.ndarray | None) -> np.ndarray:
    """Assignments to k groups in the closest whole shares, shuffled. Every group with a
    positive share gets at least one member (the caller checks that ``n`` allows it)."""
    probs = np.full(k, 1.0 / k) if probs is None else probs
    counts = np.floor(probs * n).astype(int)
    counts[np.argsort(-(probs * n - counts))[: n - counts.sum()]] += 1
    for g in np.flatnonzero((probs > 0) & (counts == 0)):
        counts[np.argmax(counts)] -= 1  # the largest group has more than one member
        counts[g] = 1
    labels = np.repeat(np.arange(k), counts)
    rng.shuffle(labels)
    return labels


def simulate(
    n_cells: int = 2000,
    n_genes: int = 500,
    n_batches: int = 2,
    n_cell_types: int = 3,
    *,
    n_de_genes_per_type: int = 20,
    de_log2fc_range: tuple[float, float] = (1.0, 2.0),
    batch_effect_sd: float = 0.3,
    library_size_log_mean: float = float(np.log(1000)),
    library_size_log_sd: float = 0.3,
    dispersion_range: tuple[float, float] = (2.0, 10.0),
    zero_inflation: float = 0.0,
    cell_type_proportions: Sequence[float] | None = None,
    seed: int = 0,
) -> anndata.AnnData:
    """Simulate UMI counts with known cell types, DE genes and batch effects.

    Recipe (``analysis.md`` §5.2): base expression ``LogNormal(0, 1)`` per gene; each cell
    type gets ``n_de_genes_per_type`` disjoint marker genes, half up by ``2^U(lo, hi)``, half
    down by the same; each batch multiplies genes by ``exp(N(0, batch_effect_sd))``;
    libraries are ``LogNormal(library_size_log_mean, library_size_log_sd)``; counts are
    ``Poisson(Gamma(θ, θ / (L ρ)))`` with ``θ_g ~ U(dispersion_range)``, optionally zeroed
    with probability ``zero_inflation``. A cell whose draw is all zeros gets a count of 1 in
    its most expressed gene, so no cell is empty. Every batch and every cell type with a
    positive share gets at least one cell. With a single cell type there is nothing for a
    marker to differ from, so none is planted (``is_de`` is all False).

    Parameters
    ----------
    n_cells, n_genes, n_batches, n_cell_types
        Sizes.
    n_de_genes_per_type
        Marker genes per type (disjoint across types).
    de_log2fc_range
        Range of the absolute log2 fold change of a marker.
    batch_effect_sd
        Standard deviation of the per-batch, per-gene log factor (0: no batch effect).
    library_size_log_mean, library_size_log_sd
        Log-normal library sizes.
    dispersion_range
        Range of the NB inverse dispersion θ.
    zero_inflation
        Probability of zeroing each entry (0 to <1).
    cell_type_proportions
        Shares of the cell types (default equal).
    seed
        Random seed; the same seed gives the same data.

    Returns
    -------
    AnnData with CSR int32 counts in ``X``; ``obs["batch"]``, ``obs["cell_type"]``,
    ``obs["true_library"]``; ``var["true_dispersion"]``, ``var["is_de"]``,
    ``var["base_expression"]``; ``varm["true_lfc"]`` (genes × types: log2 of each type's
    batch-free profile over the mean of the other types); ``uns["simulation"]`` (every
    argument, enough to rebuild the data, plus ``type_profiles``, ``batch_factors``,
    ``de_genes``). A cell's batch-free ρ is its type's profile (stored once per type, not
    per cell): ``uns["simulation"]["type_profiles"][obs["cell_type"].cat.codes]``. Libraries
    so large that counts would not fit int32 raise an error.

    Examples
    --------
    >>> import cellvi
    >>> adata = cellvi.data.simulate(n_cells=300, n_genes=100, seed=0)
    >>> adata.shape, list(adata.obs["cell_type"].cat.categories)
    ((300, 100), ['type_0', 'type_1', 'type_2'])
    """
    n_cells = _integer("n_cells", n_cells, 1)
    n_genes = _integer("n_genes", n_genes, 1)
    n_batches = _integer("n_batches", n_batches, 1)
    n_cell_types = _integer("n_cell_types", n_cell_types, 1)
    n_de_genes_per_type = _integer("n_de_genes_per_type", n_de_genes_per_type, 0)
    _check(
        "n_de_genes_per_type",
        n_de_genes_per_type * n_cell_types <= n_genes,
        n_de_genes_per_type,
        f"markers are disjoint, so n_cell_types * n_de_genes_per_type must be <= n_genes "
        f"({n_genes})",
    )
    lo, hi = _pair("de_log2fc_range", de_log2fc_range)
    _check("de_log2fc_range", 0 <= lo <= hi, de_log2fc_range, "need 0 <= low <= high")
    batch_effect_sd = _real("batch_effect_sd", batch_effect_sd)
    _check("batch_effect_sd", batch_effect_sd >= 0, batch_effect_sd, "must be >= 0")
    library_size_log_mean = _real("library_size_log_mean", library_size_log_mean)
    library_size_log_sd = _real("library_size_log_sd", library_size_log_sd)
    _check("library_size_log_sd", library_size_log_sd >= 0, library_size_log_sd, "must be >= 0")
    dlo, dhi = _pair("dispersion_range", dispersion_range)
    _check("dispersion_range", 0 < dlo <= dhi, dispersion_range, "need 0 < low <= high")
    zero_inflation = _real("zero_inflation", zero_inflation)
    _check("zero_inflation", 0 <= zero_inflation < 1, zero_inflation, "must be in [0, 1)")
    if seed is not None:
        seed = _integer("seed", seed, 0)
    probs = None
    if cell_type_proportions is not None:
        try:
            probs = np.asarray(cell_type_proportions, dtype=float)
        except (TypeError, ValueError):
            probs = np.full(0, np.nan)
        _check(
            "cell_type_proportions",
            probs.shape == (n_cell_types,)
            and np.isfinite(probs).all()
            and (probs >= 0).all()
            and probs.sum() > 0,
            cell_type_proportions,
            f"need {n_cell_types} finite non-negative shares, not all zero",
        )
        probs = probs / probs.sum()
    n_types_present = n_cell_types if probs is None else int((probs > 0).sum())
    _check(
        "n_cells",
        n_cells >= max(n_types_present, n_batches),
        n_cells,
        f"every batch ({n_batches}) and every cell type with a positive share "
        f"({n_types_present}) needs a cell; use n_cells >= {max(n_types_present, n_batches)}",
    )

    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 1.0, size=n_genes)
    log2_effect = np.zeros((n_cell_types, n_genes))
    order = rng.permutation(n_genes)
    de_genes: dict[str, list[str]] = {}
    for t in range(n_cell_types):
        genes = order[t * n_de_genes_per_type : (t + 1) * n_de_genes_per_type]
        sizes = rng.uniform(lo, hi, size=len(genes))
        signs = np.where(np.arange(len(genes)) < (len(genes) + 1) // 2, 1.0, -1.0)
        if n_cell_types == 1:  # nothing to differ from: the draws are kept, no markers
            genes = genes[:0]
        else:
            log2_effect[t, genes] = signs * sizes
        de_genes[f"type_{t}"] = [f"gene_{g}" for g in sorted(genes)]
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        profiles = base * np.exp2(log2_effect)
        profiles /= profiles.sum(axis=1, keepdims=True)  # (types, genes), batch-free rho
        batch_factors = np.exp(rng.normal(0.0, batch_effect_sd, size=(n_batches, n_genes)))
        rho_tb = profiles[:, None, :] * batch_factors[None, :, :]
        rho_tb /= rho_tb.sum(axis=2, keepdims=True)  # (types, batches, genes)
    _check(
        "de_log2fc_range / batch_effect_sd",
        bool(np.isfinite(rho_tb).all()),
        (de_log2fc_range, batch_effect_sd),
        "the planted effects overflow float64; use smaller fold changes or batch effects",
    )
    theta = rng.uniform(dlo, dhi, size=n_genes)

    cell_type = _balanced(rng, n_cells, n_cell_types, probs)
    batch = _balanced(rng, n_cells, n_batches, None)
    library = rng.lognormal(library_size_log_mean, library_size_log_sd, size=n_cells)
    too_big = (
        "the counts would not fit the int32 matrix; lower library_size_log_mean or "
        "library_size_log_sd"
    )
    _check(
        "library_size_log_mean",
        bool(library.max() * rho_tb.max() < _MAX_COUNT),
        library_size_log_mean,
        too_big,
    )

    chunks = [slice(s, min(s + _CHUNK, n_cells)) for s in range(0, n_cells, _CHUNK)]
    seeds = np.random.SeedSequence(seed).spawn(len(chunks))
    theta32 = theta.astype(np.float32)

    def draw(sl: slice, seq: np.random.SeedSequence) -> sparse.csr_matrix:
        chunk_rng = np.random.default_rng(seq)
        mu = (library[sl, None] * rho_tb[cell_type[sl], batch[sl]]).astype(np.float32)
        shape = np.broadcast_to(theta32, mu.shape)
        rate = chunk_rng.standard_gamma(shape, dtype=np.float32) * (mu / theta32)
        # the Gamma tail (small θ) can push a rate past what int32 counts hold
        _check(
            "library_size_log_mean", bool(rate.max() < _MAX_COUNT), library_size_log_mean, too_big
        )
        counts = chunk_rng.poisson(rate)
        _check(
            "library_size_log_mean",
            bool(counts.max() <= _MAX_COUNT),
            library_size_log_mean,
            too_big,
        )
        counts = counts.astype(np.int32)
        if zero_inflation > 0:
            counts[chunk_rng.random(counts.shape, dtype=np.float32) < zero_inflation] = 0
        empty = np.flatnonzero(counts.sum(axis=1) == 0)
        if empty.size:
            counts[empty, np.argmax(mu[empty], axis=1)] = 1
        return sparse.csr_matrix(counts)

    # chunks are independent (own child seeds), so threads keep the result deterministic
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        blocks = list(pool.map(draw, chunks, seeds))
    x = sparse.vstack(blocks, format="csr")
    x.sort_indices()

    type_names = [f"type_{t}" for t in range(n_cell_types)]
    gene_names = [f"gene_{g}" for g in range(n_genes)]
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(batch, [f"batch_{b}" for b in range(n_batches)]),
            "cell_type": pd.Categorical.from_codes(cell_type, type_names),
            "true_library": library,
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(
        {
            "true_dispersion": theta,
            "is_de": (log2_effect != 0).any(axis=0),
            "base_expression": base,
        },
        index=gene_names,
    )
    adata = anndata.AnnData(X=x, obs=obs, var=var)
    adata.varm["true_lfc"] = _true_lfc(profiles, type_names, gene_names)
    adata.uns["simulation"] = {
        "seed": seed,
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_batches": n_batches,
        "n_cell_types": n_cell_types,
        "cell_type_proportions": None if probs is None else probs.tolist(),
        "n_de_genes_per_type": n_de_genes_per_type,
        "de_log2fc_range": [lo, hi],
        "batch_effect_sd": batch_effect_sd,
        "library_size_log_mean": library_size_log_mean,
        "library_size_log_sd": library_size_log_sd,
        "dispersion_range": [dlo, dhi],
        "zero_inflation": zero_inflation,
        "type_profiles": profiles,
        "batch_factors": batch_factors,
        "de_genes": de_genes,
    }
    return adata


def _true_lfc(profiles: np.ndarray, type_names: list[str], gene_names: list[str]) -> pd.DataFrame:
    n_types = profiles.shape[0]
    lfc = np.zeros((profiles.shape[1], n_types))
    for t in range(n_types):
        others = np.delete(profiles, t, axis=0)
        rest = others.mean(axis=0) if len(others) else profiles[t]
        lfc[:, t] = np.log2(profiles[t] / rest)
    return pd.DataFrame(lfc, index=gene_names, columns=type_names)


def true_pairwise_log2fc(adata: anndata.AnnData, group1: str, group2: str) -> pd.Series:
    """True log2 fold change of the batch-free profiles of two simulated cell types."""
    sim = adata.uns["simulation"]
    names = list(adata.obs["cell_type"].cat.categories)
    profiles = np.asarray(sim["type_profiles"])
    values = np.log2(profiles[names.index(group1)] / profiles[names.index(group2)])
    return pd.Series(values, index=adata.var_names, name=f"{group1} vs {group2}")
