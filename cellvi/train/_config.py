"""Structured configs of training plans and trainers (one place for every default)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SemiSupervisedTrainingPlanConfig",
    "TrainingPlanConfig",
    "TrainerConfig",
    "UNSET",
    "config_to_kwargs",
]


def _cpp_compiler() -> str | None:
    """Path of the C++ compiler torch.compile would use, or None."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return next((path for name in names if (path := shutil.which(name))), None)


class _Unset:
    """Sentinel for "argument not given" (``None`` may be a meaningful value)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()

_OPTIMIZERS = ("Adam", "AdamW", "Custom")


@dataclass(frozen=True)
class TrainingPlanConfig:
    """Optimiser, KL warm-up and scheduler settings of :class:`~cellvi.train.TrainingPlan`.

    Parameters
    ----------
    optimizer
        ``"Adam"`` (default), ``"AdamW"`` or ``"Custom"`` (needs ``optimizer_creator``).
    optimizer_creator
        Callable ``params -> torch.optim.Optimizer`` for ``optimizer="Custom"``.
    lr, weight_decay, eps
        Adam(W) settings: 1e-3, 1e-6, 0.01.
    n_epochs_kl_warmup
        Epochs over which the KL weight rises from ``min_kl_weight`` to ``max_kl_weight``
        (400). Takes precedence over ``n_steps_kl_warmup``.
    n_steps_kl_warmup
        Step-based warm-up, used only when ``n_epochs_kl_warmup`` is None or 0.
    min_kl_weight, max_kl_weight
        Warm-up range (0 → 1).
    reduce_lr_on_plateau
        Reduce the learning rate when ``lr_scheduler_metric`` stops improving.
    lr_factor, lr_patience, lr_threshold, lr_min
        ReduceLROnPlateau settings (0.6, 30, 0.0, 0.0).
    lr_scheduler_metric
        Metric the scheduler monitors (``"elbo_validation"``).
    check_gradients
        Check that gradients are finite after every backward pass (cheap; on by default) so a
        NaN is caught at the step where it appears.
    compile
        Run training steps through ``torch.compile`` (Inductor). The module's forward and
        backward become fused, vectorised kernels and the count likelihoods switch to a
        ``lgamma``-free form (:mod:`cellvi.distributions`), which is about 1.2-1.5x faster per
        step on CPU after a one-off compilation of 10-60 s for the minibatch size (a last
        minibatch of another size runs eagerly). Worth it for long runs; validation and
        inference stay eager. Needs a C++ compiler.
    compile_kwargs
        Keyword arguments for ``torch.compile`` (``dynamic=False`` unless given).
    loss_kwargs
        Extra keyword arguments for the module's ``loss``.
    on_step
        Also record every step's training loss: ``model.history["train_loss_step"]``, indexed
        by ``step`` (epoch metrics are recorded either way).
    """

    optimizer: str = "Adam"
    optimizer_creator: Callable | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    n_epochs_kl_warmup: int | None = 400
    n_steps_kl_warmup: int | None = None
    min_kl_weight: float = 0.0
    max_kl_weight: float = 1.0
    reduce_lr_on_plateau: bool = False
    lr_factor: float = 0.6
    lr_patience: int = 30
    lr_threshold: float = 0.0
    lr_min: float = 0.0
    lr_scheduler_metric: str = "elbo_validation"
    check_gradients: bool = True
    compile: bool = False
    compile_kwargs: dict | None = None
    loss_kwargs: dict = field(default_factory=dict)
    on_step: bool = False

    def __post_init__(self):
        _check_field_types(self)
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(
                f"optimizer={self.optimizer!r} is not supported; use one of {list(_OPTIMIZERS)}."
            )
        if self.optimizer == "Custom" and self.optimizer_creator is None:
            raise ValueError('optimizer="Custom" needs optimizer_creator=<callable(params)>.')
        if self.min_kl_weight > self.max_kl_weight:
            raise ValueError(
                f"min_kl_weight={self.min_kl_weight} is larger than "
                f"max_kl_weight={self.max_kl_weight}."
            )
        _check_optimiser_numbers(self)
        for name in ("n_epochs_kl_warmup", "n_steps_kl_warmup"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}={value} must be >= 0 or None.")
        if self.compile_kwargs is not None and not isinstance(self.compile_kwargs, Mapping):
            raise TypeError(
                f"compile_kwargs must be a dict of torch.compile arguments, not "
                f"{type(self.compile_kwargs).__name__}."
            )
        if self.compile and _cpp_compiler() is None:
            raise ValueError(
                "compile=True needs a C++ compiler for torch.compile's CPU kernels, and none "
                "was found (looked for $CXX, c++, g++, clang++). Install one (e.g. `apt-get "
                "install g++`), or train with compile=False."
            )

    def to_kwargs(self) -> dict:
        """Field values as a dict (``loss_kwargs`` kept as one entry)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def kl_warmup(self) -> dict:
        """The KL warm-up settings, as a run records them for the training that continues it
        (``train(resume=True)``, a saved optimiser state, a checkpoint)."""
        return {
            "n_epochs_kl_warmup": self.n_epochs_kl_warmup,
            "n_steps_kl_warmup": self.n_steps_kl_warmup,
        }

    def optimizer_settings(self) -> dict:
        """The settings a resumed optimiser state carries with it (see ``ckpt_path``)."""
        return {k: getattr(self, k) for k in ("optimizer", "lr", "eps", "weight_decay")}


