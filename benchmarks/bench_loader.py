"""Loader throughput: cellvi's tensor-store gather vs plain scipy row indexing.

Run: python benchmarks/bench_loader.py --n-cells 100000 --n-genes 2000 --density 0.1
Prints cells/s per loader and batch size and the ratio, measured alternately in one run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
import torch

from cellvi.dataloaders import TensorStore, make_dataloader


def random_counts(n_cells: int, n_genes: int, density: float, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    nnz_per_row = rng.binomial(n_genes, density, size=n_cells)
    indptr = np.concatenate([[0], np.cumsum(nnz_per_row)])
    indices = np.concatenate([np.sort(rng.choice(n_genes, k, replace=False)) for k in nnz_per_row])
    data = rng.integers(1, 30, size=indptr[-1]).astype(np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))


def epoch_cellvi(store, n_cells, batch_size) -> float:
    start = time.perf_counter()
    for batch in make_dataloader(store, np.arange(n_cells), batch_size, shuffle=True):
        batch["X"].sum()
    return time.perf_counter() - start


def epoch_scipy(x, n_cells, batch_size, rng) -> float:
    start = time.perf_counter()
    order = rng.permutation(n_cells)
    for s in range(0, n_cells, batch_size):
        idx = order[s : s + batch_size]
        torch.from_numpy(x[idx].toarray()).sum()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-cells", type=int, default=100_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    x = random_counts(args.n_cells, args.n_genes, args.density)
    t0 = time.perf_counter()
    store = TensorStore({"X": x, "batch": np.zeros(args.n_cells, dtype=np.int64)})
    print(
        f"{args.n_cells} x {args.n_genes} CSR, density {args.density}; store built in "
        f"{time.perf_counter() - t0:.2f}s; torch threads {torch.get_num_threads()}"
    )
    rng = np.random.default_rng(0)
    print(f"{'batch':>6} {'cellvi cells/s':>15} {'scipy cells/s':>14} {'ratio':>6} {'us/batch':>9}")
    for batch_size in (128, 1024):
        ours, theirs = [], []
        for _ in range(args.repeats):  # alternate to share machine noise
            ours.append(epoch_cellvi(store, args.n_cells, batch_size))
            theirs.append(epoch_scipy(x, args.n_cells, batch_size, rng))
        a, b = min(ours), min(theirs)
        per_batch = a / np.ceil(args.n_cells / batch_size) * 1e6
        print(
            f"{batch_size:>6} {args.n_cells / a:>15,.0f} {args.n_cells / b:>14,.0f} "
            f"{b / a:>6.2f} {per_batch:>9.0f}"
        )


if __name__ == "__main__":
    main()
