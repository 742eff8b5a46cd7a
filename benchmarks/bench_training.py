"""Training throughput: cellvi (Lightning) vs a minimal plain-PyTorch loop, and scvi-tools.

Run: python benchmarks/bench_training.py --n-cells 20000 --n-genes 2000 --epochs 3
Optional: --scvi-python /path/to/venv/bin/python runs scvi-tools (same data, architecture,
batch size, epochs) in that interpreter, alternating with cellvi; the data are shared through
a temporary h5ad. Prints seconds per epoch, held-out ELBO and the ratios side by side.
--compile adds a run with plan_kwargs={"compile": True} (steady epochs and the first epoch,
which includes compilation, reported apart; needs --epochs >= 3).
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
path, batch_size, epochs, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
adata = anndata.read_h5ad(path)
scvi.settings.seed = seed
scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
model = scvi.model.SCVI(adata, n_hidden=128, n_latent=10, gene_likelihood="zinb")
t0 = time.perf_counter()
model.train(max_epochs=epochs, batch_size=batch_size, train_size=0.9, enable_progress_bar=False,
            plan_kwargs={"n_epochs_kl_warmup": 1})
dt = (time.perf_counter() - t0) / epochs
elbo = -model.get_elbo(indices=model.validation_indices)
print(json.dumps({"s_per_epoch": dt, "elbo_validation": float(elbo)}))
"""


class EpochClock(Callback):
    """Wall time at the end of every training epoch."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.ends.append(time.perf_counter())


def cellvi_epoch_time(adata, batch_size, epochs, *, compile=False):
    """Seconds per epoch (all of ``train()`` over ``epochs``), the model, and the clock."""
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
    )
    dt = (time.perf_counter() - start) / epochs
    return dt, model, [start, *clock.ends]


def plain_loop_epoch_time(adata, batch_size, epochs):
    """The same module, loader and optimiser in a bare loop: the framework-free floor."""
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=128, n_latent=10, gene_likelihood="zinb")
    module = model.module
    store = TensorStore.from_manager(model.adata_manager)
    n = adata.n_obs
    train_idx = np.random.default_rng(0).permutation(n)[: int(0.9 * n)]
    loader = make_dataloader(store, train_idx, batch_size, shuffle=True)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01, weight_decay=1e-6, fused=True)
    module.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            loss = module(batch, kl_weight=1.0).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return (time.perf_counter() - start) / epochs


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
        help="also train with plan_kwargs={'compile': True}; reports the steady epoch time "
        "(after the first, which includes compilation) and the first epoch's time",
    )
    args = parser.parse_args()
    adata = cellvi.data.simulate(
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        n_batches=2,
        n_cell_types=5,
        library_size_log_mean=float(np.log(700)),
        seed=0,
    )
    density = adata.X.nnz / np.prod(adata.shape)
    print(
        f"{args.n_cells} cells x {args.n_genes} genes, {density:.1%} nonzero, ZINB, "
        f"n_hidden 128, n_latent 10, {args.epochs} epochs, torch threads {torch.get_num_threads()}"
    )
    tmp = Path(tempfile.mkdtemp())
    if args.scvi_python:
        adata.write_h5ad(tmp / "data.h5ad")
    with cellvi.settings.override(progress_bar_style="none", logging_dir=tmp / "runs"):
        for batch_size in args.batch_sizes:
            plain = plain_loop_epoch_time(adata.copy(), batch_size, args.epochs)
            ours, model, _ = cellvi_epoch_time(adata.copy(), batch_size, args.epochs)
            row = {
                "batch": batch_size,
                "cellvi_s_epoch": round(ours, 3),
                "plain_loop_s_epoch": round(plain, 3),
                "overhead_vs_plain": round(ours / plain, 3),
                "cellvi_elbo_validation": round(held_out_elbo(model), 2),
            }
            if args.scvi_python:
                out = subprocess.run(
                    [
                        args.scvi_python,
                        "-c",
                        SCVI_SCRIPT,
                        str(tmp / "data.h5ad"),
                        str(batch_size),
                        str(args.epochs),
                        "0",
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                theirs = json.loads(out.stdout.strip().splitlines()[-1])
                row["scvi_s_epoch"] = round(theirs["s_per_epoch"], 3)
                row["speedup_vs_scvi"] = round(theirs["s_per_epoch"] / ours, 2)
                row["scvi_elbo_validation"] = round(theirs["elbo_validation"], 2)
            if args.compile:
                _, compiled, ends = cellvi_epoch_time(
                    adata.copy(), batch_size, args.epochs, compile=True
                )
                steady = float(np.mean(np.diff(ends[1:])))
                row["compiled_s_epoch_steady"] = round(steady, 3)
                row["compiled_first_epoch_s"] = round(ends[1] - ends[0], 1)
                row["compiled_elbo_validation"] = round(held_out_elbo(compiled), 2)
                if "scvi_s_epoch" in row:
                    row["compiled_speedup_vs_scvi"] = round(row["scvi_s_epoch"] / steady, 2)
            print(json.dumps(row))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
