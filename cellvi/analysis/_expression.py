"""Expression-level outputs: normalized expression, posterior predictive samples,
likelihood parameters (``analysis.md`` §3)."""

from __future__ import annotations

import contextlib
import numbers
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .._constants import REGISTRY_KEYS
from ..errors import CellviWarning, check_count
from ._batches import eval_mode, inference_batches, private_rng, resolve_indices
from ._importance import importance_resample

__all__ = [
    "transform_batch_codes",
    "get_normalized_expression",
    "posterior_predictive_sample",
    "get_likelihood_parameters",
]


def as_name_list(value) -> list:
    """A lone name (a string or a scalar) as a one-item list; list-likes as lists."""
    if isinstance(value, str) or np.ndim(value) == 0:
        return [value]
    return list(value)


def transform_batch_codes(model, transform_batch, arg: str = "transform_batch") -> list:
    """Batch names (or a list of them) → codes; None (also inside a list) keeps each cell's
    own batch."""
    if transform_batch is None:
        return [None]
    names = as_name_list(transform_batch)
    if not names:
        raise ValueError(f"{arg}=[] names no batch; use None for each cell's own batch.")
    mapping = list(model.get_state_registry(REGISTRY_KEYS.BATCH_KEY)["categorical_mapping"])
    codes = []
    for name in names:
        if name is None:
            codes.append(None)
        elif name in mapping:
            codes.append(mapping.index(name))
        else:
            raise ValueError(f"{arg}={name!r} is not a batch of this model; batches: {mapping}.")
    return codes


def _gene_mask(model, gene_list) -> np.ndarray | None:
    if gene_list is None:
        return None
    gene_list = as_name_list(gene_list)
    names = pd.Index(model.registry_["field_registries"]["X"]["state_registry"]["column_names"])
    missing = [g for g in gene_list if g not in names]
    if missing:
        raise KeyError(f"gene_list has genes the model does not know: {missing[:5]}")
    return np.flatnonzero(names.isin(gene_list))


def _library_factor(library_size) -> tuple[str, float]:
    if isinstance(library_size, str):
        if library_size != "latent":
            raise ValueError(
                f"library_size={library_size!r} must be a positive number or 'latent'."
            )
        return "rate", 1.0
    if isinstance(library_size, bool) or not isinstance(library_size, numbers.Real):
        raise TypeError(f"library_size={library_size!r} must be a positive number or 'latent'.")
    if not library_size > 0:
        raise ValueError(f"library_size={library_size!r} must be a positive number or 'latent'.")
    return "scale", float(library_size)


def _decode(module, batch, n_samples, codes, quantity, out=None):
    """Average over transform batches of ``quantity`` ('scale' or 'rate'), (S?, cells, genes).

    With ``out`` (one transform batch, ``quantity='scale'``), ρ is written straight into it.
    """
    inf = module.inference(batch, n_samples=n_samples, library=quantity != "scale")
    total = None
    for code in codes:
        gen = module.generative(
            inf["z"], inf["library"], batch, transform_batch=code, scale_only=True, scale_out=out
        )
        value = gen["scale"] if quantity == "scale" else gen["scale"] * inf["library"].exp()
        total = value if total is None else total.add_(value)
    return total if len(codes) == 1 else total.div_(len(codes))


