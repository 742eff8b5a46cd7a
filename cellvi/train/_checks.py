"""Checks of ``train()`` arguments that would otherwise fail deep inside Lightning or torch,
run before any training starts."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
from collections.abc import Iterator, Mapping

import lightning.pytorch as pl
import torch

__all__ = [
    "ChecksPassed",
    "check_callbacks",
    "checks_only",
    "only_checking",
    "check_datamodule",
    "check_loss_kwargs",
    "match_weights_to_precision",
]

logger = logging.getLogger("cellvi")

# Lightning precisions whose plugin casts the module itself (the others expect float32 weights)
_CASTING_PRECISIONS = ("64", "64-true", "bf16-true", "16-true")

# what train() reads from a data module (cellvi's AnnDataModule and SomaDataModule have all)
_DATAMODULE_ATTRIBUTES = (
    "manager",
    "n_obs",
    "batch_size",
    "train_size",
    "validation_size",
    "split_seed",
    "store",
)


def check_callbacks(callbacks, name: str = "callbacks") -> list:
    """``callbacks`` as a list of Lightning callbacks (a single one is accepted as is)."""
    if callbacks is None:
        return []
    if isinstance(callbacks, pl.Callback):
        return [callbacks]
    if isinstance(callbacks, str | bytes | Mapping) or not hasattr(callbacks, "__iter__"):
        raise TypeError(
            f"{name}={callbacks!r} must be a list of Lightning callbacks "
            "(lightning.pytorch.Callback instances), e.g. callbacks=[SaveCheckpoint()]."
        )
    out = list(callbacks)
    bad = [cb for cb in out if not isinstance(cb, pl.Callback)]
    if bad:
        shown = ", ".join(f"{cb!r} ({type(cb).__name__})" for cb in bad[:3])
        raise TypeError(
            f"{name} holds {len(bad)} object(s) that are not Lightning callbacks: {shown}. "
            "Each must be a lightning.pytorch.Callback instance (subclass "
            "lightning.pytorch.Callback; callbacks of the separate pytorch_lightning package "
            "do not work either)."
        )
    return out


def check_datamodule(datamodule) -> None:
    """A data module ``train()`` can read: one of cellvi's (its registered data and split)."""
    # looked up on the class and instance dict: a property (``store``) is not evaluated here
    present = set(getattr(datamodule, "__dict__", {})) | set(dir(type(datamodule)))
    missing = [a for a in _DATAMODULE_ATTRIBUTES if a not in present]
    if missing:
        raise ValueError(
            f"datamodule={type(datamodule).__name__} lacks {', '.join(missing)}: train() "
            "builds its split and loaders from the data module's registered data "
            f"(attributes {list(_DATAMODULE_ATTRIBUTES)}). Pass a cellvi data module "
            "(cellvi.dataloaders.AnnDataModule or SomaDataModule), or train on the model's "
            "AnnData without datamodule=."
        )


def check_loss_kwargs(module, loss_kwargs: Mapping) -> None:
    """``loss_kwargs`` are keyword arguments the module's ``forward`` (which calls its
    ``loss``) accepts; ``kl_weight`` belongs to the plan's warm-up."""
    if not loss_kwargs:
        return
    if not isinstance(loss_kwargs, Mapping):
        raise TypeError(
            f"plan_kwargs loss_kwargs={loss_kwargs!r} must be a dict of keyword arguments "
            "for the module's loss."
        )
    if "kl_weight" in loss_kwargs:
        raise ValueError(
            "plan_kwargs loss_kwargs sets 'kl_weight', which the training plan sets at every "
            "step from its warm-up; use plan_kwargs min_kl_weight/max_kl_weight and "
            "n_epochs_kl_warmup instead."
        )
    params = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        n
        for n, p in list(params.items())[1:]  # the first is the minibatch
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and n != "kl_weight"
    ]
    unknown = [k for k in loss_kwargs if k not in accepted]
    if unknown:
        raise TypeError(
            f"plan_kwargs loss_kwargs has argument(s) {unknown} that "
            f"{type(module).__name__}'s loss does not take; it takes "
            + (f"{accepted}." if accepted else "none besides kl_weight (set by the plan).")
            + " Remove them from loss_kwargs."
        )


def match_weights_to_precision(module: torch.nn.Module, precision) -> None:
    """Bring weights left in another dtype by an earlier run (``precision="64-true"`` or
    ``"bf16-true"``) back to float32 for a run whose precision expects float32 weights (the
    default ``"32-true"`` and the mixed precisions); Lightning casts only for the ``-true``
    precisions other than 32, so float64 weights would meet float32 minibatches."""
    name = "32-true" if precision is None else str(precision)
    if name in _CASTING_PRECISIONS or name.startswith("transformer-engine"):
        return
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    if dtypes and dtypes != {torch.float32}:
        module.float()
        logger.info(
            "The weights were %s from an earlier run; they were converted to float32 for "
            "precision=%r.",
            "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes)),
            name,
        )


_CHECKS_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("checks_only", default=False)


class ChecksPassed(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a training run under :func:`checks_only` once every check made before
    training has passed (its Lightning trainer built, nothing trained or written)."""


@contextlib.contextmanager
def checks_only() -> Iterator[None]:
    """Inside this block ``train()`` runs its checks (arguments, data, devices, strategy,
    precision, monitors, callbacks) and then raises :class:`ChecksPassed` instead of
    training: what ``cellvi run --check`` uses."""
    token = _CHECKS_ONLY.set(True)
    try:
        yield
    finally:
        _CHECKS_ONLY.reset(token)


def only_checking() -> bool:
    """Whether a run should stop after its checks (see :func:`checks_only`)."""
    return _CHECKS_ONLY.get()
