"""The library's user cache (converted weights, the generated demo set) and the content hash that keys caches."""
import hashlib
import os
from pathlib import Path

__all__ = ["cache_dir", "sha256_file"]


def cache_dir() -> Path:
    "`$COVID_FASTAI_CACHE`, else `~/.cache/covid_fastai`."
    return Path(os.environ.get("COVID_FASTAI_CACHE") or Path.home() / ".cache" / "covid_fastai").expanduser()


def sha256_file(path, chunk: int = 1 << 20) -> str:
    "sha256 of a file's bytes, read in chunks (hashlib.file_digest is 3.11+; the project supports 3.10)."
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""): h.update(b)
    return h.hexdigest()
