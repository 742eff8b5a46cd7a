"""SCVI: the user-facing single-cell variational autoencoder."""

from __future__ import annotations

import inspect

import numpy as np
import torch

from .._constants import REGISTRY_KEYS
from ..data import AnnDataManager, row_totals, standard_fields
from ..module import VAE, VAEConfig
from ..train import UNSET, config_to_kwargs
from ._base import BaseModel, seed_torch
from ._rna_outputs import RNAOutputsMixin
from ._training import train_unsupervised

__all__ = ["SCVI"]

_K = REGISTRY_KEYS
_PASS_THROUGH = (
    "var_activation",
    "extra_encoder_kwargs",
    "extra_decoder_kwargs",
    "batch_embedding_kwargs",
)


class SCVI(RNAOutputsMixin, BaseModel):
    """Single-cell variational inference (Lopez et al. 2018) for UMI counts.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`SCVI.setup_anndata`.
    n_hidden, n_latent, n_layers, dropout_rate, dispersion, gene_likelihood,
    latent_distribution, use_observed_lib_size, log_variational, encode_covariates,
    deeply_inject_covariates, batch_representation, use_batch_norm, use_layer_norm
        Architecture; see :class:`~cellvi.module.VAEConfig` for meanings and defaults.
        ``gene_likelihood="normal"`` (experimental) is a Gaussian on the raw counts.
    var_activation, extra_encoder_kwargs, extra_decoder_kwargs, batch_embedding_kwargs
        scvi-tools' pass-through options, restricted to what a model file can store as
        data: ``var_activation`` is ``"exp"`` or ``"softplus"`` (or ``torch.exp``,
        ``torch.nn.functional.softplus``); the dicts take the keys listed in
        :class:`~cellvi.module.VAEConfig` (e.g. ``{"activation_fn": "leaky_relu"}``,
        ``{"var_eps": 1e-5}``, ``{"embedding_dim": 10}``). Unknown keys raise ``TypeError``
        listing the valid ones.
    registry
        A data registry (from a data module or a saved model) when ``adata`` is None.

    Examples
    --------
    >>> import cellvi
    >>> adata = cellvi.data.simulate(n_cells=200, n_genes=100, seed=0)
    >>> cellvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    >>> model = cellvi.model.SCVI(adata, n_latent=5)
    >>> model.summary_stats["n_batch"]
    2
    """

    def __init__(
        self,
        adata=None,
        *,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str = "zinb",
        latent_distribution: str = "normal",
        use_observed_lib_size: bool = True,
        log_variational: bool = True,
        encode_covariates: bool = False,
        deeply_inject_covariates: bool = True,
        batch_representation: str = "one-hot",
        use_batch_norm: str = "both",
        use_layer_norm: str = "none",
        var_activation: str | None = None,
        extra_encoder_kwargs: dict | None = None,
        extra_decoder_kwargs: dict | None = None,
        batch_embedding_kwargs: dict | None = None,
        registry: dict | None = None,
    ):
        super().__init__(adata, registry=registry)
        self.config_ = VAEConfig(
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            gene_likelihood=gene_likelihood,
            latent_distribution=latent_distribution,
            use_observed_lib_size=use_observed_lib_size,
            log_variational=log_variational,
            encode_covariates=encode_covariates,
            deeply_inject_covariates=deeply_inject_covariates,
            batch_representation=batch_representation,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            var_activation=var_activation,
            extra_encoder_kwargs=extra_encoder_kwargs,
            extra_decoder_kwargs=extra_decoder_kwargs,
            batch_embedding_kwargs=batch_embedding_kwargs,
        )
        accepted = set(inspect.signature(type(self).__init__).parameters)
        # pass-through options left at None are not recorded, so the file stays loadable by
        # cellvi versions without them
        self.init_params_ = {
            "non_kwargs": {
                k: v
                for k, v in self.config_.to_dict().items()
                if k in accepted and not (k in _PASS_THROUGH and v is None)
            },
            "kwargs": {},
        }
        self.module = self._build_module() if self.registry_ is not None else None

    def _module_kwargs(self) -> dict:
        """Data-dependent arguments of the module, read from the registry."""
        stats = self.summary_stats
        n_batch = stats.get("n_batch", 1)
        library_means = library_vars = None
        size_factors = _K.SIZE_FACTOR_KEY in self._data_keys()
        if size_factors and not self.config_.use_observed_lib_size:
            raise ValueError(
                "use_observed_lib_size=False learns each cell's library size, but the data "
                "were registered with size_factor_key, which fixes it; drop one of the two "
                "(setup_anndata without size_factor_key, or use_observed_lib_size=True)."
            )
        if not self.config_.use_observed_lib_size:
            library_means, library_vars = self._library_priors(n_batch)
        cat_state = self.registry_["field_registries"].get(_K.CAT_COVS_KEY, {})
        n_cats = cat_state.get("state_registry", {}).get("n_cats_per_key", [])
        return {
            "n_batch": n_batch,
            "n_continuous_cov": stats.get("n_extra_continuous_covs", 0),
            "n_cats_per_cov": list(n_cats),
            "library_log_means": library_means,
            "library_log_vars": library_vars,
            "use_size_factor_key": size_factors,
        }

    def _build_module(self) -> VAE:
        seed_torch()
        return VAE(
            self.summary_stats["n_vars"],
            self.config_,
            n_labels=self.summary_stats.get("n_labels", 1),
            **self._module_kwargs(),
        )

    def _data_keys(self) -> set[str]:
        regs = self.registry_["field_registries"]
        return {k for k, v in regs.items() if v.get("data_registry")}

    def _library_priors(self, n_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of the log library size per batch (empty batch → 0, 1; a batch
        whose variance cannot be estimated, one cell or equal totals, keeps variance 1)."""
        if self.adata_manager is None:
            return torch.zeros(1, n_batch), torch.ones(1, n_batch)
        x = self.adata_manager.get_from_registry(_K.X_KEY)
        totals = row_totals(x)  # chunked when the counts are on disk
        batch = np.asarray(self.adata_manager.get_from_registry(_K.BATCH_KEY)).ravel()
        means, variances = np.zeros((1, n_batch)), np.ones((1, n_batch))
        log_totals = np.log(totals)
        for b in range(n_batch):
            values = log_totals[batch == b]
            if values.size:
                means[0, b] = values.mean()
                if values.size > 1 and values.var() > 0:  # else a prior of variance 0: inf KL
                    variances[0, b] = values.var()
        return torch.as_tensor(means, dtype=torch.float32), torch.as_tensor(
            variances, dtype=torch.float32
        )

    # ------------------------------------------------------------------ setup
    @classmethod
    def _build_manager(cls, setup_args: dict) -> AnnDataManager:
        return AnnDataManager(
            standard_fields(setup_args),
            {
                "model_name": cls.__name__,
                "setup_method_name": "setup_anndata",
                "setup_args": setup_args,
            },
        )

    @classmethod
    def setup_anndata(
        cls,
        adata,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
    ) -> None:
        """Register ``adata`` for SCVI (``data.md`` §1).

        Checks the counts over the whole matrix and every covariate before anything trains,
        writes integer codes into ``adata.obs``/``adata.obsm`` (``_cellvi_*`` keys) and
        remembers the setup for models built on this object.

        Parameters
        ----------
        adata
            AnnData with raw counts in ``X`` or in ``layers[layer]``.
        layer
            Layer holding the counts (None: ``X``).
        batch_key
            ``obs`` column with the batch of each cell.
        labels_key
            ``obs`` column with cell labels (used by ``dispersion="gene-label"``).
        size_factor_key
            ``obs`` column with positive size factors replacing the observed library size.
        categorical_covariate_keys, continuous_covariate_keys
            Further ``obs`` columns injected as nuisance covariates (continuous ones numeric;
            True/False columns are read as 1/0).

        Raises
        ------
        cellvi.errors.MissingKeyError
            A layer or column does not exist (the message lists what exists).
        cellvi.errors.InvalidDataError
            Negative/NaN/inf counts, cells with zero counts, NaN categories, ...
        """
        setup_args = {
            "layer": layer,
            "batch_key": batch_key,
            "labels_key": labels_key,
            "size_factor_key": size_factor_key,
            "categorical_covariate_keys": categorical_covariate_keys,
            "continuous_covariate_keys": continuous_covariate_keys,
        }
        manager = cls._build_manager(setup_args)
        manager.register_fields(adata)
        cls._register_manager(manager)

    # ------------------------------------------------------------------ train
    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | str | list = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool = False,
        batch_size: int | None = None,
        early_stopping: bool = UNSET,
        check_val_every_n_epoch: int | None = UNSET,
        datasplitter_kwargs: dict | None = None,
        plan_config=None,
        plan_kwargs: dict | None = None,
        trainer_config=None,
        callbacks: list | None = None,
        ckpt_path: str | None = None,
        datamodule=None,
        resume: bool = False,
        **trainer_kwargs,
    ) -> None:
        """Train the model (``training.md`` §1).

        Parameters
        ----------
        max_epochs
            Number of epochs; None uses ``min(round(20000 / n_cells * 400), 400)``, never
            fewer than 10.
        accelerator, devices
            Lightning device selection (``"auto"``, ``"cpu"``, ``"gpu"``; counts or lists).
        train_size, validation_size
            Split fractions (default 0.9 train, rest validation).
        shuffle_set_split
            Shuffle cells before splitting (seeded by ``cellvi.settings.seed``).
        load_sparse_tensor
            scvi-tools' option to send sparse minibatches to the device. Accepted and passed
            to the splitter, where it changes nothing: sparse counts are kept as CSR (on the
            GPU too) and densified one minibatch at a time either way.
        batch_size
            Minibatch size (default ``cellvi.settings.batch_size``, 128).
        early_stopping
            Stop when ``early_stopping_monitor`` stops improving. Only overrides a
            ``trainer_config`` value when given.
        check_val_every_n_epoch
            Validation frequency (None: never, unless a monitor needs it).
        datasplitter_kwargs
            Further :class:`~cellvi.dataloaders.DataSplitter` arguments.
        plan_config, plan_kwargs
            :class:`~cellvi.train.TrainingPlanConfig` (or mapping) and overrides
            (``lr``, ``n_epochs_kl_warmup``, ``reduce_lr_on_plateau``, ...).
        trainer_config
            :class:`~cellvi.train.TrainerConfig`, or a mapping (or object with
            ``to_kwargs()``) of its fields and Lightning ``Trainer`` arguments; arguments given
            to train() win over it, and its ``max_epochs``/``accelerator``/``devices`` are
            ignored (train()'s apply; a differing value warns).
        callbacks
            Extra Lightning callbacks (``lightning.pytorch.Callback`` instances), e.g.
            :class:`~cellvi.train.SaveCheckpoint`.
        ckpt_path
            Resume an interrupted run from its ``last.ckpt`` (same ``max_epochs``).
        resume
            Continue this model's earlier training: Adam's moments and step counts go on and
            the KL warm-up continues where it stopped (``max_epochs`` more epochs; the
            learning rate and other plan settings are this call's). Needs the optimiser state
            of an earlier ``train()`` in this session or of a model saved with
            ``save(..., save_optimizer_state=True)``. Not with ``ckpt_path``. Without it, a
            trained model restarts both (with a warning).
        datamodule
            Train on a data module (:class:`~cellvi.dataloaders.SomaDataModule`,
            :class:`~cellvi.dataloaders.AnnDataModule`) instead of the model's AnnData; its
            registry must match the model's. Its split and batch size apply unless given here.
        **trainer_kwargs
            Fields of :class:`~cellvi.train.TrainerConfig` (``early_stopping_patience``,
            ``enable_checkpointing``, ``gradient_clip_val`` ...) or Lightning ``Trainer``
            arguments; unknown names raise ``TypeError`` listing the valid ones. Among them,
            ``log_save_dir``: when training ends (finished or not) the run's history is
            pickled to ``<log_save_dir>/lightning_logs/version_<k>/history.pkl`` (a dict of
            DataFrames, as ``model.history``), with a ``history.csv`` beside it; ``k`` is the
            next free number from 1, so runs never overwrite each other.

        Raises
        ------
        cellvi.train.TrainingInterrupted
            On Ctrl-C or SIGTERM, at the next batch boundary (a second signal stops at once;
            under DDP every rank stops at the same step). The model keeps the weights and
            history of the finished epochs; the error names the ``ckpt_path`` to resume from.
        cellvi.errors.NonFiniteLossError
            A NaN/inf loss or gradient, caught at its step; the weights roll back.
        """
        if not isinstance(load_sparse_tensor, bool):
            raise TypeError(f"load_sparse_tensor={load_sparse_tensor!r} must be True or False.")
        if load_sparse_tensor and datamodule is None:
            given = config_to_kwargs(datasplitter_kwargs, "datasplitter_kwargs")
            datasplitter_kwargs = {"load_sparse_tensor": True, **given}
        train_unsupervised(
            self,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            shuffle_set_split=shuffle_set_split,
            batch_size=batch_size,
            early_stopping=early_stopping,
            check_val_every_n_epoch=check_val_every_n_epoch,
            datasplitter_kwargs=datasplitter_kwargs,
            plan_config=plan_config,
            plan_kwargs=plan_kwargs,
            trainer_config=trainer_config,
            callbacks=callbacks,
            ckpt_path=ckpt_path,
            trainer_kwargs=trainer_kwargs,
            datamodule=datamodule,
            resume=resume,
        )
