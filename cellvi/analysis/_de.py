"""Bayesian differential expression on posterior samples (``analysis.md`` §4)."""

from __future__ import annotations

import inspect
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._constants import REGISTRY_KEYS
from ..data import is_on_disk
from ..errors import CellviWarning, check_count
from ._batches import resolve_indices
from ._de_stats import (
    change_statistics,
    check_custom_functions,
    check_levels,
    custom_change_statistics,
    estimate_pseudocount,
    fdr_calls,
    pair_samples,
    vanilla_statistics,
)
from ._expression import as_name_list, get_normalized_expression, transform_batch_codes
from ._latent import get_latent_representation
from ._outliers import robust_inliers
from ._raw_stats import group_raw_stats

__all__ = ["check_de_request", "differential_expression"]


@dataclass(frozen=True)
class _Options:
    """The per-comparison settings of one :func:`differential_expression` call."""

    mode: str
    delta: float | None
    batch_correction: bool
    batchid1: object
    batchid2: object
    fdr_target: float
    n_samples: int
    pseudocounts: float | None
    threshold_counts: float
    test_mode: str
    all_stats: bool
    seed: int
    batch_size: int | None
    weights: str
    importance_kwargs: dict
    filter_outlier_cells: bool
    use_permutation: bool
    m_permutation: int
    change_fn: object
    m1_domain_fn: object
    levels: tuple


def _resolve_group(adata, idx, arg: str) -> np.ndarray:
    """The sorted, distinct positions of a group's cells: a group is a set of cells, so a
    position given twice counts once. A string is a boolean condition on ``obs`` columns
    (``DataFrame.query`` syntax); cells where it is missing are left out."""
    if isinstance(idx, str):
        return np.flatnonzero(_query_mask(adata.obs, idx, arg))
    positions = resolve_indices(idx, adata.n_obs, arg, also=" (or an obs.query string)")
    return np.unique(positions)


def _query_mask(obs: pd.DataFrame, query: str, arg: str) -> np.ndarray:
    """The boolean mask of the cells where the ``obs`` condition ``query`` holds."""
    columns = [c for c in obs.columns if not str(c).startswith("_cellvi_")]
    try:
        mask = obs.eval(query)
    except Exception as err:  # pandas raises many types (NameError, SyntaxError, ...)
        raise ValueError(
            f"{arg}={query!r} is not a valid obs query ({type(err).__name__}: {err}); write a "
            f"condition on obs columns, e.g. \"cell_type == 'B'\"; obs columns: {columns}."
        ) from err
    if not (isinstance(mask, pd.Series) and pd.api.types.is_bool_dtype(mask.dtype)):
        what = f"a {mask.dtype} column" if isinstance(mask, pd.Series) else type(mask).__name__
        raise ValueError(
            f"{arg}={query!r} evaluates to {what}, not a True/False value per cell; write a "
            f"condition on obs columns, e.g. \"cell_type == 'B'\"; obs columns: {columns}."
        )
    return mask.fillna(False).to_numpy(dtype=bool)


def _check_pseudocounts(pseudocounts) -> None:
    """None (estimated) or a finite number >= 0: a negative one makes log ratios NaN."""
    if pseudocounts is None:
        return
    if not _is_real(pseudocounts) or not np.isfinite(pseudocounts) or pseudocounts < 0:
        raise ValueError(
            f"pseudocounts={pseudocounts!r} must be a finite number >= 0 (e.g. 1e-4), or None "
            "to estimate it from the lowly expressed genes."
        )


def _check_choices(mode, test_mode, delta, fdr_target, weights) -> None:
    if mode not in ("vanilla", "change"):
        raise ValueError(f"mode={mode!r}: use 'vanilla' or 'change'.")
    if test_mode not in ("two", "three"):
        raise ValueError(f"test_mode={test_mode!r}: use 'two' or 'three'.")
    for value, name in ((delta, "delta"), (fdr_target, "fdr_target")):
        if (value is not None or name != "delta") and not _is_real(value):
            raise TypeError(f"{name}={value!r} must be a number.")
    if delta is not None and not delta >= 0:
        raise ValueError(f"delta={delta!r} must be >= 0 (or None to estimate it).")
    if not 0 < fdr_target <= 1:
        raise ValueError(f"fdr_target={fdr_target!r} must lie in (0, 1], e.g. 0.05.")
    if weights not in (None, "uniform", "importance"):
        raise ValueError(f"weights={weights!r}: use 'uniform' or 'importance'.")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _threshold(value) -> float:
    """``threshold_counts``: a gene is unexpressed in a group below this mean raw count."""
    if not _is_real(value):
        raise TypeError(f"threshold_counts={value!r} must be a number, e.g. 0.01.")
    if not value >= 0:
        raise ValueError(f"threshold_counts={value!r} must be >= 0, e.g. 0.01.")
    return float(value)


