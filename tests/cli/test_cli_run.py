"""The command line, driven as a user would: subprocesses, config errors, interrupt and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from _workflows import write_mapping_data

from cellvi.cli import main

WORKFLOW = """
[input.simulate]
n_cells = 300
n_genes = 60
n_cell_types = 3
n_de_genes_per_type = 8
seed = 2

[setup]
batch_key = "batch"

[model]
n_hidden = 32
n_latent = 5

[train]
max_epochs = {epochs}
seed = 0
check_val_every_n_epoch = 1
plan_kwargs = {{ n_epochs_kl_warmup = 5 }}

[outputs]
dir = "{out}"
latent = true
de = {{ groupby = "cell_type", group1 = "type_0", mode = "change", n_samples_overall = 500 }}
"""


def _write(tmp_path, epochs=8, **replace):
    text = WORKFLOW.format(epochs=epochs, out=(tmp_path / "out").as_posix())
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "wf.toml"
    path.write_text(text)
    return path


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "cellvi.cli", *args], capture_output=True, text=True, env=env
    )


def test_run_then_validate(tmp_path, capsys):
    assert main(["run", str(_write(tmp_path, epochs=40))]) == 0
    out = tmp_path / "out"
    for name in ("model/model.pt", "adata.h5ad", "de.csv", "config.resolved.json", "state.json"):
        assert (out / name).exists(), name
    resolved = json.loads((out / "config.resolved.json").read_text())
    assert resolved["versions"]["cellvi"] and resolved["config"]["train"]["max_epochs"] == 40
    assert main(["validate", str(out), "--rerun"]) == 0
    report = json.loads((out / "validate.json").read_text())
    assert report["healthy"] and report["checks"]["reload_reproduces_latent"]["ok"]
    assert report["checks"]["rerun_reproduces_latent"]["max_abs_diff"] == 0.0
    assert report["checks"]["loss_decreased"]["ok"]
    # 3 planted types, 8 markers each among 60 genes: 40 epochs separate them well
    assert report["scores"]["knn_cell_type_accuracy"] > 0.8
    # 120 optimiser steps are too few for sharp DE; the score is computed and reported
    assert 0.0 <= report["scores"]["de_auroc"] <= 1.0
    assert not list(out.glob(".*tmp-*"))  # every output went through a temporary sibling


def test_a_failed_output_write_leaves_no_partial_file_and_resume_completes(tmp_path, monkeypatch):
    import anndata

    def half_write(self, filename, *args, **kwargs):
        with open(filename, "wb") as fh:
            fh.write(b"\x89HDF\r\n")  # the start of an HDF5 file, then the disk is full
        raise OSError("No space left on device")

    path, out = _write(tmp_path, epochs=5), tmp_path / "out"
    monkeypatch.setattr(anndata.AnnData, "write_h5ad", half_write)
    with pytest.raises(OSError, match="No space left"):
        main(["run", str(path)])
    assert not (out / "adata.h5ad").exists() and not list(out.glob(".*tmp-*"))
    state = json.loads((out / "state.json").read_text())
    assert state.get("train") and state.get("de") and not state.get("outputs")
    monkeypatch.undo()
    assert main(["run", str(path), "--resume"]) == 0
    assert anndata.read_h5ad(out / "adata.h5ad").obsm["X_scVI"].shape == (300, 5)


def test_validate_of_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_bad_config_names_the_key_and_suggests(tmp_path):
    path = _write(tmp_path, **{"max_epochs =": "max_epoch ="})
    result = _cli("run", str(path))
    assert result.returncode == 2
    assert "unknown key [train].max_epoch" in result.stderr and "max_epochs" in result.stderr


def test_wrong_type_names_the_field(tmp_path):
    path = _write(tmp_path, **{"n_latent = 5": 'n_latent = "five"'})
    result = _cli("run", str(path))
    assert result.returncode == 2 and "[model].n_latent must be int" in result.stderr


def test_missing_input_file_is_refused_before_anything_is_written(tmp_path, capsys):
    missing, out = tmp_path / "counts.h5ad", tmp_path / "out"
    path = tmp_path / "wf.toml"
    path.write_text(
        f'[input]\npath = "{missing.as_posix()}"\n\n[setup]\nbatch_key = "batch"\n\n'
        f'[outputs]\ndir = "{out.as_posix()}"\n'
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "[input] names files that do not exist" in err and "counts.h5ad" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("max_epochs = 8", "max_epochs = 8\nbatch_size = 0", "[train].batch_size must be"),
        ("n_epochs_kl_warmup = 5", 'n_epochs_kl_warmup = 5, lr = "big"', "lr='big' (str) must be"),
        ("n_epochs_kl_warmup = 5", "n_epochs_kl_warmup = 5, lrr = 0.1", "did you mean 'lr'?"),
    ],
)
def test_bad_training_settings_are_refused_before_the_run_folder_exists(
    tmp_path, capsys, old, new, message
):
    assert main(["run", str(_write(tmp_path, **{old: new}))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('groupby = "cell_type"', 'groupby = "celltype"', "groupby='celltype' is not an obs"),
        ('group1 = "type_0"', 'group1 = "type_9"', "No cells in obs['cell_type'] are 'type_9'"),
        ('group1 = "type_0"', 'grop1 = "type_0"', "unknown argument(s) ['grop1']"),
        ('mode = "change"', 'mode = "changes"', "mode='changes': use"),
    ],
)
def test_a_bad_de_request_is_refused_before_training(tmp_path, capsys, old, new, message):
    assert main(["run", str(_write(tmp_path, epochs=40, **{old: new}))]) == 2
    assert message in capsys.readouterr().err
    out = tmp_path / "out"
    assert not (out / "model").exists() and not (out / "runs").exists()


def test_interrupted_run_resumes_without_redoing_finished_epochs(tmp_path, capsys):
    path = _write(tmp_path, epochs=300)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellvi.cli", "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.time() + 120
    history = None
    while time.time() < deadline:
        found = list((tmp_path / "out" / "runs").glob("*/history.csv"))
        if found and len(pd.read_csv(found[0])) >= 3:
            history = found[0]
            break
        time.sleep(0.2)
    assert history is not None, "training did not start"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and b"interrupted by SIGTERM" in err
    # validating the unfinished folder is a clear error that says how to finish it
    assert main(["validate", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "holds no finished run" in message and "--resume" in message
    done_before = len(pd.read_csv(history))
    path.write_text(path.read_text().replace("max_epochs = 300", "max_epochs = 12"))
    if done_before >= 12:
        pytest.skip("the machine trained 12 epochs before the signal arrived")
    result = _cli("run", str(path), "--resume")
    assert result.returncode == 0, result.stderr
    final = pd.read_csv(history)
    assert final["epoch"].tolist() == list(range(12))  # resumed, not restarted


def test_quickstart_writes_model_data_de_and_report(tmp_path):
    pytest.importorskip("matplotlib", reason="the report needs the plot extra")
    out = tmp_path / "qs"
    assert (
        main(
            [
                "quickstart",
                "--out",
                str(out),
                "--n-cells",
                "300",
                "--n-genes",
                "120",
                "--max-epochs",
                "6",
            ]
        )
        == 0
    )
    for name in (
        "model/model.pt",
        "adata.h5ad",
        "de_type_0_vs_rest.csv",
        "summary.json",
        "report.html",
        "training_curves.png",
        "embedding.png",
        "volcano.png",
    ):
        assert (out / name).exists(), name
    page = (out / "report.html").read_text()
    assert 'src="embedding.png"' in page and "knn_cell_type_accuracy" in page
    assert main(["quickstart", "--out", str(out)]) == 2  # refuses to overwrite


def test_simulate_command_writes_truth(tmp_path):
    import anndata

    path = tmp_path / "sim.h5ad"
    assert main(["simulate", str(path), "--n-cells", "120", "--n-genes", "70", "--seed", "4"]) == 0
    adata = anndata.read_h5ad(path)
    assert adata.shape == (120, 70) and "true_lfc" in adata.varm


def test_workflow_maps_a_query_onto_the_trained_reference(tmp_path):
    import anndata

    write_mapping_data(tmp_path)
    workflow = tmp_path / "map.toml"
    workflow.write_text(f"""
