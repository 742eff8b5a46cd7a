"""Counts left on disk: row reads, file formats, collections of files, and their errors."""

from __future__ import annotations

import pickle
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import cellvi
from cellvi.data import CollectionCSR, DiskCSR, as_row_source, read_backed, read_collection
from cellvi.errors import InvalidDataError, MissingKeyError
from cellvi.model import SCVI


@pytest.fixture
def sim():
    return cellvi.data.simulate(n_cells=700, n_genes=60, n_batches=2, n_cell_types=3, seed=3)


@pytest.fixture(params=["h5ad", "zarr"])
def written(request, sim, tmp_path):
    path = tmp_path / f"sim.{request.param}"
    if request.param == "h5ad":
        sim.write_h5ad(path)
    else:
        _write_zarr(sim, path)
    return sim, path


def _write_zarr(adata, path):
    with warnings.catch_warnings():  # anndata/zarr format-transition notices, not ours
        warnings.simplefilter("ignore", UserWarning)
        adata.write_zarr(path)


def test_row_reads_equal_the_in_memory_matrix_in_any_order(written):
    sim, path = written
    disk, X = DiskCSR(path), sim.X.tocsr()
    rng = np.random.default_rng(0)
    selections = [
        np.arange(700),
        np.sort(rng.choice(700, 300, replace=False)),
        rng.integers(0, 700, 50),  # unsorted, with repeats
        np.array([699]),
        np.arange(10, 400),
    ]
    for rows in selections:
        assert (disk.read_rows(rows) != X[rows]).nnz == 0
    assert (disk[5:17] != X[5:17]).nnz == 0
    assert (disk[[4, 2], 3:9] != X[[4, 2]][:, 3:9]).nnz == 0
    np.testing.assert_allclose(disk.row_sums(), np.asarray(X.sum(1)).ravel())
    reopened = pickle.loads(pickle.dumps(disk))  # workers reopen the file by path
    assert (reopened[[9, 1]] != X[[9, 1]]).nnz == 0
    with pytest.raises(IndexError):
        disk.read_rows([700])


def test_repeated_rows_are_read_once_in_one_slice(written, monkeypatch):
    """Rows drawn with replacement (as DE's posterior samples are) keep contiguous reads."""
    sim, path = written
    disk, X = DiskCSR(path), sim.X.tocsr()
    slices = []
    read = cellvi.data._backed._SliceReader.__call__

    def counted(self, lo, hi, data_out, indices_out):
        slices.append((lo, hi))
        return read(self, lo, hi, data_out, indices_out)

    monkeypatch.setattr(cellvi.data._backed._SliceReader, "__call__", counted)
    rows = np.array([40, 38, 38, 39, 40, 39, 41, 38])
    assert (disk.read_rows(rows) != X[rows]).nnz == 0
    assert slices == [(X.indptr[38], X.indptr[42])]


