"""Data registration: fields, the AnnData manager, input checks.

``simulate`` and ``synthetic_iid`` (from :mod:`cellvi.simulate`) are also available here.
"""

from ._backed import DiskCSR, RowSource, as_row_source, is_on_disk, read_backed, row_totals
from ._checks import check_count_matrix, check_var_names
from ._collection import CollectionCSR, read_collection
from ._fields import (
    BaseField,
    CategoricalObsField,
    LabelsWithUnlabeledObsField,
    LayerField,
)
from ._joint_fields import CategoricalJointObsField, NumericalJointObsField, ObsmField
from ._manager import AnnDataManager, SummaryStats
from ._numeric_field import NumericalObsField
from ._setup import standard_fields

__all__ = [
    "AnnDataManager",
    "CollectionCSR",
    "DiskCSR",
    "RowSource",
    "as_row_source",
    "is_on_disk",
    "read_backed",
    "read_collection",
    "read_soma",
    "row_totals",
    "standard_fields",
    "BaseField",
    "CategoricalJointObsField",
    "CategoricalObsField",
    "LabelsWithUnlabeledObsField",
    "LayerField",
    "NumericalJointObsField",
    "NumericalObsField",
    "ObsmField",
    "SummaryStats",
    "check_count_matrix",
    "check_var_names",
    "simulate",
    "synthetic_iid",
]


def __getattr__(name: str):
    if name == "read_soma":
        from ._soma import read_soma

        return read_soma
    if name in ("simulate", "synthetic_iid"):
        from cellvi.simulate import simulate, synthetic_iid

        return {"simulate": simulate, "synthetic_iid": synthetic_iid}[name]
    raise AttributeError(f"module 'cellvi.data' has no attribute {name!r}")
