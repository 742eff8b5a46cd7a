"""Bayesian differential expression on posterior samples (``analysis.md`` §4)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .._constants import REGISTRY_KEYS
from ..data import is_on_disk
from ..errors import CellviWarning, check_count
from ._batches import resolve_indices
from ._expression import as_name_list, get_normalized_expression, transform_batch_codes

__all__ = ["differential_expression", "estimate_delta", "estimate_pseudocount", "fdr_calls"]

_EPS = 1e-8

try:  # scipy's compiled kernels y += A @ x, called on a CSR matrix's buffers
    from scipy.sparse._sparsetools import csc_matvecs as _csc_matvecs
    from scipy.sparse._sparsetools import csr_matvec as _csr_matvec
except ImportError:  # pragma: no cover - a scipy that moved them: rows are gathered instead
    _csc_matvecs = _csr_matvec = None


def estimate_delta(lfc_means: np.ndarray, min_delta: float = 0.1, seed: int = 0) -> float:
    """δ from a 3-component Gaussian mixture on per-gene mean LFCs (1-D EM).

    ``δ = max(min_delta, 0.6 · mean(|lowest mean|, |highest mean|))``.
    """
    x = np.asarray(lfc_means, dtype=float)
    means = np.quantile(x, [0.05, 0.5, 0.95])
    var = np.full(3, x.var() + 1e-6)
    w = np.full(3, 1 / 3)
    for _ in range(200):
        log_p = -0.5 * ((x[:, None] - means) ** 2 / var + np.log(2 * np.pi * var)) + np.log(w)
        resp = np.exp(log_p - log_p.max(1, keepdims=True))
        resp /= resp.sum(1, keepdims=True)
        nk = resp.sum(0) + 1e-12
        means = (resp * x[:, None]).sum(0) / nk
        var = (resp * (x[:, None] - means) ** 2).sum(0) / nk + 1e-6
        w = nk / nk.sum()
    lo, hi = means.min(), means.max()
    return float(max(min_delta, 0.6 * (abs(lo) + abs(hi)) / 2))


def estimate_pseudocount(scales1, scales2, raw_mean1, raw_mean2, threshold: float = 0.01):
    """Pseudocount from genes unexpressed in a group (raw mean < ``threshold``)."""
    n_genes = scales1.shape[1]
    quantiles = []
    for scales, raw in ((scales1, raw_mean1), (scales2, raw_mean2)):
        off = raw < threshold
        q = np.quantile(scales[:, off].max(0), 0.9) if off.any() else 1e-10
        quantiles.append(q)
    return float(max(1e-10, max(quantiles) / n_genes))


def fdr_calls(proba_de: np.ndarray, fdr_target: float) -> np.ndarray:
    """Longest prefix (by decreasing ``proba_de``) whose posterior expected FDR <= target."""
    order = np.argsort(-proba_de, kind="stable")
    expected_fdr = np.cumsum(1 - proba_de[order]) / np.arange(1, len(order) + 1)
    n_calls = (
        int(np.flatnonzero(expected_fdr <= fdr_target).max() + 1)
        if (expected_fdr <= fdr_target).any()
        else 0
    )
    calls = np.zeros(len(proba_de), dtype=bool)
    calls[order[:n_calls]] = True
    return calls


def _resolve_group(adata, idx, arg: str) -> np.ndarray:
    if isinstance(idx, str):
        return np.flatnonzero(adata.obs.eval(idx).to_numpy())
    try:
        return resolve_indices(idx, adata.n_obs)
    except (ValueError, IndexError) as err:
        raise type(err)(f"{arg}: {err}") from None


def _group_raw_stats(x, groups, chunk: int = 8192) -> list[dict[str, np.ndarray]]:
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


def _samples(model, adata, idx, codes, n, seed, batch_size=None):
    """(n, genes) posterior ρ samples of a group; with codes, n/len(codes) per batch."""
    if codes is None:
        return get_normalized_expression(
            model,
            adata,
            idx,
            n_samples_overall=n,
            return_numpy=True,
            seed=seed,
            batch_size=batch_size,
        ), None
    per = max(1, n // len(codes))
    parts, tags = [], []
    for i, code in enumerate(codes):
        name = model.get_state_registry(REGISTRY_KEYS.BATCH_KEY)["categorical_mapping"][code]
        parts.append(
            get_normalized_expression(
                model,
                adata,
                idx,
                transform_batch=name,
                n_samples_overall=per,
                return_numpy=True,
                seed=seed + i,
                batch_size=batch_size,
            )
        )
        tags.append(np.full(per, code))
    return np.concatenate(parts), np.concatenate(tags)


_GENE_BLOCK = 256  # genes per block: (samples, 256) float32 temporaries stay cache-sized


def _gene_blocks(s1: np.ndarray, s2: np.ndarray, block: int = _GENE_BLOCK):
    """``(genes, a, b)``: ``(samples, block)`` column views of both sample matrices.

    Working through a few hundred genes at a time keeps the temporaries cache-sized.
    """
    t1, t2 = torch.from_numpy(s1), torch.from_numpy(s2)
    for start in range(0, t1.shape[1], block):
        genes = slice(start, start + block)
        yield genes, t1[:, genes], t2[:, genes]


def _change_statistics(s1, s2, pc: float, delta: float | None, test_mode: str) -> dict:
    """Columns of change mode from the ``(samples, genes)`` ρ samples of both groups.

    Each block of genes is transposed once to gene-major order, so every per-gene reduction
    (mean, spread, extremes, the median's selection, the tail counts) runs over contiguous
    memory. With ``delta`` given, the tail probabilities come from the same pass; otherwise
    the log ratios are kept until δ is estimated from their means.
    """
    m, n_genes = s1.shape
    cols = {
        k: np.empty(n_genes, np.float32)
        for k in ("scale1", "scale2", "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max")
    }
    p_up, p_down = np.empty(n_genes), np.empty(n_genes)
    kept, r_means = [], np.empty(n_genes)  # log ratios per block while δ is unknown
    lower_middle = (m - 1) // 2  # the lower median, as torch.median
    buffers = torch.empty(2, min(_GENE_BLOCK, n_genes), m)  # gene-major copies, reused
    for genes, a, b in _gene_blocks(s1, s2):
        n = a.shape[1]
        a, b = buffers[0, :n].copy_(a.T), buffers[1, :n].copy_(b.T)  # (block genes, samples)
        cols["scale1"][genes], cols["scale2"][genes] = a.mean(1).numpy(), b.mean(1).numpy()
        r = _log2_ratio(a, b, pc)
        if delta is None:
            r_means[genes] = r.mean(1).numpy()
            kept.append((genes, r))
        else:
            p_up[genes], p_down[genes] = _tail_probabilities(r, delta)
        lfc = _log2_ratio(a, b, 1e-3 * pc)
        std, mean = torch.std_mean(lfc, dim=1, correction=0)
        low, high = torch.aminmax(lfc, dim=1)
        cols["lfc_mean"][genes], cols["lfc_std"][genes] = mean.numpy(), std.numpy()
        cols["lfc_min"][genes], cols["lfc_max"][genes] = low.numpy(), high.numpy()
        by_gene = lfc.numpy()
        by_gene.partition(lower_middle, axis=1)  # a selection in place, not a sort
        cols["lfc_median"][genes] = by_gene[:, lower_middle]
    if delta is None:
        delta = estimate_delta(r_means)
        for genes, r in kept:
            p_up[genes], p_down[genes] = _tail_probabilities(r, delta)
    proba = np.maximum(p_up, p_down) if test_mode == "three" else p_up + p_down
    return {
        "proba_de": proba,
        "proba_not_de": 1 - proba,
        "bayes_factor": np.log(proba + _EPS) - np.log(1 - proba + _EPS),
        "scale1": cols.pop("scale1"),
        "scale2": cols.pop("scale2"),
        "pseudocounts": np.full(n_genes, pc),
        "delta": np.full(n_genes, delta),
        **cols,
    }


def _tail_probabilities(r: torch.Tensor, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Per gene (row of ``r``): the fractions of samples with ``r >= δ`` and ``r < -δ``."""
    m = r.shape[1]
    up, down = torch.count_nonzero(r >= delta, dim=1), torch.count_nonzero(r < -delta, dim=1)
    return up.numpy() / m, down.numpy() / m


def _log2_ratio(t1: torch.Tensor, t2: torch.Tensor, pseudocount: float) -> torch.Tensor:
    """``log2((t1 + pc) / (t2 + pc))``: one logarithm per element, two temporaries."""
    r = torch.add(t1, pseudocount)
    return r.div_(torch.add(t2, pseudocount)).log2_()


def _batch_codes(model, names, arg: str) -> list[int]:
    codes = transform_batch_codes(model, names, arg)
    if None in codes:
        raise ValueError(f"{arg} must name batches of this model (None is not a batch).")
    return codes


def _compare(
    model,
    adata,
    x,
    idx1,
    idx2,
    *,
    mode,
    delta,
    batch_correction,
    batchid1,
    batchid2,
    fdr_target,
    n_samples,
    pseudocounts,
    test_mode,
    all_stats,
    seed,
    batch_size=None,
):
    if len(idx1) == 0 or len(idx2) == 0:
        raise ValueError("Both groups need at least one cell (a group is empty).")
    if batch_correction:
        all_codes = list(range(model.summary_stats["n_batch"]))
        codes1 = all_codes if batchid1 is None else _batch_codes(model, batchid1, "batchid1")
        codes2 = all_codes if batchid2 is None else _batch_codes(model, batchid2, "batchid2")
        if set(codes1) & set(codes2) and set(codes1) != set(codes2):
            warnings.warn(
                "batchid1 and batchid2 share some batches but not all, so the two groups' "
                "samples are paired globally rather than within each batch.",
                CellviWarning,
                stacklevel=4,
            )
    elif batchid1 is not None or batchid2 is not None:
        raise ValueError("batchid1/batchid2 need batch_correction=True.")
    else:
        codes1 = codes2 = None
    s1, _ = _samples(model, adata, idx1, codes1, n_samples, seed, batch_size)
    s2, _ = _samples(model, adata, idx2, codes2, n_samples, seed + 1000, batch_size)
    m = min(len(s1), len(s2))
    s1, s2 = s1[:m], s2[:m]
    stats1, stats2 = _group_raw_stats(x, [idx1, idx2])
    out = {}
    if mode == "vanilla":
        p1 = np.empty(s1.shape[1])
        for genes, a, b in _gene_blocks(s1, s2):
            p1[genes] = (a > b).sum(0).numpy() / m
        out["proba_m1"], out["proba_m2"] = p1, 1 - p1
        out["bayes_factor"] = np.log(p1 + _EPS) - np.log(1 - p1 + _EPS)
        out["scale1"], out["scale2"] = s1.mean(0), s2.mean(0)
    else:
        pc = pseudocounts
        if pc is None:
            pc = estimate_pseudocount(s1, s2, stats1["raw_mean"], stats2["raw_mean"])
        out.update(_change_statistics(s1, s2, pc, delta, test_mode))
    if all_stats:
        for key in ("raw_mean", "non_zeros_proportion", "raw_normalized_mean"):
            out[f"{key}1"], out[f"{key}2"] = stats1[key], stats2[key]
    if mode == "change":
        out[f"is_de_fdr_{fdr_target}"] = fdr_calls(out["proba_de"], fdr_target)
    names = model.registry_["field_registries"]["X"]["state_registry"]["column_names"]
    table = pd.DataFrame(out, index=pd.Index(names))
    key = "proba_de" if mode == "change" else "bayes_factor"
    return table.sort_values(key, ascending=False, kind="stable")


def differential_expression(
    model,
    adata=None,
    groupby=None,
    group1=None,
    group2=None,
    idx1=None,
    idx2=None,
    mode: str = "vanilla",
    delta: float | None = 0.25,
    batch_size=None,
    all_stats: bool = True,
    batch_correction: bool = False,
    batchid1=None,
    batchid2=None,
    fdr_target: float = 0.05,
    n_samples_overall: int = 5000,
    pseudocounts: float | None = None,
    test_mode: str = "three",
    seed: int = 0,
) -> pd.DataFrame:
    """Compare two groups of cells gene by gene on posterior samples of ρ.

    ``groupby`` with ``group1=None`` compares every category with the rest. ``idx1``/``idx2``
    (masks, positions or ``obs.query`` strings) override the groups. ``mode="vanilla"``
    returns ``P(ρ1 > ρ2)`` and its log odds; ``mode="change"`` returns ``P(|LFC| ≥ δ)``,
    LFC summaries and FDR-controlled calls (``is_de_fdr_<target>``). Computation is vectorised
    over genes and samples.
    """
    if mode not in ("vanilla", "change"):
        raise ValueError(f"mode={mode!r}: use 'vanilla' or 'change'.")
    if test_mode not in ("two", "three"):
        raise ValueError(f"test_mode={test_mode!r}: use 'two' or 'three'.")
    if delta is not None and not delta >= 0:
        raise ValueError(f"delta={delta!r} must be >= 0 (or None to estimate it).")
    if not 0 < fdr_target <= 1:
        raise ValueError(f"fdr_target={fdr_target!r} must lie in (0, 1], e.g. 0.05.")
    n_samples_overall = check_count(n_samples_overall, "n_samples_overall")
    manager = model._manager_for(adata)
    data = manager.adata
    x = manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    if sp.issparse(x):
        x = x.tocsr()
    elif not is_on_disk(x):
        x = np.asarray(x)
    kwargs = dict(
        mode=mode,
        delta=delta,
        batch_correction=batch_correction,
        batchid1=batchid1,
        batchid2=batchid2,
        fdr_target=fdr_target,
        n_samples=n_samples_overall,
        pseudocounts=pseudocounts,
        test_mode=test_mode,
        all_stats=all_stats,
        seed=seed,
        batch_size=batch_size,
    )
    if idx1 is not None:
        i1 = _resolve_group(data, idx1, "idx1")
        if idx2 is None:
            i2 = np.setdiff1d(np.arange(data.n_obs), i1)
        else:
            i2 = _resolve_group(data, idx2, "idx2")
        return _compare(model, data, x, i1, i2, **kwargs)
    if groupby is None:
        raise ValueError("Give groupby= (with group1/group2) or idx1=.")
    if groupby not in data.obs:
        raise KeyError(f"groupby={groupby!r} is not an obs column.")
    column = data.obs[groupby]
    known = column.notna().to_numpy()  # cells without a value only ever count as "Rest"
    labels = np.where(known, column.astype(str).to_numpy(), None)
    categories = (
        list(pd.unique(labels[known]))
        if not hasattr(column, "cat")
        else [str(c) for c in column.cat.categories if (labels == str(c)).any()]
    )
    if group1 is None:
        if len(categories) < 2:
            raise ValueError(f"groupby={groupby!r} has a single category; nothing to compare.")
        firsts = categories
    else:
        firsts = as_name_list(group1)
    unknown = [str(g) for g in [*firsts, *([] if group2 is None else [group2])]]
    unknown = [g for g in unknown if g not in categories]
    if unknown:
        raise ValueError(
            f"No cells in obs[{groupby!r}] are {', '.join(map(repr, unknown))}; its values: "
            f"{categories[:20]}{' ...' if len(categories) > 20 else ''}."
        )
    tables = []
    for g1 in firsts:
        i1 = np.flatnonzero(labels == str(g1))
        if group2 is None:
            i2, name2 = np.flatnonzero(labels != str(g1)), "Rest"
        else:
            i2, name2 = np.flatnonzero(labels == str(group2)), str(group2)
        table = _compare(model, data, x, i1, i2, **kwargs)
        table["comparison"] = f"{g1} vs {name2}"
        table["group1"], table["group2"] = str(g1), name2
        tables.append(table)
    return pd.concat(tables)
