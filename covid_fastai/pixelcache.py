"""Decoded images shared on disk: one memory-mapped uint8 store per (image list, working size), built once.

At COVIDx scale (85k images) a per-process cache of decoded pixels costs 5+ GB per process, times ranks and
loader workers. A `PixelStore` instead holds every image of a run's train+valid list, decoded and resized by
the caller's `decode` function, in `<cache>/decoded/<key>/`:

- `pixels.u8`: the images' uint8 pixels back to back (each at its own shape: nothing padded or cropped, so the
  pixels are exactly what `decode` returned);
- `index.npy`: one row per image, (offset, height, width, size, mtime_ns);
- `files.json`: the images' real paths, in row order.

The key hashes the working size and each distinct image's real path (in sorted order), byte size and modification
time (a `stat`, not a read: the key of 85k images costs well under a second), so a changed data set or size makes a
new store. Processes
read the store through `numpy.memmap`: ranks and DataLoader workers share the operating system's page cache,
and nothing is copied per process. The build is atomic and happens once: builders take a lock per key (a second
rank or worker waits, then reuses the winner's store), write into a temporary folder and rename it into place,
so a killed build leaves no partial store.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat as statmod
from pathlib import Path
from typing import Callable

import numpy as np

from .cache import cache_dir
from .progress import phase

__all__ = ["PixelStore", "store_key", "open_or_build", "build_store", "STORE_VERSION"]

STORE_VERSION = 1  # bump when the layout or what `decode` means changes


def _real_stat(f, dirs: dict) -> tuple[str, os.stat_result]:
    """(real path, stat) of `f` in one system call where `f` is no symlink: its folder is resolved once per folder
    (in `dirs`), not once per file as `os.path.realpath` would (a third of the warm start-up at 20k images)."""
    d, name = os.path.split(os.path.abspath(f))
    rd = dirs.get(d)
    if rd is None: rd = dirs[d] = os.path.realpath(d)
    p = os.path.join(rd, name)
    st = os.lstat(p)
    if statmod.S_ISLNK(st.st_mode):  # the symlinks of a data view (a cross-validation fold) share the file's pixels
        p = os.path.realpath(p)
        st = os.stat(p)
    return p, st


def _identity(files) -> list[tuple[str, int, int]]:
    """(real path, byte size, mtime_ns) per distinct file, sorted by path: what decides whether cached pixels are
    still the file's. Sorted, so the folds of a cross-validation (the same images split differently) share one store."""
    out, dirs = {}, {}
    for f in files:
        p, st = _real_stat(f, dirs)
        out[p] = (p, st.st_size, st.st_mtime_ns)
    return sorted(out.values())


def store_key(identity, size) -> str:
    "A hash of the working size and every file's (real path, size, mtime): the store's folder name."
    h = hashlib.sha256(json.dumps({"version": STORE_VERSION, "size": size}, sort_keys=True).encode())
    for p, n, m in identity: h.update(f"{p}|{n}|{m}\n".encode())
    return h.hexdigest()[:24]


class PixelStore:
    "A built store, memory-mapped read-only; `get(path)` -> the decoded uint8 array, or None when not stored."
    def __init__(self, folder):
        self.folder = Path(folder)
        self.index = np.load(self.folder / "index.npy")
        self.pixels = np.memmap(self.folder / "pixels.u8", dtype=np.uint8, mode="r")
        self.rows = {p: i for i, p in enumerate(json.loads((self.folder / "files.json").read_text()))}
        self._dirs = {}  # folder -> real folder, for `_real_stat`

    def __len__(self): return len(self.rows)

    def get(self, path) -> np.ndarray | None:
        """The stored pixels of `path` (a copy of one image, so nothing keeps the map alive), or None when the
        store lacks the file or the file changed since (other size or modification time)."""
        try: p, st = _real_stat(path, self._dirs)
        except OSError: return None  # gone: the caller's own decode says so
        i = self.rows.get(p)
        if i is None: return None
        off, h, w, n, m = (int(v) for v in self.index[i])
        if (st.st_size, st.st_mtime_ns) != (n, m): return None
        return np.array(self.pixels[off:off + h * w].reshape(h, w))

    def __getstate__(self): return {"folder": self.folder}  # reopened by path: a pickle never carries the pixels

    def __setstate__(self, d):
        try: self.__init__(d["folder"])
        except (OSError, ValueError):  # an exported learner on another machine, or a cache cleared since: empty
            self.folder, self.index, self.pixels, self.rows, self._dirs = Path(d["folder"]), None, None, {}, {}


def _decoded(decode: Callable, files, workers: int):
    "`decode(f)` for each file, in order; in `workers` processes when > 0 (fork, where the platform has it)."
    if workers <= 0:
        yield from map(decode, files)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
        yield from ex.map(decode, files, chunksize=64)


def build_store(folder, identity, decode: Callable, workers: int = 0, label: str = "") -> Path:
    """Decode every file of `identity` with `decode(path) -> 2-D uint8 array` into the store `folder`, atomically:
    written in a temporary sibling, renamed into place when whole. Returns `folder`."""
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        index = np.zeros((len(identity), 5), np.int64)
        off = 0
        files = [p for p, _, _ in identity]
        with open(tmp / "pixels.u8", "wb") as out, \
                phase(f"decode cache: decode and resize each of {len(files)} images once{label}",
                      total=len(files)) as ph:
            for i, arr in enumerate(ph(_decoded(decode, files, workers))):
                arr = np.ascontiguousarray(arr, dtype=np.uint8)
                if arr.ndim != 2: raise ValueError(f"decode({files[i]}) gave a {arr.ndim}-D array, not 2-D")
                out.write(arr.tobytes())
                index[i] = (off, arr.shape[0], arr.shape[1], identity[i][1], identity[i][2])
                off += arr.size
            if off == 0: out.write(b"\0")  # numpy cannot map an empty file
        np.save(tmp / "index.npy", index)
        (tmp / "files.json").write_text(json.dumps(files))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process (without our lock: e.g. a cache folder on NFS) finished first
            if not (folder / "files.json").exists(): raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextlib.contextmanager
def _key_lock(path):
    "An exclusive lock on `path` for the block, waiting for it: one builder per key, the others reuse its store."
    import fcntl
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def open_or_build(files, size, decode: Callable, root=None, workers: int = 0) -> PixelStore:
    """The store of `files` at working size `size` under `root` (default `<cache>/decoded`): opened when built
    before, else built now (once, whatever the number of processes asking at the same time). `decode(path)`
    returns a file's 2-D uint8 pixels at that size. OSError when the cache folder cannot be written."""
    identity = _identity(files)
    root = Path(root) if root is not None else cache_dir() / "decoded"
    folder = root / store_key(identity, size)
    if not (folder / "files.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        with _key_lock(root / f"{folder.name}.lock"):
            if not (folder / "files.json").exists():  # the process that held the lock may have built it meanwhile
                build_store(folder, identity, decode, workers, label=f" ({size} px)")
    return PixelStore(folder)
