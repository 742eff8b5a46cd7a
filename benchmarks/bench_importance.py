"""Importance-weighted DE against uniform DE: time and accuracy on the planted truth.

Run: python benchmarks/bench_importance.py --n-cells 2000 --n-genes 2000 --epochs 150
SCVI is trained on simulated data (5 cell types), then type_0 is compared with type_1 in
change mode with ``weights="uniform"`` and ``weights="importance"`` (default importance
options: up to 1,024 anchors, 500 Monte Carlo samples for their marginal likelihoods).
Prints seconds, the ratio, and for both the AUROC of ``proba_de`` for planted genes
(|true LFC| > 1 against |true LFC| < 0.3), the number of FDR calls and the LFC correlation.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

import cellvi
from cellvi.model import SCVI
from cellvi.simulate import true_pairwise_log2fc


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    ranks = np.argsort(np.argsort(scores)) + 1
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-cells", type=int, default=2_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=150)
    args = parser.parse_args()
    adata = cellvi.data.simulate(
        n_cells=args.n_cells, n_genes=args.n_genes, n_batches=2, n_cell_types=5, seed=0
    )
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata)
    with cellvi.settings.override(logging_dir=tempfile.mkdtemp(), progress_bar_style="none"):
        model.train(max_epochs=args.epochs, save_resume_checkpoint=False)
    lfc = true_pairwise_log2fc(adata, "type_0", "type_1")
    de, null = (lfc.abs() > 1).to_numpy(), (lfc.abs() < 0.3).to_numpy()
    keep = de | null
    seconds = {}
    for weights in ("uniform", "importance"):
        start = time.perf_counter()
        table = model.differential_expression(
            groupby="cell_type", group1="type_0", group2="type_1", mode="change", weights=weights
        ).loc[lfc.index]
        seconds[weights] = time.perf_counter() - start
        score = auroc(table["proba_de"].to_numpy()[keep], de[keep])
        corr = np.corrcoef(table["lfc_mean"], lfc)[0, 1]
        print(
            f"{weights:10s} {seconds[weights]:8.2f} s  AUROC {score:.3f}  "
            f"FDR calls {int(table['is_de_fdr_0.05'].sum())}  LFC correlation {corr:.3f}"
        )
    print(f"importance / uniform time: {seconds['importance'] / seconds['uniform']:.0f}x")


if __name__ == "__main__":
    main()
