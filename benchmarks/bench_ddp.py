"""Scaling: the same SCVI trained on 1 and 2 processes (CPU gloo, or GPUs when present).

Run: python benchmarks/bench_ddp.py --n-cells 20000 --n-genes 2000 --epochs 2
Prints seconds per epoch, throughput, scaling efficiency and the ELBO reached. Each process
gets ``torch threads = cores / processes``, so on a 2-core machine two processes compete for
the same cores that one process already uses: expect no speed-up there.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

import cellvi
from cellvi.model import SCVI


def run(adata, devices: int, accelerator: str, epochs: int, batch_size: int) -> dict:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata)
    start = time.perf_counter()
    model.train(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=devices,
        strategy="ddp_notebook" if devices > 1 else "auto",
        batch_size=batch_size,
        save_resume_checkpoint=False,
    )
    seconds = (time.perf_counter() - start) / epochs
    return {
        "devices": devices,
        "s_per_epoch": round(seconds, 2),
        "cells_per_s": round(adata.n_obs / seconds),
        "elbo_train_last": round(float(model.history["elbo_train"]["elbo_train"].iloc[-1]), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-cells", type=int, default=20_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    accelerator = "gpu" if torch.cuda.device_count() >= 2 else "cpu"
    adata = cellvi.data.simulate(n_cells=args.n_cells, n_genes=args.n_genes, seed=0)
    with cellvi.settings.override(progress_bar_style="none", logging_dir=tempfile.mkdtemp()):
        one = run(adata.copy(), 1, accelerator, args.epochs, args.batch_size)
        two = run(adata.copy(), 2, accelerator, args.epochs, args.batch_size)
    two["scaling_efficiency"] = round(one["s_per_epoch"] / (2 * two["s_per_epoch"]), 2)
    print(json.dumps({"accelerator": accelerator, "batch_size": args.batch_size}))
    print(json.dumps(one))
    print(json.dumps(two))


if __name__ == "__main__":
    main()
