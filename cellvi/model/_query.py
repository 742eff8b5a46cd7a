"""Reference mapping (scArches-style): align query genes, grow the model, freeze the rest."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import anndata
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..errors import CellviWarning, ModelFileError
from ..io import from_plain, read_model_file
from ..nn import CovariateLinear

__all__ = [
    "prepare_query_anndata",
    "load_query_data",
    "freeze_for_query",
    "reference_block_callbacks",
]

logger = logging.getLogger("cellvi")

MIN_OVERLAP_WARN = 0.8


def _reference_var_names(reference) -> pd.Index:
    if isinstance(reference, str | Path):
        return pd.Index(read_model_file(reference)["var_names"])
    names = reference.registry_["field_registries"]["X"]["state_registry"]["column_names"]
    return pd.Index(names)


def _match_key(query: anndata.AnnData, ref_names: pd.Index) -> tuple[pd.Index, str]:
    """Query gene identifiers that best match the reference (var_names or a var column)."""
    candidates = [("var_names", query.var_names)]
    for column in query.var.columns:
        dtype = query.var[column].dtype
        # text columns: object, pandas' string dtypes (the default for text in pandas >= 3)
        # or categories
        if pd.api.types.is_string_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype):
            candidates.append((f"var[{column!r}]", pd.Index(query.var[column].astype(str))))
    best = max(candidates, key=lambda c: c[1].isin(ref_names).sum())
    return best[1], best[0]


def prepare_query_anndata(
    adata, reference_model, return_reference_var_names: bool = False, inplace: bool = True
):
    """Give the query exactly the reference genes, in reference order.

    Genes are matched by ``var_names`` or, when ``var`` holds another identifier column
    (Ensembl ids or symbols) that matches more reference genes, by that column; the message
    says which was used. Missing genes become all-zero columns (in ``X`` and every layer),
    extra genes are dropped.

    Parameters
    ----------
    adata
        Query AnnData.
    reference_model
        Saved model directory or a model instance.
    return_reference_var_names
        Only return the reference gene names.
    inplace
        Rewrite ``adata`` in place (returns None); otherwise return a new AnnData.
    """
    ref_names = _reference_var_names(reference_model)
    if return_reference_var_names:
        return ref_names
    ids, used = _match_key(adata, ref_names)
    found = ref_names.isin(ids)
    n_found = int(found.sum())
    if n_found == 0:
        raise ValueError(
            "None of the reference genes is in the query (compared var_names and var columns). "
            "Check that both use the same gene identifiers."
        )
    share = n_found / len(ref_names)
    logger.info(
        "Matched %d of %d reference genes (%.1f%%) by %s.",
        n_found,
        len(ref_names),
        100 * share,
        used,
    )
    if share < MIN_OVERLAP_WARN:
        warnings.warn(
            f"Only {n_found} of {len(ref_names)} reference genes ({share:.0%}) are in the query "
            f"(matched by {used}); the missing ones are filled with zeros, which can bias "
            "the mapping.",
            CellviWarning,
            stacklevel=2,
        )
    position = pd.Series(np.arange(len(ids)), index=ids)
    position = position[~position.index.duplicated()]  # a repeated identifier: its first gene
    src = position.reindex(ref_names).to_numpy()  # NaN where missing

    def reorder(matrix):
        present = ~np.isnan(src)
        cols = src[present].astype(np.int64)
        sub = matrix[:, cols]
        if sp.issparse(sub):
            out = sp.lil_matrix((matrix.shape[0], len(ref_names)), dtype=matrix.dtype)
            out = sp.csr_matrix(out)
            perm = np.flatnonzero(present)
            sub = sp.csr_matrix(sub)
            expand = sp.csr_matrix(
                (np.ones(len(perm)), (np.arange(len(perm)), perm)),
                shape=(len(perm), len(ref_names)),
            )
            return (sub @ expand).astype(matrix.dtype).tocsr()
        out = np.zeros((matrix.shape[0], len(ref_names)), dtype=matrix.dtype)
        out[:, present] = np.asarray(sub)
        return out

    rows = np.where(np.isnan(src), -1, src).astype(np.int64)  # -1: a padded gene
    new = anndata.AnnData(
        X=reorder(adata.X),
        obs=adata.obs.copy(),
        var=_take_rows(adata.var, rows, ref_names),
        layers={k: reorder(v) for k, v in adata.layers.items()},
        obsm=dict(adata.obsm),
        varm={k: _take_rows(v, rows, ref_names) for k, v in adata.varm.items()},
        obsp=dict(adata.obsp),
        uns={k: v for k, v in adata.uns.items() if not k.startswith("_cellvi_")},
    )
    if adata.raw is not None:  # the raw matrix has its own genes: kept as it is
        new.raw = adata.raw.to_adata()
    if not inplace:
        return new
    adata._init_as_actual(new)
    return None


def _take_rows(value, rows: np.ndarray, ref_names: pd.Index):
    """Gene-indexed ``value`` (var table or a varm entry) at the reference genes: the query
    gene's row where matched, missing values (NaN; zero for sparse or integer arrays) for
    padded genes."""
    if isinstance(value, pd.DataFrame):
        out = value.reset_index(drop=True).reindex(rows)
        out.index = ref_names.copy()
        return out
    present = rows >= 0
    if sp.issparse(value):
        pick = sp.csr_matrix(
            (np.ones(int(present.sum())), (np.flatnonzero(present), rows[present])),
            shape=(len(rows), value.shape[0]),
        )
        return (pick @ value).astype(value.dtype)
    value = np.asarray(value)
    fill = np.nan if np.issubdtype(value.dtype, np.floating) else 0
    out = np.full((len(rows), *value.shape[1:]), fill, dtype=value.dtype)
    out[present] = value[rows[present]]
    return out


def _grow(
    ref: torch.Tensor, new: torch.Tensor, old_cats: list[tuple[int, int]] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference values in the leading block of each grown dimension, new init elsewhere.

    Returns the merged tensor and a boolean mask of the positions holding reference values
    (None when nothing grew). A covariate table (``cov_weight``, one block of rows per
    categorical covariate) is grown block by block, given the reference's categories per
    covariate ``old_cats``: each covariate's reference rows land at the start of its block,
    its new categories after them.
    """
    if ref.shape == new.shape:
        return ref.clone(), None
    if ref.dim() != new.dim() or any(r > n for r, n in zip(ref.shape, new.shape, strict=True)):
        raise ModelFileError(
            f"Cannot map a reference tensor of shape {tuple(ref.shape)} onto {tuple(new.shape)}."
        )
    out, kept = new.clone(), torch.zeros(new.shape, dtype=torch.bool, device=new.device)
    if old_cats is None:
        block = tuple(slice(0, r) for r in ref.shape)
        out[block], kept[block] = ref, True
        return out, kept
    start_ref = start_new = 0
    for n_old, n_new in old_cats:
        rows, ref_rows = slice(start_new, start_new + n_old), slice(start_ref, start_ref + n_old)
        out[rows], kept[rows] = ref[ref_rows], True
        start_ref, start_new = start_ref + n_old, start_new + n_new
    return out, kept


