"""Training throughput: cellvi (Lightning) vs a minimal plain-PyTorch loop, and scvi-tools.

Run: python benchmarks/bench_training.py --epochs 4 --rounds 3 --compile \
    --scvi-python <venv>/bin/python
--scvi-python runs scvi-tools (same data, architecture, batch size, epochs) in that
interpreter; the data are shared through a temporary h5ad. The contenders run in turn, round
after round (plain loop, cellvi, scvi-tools, compiled cellvi; --rounds times), so the shared
machine's drifts hit all alike, and the median of the rounds is reported. Two figures per
contender: ``s_epoch``, all of ``train()`` divided by the epochs (set-up included), and
``steady``, the mean epoch after the first (needs --epochs >= 3). Ratios compare like with
like: eager cellvi and the plain loop on ``s_epoch``, the compiled run (whose first epoch
includes compilation) on ``steady`` against scvi-tools' ``steady``. Also prints held-out
ELBOs (last round). --sync-probe adds the bare loop with the two per-step host reads of
cellvi's NaN guardrail (finite loss, finite gradients) and prints ``checks_vs_plain``: on a
GPU each read waits for the device, so this isolates what they cost.

--memory-cells N (e.g. 100000) instead measures peak memory: one epoch of each library, each
in a fresh process reading the same in-memory h5ad of N simulated cells, reporting the
process's peak RSS (VmHWM) and its growth during ``train()``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

import cellvi
from cellvi.dataloaders import TensorStore, make_dataloader
from cellvi.model import SCVI

SCVI_SCRIPT = r"""
import json, sys, time, anndata, scvi, torch, numpy as np
from lightning.pytorch.callbacks import Callback
path, batch_size, epochs, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
accelerator = sys.argv[5]
class Clock(Callback):
    def __init__(self):
        self.ends = []
    def on_train_epoch_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
adata = anndata.read_h5ad(path)
scvi.settings.seed = seed
scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
model = scvi.model.SCVI(adata, n_hidden=128, n_latent=10, gene_likelihood="zinb")
clock = Clock()
t0 = time.perf_counter()
model.train(max_epochs=epochs, batch_size=batch_size, train_size=0.9, enable_progress_bar=False,
            plan_kwargs={"n_epochs_kl_warmup": 1}, callbacks=[clock], accelerator=accelerator)
dt = (time.perf_counter() - t0) / epochs
elbo = -model.get_elbo(indices=model.validation_indices)
print(json.dumps({"s_epoch": dt, "ends": [t0, *clock.ends], "elbo_validation": float(elbo)}))
"""


MEMORY_CHILD = r"""
import json, sys, time
import anndata
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
lib, path, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if lib == "scvi":
    import scvi as lib_mod
    kw = {"enable_progress_bar": False}
else:
    import cellvi as lib_mod
    lib_mod.settings.progress_bar_style = "none"
    kw = {"save_resume_checkpoint": False}
adata = anndata.read_h5ad(path)
lib_mod.model.SCVI.setup_anndata(adata, batch_key="batch")
model = lib_mod.model.SCVI(adata, n_hidden=128, n_latent=10, gene_likelihood="zinb")
before = status("VmRSS")
t0 = time.perf_counter()
model.train(max_epochs=1, batch_size=batch_size, train_size=0.9,
            plan_kwargs={"n_epochs_kl_warmup": 1}, **kw)
print(json.dumps({"seconds": time.perf_counter() - t0, "rss_before_mib": before,
                  "peak_mib": status("VmHWM")}))
"""


class EpochClock(Callback):
    """Wall time at the end of every training epoch."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the GPU's queued work belongs to this epoch
        self.ends.append(time.perf_counter())


def benchmark_data(n_cells: int, n_genes: int):
    """The simulated data of every comparison here (fixed seed, 5 types, 2 batches)."""
    return cellvi.data.simulate(
        n_cells=n_cells,
        n_genes=n_genes,
        n_batches=2,
        n_cell_types=5,
        library_size_log_mean=float(np.log(700)),
        seed=0,
    )


