"""Several ``.h5ad``/``.zarr`` files seen as one disk-backed AnnData, never concatenated."""

from __future__ import annotations

import os
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import CELLVI_PREFIX
from ..errors import InvalidDataError, MissingKeyError
from ._backed import CHUNK_CACHE_BYTES, DiskCSR, RowSource

__all__ = ["CollectionCSR", "read_collection", "COLLECTION_UNS_KEY"]

COLLECTION_UNS_KEY = "cellvi_collection"


class CollectionCSR(RowSource):
    """Rows of several on-disk CSR matrices stacked, with genes mapped onto a joined gene list.

    Parameters
    ----------
    parts
        One :class:`~cellvi.data.DiskCSR` (or other row source) per file, in row order.
    column_maps
        Per part, the joined column of each of its genes (``-1``: dropped by an inner join);
        ``None`` when the part's genes already are the joined genes in order.
    n_vars
        Number of joined genes.
    """

    def __init__(self, parts: list[RowSource], column_maps: list, n_vars: int):
        self.parts = list(parts)
        self.column_maps = list(column_maps)
        sizes = [p.shape[0] for p in self.parts]
        self.offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
        self._shape = (int(self.offsets[-1]), int(n_vars))
        self._dtype = np.result_type(*[p.dtype for p in self.parts])

    def describe(self) -> str:
        return f"{len(self.parts)} files"

    def close(self) -> None:
        """Close every file of the collection (each is opened again when next read)."""
        for part in self.parts:
            part.close()

    def part_of(self, rows) -> np.ndarray:
        """Index of the file holding each row position."""
        return np.searchsorted(self.offsets, np.asarray(rows), side="right") - 1

    def _read_sorted(self, rows: np.ndarray) -> sparse.csr_matrix:
        cuts = np.searchsorted(rows, self.offsets[1:-1])
        blocks = []
        for i, segment in enumerate(np.split(rows, cuts)):
            if segment.size == 0:
                continue
            block = self.parts[i].read_rows(segment - self.offsets[i])
            cmap = self.column_maps[i]
            if cmap is not None:
                cols = cmap[block.indices]
                keep = cols >= 0
                row_of = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
                counts = np.bincount(row_of[keep], minlength=block.shape[0])
                block = sparse.csr_matrix(
                    (block.data[keep], cols[keep], np.r_[0, np.cumsum(counts)]),
                    shape=(block.shape[0], self._shape[1]),
                )
            blocks.append(block)
        return blocks[0] if len(blocks) == 1 else sparse.vstack(blocks, format="csr")

    def parts_for_checks(self, location: str):
        for part in self.parts:
            yield part, f"{location} of {part.describe()}"


