"""A save that replaces a model directory is one atomic step where Linux allows it; what a
kill leaves otherwise is named by the load; files of different saves are not mixed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import cellvi
from cellvi.errors import ModelFileError
from cellvi.io import h5ad_stamp, read_model_file, write_model_dir
from cellvi.io._atomic import _exchange
from cellvi.model import SCVI


def _exchange_works(tmp_path) -> bool:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ok = _exchange(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")
    return ok


def test_overwrite_swaps_the_directories_in_one_step(tmp_path, monkeypatch):
    if not _exchange_works(tmp_path):
        pytest.skip("this file system has no atomic exchange (renameat2)")
    import cellvi.io._atomic as atomic

    write_model_dir(tmp_path / "m", state_dict={"w": torch.ones(2)}, var_names=[], attr_dict={})
    (tmp_path / "m" / "adata.h5ad").write_text("stale")  # removed: not written again
    renames = []
    monkeypatch.setattr(atomic.os, "replace", lambda *a: renames.append(a))
    write_model_dir(
        tmp_path / "m", state_dict={"w": torch.zeros(2)}, var_names=[], attr_dict={}, overwrite=True
    )
    monkeypatch.undo()
    assert renames == []  # no moment without a directory at "m"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.pt"]
    torch.testing.assert_close(
        read_model_file(tmp_path / "m")["model_state_dict"]["w"], torch.zeros(2)
    )


def test_a_kill_between_the_fallback_renames_is_explained_by_load(tmp_path):
    write_model_dir(tmp_path / "m", state_dict={"w": torch.ones(2)}, var_names=[], attr_dict={})
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        import cellvi.io._atomic as atomic
        from cellvi.io import write_model_dir
        atomic._exchange = lambda a, b: False
        real = os.replace
        def replace(src, dst):  # the previous directory moves aside, then the process dies
            real(src, dst)
            os.kill(os.getpid(), signal.SIGKILL)
        atomic.os.replace = replace
        write_model_dir({str(tmp_path / "m")!r}, state_dict={{"w": torch.zeros(2)}},
                        var_names=[], attr_dict={{}}, overwrite=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -9
    assert not (tmp_path / "m").exists()
    with pytest.raises(ModelFileError, match=r"save into it was interrupted") as info:
        read_model_file(tmp_path / "m")
    assert ".m.old-" in str(info.value) and ".m.tmp-" in str(info.value)


@pytest.fixture(scope="module")
def two_saves(tmp_path_factory):
    """Two different models saved with their AnnData under one prefix, in two folders."""
    root = tmp_path_factory.mktemp("saves")
    with cellvi.settings.override(progress_bar_style="none", logging_dir=root / "log"):
        for name, n_cells in (("a", 200), ("b", 150)):
            adata = cellvi.data.simulate(
                n_cells=n_cells, n_genes=40, n_batches=2, n_cell_types=2, n_de_genes_per_type=5
            )
            SCVI.setup_anndata(adata, batch_key="batch")
            model = SCVI(adata, n_hidden=16, n_latent=4)
            model.train(max_epochs=1, save_resume_checkpoint=False)
            model.save(root / name, prefix="ref_", save_anndata=True)
    return root


def test_a_saved_anndata_of_another_save_is_refused(two_saves, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(two_saves / "a", mixed)
    shutil.copy(two_saves / "b" / "ref_adata.h5ad", mixed / "ref_adata.h5ad")
    with pytest.raises(ModelFileError, match="written by another save"):
        SCVI.load(mixed, prefix="ref_")
    model = SCVI.load(two_saves / "a", prefix="ref_")  # one save's own pair loads
    assert model.adata.n_obs == 200
    assert (
        h5ad_stamp(two_saves / "a" / "ref_adata.h5ad")
        == read_model_file(two_saves / "a", prefix="ref_")["save_id"]
    )


def test_non_finite_weights_are_refused_at_load(two_saves, tmp_path):
    path = tmp_path / "nan"
    shutil.copytree(two_saves / "a", path)
    content = torch.load(path / "ref_model.pt", weights_only=True)
    name = next(iter(content["model_state_dict"]))
    content["model_state_dict"][name].view(-1)[0] = float("nan")
    torch.save(content, path / "ref_model.pt")
    with pytest.raises(ModelFileError, match=f"NaN or inf values \\({name}"):
        SCVI.load(path, prefix="ref_")


def test_loading_a_run_directory_points_to_ckpt_path(tmp_path):
    run = tmp_path / "SCVI_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    for where in (run, run / "checkpoints" / "last.ckpt"):
        with pytest.raises(ModelFileError, match=r"train\(ckpt_path="):
            SCVI.load(where)
