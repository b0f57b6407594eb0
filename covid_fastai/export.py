"""fastai's pickled `export.pkl`: written on request, loaded only when trusted (model.safetensors is the safe file)."""
from __future__ import annotations

import warnings
from pathlib import Path

from .errors import ModelFileError

__all__ = ["export_learner", "load_export"]


def export_learner(learn, run_dir) -> Path:
    "fastai's `export.pkl` (a pickle: whoever loads it runs code it names); the run's callbacks left after the fit."
    logger, learn.logger = learn.logger, print
    try:
        learn.export(Path(run_dir) / "export.pkl")
    finally:
        learn.logger = logger
    return Path(run_dir) / "export.pkl"


def load_export(path, trust: bool = False):
    """Load a fastai `export.pkl` as a Learner. It is a pickle, which can run any code when loaded: `trust=True`
    is required, and a warning is given even then. For weights alone use `model.safetensors` (safe)."""
    if not trust:
        raise ModelFileError(f"{path} is a pickle (fastai export.pkl): loading it can run arbitrary code",
                             "load only files you made or trust, with trust=True (--trust_pickle true); "
                             "model.safetensors holds the weights without that risk", path=path)
    warnings.warn(f"loading pickled Learner {path}: only do this with files you trust", UserWarning, stacklevel=2)
    from fastai.learner import load_learner
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastai's own pickle warning repeats ours
        return load_learner(path, cpu=True)
