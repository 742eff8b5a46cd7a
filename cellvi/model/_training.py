"""``model.train()`` for unsupervised models: resolve configs, split, plan, run."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import numbers
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from .._constants import REGISTRY_KEYS
from .._settings import settings
from ..data._backed import close_disk_sources
from ..dataloaders import DataSplitter
from ..errors import SetupError, TrainingWarning, check_count
from ..train import (
    UNSET,
    TrainerConfig,
    TrainingPlan,
    TrainingPlanConfig,
    build_dataclass,
    config_to_kwargs,
    default_run_dir,
    run_training,
)
from ..train._checks import check_callbacks, check_datamodule
from ..train._devices import device_count
from ._base import seed_torch
from ._history_log import check_log_save_dir, save_history_log
from ._query import reference_block_callbacks
from ._warmup import adapt_kl_warmup, kept_kl_warmup

__all__ = ["default_max_epochs", "resolve_trainer_config", "train_unsupervised"]

logger = logging.getLogger("cellvi")

MIN_DEFAULT_EPOCHS = 10


def default_max_epochs(n_obs: int) -> int:
    """Epoch heuristic ``min(round(20000 / n_obs * 400), 400)``, floored at 10.

    The floor is cellvi's fix of a budget trap: the reference heuristic gives 1 epoch from
    8M cells on, which silently leaves the model barely trained.
    """
    heuristic = min(round(20_000 / max(n_obs, 1) * 400), 400)
    if heuristic < MIN_DEFAULT_EPOCHS:
        logger.info(
            "max_epochs defaults to %d (the cell-count heuristic gives %d for %d cells).",
            MIN_DEFAULT_EPOCHS,
            heuristic,
            n_obs,
        )
    return max(heuristic, MIN_DEFAULT_EPOCHS)


def _run_dir_for(model, ckpt_path):
    """A resumed run continues in the directory of its checkpoint (history.csv goes on)."""
    if ckpt_path is not None:
        ckpt = Path(ckpt_path)
        if ckpt.parent.name == "checkpoints":
            return ckpt.parent.parent
    return default_run_dir(type(model).__name__)


_SPLIT_ARGUMENTS = {
    "train_size",
    "validation_size",
    "shuffle_set_split",
    "batch_size",
    "distributed_sampler",
}


def _lightning_trainer_args() -> set[str]:
    return set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}


_TRAIN_OWN = ("max_epochs", "accelerator", "devices")


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. arrays: not worth a warning either way
        return True


def _sort_trainer_arguments(
    source: Mapping[str, Any],
    where: str,
    values: dict,
    extra: dict,
    train_args: Mapping[str, Any] | None,
) -> None:
    """Put each argument in ``values`` (TrainerConfig fields) or ``extra`` (Lightning Trainer
    arguments); refuse unknown names with a 'did you mean'. With ``train_args`` (a config's
    values), train()'s own arguments are discarded, with a warning when they differ."""
    fields = set(TrainerConfig.__dataclass_fields__) - {"extra_kwargs"}
    lightning_args = _lightning_trainer_args()
    for name, value in source.items():
        if train_args is not None and name in _TRAIN_OWN:
            if not _same(value, train_args[name]):
                warnings.warn(
                    f"trainer_config sets {name}={value!r}, which is ignored: train()'s own "
                    f"{name}={train_args[name]!r} applies. Pass {name}={value!r} to train() "
                    "instead.",
                    TrainingWarning,
                    stacklevel=5,
                )
            continue
        if name in fields:
            values[name] = value
        elif name in lightning_args:
            extra[name] = value
        else:
            import difflib

            valid = sorted(fields | lightning_args)
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"{where} got an unknown argument {name!r}.{hint} Valid trainer arguments are "
                f"cellvi's {sorted(fields)} and Lightning Trainer's arguments."
            )


