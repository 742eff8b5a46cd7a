"""Exact resume (``ckpt_path``) across option combinations, a real SIGTERM to a training
subprocess, and the history a failed run keeps (training.md §5, "Where cellvi goes further")."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _callbacks import PoisonAt, resume_checkpoint

import cellvi
from cellvi.errors import NonFiniteLossError, TrainingWarning
from cellvi.model import SCANVI, SCVI


def _data():
    return cellvi.data.simulate(
        n_cells=160, n_genes=30, n_batches=2, n_cell_types=2, n_de_genes_per_type=6, seed=1
    )


def _scvi(**kwargs):
    adata = _data()
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata, n_hidden=16, n_latent=4, **kwargs)


def _scanvi():
    adata = _data()
    adata.obs["label"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[adata.obs_names[::3], "label"] = "Unknown"
    SCANVI.setup_anndata(adata, batch_key="batch", labels_key="label", unlabeled_category="Unknown")
    return SCANVI(adata, n_hidden=16, n_latent=4)


class StopAt(pl.Callback):
    """Raises at minibatch ``batch_idx`` of ``epoch`` (mid-epoch), or as ``epoch`` starts."""

    def __init__(self, epoch: int, batch_idx: int | None = None):
        self.epoch, self.batch_idx = epoch, batch_idx

    def on_train_epoch_start(self, trainer, pl_module):
        if self.batch_idx is None and trainer.current_epoch == self.epoch:
            raise RuntimeError("stopped on purpose")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch_idx:
            raise RuntimeError("stopped on purpose")


class StopAtEnd(pl.Callback):
    """Raises when training ends, after the last epoch's checkpoint was written (as a SIGTERM
    arriving after the last step does)."""

    def on_train_end(self, trainer, pl_module):
        raise RuntimeError("stopped on purpose")


def _assert_same_run(model, reference) -> None:
    """Identical weights and identical history (every metric, index and value)."""
    for name, value in reference.module.state_dict().items():
        assert torch.equal(model.module.state_dict()[name], value), name
    assert sorted(model.history) == sorted(reference.history)
    for name, frame in reference.history.items():
        np.testing.assert_array_equal(model.history[name].index, frame.index, err_msg=name)
        np.testing.assert_allclose(model.history[name].to_numpy(), frame.to_numpy(), err_msg=name)


def _interrupted_then_resumed(build, kwargs, stops, resume_kwargs=None):
    model, path = build(), None
    for stop in stops:
        resume = {} if path is None else {"ckpt_path": path}
        with pytest.raises(RuntimeError, match="stopped on purpose") as info:
            model.train(**kwargs, callbacks=[stop], **resume)
        path = resume_checkpoint(info.value)
    model.train(**(resume_kwargs or kwargs), ckpt_path=path)
    return model


_STEPS = {"on_step": True, "n_epochs_kl_warmup": None, "n_steps_kl_warmup": 7}
_EARLY = {"early_stopping": True, "early_stopping_patience": 2, "early_stopping_min_delta": 1e6}
_CASES = {
    # per-step losses and a step-based KL warm-up crossing a mid-epoch stop (the partial
    # epoch's steps are not kept), no validation set, a learned library size
    "steps_no_validation": (
        lambda: _scvi(use_observed_lib_size=False),
        {"max_epochs": 3, "batch_size": 48, "train_size": 1.0, "plan_kwargs": _STEPS},
        [StopAt(1, 2)],
    ),
    # validation every other epoch, gradient clipping, stopped twice (mid-epoch before the
    # first check, then after a check that did not improve): early stopping's patience goes
    # on and it stops after the same epoch (6 of 10)
    "early_stopping_twice": (
        _scvi,
        {"max_epochs": 10, "check_val_every_n_epoch": 2, "gradient_clip_val": 0.05, **_EARLY},
        [StopAt(1, 1), StopAt(4)],
    ),
    # interrupted after early stopping decided to stop: the resumed run stops there too
    "early_stopped_then_interrupted": (
        _scvi,
        {"max_epochs": 10, **_EARLY, "early_stopping_patience": 1},
        [StopAtEnd()],
    ),
    # semi-supervised loader (labeled subset redrawn each epoch), stopped mid-epoch
    "scanvi": (
        _scanvi,
        {"max_epochs": 3, "batch_size": 32, "n_samples_per_label": 10},
        [StopAt(1, 1)],
    ),
}


@pytest.mark.parametrize(("build", "kwargs", "stops"), _CASES.values(), ids=_CASES)
def test_interrupted_then_resumed_equals_uninterrupted(build, kwargs, stops):
    reference = build()
    reference.train(**kwargs)
    _assert_same_run(_interrupted_then_resumed(build, kwargs, stops), reference)
    if "early_stopping" in kwargs:  # it did stop early, at the same epoch in both
        assert len(reference.history["elbo_train"]) < kwargs["max_epochs"]


def test_a_resumed_run_with_best_checkpoints_keeps_their_ranking_and_does_not_warn():
    # the resumed run goes on in its run directory, whose best/ already holds its checkpoints
    kwargs = {"max_epochs": 4, "enable_checkpointing": True, "checkpointing_monitor": "elbo_train"}
    reference = _scvi()
    reference.train(**kwargs)
    model = _interrupted_then_resumed(_scvi, kwargs, [StopAt(2)])
    _assert_same_run(model, reference)
    best = Path(model.trainer.checkpoint_callback.best_model_path)
    assert best.name == Path(reference.trainer.checkpoint_callback.best_model_path).name
    assert [p.name for p in best.parent.iterdir()] == [best.name]  # save_top_k=1 still holds


def test_a_failed_run_keeps_per_step_losses_only_of_finished_epochs():
    model = _scvi()
    with pytest.raises(RuntimeError, match="stopped on purpose"):
        model.train(
            max_epochs=3, batch_size=48, plan_kwargs={"on_step": True}, callbacks=[StopAt(1, 2)]
        )
    assert list(model.history["train_loss"].index) == [0]
    assert list(model.history["train_loss_step"].index) == [0, 1, 2]  # 3 steps per epoch


def test_resuming_a_checkpoint_that_already_holds_max_epochs_warns():
    model = _scvi()
    with pytest.raises(RuntimeError, match="stopped on purpose") as info:
        model.train(max_epochs=4, callbacks=[StopAt(2)])
    with pytest.warns(
        TrainingWarning, match=r"already holds 2 finished epochs and max_epochs=2"
    ) as rec:
        model.train(max_epochs=2, ckpt_path=resume_checkpoint(info.value))
    assert rec[0].filename == __file__  # points at the user's line
    assert list(model.history["elbo_train"].index) == [0, 1]


_SUBPROCESS = textwrap.dedent(
    """
    import sys, time
    import lightning.pytorch as pl
    import cellvi
    from cellvi.model import SCVI
    from cellvi.train import TrainingInterrupted
    from cellvi.train._interrupts import InterruptGuard

    class WaitForSignal(pl.Callback):  # tells the parent, then waits for its SIGTERM
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch != 3:
                return
            print("READY", flush=True)
            guard = next(c for c in trainer.callbacks if isinstance(c, InterruptGuard))
            deadline = time.time() + 60
            while guard.pending is None and time.time() < deadline:
                time.sleep(0.01)

    adata = cellvi.data.simulate(
        n_cells=160, n_genes=30, n_batches=2, n_cell_types=2, n_de_genes_per_type=6, seed=1
    )
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=4)
    with cellvi.settings.override(logging_dir=sys.argv[1], progress_bar_style="tqdm"):
        try:
            model.train(max_epochs=20, callbacks=[WaitForSignal()])
        except TrainingInterrupted as err:
            print("ERROR", err, *err.__notes__, sep="\\n", flush=True)
            ckpt_path = err.__notes__[-1].split("ckpt_path='")[1].split("'")[0]
    # resume with output silenced: nothing may appear between the two markers
    print("SILENT", flush=True)
    with cellvi.settings.override(logging_dir=sys.argv[1], verbosity="warning"):
        model.train(max_epochs=5, ckpt_path=ckpt_path)
    print("SILENT", len(model.history["elbo_train"]), flush=True)
    """
)


def test_sigterm_to_a_training_subprocess_keeps_its_work_and_it_resumes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(cellvi.__file__).parents[1])}
    with subprocess.Popen(
        [sys.executable, "-c", _SUBPROCESS, str(tmp_path / "log")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    ) as proc:
        lines = []
        for line in proc.stdout:  # not a terminal: plain lines, not a redrawn bar
            lines.append(line)
            if line.startswith("READY"):
                proc.terminate()  # SIGTERM, as a cluster scheduler sends
                break
        out = "".join(lines) + proc.stdout.read()
        assert proc.wait(timeout=120) == 0, out
    interrupted, silenced, resumed = out.split("SILENT")
    assert "Training was interrupted by SIGTERM" in interrupted
    assert "end of epoch 3" in interrupted and "last.ckpt" in interrupted
    epoch_lines = [line for line in interrupted.splitlines() if line.startswith("Epoch ")]
    assert 1 <= len(epoch_lines) <= 3 and "\r" not in out  # not one line per step or epoch
    assert silenced == "\n" and resumed == " 5\n"
    (run_dir,) = (tmp_path / "log").iterdir()  # the resumed run went on in the same folder
    assert (run_dir / "history.csv").read_text().count("\n") == 1 + 5


def test_continued_training_that_fails_in_its_first_epoch_keeps_the_trained_weights():
    model = _scvi()
    model.train(max_epochs=2)
    trained = {k: v.clone() for k, v in model.module.state_dict().items()}
    with (
        pytest.warns(TrainingWarning, match="already trained"),
        pytest.raises(NonFiniteLossError) as info,
    ):
        model.train(max_epochs=2, callbacks=[PoisonAt(epoch=0, batch_idx=1)])
    notes = "\n".join(info.value.__notes__)
    assert "keeps the weights this run started from" in notes and "initial" not in notes
    for name, value in trained.items():
        assert torch.equal(model.module.state_dict()[name], value), name
    assert list(model.history["elbo_train"].index) == [0, 1]


def test_lightnings_last_shortcut_is_refused_before_training_naming_the_checkpoint():
    # Lightning found no "last" checkpoint in the new run's folder and trained from the
    # current weights, with a warning hinting at an option cellvi ignores
    model = _scvi()
    with pytest.raises(RuntimeError, match="stopped on purpose"):
        model.train(max_epochs=3, callbacks=[StopAt(1)])
    with pytest.raises(ValueError, match=r"ckpt_path='last'.*run_dir_}/checkpoints/last.ckpt"):
        model.train(max_epochs=3, ckpt_path="last")
    assert list(model.history["elbo_train"].index) == [0]
    model.train(max_epochs=3, ckpt_path=f"{model.run_dir_}/checkpoints/last.ckpt")
    assert list(model.history["elbo_train"].index) == [0, 1, 2]
