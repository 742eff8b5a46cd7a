"""The encoder's sparse first product on the CPU: one embedding_bag pass vs blocks of columns.

Run: python benchmarks/bench_sparse_product.py --n-cells 20000 --rounds 15
On simulated counts (the inference benchmark's data), an SCVI with 128 hidden units is fitted
for one epoch (speed does not depend on the weights). Then, for each block width in turn
(``cellvi.dataloaders._sparse.CPU_BAG_COLUMNS``; --widths, default 64 and one 128-wide pass),
it times the product alone over all cells in inference minibatches of 4096, and a whole
``get_latent_representation`` call, alternating widths every round so that the machine's
drifts hit all alike. Prints the fastest and median seconds per width and the ratio of each
width's fastest time to the first width's.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

import cellvi
import cellvi.dataloaders._sparse as sparse_rows
from cellvi.model import SCVI


def product_over_all_cells(model, batch_size: int = 4096) -> None:
    """``log1p(x) @ W1.T`` of the encoder's first layer, minibatch by minibatch."""
    store = model._tensor_store(model.adata_manager)
    weight = model.module.z_encoder.encoder.blocks[0]["linear"].linear.weight.detach()
    n_cells = model.adata.n_obs
    with torch.inference_mode():
        for start in range(0, n_cells, batch_size):
            idx = torch.arange(start, min(start + batch_size, n_cells))
            rows = store.gather(idx, ("X",))["X"].map_values(torch.log1p)
            rows.linear(weight[:, : rows.shape[1]])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-cells", type=int, default=20_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args()
    adata = cellvi.data.simulate(
        n_cells=args.n_cells, n_genes=args.n_genes, n_batches=2, n_cell_types=5, seed=0
    )
    with cellvi.settings.override(
        progress_bar_style="none", logging_dir=tempfile.mkdtemp(), verbosity="warning"
    ):
        SCVI.setup_anndata(adata, batch_key="batch")
        model = SCVI(adata, n_hidden=128, n_latent=10)
        model.train(max_epochs=1, save_resume_checkpoint=False, accelerator="cpu")
    calls = {
        "product": lambda: product_over_all_cells(model),
        "latent": model.get_latent_representation,
    }
    default = sparse_rows.CPU_BAG_COLUMNS
    times = {(w, key): [] for w in args.widths for key in calls}
    reference = {}
    try:
        for _ in range(args.rounds):
            for width in args.widths:
                sparse_rows.CPU_BAG_COLUMNS = width
                for key, call in calls.items():
                    start = time.perf_counter()
                    result = call()
                    times[width, key].append(time.perf_counter() - start)
                    if key == "latent":  # every width gives the same numbers
                        reference.setdefault("latent", result)
                        np.testing.assert_allclose(result, reference["latent"], atol=1e-5)
    finally:
        sparse_rows.CPU_BAG_COLUMNS = default
    density = adata.X.nnz / np.prod(adata.shape)
    print(f"{args.n_cells} cells x {args.n_genes} genes, {density:.1%} nonzero, 128 hidden")
    for key in calls:
        base = min(times[args.widths[0], key])
        for width in args.widths:
            fastest, median = min(times[width, key]), float(np.median(times[width, key]))
            print(
                f"{key:8s} width {width:4d}: fastest {fastest:.3f} s, median {median:.3f} s, "
                f"{fastest / base:.2f}x the time of width {args.widths[0]}"
            )


if __name__ == "__main__":
    main()
