"""SCANVI: semi-supervised label transfer on top of SCVI."""

from __future__ import annotations

import inspect
import logging
import warnings

import numpy as np
import pandas as pd
import torch

from .._constants import REGISTRY_KEYS
from ..analysis import eval_mode, inference_batches, resolve_indices
from ..data import AnnDataManager, standard_fields
from ..dataloaders import SemiSupervisedDataSplitter
from ..errors import CellviWarning, SetupError
from ..module import SCANVAE, VAEConfig
from ..train import UNSET, SemiSupervisedTrainingPlan, config_to_kwargs
from ..train._checks import check_datamodule
from ..train._config import check_classification_ratio
from ._base import seed_torch
from ._save_load import init_kwargs
from ._scvi import SCVI
from ._training import _fields_set_in, default_max_epochs, train_unsupervised

__all__ = ["SCANVI"]

_K = REGISTRY_KEYS
logger = logging.getLogger("cellvi")


def _labels_state(registry: dict) -> dict:
    """The labels state of a registry usable by SCANVI (it needs an unlabeled category)."""
    state = registry["field_registries"].get(_K.LABELS_KEY, {}).get("state_registry", {})
    if "unlabeled_category" not in state:
        raise SetupError(
            "SCANVI needs a registry with labels and an unlabeled category; build the "
            "data module with labels_column=/labels_key= and unlabeled_category=."
        )
    return state


