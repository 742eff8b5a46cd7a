"""Multi-process training script-style, from any session (``training.md``, "Where cellvi goes
further": a launcher that runs DDP training in fresh processes and loads the result back).

:func:`train_in_subprocess` saves the model with its AnnData to a temporary folder, starts
``torchrun`` (``strategy="ddp"``: every rank a fresh process, as in a script) on this module,
and adopts the trained weights, history, split and optimiser state when the ranks are done.
The calling session never forks or spawns workers itself, so it can launch any number of
such runs, also where ``ddp_notebook`` cannot (after CUDA was initialised, on platforms
without fork).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["train_in_subprocess"]

# settings a child process must share with the caller
_SETTINGS = ("seed", "verbosity", "batch_size", "logging_dir", "progress_bar_style")
# arguments the launcher sets itself
_OWN = ("strategy", "devices", "accelerator", "ckpt_path", "datamodule")


def train_in_subprocess(
    model,
    nproc_per_node: int = 2,
    accelerator: str = "cpu",
    timeout: float | None = None,
    **train_kwargs,
) -> None:
    """Train ``model`` on ``nproc_per_node`` processes started by ``torchrun``, then load the
    result into ``model``.

    Parameters
    ----------
    model
        A cellvi model with an in-memory AnnData.
    nproc_per_node
        Processes (ranks): CPU processes with the gloo backend, or one per GPU.
    accelerator
        ``"cpu"`` or ``"gpu"``.
    timeout
        Seconds before the run is stopped (None: no limit).
    **train_kwargs
        Arguments of the model's ``train()`` (``max_epochs``, ``plan_kwargs``, ``resume``,
        ...), as JSON-like values: they travel to the new processes as text, so callbacks and
        config objects are refused (pass their fields).

    Raises
    ------
    ValueError
        Before anything starts, for a model without in-memory data, launcher arguments in
        ``train_kwargs`` or values that cannot be sent.
    RuntimeError
        When the run fails; ``model`` is then unchanged.
    """
    from ..data import is_on_disk

    if isinstance(nproc_per_node, bool) or not isinstance(nproc_per_node, int):
        raise TypeError(f"nproc_per_node must be a whole number; got {nproc_per_node!r}.")
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node={nproc_per_node} must be at least 1.")
    if accelerator not in ("cpu", "gpu"):
        raise ValueError(f"accelerator={accelerator!r}: use 'cpu' or 'gpu'.")
    if accelerator == "cpu" and nproc_per_node > (os.cpu_count() or 1):
        raise ValueError(
            f"nproc_per_node={nproc_per_node} CPU processes on a machine with "
            f"{os.cpu_count()} cores would only compete for them; use at most that many."
        )
    own = sorted(set(train_kwargs) & set(_OWN))
    if own:
        raise ValueError(
            f"train_in_subprocess sets {own} itself (strategy='ddp' on nproc_per_node "
            "processes); drop them from the train() arguments."
        )
    adata = getattr(model, "adata", None)
    if adata is None or any(is_on_disk(m) for m in (adata.X, *adata.layers.values())):
        raise ValueError(
            "train_in_subprocess needs the model's AnnData in memory (it is written to a "
            "temporary .h5ad for the new processes); for counts on disk, launch a script with "
            "torchrun and model.train(strategy='ddp') instead."
        )
    try:
        arguments = json.dumps(train_kwargs)
    except TypeError as err:
        bad = [k for k, v in train_kwargs.items() if not _sendable(v)]
        raise ValueError(
            f"train_in_subprocess sends the train() arguments as text; {bad} are not plain "
            "values (numbers, strings, lists, dicts). Pass config fields instead of objects."
        ) from err
    with tempfile.TemporaryDirectory(prefix="cellvi-ddp-") as tmp:
        folder = Path(tmp)
        keep_optimizer = model._optimizer_state is not None  # for train(resume=True)
        model.save(folder / "in", save_anndata=True, save_optimizer_state=keep_optimizer)
        job = {
            "model_class": type(model).__name__,
            "train": json.loads(arguments),
            "accelerator": accelerator,
            "devices": nproc_per_node,
            "settings": _settings(),
        }
        (folder / "job.json").write_text(json.dumps(job))
        _run(folder, nproc_per_node, timeout)
        _adopt(model, type(model).load(folder / "out", adata=False))


def _sendable(value) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def _settings() -> dict:
    from .._settings import settings

    values = {name: getattr(settings, name) for name in _SETTINGS}
    values["logging_dir"] = str(values["logging_dir"])
    return values


def _run(folder: Path, nproc: int, timeout: float | None) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free local port, no rendezvous to set up
        "--nproc_per_node",
        str(nproc),
        "-m",
        "cellvi.model._ddp_rank",
        str(folder),
    ]
    # one thread per CPU rank: the ranks share the machine's cores
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        done = subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(
            f"The multi-process run did not finish within timeout={timeout} s and was stopped; "
            "the model is unchanged."
        ) from err
    sys.stdout.write(done.stdout)
    if done.returncode != 0 or not (folder / "out" / "model.pt").exists():
        errors = sorted(folder.glob("error_rank*.txt"))
        if errors:  # the ranks' own exception, e.g. a refused argument
            detail = f"{errors[0].stem.replace('error_', '')}: {errors[0].read_text()}"
        else:
            detail = "\n".join(done.stderr.strip().splitlines()[-25:])
        raise RuntimeError(
            f"The multi-process run failed (exit code {done.returncode}); the model is "
            f"unchanged. {detail}"
        )


def _adopt(model, trained) -> None:
    """Take over what a run changes: weights, history, split, optimiser state."""
    model.module.load_state_dict(trained.module.state_dict())
    model.module.eval()
    for name in (
        "history_",
        "is_trained_",
        "train_indices_",
        "validation_indices_",
        "test_indices_",
        "run_dir_",
        "_optimizer_state",
        "_training_progress",
    ):
        setattr(model, name, getattr(trained, name))
    model.trainer = None  # it lived in the finished processes