def _read_annotations(path: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    if Path(path).is_dir():
        import zarr

        root = zarr.open_group(path, mode="r")
        return anndata.io.read_elem(root["obs"]), anndata.io.read_elem(root["var"])
    with h5py.File(path, "r") as handle:
        return anndata.io.read_elem(handle["obs"]), anndata.io.read_elem(handle["var"])


def _join_genes(var_names: list[pd.Index], keys: list[str], join: str) -> pd.Index:
    if join == "inner":
        common = set(var_names[0])
        for names in var_names[1:]:
            common &= set(names)
        genes = pd.Index([g for g in var_names[0] if g in common])
        if genes.empty:
            raise InvalidDataError(
                f"The files {keys} share no gene names, so an inner join is empty. Check that "
                "they use the same gene identifiers (symbols vs Ensembl IDs), or join='outer'."
            )
        return genes
    seen: dict[str, None] = {}
    for names in var_names:
        for g in names:
            seen.setdefault(g, None)
    return pd.Index(list(seen))


def _joined_categorical(columns: list[pd.Series]) -> pd.Categorical:
    """The files' categorical columns end to end, keeping their category order: the first
    file's categories (unused ones too), then each later file's new ones."""
    try:
        return pd.api.types.union_categoricals(columns)
    except TypeError:  # categories of different types, or ordered ones that differ
        values = pd.concat([c.astype(object) for c in columns], ignore_index=True)
        return pd.Categorical(values)


def _default_keys(paths: list[str]) -> list[str]:
    """File names without their ``.h5ad``/``.zarr`` suffix (whole names if that repeats one,
    the paths as given if even those repeat)."""
    names = [Path(p).name for p in paths]
    stems = [
        n[: -len(suffix)] if (suffix := Path(n).suffix) in (".h5ad", ".zarr", ".h5") else n
        for n in names
    ]
    if len(set(stems)) == len(stems):
        return stems
    if len(set(names)) == len(names):
        return names
    # equal names in different folders (e.g. each sample's filtered.h5ad): the paths
    return [str(Path(p)) for p in paths]


def read_collection(
    paths,
    join: str = "inner",
    label: str | None = "dataset",
    keys: list[str] | None = None,
    layer: str | None = None,
) -> anndata.AnnData:
    """Several ``.h5ad`` files or ``.zarr`` stores as one AnnData whose counts stay on disk.

    Rows are the files' cells in order; genes are joined by name. The result is set up and
    trained like any AnnData (``SCVI.setup_anndata(adata, batch_key=label)``); minibatches read
    only the rows they need from each file.

    Parameters
    ----------
    paths
        Files, in order (a single path reads one file).
    join
        ``"inner"`` (default): genes present in every file, in the first file's order.
        ``"outer"``: every gene of any file; a file's missing genes read as zero counts.
    label
        ``obs`` column naming each cell's file (a natural ``batch_key``); ``None``: no column.
    keys
        Names of the files in ``label`` (default: file names without their ``.h5ad``/``.zarr``
        suffix; the whole names when that makes two equal, the paths when those are equal).
    layer
        Read counts from ``layers[layer]`` of every file instead of ``X``.

    Returns
    -------
    anndata.AnnData
        ``X`` is a :class:`CollectionCSR`; ``obs`` holds the columns present in every file
        (others are listed in ``uns['cellvi_collection']['missing_obs_columns']``); cell names
        repeated across files get ``-<key>`` appended.

    Raises
    ------
    InvalidDataError
        If a file's matrix is not CSR, a file has duplicated gene names, or an inner join is
        empty.
    """
    if isinstance(paths, str | os.PathLike):  # one file, not its characters
        paths = [paths]
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("read_collection needs at least one file.")
    if join not in ("inner", "outer"):
        raise ValueError(f"join={join!r}: use 'inner' or 'outer'.")
    keys = _default_keys(paths) if keys is None else list(keys)
    if len(keys) != len(paths) or len(set(keys)) != len(keys):
        raise ValueError(f"keys must be {len(paths)} distinct names; got {keys}.")
    key = "X" if layer is None else f"layers/{layer}"
    parts, obs_frames, var_names = [], [], []
    for path, name in zip(paths, keys):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} (file {name!r} of the collection) does not exist.")
        # the files share one chunk-cache budget
        parts.append(DiskCSR(path, key, cache_bytes=CHUNK_CACHE_BYTES // len(paths)))
        obs, var = _read_annotations(path)
        if var.index.duplicated().any():
            dup = list(var.index[var.index.duplicated()].unique()[:5])
            raise InvalidDataError(
                f"{path} has duplicated gene names {dup}; make them unique before joining."
            )
        obs_frames.append(obs)
        var_names.append(pd.Index([str(v) for v in var.index]))
    genes = _join_genes(var_names, keys, join)
    position = pd.Series(np.arange(len(genes)), index=genes)
    maps = []
    for names in var_names:
        cmap = position.reindex(names).fillna(-1).to_numpy(dtype=np.int64)
        identity = len(names) == len(genes) and np.array_equal(cmap, np.arange(len(genes)))
        maps.append(None if identity else cmap)
    common = [c for c in obs_frames[0].columns if all(c in f.columns for f in obs_frames)]
    missing = {}
    for frame in obs_frames:
        for col in frame.columns:
            if col not in common:
                missing[str(col)] = [k for k, f in zip(keys, obs_frames) if col not in f.columns]
    obs = pd.concat([f[common] for f in obs_frames], axis=0)
    for col in common:  # categories differing per file become object; restore categorical
        if all(isinstance(f[col].dtype, pd.CategoricalDtype) for f in obs_frames):
            obs[col] = _joined_categorical([f[col] for f in obs_frames])
    names = obs.index.astype(str)
    if names.duplicated().any():
        file_keys = np.repeat(keys, [len(f) for f in obs_frames])
        names = pd.Index([f"{n}-{k}" for n, k in zip(names, file_keys)])
    obs.index = names
    if label is not None:
        if label in obs.columns:
            raise ValueError(
                f"The files already have an obs column {label!r}; pass another label= (or "
                "label=None) so the file names do not overwrite it."
            )
        obs[label] = pd.Categorical(np.repeat(keys, [len(f) for f in obs_frames]), categories=keys)
    uns = {
        COLLECTION_UNS_KEY: {
            "files": paths,
            "keys": keys,
            "n_obs": [int(p.shape[0]) for p in parts],
            "join": join,
            "missing_obs_columns": missing,
        }
    }
    X = CollectionCSR(parts, maps, len(genes))
    return anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes), uns=uns)


def missing_column_hint(adata, key: str) -> str:
    """Which files of a collection lack an ``obs`` column (empty when not applicable)."""
    info = getattr(adata, "uns", {}).get(COLLECTION_UNS_KEY)
    if not info or key not in info.get("missing_obs_columns", {}):
        return ""
    lacking = info["missing_obs_columns"][key]
    files = [f for f, k in zip(info["files"], info["keys"]) if k in lacking]
    return (
        f" The column exists in some files of this collection but is missing from {files}; "
        "read_collection keeps only obs columns present in every file. Add it to those files."
    )


def missing_column_error(adata, key, what: str = "obs column") -> MissingKeyError:
    """The error for an absent ``obs`` column: lists the user's columns (and collection hint)."""
    cols = [c for c in adata.obs.columns if not str(c).startswith(CELLVI_PREFIX)]  # user's own
    shown = cols[:15] + (["..."] if len(cols) > 15 else [])
    hint = missing_column_hint(adata, key)
    return MissingKeyError(
        f"{what} {key!r} not found in adata.obs. Available columns: {shown}.{hint}"
    )
