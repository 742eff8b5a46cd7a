"""Workflow files for the command-line tests: simulated input data and a TOML around it."""

from __future__ import annotations

from pathlib import Path

import cellvi


def write_data(path: Path, n_cells: int, n_genes: int) -> Path:
    """Simulated counts (2 batches, 3 cell types, seed 0) written to ``path``."""
    cellvi.data.simulate(
        n_cells=n_cells, n_genes=n_genes, n_batches=2, n_cell_types=3, n_de_genes_per_type=5, seed=0
    ).write_h5ad(path)
    return path


def write_workflow(
    tmp_path: Path,
    data: str,
    *,
    model: str,
    setup: str = 'batch_key = "batch"',
    train: str = "",
    outputs: str = "",
    out: str | None = None,
) -> Path:
    """``tmp_path/wf.toml`` reading ``data``: 2 epochs, output in ``out`` (``tmp_path/out``)."""
    out = out or (tmp_path / "out").as_posix()
    path = tmp_path / "wf.toml"
    path.write_text(
        f'[input]\npath = "{data}"\n[setup]\n{setup}\n[model]\n{model}\n'
        f"[train]\nmax_epochs = 2\n{train}\n"
        f'[outputs]\ndir = "{out}"\n{outputs}\n'
    )
    return path


def write_mapping_data(tmp_path: Path) -> tuple[Path, Path]:
    """A reference (batches 0 and 1) and a query (batch 2) of 400 simulated cells (seed 9),
    written to ``tmp_path/ref.h5ad`` and ``tmp_path/query.h5ad``."""
    full = cellvi.data.simulate(
        n_cells=400, n_genes=60, n_batches=3, n_cell_types=2, n_de_genes_per_type=8, seed=9
    )
    ref, query = tmp_path / "ref.h5ad", tmp_path / "query.h5ad"
    full[full.obs["batch"] != "batch_2"].copy().write_h5ad(ref)
    full[full.obs["batch"] == "batch_2"].copy().write_h5ad(query)
    return ref, query