def steady_epoch(ends: list[float]) -> float | None:
    """Mean epoch time after the first (``ends`` starts with the start of training)."""
    return float(np.mean(np.diff(ends[1:]))) if len(ends) >= 3 else None


def cellvi_run(adata, batch_size, epochs, *, compile=False, accelerator="cpu"):
    """Seconds per epoch (all of ``train()`` over ``epochs``), epoch end times, the model."""
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=128, n_latent=10, gene_likelihood="zinb")
    clock = EpochClock()
    start = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        train_size=0.9,
        plan_kwargs={"n_epochs_kl_warmup": 1, "compile": compile},
        enable_progress_bar=False,
        save_resume_checkpoint=False,
        callbacks=[clock],
        accelerator=accelerator,
    )
    dt = (time.perf_counter() - start) / epochs
    return dt, [start, *clock.ends], model


def plain_loop_run(adata, batch_size, epochs, accelerator="cpu", checks=False):
    """The same module, loader and optimiser in a bare loop: the framework-free floor.

    ``checks`` adds what cellvi's NaN guardrail does each step: a finite-loss test and a
    finite-gradient test, each read on the host (on a GPU, each waits for the device)."""
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=128, n_latent=10, gene_likelihood="zinb")
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    module = model.module.to(device)
    store = TensorStore.from_manager(model.adata_manager)
    n = adata.n_obs
    train_idx = np.random.default_rng(0).permutation(n)[: int(0.9 * n)]
    loader = make_dataloader(store, train_idx, batch_size, shuffle=True)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01, weight_decay=1e-6, fused=True)
    module.train()
    start = time.perf_counter()
    ends = [start]
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss = module(batch, kl_weight=1.0).loss
            if checks and not bool(torch.isfinite(loss)):
                raise FloatingPointError("non-finite loss")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if checks:
                grads = [p.grad for p in module.parameters() if p.grad is not None]
                if not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
                    raise FloatingPointError("non-finite gradient")
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
    return (ends[-1] - start) / epochs, ends, model


def scvi_run(python: str, data: Path, batch_size: int, epochs: int, accelerator: str = "cpu"):
    """scvi-tools in its own interpreter: seconds per epoch, epoch ends, held-out ELBO."""
    out = subprocess.run(
        [python, "-c", SCVI_SCRIPT, str(data), str(batch_size), str(epochs), "0", accelerator],
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    return theirs["s_epoch"], theirs["ends"], theirs["elbo_validation"]


def held_out_elbo(model) -> float:
    from cellvi.analysis import eval_mode, inference_batches

    total, n = 0.0, 0
    with eval_mode(model.module):
        for batch in inference_batches(model, indices=model.validation_indices):
            out = model.module(batch, kl_weight=1.0)
            total += float((out.reconstruction_loss + out.kl_local).sum())
            n += out.n_obs
    return total / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-cells", type=int, default=20_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--scvi-python", default=None, help="python of a venv with scvi-tools")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also train with plan_kwargs={'compile': True} (compared on steady epochs)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per contender")
    parser.add_argument(
        "--accelerator", choices=["cpu", "gpu"], default="cpu", help="where every contender trains"
    )
    parser.add_argument(
        "--memory-cells", type=int, default=0, help="peak-memory mode: cells of the data set"
    )
    parser.add_argument(
        "--sync-probe",
        action="store_true",
        help="also time the bare loop with the guardrail's two per-step host reads",
    )
    args = parser.parse_args()
    if args.memory_cells:
        return peak_memory(args)
    adata = benchmark_data(args.n_cells, args.n_genes)
    density = adata.X.nnz / np.prod(adata.shape)
    print(
        f"{args.n_cells} cells x {args.n_genes} genes, {density:.1%} nonzero, ZINB, "
        f"n_hidden 128, n_latent 10, {args.epochs} epochs, "
        f"torch threads {torch.get_num_threads()}, accelerator {args.accelerator}"
        + (f" ({torch.cuda.get_device_name()})" if args.accelerator == "gpu" else "")
    )
    tmp = Path(tempfile.mkdtemp())
    if args.scvi_python:
        adata.write_h5ad(tmp / "data.h5ad")
    with cellvi.settings.override(progress_bar_style="none", logging_dir=tmp / "runs"):
        for batch_size in args.batch_sizes:
            print(json.dumps(compare(adata, batch_size, args, tmp)))
            sys.stdout.flush()


