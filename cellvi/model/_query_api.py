"""The public reference-mapping methods every model inherits (implementation: ``_query``)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import CellviWarning
from ..io import read_model_file

__all__ = ["QueryMixin", "prepare_query_anndata"]

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
    says which was used. Missing genes become all-zero sparse columns (in ``X`` and every
    layer; a dense matrix that needs padding becomes CSR), extra genes are dropped.

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
        if matrix is None:  # counts in a layer, no X
            return None
        present = ~np.isnan(src)
        cols = src[present].astype(np.int64)
        sub = matrix[:, cols]
        if sp.issparse(sub):
            perm = np.flatnonzero(present)
            sub = sp.csr_matrix(sub)
            expand = sp.csr_matrix(
                (np.ones(len(perm)), (np.arange(len(perm)), perm)),
                shape=(len(perm), len(ref_names)),
            )
            return (sub @ expand).astype(matrix.dtype).tocsr()
        out = np.zeros((matrix.shape[0], len(ref_names)), dtype=matrix.dtype)
        out[:, present] = np.asarray(sub)
        # padded genes are all-zero sparse columns (persistence.md §3.1): the padded matrix
        # is CSR, as the reference's dense + sparse concatenation is
        return out if present.all() else sp.csr_matrix(out)

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
        if (rows < 0).any():  # padded genes: keep each column writable to .h5ad
            for col in value.columns:
                out[col] = _with_missing(out[col], value[col].dtype)
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


def _with_missing(column: pd.Series, dtype) -> pd.Series:
    """A reindexed column with missing values in a dtype that holds them and that h5ad
    writes: booleans and integers as pandas' nullable types (not object or float), text as
    a categorical (an object column mixing text and NaN cannot be written)."""
    if pd.api.types.is_bool_dtype(dtype):
        return column.astype("boolean")
    if pd.api.types.is_integer_dtype(dtype):
        return column.astype("Int64")
    if pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype):
        return column.astype("category")
    return column


class QueryMixin:
    """``prepare_query_anndata`` and ``load_query_data`` (``persistence.md`` §3)."""

    @classmethod
    def prepare_query_anndata(
        cls,
        adata,
        reference_model,
        return_reference_var_names: bool = False,
        inplace: bool = True,
    ):
        """Reorder/pad/drop the query's genes to match a reference model.

        See :func:`cellvi.model._query_api.prepare_query_anndata`.
        """
        return prepare_query_anndata(adata, reference_model, return_reference_var_names, inplace)

    @classmethod
    def load_query_data(
        cls,
        adata=None,
        reference_model=None,
        registry: dict | None = None,
        inplace_subset_query_vars: bool = False,
        accelerator: str = "auto",
        device: int | str = "auto",
        unfrozen: bool = False,
        freeze_dropout: bool = False,
        freeze_expression: bool = True,
        freeze_decoder_first_layer: bool = True,
        freeze_batchnorm_encoder: bool = True,
        freeze_batchnorm_decoder: bool = False,
        freeze_classifier: bool = True,
        transfer_batch: bool = True,
        datamodule=None,
        check_var_names: str = "error",
    ):
        """A model for query cells built from a reference (architecture surgery).

        New batch (and covariate) categories of the query are appended to the reference's;
        labels are never added (a query label the reference has not seen is an error, for
        SCANVI too: mark such cells with the unlabeled category). Only covariate weights,
        batch embeddings, the library encoder, the switched-on layers and the new slices of
        grown tensors train; all other weights stay bit-identical, also under weight decay.
        Train it with ``plan_kwargs={"weight_decay": 0.0}``.

        The model is saved with its freezing: after ``save``/``load`` it trains the same
        weights as before (``query_freezing_``).

        Parameters
        ----------
        adata
            Query AnnData with the reference genes (see :meth:`prepare_query_anndata`).
        reference_model
            Saved model directory or a trained model.
        registry
            Instead of ``adata``: the registry of query data held by a data module, which must
            already encode the reference's genes and put the reference's categories first
            (else ``SetupError``; pass ``datamodule=`` instead). Train the result with
            ``train(datamodule=...)``.
        inplace_subset_query_vars
            Subset and reorder the query's genes to the reference's in place first; every
            reference gene must be present (else use :meth:`prepare_query_anndata`).
        accelerator, device
            Where the weights go.
        unfrozen
            Train everything.
        freeze_dropout
            Set dropout to 0.
        freeze_expression, freeze_decoder_first_layer
            Keep the first encoder / decoder layer's expression weights frozen.
        freeze_batchnorm_encoder, freeze_batchnorm_decoder
            Freeze BatchNorm parameters and running statistics.
        freeze_classifier
            Keep a label classifier (SCANVI) frozen.
        transfer_batch
            ``False`` refuses query batches the reference has not seen (``ValueError``).
        datamodule
            Instead of ``adata``: a cellvi data module (``AnnDataModule``,
            ``SomaDataModule``) with the query. Its data are registered again with the
            reference's categories (new ones appended; the module's manager is replaced),
            then the model is built from its registry; train it with
            ``train(datamodule=datamodule)`` and get outputs with ``dataloader=``.
        check_var_names
            ``"error"`` or ``"warn"`` when gene names differ.
        """
        from ._query import load_query_data

        return load_query_data(
            cls,
            adata,
            reference_model,
            registry=registry,
            datamodule=datamodule,
            accelerator=accelerator,
            device=device,
            unfrozen=unfrozen,
            freeze_dropout=freeze_dropout,
            freeze_expression=freeze_expression,
            freeze_decoder_first_layer=freeze_decoder_first_layer,
            freeze_batchnorm_encoder=freeze_batchnorm_encoder,
            freeze_batchnorm_decoder=freeze_batchnorm_decoder,
            freeze_classifier=freeze_classifier,
            transfer_batch=transfer_batch,
            inplace_subset_query_vars=inplace_subset_query_vars,
            check_var_names=check_var_names,
        )