def _covariate_layouts(cls, registry: dict, init: dict, module) -> dict[str, list]:
    """``{cov_weight key: [(reference categories, query categories) per covariate]}``.

    The reference's layout comes from its architecture rebuilt on the meta device (no
    memory, no data) from its registry.
    """
    with torch.device("meta"):
        reference = cls(None, registry=registry, **init["non_kwargs"], **init.get("kwargs", {}))
    old = {n: m.n_cat_list for n, m in reference.module.named_modules() if _is_cov(m)}
    return {
        f"{name}.cov_weight": list(zip(old[name], m.n_cat_list, strict=True))
        for name, m in module.named_modules()
        if _is_cov(m) and name in old
    }


def _is_cov(module) -> bool:
    return isinstance(module, CovariateLinear) and module.cov_weight is not None


# the label-conditional z1/z2 hierarchy (SCANVI): frozen, its label columns included
_ALWAYS_FROZEN = ("encoder_z2_z1", "decoder_z1_z2", "classifier")


def restore_reference_blocks(module: torch.nn.Module) -> None:
    """Write the reference values back into the gradient-masked blocks of grown tensors.

    A gradient mask zeroes their gradient, but Adam's L2 term and AdamW's decoupled decay
    would still shrink them; rewriting them after each optimiser step keeps them exactly
    the reference's.
    """
    blocks = getattr(module, "_cellvi_reference_blocks", None)
    if not blocks:
        return
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, (kept, values) in blocks.items():
            param = params[name]
            if values.device != param.device:  # the module moved after freezing
                kept, values = kept.to(param.device), values.to(param.device)
                blocks[name] = (kept, values)
            param[kept] = values


