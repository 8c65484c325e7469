"""Atomic file writes: a temporary file in the same directory, fsync, then rename over the target.

An interrupted or failed write (kill -9, disk full) leaves whatever was at the target before intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from .errors import LorakitError


class WriteError(LorakitError, OSError):
    """A file could not be written; the previous file at that path is unchanged."""


def prepare_directory(path: str | os.PathLike) -> Path:
    """Create `path` (and parents) as a directory; a one-line error if it is a file or cannot be created."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise WriteError(f"{directory} exists and is a file; choose a directory path for the output")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(
            f"cannot create directory {directory}: {exc.strerror or exc}; choose a writable path"
        ) from None
    if not os.access(directory, os.W_OK):
        raise WriteError(f"directory {directory} is not writable; choose a writable path or fix its permissions")
    return directory


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    target = Path(path)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a write that was killed
        with contextlib.suppress(OSError):
            stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise WriteError(
            f"could not write {target}: {exc.strerror or exc}; the previous file there (if any) is unchanged"
        ) from None
    _fsync_directory(target.parent)


def replace_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename `source` over `target` (atomic on POSIX) and make the rename durable."""
    try:
        os.replace(source, target)
    except OSError as exc:
        raise WriteError(f"could not rename {source} to {target}: {exc.strerror or exc}") from None
    _fsync_directory(Path(target).parent)


def write_json(path: str | os.PathLike, payload) -> None:
    write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
