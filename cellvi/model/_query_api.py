"""The public reference-mapping methods every model inherits (implementation: ``_query``)."""

from __future__ import annotations

__all__ = ["QueryMixin"]


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

        See :func:`cellvi.model._query.prepare_query_anndata`.
        """
        from ._query import prepare_query_anndata

        return prepare_query_anndata(adata, reference_model, return_reference_var_names, inplace)

    @classmethod
    def load_query_data(
        cls,
        adata=None,
        reference_model=None,
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
        inplace_subset_query_vars: bool = False,
        check_var_names: str = "error",
    ):
        """A model for query cells built from a reference (architecture surgery).

        New batch (and covariate) categories of the query are appended to the reference's;
        only covariate weights, batch embeddings, the library encoder, the switched-on layers
        and the new slices of grown tensors train; all other weights stay bit-identical,
        also under weight decay. Train it with ``plan_kwargs={"weight_decay": 0.0}``.

        Parameters
        ----------
        adata
            Query AnnData with the reference genes (see :meth:`prepare_query_anndata`).
        reference_model
            Saved model directory or a trained model.
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
        inplace_subset_query_vars
            Subset and reorder the query's genes to the reference's in place first; every
            reference gene must be present (else use :meth:`prepare_query_anndata`).
        check_var_names
            ``"error"`` or ``"warn"`` when gene names differ.
        """
        from ._query import load_query_data

        return load_query_data(
            cls,
            adata,
            reference_model,
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
