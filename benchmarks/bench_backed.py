"""Counts left on disk: loader throughput per back-end, and SCVI epochs with peak memory.

Run (all parts): python benchmarks/bench_backed.py --workdir /tmp/cellvi_bench
Parts:
  --loaders        one shuffled epoch of the training loader over the same cells from memory,
                   a backed .h5ad, a .zarr store and a TileDB-SOMA experiment (batch 128, 1024),
                   beside cellvi's own in-memory training throughput they must feed.
  --epoch N        one SCVI epoch on N cells x 2,000 genes read from a backed .h5ad, in a fresh
                   process that reports throughput, peak RSS and RSS growth during training;
                   the same run on an in-memory copy of the first 200k cells gives the ratio.
  --scvi-python P  also train scvi-tools 1.4.2 (interpreter P) on the same backed 200k .h5ad.
The data are the simulator's 100k cells tiled to the requested size (identical rows repeat).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anndata
import h5py
import lightning.pytorch as pl
import numpy as np
import pandas as pd

import cellvi
from cellvi.dataloaders import TensorStore, make_dataloader

BASE_CELLS = 100_000
N_GENES = 2_000

PROC_MEMORY = r"""
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
"""

CHILD = (
    PROC_MEMORY
    + r"""
import json, sys, time
import cellvi, anndata
from cellvi.model import SCVI
path, batch_size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cellvi.settings.progress_bar_style = "none"
adata = cellvi.data.read_backed(path)
if mode == "memory":
    n = int(sys.argv[4])
    adata = anndata.AnnData(adata.X.read_rows(range(n)), obs=adata.obs.iloc[:n].copy(),
                            var=adata.var)
SCVI.setup_anndata(adata, batch_key="batch")
model = SCVI(adata, n_hidden=128, n_latent=10)
before, setup_peak = rss_mb(), peak_mb()
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark: training only
t0 = time.perf_counter()
model.train(max_epochs=1, batch_size=batch_size, train_size=0.9, validation_size=0.1,
            plan_kwargs={"n_epochs_kl_warmup": 1}, save_resume_checkpoint=False)
dt = time.perf_counter() - t0
n_train = len(model.train_indices)
print(json.dumps({"seconds": dt, "cells_per_s": n_train / dt, "rss_before_mb": before,
                  "peak_mb": peak_mb(), "setup_peak_mb": setup_peak,
                  "n_cells": adata.n_obs}))
"""
)

SCVI_CHILD = (
    PROC_MEMORY
    + r"""
import json, sys, time
import anndata, scvi
path, batch_size = sys.argv[1], int(sys.argv[2])
adata = anndata.read_h5ad(path, backed="r")
scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
model = scvi.model.SCVI(adata, n_hidden=128, n_latent=10)
before, setup_peak = rss_mb(), peak_mb()
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark: training only
t0 = time.perf_counter()
model.train(max_epochs=1, batch_size=batch_size, train_size=0.9, validation_size=0.1,
            enable_progress_bar=False, plan_kwargs={"n_epochs_kl_warmup": 1})
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "cells_per_s": 0.9 * adata.n_obs / dt, "rss_before_mb": before,
                  "peak_mb": peak_mb(), "setup_peak_mb": setup_peak,
                  "n_cells": adata.n_obs}))
