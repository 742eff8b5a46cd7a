"""Count matrices that stay on disk: CSR groups of ``.h5ad``/``.zarr`` files read by row blocks.

A :class:`RowSource` is an ``anndata.abc.CSRDataset``, so it sits in ``AnnData.X`` (or a layer)
like a backed matrix and the usual ``setup_anndata`` path works. Reads go through
``read_rows``: the requested rows are sorted, merged into contiguous spans of stored values and
read with one slice per span, so a block of consecutive cells costs one read per array.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
from scipy import sparse

from ..errors import InvalidDataError

__all__ = ["RowSource", "DiskCSR", "as_row_source", "is_on_disk", "read_backed", "row_totals"]

SPAN_GAP = 1 << 16  # stored values: runs of rows closer than this are read as one slice
SPAN_MAX = 1 << 23  # stored values read in one slice at most (64 MB of data + indices)
CHUNK_ROWS = 20_000  # rows per chunk of whole-matrix passes
# decompressed HDF5 chunks an opened matrix keeps (data and indices together): repeated
# scattered reads (DE's posterior samples, cell subsets) then decompress each chunk once
CHUNK_CACHE_BYTES = 64 << 20


def _as_rows(key, n_rows: int) -> np.ndarray:
    if isinstance(key, slice):
        return np.arange(*key.indices(n_rows), dtype=np.int64)
    rows = np.asarray(key)
    if rows.dtype == bool:
        return np.flatnonzero(rows).astype(np.int64)
    rows = rows.astype(np.int64).reshape(-1)
    return np.where(rows < 0, rows + n_rows, rows)


class RowSource(anndata.abc.CSRDataset):
    """A CSR count matrix that is read by rows on demand (base class).

    Subclasses set ``_shape`` and ``_dtype`` and implement ``_read_sorted(rows)`` for sorted
    row positions. Indexing (``source[rows]``, ``source[rows, cols]``) returns scipy CSR.
    """

    format = "csr"
    fork_safe = True  # may be read in a forked child (loader worker, DDP fork) after use here
    _shape: tuple[int, int]
    _dtype: np.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def group(self):
        return None

    @property
    def backend(self) -> str:
        return "cellvi"

    def _read_sorted(self, rows: np.ndarray) -> sparse.csr_matrix:
        raise NotImplementedError

    def read_rows(self, rows) -> sparse.csr_matrix:
        """Rows ``rows`` (any order, repeats allowed) as an in-memory CSR matrix."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self._shape[0]):
            raise IndexError(f"row positions must lie in [0, {self._shape[0]}).")
        if rows.size == 0:
            return sparse.csr_matrix((0, self._shape[1]), dtype=np.float32)
        if rows.size == 1 or np.all(rows[1:] > rows[:-1]):
            return self._read_sorted(rows)
        # each row is read once, in file order: a repeat would split the contiguous reads
        # (sampling cells with replacement, as DE does, repeats many)
        unique, inverse = np.unique(rows, return_inverse=True)
        return self._read_sorted(unique)[inverse]

    def __getitem__(self, key) -> sparse.csr_matrix:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if isinstance(rows, int | np.integer):
            rows = [rows]
        out = self.read_rows(_as_rows(rows, self._shape[0]))
        if not (isinstance(cols, slice) and cols == slice(None)):
            out = out[:, cols]
        return out

    def to_memory(self) -> sparse.csr_matrix:
        parts = [self.read_rows(r) for r in _row_chunks(self._shape[0])]
        return sparse.vstack(parts, format="csr") if parts else self.read_rows([])

    def close(self) -> None:
        """Close the files this matrix reads (they are opened again when next read)."""

    def row_sums(self) -> np.ndarray:
        """Total counts of every row, computed in row chunks (bounded memory)."""
        totals = [
            np.asarray(self.read_rows(r).sum(axis=1)).ravel() for r in _row_chunks(self._shape[0])
        ]
        return np.concatenate(totals) if totals else np.zeros(0)

    def parts_for_checks(self, location: str):
        """``(matrix, location)`` pairs the count check reads (one per file)."""
        yield self, f"{location} ({self.describe()})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self._shape}, {self.describe()})"

    def describe(self) -> str:
        return ""


def _register_with_anndata() -> None:
    """``AnnData.to_memory()`` loads these matrices as scipy CSR, as it does anndata's own
    backed matrices (through anndata's ``to_memory`` dispatch; skipped if that moved)."""
    try:
        from anndata._core.file_backing import to_memory
    except ImportError:  # pragma: no cover - another anndata layout
        return
    if hasattr(to_memory, "register"):
        to_memory.register(RowSource)(lambda x, *, copy=False: x.to_memory())


_register_with_anndata()


