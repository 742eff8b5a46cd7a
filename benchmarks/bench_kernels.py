"""The fused ZINB kernel's forward + backward: block sizes side by side, and the elementwise
autograd formula (what scvi-tools runs) for scale.

Run: python benchmarks/bench_kernels.py --cells 128 1024 --rounds 15
On simulated counts (``--cells`` x 2,000 genes, the training benchmark's settings), with
decoder-like rates. The contenders alternate within every round (the machine's drifts hit all
alike); medians are printed with their ratio to the default block size (``BLOCK_BYTES``).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np
import torch

import cellvi
from cellvi.distributions import _fused, log_zinb_positive, zinb_log_likelihood


def _inputs(n_cells: int, n_genes: int):
    adata = cellvi.data.simulate(
        n_cells=n_cells, n_genes=n_genes, n_batches=2, library_size_log_mean=float(np.log(700))
    )
    x = torch.as_tensor(np.asarray(adata.X.todense()), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    log_mu = (x.sum(1, keepdim=True) / n_genes).log() + torch.randn(x.shape, generator=gen)
    theta = torch.rand(n_genes, generator=gen) * 5 + 0.5
    logits = torch.randn(x.shape, generator=gen) - 2
    return x, [t.requires_grad_() for t in (log_mu, theta, logits)]


def _step(kernel, x, params):
    for p in params:
        p.grad = None
    kernel(x, *params).sum().backward()


def _elementwise(x, log_mu, theta, logits):
    return log_zinb_positive(x, log_mu.exp(), theta, logits).sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--kib", type=int, nargs="+", default=[128, 256, 512])
    args = parser.parse_args()
    default = _fused.BLOCK_BYTES
    print(f"torch threads {torch.get_num_threads()}, default block {default // 1024} KiB")
    for n in args.cells:
        x, params = _inputs(n, args.genes)
        contenders = {f"block {k} KiB": k * 1024 for k in args.kib}
        contenders["one block (whole minibatch)"] = 1 << 62
        times: dict[str, list[float]] = {name: [] for name in contenders}
        times["elementwise autograd"] = []
        fused = functools.partial(_step, zinb_log_likelihood, x, params)
        elementwise = functools.partial(_step, _elementwise, x, params)
        for _ in range(args.rounds):
            for name, size in contenders.items():
                _fused.BLOCK_BYTES = size
                times[name].append(_timed(fused))
            _fused.BLOCK_BYTES = default
            times["elementwise autograd"].append(_timed(elementwise))
        base = statistics.median(times[f"block {default // 1024} KiB"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{n} cells, {name}: {median:.2f} ms ({median / base:.2f}x the default)")


def _timed(fn, repeats: int = 5) -> float:
    fn()  # warm
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


if __name__ == "__main__":
    main()
