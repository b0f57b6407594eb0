"""Files that are whole or absent: atomic writes, and one process at a time per folder."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

__all__ = ["atomic_path", "write_atomic", "write_json", "folder_lock"]


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling of `path` to write; it replaces `path` only if the block finishes.

    A kill or an error mid-write leaves the previous file (or none) and no partial one: readers see the old
    file or the whole new one. The name carries the process id, so concurrent writers never share it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError): tmp.unlink()


def write_atomic(path, data: str | bytes) -> Path:
    "Write text or bytes to `path` atomically (see `atomic_path`)."
    with atomic_path(path) as tmp:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
    return Path(path)


def write_json(path, obj) -> Path:
    "`obj` as indented JSON, atomically; values JSON lacks (paths, numpy numbers) as their `str`."
    return write_atomic(path, json.dumps(obj, indent=2, default=str))


@contextlib.contextmanager
def folder_lock(folder, busy: Exception):
    """Hold an exclusive lock on `folder/.lock` for the block; raise `busy` at once if another process holds it.
    The lock goes with the process (a killed run leaves nothing to clean up)."""
    import fcntl
    with open(Path(folder) / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise busy from None
        yield