def _row_chunks(n_rows: int):
    for start in range(0, n_rows, CHUNK_ROWS):
        yield np.arange(start, min(start + CHUNK_ROWS, n_rows), dtype=np.int64)


def gather_spans(indptr: np.ndarray, rows: np.ndarray, read) -> tuple[np.ndarray, np.ndarray]:
    """Stored values and column indices of sorted ``rows`` with few contiguous reads.

    ``read(lo, hi, data_out, indices_out)`` fills the output slices with stored values
    ``lo:hi`` and ``read.allocate(n)`` makes output arrays. Consecutive rows form runs; a run
    is read straight into the result, and runs separated by fewer than ``SPAN_GAP`` values
    are read as one slice (at most ``SPAN_MAX`` values) and copied out run by run, so memory
    stays at the result plus one slice.
    """
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    first = np.r_[0, breaks]
    last = np.r_[breaks - 1, rows.size - 1]
    lo, hi = indptr[rows[first]], indptr[rows[last] + 1]
    lengths = hi - lo
    out_at = np.r_[0, np.cumsum(lengths)]
    data, indices = read.allocate(int(out_at[-1]))
    n_runs, r = len(lo), 0
    while r < n_runs:
        end = r + 1  # runs r..end-1 share one slice
        while (
            end < n_runs
            and lo[end] - hi[end - 1] <= SPAN_GAP
            and lo[end] >= hi[end - 1]
            and hi[end] - lo[r] <= SPAN_MAX
        ):
            end += 1
        if end == r + 1:
            read(
                int(lo[r]),
                int(hi[r]),
                data[out_at[r] : out_at[r + 1]],
                indices[out_at[r] : out_at[r + 1]],
            )
        else:
            span_data, span_indices = read.allocate(int(hi[end - 1] - lo[r]))
            read(int(lo[r]), int(hi[end - 1]), span_data, span_indices)
            for k in range(r, end):
                a, b = lo[k] - lo[r], hi[k] - lo[r]
                data[out_at[k] : out_at[k + 1]] = span_data[a:b]
                indices[out_at[k] : out_at[k + 1]] = span_indices[a:b]
        r = end
    return data, indices


