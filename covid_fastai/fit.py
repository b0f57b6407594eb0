"""The fit policy: which Learner fits, at what rates (lr_find, lr_mult), on which schedule and momentum.

A recipe's `schedule` is 'constant' (the seed's plain `fit`) or 'one_cycle' (fastai's `fit_one_cycle`, which
cycles the momentum too unless the recipe gives `mom`). `lr_mult > 1` gives discriminative rates over the
plan's layer groups, `slice(lr / lr_mult, lr)`. A frozen body can fit as a head-only Learner on cached
features (features.py); `fitting_learner` makes that choice.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from .distributed import world_size
from .ema import ema_callbacks
from .features import head_learner, use_feature_cache
from .recipes import Recipe, cache_mode

__all__ = ["momentum_used", "mom_trained_with", "learning_rates", "fit_recipe", "find_lr", "fitting_learner",
           "deterministic"]


def momentum_used(schedule: str, mom: float | None) -> str:
    "The momentum (Adam beta1) a fit uses: fit_one_cycle cycles it unless the recipe holds it constant."
    if mom is None: return "0.95→0.85→0.95 (fastai's one-cycle)" if schedule == "one_cycle" else "0.9 (constant)"
    return f"{mom} (constant)"


def mom_trained_with(config: dict) -> float | None:
    "A run's `mom` as it trained: before config.json recorded 'momentum', fit_one_cycle always cycled (None)."
    rec = config["recipe"]
    if "momentum" not in config and rec.get("schedule") == "one_cycle": return None
    return rec.get("mom")


def learning_rates(recipe: Recipe, lr: float | None = None):
    "The rate to fit with (`lr`, else the recipe's), as `slice(lr / lr_mult, lr)` over the groups when lr_mult > 1."
    lr = recipe.lr if lr is None else lr
    return slice(lr / recipe.lr_mult, lr) if recipe.lr_mult > 1 else lr


def fit_recipe(learn, recipe: Recipe, lr: float | None = None, start_epoch: int = 0):
    "Fit for the recipe's epochs; from `start_epoch` on resume (fastai skips the earlier ones, schedule intact)."
    lr = learning_rates(recipe, lr)
    if recipe.schedule == "one_cycle":
        # fit_one_cycle schedules the momentum too, over-writing the optimiser's: an explicit `mom` is held constant
        moms = None if recipe.mom is None else (recipe.mom,) * 3
        learn.fit_one_cycle(recipe.epochs, lr, moms=moms, start_epoch=start_epoch)
    else: learn.fit(recipe.epochs, lr, start_epoch=start_epoch)  # 'constant', the seed: no schedule


def find_lr(learn, recipe: Recipe, run_dir=None, quiet=()) -> dict:
    """fastai's `lr_find` (valley suggestion) on `learn`, at most one epoch of mock training; the plot is saved as
    `run_dir/lr_find.png`. Callbacks in `quiet` (the run's loggers and checkpoints) are out of the loop meanwhile."""
    n_it = max(20, min(100, len(learn.dls.train)))  # one epoch of batches: enough for the valley on small sets
    with learn.removed_cbs(list(quiet)):
        sug = learn.lr_find(num_it=n_it, show_plot=run_dir is not None)
    if run_dir is not None:
        import matplotlib.pyplot as plt
        plt.gcf().savefig(Path(run_dir) / "lr_find.png", dpi=100, bbox_inches="tight")
        plt.close("all")
        with contextlib.suppress(OSError): (Path(run_dir) / learn.model_dir).rmdir()  # lr_find's emptied temp folder
    lr = float(sug.valley)
    ok = lr == lr and lr > 0  # NaN when the loss diverged at once
    return {"lr": lr if ok else recipe.lr, "valley": lr, "iterations": n_it, "used_fallback": not ok}


def fitting_learner(learn, recipe: Recipe, cbs):
    """The Learner that fits: a head-only Learner on cached body features when the body is frozen, else `learn`;
    with the recipe's EMA of weights (covid_fastai.ema) among its callbacks."""
    use, why = use_feature_cache(learn, cache_mode(recipe.cache_features), recipe.aug)
    if use and recipe.balance != "none":  # the cache's loaders draw every image once: they would ignore the weights
        use, why = False, f"balance {recipe.balance!r} weights the image draws: not cached"
    if use and world_size() > 1:  # each process would compute (and write) its own cache of the same images
        use, why = False, f"not cached: data-parallel over {world_size()} processes; {why}"
    cbs = [*cbs, *ema_callbacks(recipe.ema)]
    learn.feature_cache_decision = why
    if use:
        t0 = time.perf_counter()
        hl = head_learner(learn, recipe, views=recipe.cache_views, bf16=learn.bf16_used, cbs=cbs)
        hl.feature_seconds = time.perf_counter() - t0
        hl.feature_cache_decision = why
        return hl
    learn.add_cbs(cbs)
    learn.feature_seconds = 0.0
    return learn


@contextlib.contextmanager
def deterministic(on: bool):
    "torch's deterministic algorithms (and no cuDNN autotuning) for the duration of a run, when asked for."
    if not on:
        yield
        return
    prev = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic GEMMs
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev[1], prev[2]