def compare(adata, batch_size: int, args, tmp: Path) -> dict:
    """Alternating rounds of every contender; medians over the rounds and their ratios."""
    times: dict[str, list[tuple[float, float | None]]] = {}
    elbos: dict[str, float] = {}
    for _ in range(args.rounds):
        where = args.accelerator
        s_epoch, ends, _ = plain_loop_run(adata.copy(), batch_size, args.epochs, where)
        times.setdefault("plain", []).append((s_epoch, steady_epoch(ends)))
        if args.sync_probe:
            s_epoch, ends, _ = plain_loop_run(
                adata.copy(), batch_size, args.epochs, where, checks=True
            )
            times.setdefault("plain_checked", []).append((s_epoch, steady_epoch(ends)))
        s_epoch, ends, model = cellvi_run(adata.copy(), batch_size, args.epochs, accelerator=where)
        times.setdefault("cellvi", []).append((s_epoch, steady_epoch(ends)))
        elbos["cellvi"] = held_out_elbo(model)
        if args.scvi_python:
            s_epoch, ends, elbos["scvi"] = scvi_run(
                args.scvi_python, tmp / "data.h5ad", batch_size, args.epochs, where
            )
            times.setdefault("scvi", []).append((s_epoch, steady_epoch(ends)))
        if args.compile:
            s_epoch, ends, model = cellvi_run(
                adata.copy(), batch_size, args.epochs, compile=True, accelerator=where
            )
            times.setdefault("compiled", []).append((s_epoch, steady_epoch(ends)))
            elbos["compiled"] = held_out_elbo(model)
    med = {
        name: (float(np.median([t[0] for t in runs])), _median_or_none([t[1] for t in runs]))
        for name, runs in times.items()
    }
    row = {"batch": batch_size, "rounds": args.rounds}
    for name, (s_epoch, steady) in med.items():
        row[f"{name}_s_epoch"] = round(s_epoch, 3)
        if steady is not None:
            row[f"{name}_steady"] = round(steady, 3)
    row["overhead_vs_plain"] = round(med["cellvi"][0] / med["plain"][0], 3)
    if "plain_checked" in med:  # what the per-step finiteness reads cost by themselves
        row["checks_vs_plain"] = round(med["plain_checked"][0] / med["plain"][0], 3)
    if "scvi" in med:
        row["speedup_vs_scvi"] = round(med["scvi"][0] / med["cellvi"][0], 2)
        if med["scvi"][1] is not None:
            row["steady_speedup_vs_scvi"] = round(med["scvi"][1] / med["cellvi"][1], 2)
            if "compiled" in med:
                row["compiled_steady_speedup_vs_scvi"] = round(
                    med["scvi"][1] / med["compiled"][1], 2
                )
    for name, elbo in elbos.items():
        row[f"{name}_elbo_validation"] = round(elbo, 2)
    return row


def peak_memory(args) -> None:
    """Peak RSS of one epoch per library, each in a fresh process on the same h5ad."""
    adata = benchmark_data(args.memory_cells, args.n_genes)
    del adata.varm["true_lfc"]
    path = Path(tempfile.mkdtemp()) / "data.h5ad"
    adata.write_h5ad(path)
    pythons = {"cellvi": sys.executable}
    if args.scvi_python:
        pythons["scvi"] = args.scvi_python
    for batch_size in args.batch_sizes:
        row = {"cells": args.memory_cells, "batch": batch_size}
        for lib, python in pythons.items():
            out = subprocess.run(
                [python, "-c", MEMORY_CHILD, lib, str(path), str(batch_size)],
                capture_output=True,
                text=True,
                check=True,
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            row[f"{lib}_peak_mib"] = round(res["peak_mib"])
            row[f"{lib}_train_growth_mib"] = round(res["peak_mib"] - res["rss_before_mib"])
        print(json.dumps(row))
        sys.stdout.flush()


def _median_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


if __name__ == "__main__":
    main()