class _SliceReader:
    """Reads stored values of an h5py/zarr CSR group into preallocated arrays."""

    def __init__(self, data_ds, indices_ds):
        self.data_ds, self.indices_ds = data_ds, indices_ds
        self.direct = hasattr(data_ds, "read_direct")  # h5py: no temporary arrays

    def allocate(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.empty(n, self.data_ds.dtype), np.empty(n, self.indices_ds.dtype)

    def __call__(self, lo: int, hi: int, data_out: np.ndarray, indices_out: np.ndarray) -> None:
        if hi <= lo:
            return
        if self.direct:
            self.data_ds.read_direct(data_out, np.s_[lo:hi])
            self.indices_ds.read_direct(indices_out, np.s_[lo:hi])
        else:
            data_out[:] = self.data_ds[lo:hi]
            indices_out[:] = self.indices_ds[lo:hi]


def csr_from_parts(data, indices, lengths, n_cols: int) -> sparse.csr_matrix:
    """CSR over ``data``/``indices`` without copying them (int32 pointers when they fit)."""
    dtype = np.int32 if indices.dtype == np.int32 and data.size < 2**31 else np.int64
    indptr = np.zeros(len(lengths) + 1, dtype=dtype)
    np.cumsum(lengths, out=indptr[1:])
    return sparse.csr_matrix(
        (data, indices.astype(dtype, copy=False), indptr), shape=(len(lengths), n_cols), copy=False
    )


class DiskCSR(RowSource):
    """A CSR matrix inside an ``.h5ad`` (HDF5) or ``.zarr`` file, read by row blocks.

    Only the row pointer (8 bytes per cell) is held in memory. The object pickles to its path
    and reopens the file in each process, so data-loader workers can read it.

    Parameters
    ----------
    path
        The ``.h5ad`` file or ``.zarr`` directory.
    key
        Group of the matrix inside the file: ``"X"`` or ``"layers/<name>"``.
    cache_bytes
        HDF5 chunk cache of the open matrix (default 64 MB, half each for values and column
        indices): a chunk read again, as by scattered reads, is not decompressed again.

    Examples
    --------
    >>> import anndata, numpy as np, tempfile, os
    >>> from scipy import sparse
    >>> path = os.path.join(tempfile.mkdtemp(), "a.h5ad")
    >>> anndata.AnnData(sparse.csr_matrix(np.arange(6.0).reshape(3, 2))).write_h5ad(path)
    >>> DiskCSR(path)[[2, 0]].toarray().tolist()
    [[4.0, 5.0], [0.0, 1.0]]
    """

    def __init__(self, path, key: str = "X", cache_bytes: int = CHUNK_CACHE_BYTES):
        # absolute: workers and later reopenings must read this file, whatever the working
        # directory is then
        self.path = os.path.abspath(str(Path(path)))
        self.key = key.strip("/")
        self.cache_bytes = int(cache_bytes)
        self._zarr = Path(self.path).is_dir() or self.path.rstrip("/").endswith(".zarr")
        self._handles = None
        self._pid = None
        self._identity = self._file_identity()
        group = self._open()[0]
        encoding = group.attrs.get("encoding-type") if hasattr(group, "attrs") else None
        where = f"{self.path} [{self.key}]"
        if encoding != "csr_matrix":
            kind = {"csc_matrix": "CSC", "array": "dense"}.get(str(encoding), str(encoding))
            raise InvalidDataError(
                f"{where} is stored as a {kind} matrix; cellvi reads counts from disk by row "
                "blocks, which needs CSR. Rewrite the file once, e.g. "
                "`adata = anndata.read_h5ad(path); adata.X = scipy.sparse.csr_matrix(adata.X); "
                "adata.write_h5ad(new_path)`."
            )
        self._shape = tuple(int(v) for v in group.attrs["shape"])
        self._indptr = np.asarray(group["indptr"][...], dtype=np.int64)
        self._dtype = np.dtype(group["data"].dtype)
        self.close()  # open only while cellvi reads it (see close_disk_sources)

    def _file_identity(self) -> tuple | None:
        """Inode, size and modification time of the file (of the matrix's folder in a
        ``.zarr`` store): what tells a file replaced or rewritten since it was opened."""
        where = Path(self.path) / self.key if self._zarr else Path(self.path)
        try:
            st = os.stat(where)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def close(self) -> None:
        """Close the file (it is opened again when next read), e.g. before rewriting it."""
        if self._handles is not None and self._pid == os.getpid():
            handle = self._handles[1]
            if handle is not None:
                handle.close()
        self._handles = None
        self._pid = None

    def _open(self):
        if self._handles is None or self._pid != os.getpid():
            now = self._file_identity()
            if now is not None and self._identity is not None and now != self._identity:
                # the row pointer read at opening would index another file's rows
                raise InvalidDataError(
                    f"{self.path} changed on disk since it was opened (it was replaced or "
                    "rewritten), so the row index read then no longer fits it. Open it again "
                    "with cellvi.data.read_backed / read_collection and set the new AnnData up."
                )
            try:
                if self._zarr:
                    import zarr

                    root = zarr.open_group(self.path, mode="r")
                    handle = None
                else:
                    handle = h5py.File(
                        self.path, "r", rdcc_nbytes=self.cache_bytes // 2, rdcc_nslots=100_003
                    )
                    root = handle
                group = root[self.key]
            except (OSError, KeyError, FileNotFoundError) as err:
                raise InvalidDataError(
                    f"Cannot read the matrix {self.key!r} of {self.path}: {err}"
                ) from err
            if isinstance(group, h5py.Dataset) or not hasattr(group, "keys"):
                raise InvalidDataError(
                    f"{self.path} [{self.key}] is stored as a dense matrix; cellvi reads counts "
                    "from disk by row blocks, which needs CSR. Rewrite the file with a "
                    "scipy.sparse.csr_matrix X."
                )
            # the datasets stay open with the file: HDF5's chunk cache lives in them
            self._handles = (group, handle, _SliceReader(group["data"], group["indices"]))
            self._pid = os.getpid()
        return self._handles

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = None
        state["_pid"] = None
        return state

    @property
    def group(self):
        return self._open()[0]

    @property
    def backend(self) -> str:
        return "zarr" if self._zarr else "hdf5"

    def describe(self) -> str:
        return f"{self.path} [{self.key}]"

    def _read_sorted(self, rows: np.ndarray) -> sparse.csr_matrix:
        reader = self._open()[2]
        data, indices = gather_spans(self._indptr, rows, reader)
        lengths = self._indptr[rows + 1] - self._indptr[rows]
        return csr_from_parts(data, indices, lengths, self._shape[1])

    def row_sums(self) -> np.ndarray:
        group = self._open()[0]
        data_ds = group["data"]
        totals = np.zeros(self._shape[0], dtype=np.float64)
        for rows in _row_chunks(self._shape[0]):
            lo, hi = self._indptr[rows[0]], self._indptr[rows[-1] + 1]
            values = np.asarray(data_ds[int(lo) : int(hi)], dtype=np.float64)
            cum = np.r_[0.0, np.cumsum(values)]
            local = self._indptr[rows[0] : rows[-1] + 2] - lo
            totals[rows] = cum[local[1:]] - cum[local[:-1]]
        return totals


def close_disk_sources(adata) -> None:
    """Close the files behind ``adata``'s on-disk count matrices (``X`` and layers). cellvi
    calls this when setup, a training run or an output call is done: the files are held open
    only while they are read, so they can be rewritten between calls."""
    if adata is None:
        return
    for matrix in (getattr(adata, "X", None), *getattr(adata, "layers", {}).values()):
        if isinstance(matrix, RowSource):
            matrix.close()


def is_on_disk(matrix) -> bool:
    """Whether ``matrix`` is read from disk (a row source, a backed anndata or h5py/zarr array)."""
    if isinstance(matrix, RowSource | anndata.abc.CSRDataset | anndata.abc.CSCDataset):
        return True
    if isinstance(matrix, h5py.Dataset):
        return True
    return type(matrix).__module__.startswith("zarr")


def as_row_source(matrix, location: str = "the count matrix") -> RowSource:
    """The :class:`RowSource` reading ``matrix`` (an anndata backed CSR dataset is reopened).

    Raises
    ------
    InvalidDataError
        For matrices on disk that are not CSR (dense or CSC), with how to convert them.
    """
    if isinstance(matrix, RowSource):
        return matrix
    if isinstance(matrix, anndata.abc.CSRDataset):
        group = matrix.group
        if isinstance(group, h5py.Group):
            return DiskCSR(group.file.filename, group.name)
        store_root = getattr(getattr(group, "store", None), "root", None)
        if store_root is not None:
            return DiskCSR(str(store_root), group.path)
    group = getattr(matrix, "group", None)
    if group is None and hasattr(matrix, "file"):  # an h5py dataset (a dense backed matrix)
        group = matrix
    filename = getattr(getattr(group, "file", None), "filename", None)
    if filename is not None:
        location = f"{location} (in {filename})"
    raise InvalidDataError(
        f"{location} is on disk as {type(matrix).__name__}; cellvi reads disk-backed counts "
        "by row blocks from CSR matrices in .h5ad/.zarr files. Rewrite it with a "
        "scipy.sparse.csr_matrix, or load it into memory (adata = adata.to_memory())."
    )


def row_totals(matrix) -> np.ndarray:
    """Total counts per row of an in-memory or disk-backed matrix (bounded memory)."""
    if is_on_disk(matrix):
        return as_row_source(matrix).row_sums()
    return np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()


def _read_group_elem(root, name: str):
    return anndata.io.read_elem(root[name]) if name in root else None


def read_backed(path, layer: str | None = None) -> anndata.AnnData:
    """Open an ``.h5ad`` file or ``.zarr`` store with its counts left on disk.

    ``obs``, ``var``, ``obsm``, ``varm`` and ``uns`` are loaded (they are small); the count
    matrix is a :class:`DiskCSR`, read by row blocks while training and during inference.

    Parameters
    ----------
    path
        ``.h5ad`` file or ``.zarr`` directory written by anndata.
    layer
        Also open ``layers[layer]`` from disk (as ``adata.layers[layer]``). ``X`` is then
        left out (``None``) when it is not a CSR matrix (e.g. dense normalised values) or
        absent.

    Returns
    -------
    anndata.AnnData
        With ``X`` (and ``layers[layer]``) on disk.

    Examples
    --------
    >>> import cellvi, tempfile, os
    >>> adata = cellvi.data.simulate(n_cells=100, n_genes=80, seed=0)
    >>> path = os.path.join(tempfile.mkdtemp(), "sim.h5ad")
    >>> adata.write_h5ad(path)
    >>> backed = read_backed(path)
    >>> type(backed.X).__name__, backed.shape
    ('DiskCSR', (100, 80))
    """
    path = str(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist.")
    layers = {layer: DiskCSR(path, f"layers/{layer}")} if layer is not None else None
    try:
        X = DiskCSR(path, "X")
    except InvalidDataError:
        if layer is None:
            raise
        # the counts are in the layer: an X that is dense (e.g. normalised), CSC or absent is
        # left out rather than refused or loaded
        X = None
    zarr_store = (X if X is not None else layers[layer])._zarr
    if zarr_store:
        import zarr

        root, handle = zarr.open_group(path, mode="r"), None
    else:
        handle = h5py.File(path, "r")
        root = handle
    try:
        obs = _read_group_elem(root, "obs")
        var = _read_group_elem(root, "var")
        obsm = _read_group_elem(root, "obsm") or {}
        varm = _read_group_elem(root, "varm") or {}
        uns = _read_group_elem(root, "uns") or {}
    finally:
        if handle is not None:
            handle.close()
    shape = (X if X is not None else layers[layer]).shape
    obs = obs if obs is not None else pd.DataFrame(index=[str(i) for i in range(shape[0])])
    var = var if var is not None else pd.DataFrame(index=[str(i) for i in range(shape[1])])
    return anndata.AnnData(
        X=X, obs=obs, var=var, obsm=dict(obsm), varm=dict(varm), uns=dict(uns), layers=layers
    )