class SCANVI(SCVI):
    """Single-cell ANnotation using Variational Inference (Xu et al. 2021).

    Shares SCVI's architecture options and outputs and adds a classifier trained on the
    labeled cells; ``predict`` transfers labels to the unlabeled ones.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`SCANVI.setup_anndata`.
    n_hidden, n_latent, n_layers, dropout_rate, dispersion, gene_likelihood,
    latent_distribution, use_observed_lib_size, log_variational, encode_covariates,
    deeply_inject_covariates, batch_representation, use_batch_norm, use_layer_norm
        Architecture, as in :class:`SCVI` (see :class:`~cellvi.module.VAEConfig`).
    var_activation, extra_encoder_kwargs, extra_decoder_kwargs, batch_embedding_kwargs
        scvi-tools' pass-through options, as in :class:`SCVI` (checked the same way). As in
        scvi-tools they shape the SCVI part (the ``z``/library encoders, the decoder, the batch
        embedding); the classifier and the ``z2`` encoder/decoder keep their defaults.
    linear_classifier
        Use a single linear layer as classifier.
    classifier_parameters
        scvi-tools' classifier options (``n_hidden``, ``n_layers``, ``dropout_rate``,
        ``use_batch_norm``, ``use_layer_norm``), overriding those taken from the architecture.
    y_prior
        Fixed class prior probabilities, in label code order (None: uniform).
    registry
        A data registry (from a data module or a saved model) when ``adata`` is None.

    Examples
    --------
    >>> import cellvi
    >>> adata = cellvi.data.simulate(n_cells=200, n_genes=100, seed=0)
    >>> adata.obs["labels"] = adata.obs["cell_type"].astype(str)
    >>> cellvi.model.SCANVI.setup_anndata(adata, labels_key="labels", unlabeled_category="?")
    >>> model = cellvi.model.SCANVI(adata, n_latent=5, var_activation="softplus")
    >>> model.module.z_encoder.var_activation.__name__
    'softplus'
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
        linear_classifier: bool = False,
        classifier_parameters: dict | None = None,
        y_prior=None,
        registry: dict | None = None,
    ):
        if adata is None and registry is not None:
            _labels_state(registry)  # refuse before a module with no classes is built
        self.linear_classifier = linear_classifier
        self.classifier_parameters = dict(classifier_parameters or {})
        # plain numbers, saved with the init params
        self.y_prior = (
            None
            if y_prior is None
            else torch.as_tensor(y_prior, dtype=torch.float32).reshape(-1).tolist()
        )
        self.was_pretrained_ = False
        super().__init__(
            adata,
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
            registry=registry,
        )
        extras = self.init_params_["non_kwargs"]
        extras["linear_classifier"] = linear_classifier
        if self.classifier_parameters:  # recorded only when set: older files stay as they were
            extras["classifier_parameters"] = dict(self.classifier_parameters)
        if self.y_prior is not None:
            extras["y_prior"] = list(self.y_prior)
        if self.registry_ is not None:
            self._registry_bound()

    def _registry_bound(self) -> None:
        state = _labels_state(self.registry_)
        self.unlabeled_category_ = state["unlabeled_category"]
        self.labels_ = [c for c in state["categorical_mapping"] if c != self.unlabeled_category_]

    @property
    def n_classes(self) -> int:
        return self.summary_stats["n_labels"] - 1

    def _build_module(self) -> SCANVAE:
        if self.n_classes < 1:
            state = _labels_state(self.registry_)
            key = self.registry_.get("setup_args", {}).get("labels_key")
            raise SetupError(
                f"SCANVI needs at least one label class, but every cell of obs[{key!r}] is the "
                f"unlabeled category {state['unlabeled_category']!r}. Put known cell types in "
                "that column for some cells, or train SCVI on unlabeled data."
            )
        seed_torch()
        return SCANVAE(
            self.summary_stats["n_vars"],
            self.config_,
            n_labels=self.summary_stats["n_labels"] - 1,
            linear_classifier=self.linear_classifier,
            classifier_parameters=self.classifier_parameters,
            y_prior=self.y_prior,
            **self._module_kwargs(),
        )

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
        labels_key: str,
        unlabeled_category,
        layer: str | None = None,
        batch_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
    ) -> None:
        """Register ``adata`` for SCANVI; cells labeled ``unlabeled_category`` are unlabeled.

        The unlabeled category always gets the highest label code. Other arguments as in
        :meth:`SCVI.setup_anndata`.
        """
        setup_args = {
            "labels_key": labels_key,
            "unlabeled_category": unlabeled_category,
            "layer": layer,
            "batch_key": batch_key,
            "size_factor_key": size_factor_key,
            "categorical_covariate_keys": categorical_covariate_keys,
            "continuous_covariate_keys": continuous_covariate_keys,
        }
        manager = cls._build_manager(setup_args)
        manager.register_fields(adata)
        cls._register_manager(manager)

    @classmethod
    def from_scvi_model(
        cls,
        scvi_model: SCVI,
        unlabeled_category,
        labels_key: str | None = None,
        adata=None,
        linear_classifier: bool = False,
        classifier_parameters: dict | None = None,
        y_prior=None,
        **architecture,
    ) -> SCANVI:
        """A SCANVI initialised from a trained SCVI (same setup and architecture, its weights).

        The architecture is the SCVI's ``init_params_``, pass-through options
        (``var_activation``, ``extra_encoder_kwargs``, ...) included. Architecture arguments
        given here as well (scvi-tools' ``**kwargs``) are dropped with a warning when they
        differ from the SCVI's; other names are a ``TypeError`` listing the valid ones.
        ``adata`` (default: the SCVI's) must have the SCVI's genes, in its order, and the same
        batches and categorical covariates, else a :class:`~cellvi.errors.SetupError`.
        """
        if not scvi_model.is_trained:  # as in scvi-tools: allowed, with a warning
            warnings.warn(
                "from_scvi_model: this SCVI has not been trained, so the SCANVI starts from "
                "randomly initialised weights (train the SCVI first to pretrain it).",
                CellviWarning,
                stacklevel=2,
            )
        _drop_repeated_architecture(scvi_model, architecture)
        args = dict(scvi_model.registry_["setup_args"])
        labels_key = labels_key or args.get("labels_key")
        if labels_key is None:
            raise SetupError(
                "Give labels_key=: neither it nor the SCVI setup names a labels column."
            )
        if adata is None:
            adata = scvi_model.adata
            if adata is None:
                raise SetupError("The SCVI model has no AnnData; pass adata=.")
        _check_same_genes(scvi_model.registry_, adata)
        args.pop("labels_key", None)
        cls.setup_anndata(
            adata, labels_key=labels_key, unlabeled_category=unlabeled_category, **args
        )
        _check_same_covariates(scvi_model.registry_, cls._store.get(adata).registry)
        model = cls(
            adata,
            linear_classifier=linear_classifier,
            classifier_parameters=classifier_parameters,
            y_prior=y_prior,
            **_architecture_of(scvi_model),
        )
        ref = scvi_model.module.state_dict()
        own = model.module.state_dict()
        copied = {k: v for k, v in ref.items() if k in own and own[k].shape == v.shape}
        model.module.load_state_dict(copied, strict=False)
        model.module.to(scvi_model.device)  # where the SCVI was trained
        skipped = sorted(set(ref) - set(copied))
        if skipped:
            logger.info(
                "from_scvi_model did not copy %d tensors of other shape: %s",
                len(skipped),
                skipped[:5],
            )
        model.was_pretrained_ = True
        return model

    def train(
        self,
        max_epochs: int | None = None,
        n_samples_per_label: int | None = None,
        check_val_every_n_epoch: int | None = UNSET,
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        batch_size: int | None = None,
        accelerator: str = "auto",
        devices="auto",
        datasplitter_kwargs: dict | None = None,
        plan_config=None,
        plan_kwargs: dict | None = None,
        trainer_config=None,
        callbacks: list | None = None,
        ckpt_path: str | None = None,
        datamodule=None,
        resume: bool = False,
        adversarial_classifier: bool | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train with the ELBO on all cells plus classification of the labeled ones.

        ``max_epochs=None`` uses the SCVI heuristic h, or ``min(10, max(2, round(h / 3)))``
        after :meth:`from_scvi_model`. ``plan_config`` (e.g. a
        ``SemiSupervisedTrainingPlanConfig``) and ``plan_kwargs`` may hold
        ``classification_ratio`` (50; ``plan_kwargs`` wins). Early stopping goes through
        ``**trainer_kwargs`` (``early_stopping=True``). ``adversarial_classifier``: scvi-tools'
        argument; None or False (cellvi's SCANVI has no adversarial batch classifier).
        Other arguments (``datamodule`` and ``resume`` included) as in :meth:`SCVI.train`.
        """
        if adversarial_classifier not in (None, False):
            raise ValueError(
                f"adversarial_classifier={adversarial_classifier!r}: cellvi's SCANVI has no "
                "adversarial batch classifier (scvi-tools enables it only for missing proteins "
                "in TOTALVI-like data); pass None or False."
            )
        if datamodule is not None:
            check_datamodule(datamodule)
        if self.registry_ is None and datamodule is not None:  # SCANVI(): build it now
            self._attach_manager(datamodule.manager, "the data module")
        if max_epochs is None:
            h = default_max_epochs(self.summary_stats["n_cells"])
            max_epochs = min(10, max(2, round(h / 3))) if self.was_pretrained_ else h
        plan_config, plan_kwargs, ratio = _split_classification_ratio(plan_config, plan_kwargs)
        early = trainer_kwargs.pop("early_stopping", UNSET)

        def make_plan(cfg, batch_names):
            return SemiSupervisedTrainingPlan(
                self.module,
                cfg,
                classification_ratio=ratio,
                n_classes=self.n_classes,
                batch_categories=batch_names,
            )

        train_unsupervised(
            self,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            shuffle_set_split=shuffle_set_split,
            batch_size=batch_size,
            early_stopping=early,
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
            splitter_cls=SemiSupervisedDataSplitter,
            splitter_kwargs={"n_samples_per_label": n_samples_per_label},
            make_plan=make_plan,
        )

    def predict(
        self,
        adata=None,
        indices=None,
        soft: bool = False,
        batch_size: int | None = None,
        use_posterior_mean: bool = True,
        dataloader=None,
    ):
        """Predicted labels (array of names) or, with ``soft``, a DataFrame of probabilities."""
        adata, indices = self._data_source(adata, indices, dataloader)
        probs = []
        with eval_mode(self.module):
            for batch in inference_batches(self, adata, indices, batch_size, sparse_x=True):
                logits = self.module.classify(batch, use_posterior_mean=use_posterior_mean)
                probs.append(logits.softmax(-1).cpu())
        n_labels = len(self.labels_)
        p = torch.cat(probs).numpy() if probs else np.empty((0, n_labels), np.float32)
        if soft:
            manager = self._manager_for(adata)
            idx = resolve_indices(indices, manager.adata.n_obs)
            return pd.DataFrame(p, index=manager.adata.obs_names[idx], columns=self.labels_)
        return np.asarray(self.labels_, dtype=object)[p.argmax(1)]


def _split_classification_ratio(plan_config, plan_kwargs) -> tuple[dict | None, dict, float]:
    """Take ``classification_ratio`` out of the plan config and kwargs (kwargs win, as for
    every plan setting); the rest goes to the shared :class:`TrainingPlanConfig`. A dataclass
    config is passed on as the fields it sets, so a default warm-up is still adapted."""
    ratio = 50.0
    if plan_config is not None:
        values = config_to_kwargs(plan_config, "plan_config")
        ratio = values.pop("classification_ratio", ratio)
        explicit = _fields_set_in(plan_config)
        plan_config = {k: v for k, v in values.items() if k in explicit}
    plan_kwargs = config_to_kwargs(plan_kwargs, "plan_kwargs")
    ratio = plan_kwargs.pop("classification_ratio", ratio)
    return plan_config, plan_kwargs, check_classification_ratio(ratio)


def _check_same_genes(registry: dict, adata) -> None:
    """``adata`` must hold the SCVI's genes in its order: its weights are tied to them."""
    state = registry["field_registries"][_K.X_KEY]["state_registry"]
    expected = [str(g) for g in state["column_names"]]
    given = [str(g) for g in adata.var_names]
    if given != expected:
        differ = next(
            (i for i, (a, b) in enumerate(zip(given, expected, strict=False)) if a != b),
            min(len(given), len(expected)),
        )
        raise SetupError(
            f"from_scvi_model: adata has {len(given)} genes, the SCVI model {len(expected)}, "
            f"and they differ from position {differ} on; the SCVI weights are tied to its "
            "genes. Align them with SCVI.prepare_query_anndata(adata, scvi_model) first."
        )


def _check_same_covariates(source: dict, target: dict) -> None:
    """The batch and covariate encodings must match the SCVI's (its one-hot weights)."""
    keys = [k for k in source["field_registries"] if k not in (_K.X_KEY, _K.LABELS_KEY)]
    for key in keys:
        before = source["field_registries"][key].get("state_registry", {})
        after = target["field_registries"].get(key, {}).get("state_registry", {})
        if before != after:
            raise SetupError(
                f"from_scvi_model: the {key!r} categories or columns of adata differ from the "
                f"SCVI model's ({after} vs {before}); its weights are tied to them. Use data "
                "with the same batches and covariates, or map new batches with "
                "SCANVI.load_query_data after training."
            )


def _architecture_of(scvi_model: SCVI) -> dict:
    init = scvi_model.init_params_
    return init_kwargs(init)


def _drop_repeated_architecture(scvi_model: SCVI, given: dict) -> None:
    """Check ``from_scvi_model``'s extra arguments: SCVI architecture names only; those that
    differ from the SCVI's value are ignored with a warning (the weights fix them)."""
    params = inspect.signature(SCVI.__init__).parameters
    names = [n for n in params if n not in ("self", "adata", "registry")]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise TypeError(
            f"from_scvi_model got unknown argument(s) {unknown}; it takes unlabeled_category, "
            f"labels_key, adata, linear_classifier and the SCVI architecture names {names}."
        )
    defaults = {n: params[n].default for n in names}
    used = {**defaults, **_architecture_of(scvi_model)}
    differ = {n: v for n, v in given.items() if _stored(n, v) != _stored(n, used.get(n))}
    if differ:
        warnings.warn(
            "from_scvi_model keeps the SCVI model's architecture; ignored: "
            + ", ".join(f"{n}={v!r} (the SCVI has {used.get(n)!r})" for n, v in differ.items()),
            CellviWarning,
            stacklevel=3,
        )


def _stored(name: str, value):
    """An architecture value as the module configuration stores it (``torch.exp`` as
    ``"exp"``), so that the same choice written two ways compares equal."""
    if name not in VAEConfig.field_names():
        return value
    try:
        return getattr(VAEConfig(**{name: value}), name)
    except (TypeError, ValueError):  # not a valid choice: compared as given
        return value
