"""HTML report with PNG figures for a finished run (needs the ``plot`` extra: matplotlib)."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

__all__ = ["write_report"]


def _embedding_2d(latent: np.ndarray) -> np.ndarray:
    """First two principal components of the latent space (no extra dependency)."""
    centred = latent - latent.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def write_report(out_dir: str | Path, *, adata, model, de_table, summary: dict) -> Path:
    """Write ``report.html`` with training curves, embeddings and a volcano plot.

    Raises ``ImportError`` naming the extra to install when matplotlib is absent.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("The report needs matplotlib: pip install 'cellvi[plot]'") from err
    out = Path(out_dir)
    figures = []

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, style in (("elbo_train", "-"), ("elbo_validation", "--")):
        if name in model.history:
            series = model.history[name][name]
            ax.plot(series.index, series.to_numpy(), style, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO per cell")
    ax.set_title("Training curves")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=110)
    plt.close(fig)
    figures.append(
        ("training_curves.png", "Negative ELBO per cell on training and validation cells.")
    )

    xy = _embedding_2d(adata.obsm["X_scVI"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key in zip(axes, ("batch", "cell_type"), strict=True):
        if key not in adata.obs:
            ax.axis("off")
            continue
        values = adata.obs[key].astype("category")
        for i, cat in enumerate(values.cat.categories):
            sel = (values == cat).to_numpy()
            ax.scatter(xy[sel, 0], xy[sel, 1], s=3, alpha=0.6, label=str(cat), color=f"C{i % 10}")
        ax.set_title(f"Latent space (PCA) by {key}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(markerscale=4, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out / "embedding.png", dpi=110)
    plt.close(fig)
    figures.append(("embedding.png", "First two principal components of the latent space."))

    if de_table is not None and "lfc_mean" in de_table:
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        calls = de_table.filter(like="is_de_fdr").iloc[:, 0].to_numpy(bool)
        ax.scatter(de_table["lfc_mean"], de_table["proba_de"], s=6, c=np.where(calls, "C3", "C7"))
        ax.set_xlabel("posterior mean log2 fold change")
        ax.set_ylabel("P(DE)")
        ax.set_title(f"Volcano: {de_table['comparison'].iloc[0]} ({calls.sum()} calls, red)")
        fig.tight_layout()
        fig.savefig(out / "volcano.png", dpi=110)
        plt.close(fig)
        figures.append(("volcano.png", "Differential expression; red = called at the FDR target."))

    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in summary.items()
    )
    blocks = "".join(
        f'<figure><img src="{name}" alt="{html.escape(text)}"><figcaption>{html.escape(text)}'
        "</figcaption></figure>"
        for name, text in figures
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>cellvi report</title>"
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
        "td{padding:2px 12px}figure{margin:1.5em 0}img{max-width:100%}</style></head><body>"
        f"<h1>cellvi run report</h1><table>{rows}</table>{blocks}</body></html>"
    )
    path = out / "report.html"
    path.write_text(page)
    return path


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
