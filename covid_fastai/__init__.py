"""covid_fastai: fastai + timm rapid experiments for chest X-ray classification (infected vs normal).

`from covid_fastai import *` gives the layered API: data (`find_xray_folders`, `xray_dls`), models
(`xray_learner`), image reading (`open_xray`), fine-tune plans (`head`, `layers`, `full`, `freeze_to`,
`apply_plan`), recipes (`Recipe`, `load_recipe`, `run_recipe`), interpretation (`Evaluation`), evaluation of
finished runs (`evaluate_run`, `predict_run`) and ensembles of them (`evaluate_ensemble`,
`predict_ensemble`), balanced sampling (`balance_weights`), EMA of weights (`WeightsEMA`), sweeps (`run_sweep`, `resume_sweep`, `compare_runs`),
cross-validation (`run_cv`, `plan_cv`) and reports.

The names load on first use (PEP 562), so `python -m covid_fastai list` and a command's one-line errors do not wait
for fastai's import (about 8 s on 2 cores); `from covid_fastai import *` loads them all.
"""
__version__ = "0.1.0"

import importlib

from .quiet import fastai_import_quiet

# Modules whose whole __all__ the package exports, lightest first: a name is looked up in this order, so a recipe
# file's `from covid_fastai import Recipe, freeze_to` imports recipes and plans, not fastai.
_STAR = ("errors", "plans", "recipes", "augment", "data", "models", "callbacks", "interpret", "rundir", "learner",
         "train")
# Single names from other modules.
_NAMED = {"open_xray": "images", "scan_images": "images", "UnreadableImage": "images",
          "read_labels": "labels", "read_labels_csv": "labels", "demo_data": "demo", "make_demo_data": "demo",
          "EpochCheckpoint": "checkpoint", "load_export": "export", "evaluate_run": "evaluate",
          "predict_run": "evaluate", "evaluate_ensemble": "ensemble", "predict_ensemble": "ensemble",
          "balance_weights": "sampling", "WeightsEMA": "ema", "compare_runs": "sweep", "resume_sweep": "sweep",
          "run_sweep": "sweep", "audit_data": "audit", "audit_run": "audit", "plan_cv": "cv", "run_cv": "cv",
          "model_card": "modelcard", "write_model_card": "modelcard"}


def _module(name: str):
    with fastai_import_quiet(): return importlib.import_module(f".{name}", __name__)


def _exported() -> list[str]:
    "Every exported name (imports every module that exports one)."
    return [n for m in _STAR for n in _module(m).__all__] + list(_NAMED)


def __getattr__(name: str):
    if name == "__all__":
        value = _exported()
    elif name.startswith("_"):  # tools probe dunders (`__wrapped__`, IPython's): no import for those
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    elif name in _NAMED:
        value = getattr(_module(_NAMED[name]), name)
    else:
        module = next((m for m in map(_module, _STAR) if name in m.__all__), None)
        if module is None: raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(module, name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]: return sorted(set(globals()) | set(_exported()))