def _check_idx2(idx1, idx2) -> None:
    if idx1 is None and idx2 is not None:
        raise ValueError(
            "idx2 is given without idx1: idx1/idx2 replace groupby/group1/group2 together. "
            "Pass idx1= for the first group too (idx2=None compares it with all other cells)."
        )


def _index_groups(adata, idx1, idx2) -> tuple[np.ndarray, np.ndarray]:
    """Cells of ``idx1`` and of ``idx2`` (None: all other cells); neither may be empty."""
    i1 = _resolve_group(adata, idx1, "idx1")
    if len(i1) == 0:
        raise ValueError(f"idx1={_shown(idx1)} selects no cells; group 1 needs at least one.")
    if idx2 is None:
        i2 = np.setdiff1d(np.arange(adata.n_obs), i1)
        if len(i2) == 0:
            raise ValueError(
                f"idx1={_shown(idx1)} selects all {adata.n_obs} cells, so idx2=None (the "
                "other cells) is empty; pass idx2= for the second group."
            )
        return i1, i2
    i2 = _resolve_group(adata, idx2, "idx2")
    if len(i2) == 0:
        raise ValueError(f"idx2={_shown(idx2)} selects no cells; group 2 needs at least one.")
    return i1, i2


def _shown(idx) -> str:
    """A short text of a group argument for error messages."""
    if isinstance(idx, str):
        return repr(idx)
    text = np.array2string(np.asarray(idx).ravel(), threshold=6, edgeitems=3)
    return text if len(text) <= 80 else text[:77] + "..."


def _group_plan(adata, groupby, group1, group2) -> tuple[np.ndarray, list, tuple | None]:
    """The groups of a ``groupby`` comparison.

    Returns each cell's category code (-1 where the value is missing), the ``(code, value)``
    of every first group and that of ``group2`` (None: the rest). Categories are the
    column's (or, for other columns, its sorted distinct values, as ``astype("category")``),
    and values keep their type (an integer label stays an integer). Every named group must
    have cells.
    """
    if groupby is None:
        raise ValueError("Give groupby= (with group1/group2) or idx1=.")
    if groupby not in adata.obs:
        columns = [c for c in adata.obs.columns if not str(c).startswith("_cellvi_")]
        raise KeyError(f"groupby={groupby!r} is not an obs column; obs columns: {columns}.")
    column = adata.obs[groupby]
    if not isinstance(column.dtype, pd.CategoricalDtype):
        column = column.astype("category")
    codes = column.cat.codes.to_numpy().astype(np.int64)  # -1: missing, only ever "Rest"
    used = np.bincount(codes[codes >= 0], minlength=len(column.cat.categories)) > 0
    present = [(i, v) for i, v in enumerate(column.cat.categories) if used[i]]
    if group2 is not None and not pd.api.types.is_scalar(group2):
        raise ValueError(
            f"group2={group2!r}: give one value of obs[{groupby!r}] (or None for all other "
            f"cells); for several categories together use idx2, e.g. "
            f"idx2=\"{groupby} in ['a', 'b']\"."
        )
    second = None if group2 is None else _find_group(present, group2, groupby)
    if group1 is None:
        if len(present) < 2:
            what = (
                f"a single category ({present[0][1]!r})"
                if present
                else "no values (every cell's value is missing)"
            )
            raise ValueError(
                f"groupby={groupby!r} has {what}; one-vs-rest needs at least two categories."
            )
        # every category against the rest, or against group2 (group2 itself left out)
        firsts = [p for p in present if second is None or p[0] != second[0]]
    else:
        names = as_name_list(group1)
        if not names:
            raise ValueError(
                f"group1={group1!r} names no category; pass one or more values of "
                f"obs[{groupby!r}], or group1=None to compare every category with the rest."
            )
        firsts = [_find_group(present, g, groupby) for g in names]
    if second is not None and second[0] in {code for code, _ in firsts}:
        raise ValueError(
            f"group1 and group2 both name {second[1]!r} of obs[{groupby!r}]: a group compared "
            "with itself has no differences to find. Give another group2, or group2=None to "
            "compare with all other cells."
        )
    return codes, firsts, second


def _find_group(present: list, name, groupby) -> tuple:
    """``(code, value)`` of the category ``name`` (matched exactly, else by its text, so
    that ``"0"`` finds the label 0)."""
    for code, value in present:
        if value == name:
            return code, value
    for code, value in present:
        if str(value) == str(name):
            return code, value
    values = [v for _, v in present]
    raise ValueError(
        f"No cells in obs[{groupby!r}] are {name!r}; its values: "
        f"{values[:20]}{' ...' if len(values) > 20 else ''}."
    )


