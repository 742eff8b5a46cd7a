"""Command-line edge cases: user errors as one-line messages, reusable folders, paths, flags."""

from __future__ import annotations

import json
import shutil
import warnings

import anndata
import pytest
from _workflows import write_data, write_workflow

import cellvi
from cellvi.cli import main
from cellvi.cli._schema import ConfigError, load_workflow


def _data(path, n_cells=300):
    return write_data(path, n_cells, 60)


def _workflow(tmp_path, *, input_path=None, setup='batch_key = "batch"', train="", outputs=""):
    data = input_path or _data(tmp_path / "data.h5ad").as_posix()
    return write_workflow(
        tmp_path,
        data,
        model="n_hidden = 16\nn_latent = 4",
        setup=setup,
        train=train,
        outputs=outputs,
    )


def test_a_data_error_leaves_no_folder_and_the_fixed_workflow_reruns(tmp_path, capsys):
    path = _workflow(tmp_path, setup='batch_key = "batchx"')
    assert main(["run", str(path)]) == 2
    assert "'batchx' not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # a failure inside training (nothing finished) does not block the fixed rerun either
    path = _workflow(tmp_path, train="early_stopping = true\nearly_stopping_patience = 0")
    assert main(["run", str(path)]) == 2
    assert "early_stopping_patience=0" in capsys.readouterr().err
    path.write_text(path.read_text().replace("early_stopping_patience = 0", ""))
    assert main(["run", str(path)]) == 0  # without --resume
    assert json.loads((tmp_path / "out" / "state.json").read_text())["outputs"]
    assert main(["run", str(path)]) == 2  # a finished run is still protected
    assert "use --resume" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["input_not_anndata", "workflow_is_folder", "dir_is_file"])
def test_unusable_paths_are_one_line_errors(tmp_path, capsys, case):
    if case == "input_not_anndata":
        (tmp_path / "counts.csv").write_text("a,b\n1,2\n")
        path = _workflow(tmp_path, input_path=(tmp_path / "counts.csv").as_posix())
        argv, message = ["run", str(path)], "could not be read as an .h5ad file or .zarr store"
    elif case == "workflow_is_folder":
        argv, message = ["run", str(tmp_path)], "is a folder; pass the workflow .toml"
    else:
        path = _workflow(tmp_path)
        (tmp_path / "out").write_text("not a folder")
        argv, message = ["run", str(path)], "is a file; name a folder"
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_relative_paths_are_resolved_so_validate_works_from_any_folder(tmp_path, monkeypatch):
    run_dir, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    run_dir.mkdir()
    elsewhere.mkdir()
    _data(run_dir / "data.h5ad")
    (run_dir / "wf.toml").write_text(
        '[input]\npath = "data.h5ad"\nbacked = true\n[setup]\nbatch_key = "batch"\n'
        '[model]\nn_hidden = 16\nn_latent = 4\n[train]\nmax_epochs = 2\n[outputs]\ndir = "out"\n'
    )
    monkeypatch.chdir(run_dir)
    assert main(["run", "wf.toml"]) == 0
    resolved = json.loads((run_dir / "out" / "config.resolved.json").read_text())
    assert resolved["config"]["input"]["path"] == str(run_dir / "data.h5ad")
    monkeypatch.chdir(elsewhere)  # validate reopens the counts left on disk
    assert main(["validate", str(run_dir / "out")]) == 0
    report = json.loads((run_dir / "out" / "validate.json").read_text())
    assert report["checks"]["reload_reproduces_latent"]["ok"]
    assert "knn_cell_type_accuracy" in report["scores"]  # the truth is kept in adata.h5ad


def test_a_zarr_store_is_read_without_backed(tmp_path):
    with warnings.catch_warnings():  # anndata/zarr format-transition notices, not ours
        warnings.simplefilter("ignore", UserWarning)
        anndata.read_h5ad(_data(tmp_path / "data.h5ad")).write_zarr(tmp_path / "data.zarr")
    path = _workflow(tmp_path, input_path=(tmp_path / "data.zarr").as_posix())
    assert main(["run", str(path)]) == 0
    assert anndata.read_h5ad(tmp_path / "out" / "adata.h5ad").obsm["X_scVI"].shape == (300, 4)


def test_scanvi_arguments_of_the_python_api_pass_the_config_check(tmp_path):
    scanvi = {"setup": 'labels_key = "cell_type"\nunlabeled_category = "Unknown"'}
    path = _workflow(tmp_path, train="n_samples_per_label = 20", **scanvi)
    path.write_text(
        path.read_text().replace("[model]", '[model]\nname = "SCANVI"\nlinear_classifier = true')
    )
    config = load_workflow(path)
    assert config["model"]["linear_classifier"] and config["train"]["n_samples_per_label"] == 20
    bad = path.read_text().replace(
        "n_samples_per_label = 20", "plan_kwargs = { classification_ratio = -1.0 }"
    )
    path.write_text(bad)
    with pytest.raises(ConfigError, match="classification_ratio=-1.0 must be"):
        load_workflow(path)  # refused before the run folder is created
    with pytest.raises(ConfigError, match="unknown key \\[model\\].linear_classifier"):
        path.write_text(bad.replace('name = "SCANVI"\n', ""))
        load_workflow(path)  # SCVI has no classifier


