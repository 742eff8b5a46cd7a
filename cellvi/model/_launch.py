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
_OWN = ("strategy", "devices", "accelerator")
# arguments a fresh process cannot take (a data module is not sent over; an interrupted run's
# checkpoint resumes in this session with model.train(ckpt_path=...))
_UNSENDABLE = ("ckpt_path", "datamodule")


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
    unsendable = sorted(set(train_kwargs) & set(_UNSENDABLE))
    if unsendable:
        raise ValueError(
            f"train_in_subprocess does not take {unsendable}: the ranks train the saved model "
            "on its AnnData. Resume an interrupted run with model.train(ckpt_path=..., "
            "strategy='ddp') in a torchrun script, or continue a finished one with "
            "train_in_subprocess(model, resume=True)."
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


def _command(folder: Path, nproc: int) -> list[str]:
    return [
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


# errors a rank raises only because another rank died first (its collective lost its peer)
_COLLATERAL = ("Connection closed by peer", "remote worker crashing", "Connection reset by peer")


def _stop(process: subprocess.Popen, folder: Path, grace: float = 40.0) -> None:
    """End torchrun *and its ranks*. torchrun starts each rank in a session of its own and
    stops them when it gets SIGTERM (the ranks then stop at a step boundary); killing torchrun
    alone would leave them training as orphans, so ranks still left are killed by pid."""
    import signal

    ranks = _children(process.pid)
    try:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        process.kill()
    except ProcessLookupError:
        pass
    for pid in ranks:
        try:  # only a process still running this job (not a reused pid)
            if str(folder) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    process.communicate()


def _children(pid: int) -> list[int]:
    """Pids of ``pid``'s child processes (Linux ``/proc``; empty elsewhere)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _failure_detail(folder: Path, stderr: str) -> str:
    """The ranks' own error: the first one written that is not a rank losing its peer
    (the rank that failed first is the cause; the others only lost their collective)."""
    errors = sorted(folder.glob("error_rank*.txt"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    texts = [(p.stem.replace("error_", ""), p.read_text()) for p in errors]
    causes = [t for t in texts if not any(m in t[1] for m in _COLLATERAL)] or texts
    if causes:
        return f"{causes[0][0]}: {causes[0][1]}"
    return "\n".join(stderr.strip().splitlines()[-25:])


def _run(folder: Path, nproc: int, timeout: float | None) -> None:
    # one thread per CPU rank: the ranks share the machine's cores
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    # torchrun in a session of its own: only this function signals it (see _stop)
    process = subprocess.Popen(
        _command(folder, nproc),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as err:
        _stop(process, folder)
        raise RuntimeError(
            f"The multi-process run did not finish within timeout={timeout} s and was stopped; "
            "the model is unchanged."
        ) from err
    except BaseException:  # e.g. Ctrl-C here: the ranks are in another group, stop them
        _stop(process, folder)
        raise
    finally:
        if process.poll() is None:
            _stop(process, folder)
    sys.stdout.write(stdout)
    if process.returncode != 0 or not (folder / "out" / "model.pt").exists():
        raise RuntimeError(
            f"The multi-process run failed (exit code {process.returncode}); the model is "
            f"unchanged. {_failure_detail(folder, stderr)}"
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
