"""Continuing an optimiser's state; what a checkpoint records of the module."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ._config import TrainingPlanConfig

__all__ = ["continue_optimizer", "module_settings", "without_aliases"]


def continue_optimizer(
    optimizer: torch.optim.Optimizer, state: dict, cfg: TrainingPlanConfig
) -> None:
    """Load an earlier run's optimiser state: its moments and step counts go on, while the
    learning rate, eps and weight decay are this run's (a custom optimiser keeps its own).

    Raises
    ------
    ValueError
        When the state belongs to another kind of optimiser (e.g. Adam's, resumed with SGD).
    """
    optimizer.load_state_dict(state)  # (fills in settings newer torch versions added)
    missing = sorted({k for g in optimizer.param_groups for k in optimizer.defaults if k not in g})
    if missing:  # torch would fail deep inside step() on the first missing setting
        raise ValueError(
            f"resume=True: the kept optimiser state is not {type(optimizer).__name__}'s (it "
            f"lacks {', '.join(missing)}): the earlier training used another optimiser. "
            "Resume with that optimiser, or train without resume=True (a fresh optimiser "
            "state)."
        )
    if cfg.optimizer != "Custom":
        for group in optimizer.param_groups:
            group.update(lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)


def module_settings(module) -> dict:
    """A module's architecture settings (its ``config`` dataclass) as plain values: text,
    numbers, booleans and None, other values as their ``repr``."""
    config = getattr(module, "config", None)
    if not dataclasses.is_dataclass(config):
        return {}
    plain = (str, int, float, bool, type(None))
    return {
        f.name: value if isinstance(value, plain) else repr(value)
        for f in dataclasses.fields(config)
        for value in [getattr(config, f.name)]
    }


def without_aliases(state_dict: dict) -> dict:
    """``state_dict`` without the ``_forward.*`` copies of the module's tensors that older
    cellvi checkpoints hold (the forward alias used to be a registered submodule)."""
    return {k: v for k, v in state_dict.items() if not k.startswith("_forward.")}
