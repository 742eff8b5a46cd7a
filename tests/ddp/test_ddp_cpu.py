"""DDP on CPU with 2 processes (gloo): shards, identical weights, early stopping, launchers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _callbacks import resume_checkpoint

import cellvi
from cellvi.model import SCANVI, SCVI
from cellvi.train import TrainingInterrupted
from cellvi.train._interrupts import DDP_CHECK_EVERY

pytestmark = pytest.mark.ddp


class _PerRank(pl.Callback):
    """Each rank writes its final weights, stop epoch and training cells seen."""

    def __init__(self, folder):
        self.folder = str(folder)
        self.seen: list[int] = []
        self.validated: list[int] = []
        self.labeled: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0:
            full = batch["full"] if "full" in batch else batch
            self.seen.extend(full["ind_x"].ravel().tolist())
            if "labeled" in batch:
                self.labeled.extend(batch["labeled"]["ind_x"].ravel().tolist())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.current_epoch == 0 and not trainer.sanity_checking:
            self.validated.extend(batch["ind_x"].ravel().tolist())

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {
                "state": {k: v.detach().cpu() for k, v in pl_module.module.state_dict().items()},
                "epoch": trainer.current_epoch,
                "seen": self.seen,
                "validated": self.validated,
                "labeled": self.labeled,
                "world": trainer.world_size,
            },
            os.path.join(self.folder, f"rank{trainer.global_rank}.pt"),
        )


TWO_CPU_RANKS = {"accelerator": "cpu", "devices": 2, "strategy": "ddp_notebook"}


def _data(n=400, seed=0):
    adata = cellvi.data.simulate(n_cells=n, n_genes=40, n_de_genes_per_type=5, seed=seed)
    SCVI.setup_anndata(adata, batch_key="batch")
    return adata


def _ranks(folder):
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_two_process_training_gives_identical_weights_and_full_results(tmp_path):
    adata = _data()
    model = SCVI(adata, n_hidden=16, n_latent=3)
    model.train(
        max_epochs=3,
        **TWO_CPU_RANKS,
        check_val_every_n_epoch=1,
        callbacks=[_PerRank(tmp_path)],
    )
    r0, r1 = _ranks(tmp_path)
    assert r0["world"] == 2
    for name, value in r0["state"].items():
        torch.testing.assert_close(r1["state"][name], value, rtol=0, atol=0, msg=name)
    # the launching process has rank 0's weights, the full history and the split
    for name, value in model.module.state_dict().items():
        torch.testing.assert_close(value.cpu(), r0["state"][name], msg=name)
    assert list(model.history["elbo_train"].index) == [0, 1, 2]
    assert "elbo_validation" in model.history and model.is_trained
    # each rank saw a disjoint half of the training cells in an epoch (up to padding)
    s0, s1 = set(r0["seen"]), set(r1["seen"])
    assert len(s0 & s1) <= 1 and s0 | s1 == set(model.train_indices.tolist())
    # and an exact half of the validation cells: none twice, none left out
    v0, v1 = r0["validated"], r1["validated"]
    assert abs(len(v0) - len(v1)) <= 1 and not set(v0) & set(v1)
    assert sorted(v0 + v1) == sorted(model.validation_indices.tolist())


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_compiled_training_under_ddp_keeps_ranks_in_step(tmp_path):
    """plan_kwargs={"compile": True} with 2 processes: gradients are still all-reduced."""
    adata = _data()
    model = SCVI(adata, n_hidden=16, n_latent=3)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.train(
        max_epochs=3,
        **TWO_CPU_RANKS,
        batch_size=64,
        callbacks=[_PerRank(tmp_path)],
        plan_kwargs={"compile": True},
    )
    r0, r1 = _ranks(tmp_path)
    # parameters (all-reduced gradients); BatchNorm's running statistics are per rank between
    # DDP's buffer broadcasts, as in eager training
    for name, _ in model.module.named_parameters():
        torch.testing.assert_close(r1["state"][name], r0["state"][name], rtol=0, atol=0, msg=name)
    assert not torch.equal(before["px_r"], r0["state"]["px_r"])  # the weights did train
    elbo = model.history["elbo_train"]["elbo_train"].to_numpy()
    assert np.isfinite(elbo).all() and elbo[-1] < elbo[0]


def test_epoch_losses_are_means_over_every_ranks_cells():
    # per rank: 180 training cells in minibatches of 128 and 52; at KL weight 0 the loss of a
    # cell is its reconstruction loss, so the cell-weighted means over both ranks agree
    model = SCVI(_data(), n_hidden=16, n_latent=3)
    model.train(
        max_epochs=1,
        **TWO_CPU_RANKS,
        batch_size=128,
        check_val_every_n_epoch=1,
        plan_kwargs={"min_kl_weight": 0.0, "max_kl_weight": 0.0},
    )
    for split in ("train", "validation"):
        loss = model.history[f"{split}_loss"][f"{split}_loss"].to_numpy()
        rec = model.history[f"reconstruction_loss_{split}"][f"reconstruction_loss_{split}"]
        np.testing.assert_allclose(loss, rec.to_numpy(), rtol=1e-6)


def test_early_stopping_stops_every_rank_at_the_same_epoch(tmp_path):
    model = SCVI(_data(), n_hidden=16, n_latent=3)
    model.train(
        max_epochs=30,
        **TWO_CPU_RANKS,
        early_stopping=True,
        early_stopping_patience=2,
        early_stopping_min_delta=1e9,
        callbacks=[_PerRank(tmp_path)],
    )
    r0, r1 = _ranks(tmp_path)
    assert r0["epoch"] == r1["epoch"] < 30
    assert len(model.history["elbo_train"]) == r0["epoch"]


def test_several_models_one_after_another_in_one_process(tmp_path):
    adata = _data()
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[::3] = "Unknown"
    adata.obs["labels"] = labels
    scvi_model = SCVI(adata, n_hidden=16, n_latent=3)
    scvi_model.train(max_epochs=2, **TWO_CPU_RANKS)
    scanvi = SCANVI.from_scvi_model(scvi_model, "Unknown", labels_key="labels")
    scanvi.train(max_epochs=2, **TWO_CPU_RANKS)
    assert scanvi.is_trained and len(scanvi.history["train_accuracy"]) == 2
    assert scanvi.predict().shape == (adata.n_obs,)


def test_scanvi_labeled_and_validation_cells_are_sharded_across_ranks(tmp_path):
    adata = _data()
    order = np.random.default_rng(0).permutation(adata.n_obs)
    train, val = order[:360], order[360:]
    labels = np.full(adata.n_obs, "Unknown", dtype=object)
    types = adata.obs["cell_type"].astype(str).to_numpy()
    labels[train[:60]] = types[train[:60]]
    labels[val[0]] = types[val[0]]  # one labeled validation cell: on one rank's shard only
    adata.obs["labels"] = labels
    SCANVI.setup_anndata(adata, "labels", "Unknown", batch_key="batch")
    model = SCANVI(adata, n_hidden=16, n_latent=3)
    model.train(
        max_epochs=2,
        **TWO_CPU_RANKS,
        check_val_every_n_epoch=1,
        datasplitter_kwargs={"external_indexing": [train, val]},
        callbacks=[_PerRank(tmp_path)],
    )
    r0, r1 = _ranks(tmp_path)
    assert sorted(r0["validated"] + r1["validated"]) == sorted(val.tolist())
    assert not set(r0["validated"]) & set(r1["validated"])
    # the labeled training stream is split across ranks too
    assert set(r0["labeled"]) | set(r1["labeled"]) == set(train[:60].tolist())
    assert not set(r0["labeled"]) & set(r1["labeled"])
    # the single labeled validation cell decides the accuracy: 0 or 1
    assert set(model.history["validation_accuracy"]["validation_accuracy"]) <= {0.0, 1.0}


def _run_script(tmp_path, body: str, *launcher: str) -> None:
    """Write ``body`` (a training script) to ``tmp_path/train.py`` and run it in a fresh
    Python (through ``launcher``, e.g. torchrun's module), one thread per process."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(body))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, *launcher, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_torchrun_launch_path(tmp_path):
    body = f"""
        import os, numpy as np, cellvi
        from cellvi.model import SCVI
        with cellvi.settings.override(progress_bar_style="none", logging_dir={str(tmp_path)!r}):
            adata = cellvi.data.simulate(n_cells=300, n_genes=40, n_de_genes_per_type=5, seed=0)
            SCVI.setup_anndata(adata, batch_key="batch")
            model = SCVI(adata, n_hidden=16, n_latent=3)
            model.train(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp")
            rank = int(os.environ["RANK"])
            np.save({str(tmp_path)!r} + f"/latent{{rank}}.npy", model.get_latent_representation())
    """
    torchrun = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517")
    _run_script(tmp_path, body, *torchrun)
    z0, z1 = np.load(tmp_path / "latent0.npy"), np.load(tmp_path / "latent1.npy")
    np.testing.assert_allclose(z0, z1, rtol=1e-5, atol=1e-6)  # same weights on both ranks


def test_devices_2_without_a_strategy_shares_the_cells_between_the_processes(tmp_path):
    # Lightning's strategy="auto" starts DDP for devices=2; each process used to train on all
    # the cells (the whole job done twice)
    body = f"""
        import os, cellvi
        from cellvi.model import SCVI
        with cellvi.settings.override(progress_bar_style="none", logging_dir={str(tmp_path)!r}):
            adata = cellvi.data.simulate(n_cells=600, n_genes=40, n_de_genes_per_type=5, seed=0)
            SCVI.setup_anndata(adata, batch_key="batch")
            model = SCVI(adata, n_hidden=16, n_latent=3)
            model.train(max_epochs=1, accelerator="cpu", devices=2, batch_size=100,
                        plan_kwargs={{"on_step": True}})
            rank = os.environ.get("LOCAL_RANK", "0")
            steps = len(model.history["train_loss_step"])
            open({str(tmp_path)!r} + f"/steps{{rank}}", "w").write(str(steps))
    """
    _run_script(tmp_path, body)
    # 540 training cells: 270 per process in minibatches of 100 is 3 steps (all: 6)
    assert [(tmp_path / f"steps{r}").read_text() for r in range(2)] == ["3", "3"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_request_without_gpu_is_a_clear_error():
    model = SCVI(_data(), n_hidden=8, n_latent=2)
    with pytest.raises(ValueError, match="no CUDA device; use accelerator='cpu'"):
        model.train(max_epochs=1, accelerator="gpu", devices=2, strategy="ddp")
    assert not model.is_trained


def test_more_cpu_processes_than_cores_is_a_clear_error():
    model = SCVI(_data(), n_hidden=8, n_latent=2)
    with pytest.raises(ValueError, match=r"asks for 4096 CPU processes .* cores"):
        model.train(max_epochs=1, accelerator="cpu", devices=4096, strategy="ddp_notebook")


def test_two_processes_train_from_a_file_on_disk(tmp_path):
    """Block-shuffled reads under DDP: each rank reopens the file and reads whole chunks."""
    adata = cellvi.data.simulate(n_cells=400, n_genes=40, n_de_genes_per_type=5, seed=0)
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = cellvi.data.read_backed(tmp_path / "a.h5ad")
    SCVI.setup_anndata(backed, batch_key="batch")
    model = SCVI(backed, n_hidden=16, n_latent=3)
    with cellvi.settings.override(dl_chunk_size=20, dl_buffer_size=100):
        model.train(
            max_epochs=2,
            **TWO_CPU_RANKS,
            check_val_every_n_epoch=1,
            callbacks=[_PerRank(tmp_path)],
        )
    r0, r1 = _ranks(tmp_path)
    for name, value in r0["state"].items():
        torch.testing.assert_close(r1["state"][name], value, rtol=0, atol=0, msg=name)
    s0, s1 = set(r0["seen"]), set(r1["seen"])
    assert len(s0 & s1) <= 1 and s0 | s1 == set(model.train_indices.tolist())
    assert sorted(r0["validated"] + r1["validated"]) == sorted(model.validation_indices.tolist())
    assert model.is_trained and len(model.history["elbo_train"]) == 2


class _SignalOneRank(pl.Callback):
    """SIGTERM to the process of ``rank`` alone when ``epoch`` starts; every rank writes the
    last step it finished."""

    def __init__(self, folder, epoch: int, rank: int):
        self.folder, self.epoch, self.rank = str(folder), epoch, rank

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(os.path.join(self.folder, f"step{trainer.global_rank}.txt"), "w") as f:
            f.write(str(trainer.global_step))


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_and_keeps_work(tmp_path):
    model = SCVI(_data(), n_hidden=16, n_latent=3)
    kwargs = {"max_epochs": 8, **TWO_CPU_RANKS, "check_val_every_n_epoch": 1}
    with pytest.raises(TrainingInterrupted, match="interrupted by") as info:
        model.train(**kwargs, callbacks=[_SignalOneRank(tmp_path, epoch=2, rank=1)])
    steps = {int((tmp_path / f"step{r}.txt").read_text()) for r in range(2)}
    assert len(steps) == 1  # no rank went on alone into a collective
    assert steps.pop() % DDP_CHECK_EVERY == 0
    # the launching process holds rank 0's weights and history of the last finished epoch
    last = resume_checkpoint(info.value)
    saved = torch.load(last, weights_only=True)
    n_done = saved["epoch"] + 1
    assert 2 <= n_done < 8 and list(model.history["elbo_train"].index) == list(range(n_done))
    for name, value in model.module.state_dict().items():
        torch.testing.assert_close(
            value, saved["state_dict"][f"module.{name}"], rtol=0, atol=0, msg=name
        )
    model.train(**kwargs, ckpt_path=last)
    assert list(model.history["elbo_train"].index) == list(range(8)) and model.is_trained