def get_normalized_expression(
    model,
    adata=None,
    indices=None,
    transform_batch=None,
    gene_list=None,
    library_size: float | str = 1,
    n_samples: int = 1,
    n_samples_overall: int | None = None,
    weights: str | None = None,
    batch_size: int | None = None,
    return_mean: bool = True,
    return_numpy: bool | None = None,
    seed: int | None = 0,
    **importance_weighting_kwargs,
):
    """Decoded expression ρ × ``library_size`` per cell (``analysis.md`` §3).

    ``library_size="latent"`` returns the rate μ = e^l ρ. With ``n_samples > 1`` and
    ``return_mean=False`` the result is an array ``(n_samples, n_cells, n_genes)``.
    ``n_samples_overall=M`` returns ``M`` rows drawn uniformly from the cells' posterior
    (the sampler DE uses); ``weights="importance"`` resamples them by importance weight
    (``importance_weighting_kwargs``: ``max_cells``, ``truncation``, ``n_mc_samples``,
    ``n_mc_samples_per_pass``; see :mod:`cellvi.analysis._importance`). Results for several
    ``transform_batch`` values are averaged.

    The posterior draws of ``z`` come from a stream seeded with ``seed`` (0): a call returns
    the same values every time, whatever the global random state, which it leaves as it was.
    ``seed=None`` draws from the global torch stream instead (a new draw at each call, as in
    scvi-tools).
    """
    if weights not in (None, "uniform", "importance"):
        raise ValueError(f"weights={weights!r}: use 'uniform' (or None) or 'importance'.")
    n_samples = check_count(n_samples, "n_samples")
    module = model.module
    codes = transform_batch_codes(model, transform_batch)
    genes = _gene_mask(model, gene_list)
    manager = model._manager_for(adata)
    cell_idx = resolve_indices(indices, manager.summary_stats["n_cells"])
    if n_samples_overall is not None:
        n_samples_overall = check_count(n_samples_overall, "n_samples_overall")
        if len(cell_idx) == 0:
            raise ValueError(
                f"n_samples_overall={n_samples_overall} draws from the selected cells, but "
                "indices selects no cells; select at least one cell."
            )
    if weights == "importance" or importance_weighting_kwargs:
        return _importance_weighted(
            model, adata, cell_idx, codes, genes, library_size, n_samples, n_samples_overall,
            weights, seed, batch_size, importance_weighting_kwargs,
        )  # fmt: skip
    if n_samples_overall is not None:
        if n_samples != 1:
            raise ValueError("n_samples_overall needs n_samples=1.")
        rng = np.random.default_rng(seed)
        cell_idx = rng.choice(cell_idx, size=n_samples_overall, replace=True)
        return_mean, return_numpy = True, True
    quantity, factor = _library_factor(library_size)
    n_genes = len(genes) if genes is not None else manager.summary_stats["n_vars"]
    per_sample = n_samples > 1 and not return_mean
    # the result is allocated once and filled minibatch by minibatch (no concatenation copy)
    shape = (n_samples, len(cell_idx), n_genes) if per_sample else (len(cell_idx), n_genes)
    result = np.empty(shape, dtype=np.float32)
    start = 0
    # a seed gives the same draws at every call and leaves the caller's streams as they were;
    # seed=None draws from (and advances) the global torch stream
    streams = private_rng(model.device) if seed is not None else contextlib.nullcontext()
    with streams, eval_mode(module):
        if seed is not None:
            torch.manual_seed(seed)
        per_cell = module.n_input * n_samples
        batches = inference_batches(
            model, adata, cell_idx, batch_size, sparse_x=True, elements_per_cell=per_cell
        )
        # ρ of one transform batch, all genes, one sample, no rescaling: the softmax writes
        # straight into the result (no temporary, no copy)
        direct = quantity == "scale" and len(codes) == 1 and genes is None and factor == 1.0
        direct = direct and n_samples == 1 and model.device.type == "cpu"
        for batch in batches:
            stop = start + len(batch[REGISTRY_KEYS.BATCH_KEY])
            target = torch.from_numpy(result[..., start:stop, :])
            start = stop
            if direct:
                _decode(module, batch, n_samples, codes, quantity, out=target)
                continue
            value = _decode(module, batch, n_samples, codes, quantity)
            if genes is not None:
                value = value[..., torch.as_tensor(genes, device=value.device)]
            if n_samples > 1 and return_mean:
                value = value.mean(0)
            if value.device.type == "cpu" and factor == 1.0:
                target.copy_(value)
            elif value.device.type == "cpu":
                torch.mul(value, factor, out=target)  # written straight into the result
            else:
                target.copy_((value * factor).cpu())
    if n_samples > 1 and not return_mean:
        if return_numpy is False:
            warnings.warn(
                "return_mean=False with n_samples > 1 returns an array (samples, cells, genes).",
                CellviWarning,
                stacklevel=3,
            )
        return result
    if return_numpy:
        return result
    gene_names = model.registry_["field_registries"]["X"]["state_registry"]["column_names"]
    columns = gene_names if genes is None else [gene_names[i] for i in genes]
    obs_names = manager.adata.obs_names[cell_idx]
    # the frame wraps the result (pandas >= 3 would copy an array by default: 160 MB at 20k
    # cells x 2,000 genes)
    return pd.DataFrame(result, index=obs_names, columns=columns, copy=False)