def test_an_open_h5ad_matrix_keeps_its_chunk_cache_across_reads(sim, tmp_path):
    """The datasets stay open with their HDF5 chunk cache, so chunks read again by scattered
    reads are not decompressed again; the files of a collection share one budget."""
    sim.write_h5ad(tmp_path / "a.h5ad", compression="gzip")
    disk = DiskCSR(tmp_path / "a.h5ad", cache_bytes=8 << 20)
    reader = disk._open()[2]
    disk.read_rows([5, 600, 3])
    disk.read_rows(np.arange(100))
    assert disk._open()[2] is reader  # the same open datasets, hence the same cache
    for dataset in (reader.data_ds, reader.indices_ds):
        assert dataset.id.get_access_plist().get_chunk_cache()[1] == 4 << 20
    paths = _split_files(sim, tmp_path)
    parts = read_collection(paths).X.parts
    budget = cellvi.data._backed.CHUNK_CACHE_BYTES
    assert [p.cache_bytes for p in parts] == [budget // len(paths)] * len(paths)


def test_read_backed_keeps_annotations_and_leaves_counts_on_disk(written):
    sim, path = written
    adata = read_backed(path)
    assert isinstance(adata.X, DiskCSR) and adata.shape == sim.shape
    pd.testing.assert_frame_equal(adata.obs, sim.obs)
    np.testing.assert_array_equal(adata.varm["true_lfc"], sim.varm["true_lfc"])


def test_anndata_backed_mode_is_read_through_the_same_row_source(sim, tmp_path):
    path = tmp_path / "a.h5ad"
    sim.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    source = as_row_source(backed.X)
    assert isinstance(source, DiskCSR) and source.path == str(path)
    assert (source[[3, 1]] != sim.X[[3, 1]]).nnz == 0


@pytest.mark.parametrize("layout", ["dense", "csc"])
def test_a_matrix_on_disk_that_is_not_csr_is_refused_with_the_fix(sim, tmp_path, layout):
    path = tmp_path / f"{layout}.h5ad"
    sim.X = sim.X.toarray() if layout == "dense" else sparse.csc_matrix(sim.X)
    sim.write_h5ad(path)
    with pytest.raises(InvalidDataError, match="CSR") as info:
        DiskCSR(path)
    assert str(path) in str(info.value)
    backed = anndata.read_h5ad(path, backed="r")  # anndata's own backed mode: refused at setup
    with pytest.raises(InvalidDataError, match="CSR"):
        SCVI.setup_anndata(backed)


def test_counts_on_disk_are_checked_and_the_file_is_named(sim, tmp_path):
    path = tmp_path / "scaled.h5ad"
    sim.X = sim.X.tocsr()
    sim.X.data[5] = -1.0
    sim.write_h5ad(path)
    adata = read_backed(path)
    with pytest.raises(InvalidDataError, match="negative") as info:
        SCVI.setup_anndata(adata)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------ collections
def _split_files(sim, tmp_path, drop_genes=(), rename_obs=False):
    first, second = sim[:300].copy(), sim[300:].copy()
    second = second[:, [g for g in second.var_names if g not in drop_genes]].copy()
    if rename_obs:
        second.obs = second.obs.rename(columns={"cell_type": "celltype"})
    paths = [tmp_path / "first.h5ad", tmp_path / "second.zarr"]
    first.write_h5ad(paths[0])
    _write_zarr(second, paths[1])
    return paths


def test_inner_join_reads_the_shared_genes_of_every_file(sim, tmp_path):
    dropped = list(sim.var_names[[1, 7, 30]])
    paths = _split_files(sim, tmp_path, drop_genes=dropped)
    coll = read_collection(paths, join="inner")
    keep = [g for g in sim.var_names if g not in dropped]
    assert list(coll.var_names) == keep and isinstance(coll.X, CollectionCSR)
    expected = sim[:, keep].X.tocsr()
    rows = np.array([299, 0, 300, 650, 301])
    assert (coll.X.read_rows(rows) != expected[rows]).nnz == 0
    assert list(coll.obs["dataset"].cat.categories) == ["first", "second"]
    assert (coll.obs["dataset"] == "second").sum() == 400


def test_outer_join_pads_missing_genes_with_zeros(sim, tmp_path):
    dropped = list(sim.var_names[[2, 5]])
    paths = _split_files(sim, tmp_path, drop_genes=dropped)
    coll = read_collection(paths, join="outer", keys=["a", "b"])
    assert coll.n_vars == sim.n_vars
    X = coll.X.to_memory().toarray()[:, [list(coll.var_names).index(g) for g in sim.var_names]]
    expected = sim.X.toarray()
    expected[300:, [2, 5]] = 0
    np.testing.assert_array_equal(X, expected)
    assert set(coll.obs["dataset"]) == {"a", "b"}


def test_a_column_missing_from_one_file_names_that_file(sim, tmp_path):
    paths = _split_files(sim, tmp_path, rename_obs=True)
    coll = read_collection(paths)
    assert "cell_type" not in coll.obs
    with pytest.raises(MissingKeyError, match="second.zarr"):
        SCVI.setup_anndata(coll, batch_key="dataset", labels_key="cell_type")


def test_bad_counts_in_one_file_name_that_file(sim, tmp_path):
    second = sim[300:].copy()
    second.X = second.X.tocsr().astype(np.float32)
    second.X.data[:3] = 0.5
    second.X.data[3] = np.nan
    paths = [tmp_path / "good.h5ad", tmp_path / "bad.h5ad"]
    sim[:300].copy().write_h5ad(paths[0])
    second.write_h5ad(paths[1])
    with pytest.raises(InvalidDataError, match="NaN") as info:
        SCVI.setup_anndata(read_collection(paths))
    assert "bad.h5ad" in str(info.value) and "good.h5ad" not in str(info.value)


def test_join_errors_are_explicit(sim, tmp_path):
    a, b = sim[:300].copy(), sim[300:].copy()
    b.var_names = [f"other{i}" for i in range(b.n_vars)]
    paths = [tmp_path / "a.h5ad", tmp_path / "b.h5ad"]
    a.write_h5ad(paths[0])
    b.write_h5ad(paths[1])
    with pytest.raises(InvalidDataError, match="share no gene"):
        read_collection(paths)
    with pytest.raises(ValueError, match="join"):
        read_collection(paths, join="left")
    with pytest.raises(ValueError, match="label="):
        read_collection(paths, join="outer", label="batch")  # would overwrite a column
    with pytest.raises(FileNotFoundError, match="missing.h5ad"):
        read_collection([paths[0], tmp_path / "missing.h5ad"])


def test_cells_left_without_counts_by_the_join_are_caught(tmp_path):
    obs = pd.DataFrame(index=[f"c{i}" for i in range(4)])
    only_a = anndata.AnnData(
        sparse.csr_matrix(np.array([[1, 0], [2, 1], [0, 3], [1, 1]], dtype=np.float32)),
        obs=obs,
        var=pd.DataFrame(index=["g1", "g2"]),
    )
    b = anndata.AnnData(
        sparse.csr_matrix(np.array([[1, 0], [0, 2]], dtype=np.float32)),
        obs=pd.DataFrame(index=["d0", "d1"]),
        var=pd.DataFrame(index=["g1", "g3"]),
    )
    paths = [tmp_path / "a.h5ad", tmp_path / "b.h5ad"]
    only_a.write_h5ad(paths[0])
    b.write_h5ad(paths[1])
    coll = read_collection(paths)  # inner join keeps g1 only: cell d1 has no counts left
    with pytest.raises(InvalidDataError, match="zero total counts"):
        SCVI.setup_anndata(coll)


def test_repeated_cell_names_across_files_are_made_unique(sim, tmp_path):
    a, b = sim[:100].copy(), sim[100:200].copy()
    b.obs_names = a.obs_names
    paths = [tmp_path / "a.h5ad", tmp_path / "b.h5ad"]
    a.write_h5ad(paths[0])
    b.write_h5ad(paths[1])
    coll = read_collection(paths)
    assert coll.obs_names.is_unique and coll.obs_names[100].endswith("-b")
