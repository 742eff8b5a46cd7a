"""Inference speed and DE accuracy: cellvi vs scvi-tools on the same simulated data.

Run: python benchmarks/bench_inference.py --n-cells 20000 --scvi-python /path/venv/bin/python
Both models (same architecture) are trained for --epochs, then timed on: latent space,
normalized expression (dense DataFrame) and one-vs-rest DE (change mode) for one group.
scvi-tools runs in its own interpreter as a server that times one call per request, so the
two libraries' calls alternate (cellvi, scvi, cellvi, scvi, ...; --rounds of each) and the
machine's drifts hit both alike; the fastest call of each is reported. DE accuracy is the
AUROC of proba_de for planted markers of type_0 (|true LFC| > 1) against null genes
(|true LFC| < 0.3). Prints seconds, ratios and AUROCs, and for each call the growth of the
process's peak RSS above its RSS before the call (Linux: the peak is reset through
/proc/self/clear_refs), next to the size of the returned result: memory that does not balloon
beyond the result shows as a growth close to it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import cellvi
from cellvi.model import SCVI

SCVI_SCRIPT = r"""
import json, sys, time, anndata, scvi, numpy as np
path, epochs, accelerator = sys.argv[1], int(sys.argv[2]), sys.argv[3]
exec(sys.argv[4])  # the memory helpers below, shared with cellvi's side
adata = anndata.read_h5ad(path)
scvi.settings.seed = 0
scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
model = scvi.model.SCVI(adata, n_hidden=128, n_latent=10)
model.train(max_epochs=epochs, enable_progress_bar=False, plan_kwargs={"n_epochs_kl_warmup": 5},
            accelerator=accelerator)
calls = {
    "latent": model.get_latent_representation,
    "normalized": model.get_normalized_expression,
    "de": lambda: model.differential_expression(
        groupby="cell_type", group1="type_0", mode="change", silent=True),
}
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:  # one timed call per request
    key = line.strip()
    start_rss = reset_peak()
    t = time.perf_counter(); result = calls[key](); dt = time.perf_counter() - t
    out = {"seconds": dt, "growth_mib": peak_mib() - start_rss}
    if key == "de":
        out["proba_de"] = result["proba_de"].to_dict()
    print(json.dumps(out), flush=True)
"""


def _status(key):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak():
    """Restart the peak RSS from the current RSS (Linux); returns the current RSS in MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return _status("VmRSS")


def peak_mib():
    return _status("VmHWM")


# the same helpers for the scvi-tools interpreter
MEMORY = "\n".join(inspect.getsource(f) for f in (_status, reset_peak, peak_mib))


class ScviServer:
    """scvi-tools in its own interpreter, timing one call per request."""

    def __init__(self, python: str, data: Path, epochs: int, accelerator: str):
        self.proc = subprocess.Popen(
            [python, "-c", SCVI_SCRIPT, str(data), str(epochs), accelerator, MEMORY],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._read()  # trained and ready

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"scvi-tools exited with code {self.proc.wait()}")

    def time(self, key: str) -> dict:
        self.proc.stdin.write(key + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def auroc(scores: pd.Series, lfc: pd.Series) -> float:
    de, null = lfc.abs() > 1, lfc.abs() < 0.3
    s = scores.loc[lfc.index][de | null]
    ranks = s.rank().to_numpy()
    pos = de[de | null].to_numpy()
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-cells", type=int, default=20_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scvi-python", default=None)
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument(
        "--library-size",
        type=float,
        default=1000.0,
        help="mean library size of the simulated cells (1000: 31%% nonzero, 500: 19%%)",
    )
    args = parser.parse_args()
    adata = cellvi.data.simulate(
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        n_batches=2,
        n_cell_types=5,
        library_size_log_mean=float(np.log(args.library_size)),
        seed=0,
    )
    lfc = adata.varm["true_lfc"]["type_0"]
    tmp = Path(tempfile.mkdtemp())
    server = None
    if args.scvi_python:
        adata.copy().write_h5ad(tmp / "data.h5ad")  # before cellvi registers anything
        server = ScviServer(args.scvi_python, tmp / "data.h5ad", args.epochs, args.accelerator)
    with cellvi.settings.override(progress_bar_style="none", logging_dir=tmp / "runs"):
        SCVI.setup_anndata(adata, batch_key="batch")
        model = SCVI(adata, n_hidden=128, n_latent=10)
        model.train(
            max_epochs=args.epochs,
            plan_kwargs={"n_epochs_kl_warmup": 5},
            save_resume_checkpoint=False,
            accelerator=args.accelerator,
        )
    calls = {
        "latent": model.get_latent_representation,
        "normalized": model.get_normalized_expression,
        "de": lambda: model.differential_expression(
            groupby="cell_type", group1="type_0", mode="change"
        ),
    }
    ours = {key: float("inf") for key in calls}
    theirs = {key: float("inf") for key in calls}
    growth = {("cellvi", key): 0.0 for key in calls} | {("scvi", key): 0.0 for key in calls}
    results = {}
    for _ in range(args.rounds):
        for key, call in calls.items():
            results.pop(key, None)  # the previous round's result is not counted twice
            start_rss = reset_peak()
            start = time.perf_counter()
            results[key] = call()
            ours[key] = min(ours[key], time.perf_counter() - start)
            grown = peak_mib() - start_rss
            growth["cellvi", key] = max(growth["cellvi", key], grown)
            if server is not None:
                reply = server.time(key)
                theirs[key] = min(theirs[key], reply["seconds"])
                growth["scvi", key] = max(growth["scvi", key], reply["growth_mib"])
                if key == "de":
                    theirs_proba = pd.Series(reply["proba_de"])
    density = adata.X.nnz / (adata.n_obs * adata.n_vars)
    row = {"n_cells": args.n_cells, "nonzero": round(density, 3)}
    row |= {f"cellvi_{k}": round(v, 3) for k, v in ours.items()}
    row["cellvi_auroc"] = round(auroc(results["de"]["proba_de"], lfc), 4)
    for key, result in results.items():
        size = result.nbytes if hasattr(result, "nbytes") else result.memory_usage().sum()
        row[f"result_{key}_mib"] = round(size / 2**20, 1)
        row[f"cellvi_{key}_peak_growth_mib"] = round(growth["cellvi", key], 1)
    if server is not None:
        server.close()
        for key in calls:
            row[f"scvi_{key}"] = round(theirs[key], 3)
            row[f"speedup_{key}"] = round(theirs[key] / ours[key], 2)
            row[f"scvi_{key}_peak_growth_mib"] = round(growth["scvi", key], 1)
        row["scvi_auroc"] = round(auroc(theirs_proba, lfc), 4)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
