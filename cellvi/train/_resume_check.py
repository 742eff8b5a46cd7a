"""Before a resumed run (``ckpt_path``): refuse a checkpoint this model cannot resume from."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..dataloaders._identity import data_identity, identity_differences
from ..errors import TrainingWarning
from ._optim import module_settings, without_aliases
from ._plan import TrainingPlan

__all__ = ["check_resume_checkpoint"]

_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


def check_resume_checkpoint(ckpt_path, plan: TrainingPlan, datamodule, max_epochs: int) -> None:
    """Refuse, before training, a checkpoint that this model cannot resume from: one of
    another architecture or gene set (tensor names and shapes) or of more cells; warn when
    it already holds ``max_epochs`` epochs (nothing would be trained).

    Lightning's other names (``"best"``, ``"hpc"``, ``"registry"``) and remote URLs are left
    to Lightning."""
    path = Path(ckpt_path)
    if str(ckpt_path) == "last" and not path.exists():
        # Lightning would look for a ModelCheckpoint's last file in this new run's folder,
        # find none, and train from the current weights with a warning only
        raise ValueError(
            "ckpt_path='last' is Lightning's shortcut, which cellvi runs cannot use: each "
            "train() writes to a new run directory. Pass the checkpoint the interrupted run's "
            "error names: f'{model.run_dir_}/checkpoints/last.ckpt'."
        )
    if "://" in str(ckpt_path) or (str(ckpt_path) in _LIGHTNING_CKPT_NAMES and not path.exists()):
        return
    saved_model = (
        f"ckpt_path={str(path)!r} is a saved model, not a training checkpoint: load it with "
        "Model.load and continue with train(resume=True) (after save(..., "
        "save_optimizer_state=True)); a resumable checkpoint is "
        "<run_dir>/checkpoints/last.ckpt."
    )
    if path.is_dir():
        raise ValueError(saved_model)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={str(path)!r} does not exist; a run's resumable checkpoint is "
            "<run_dir>/checkpoints/last.ckpt (the failed run's error names it)."
        )
    try:  # memory-mapped: only the tensors' metadata is read here
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(
            f"ckpt_path={str(path)!r} is not a readable checkpoint ({err}); pass the "
            "<run_dir>/checkpoints/last.ckpt that a cellvi run wrote."
        ) from None
    if isinstance(state, dict) and "model_state_dict" in state and "state_dict" not in state:
        raise ValueError(saved_model)
    theirs, ours = without_aliases(state.get("state_dict", {})), plan.state_dict()
    problems = []
    for key in sorted(set(theirs) | set(ours)):
        if key not in theirs:
            problems.append(f"{key} is not in the checkpoint")
        elif key not in ours:
            problems.append(f"{key} is in the checkpoint but not in this model")
        elif tuple(theirs[key].shape) != tuple(ours[key].shape):
            problems.append(
                f"{key} is {tuple(theirs[key].shape)} there, {tuple(ours[key].shape)} here"
            )
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(
            f"ckpt_path={str(path)!r} was written by a model of another architecture or gene "
            f"set: {'; '.join(problems[:3])}{more}. Resume with a model built as the one that "
            "wrote it (same genes, batches, covariates and architecture arguments)."
        )
    _compare_settings(path, state, plan)
    split = state.get(type(datamodule).__name__) or {}
    manager = getattr(datamodule, "manager", None)
    saved_identity = split.get("data_identity") or {}
    differ = manager is not None and identity_differences(saved_identity, data_identity(manager))
    if differ:
        raise ValueError(
            f"ckpt_path={str(path)!r} was written for other data: {'; '.join(differ)}. Its "
            "weights and its train/validation split belong to the cells and genes it trained "
            "on: resume on that AnnData (same cells, genes and categories, in the same order), "
            "or start a new training run."
        )
    _compare_split_settings(path, split, datamodule)
    n_obs = getattr(datamodule, "n_obs", None)
    kept = [split[k] for k in ("train_idx", "val_idx", "test_idx") if split.get(k) is not None]
    largest = max((int(t.max()) for t in kept if len(t)), default=-1)
    if n_obs is not None and largest >= n_obs:
        raise ValueError(
            f"ckpt_path={str(path)!r} was written for at least {largest + 1} cells, but these "
            f"data have {n_obs}. Resume on the AnnData that run trained on."
        )
    n_done = len(state.get("cellvi_history_rows") or [])
    if n_done >= max_epochs:
        warnings.warn(
            f"ckpt_path={str(path)!r} already holds {n_done} finished epochs and "
            f"max_epochs={max_epochs}, so no epoch is trained: the model takes the "
            f"checkpoint's weights and history. Pass max_epochs > {n_done} to train on.",
            TrainingWarning,
            stacklevel=5,
        )


def _compare_split_settings(path: Path, split: dict, datamodule) -> None:
    """A resume keeps the checkpoint's split, and its minibatches follow this run's batch
    size: other values than the checkpoint's run used are named (the run is then not the
    one the interrupted run would have been, or the new split setting does not apply)."""
    notes = []
    saved, now = split.get("batch_size"), getattr(datamodule, "batch_size", None)
    if saved is not None and now is not None and int(saved) != int(now):
        notes.append(
            f"batch_size={now} (the checkpoint's run used {saved}): its remaining epochs "
            "take other minibatches, so the result is not the one the interrupted run would "
            "have given"
        )
    saved, now = split.get("train_size"), getattr(datamodule, "train_size", None)
    explicit = not getattr(datamodule, "train_size_is_default", True)
    if saved is not None and now is not None and explicit and float(saved) != float(now):
        n_train = len(split.get("train_idx", []))
        notes.append(
            f"train_size={now} is not applied: the checkpoint's split ({n_train} training "
            f"cells, train_size={saved}) is kept"
        )
    if notes:
        warnings.warn(
            f"ckpt_path={str(path)!r} resumes with " + "; ".join(notes) + ".",
            TrainingWarning,
            stacklevel=6,
        )


def _compare_settings(path: Path, state: dict, plan: TrainingPlan) -> None:
    """The checkpoint's architecture settings must be this model's (same tensor shapes can
    hide another likelihood or latent distribution); optimiser settings that differ are
    named, since the checkpoint's optimiser state, with its own, is what resumes."""
    theirs = state.get("cellvi_module_config") or {}
    ours = module_settings(plan.module)
    differ = [k for k in sorted(set(theirs) & set(ours)) if theirs[k] != ours[k]]
    if differ:
        shown = "; ".join(f"{k}={theirs[k]!r} there, {ours[k]!r} here" for k in differ[:4])
        raise ValueError(
            f"ckpt_path={str(path)!r} was written by a model built with other settings: "
            f"{shown}. Resume with a model built as the one that wrote it."
        )
    saved = state.get("cellvi_optimizer_settings") or {}
    now = plan.config.optimizer_settings()
    changed = [k for k in now if k in saved and saved[k] != now[k]]
    if changed:
        shown = ", ".join(f"{k}={saved[k]!r} (not {now[k]!r})" for k in changed)
        warnings.warn(
            f"ckpt_path= resumes the checkpoint's optimiser state, with its settings: {shown}. "
            "To continue with new optimiser settings, load the saved model and train it with "
            "resume=True and plan_kwargs instead.",
            TrainingWarning,
            stacklevel=6,
        )
