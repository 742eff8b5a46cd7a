"""Bayes-factor statistics of DE on posterior ρ samples (``analysis.md`` §4.2-4.4).

The default path works through blocks of genes with torch (one pass, cache-sized
temporaries); custom ``change_fn``/``m1_domain_fn`` get whole numpy sample matrices, as their
authors expect.
"""

from __future__ import annotations

import functools
import inspect
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = [
    "change_statistics",
    "check_custom_functions",
    "check_levels",
    "credible_intervals",
    "estimate_delta",
    "estimate_pseudocount",
    "fdr_calls",
    "pair_samples",
    "vanilla_statistics",
]

_EPS = 1e-8


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


_GENE_BLOCK = 256  # genes per block: (samples, 256) float32 temporaries stay cache-sized


def _gene_blocks(s1: np.ndarray, s2: np.ndarray, block: int = _GENE_BLOCK):
    """``(genes, a, b)``: ``(samples, block)`` column views of both sample matrices.

    Working through a few hundred genes at a time keeps the temporaries cache-sized.
    """
    t1, t2 = torch.from_numpy(s1), torch.from_numpy(s2)
    for start in range(0, t1.shape[1], block):
        genes = slice(start, start + block)
        yield genes, t1[:, genes], t2[:, genes]


def change_statistics(
    s1, s2, pc: float, delta: float | None, test_mode: str, levels: tuple = ()
) -> dict:
    """Columns of change mode from the paired ``(samples, genes)`` ρ samples of both groups.

    Blocks of genes are reduced over the samples where they lie (column reductions need no
    transposed copies); only the block's LFCs are copied to gene-major order, for the
    median's selection (or the sort for intervals). With ``delta`` given, the tail
    probabilities come from the same pass; otherwise the log ratios are kept until δ is
    estimated from their means. ``levels`` adds the highest-density intervals of the LFC
    (:func:`credible_intervals`).
    """
    m, n_genes = s1.shape
    names = ["scale1", "scale2", "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max"]
    names += [name for level in levels for name in _interval_names(level)]
    cols = {k: np.empty(n_genes, np.float32) for k in names}
    p_up, p_down = np.empty(n_genes), np.empty(n_genes)
    kept, r_means = [], np.empty(n_genes)  # log ratios per block while δ is unknown
    lower = (m - 1) // 2  # the lower middle order statistic (the median when m is odd)
    buffer = torch.empty(min(_GENE_BLOCK, n_genes), m)  # a block's LFCs gene-major, reused
    threads = max(1, torch.get_num_threads())
    for genes, a, b in _gene_blocks(s1, s2):  # (samples, block genes) views
        cols["scale1"][genes], cols["scale2"][genes] = a.mean(0).numpy(), b.mean(0).numpy()
        r = _log2_ratio(a, b, pc)
        if delta is None:
            r_means[genes] = r.mean(0).numpy()
            kept.append((genes, r))
        else:
            p_up[genes], p_down[genes] = _tail_probabilities(r, delta)
        lfc = _log2_ratio(a, b, 1e-3 * pc)
        mean = lfc.mean(0)
        std = (lfc - mean).square_().mean(0).sqrt_()  # two passes beat Welford's one
        low, high = lfc.amin(0), lfc.amax(0)  # (aminmax over dim 0 is 10x slower)
        cols["lfc_mean"][genes], cols["lfc_std"][genes] = mean.numpy(), std.numpy()
        cols["lfc_min"][genes], cols["lfc_max"][genes] = low.numpy(), high.numpy()
        by_gene = buffer[: lfc.shape[1]].copy_(lfc.T).numpy()
        if levels:
            _in_row_chunks(lambda part: part.sort(axis=1), by_gene, threads)
            for level in levels:
                lo_name, hi_name = _interval_names(level)
                cols[lo_name][genes], cols[hi_name][genes] = credible_intervals(by_gene, level)
            upper = by_gene[:, m // 2]
        else:  # a selection in place, not a sort
            _in_row_chunks(lambda part: part.partition(lower, axis=1), by_gene, threads)
            upper = by_gene[:, lower + 1 :].min(1) if m % 2 == 0 else by_gene[:, lower]
        cols["lfc_median"][genes] = (by_gene[:, lower] + upper) / 2
    if delta is None:
        delta = estimate_delta(r_means)
        for genes, r in kept:
            p_up[genes], p_down[genes] = _tail_probabilities(r, delta)
    return _change_columns(p_up, p_down, test_mode, pc, delta, cols)


def _in_row_chunks(fn, rows: np.ndarray, threads: int) -> None:
    """``fn(part)`` on ``threads`` contiguous row chunks of ``rows`` at once: numpy's sort and
    selection run on one core and release the GIL, so the chunks use all of torch's cores."""
    if threads == 1 or len(rows) < 2 * threads:
        fn(rows)
        return
    for _ in _thread_pool(threads, os.getpid()).map(fn, np.array_split(rows, threads)):
        pass


@functools.cache
def _thread_pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """One pool per thread count, kept: a new pool per call costs about what it saves.
    Keyed by process too: a forked child inherits the pool but not its threads."""
    return ThreadPoolExecutor(threads, thread_name_prefix="cellvi-de")


def custom_change_statistics(
    s1, s2, pc, delta, test_mode, change_fn, m1_domain_fn, levels: tuple = ()
) -> dict:
    """Change mode with a user ``change_fn(x, y, pc)`` and/or ``m1_domain_fn(r)``.

    Both get whole ``(samples, genes)`` numpy arrays; ``m1_domain_fn`` returns the boolean
    masks ``(r in the up region, r in the down region)``.
    """
    if change_fn is None or (isinstance(change_fn, str) and change_fn == "log-fold"):

        def change_fn(x, y, pc):
            return np.log2(x + pc) - np.log2(y + pc)

    r = _call_user(change_fn, "change_fn", s1, s2, pc)
    if delta is None:
        delta = estimate_delta(r.mean(0))
    if m1_domain_fn is None:
        plus, minus = r >= delta, r < -delta
    else:
        masks = _call_user(m1_domain_fn, "m1_domain_fn", r, same_shape=False)
        if len(masks) != 2 or any(np.shape(k) != r.shape for k in masks):
            raise ValueError(
                f"m1_domain_fn must return two boolean arrays of shape {r.shape} "
                "(up region, down region)."
            )
        plus, minus = masks
    lfc = _call_user(change_fn, "change_fn", s1, s2, 1e-3 * pc)
    cols = {
        "scale1": s1.mean(0),
        "scale2": s2.mean(0),
        "lfc_mean": lfc.mean(0),
        "lfc_median": np.median(lfc, 0),
        "lfc_std": lfc.std(0),
        "lfc_min": lfc.min(0),
        "lfc_max": lfc.max(0),
    }
    if levels:
        by_gene = np.sort(lfc.T, axis=1)
        for level in levels:
            lo_name, hi_name = _interval_names(level)
            cols[lo_name], cols[hi_name] = credible_intervals(by_gene, level)
    p_up, p_down = np.mean(plus, 0), np.mean(minus, 0)
    return _change_columns(p_up, p_down, test_mode, pc, delta, cols)


def _call_user(fn, name: str, *args, same_shape: bool = True):
    try:
        out = fn(*args)
    except TypeError as err:
        raise TypeError(
            f"{name} failed on numpy arrays of shape {np.shape(args[0])}: {err}. It must take "
            "numpy arrays (samples, genes) and return arrays of the same shape."
        ) from err
    if not same_shape:
        return out
    out = np.asarray(out)
    if out.shape != np.shape(args[0]):
        raise ValueError(
            f"{name} returned shape {out.shape}; expected {np.shape(args[0])} (samples, genes)."
        )
    return out


def check_custom_functions(change_fn, m1_domain_fn) -> None:
    """Refuse, before any sampling, functions that cannot take their arguments."""
    if change_fn is not None and not callable(change_fn) and change_fn != "log-fold":
        raise ValueError(f"change_fn={change_fn!r}: use 'log-fold' or a function (x, y, pc).")
    for fn, name, n_args in ((change_fn, "change_fn", 3), (m1_domain_fn, "m1_domain_fn", 1)):
        if not callable(fn):
            continue
        try:
            inspect.signature(fn).bind(*range(n_args))
        except TypeError:
            raise ValueError(
                f"{name} must take exactly {n_args} positional argument(s): "
                + ("(x, y, pseudocount)." if n_args == 3 else "(changes).")
            ) from None
        except ValueError:  # no signature (some builtins): checked when called
            pass


def check_levels(levels) -> tuple[float, ...]:
    """``cred_interval_lvls`` as a tuple of levels in (0, 1)."""
    if levels is None:
        return ()
    levels = tuple(float(v) for v in np.atleast_1d(levels))
    bad = [v for v in levels if not 0 < v < 1]
    if bad:
        raise ValueError(f"cred_interval_lvls={bad}: each level must lie in (0, 1), e.g. 0.9.")
    return levels


def _interval_names(level: float) -> tuple[str, str]:
    tag = str(level)[:5]
    return f"lfc_confidence_interval_{tag}_min", f"lfc_confidence_interval_{tag}_max"


def credible_intervals(sorted_rows: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Highest-density interval of each row of ``sorted_rows`` (ascending samples).

    The narrowest window holding ``floor(level · m)`` sample gaps; exact for unimodal samples.

    Examples
    --------
    >>> rows = np.sort(np.array([[0.0, 1.0, 2.0, 3.0, 10.0]]), axis=1)
    >>> credible_intervals(rows, 0.6)
    (array([0.]), array([3.]))
    """
    m = sorted_rows.shape[1]
    k = int(np.floor(level * m))
    widths = sorted_rows[:, k:] - sorted_rows[:, : m - k]
    start = widths.argmin(1)
    rows = np.arange(len(sorted_rows))
    return sorted_rows[rows, start], sorted_rows[rows, start + k]


def _change_columns(p_up, p_down, test_mode, pc, delta, cols) -> dict:
    proba = np.maximum(p_up, p_down) if test_mode == "three" else p_up + p_down
    n_genes = len(proba)
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


def vanilla_statistics(s1, s2) -> dict:
    """``P(ρ1 > ρ2)`` per gene over the pairs, its complement and log odds."""
    p1 = np.empty(s1.shape[1])
    for genes, a, b in _gene_blocks(s1, s2):
        p1[genes] = (a > b).sum(0).numpy() / len(s1)
    return {
        "proba_m1": p1,
        "proba_m2": 1 - p1,
        "bayes_factor": np.log(p1 + _EPS) - np.log(1 - p1 + _EPS),
        "scale1": s1.mean(0),
        "scale2": s2.mean(0),
    }


def pair_samples(s1, tags1, s2, tags2, use_permutation: bool, m_permutation: int, rng):
    """Pairs of the groups' samples (§4.2): within each batch when both groups were decoded
    under the same batches (``tags``), else globally; element-wise, or ``m_permutation``
    random pairs (split evenly over the batches)."""
    if tags1 is not None and tags2 is not None and set(tags1) == set(tags2):
        batches = np.unique(tags1)
        per = max(1, m_permutation // len(batches))
        pairs = [_pairs(s1[tags1 == b], s2[tags2 == b], use_permutation, per, rng) for b in batches]
        return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    return _pairs(s1, s2, use_permutation, m_permutation, rng)


def _pairs(a, b, use_permutation, m, rng):
    if use_permutation:
        return a[rng.integers(len(a), size=m)], b[rng.integers(len(b), size=m)]
    n = min(len(a), len(b))
    return a[:n], b[:n]


def _tail_probabilities(r: torch.Tensor, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Per gene (column of ``r``): the fractions of samples with ``r >= δ`` and ``r < -δ``."""
    m = r.shape[0]
    # (bytes summed into int32: a boolean sum would widen the whole mask to int64 first)
    up = (r >= delta).view(torch.uint8).sum(0, dtype=torch.int32)
    down = (r < -delta).view(torch.uint8).sum(0, dtype=torch.int32)
    return up.numpy() / m, down.numpy() / m


def _log2_ratio(t1: torch.Tensor, t2: torch.Tensor, pseudocount: float) -> torch.Tensor:
    """``log2((t1 + pc) / (t2 + pc))``: one logarithm per element, two temporaries."""
    r = torch.add(t1, pseudocount)
    return r.div_(torch.add(t2, pseudocount)).log2_()
