"""Script mode, third probe: resuming a run whose model was not saved, an edited workflow on
--resume, integer unlabeled categories, and advice that fits a workflow."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import anndata
import numpy as np
import pytest
from _workflows import write_mapping_data

import cellvi
from cellvi.cli import main


def _mapping_workflow(tmp_path, extra_outputs=""):
    write_mapping_data(tmp_path)
    workflow = tmp_path / "map.toml"
    workflow.write_text(f"""
[input]
path = "{(tmp_path / "ref.h5ad").as_posix()}"
[setup]
batch_key = "batch"
[model]
n_hidden = 16
n_latent = 4
[train]
max_epochs = 3
seed = 3
[outputs]
dir = "{(tmp_path / "out").as_posix()}"
latent = true
save_model = false
reference_mapping = {{ query = "{(tmp_path / "query.h5ad").as_posix()}", max_epochs = 2 }}
{extra_outputs}""")
    return workflow


def test_a_run_without_a_saved_model_resumes_after_its_query_was_interrupted(tmp_path):
    workflow = _mapping_workflow(tmp_path)
    assert main(["run", str(workflow)]) == 0
    out = tmp_path / "out"
    first = anndata.read_h5ad(out / "adata.h5ad").obsm["X_scVI"]
    # as if stopped during the query's training: the reference's steps are done
    state = json.loads((out / "state.json").read_text())
    for step in ("reference_mapping", "outputs"):
        state.pop(step)
    (out / "state.json").write_text(json.dumps(state))
    (out / "adata.h5ad").unlink()
    assert main(["run", str(workflow), "--resume"]) == 0
    # the reference comes back from its own checkpoint (not the query's), not retrained
    np.testing.assert_array_equal(anndata.read_h5ad(out / "adata.h5ad").obsm["X_scVI"], first)
    assert (out / "query_adata.h5ad").exists()


def test_resume_refuses_an_edited_workflow(tmp_path, capsys):
    workflow = _mapping_workflow(tmp_path)
    assert main(["run", str(workflow)]) == 0
    recorded = (tmp_path / "out" / "config.resolved.json").read_text()
    workflow.write_text(workflow.read_text().replace("seed = 3", "seed = 4"))
    assert main(["run", str(workflow), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "workflow was edited since: [train].seed (3 there, 4 now)" in err
    assert (tmp_path / "out" / "config.resolved.json").read_text() == recorded


def _labels_workflow(tmp_path, unlabeled, model="SCANVI"):
    adata = cellvi.data.simulate(
        n_cells=200, n_genes=40, n_batches=2, n_cell_types=2, n_de_genes_per_type=5, seed=0
    )
    codes = adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    codes[::4] = -1
    adata.obs["cluster"] = codes
    adata.write_h5ad(tmp_path / "d.h5ad")
    workflow = tmp_path / "wf.toml"
    workflow.write_text(f"""
