"""``cellvi validate OUTPUT_DIR``: score a finished run against ground truth and check it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["validate_run"]


def validate_run(out_dir: str | Path, *, rerun: bool = False) -> dict:
    """Scores (when the data carry simulated truth) and health checks of a finished run.

    Health: the saved model reloads and reproduces the stored latent space; the monitored
    loss went down; with ``rerun``, the run's resolved config is run again with the same seed
    in a temporary folder and must reproduce the latent space. Writes ``validate.json`` and
    returns the report (``"healthy"`` key).
    """
    import anndata
    import pandas as pd

    from ..analysis import (
        adjusted_rand_index,
        batch_mixing,
        kmeans,
        knn_label_accuracy,
        normalized_mutual_info,
    )
    from ..model import SCANVI, SCVI
    from ..model._save_load import load_registry

    out = Path(out_dir)
    _check_finished(out)
    adata = anndata.read_h5ad(out / "adata.h5ad")
    data = adata
    if adata.X is None:  # the counts were read from disk and not copied: reopen the input
        from ._run import _load_input

        data = _load_input(json.loads((out / "config.resolved.json").read_text())["config"])
    name = load_registry(out / "model")["model_name"]
    model = (SCANVI if name == "SCANVI" else SCVI).load(out / "model", adata=data)
    report: dict = {"checks": {}, "scores": {}}
    z = model.get_latent_representation()
    if "X_scVI" in adata.obsm:
        diff = float(np.abs(z - adata.obsm["X_scVI"]).max())
        report["checks"]["reload_reproduces_latent"] = {"max_abs_diff": diff, "ok": diff < 1e-4}
    hist = model.history
    metric = "elbo_validation" if "elbo_validation" in hist else "elbo_train"
    if metric in hist and len(hist[metric]) > 1:
        values = hist[metric][metric]
        report["checks"]["loss_decreased"] = {
            "metric": metric,
            "first": float(values.iloc[0]),
            "last": float(values.iloc[-1]),
            "ok": bool(values.iloc[-1] < values.iloc[0]),
        }
    if "simulation" in adata.uns and "cell_type" in adata.obs:
        types = adata.obs["cell_type"].to_numpy()
        clusters = kmeans(z, len(np.unique(types)))
        report["scores"].update(
            knn_cell_type_accuracy=knn_label_accuracy(z, types),
            ari=adjusted_rand_index(types, clusters),
            nmi=normalized_mutual_info(types, clusters),
        )
        if "batch" in adata.obs and adata.obs["batch"].nunique() > 1:
            report["scores"]["batch_mixing"] = batch_mixing(z, adata.obs["batch"].to_numpy(), types)
        de_path = out / "de.csv"
        if de_path.exists():
            table = pd.read_csv(de_path, index_col=0)
            if "group1" in table and "proba_de" in table:
                g1 = table["group1"].iloc[0]
                if g1 in adata.varm["true_lfc"]:
                    sub = table[table["group1"] == g1]
                    lfc = adata.varm["true_lfc"][g1].loc[sub.index]
                    de, null = lfc.abs() > 1, lfc.abs() < 0.3
                    s = sub["proba_de"][de | null].rank().to_numpy()
                    pos = de[de | null].to_numpy()
                    n_pos, n_neg = pos.sum(), (~pos).sum()
                    if n_pos and n_neg:
                        report["scores"]["de_auroc"] = float(
                            (s[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
                        )
    if rerun and "X_scVI" in adata.obsm:
        report["checks"]["rerun_reproduces_latent"] = _rerun(out, adata.obsm["X_scVI"])
    report["healthy"] = all(c["ok"] for c in report["checks"].values())
    (out / "validate.json").write_text(json.dumps(report, indent=2))
    return report


def _rerun(out: Path, latent: np.ndarray) -> dict:
    import copy
    import tempfile

    import anndata

    from ._run import run_config

    if not (out / "config.resolved.json").exists():
        raise ValueError(
            f"--rerun needs {out / 'config.resolved.json'}, which `cellvi run` writes (this "
            "folder was not written by `cellvi run`, e.g. by `cellvi quickstart`)."
        )
    resolved = json.loads((out / "config.resolved.json").read_text())
    config = copy.deepcopy(resolved["config"])
    with tempfile.TemporaryDirectory() as tmp:
        config["outputs"] = {**config["outputs"], "dir": tmp, "de": None, "reference_mapping": None}
        run_config(config, source="validate --rerun")
        again = anndata.read_h5ad(Path(tmp) / "adata.h5ad").obsm["X_scVI"]
    if again.shape != latent.shape:  # the input file changed since the run
        return {"ok": False, "shape": list(again.shape), "stored_shape": list(latent.shape)}
    diff = float(np.abs(again - latent).max())
    return {"max_abs_diff": diff, "ok": diff < 1e-5}


def _check_finished(out: Path) -> None:
    """A clear error for a folder that is not the output of a finished ``cellvi run``."""
    if not out.is_dir():
        raise ValueError(f"{out} is not a folder; pass the [outputs] dir of a `cellvi run`.")
    state_file = out / "state.json"  # written by `cellvi run` (not by `cellvi quickstart`)
    done = json.loads(state_file.read_text()) if state_file.exists() else {}
    missing = [name for name in ("adata.h5ad", "model") if not (out / name).exists()]
    if missing == ["model"] and done.get("outputs"):
        resolved = out / "config.resolved.json"
        config = json.loads(resolved.read_text())["config"] if resolved.exists() else {}
        if config.get("outputs", {}).get("save_model") is False:
            raise ValueError(
                f"{out} was run with [outputs].save_model = false, so there is no model to "
                "check; run it again with save_model = true to validate it."
            )
    if missing or (state_file.exists() and not done.get("outputs")):
        finished = ", ".join(sorted(k for k, v in done.items() if v is True)) or "none"
        raise ValueError(
            f"{out} holds no finished run (missing: {', '.join(missing) or 'the final outputs'};"
            f" finished steps: {finished}). Finish it with `cellvi run WORKFLOW.toml --resume`"
            " and validate again."
        )