def posterior_predictive_sample(
    model,
    adata=None,
    indices=None,
    transform_batch=None,
    n_samples: int = 1,
    gene_list=None,
    batch_size: int | None = None,
):
    """Counts drawn from p(x | z) with z ~ q(z | x): sparse ``(cells, genes)`` or, for several
    samples, a dense array ``(cells, genes, n_samples)``. With ``gene_likelihood="normal"``
    the draws are real-valued and may be negative."""
    n_samples = check_count(n_samples, "n_samples")
    module = model.module
    codes = transform_batch_codes(model, transform_batch)
    genes = _gene_mask(model, gene_list)
    out = []
    with eval_mode(module):
        per_cell = module.n_input * n_samples
        for batch in inference_batches(
            model, adata, indices, batch_size, sparse_x=True, elements_per_cell=per_cell
        ):
            inf = module.inference(batch, n_samples=n_samples)
            draws = 0
            for code in codes:
                gen = module.generative(inf["z"], inf["library"], batch, transform_batch=code)
                draws = draws + module.likelihood(gen).sample()
            draws = draws / len(codes)
            if genes is not None:
                draws = draws[..., torch.as_tensor(genes)]
            out.append(draws.cpu().numpy())
    if not out:  # no cells selected
        n_genes = len(genes) if genes is not None else module.n_input
        empty = np.empty((0, n_genes), dtype=np.float32)
        return sp.csr_matrix(empty) if n_samples == 1 else np.empty((0, n_genes, n_samples))
    if n_samples == 1:
        return sp.csr_matrix(np.concatenate(out, axis=0))
    return np.moveaxis(np.concatenate(out, axis=1), 0, -1)


def get_likelihood_parameters(
    model,
    adata=None,
    indices=None,
    n_samples: int = 1,
    give_mean: bool = False,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """``mean`` (μ), ``dispersions`` (θ; the standard deviation σ for ``"normal"``; not for
    Poisson) and ``dropout`` (π; ZINB only)."""
    n_samples = check_count(n_samples, "n_samples")
    module = model.module
    lik = module.config.gene_likelihood
    parts: dict[str, list] = {"mean": [], "dispersions": [], "dropout": []}
    with eval_mode(module):
        per_cell = module.n_input * n_samples
        for batch in inference_batches(
            model, adata, indices, batch_size, sparse_x=True, elements_per_cell=per_cell
        ):
            inf = module.inference(batch, n_samples=n_samples)
            gen = module.generative(inf["z"], inf["library"], batch)
            mean = module.rate(gen)
            parts["mean"].append(mean)
            if lik != "poisson":
                parts["dispersions"].append(gen["theta"].expand_as(mean))
            if lik == "zinb":
                parts["dropout"].append(torch.sigmoid(gen["dropout_logits"]))
    axis = 1 if n_samples > 1 else 0
    if not parts["mean"]:  # no cells selected: the same keys, empty along the cell axis
        genes = module.n_input
        shape = (0, genes) if n_samples == 1 or give_mean else (n_samples, 0, genes)
        keys = ["mean"] + (["dispersions"] if lik != "poisson" else [])
        keys += ["dropout"] if lik == "zinb" else []
        return {key: np.empty(shape, dtype=np.float32) for key in keys}
    result = {}
    for key, values in parts.items():
        if not values:
            continue
        array = torch.cat(values, dim=axis).cpu().numpy()
        result[key] = array.mean(0) if (give_mean and n_samples > 1) else array
    return result


_IMPORTANCE_KWARGS = ("max_cells", "truncation", "n_mc_samples", "n_mc_samples_per_pass")


def _importance_weighted(
    model, adata, cell_idx, codes, genes, library_size, n_samples, n_overall, weights, seed,
    batch_size, kwargs,
):  # fmt: skip
    """``n_samples_overall`` rows of ρ × ``library_size`` resampled by importance weight."""
    unknown = sorted(set(kwargs) - set(_IMPORTANCE_KWARGS))
    if unknown:
        raise TypeError(
            f"Unknown argument(s) {unknown}; the extra keyword arguments of this call are "
            f"importance-weighting options (with weights='importance'): "
            f"{list(_IMPORTANCE_KWARGS)}. cellvi's inference has no data-loader options "
            "(num_workers, pin_memory, ...): minibatches are gathered in memory."
        )
    if weights != "importance":
        raise ValueError(f"{sorted(kwargs)} need weights='importance'.")
    if n_overall is None or n_samples != 1:
        raise ValueError("weights='importance' needs n_samples_overall=M (and n_samples=1).")
    if len(codes) != 1:
        raise ValueError(
            "weights='importance' needs a single transform_batch: weights of draws averaged "
            "over several batches are not defined."
        )
    quantity, factor = _library_factor(library_size)
    if quantity != "scale":
        raise ValueError("weights='importance' returns ρ × library_size; 'latent' is not allowed.")
    n_overall = check_count(n_overall, "n_samples_overall")
    rho = importance_resample(
        model, adata, cell_idx, codes[0], n_overall, 0 if seed is None else seed, batch_size,
        **kwargs,
    )  # fmt: skip
    if genes is not None:
        rho = rho[:, genes]
    return rho * factor if factor != 1.0 else rho