def resolve_trainer_config(
    trainer_config: Any,
    explicit: dict[str, Any],
    trainer_kwargs: dict[str, Any],
    train_args: Mapping[str, Any] | None = None,
) -> TrainerConfig:
    """Merge config object < ``trainer_kwargs`` < explicit arguments that were really given.

    A config (mapping or object with ``to_kwargs()``) may hold TrainerConfig fields and
    Lightning Trainer arguments, directly or under ``extra_kwargs`` (named ones win). Its
    ``max_epochs``/``accelerator``/``devices`` are discarded: train()'s (``train_args``) win.
    """
    config_values = config_to_kwargs(trainer_config, "trainer_config")
    nested = config_values.pop("extra_kwargs", None) or {}
    if not isinstance(nested, Mapping):
        raise TypeError(
            f"trainer_config extra_kwargs must be a dict of Lightning Trainer arguments, not "
            f"{type(nested).__name__}."
        )
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    own = dict(train_args or dict.fromkeys(_TRAIN_OWN, UNSET))
    _sort_trainer_arguments({**nested, **config_values}, "trainer_config", values, extra, own)
    _sort_trainer_arguments(trainer_kwargs, "train()", values, extra, None)
    # train()'s own max_epochs/accelerator/devices are never Lightning extras
    for name in _TRAIN_OWN:
        extra.pop(name, None)
    if "use_distributed_sampler" in extra:
        raise ValueError(
            "use_distributed_sampler is set by cellvi (its data splitter shards the cells "
            "across processes when the strategy is DDP); remove it from the train() arguments."
        )
    if extra.get("overfit_batches"):
        raise ValueError(
            f"overfit_batches={extra['overfit_batches']!r} is not supported: Lightning replaces "
            "the training loader's sampler for it, and cellvi's loaders draw their own "
            "minibatches. To fit a few cells, train on a small AnnData (adata[:256].copy())."
        )
    values.update({k: v for k, v in explicit.items() if v is not UNSET})
    values["extra_kwargs"] = extra
    return build_dataclass(TrainerConfig, values, "trainer_config")


def _save_checkpoint_model(model, path) -> None:
    """Write a best-model checkpoint: its weights come from training, so it loads as trained."""
    was_trained = model.is_trained_
    model.is_trained_ = True
    try:
        model.save(path, overwrite=True)
    finally:
        model.is_trained_ = was_trained


def _fields_set_in(config: Any, name: str = "plan_config") -> set[str]:
    """Keys a plan config really sets: a dataclass's fields that differ from their defaults."""
    if config is None:
        return set()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        out = set()
        for f in dataclasses.fields(config):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            if getattr(config, f.name) != default:
                out.add(f.name)
        return out
    return set(config_to_kwargs(config, name))


def _check_integer_counts(manager) -> None:
    """Compiled training evaluates the count likelihoods for whole-number counts only.

    Under ``torch.compile`` the ZINB, NB and Poisson log-likelihoods use the ``lgamma``-free
    form of :mod:`cellvi.distributions._gammaless`, a sum over ``k < x`` that is exact only for
    integer ``x``; the Gaussian of ``gene_likelihood="normal"`` has no such term and is not
    checked (see :func:`train_unsupervised`).
    """
    regs = manager.registry["field_registries"]
    state = regs.get(REGISTRY_KEYS.X_KEY, {}).get("state_registry", {})
    n_non_integer = state.get("n_non_integer")
    if n_non_integer is None:  # a registry written before counts were tallied
        warnings.warn(
            "plan_kwargs={'compile': True} assumes whole-number counts, and this data's "
            "counts were not scanned at setup; a non-integer value would get a wrong "
            "log-gamma term. Train with compile=False if the counts may be non-integer.",
            TrainingWarning,
            stacklevel=4,
        )
    elif n_non_integer:
        raise ValueError(
            f"plan_kwargs={{'compile': True}} needs whole-number counts (its likelihood has no "
            f"lgamma), but the registered matrix has {n_non_integer} non-integer values. "
            "Train with compile=False, or register raw counts (setup_anndata(layer=...))."
        )