@dataclass(frozen=True)
class SemiSupervisedTrainingPlanConfig(TrainingPlanConfig):
    """:class:`TrainingPlanConfig` of SCANVI's semi-supervised plan (``training.md`` §8).

    Parameters
    ----------
    classification_ratio
        Weight of the labeled cells' cross-entropy in the loss (50; a finite number >= 0).
    **kwargs
        The :class:`TrainingPlanConfig` fields.
    """

    classification_ratio: float = 50.0

    def __post_init__(self):
        super().__post_init__()
        check_classification_ratio(self.classification_ratio)


def check_classification_ratio(value) -> float:
    """``classification_ratio`` as a float: a finite real number >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"classification_ratio={value!r} must be a finite number >= 0 (the weight of the "
            "labeled cells' classification loss; the default is 50)."
        )
    return float(value)


def _check_optimiser_numbers(cfg: TrainingPlanConfig) -> None:
    """Optimiser and scheduler numbers torch would refuse (or silently misuse) at the first
    step, refused here with the argument's name."""
    where = "plan_kwargs (TrainingPlanConfig)"
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(
            f"{where} lr={cfg.lr!r} must be a finite number > 0 (the default is 1e-3)."
        )
    for name, default in (("eps", 0.01), ("weight_decay", 1e-6)):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(
                f"{where} {name}={value!r} must be a finite number >= 0 (the default is {default})."
            )
    if cfg.reduce_lr_on_plateau:
        if not (0 < cfg.lr_factor < 1):
            raise ValueError(
                f"{where} lr_factor={cfg.lr_factor!r} must be between 0 and 1 (exclusive): "
                "the learning rate is multiplied by it on a plateau (the default is 0.6)."
            )
        if cfg.lr_patience < 0:
            raise ValueError(f"{where} lr_patience={cfg.lr_patience!r} must be >= 0.")
        if not (math.isfinite(cfg.lr_min) and cfg.lr_min >= 0):
            raise ValueError(f"{where} lr_min={cfg.lr_min!r} must be a finite number >= 0.")


def _check_field_types(config) -> None:
    """Boolean and numeric fields hold what they say (``lr="1e-3"`` or ``patience="5"`` would
    otherwise fail deep inside the optimiser or a callback, ``early_stopping="no"`` would be
    true)."""
    for f in dataclasses.fields(config):
        kinds = {kind.strip() for kind in str(f.type).split("|")}
        value = getattr(config, f.name)
        if value is None and "None" in kinds:
            continue
        is_bool = type(value).__name__ in ("bool", "bool_")
        if kinds <= {"bool", "None"}:
            ok, expected = is_bool, "True or False"
        elif "float" in kinds:
            ok, expected = isinstance(value, numbers.Real) and not is_bool, "a number"
        elif "int" in kinds:
            ok, expected = isinstance(value, numbers.Integral) and not is_bool, "an integer"
        else:
            continue
        if not ok:
            raise TypeError(
                f"{f.name}={value!r} ({type(value).__name__}) must be {expected}"
                + (" or None." if "None" in kinds else ".")
            )


