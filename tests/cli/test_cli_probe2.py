"""Command line, second probe: training failures as one-line errors with exit codes, settings
checked before the run folder exists, key names in every message, the seed recorded."""

from __future__ import annotations

import argparse
import importlib.util
import warnings

import pytest
import torch
from _workflows import write_data, write_workflow

from cellvi.cli import _exit_code, _message, main
from cellvi.cli._schema import load_workflow
from cellvi.train._interrupts import TrainingInterrupted


def _workflow(tmp_path, *, train="", outputs="", out=None):
    data = tmp_path / "data.h5ad"
    if not data.exists():
        write_data(data, 120, 30)
    return write_workflow(
        tmp_path,
        data.as_posix(),
        model="n_hidden = 8\nn_latent = 2",
        train=train,
        outputs=outputs,
        out=out,
    )


def test_a_nan_loss_is_a_one_line_error_with_exit_status_1(tmp_path, capsys):
    path = _workflow(tmp_path, train="plan_kwargs = { lr = 1e6 }")
    assert main(["run", str(path)]) == 1  # it raised NonFiniteLossError with a traceback
    err = capsys.readouterr().err
    assert err.startswith("cellvi run: error: The training loss became NaN/inf")
    assert "Traceback" not in err and "model.train(" not in err
    assert f"cellvi run {path}" in err  # what to run next, not model.train(...)


def test_an_interruption_exits_as_the_signal_and_says_how_to_resume():
    err = TrainingInterrupted("Training was interrupted by SIGTERM.")
    err.add_note("Kept: the weights at the end of epoch 3.")
    err.add_note("To resume exactly where it stopped: model.train(ckpt_path='x')")
    args = argparse.Namespace(command="run", workflow="wf.toml")
    assert _exit_code(err) == 143
    assert _exit_code(TrainingInterrupted("Training was interrupted by SIGINT.")) == 130
    text = _message(err, args)
    assert "epoch 3" in text and "cellvi run wf.toml --resume" in text
    assert "model.train(" not in text


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ("seed = -1", "[train].seed must be in [0, 2**32 - 1] (got -1)"),
        ("train_size = 1.5", "[train]: train_size=1.5 must be in (0, 1]"),
        ("validation_size = 0.5", "[train]: train_size + validation_size = 0.9 + 0.5"),
        ('accelerator = "gpu"', "[train]: accelerator='gpu' but this machine has no CUDA"),
        ('accelerator = "gpus"', "[train]: accelerator='gpus' is not one of 'auto', 'cpu'"),
        ('accelerator = "tpu"', "[train]: accelerator='tpu' needs torch_xla"),
        ('accelerator = "mps"', "[train]: accelerator='mps' but this machine has no Apple"),
    ],
)
def test_seed_split_and_device_are_refused_before_the_run_folder_exists(
    tmp_path, capsys, train, message
):
    if '"gpu"' in train and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if "mps" in train and torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU")
    if "tpu" in train and importlib.util.find_spec("torch_xla") is not None:
        pytest.skip("this machine has torch_xla")
    assert main(["run", str(_workflow(tmp_path, train=train))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # it was created, then training refused


def test_an_empty_de_table_is_refused_naming_the_key(tmp_path, capsys):
    assert main(["run", str(_workflow(tmp_path, outputs="de = {}"))]) == 2  # ran without DE
    assert "[outputs].de: Give groupby=" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unusable_output_folders_name_the_key_and_the_way_out(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    path = _workflow(tmp_path, out=(tmp_path / "file" / "out").as_posix())
    assert main(["run", str(path)]) == 2  # NotADirectoryError escaped with a traceback
    assert "[outputs].dir = " in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["run", str(_workflow(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "use --resume" in err and "set another [outputs].dir" in err


def test_the_resolved_config_records_the_seed(tmp_path):
    assert load_workflow(_workflow(tmp_path))["train"]["seed"] == 0


def test_help_states_the_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Exit status: 0 done; 1 training failed" in capsys.readouterr().out


def test_check_runs_the_checks_before_training_and_writes_nothing(tmp_path, capsys):
    path = _workflow(tmp_path)
    assert main(["run", str(path), "--check"]) == 0
    assert "ready to run" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    path.write_text(path.read_text().replace('batch_key = "batch"', 'batch_key = "donor"'))
    assert main(["run", str(path), "--check"]) == 2
    assert "'donor'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_query_that_cannot_be_mapped_is_refused_before_training(tmp_path, capsys):
    import anndata

    query = anndata.read_h5ad(write_data(tmp_path / "query.h5ad", 50, 30))
    query.var_names = [f"other_{i}" for i in range(query.n_vars)]  # no shared gene
    query.write_h5ad(tmp_path / "query.h5ad")
    mapping = f'reference_mapping = {{ query = "{(tmp_path / "query.h5ad").as_posix()}" }}'
    path = _workflow(tmp_path, outputs=mapping)
    assert main(["run", str(path)]) == 2  # it failed after training the reference
    err = capsys.readouterr().err
    assert "[outputs.reference_mapping].query = " in err and "None of the reference genes" in err
    assert not (tmp_path / "out").exists()


def test_a_data_problem_says_how_to_fix_the_file_the_workflow_reads(tmp_path, capsys):
    import anndata

    data = tmp_path / "data.h5ad"
    adata = anndata.read_h5ad(write_data(data, 120, 30))
    with warnings.catch_warnings():  # anndata's own notice of the duplicate, as it reads
        warnings.simplefilter("ignore", UserWarning)
        adata.var_names = ["gene_0"] * 2 + list(adata.var_names[2:])  # a duplicated name
        adata.write_h5ad(data)
        assert main(["run", str(_workflow(tmp_path)), "--check"]) == 2
    err = capsys.readouterr().err
    assert "var_names_make_unique" in err and "point [input].path at it" in err
