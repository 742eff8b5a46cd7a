"""A model file's backup copy (``load(backup_url=...)``) and its SHA-256 check."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from ..errors import ModelFileError

__all__ = ["fetch_backup", "check_sha256"]

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_BLOCK = 1 << 20


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _checked_hash(sha256) -> str | None:
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or not _HEX64.fullmatch(sha256):
        raise ValueError(
            f"sha256={sha256!r} must be the file's SHA-256 as 64 hexadecimal characters "
            "(e.g. from `sha256sum model.pt`)."
        )
    return sha256.lower()


def check_sha256(path: str | Path, sha256: str | None) -> None:
    """Raise :class:`ModelFileError` unless ``path``'s SHA-256 is ``sha256`` (None: no check).

    Examples
    --------
    >>> import hashlib, pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.pt"
    >>> _ = path.write_bytes(b"weights")
    >>> check_sha256(path, hashlib.sha256(b"weights").hexdigest())
    """
    expected = _checked_hash(sha256)
    if expected is None:
        return
    found = _digest(Path(path))
    if found != expected:
        raise ModelFileError(
            f"{path} has SHA-256 {found}, not the expected {expected}: the file is damaged or "
            "not the one you meant. Fetch it again (or check the hash you passed)."
        )


def _local_source(url: str) -> Path:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a path
        return Path(url)
    raise ValueError(
        f"backup_url={url!r}: cellvi does not download at run time (it never uses the "
        "network). Download the file yourself (e.g. `curl -L -o model.pt <url>`), then pass "
        "its folder as dir_path, or its local path or file:// URL as backup_url; give sha256= "
        "to check it."
    )


def fetch_backup(target: str | Path, backup_url, sha256: str | None = None) -> None:
    """Copy a model file from ``backup_url`` (a local path or ``file://`` URL) to ``target``
    when ``target`` is missing, checking ``sha256`` if given. The copy is written beside
    ``target`` and renamed into place only once complete and checked, so a failed or
    mismatching copy never leaves a file behind. An existing ``target`` is only checked.
    """
    target = Path(target)
    expected = _checked_hash(sha256)
    if target.is_file():
        check_sha256(target, expected)
        return
    if backup_url is None:
        return
    source = _local_source(os.fspath(backup_url))
    if not source.is_file():
        raise FileNotFoundError(
            f"{target} is missing and its backup_url {os.fspath(backup_url)!r} names no file "
            f"({source} does not exist); pass the path or file:// URL of an existing copy."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, _BLOCK)
        check_sha256(tmp, expected)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