def test_save_model_false_keeps_no_model_and_validate_says_why(tmp_path, capsys):
    path = _workflow(tmp_path, outputs="save_model = false")
    assert main(["run", str(path)]) == 0
    out = tmp_path / "out"
    assert (out / "adata.h5ad").exists() and not (out / "model").exists()
    assert main(["validate", str(out)]) == 2
    assert "save_model = false" in capsys.readouterr().err


def test_validate_rerun_needs_the_resolved_config_and_notices_changed_input(tmp_path, capsys):
    path = _workflow(tmp_path)
    assert main(["run", str(path)]) == 0
    out, copy = tmp_path / "out", tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "config.resolved.json").unlink()
    assert main(["validate", str(copy), "--rerun"]) == 2
    assert "--rerun needs" in capsys.readouterr().err
    _data(tmp_path / "data.h5ad", n_cells=200)  # the input file was replaced since the run
    assert main(["validate", str(out), "--rerun"]) == 1
    check = json.loads((out / "validate.json").read_text())["checks"]["rerun_reproduces_latent"]
    assert check == {"ok": False, "shape": [200, 4], "stored_shape": [300, 4]}


def test_simulate_keeps_an_existing_file_and_fits_markers_to_few_genes(tmp_path, capsys):
    path = tmp_path / "sim.h5ad"
    assert main(["simulate", str(path), "--n-cells", "50", "--n-genes", "30"]) == 0
    assert int(anndata.read_h5ad(path).var["is_de"].sum()) == 30  # 10 markers x 3 types
    assert main(["simulate", str(path), "--n-cells", "60"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert anndata.read_h5ad(path).n_obs == 50
    args = ["simulate", str(path), "--n-cells", "60", "--n-genes", "30", "--overwrite"]
    assert main([*args, "--n-de-genes-per-type", "2"]) == 0
    assert anndata.read_h5ad(path).shape == (60, 30)


def test_quickstart_with_few_genes_simulates_markers_that_fit(tmp_path, monkeypatch):
    seen = {}
    real = cellvi.data.simulate

    def simulate_then_stop(**kwargs):
        seen["adata"] = real(**kwargs)
        raise KeyboardInterrupt  # the data are all this test needs; no training

    monkeypatch.setattr(cellvi.data, "simulate", simulate_then_stop)
    # (the command ends an interrupt with a message and exit status 130)
    assert (
        main(["quickstart", "--out", str(tmp_path / "qs"), "--n-cells", "60", "--n-genes", "60"])
        == 130
    )
    assert seen["adata"].shape == (60, 60) and int(seen["adata"].var["is_de"].sum()) == 60


def test_python_dash_m_cellvi_is_the_command_line():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "cellvi", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "quickstart" in done.stdout and "simulate" in done.stdout


def test_train_settings_of_the_python_api_are_accepted_and_checked(tmp_path):
    train = (
        "gradient_clip_val = 1\nearly_stopping = true\nearly_stopping_min_delta = 0.5\n"
        'early_stopping_mode = "min"\nload_best_on_end = true\nenable_checkpointing = true\n'
        'checkpointing_monitor = "elbo_validation"\nshuffle_set_split = false\n'
        "deterministic = true"
    )
    config = load_workflow(_workflow(tmp_path, train=train))
    assert config["train"]["gradient_clip_val"] == 1
    for bad, message in (
        ("gradient_clip_val = -1.0", "gradient_clip_val=-1.0 must be a finite number >= 0"),
        ('early_stopping_mode = "up"', "early_stopping_mode='up': use 'min' or 'max'"),
        ("early_stopping_min_delta = nan", "early_stopping_min_delta=nan must be a finite"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_workflow(_workflow(tmp_path, train=bad))


def test_train_settings_from_the_workflow_reach_training(tmp_path):
    path = _workflow(tmp_path, train="gradient_clip_val = 0.5\nshuffle_set_split = false")
    assert main(["run", str(path)]) == 0
    adata = anndata.read_h5ad(tmp_path / "data.h5ad")
    model = cellvi.model.SCVI.load(tmp_path / "out" / "model", adata=adata)
    # not shuffled: validation cells first, then training cells (as in scvi-tools)
    assert model.validation_indices.max() < model.train_indices.min()