[input]
path = "{(tmp_path / "ref.h5ad").as_posix()}"
[setup]
batch_key = "batch"
[model]
n_hidden = 32
n_latent = 4
[train]
max_epochs = 5
[outputs]
dir = "{(tmp_path / "out").as_posix()}"
reference_mapping = {{ query = "{(tmp_path / "query.h5ad").as_posix()}", max_epochs = 3 }}
""")
    assert main(["run", str(workflow)]) == 0
    query = anndata.read_h5ad(tmp_path / "out" / "query_adata.h5ad")
    assert query.obsm["X_scVI"].shape == (query.n_obs, 4)
    assert (tmp_path / "out" / "query_model" / "model.pt").exists()


def test_reference_mapping_needs_a_query(tmp_path):
    path = _write(tmp_path)
    path.write_text(path.read_text() + "\n[outputs.reference_mapping]\nmax_epochs = 3\n")
    result = _cli("run", str(path))
    assert result.returncode == 2 and "needs query" in result.stderr


def test_workflow_trains_from_files_left_on_disk(tmp_path):
    import cellvi

    sim = cellvi.data.simulate(
        n_cells=300, n_genes=60, n_cell_types=3, n_de_genes_per_type=8, seed=2
    )
    sim[:150].copy().write_h5ad(tmp_path / "a.h5ad")
    sim[150:].copy().write_h5ad(tmp_path / "b.h5ad")
    inputs = (
        f'[input]\npaths = ["{(tmp_path / "a.h5ad").as_posix()}", '
        f'"{(tmp_path / "b.h5ad").as_posix()}"]\nlabel = "file"\n'
    )
    path = _write(
        tmp_path,
        epochs=30,
        **{
            "[input.simulate]": inputs,
            "n_cells = 300\n": "",
            "n_genes = 60\n": "",
            "n_cell_types = 3\n": "",
            "n_de_genes_per_type = 8\n": "",
            "seed = 2\n": "",
        },
    )
    assert main(["run", str(path)]) == 0
    out = tmp_path / "out"
    written = pd.read_csv(out / "de.csv", index_col=0)
    assert len(written) == 60
    assert main(["validate", str(out)]) == 0
    report = json.loads((out / "validate.json").read_text())
    assert report["checks"]["reload_reproduces_latent"]["ok"]
    too_big = tmp_path / "too_big.toml"
    too_big.write_text(
        path.read_text().replace("latent = true", "latent = true\nnormalized_expression = true")
    )
    result = _cli("run", str(too_big))
    assert result.returncode == 2 and "normalized_expression" in result.stderr


def test_scanvi_plan_settings_pass_the_config_check(tmp_path):
    from cellvi.cli._schema import ConfigError, load_workflow

    scanvi = {
        "[model]": '[model]\nname = "SCANVI"',
        "[setup]": '[setup]\nlabels_key = "cell_type"\nunlabeled_category = "Unknown"',
        "n_epochs_kl_warmup = 5": "n_epochs_kl_warmup = 5, classification_ratio = 20.0",
    }
    config = load_workflow(_write(tmp_path, **scanvi))
    assert config["train"]["plan_kwargs"]["classification_ratio"] == 20.0
    scvi = {"n_epochs_kl_warmup = 5": "n_epochs_kl_warmup = 5, classification_ratio = 20.0"}
    with pytest.raises(ConfigError, match="unknown argument.*classification_ratio"):
        load_workflow(_write(tmp_path, **scvi))