[input]
path = "{(tmp_path / "d.h5ad").as_posix()}"
[setup]
batch_key = "batch"
labels_key = "cluster"
unlabeled_category = {unlabeled}
[model]
name = "{model}"
n_hidden = 16
n_latent = 4
[train]
max_epochs = 2
[outputs]
dir = "{(tmp_path / "out").as_posix()}"
predictions = {"true" if model == "SCANVI" else "false"}
""")
    return workflow


def test_an_integer_unlabeled_category_sets_up_integer_labels(tmp_path):
    assert main(["run", str(_labels_workflow(tmp_path, -1))]) == 0
    predicted = anndata.read_h5ad(tmp_path / "out" / "adata.h5ad").obs["cellvi_prediction"]
    assert set(map(str, predicted.unique())) <= {"0", "1"}


def test_a_string_for_integer_labels_says_what_to_write(tmp_path, capsys):
    assert main(["run", str(_labels_workflow(tmp_path, '"-1"'))]) == 2
    err = capsys.readouterr().err
    assert "pass unlabeled_category=-1" in err
    assert "setup_anndata arguments go in [setup]" in err


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (
            lambda w: w.replace('name = "SCANVI"', 'name = "SCVI"').replace("= true", "= false"),
            "is a SCANVI setting",
        ),
        (
            lambda w: w.replace('path = "', 'paths = [3]\n# "'),
            "[input].paths must be a list of file names",
        ),
        (
            lambda w: re.sub(r'\[input\]\npath = "[^"]*"', "[input.simulate]\nn_batches = 0", w),
            "[input.simulate]: n_batches=0 is invalid",
        ),
    ],
)
def test_workflow_mistakes_are_named_in_workflow_terms(tmp_path, capsys, edit, said):
    workflow = _labels_workflow(tmp_path, -1)
    workflow.write_text(edit(workflow.read_text()))
    assert main(["run", str(workflow)]) == 2
    err = capsys.readouterr().err
    assert said in err
    assert "write the result" not in err  # no advice to fix a data file


@pytest.mark.parametrize(
    ("train", "said"),
    [
        ("datasplitter_kwargs = { numworkers = 1 }", "datasplitter_kwargs has argument(s)"),
        ('strategy = "ddpp"', "invalid strategy name"),
        ('precision = "17"', "Precision '17' is invalid"),
        (
            'early_stopping = true\nearly_stopping_monitor = "elbo_valdation"',
            "'elbo_valdation' is never logged",
        ),
        ("plan_kwargs = { loss_kwargs = { bogus = 1 } }", "['bogus']"),
    ],
)
def test_check_runs_the_training_checks_and_writes_nothing(tmp_path, capsys, train, said):
    workflow = _labels_workflow(tmp_path, -1)
    workflow.write_text(workflow.read_text().replace("max_epochs = 2", f"max_epochs = 2\n{train}"))
    assert main(["run", str(workflow), "--check"]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cellvi_log").exists()


def test_check_passes_a_good_workflow_without_training(tmp_path, capsys):
    workflow = _labels_workflow(tmp_path, -1)
    assert main(["run", str(workflow), "--check"]) == 0
    assert "ready to run" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_after_training_ends_with_a_message_and_resume_finishes(
    tmp_path, capsys, monkeypatch, signum, code
):
    from cellvi.model import SCVI

    workflow = _mapping_workflow(tmp_path)
    workflow.write_text(
        workflow.read_text()
        .replace("save_model = false", "save_model = true")
        .replace("latent = true", 'latent = true\nde = { groupby = "batch" }')
    )
    real = SCVI.differential_expression

    def stopped(self, *args, **kwargs):  # the signal arrives while DE runs
        os.kill(os.getpid(), signum)
        time.sleep(5)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SCVI, "differential_expression", stopped)
    assert main(["run", str(workflow)]) == code
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert f"interrupted by {name}; the steps finished so far are kept" in err
    assert "--resume` finishes it" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was removed
    monkeypatch.undo()
    assert main(["run", str(workflow), "--resume"]) == 0
    assert (tmp_path / "out" / "de.csv").exists()


def test_train_takes_lightning_arguments_and_run_switches(tmp_path, capsys):
    workflow = _labels_workflow(tmp_path, -1)
    extra = (
        "enable_progress_bar = false\nsave_resume_checkpoint = false\n"
        "adversarial_classifier = false\ntrainer_kwargs = { max_steps = 3 }"
    )
    workflow.write_text(workflow.read_text().replace("max_epochs = 2", f"max_epochs = 2\n{extra}"))
    assert main(["run", str(workflow)]) == 0
    assert not list((tmp_path / "out" / "runs").glob("*/checkpoints/last.ckpt"))
    bad = workflow.read_text().replace("max_steps = 3", "max_stepz = 3")
    workflow.write_text(bad.replace('dir = "', 'dir = "other_'))
    assert main(["run", str(workflow), "--check"]) == 2
    assert "max_stepz" in capsys.readouterr().err