def train_unsupervised(
    model,
    *,
    max_epochs: int | None,
    accelerator: str,
    devices,
    train_size: float | None,
    validation_size: float | None,
    shuffle_set_split: bool,
    batch_size: int | None,
    early_stopping: Any,
    check_val_every_n_epoch: Any,
    datasplitter_kwargs: dict | None,
    plan_config: Any,
    plan_kwargs: dict | None,
    trainer_config: Any,
    callbacks: list | None,
    ckpt_path: str | None,
    trainer_kwargs: dict,
    splitter_cls=None,
    splitter_kwargs: dict | None = None,
    make_plan=None,
    extra_callbacks: list | None = None,
    datamodule=None,
    resume: bool = False,
) -> None:
    """Train ``model`` (see ``SCVI.train`` for the arguments)."""
    _check_resume(model, resume, ckpt_path)
    # the plan settings the user chose (a config object given as plan_kwargs sets only the
    # fields that differ from their defaults, as plan_config does)
    explicit = _fields_set_in(plan_kwargs, "plan_kwargs") | _fields_set_in(plan_config)
    # (a list or other non-mapping is refused here, naming the argument)
    plan_kwargs = config_to_kwargs(plan_kwargs, "plan_kwargs")
    datasplitter_kwargs = config_to_kwargs(datasplitter_kwargs, "datasplitter_kwargs")
    manager = model.adata_manager
    from_module: dict = {}
    if datamodule is not None:  # its split and batch size, unless given here
        check_datamodule(datamodule)
        manager = model._attach_manager(datamodule.manager, "the data module")
        batch_size = datamodule.batch_size if batch_size is None else batch_size
        train_size = datamodule.train_size if train_size is None else train_size
        if validation_size is None:
            validation_size = datamodule.validation_size
        from_module = {"split_seed": datamodule.split_seed, "store": datamodule.store}
    elif manager is None:
        raise SetupError(
            f"This {type(model).__name__} was built from a registry and has no AnnData; train "
            "it with model.train(datamodule=dm) on the data module the registry came from."
        )
    n_obs = manager.summary_stats["n_cells"]
    if max_epochs is None:
        max_epochs = default_max_epochs(n_obs)
    elif (
        isinstance(max_epochs, bool)
        or not isinstance(max_epochs, numbers.Integral)
        or max_epochs < 1
    ):
        raise ValueError(f"max_epochs={max_epochs!r} must be a positive integer or None.")
    max_epochs = int(max_epochs)
    batch_size = settings.batch_size if batch_size is None else batch_size
    batch_size = check_count(batch_size, "batch_size")
    norm = getattr(getattr(model.module, "config", None), "use_batch_norm", "none")
    if batch_size == 1 and norm != "none":
        raise ValueError(
            f"batch_size=1 cannot train this model: batch normalisation (use_batch_norm="
            f"{norm!r}) needs at least 2 cells per minibatch. Use batch_size >= 2, or build "
            "the model with use_batch_norm='none'."
        )

    cfg = resolve_trainer_config(
        trainer_config,
        {"early_stopping": early_stopping, "check_val_every_n_epoch": check_val_every_n_epoch},
        trainer_kwargs,
        {"max_epochs": max_epochs, "accelerator": accelerator, "devices": devices},
    )
    check_log_save_dir(cfg.log_save_dir)
    callbacks = check_callbacks(callbacks)
    plan_values = config_to_kwargs(plan_config, "plan_config")
    plan_values.update(plan_kwargs or {})
    build_dataclass(TrainingPlanConfig, plan_values, "plan_kwargs")  # names and types, first
    user_set_warmup = bool({"n_epochs_kl_warmup", "n_steps_kl_warmup"} & explicit)

    taken = _SPLIT_ARGUMENTS & set(datasplitter_kwargs or {})
    if taken:
        raise ValueError(
            f"datasplitter_kwargs sets {sorted(taken)}, which are train()'s own arguments; "
            f"pass them to train() directly (e.g. train({sorted(taken)[0]}=...))."
        )
    strategy = cfg.strategy
    distributed = (
        (isinstance(strategy, str) and "ddp" in strategy)
        or (not isinstance(strategy, str) and "DDP" in type(strategy).__name__)
        # several devices with strategy="auto": Lightning starts DDP processes, which must
        # each get their own share of the cells rather than all of them
        or (strategy == "auto" and (device_count(accelerator, devices) or 1) > 1)
    )
    if datasplitter_kwargs and "seed" in datasplitter_kwargs:  # the user's name for split_seed
        from_module.pop("split_seed", None)
    splitter_cls = splitter_cls or DataSplitter
    known = set()
    for cls in splitter_cls.__mro__:  # a subclass passes **kwargs on to DataSplitter
        if issubclass(cls, DataSplitter):
            known |= set(inspect.signature(cls).parameters) - {"kwargs"}
    unknown = sorted(set(datasplitter_kwargs or {}) - known)
    if unknown:
        raise ValueError(
            f"datasplitter_kwargs has argument(s) {unknown} that {splitter_cls.__name__} does "
            f"not take; it takes {sorted(known - {'manager', 'self'} - _SPLIT_ARGUMENTS)}."
        )
    splitter = splitter_cls(
        manager,
        **(splitter_kwargs or {}),
        train_size=train_size,
        validation_size=validation_size,
        shuffle_set_split=shuffle_set_split,
        batch_size=batch_size,
        distributed_sampler=distributed,
        **{**from_module, **(datasplitter_kwargs or {})},
    )
    forks = (isinstance(strategy, str) and strategy in ("ddp_notebook", "ddp_fork")) or (
        getattr(strategy, "_start_method", None) == "fork"
    )
    if forks and not splitter.store.fork_safe:
        raise SetupError(
            f"strategy={strategy!r} forks processes, and TileDB-SOMA cannot be read after a "
            "fork (training would hang). Launch the script with torchrun and "
            "strategy='ddp', or train on one process."
        )
    splitter.setup("fit")
    steps_per_epoch = max(1, math.ceil(len(splitter.train_idx) / batch_size))
    kept = None if user_set_warmup else kept_kl_warmup(model, resume, ckpt_path)
    if kept is not None:  # the warm-up goes on as it was, whatever the new run's length
        plan_values.update(kept)
    else:
        done = model._training_progress if resume else (0, 0)
        adapt_kl_warmup(plan_values, user_set_warmup, max_epochs, steps_per_epoch, done)
    plan_cfg = build_dataclass(TrainingPlanConfig, plan_values, "plan_kwargs")
    likelihood = getattr(getattr(model.module, "config", None), "gene_likelihood", None)
    if plan_cfg.compile and likelihood != "normal":  # the Gaussian takes any real value
        _check_integer_counts(manager)
    batch_names = list(model.get_state_registry("batch")["categorical_mapping"])
    if make_plan is None:
        plan = TrainingPlan(model.module, plan_cfg, batch_categories=batch_names)
    else:
        plan = make_plan(plan_cfg, batch_names)
    if resume:
        plan.continue_from(model._optimizer_state, *model._training_progress)
    elif model.is_trained_ and ckpt_path is None:
        warnings.warn(
            f"This {type(model).__name__} is already trained: train() continues from its "
            "current weights with a fresh optimiser state and the KL warm-up restarting at "
            "epoch 0 (new rows are appended to model.history). Pass resume=True to keep "
            "Adam's state and the warm-up's position, or, to continue an interrupted run "
            "exactly, ckpt_path=<its run dir>/checkpoints/last.ckpt.",
            TrainingWarning,
            stacklevel=3,
        )
    if ckpt_path is None:
        seed_torch()  # dropout and reparameterisation draws (a resume restores its own RNG)
    try:
        run_training(
            plan,
            splitter,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            config=cfg,
            callbacks=callbacks
            + list(extra_callbacks or [])
            + reference_block_callbacks(model.module),
            ckpt_path=ckpt_path,
            run_dir=_run_dir_for(model, ckpt_path),
            record=lambda result: _record(
                model, result, ckpt_path is not None, cfg.log_save_dir, plan_cfg.kl_warmup()
            ),
            save_fn=lambda path: _save_checkpoint_model(model, path),
            load_fn=model._load_weights_from,
        )
    finally:  # counts read from disk: their files are not held open after the run
        close_disk_sources(getattr(splitter.manager, "adata", None))


def _check_resume(model, resume, ckpt_path) -> None:
    """``resume=True`` needs the optimiser state of earlier training, and no checkpoint."""
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False; got {resume!r}.")
    if not resume:
        return
    if ckpt_path is not None:
        raise ValueError(
            "resume=True continues this model's own training; ckpt_path= resumes an "
            "interrupted run from its checkpoint. Pass one of them."
        )
    if model._optimizer_state is None:
        raise ValueError(
            f"resume=True needs the optimiser state of earlier training, and this "
            f"{type(model).__name__} holds none: train it first, or load a model saved with "
            "model.save(..., save_optimizer_state=True)."
        )


def _record(model, result, resumed: bool, log_save_dir, warmup: dict) -> None:
    """Fold a run into the model and, with ``log_save_dir``, write its history to disk."""
    steps_before = model._training_progress
    model._record_run(result, resumed=resumed)
    if model._training_progress != steps_before:  # it took steps with this warm-up
        model._kl_warmup = warmup
    if log_save_dir is not None:
        save_history_log(log_save_dir, result)
