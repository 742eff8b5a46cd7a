"""The versioned, pickle-free, crash-safe model-file format."""

from ._atomic import atomic_directory, atomic_file
from ._backup import check_sha256, fetch_backup
from ._codec import from_plain, to_plain
from ._format import FORMAT_VERSION, h5ad_stamp, read_model_file, stamp_h5ad, write_model_dir

__all__ = [
    "FORMAT_VERSION",
    "atomic_directory",
    "atomic_file",
    "check_sha256",
    "fetch_backup",
    "from_plain",
    "h5ad_stamp",
    "read_model_file",
    "stamp_h5ad",
    "to_plain",
    "write_model_dir",
]