def check_de_request(adata, **kwargs) -> None:
    """Check a :func:`differential_expression` request against ``adata`` without a model.

    Raises the error the call would raise for its argument names, its choices (``mode``,
    ``delta``, ``fdr_target``, ...) and its groups (``groupby`` column, ``group1``/``group2``
    values, ``idx1``/``idx2``), so that a workflow can fail before training rather than after.
    Checks that need the trained model (batch names of ``batch_correction``) are left to the
    call itself.
    """
    params = inspect.signature(differential_expression).parameters
    unknown = sorted(set(kwargs) - set(params) - {"model", "adata"})
    if unknown:
        raise TypeError(
            f"differential_expression got unknown argument(s) {unknown}; valid: "
            f"{[p for p in params if p not in ('model', 'adata')]}."
        )
    args = {name: p.default for name, p in params.items() if name not in ("model", "adata")}
    args.update(kwargs)
    _check_choices(*(args[k] for k in ("mode", "test_mode", "delta", "fdr_target", "weights")))
    _check_pseudocounts(args["pseudocounts"])
    check_count(args["n_samples_overall"], "n_samples_overall")
    _threshold(args["threshold_counts"])
    _check_idx2(args["idx1"], args["idx2"])
    if args["idx1"] is not None:
        _index_groups(adata, args["idx1"], args["idx2"])
    else:
        _group_plan(adata, args["groupby"], args["group1"], args["group2"])


def _samples(model, adata, idx, codes, seed, opts: _Options):
    """``(opts.n_samples, genes)`` posterior ρ samples of a group; with batch ``codes``,
    ``n_samples / len(codes)`` decoded under each, tagged with it."""
    n = opts.n_samples
    common = dict(
        return_numpy=True,
        batch_size=opts.batch_size,
        weights=opts.weights,
        **opts.importance_kwargs,
    )
    if codes is None:
        return get_normalized_expression(
            model, adata, idx, n_samples_overall=n, seed=seed, **common
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
                seed=seed + i,
                **common,
            )
        )
        tags.append(np.full(per, code))
    return np.concatenate(parts), np.concatenate(tags)


def _batch_codes(model, names, arg: str) -> list[int]:
    codes = transform_batch_codes(model, names, arg)
    if None in codes:
        raise ValueError(f"{arg} must name batches of this model (None is not a batch).")
    return codes


def _inliers(model, adata, idx):
    """The group's cells without the outliers of its latent cloud (all when no fit)."""
    latent = get_latent_representation(model, adata, idx)
    keep = robust_inliers(latent)
    if keep is None:
        warnings.warn(
            f"filter_outlier_cells: no robust covariance for a group of {len(idx)} cells in "
            f"{latent.shape[1]} latent dimensions; all its cells are kept.",
            CellviWarning,
            stacklevel=5,
        )
        return idx
    return idx[keep]