@dataclass(frozen=True)
class TrainerConfig:
    """Runtime controls of a training run (defaults of ``training.md`` §4).

    Parameters
    ----------
    check_val_every_n_epoch
        Validate every N epochs; ``None`` = never, unless early stopping, checkpointing or an
        LR scheduler needs it (then 1).
    early_stopping, early_stopping_monitor, early_stopping_min_delta,
    early_stopping_patience, early_stopping_mode, early_stopping_warmup_epochs
        Early stopping (off; ``"elbo_validation"``, 0.0, 45 validation checks, ``"min"``, 0).
        The warm-up counts validation checks: the first ``early_stopping_warmup_epochs``
        checks never stop training (with ``check_val_every_n_epoch=2``, 2 checks = 4 epochs).
    enable_checkpointing, checkpointing_monitor
        Keep the best model by ``checkpointing_monitor`` (``"validation_loss"``).
    load_best_on_end
        With checkpointing: load the best weights when training ends.
    save_resume_checkpoint
        Write ``last.ckpt`` in the run directory after every epoch so an interrupted run can
        be resumed exactly with ``ckpt_path`` (on by default).
    enable_progress_bar
        Show the progress bar (subject to ``cellvi.settings``).
    progress_bar_refresh_rate
        1 (draw) or 0 (no bar); other values are an error.
    simple_progress_bar
        One bar per run advancing per epoch (default); ``False``: Lightning's per-step bar.
    learning_rate_monitor
        Record the learning rate per epoch in the history as ``lr-<optimizer>`` (e.g.
        ``lr-Adam``); on whenever ``reduce_lr_on_plateau`` is.
    gradient_clip_val
        Clip the gradient norm at this value (off).
    strategy, num_nodes, precision, deterministic
        Passed to Lightning.
    run_dir
        Directory of this run (history, checkpoints); default
        ``<settings.logging_dir>/<model>_<timestamp>``.
    log_save_dir
        If set, the run's history is also written, when training ends (finished or not), to
        ``<log_save_dir>/lightning_logs/version_<k>/history.pkl`` (the ``model.history``
        dict of DataFrames, pickled) and ``history.csv`` beside it; ``k`` is the next free
        number from 1, so a later run never overwrites an earlier one.
    extra_kwargs
        Further Lightning ``Trainer`` arguments (checked against its signature).
    """

    check_val_every_n_epoch: int | None = None
    early_stopping: bool = False
    early_stopping_monitor: str = "elbo_validation"
    early_stopping_min_delta: float = 0.0
    early_stopping_patience: int = 45
    early_stopping_mode: str = "min"
    early_stopping_warmup_epochs: int = 0
    enable_checkpointing: bool = False
    checkpointing_monitor: str = "validation_loss"
    load_best_on_end: bool = False
    save_resume_checkpoint: bool = True
    enable_progress_bar: bool = True
    progress_bar_refresh_rate: int = 1
    simple_progress_bar: bool = True
    learning_rate_monitor: bool = False
    gradient_clip_val: float | None = None
    strategy: Any = "auto"
    num_nodes: int = 1
    precision: Any = "32-true"
    deterministic: bool | None = None
    run_dir: str | None = None
    log_save_dir: str | os.PathLike | None = None
    extra_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        _check_field_types(self)
        if self.early_stopping_mode not in ("min", "max"):
            raise ValueError(
                f"early_stopping_mode={self.early_stopping_mode!r}: use 'min' or 'max'."
            )
        if self.early_stopping_patience < 1:
            raise ValueError(
                f"early_stopping_patience={self.early_stopping_patience} must be >= 1."
            )
        if self.progress_bar_refresh_rate not in (0, 1):
            raise ValueError(
                f"progress_bar_refresh_rate={self.progress_bar_refresh_rate!r}: use 1 (draw the "
                "bar) or 0 (no bar)."
            )
        if self.early_stopping_warmup_epochs < 0:
            raise ValueError(
                f"early_stopping_warmup_epochs={self.early_stopping_warmup_epochs} must be >= 0 "
                "(the number of first validation checks that never stop training)."
            )
        clip = self.gradient_clip_val
        if clip is not None and not (math.isfinite(clip) and clip >= 0):
            raise ValueError(
                f"gradient_clip_val={clip!r} must be a finite number >= 0 (the largest gradient "
                "norm; 0 or None: no clipping), e.g. 1.0."
            )
        if not math.isfinite(self.early_stopping_min_delta):
            raise ValueError(
                f"early_stopping_min_delta={self.early_stopping_min_delta!r} must be a finite "
                "number (the least change that counts as an improvement), e.g. 0.0."
            )
        cv = self.check_val_every_n_epoch
        if cv is not None and (not isinstance(cv, int) or cv < 1):
            raise ValueError(f"check_val_every_n_epoch={cv!r} must be a positive integer or None.")

    def to_kwargs(self) -> dict:
        """Field values with ``extra_kwargs`` flattened first (named fields win)."""
        out = dict(self.extra_kwargs)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        out.pop("extra_kwargs")
        return out


def config_to_kwargs(config: Any, name: str) -> dict:
    """Expand a config given as a mapping or an object with ``to_kwargs()``."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if callable(getattr(config, "to_kwargs", None)):
        out = config.to_kwargs()
        if not isinstance(out, Mapping):
            raise TypeError(f"{name}.to_kwargs() must return a dict, got {type(out).__name__}.")
        return dict(out)
    raise TypeError(
        f"{name} must be a mapping or an object with to_kwargs(), got {type(config).__name__}."
    )


# scvi-tools settings cellvi knows but does not offer, with the reason given in the error
_NOT_SUPPORTED = {
    "update_only_decoder": (
        "it trains on minified, latent-only data, which cellvi does not read; train on the counts"
    ),
}


def build_dataclass(cls, values: Mapping, name: str):
    """Instantiate ``cls`` from ``values``, naming unknown keys with a 'did you mean'."""
    import difflib

    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in valid]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, valid, n=1)
            why = _NOT_SUPPORTED.get(k)
            hints.append(
                f"{k!r}"
                + (f" (did you mean {close[0]!r}?)" if close and not why else "")
                + (f" ({why})" if why else "")
            )
        raise TypeError(
            f"{name} got unknown argument(s) {', '.join(hints)}. Valid: {', '.join(valid)}."
        )
    return cls(**values)
