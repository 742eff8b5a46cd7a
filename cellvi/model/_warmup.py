"""The KL warm-up of a run: fitted to a short run, or kept from the training it continues."""

from __future__ import annotations

import logging
import math
import warnings

import torch

from ..errors import TrainingWarning

__all__ = ["adapt_kl_warmup", "kept_kl_warmup"]

logger = logging.getLogger("cellvi")


def adapt_kl_warmup(
    plan_values: dict,
    user_set: bool,
    max_epochs: int,
    n_steps_per_epoch: int,
    done: tuple[int, int] = (0, 0),
) -> None:
    """Make sure the KL weight can reach its maximum within the run (or say it won't).

    ``done``: the epochs and steps of earlier training a ``resume=True`` run continues (its
    warm-up counts them)."""
    n_epochs = plan_values.get("n_epochs_kl_warmup", 400)
    n_steps = plan_values.get("n_steps_kl_warmup")
    total_steps = max_epochs * n_steps_per_epoch + done[1]
    max_epochs = max_epochs + done[0]
    if n_epochs:
        too_long, unit, total = n_epochs > max_epochs, "epochs", max_epochs
        length = n_epochs
    elif n_steps:
        too_long, unit, total = n_steps > total_steps, "steps", total_steps
        length = n_steps
    else:
        return
    if not too_long:
        return
    if user_set:
        reached = (
            plan_values.get("min_kl_weight", 0.0)
            + (plan_values.get("max_kl_weight", 1.0) - plan_values.get("min_kl_weight", 0.0))
            * (total - 1)
            / length
        )
        warnings.warn(
            f"The KL warm-up lasts {length} {unit} but training runs {total} {unit}, so the KL "
            f"weight only reaches {reached:.3g}. Shorten the warm-up (plan_kwargs="
            f"{{'n_{unit}_kl_warmup': ...}}) or train longer.",
            TrainingWarning,
            stacklevel=4,
        )
        return
    adapted = max(1, math.floor(0.75 * total))
    plan_values[f"n_{unit}_kl_warmup"] = adapted
    logger.info(
        "KL warm-up shortened from %d to %d %s so the KL weight reaches its maximum within "
        "max_epochs=%d.",
        length,
        adapted,
        unit,
        max_epochs,
    )


def kept_kl_warmup(model, resume: bool, ckpt_path) -> dict | None:
    """The KL warm-up of the training a run continues: the model's own (``resume=True``) or
    the checkpoint's (``ckpt_path``); None for a fresh run or when it was not recorded."""
    if resume:
        return model._kl_warmup
    if ckpt_path is None:
        return None
    try:  # an unreadable file is reported, with its remedy, when Lightning opens it
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any failure here is reported by the real load
        return None
    kept = checkpoint.get("cellvi_kl_warmup") if isinstance(checkpoint, dict) else None
    return dict(kept) if isinstance(kept, dict) else None
