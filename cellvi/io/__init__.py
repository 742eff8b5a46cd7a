"""The versioned, pickle-free, crash-safe model-file format."""

from ._atomic import atomic_directory, atomic_file
from ._backup import check_sha256, fetch_backup
from ._codec import from_plain, to_plain
from ._format import FORMAT_VERSION, read_model_file, write_model_dir

__all__ = [
    "FORMAT_VERSION",
    "atomic_directory",
    "atomic_file",
    "check_sha256",
    "fetch_backup",
    "from_plain",
    "read_model_file",
    "to_plain",
    "write_model_dir",
]