def _compare(model, adata, x, idx1, idx2, opts: _Options):
    if len(idx1) == 0 or len(idx2) == 0:
        raise ValueError("Both groups need at least one cell (a group is empty).")
    if opts.batch_correction:
        all_codes = list(range(model.summary_stats["n_batch"]))
        codes1 = (
            all_codes if opts.batchid1 is None else _batch_codes(model, opts.batchid1, "batchid1")
        )
        codes2 = (
            all_codes if opts.batchid2 is None else _batch_codes(model, opts.batchid2, "batchid2")
        )
        if set(codes1) & set(codes2) and set(codes1) != set(codes2):
            warnings.warn(
                "batchid1 and batchid2 share some batches but not all, so the two groups' "
                "samples are paired globally rather than within each batch.",
                CellviWarning,
                stacklevel=4,
            )
    elif opts.batchid1 is not None or opts.batchid2 is not None:
        raise ValueError("batchid1/batchid2 need batch_correction=True.")
    else:
        codes1 = codes2 = None
    if opts.filter_outlier_cells:
        idx1, idx2 = _inliers(model, adata, idx1), _inliers(model, adata, idx2)
    s1, tags1 = _samples(model, adata, idx1, codes1, opts.seed, opts)
    s2, tags2 = _samples(model, adata, idx2, codes2, opts.seed + 1000, opts)
    rng = np.random.default_rng(opts.seed + 2000)
    p1, p2 = pair_samples(s1, tags1, s2, tags2, opts.use_permutation, opts.m_permutation, rng)
    stats1, stats2 = group_raw_stats(x, [idx1, idx2])
    if opts.mode == "vanilla":
        out = vanilla_statistics(p1, p2)
    else:
        pc = opts.pseudocounts
        if pc is None:
            raw1, raw2 = stats1["raw_mean"], stats2["raw_mean"]
            pc = estimate_pseudocount(p1, p2, raw1, raw2, opts.threshold_counts)
        args = (p1, p2, pc, opts.delta, opts.test_mode)
        if opts.change_fn is None and opts.m1_domain_fn is None:
            out = change_statistics(*args, levels=opts.levels)
        else:
            out = custom_change_statistics(
                *args, opts.change_fn, opts.m1_domain_fn, levels=opts.levels
            )
    if opts.use_permutation:  # group means over the drawn samples, not over the pairs
        out["scale1"], out["scale2"] = s1.mean(0), s2.mean(0)
    if opts.all_stats:
        for key in ("raw_mean", "non_zeros_proportion", "raw_normalized_mean"):
            out[f"{key}1"], out[f"{key}2"] = stats1[key], stats2[key]
    if opts.mode == "change":
        out[f"is_de_fdr_{opts.fdr_target}"] = fdr_calls(out["proba_de"], opts.fdr_target)
    names = model.registry_["field_registries"]["X"]["state_registry"]["column_names"]
    table = pd.DataFrame(out, index=pd.Index(names))
    key = "proba_de" if opts.mode == "change" else "bayes_factor"
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
    weights: str | None = "uniform",
    filter_outlier_cells: bool = False,
    importance_weighting_kwargs: dict | None = None,
    n_samples_overall: int = 5000,
    pseudocounts: float | None = None,
    threshold_counts: float = 0.01,
    test_mode: str = "three",
    use_permutation: bool = False,
    m_permutation: int = 10000,
    change_fn=None,
    m1_domain_fn=None,
    cred_interval_lvls=None,
    seed: int = 0,
) -> pd.DataFrame:
    """Compare two groups of cells gene by gene on posterior samples of ρ (``analysis.md`` §4).

    ``groupby`` with ``group1=None`` compares every category with the rest, or, with
    ``group2``, every other category with ``group2``. ``idx1``/``idx2``
    (masks, positions or ``obs.query`` strings) override the groups. ``mode="vanilla"``
    returns ``P(ρ1 > ρ2)`` and its log odds; ``mode="change"`` returns ``P(|LFC| ≥ δ)``,
    LFC summaries (with highest-density intervals at ``cred_interval_lvls``) and
    FDR-controlled calls (``is_de_fdr_<target>``). ``weights="importance"`` resamples each
    group's draws by importance weights (``importance_weighting_kwargs``: see
    :func:`~cellvi.analysis.get_importance_weights`); ``filter_outlier_cells`` drops the 10 %
    of each group's cells farthest from a robust fit of its latent means;
    ``use_permutation`` pairs ``m_permutation`` random draws instead of element-wise ones;
    ``change_fn(x, y, pc)`` and ``m1_domain_fn(r) -> (up, down)`` replace the LFC and the
    DE region. Without ``pseudocounts``, the pseudocount is estimated from the genes whose
    mean raw count in a group is below ``threshold_counts``. The default computation is
    vectorised over genes and samples.
    """
    _check_choices(mode, test_mode, delta, fdr_target, weights)
    _check_pseudocounts(pseudocounts)
    check_custom_functions(change_fn, m1_domain_fn)
    _check_idx2(idx1, idx2)
    opts = _Options(
        mode=mode,
        delta=delta,
        batch_correction=batch_correction,
        batchid1=batchid1,
        batchid2=batchid2,
        fdr_target=fdr_target,
        n_samples=check_count(n_samples_overall, "n_samples_overall"),
        pseudocounts=pseudocounts,
        threshold_counts=_threshold(threshold_counts),
        test_mode=test_mode,
        all_stats=all_stats,
        seed=seed,
        batch_size=batch_size,
        weights=weights or "uniform",
        importance_kwargs=dict(importance_weighting_kwargs or {}),
        filter_outlier_cells=bool(filter_outlier_cells),
        use_permutation=bool(use_permutation),
        m_permutation=check_count(m_permutation, "m_permutation"),
        change_fn=None if change_fn == "log-fold" else change_fn,
        m1_domain_fn=m1_domain_fn,
        levels=check_levels(cred_interval_lvls),
    )
    if opts.importance_kwargs and opts.weights != "importance":
        raise ValueError("importance_weighting_kwargs need weights='importance'.")
    manager = model._manager_for(adata)
    data = manager.adata
    x = manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    if sp.issparse(x):
        x = x.tocsr()
    elif not is_on_disk(x):
        x = np.asarray(x)
    if idx1 is not None:
        return _compare(model, data, x, *_index_groups(data, idx1, idx2), opts)
    codes, firsts, second = _group_plan(data, groupby, group1, group2)
    tables = []
    for code1, value1 in firsts:
        i1 = np.flatnonzero(codes == code1)
        if second is None:
            i2, value2 = np.flatnonzero(codes != code1), "Rest"
        else:
            i2, value2 = np.flatnonzero(codes == second[0]), second[1]
        table = _compare(model, data, x, i1, i2, opts)
        table["comparison"] = f"{value1} vs {value2}"
        table["group1"], table["group2"] = value1, value2
        tables.append(table)
    return pd.concat(tables)
