"""Provenance: what config.json records about a run's data, weights, trainable parameters, speed and machine."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from . import __version__
from .augment import make_aug
from .callbacks import cpu_kind
from .data import patients_of
from .fit import momentum_used
from .recipes import Recipe

__all__ = ["versions", "git_commit", "run_facts"]


def versions() -> dict:
    "The versions of Python and the libraries a run used."
    import fastai
    import sklearn
    import timm
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "fastai": fastai.__version__, "timm": timm.__version__, "scikit-learn": sklearn.__version__,
            "covid_fastai": __version__}


def git_commit() -> str | None:
    "The commit of the checkout the package runs from; None outside git."
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_facts(recipe: Recipe, learn, folders, trainer) -> dict:
    """What config.json records about the data, weights, trainable parameters, speed settings and machine.
    `trainer`: the Learner that fits (`learn` itself, or a head-only Learner on cached features)."""
    n_train = sum(p.numel() for p in learn.model.parameters() if p.requires_grad)
    cached = trainer is not learn
    return {
        "data": {"path": str(folders.root), "synthetic": folders.synthetic, "classes": list(learn.dls.vocab),
                 "labels": recipe.labels,
                 "resize": make_aug(recipe.aug, recipe.size, recipe.resize).resize_to,  # short side before crops
                 "counts": folders.counts(),
                 "valid": (f"folder {folders.valid_name}/" if folders.valid_name
                           else f"random {recipe.valid_pct:.0%} of train"
                           + (" patients (labels.csv patient_id)" if patients_of(folders) else "")
                           + f" (seed {recipe.seed})"),
                 "test": "folder test/" if folders.has_test else None,
                 "skipped": folders.skipped_report()},
        "weights": learn.weights_provenance,
        "layer_groups": learn.group_names,
        "momentum": momentum_used(recipe.schedule, recipe.mom),
        "trainable": {"parameters": n_train, "tensors": len(learn.trainable), "names": learn.trainable},
        "speed": {"cpu_kind": cpu_kind(), "bf16_autocast": learn.bf16_used, "channels_last": recipe.channels_last,
                  # the recipe's size on a CPU without bf16 units; used: this run trains at it (recipe.size says so)
                  "fp32_size": ({"size": recipe.fp32_size, "used": getattr(learn, "fp32_size_used", False)}
                                if recipe.fp32_size else None),
                  "progressive": recipe.progressive or None,
                  "torch_threads": torch.get_num_threads(), "loader_workers": learn.dls.train.fake_l.num_workers,
                  "cached_features": ({"views": trainer.feature_views, "from_disk": trainer.features_from_disk,
                                       "seconds": round(trainer.feature_seconds, 3)} if cached else None),
                  "feature_cache_decision": learn.feature_cache_decision},
        "versions": versions(), "git_commit": git_commit(), "command": sys.argv,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
    }