class KeepReferenceBlocks(pl.Callback):
    """Restore the masked reference blocks after every training step (see above); acts on
    the plan's module, so it also works where the plan was copied to a worker process."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        restore_reference_blocks(pl_module.module)

    def on_train_end(self, trainer, pl_module) -> None:
        restore_reference_blocks(pl_module.module)


def reference_block_callbacks(module: torch.nn.Module) -> list:
    """The callback a query model needs during training (none for other models)."""
    return [KeepReferenceBlocks()] if getattr(module, "_cellvi_reference_blocks", None) else []


class _GradientMask:
    """A gradient hook zeroing the reference block; its mask follows the module's device."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if self.mask.device != grad.device:  # the module moved (e.g. to the GPU) after freezing
            self.mask = self.mask.to(grad.device)
        return grad * self.mask


def freeze_for_query(
    module: torch.nn.Module,
    *,
    unfrozen: bool,
    freeze_dropout: bool,
    freeze_expression: bool,
    freeze_decoder_first_layer: bool,
    freeze_batchnorm_encoder: bool,
    freeze_batchnorm_decoder: bool,
    grown: dict[str, torch.Tensor],
    freeze_classifier: bool = True,
) -> None:
    """Decide what trains during query mapping (``persistence.md`` §3.2 freezing table).

    Covariate columns (``cov_weight``, except the label columns of SCANVI's z1/z2
    hierarchy) and batch embeddings always train; the library
    encoder trains; the first encoder/decoder layers train fully only when asked; encoder and
    decoder BatchNorm follow their switches; a label classifier follows ``freeze_classifier``;
    everything else (output heads, dispersion, the z1/z2 hierarchy) is frozen
    (``requires_grad=False``, so weight decay cannot move it). Tensors grown by surgery keep
    their new slices trainable through a gradient mask; their reference blocks are kept on
    the module for :func:`restore_reference_blocks`.
    """
    if freeze_dropout:
        for m in module.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    if unfrozen:
        return

    def bn_frozen(name: str) -> bool:
        if name.startswith("z_encoder"):
            return freeze_batchnorm_encoder
        if name.startswith("decoder."):
            return freeze_batchnorm_decoder
        if name.startswith("classifier"):
            return freeze_classifier
        return not name.startswith("l_encoder")  # z1/z2 hierarchy: frozen

    blocks = {}
    for name, param in module.named_parameters():
        trainable = (
            (name.endswith("cov_weight") and not name.startswith(_ALWAYS_FROZEN))
            or name.startswith("batch_embedding")
            or name.startswith("l_encoder")
            or (not freeze_expression and name.startswith("z_encoder.encoder.blocks.0.linear"))
            or (
                not freeze_decoder_first_layer
                and name.startswith("decoder.px_decoder.blocks.0.linear")
            )
            or (not freeze_classifier and name.startswith("classifier"))
        )
        if "batch_norm" in name:
            trainable = not bn_frozen(name)
        if not trainable and name in grown:
            kept = grown[name].to(param.device)
            param.register_hook(_GradientMask(~kept))  # reference block stays, new slices train
            blocks[name] = (kept, param.detach()[kept].clone())
            trainable = True
        param.requires_grad_(trainable)
    # the gradient mask cannot stop weight decay: training writes these blocks back
    module._cellvi_reference_blocks = blocks
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.BatchNorm1d) and bn_frozen(name):
            m.momentum = 0.0  # running statistics stay those of the reference


