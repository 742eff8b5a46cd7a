"""Files behind on-disk counts: open only while read, checked when reopened, absolute paths,
anndata's ``to_memory``, collections of equally named files, and layers in script mode."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from scipy import sparse

import cellvi
from cellvi.cli import main
from cellvi.errors import InvalidDataError
from cellvi.model import SCVI


def _sim(seed=0, n_cells=200):
    return cellvi.data.simulate(
        n_cells=n_cells, n_genes=40, n_batches=2, n_cell_types=2, n_de_genes_per_type=5, seed=seed
    )


def _not_open(path) -> bool:
    """Whether no file descriptor of this process points at ``path`` (Linux)."""
    target = os.path.realpath(path)
    fds = "/proc/self/fd"
    return all(os.path.realpath(os.path.join(fds, fd)) != target for fd in os.listdir(fds))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux's /proc")
def test_files_are_open_only_while_read(tmp_path):
    path = tmp_path / "d.h5ad"
    _sim().write_h5ad(path)
    adata = cellvi.data.read_backed(path)
    assert _not_open(path)
    SCVI.setup_anndata(adata, batch_key="batch")
    assert _not_open(path)
    model = SCVI(adata, n_hidden=16, n_latent=4)
    model.train(max_epochs=1)
    assert _not_open(path)
    z = model.get_latent_representation()
    assert _not_open(path)
    # reading again reopens the file
    np.testing.assert_array_equal(model.get_latent_representation(), z)


def test_a_file_replaced_after_opening_is_refused_not_misread(tmp_path):
    path = tmp_path / "d.h5ad"
    _sim(seed=0).write_h5ad(path)
    adata = cellvi.data.read_backed(path)
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=4)
    model.train(max_epochs=1)
    _sim(seed=5).write_h5ad(tmp_path / "other.h5ad")
    os.replace(tmp_path / "other.h5ad", path)  # same name, other counts
    with pytest.raises(InvalidDataError, match="changed on disk since it was opened"):
        model.get_latent_representation()


def test_a_relative_path_keeps_naming_the_same_file(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _sim(seed=0).write_h5ad(tmp_path / "a" / "d.h5ad")
    _sim(seed=5).write_h5ad(tmp_path / "b" / "d.h5ad")
    monkeypatch.chdir(tmp_path / "a")
    adata = cellvi.data.read_backed("d.h5ad")
    expected = adata.X[:5].toarray()
    monkeypatch.chdir(tmp_path / "b")
    assert adata.X.path == str(tmp_path / "a" / "d.h5ad")
    np.testing.assert_array_equal(adata.X[:5].toarray(), expected)


def test_to_memory_loads_on_disk_matrices(tmp_path):
    sim = _sim()
    sim.layers["counts"] = sim.X.copy()
    sim.write_h5ad(tmp_path / "d.h5ad")
    backed = cellvi.data.read_backed(tmp_path / "d.h5ad", layer="counts")
    memory = backed.to_memory()
    assert isinstance(memory.X, sparse.csr_matrix)
    assert isinstance(memory.layers["counts"], sparse.csr_matrix)
    np.testing.assert_array_equal(memory.X.toarray(), sim.X.toarray())
    shutil.copy(tmp_path / "d.h5ad", tmp_path / "e.h5ad")
    collection = cellvi.data.read_collection([tmp_path / "d.h5ad", tmp_path / "e.h5ad"])
    assert isinstance(collection.to_memory().X, sparse.csr_matrix)
    memory.write_h5ad(tmp_path / "copy.h5ad")  # what a user then writes results with


def test_equally_named_files_in_different_folders_form_a_collection(tmp_path):
    for name in ("s1", "s2"):
        (tmp_path / name).mkdir()
        _sim(seed=len(name)).write_h5ad(tmp_path / name / "filtered.h5ad")
    paths = [tmp_path / "s1" / "filtered.h5ad", tmp_path / "s2" / "filtered.h5ad"]
    collection = cellvi.data.read_collection(paths)
    assert list(collection.obs["dataset"].cat.categories) == [str(p) for p in paths]


def test_script_mode_reads_a_layer_of_several_files(tmp_path):
    sim = _sim(n_cells=300)
    sim.layers["counts"] = sim.X.copy()
    sim.X = sparse.csr_matrix(sim.X.shape, dtype=np.float32)  # X holds something else
    sim[:150].copy().write_h5ad(tmp_path / "a.h5ad")
    sim[150:].copy().write_h5ad(tmp_path / "b.h5ad")
    files = ", ".join(f'"{(tmp_path / n).as_posix()}"' for n in ("a.h5ad", "b.h5ad"))
    config = tmp_path / "wf.toml"
    config.write_text(
        f'[input]\npaths = [{files}]\nlayer = "counts"\n\n[setup]\nbatch_key = "batch"\n\n'
        "[model]\nn_hidden = 16\nn_latent = 4\n\n[train]\nmax_epochs = 2\n\n"
        f'[outputs]\ndir = "{(tmp_path / "out").as_posix()}"\nlatent = true\n'
    )
    assert main(["run", str(config)]) == 0
    assert (tmp_path / "out").is_dir()
    shutil.rmtree(tmp_path / "out")


def test_a_csc_matrix_of_anndata_backed_mode_is_refused_naming_its_file(tmp_path):
    import anndata

    sim = _sim()
    sim.X = sparse.csc_matrix(sim.X)
    sim.write_h5ad(tmp_path / "csc.h5ad")
    adata = anndata.read_h5ad(tmp_path / "csc.h5ad", backed="r")
    with pytest.raises(InvalidDataError, match=r"\(in .*csc\.h5ad\) is on disk as"):
        SCVI.setup_anndata(adata, batch_key="batch")
