"""Counts in a TileDB-SOMA experiment, read by blocks of cells (optional extra ``tiledbsoma``)."""

from __future__ import annotations

import os

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

from ..errors import InvalidDataError, MissingKeyError
from ._backed import RowSource

__all__ = ["SomaRows", "read_soma"]


def _tiledbsoma():
    try:
        import tiledbsoma
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading TileDB-SOMA needs the optional extra: pip install 'cellvi[tiledbsoma]'."
        ) from err
    return tiledbsoma


class SomaRows(RowSource):
    """The cells of a SOMA query as a CSR matrix read on demand.

    Rows are the query's cells (by ``soma_joinid``, in query order) and columns its genes;
    ``read_rows`` reads the requested cells' coordinates from the SOMA ``X`` layer.

    Parameters
    ----------
    uri
        The SOMA experiment.
    measurement_name, X_name
        Measurement and ``X`` layer holding the counts.
    obs_joinids, var_joinids
        ``soma_joinid`` of the rows and of the columns, in order.
    """

    fork_safe = False  # TileDB's thread pools do not survive fork: workers are spawned

    def __init__(self, uri: str, measurement_name: str, X_name: str, obs_joinids, var_joinids):
        self.uri, self.measurement_name, self.X_name = str(uri), measurement_name, X_name
        self.obs_joinids = np.asarray(obs_joinids, dtype=np.int64)
        self.var_joinids = np.asarray(var_joinids, dtype=np.int64)
        self._var_order = np.argsort(self.var_joinids, kind="stable")
        self._var_sorted = self.var_joinids[self._var_order]
        self._shape = (len(self.obs_joinids), len(self.var_joinids))
        self._handles = None
        self._pid = None
        self._dtype = np.dtype(np.float32)

    def _X(self):
        if self._handles is None or self._pid != os.getpid():
            soma = _tiledbsoma()
            experiment = soma.Experiment.open(self.uri)
            measurement = experiment.ms[self.measurement_name]
            # most genes selected: read whole rows and drop the others (faster than a gene
            # coordinate list); few genes: ask SOMA for those only
            all_genes = len(self.var_joinids) >= 0.5 * measurement.var.count
            self._handles = (experiment, measurement.X[self.X_name], all_genes)
            self._pid = os.getpid()
        return self._handles[1]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = None
        state["_pid"] = None
        return state

    def describe(self) -> str:
        return f"SOMA {self.uri} [{self.measurement_name}/X/{self.X_name}]"

    def _columns(self, joinids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self._var_sorted, joinids)
        pos = np.minimum(pos, len(self._var_sorted) - 1)
        found = self._var_sorted[pos] == joinids
        return np.where(found, self._var_order[pos], -1)

    def _read_sorted(self, rows: np.ndarray) -> sparse.csr_matrix:
        wanted = self.obs_joinids[rows]
        unique = np.unique(wanted)
        X = self._X()
        coords = (unique,) if self._handles[2] else (unique, self.var_joinids)
        table = X.read(coords=coords).tables().concat()
        dim0 = table["soma_dim_0"].to_numpy()
        cols = self._columns(table["soma_dim_1"].to_numpy())
        data = table["soma_data"].to_numpy().astype(np.float32, copy=False)
        keep = cols >= 0
        block = sparse.csr_matrix(
            (data[keep], (np.searchsorted(unique, dim0[keep]), cols[keep])),
            shape=(len(unique), self._shape[1]),
        )
        if len(unique) == len(wanted) and np.array_equal(unique, wanted):
            return block
        return block[np.searchsorted(unique, wanted)]


def read_soma(
    uri: str,
    measurement_name: str = "RNA",
    X_name: str = "raw",
    obs_value_filter: str | None = None,
    var_value_filter: str | None = None,
    obs_column_names: list[str] | None = None,
    obs_id_column: str = "obs_id",
    var_id_column: str = "var_id",
) -> anndata.AnnData:
    """An AnnData over a SOMA query whose counts stay in the experiment.

    ``obs`` and ``var`` of the query are loaded; ``X`` is a :class:`SomaRows` reading cells
    on demand, so the usual ``setup_anndata`` and training path works on it.

    Parameters
    ----------
    uri
        SOMA experiment (local path or URI).
    measurement_name
        Measurement with the counts (``"RNA"``).
    X_name
        ``X`` layer with raw counts (``"raw"``; ``tiledbsoma.io.from_anndata`` writes
        ``"data"`` unless told otherwise).
    obs_value_filter, var_value_filter
        SOMA value filters selecting cells and genes, e.g. ``"tissue == 'blood'"``.
    obs_column_names
        ``obs`` columns to load (default all).
    obs_id_column, var_id_column
        Columns used as cell and gene names when present.

    Raises
    ------
    MissingKeyError
        If the measurement or layer does not exist (the message lists those that do).
    InvalidDataError
        If the query selects no cells or no genes.
    """
    soma = _tiledbsoma()
    with soma.Experiment.open(str(uri)) as experiment:
        if measurement_name not in experiment.ms:
            raise MissingKeyError(
                f"measurement {measurement_name!r} not in {uri}; have {list(experiment.ms.keys())}."
            )
        layers = list(experiment.ms[measurement_name].X.keys())
        if X_name not in layers:
            raise MissingKeyError(f"X layer {X_name!r} not in {uri}; have {layers}.")
        query = experiment.axis_query(
            measurement_name,
            obs_query=soma.AxisQuery(value_filter=obs_value_filter),
            var_query=soma.AxisQuery(value_filter=var_value_filter),
        )
        columns = None
        if obs_column_names is not None:
            columns = list(dict.fromkeys(["soma_joinid", obs_id_column, *obs_column_names]))
        obs = query.obs(column_names=columns).concat().to_pandas()
        var = query.var().concat().to_pandas()
    if obs.empty or var.empty:
        raise InvalidDataError(
            f"The SOMA query selects {len(obs)} cells and {len(var)} genes; adjust "
            f"obs_value_filter={obs_value_filter!r} / var_value_filter={var_value_filter!r}."
        )
    X = SomaRows(uri, measurement_name, X_name, obs["soma_joinid"], var["soma_joinid"])
    obs.index = pd.Index(
        obs[obs_id_column].astype(str) if obs_id_column in obs else obs["soma_joinid"].astype(str)
    )
    var.index = pd.Index(
        var[var_id_column].astype(str) if var_id_column in var else var["soma_joinid"].astype(str)
    )
    return anndata.AnnData(X=X, obs=obs, var=var)
