"""The library's user cache: converted weights and the generated demo set."""
import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    "`$COVID_FASTAI_CACHE`, else `~/.cache/covid_fastai`."
    return Path(os.environ.get("COVID_FASTAI_CACHE") or Path.home() / ".cache" / "covid_fastai").expanduser()
