"""The documented R example runs with Rscript and reticulate (skipped when R is absent)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "r" / "scvi_from_r.R"


def _has_reticulate() -> bool:
    if shutil.which("Rscript") is None:
        return False
    check = subprocess.run(["Rscript", "-e", "library(reticulate)"], capture_output=True)
    return check.returncode == 0


@pytest.mark.skipif(not _has_reticulate(), reason="R with reticulate is not installed")
def test_r_example_trains_and_returns_the_latent_space(tmp_path):
    env = dict(os.environ, RETICULATE_PYTHON=sys.executable, CELLVI_LOGGING_DIR=str(tmp_path))
    out = tmp_path / "latent.csv"
    result = subprocess.run(
        ["Rscript", str(EXAMPLE), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(out, index_col=0)
    latent = table.filter(like="X").to_numpy()
    assert latent.shape == (400, 5)
    # the planted B-cell markers separate the two types in the latent space
    t_mean = latent[table["cell_type"] == "T"].mean(0)
    b_mean = latent[table["cell_type"] == "B"].mean(0)
    spread = latent.std(0).mean()
    assert np.linalg.norm(t_mean - b_mean) > spread