def load_query_data(
    cls,
    adata,
    reference_model,
    *,
    accelerator="auto",
    device="auto",
    unfrozen=False,
    freeze_dropout=False,
    freeze_expression=True,
    freeze_decoder_first_layer=True,
    freeze_batchnorm_encoder=True,
    freeze_batchnorm_decoder=False,
    freeze_classifier=True,
    transfer_batch=True,
    inplace_subset_query_vars=False,
    check_var_names="error",
):
    """Build a model for ``adata`` from a reference, growing covariates (see SCVI docs)."""
    from ._save_load import resolve_device

    if reference_model is None:
        raise ValueError("Pass the reference: a saved model directory or a trained model.")
    if adata is None:
        raise ValueError(
            "Pass the query AnnData (adata=); it is registered with the reference's setup."
        )
    torch_device = resolve_device(accelerator, device)
    if isinstance(reference_model, str | Path):
        content = read_model_file(reference_model)
        attrs = from_plain(content["attr_dict"])
        registry, init = attrs["registry_"], attrs["init_params_"]
        ref_state = content["model_state_dict"]
    else:
        registry, init = reference_model.registry_, reference_model.init_params_
        ref_state = copy.deepcopy(reference_model.module.state_dict())
    if registry.get("model_name") != cls.__name__:
        raise ModelFileError(
            f"The reference is a {registry.get('model_name')} model; use "
            f"cellvi.model.{registry.get('model_name')}.load_query_data."
        )
    if getattr(adata, "is_view", False):
        raise ValueError("The query is a view; pass adata[idx].copy().")
    if not transfer_batch:
        _check_known_batches(adata, registry)
    if inplace_subset_query_vars:
        _subset_query_vars(adata, registry, cls.__name__)
    manager = cls._build_manager(registry["setup_args"])
    manager.register_fields(
        adata,
        source_registry=registry,
        extend_categories=True,
        allow_missing_labels=True,
        check_var_names=check_var_names,
    )
    cls._register_manager(manager)
    model = cls(adata, **init["non_kwargs"], **init.get("kwargs", {}))
    new_state = model.module.state_dict()
    layouts = _covariate_layouts(cls, registry, init, model.module)
    merged, grown = {}, {}
    for key, value in new_state.items():
        if key not in ref_state:
            merged[key] = value
            continue
        merged[key], kept = _grow(ref_state[key].to(value.dtype), value, layouts.get(key))
        if kept is not None:
            grown[key] = kept
    model.module.load_state_dict(merged)
    if not model.summary_stats.get("n_batch", 1) == len(
        registry["field_registries"]["batch"]["state_registry"]["categorical_mapping"]
    ):
        logger.info("Query adds batch categories; their columns were appended to the model.")
    freeze_for_query(
        model.module,
        unfrozen=unfrozen,
        freeze_dropout=freeze_dropout,
        freeze_expression=freeze_expression,
        freeze_decoder_first_layer=freeze_decoder_first_layer,
        freeze_batchnorm_encoder=freeze_batchnorm_encoder,
        freeze_batchnorm_decoder=freeze_batchnorm_decoder,
        grown=grown,
        freeze_classifier=freeze_classifier,
    )
    model.module.to(torch_device)
    model.module.eval()
    model.is_trained_ = False
    return model


def _check_known_batches(adata, registry: dict) -> None:
    """``transfer_batch=False``: every query batch must be one of the reference's."""
    state = registry["field_registries"]["batch"]["state_registry"]
    key = registry["setup_args"].get("batch_key")
    if key is None or key not in adata.obs:
        return  # no batch column: one batch, or the setup names the missing column
    known = pd.Index(state["categorical_mapping"])
    values = pd.Index(pd.unique(adata.obs[key].dropna()))
    unseen = values[~values.isin(known)]
    if len(unseen):
        raise ValueError(
            f"transfer_batch=False: obs[{key!r}] holds batch(es) the reference has not seen: "
            f"{list(unseen)} (known: {list(known)}). Pass transfer_batch=True to add them."
        )


def _subset_query_vars(adata, registry: dict, class_name: str) -> None:
    """``inplace_subset_query_vars=True``: keep the reference genes, in reference order."""
    ref_names = pd.Index(registry["field_registries"]["X"]["state_registry"]["column_names"])
    missing = ref_names[~ref_names.isin(adata.var_names)]
    if len(missing):
        raise ValueError(
            f"{len(missing)} reference gene(s) are not in the query (e.g. {list(missing[:3])}); "
            f"pad them with cellvi.model.{class_name}.prepare_query_anndata(adata, reference)."
        )
    if not adata.var_names.equals(ref_names):
        adata._inplace_subset_var(ref_names)