"""
)


def base_data(workdir: Path) -> anndata.AnnData:
    path = workdir / "base_100k.h5ad"
    if not path.exists():
        adata = cellvi.data.simulate(
            n_cells=BASE_CELLS, n_genes=N_GENES, n_batches=3, n_cell_types=6, seed=0
        )
        del adata.varm["true_lfc"]
        adata.X = adata.X.tocsr().astype(np.float32)
        adata.write_h5ad(path)
    return anndata.read_h5ad(path)


def write_tiled_h5ad(base: anndata.AnnData, n_cells: int, path: Path) -> None:
    """An h5ad of ``n_cells`` rows (``base`` repeated), written block by block."""
    if path.exists():
        return
    X = base.X.tocsr()
    reps, rest = divmod(n_cells, base.n_obs)
    row_nnz = np.diff(X.indptr)
    nnz = int(X.nnz * reps + row_nnz[:rest].sum())
    obs = pd.concat([base.obs] * (reps + 1)).iloc[:n_cells].copy()
    obs.index = pd.Index([f"cell_{i}" for i in range(n_cells)])
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        anndata.io.write_elem(f, "obs", obs)
        anndata.io.write_elem(f, "var", base.var)
        for name in ("obsm", "varm", "layers", "obsp", "varp", "uns"):
            anndata.io.write_elem(f, name, {})
        g = f.create_group("X")
        g.attrs["encoding-type"], g.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        g.attrs["shape"] = (n_cells, base.n_vars)
        data = g.create_dataset("data", shape=(nnz,), dtype=np.float32)
        indices = g.create_dataset("indices", shape=(nnz,), dtype=np.int32)
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        at, row = 0, 0
        for r in range(reps + 1):
            rows = base.n_obs if r < reps else rest
            if rows == 0:
                break
            hi = int(X.indptr[rows])
            data[at : at + hi] = X.data[:hi]
            indices[at : at + hi] = X.indices[:hi]
            indptr[row + 1 : row + rows + 1] = at + X.indptr[1 : rows + 1]
            at, row = at + hi, row + rows
        g.create_dataset("indptr", data=indptr)
    tmp.rename(path)


def loader_rate(store, n, batch_size, repeat=1) -> float:
    loader = make_dataloader(store, np.arange(n), batch_size, True, seed=0)
    start = time.perf_counter()
    for _ in range(repeat):
        for batch in loader:
            batch["X"].sum()
    return repeat * n / (time.perf_counter() - start)


class _EpochClock(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def training_rate(adata, batch_size) -> float:
    """Cells per second of the second SCVI epoch (set-up excluded)."""
    cellvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvi.model.SCVI(adata, n_hidden=128, n_latent=10)
    clock = _EpochClock()
    model.train(
        max_epochs=2,
        batch_size=batch_size,
        train_size=1.0,
        callbacks=[clock],
        save_resume_checkpoint=False,
    )
    return adata.n_obs / clock.seconds


def bench_loaders(workdir: Path, base: anndata.AnnData) -> None:
    h5 = workdir / "base_100k.h5ad"
    zarr_path = workdir / "base_100k.zarr"
    if not zarr_path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base.write_zarr(zarr_path)
    sources = {"in-memory": TensorStore({"X": base.X})}
    sources["backed h5ad"] = TensorStore({"X": cellvi.data.read_backed(h5).X})
    sources["zarr"] = TensorStore({"X": cellvi.data.read_backed(zarr_path).X})
    try:
        import tiledbsoma.io

        soma_uri = workdir / "base_100k.soma"
        if not soma_uri.exists():
            tiledbsoma.io.from_anndata(
                str(soma_uri), base, measurement_name="RNA", X_layer_name="raw"
            )
        sources["TileDB-SOMA"] = TensorStore({"X": cellvi.data.read_soma(str(soma_uri)).X})
    except ImportError:
        print("tiledbsoma not installed: SOMA row skipped")
    train = {bs: training_rate(base[:20_000].copy(), bs) for bs in (128, 1024)}
    print(
        f"\nLoader throughput, one shuffled epoch of {base.n_obs:,} cells x {base.n_vars:,} "
        "genes (cells/s); chunk 512, buffer 16,384"
    )
    print("| back-end | batch 128 | batch 1024 | vs training at 128 | vs training at 1024 |")
    print("|---|---|---|---|---|")
    for name, store in sources.items():
        r128, r1024 = (loader_rate(store, base.n_obs, bs) for bs in (128, 1024))
        print(
            f"| {name} | {r128:,.0f} | {r1024:,.0f} | {r128 / train[128]:.1f}x | "
            f"{r1024 / train[1024]:.1f}x |"
        )
    print(f"| (SCVI training, in memory) | {train[128]:,.0f} | {train[1024]:,.0f} | | |")


def child(script, python, args) -> dict:
    out = subprocess.run(
        [python, "-c", script, *map(str, args)], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_epoch(
    workdir: Path, base: anndata.AnnData, n_cells: int, batch_size: int, scvi_python: str | None
) -> None:
    big = workdir / f"tiled_{n_cells}.h5ad"
    mid = workdir / "tiled_200000.h5ad"
    t0 = time.perf_counter()
    write_tiled_h5ad(base, n_cells, big)
    write_tiled_h5ad(base, 200_000, mid)
    print(
        f"\nfiles ready in {time.perf_counter() - t0:.0f} s ({big.stat().st_size / 2**30:.2f} "
        f"GiB for {n_cells:,} cells)"
    )
    rows = [
        ("cellvi, backed h5ad", n_cells, child(CHILD, sys.executable, [big, batch_size, "disk"]))
    ]
    rows.append(
        ("cellvi, backed h5ad", 200_000, child(CHILD, sys.executable, [mid, batch_size, "disk"]))
    )
    rows.append(
        (
            "cellvi, in memory",
            200_000,
            child(CHILD, sys.executable, [mid, batch_size, "memory", 200_000]),
        )
    )
    if scvi_python:
        rows.append(
            (
                "scvi-tools 1.4.2, backed h5ad",
                200_000,
                child(SCVI_CHILD, scvi_python, [mid, batch_size]),
            )
        )
    print(f"\nOne SCVI epoch (batch {batch_size}, 90% training cells, validation included)")
    print(
        "RSS in MiB: before train(); peak while training; growth = peak - before; peak of "
        "the set-up (reading annotations, count check) before training"
    )
    print("| run | cells | s | training cells/s | before | training peak | growth | set-up peak |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, r in rows:
        print(
            f"| {name} | {n:,} | {r['seconds']:.1f} | {r['cells_per_s']:,.0f} | "
            f"{r['rss_before_mb']:,.0f} | {r['peak_mb']:,.0f} | "
            f"{r['peak_mb'] - r['rss_before_mb']:,.0f} | {r['setup_peak_mb']:,.0f} |"
        )
    disk, memory = rows[1][2]["cells_per_s"], rows[2][2]["cells_per_s"]
    print(f"\nbacked / in-memory throughput (200k): {disk / memory:.2f}x")
    if scvi_python:
        print(
            f"cellvi / scvi-tools backed throughput (200k): {disk / rows[3][2]['cells_per_s']:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/cellvi_bench_backed")
    parser.add_argument("--loaders", action="store_true")
    parser.add_argument("--epoch", type=int, default=0, help="cells of the big backed run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--scvi-python", default=None)
    args = parser.parse_args()
    cellvi.settings.progress_bar_style = "none"
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base = base_data(workdir)
    print(
        f"base data: {base.n_obs:,} x {base.n_vars:,}, "
        f"{base.X.nnz / np.prod(base.shape):.1%} nonzero"
    )
    if args.loaders or not args.epoch:
        bench_loaders(workdir, base)
    if args.epoch:
        bench_epoch(workdir, base, args.epoch, args.batch_size, args.scvi_python)


if __name__ == "__main__":
    main()
