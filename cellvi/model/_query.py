"""Reference mapping (scArches-style): align query genes, grow the model, freeze the rest."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import torch

from ..data import AnnDataManager
from ..errors import CellviWarning, ModelFileError, SetupError
from ..io import from_plain, read_model_file
from ..nn import CovariateLinear
from ._query_api import prepare_query_anndata
from ._registry import _data_keys
from ._save_load import init_kwargs

__all__ = [
    "prepare_query_anndata",
    "load_query_data",
    "freeze_for_query",
    "reference_block_callbacks",
]

logger = logging.getLogger("cellvi")


def _grow(
    ref: torch.Tensor, new: torch.Tensor, old_cats: list[tuple[int, int]] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference values in the leading block of each grown dimension, new init elsewhere.

    Returns the merged tensor and a boolean mask of the positions holding reference values
    (None when nothing grew). A covariate table (``cov_weight``, one block of rows per
    categorical covariate) is grown block by block, given the reference's categories per
    covariate ``old_cats``: each covariate's reference rows land at the start of its block,
    its new categories after them. A covariate the reference skipped (one category, so no
    rows) gets a zero row for that category: the reference's cells keep their outputs.
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
        if n_old == 0 and n_new > 0:  # skipped in the reference: its one category is code 0
            out[start_new], kept[start_new] = 0.0, True
        start_ref, start_new = start_ref + n_old, start_new + n_new
    return out, kept


def _covariate_layouts(cls, registry: dict, init: dict, module) -> dict[str, list]:
    """``{cov_weight key: [(reference categories, query categories) per covariate]}``.

    The reference's layout comes from its architecture rebuilt on the meta device (no
    memory, no data) from its registry.
    """
    with torch.device("meta"):
        reference = cls(None, registry=registry, **init_kwargs(init))
    # every covariate layer: one whose covariates all had one category has no table yet
    old = {
        n: m.n_cat_list
        for n, m in reference.module.named_modules()
        if isinstance(m, CovariateLinear)
    }
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
            # a run at another precision ("64-true", "bf16-true") cast the weights; the kept
            # values stay in their own dtype so that a later float32 run gets them exactly
            param[kept] = values.to(param.dtype)


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
    registry=None,
    datamodule=None,
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
    """Build a model for the query from a reference, growing covariates (see SCVI docs)."""
    from ._save_load import resolve_device

    if reference_model is None:
        raise ValueError("Pass the reference: a saved model directory or a trained model.")
    if adata is None and registry is None and datamodule is None:
        raise ValueError(
            "Pass the query AnnData (adata=), or for data outside an AnnData a cellvi data "
            "module (datamodule=) or its registry (registry=)."
        )
    if adata is not None and (registry is not None or datamodule is not None):
        raise ValueError("Pass the query either as adata= or as datamodule=/registry=, not both.")
    if datamodule is not None and registry is not None and registry is not datamodule.registry:
        raise ValueError(
            "registry= is not the registry of datamodule=; pass only datamodule= (its data "
            "are registered with the reference's categories)."
        )
    torch_device = resolve_device(accelerator, device)
    if isinstance(reference_model, str | Path):
        content = read_model_file(reference_model)
        attrs = from_plain(content["attr_dict"])
        ref_registry, init = attrs["registry_"], attrs["init_params_"]
        ref_state = content["model_state_dict"]
    else:
        ref_registry, init = reference_model.registry_, reference_model.init_params_
        ref_state = copy.deepcopy(reference_model.module.state_dict())
    if ref_registry.get("model_name") != cls.__name__:
        raise ModelFileError(
            f"The reference is a {ref_registry.get('model_name')} model; use "
            f"cellvi.model.{ref_registry.get('model_name')}.load_query_data."
        )
    kwargs = init_kwargs(init)
    if adata is not None:
        manager = _register_query(
            cls, adata, ref_registry, transfer_batch, inplace_subset_query_vars, check_var_names
        )
        cls._register_manager(manager)
        model = cls(adata, **kwargs)
    else:
        if datamodule is not None:
            registry = _register_datamodule(datamodule, ref_registry, check_var_names)
        else:
            _check_query_registry(registry, ref_registry, check_var_names)
        if not transfer_batch:
            _check_known_batches(registry, ref_registry)
        model = cls(None, registry=registry, **kwargs)
    match_layout = getattr(model.module, "match_saved_layout", None)
    if match_layout is not None:  # a reference saved with an older layout keeps it
        match_layout(ref_state)
    new_state = model.module.state_dict()
    layouts = _covariate_layouts(cls, ref_registry, init, model.module)
    merged, grown, grown_shapes = {}, {}, {}
    for key, value in new_state.items():
        ref_value = ref_state.get(key)
        if ref_value is None and key in layouts:  # a covariate table the reference lacked
            ref_value = value.new_zeros((0, *value.shape[1:]))
        if ref_value is None:
            merged[key] = value
            continue
        merged[key], kept = _grow(ref_value.to(value.dtype), value, layouts.get(key))
        if kept is not None:
            grown[key] = kept
            grown_shapes[key] = {
                "reference_shape": list(ref_value.shape),
                "layout": None if key not in layouts else [list(p) for p in layouts[key]],
            }
    model.module.load_state_dict(merged)
    n_ref_batch = len(
        ref_registry["field_registries"]["batch"]["state_registry"]["categorical_mapping"]
    )
    if model.summary_stats.get("n_batch", 1) != n_ref_batch:
        logger.info("Query adds batch categories; their columns were appended to the model.")
    options = {
        "unfrozen": unfrozen,
        "freeze_dropout": freeze_dropout,
        "freeze_expression": freeze_expression,
        "freeze_decoder_first_layer": freeze_decoder_first_layer,
        "freeze_batchnorm_encoder": freeze_batchnorm_encoder,
        "freeze_batchnorm_decoder": freeze_batchnorm_decoder,
        "freeze_classifier": freeze_classifier,
    }
    freeze_for_query(model.module, grown=grown, **options)
    # saved with the model, so that a reloaded query model trains with the same freezing
    model.query_freezing_ = {"options": options, "grown": grown_shapes}
    model.module.to(torch_device)
    model.module.eval()
    model.is_trained_ = False
    return model


def refreeze(module: torch.nn.Module, freezing) -> None:
    """Apply the freezing of a saved query model (its ``query_freezing_``) again."""
    try:
        params = dict(module.named_parameters())
        grown = {}
        for name, info in freezing["grown"].items():
            if name not in params:
                continue
            new = params[name].detach()
            layout = info["layout"]
            ref = torch.zeros(info["reference_shape"], dtype=new.dtype)
            old_cats = None if layout is None else [(int(o), int(n)) for o, n in layout]
            grown[name] = _grow(ref, torch.zeros_like(new, device="cpu"), old_cats)[1]
        options = {k: bool(freezing["options"][k]) for k in _FREEZE_OPTIONS}
    except (KeyError, TypeError, ValueError, ModelFileError) as err:
        raise ModelFileError(
            f"The saved query freezing (query_freezing_) is damaged or was edited: {err!r}."
        ) from None
    freeze_for_query(module, grown={k: v for k, v in grown.items() if v is not None}, **options)


_FREEZE_OPTIONS = (
    "unfrozen",
    "freeze_dropout",
    "freeze_expression",
    "freeze_decoder_first_layer",
    "freeze_batchnorm_encoder",
    "freeze_batchnorm_decoder",
    "freeze_classifier",
)


def _register_query(cls, adata, registry, transfer_batch, subset_vars, check_var_names):
    """The query AnnData registered with the reference's setup (categories extended; the
    labels field refuses unseen labels)."""
    if getattr(adata, "is_view", False):
        raise ValueError("The query is a view; pass adata[idx].copy().")
    if not transfer_batch:
        _check_known_batches_in(adata, registry)
    if subset_vars:
        _subset_query_vars(adata, registry, cls.__name__)
    manager = cls._build_manager(registry["setup_args"])
    manager.register_fields(
        adata,
        source_registry=registry,
        extend_categories=True,
        allow_missing_labels=True,
        check_var_names=check_var_names,
    )
    return manager


def _register_datamodule(datamodule, registry: dict, check_var_names: str) -> dict:
    """Register a data module's data again with the reference's categories (new ones
    appended), so that it feeds the codes the grown model reads; its new registry."""
    manager = getattr(datamodule, "manager", None)
    if getattr(manager, "adata", None) is None or not hasattr(manager, "fields"):
        raise ValueError(
            f"datamodule={type(datamodule).__name__} holds no registered cellvi data; pass a "
            "cellvi data module (AnnDataModule, SomaDataModule), or registry= of data "
            "encoded with the reference's categories."
        )
    new = AnnDataManager(manager.fields, manager.setup_method_args)
    new.register_fields(
        manager.adata,
        source_registry=registry,
        extend_categories=True,
        allow_missing_labels=True,
        check_var_names=check_var_names,
    )
    _check_query_registry(new.registry, registry, check_var_names)
    datamodule.manager, datamodule._store = new, None
    return new.registry


def _mappings(registry: dict) -> dict[str, list]:
    regs = registry["field_registries"]
    out = {
        key: list(regs[key]["state_registry"].get("categorical_mapping", []))
        for key in ("batch", "labels")
        if key in regs
    }
    covs = regs.get("extra_categorical_covs", {}).get("state_registry", {})
    for key, cats in covs.get("mappings", {}).items():
        out[f"covariate {key!r}"] = list(cats)
    return out


def _check_query_registry(query: dict, registry: dict, check_var_names: str) -> None:
    """``registry=``: the query's registry must encode the reference's genes and put the
    reference's categories first (codes index the reference's weights)."""
    if not isinstance(query, Mapping) or not isinstance(query.get("field_registries"), Mapping):
        raise ValueError("registry= must be a data registry, e.g. dm.registry.")
    genes = [query, registry]
    genes = [list(r["field_registries"]["X"]["state_registry"]["column_names"]) for r in genes]
    if len(genes[0]) != len(genes[1]):
        raise SetupError(
            f"The query registry has {len(genes[0])} genes, the reference {len(genes[1])}."
        )
    if genes[0] != genes[1]:
        message = "The query registry's genes differ from the reference's in name or order."
        if check_var_names == "error":
            raise SetupError(message + " (check_var_names='warn' only warns.)")
        warnings.warn(message, CellviWarning, stacklevel=4)
    if _data_keys(query) != _data_keys(registry):
        raise SetupError(
            f"The query registry registers {sorted(_data_keys(query))}, the reference "
            f"{sorted(_data_keys(registry))}; register the same fields."
        )
    ref_maps, query_maps = _mappings(registry), _mappings(query)
    for key, ref in ref_maps.items():
        new = query_maps.get(key, [])
        if new[: len(ref)] != ref or (key == "labels" and new != ref):
            raise SetupError(
                f"The {key} categories of the query registry {new[:6]} do not start with the "
                f"reference's {ref[:6]}, so its codes would be misread (labels must be equal). "
                "Pass datamodule= instead: its data are then encoded with the reference's "
                "categories."
            )


def _check_known_batches(query: dict, registry: dict) -> None:
    """``transfer_batch=False`` with a query registry: no batch beyond the reference's."""
    known = _mappings(registry)["batch"]
    unseen = _mappings(query)["batch"][len(known) :]
    if unseen:
        raise ValueError(
            f"transfer_batch=False: the query holds batch(es) the reference has not seen: "
            f"{unseen} (known: {known}). Pass transfer_batch=True to add them."
        )


def _check_known_batches_in(adata, registry: dict) -> None:
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
