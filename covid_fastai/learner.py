"""Learner assembly: a recipe's data, model, speed callbacks and fine-tune plan as one fastai `Learner`."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from fastcore.meta import delegates
from fastai.vision.all import set_seed

from .callbacks import BF16Autocast, ChannelsLast, ProgressiveResize, bf16_supported, fp32_cpu, parse_progressive
from .augment import XrayAugment, make_aug
from .data import find_xray_folders, xray_dls
from .demo import demo_data
from .errors import RecipeError
from .labels import fine_label_getter
from .models import xray_learner
from .plans import apply_plan
from .recipes import Recipe

__all__ = ["resolve_data", "folders_learner", "recipe_learner", "tta_aug", "for_this_cpu"]


def resolve_data(data: str) -> Path:
    "'demo' -> the synthetic set in the user cache; anything else is a folder path."
    return demo_data() if str(data) == "demo" else Path(data).expanduser().resolve()


def for_this_cpu(recipe: Recipe) -> Recipe:
    """The recipe as a new training run takes it on this machine: at its `fp32_size` on a CPU without bf16 units,
    else as written. `run` applies it; a resumed run, `evaluate` and `predict` keep the size the run recorded."""
    if recipe.fp32_size is None or recipe.fp32_size == recipe.size or not fp32_cpu(): return recipe
    return dataclasses.replace(recipe, size=recipe.fp32_size)


def tta_aug(recipe: Recipe) -> XrayAugment | None:
    "The augmentation of the recipe's TTA passes: policy `tta_aug` at `aug`'s short side; None: `aug` itself."
    if not recipe.tta_aug: return None
    return make_aug(recipe.tta_aug, recipe.size, make_aug(recipe.aug, recipe.size, recipe.resize).resize_to)


@delegates(xray_dls, but=["folders", "aug", "bs", "seed", "valid_pct", "num_workers"])
def folders_learner(recipe: Recipe, folders,
                    pretrained: bool | None = None,  # None: as the recipe (evaluation passes False, loads its own)
                    num_workers: int | None = None,  # loader workers; None: as the recipe
                    cbs=None,  # more callbacks for the Learner
                    path=None,  # the Learner's folder (a run's folder)
                    **kwargs):  # to `xray_dls`: get_y, vocab, balance (training runs only: evaluation reads as is)
    """The recipe's Learner over `folders`: DataLoaders, speed callbacks (channels-last, bf16 where supported) and
    model; no plan applied."""
    dls = xray_dls(folders, make_aug(recipe.aug, recipe.size, recipe.resize), bs=recipe.bs, seed=recipe.seed,
                   valid_pct=recipe.valid_pct, num_workers=recipe.workers if num_workers is None else num_workers,
                   **kwargs)
    use_bf16 = recipe.bf16 and bf16_supported("cuda" if torch.cuda.is_available() else "cpu")
    speed = ([ChannelsLast()] if recipe.channels_last else []) + ([BF16Autocast()] if use_bf16 else [])
    if recipe.progressive: speed.append(ProgressiveResize(parse_progressive(recipe.progressive)))
    learn = xray_learner(dls, recipe.arch, pretrained=recipe.pretrained if pretrained is None else pretrained,
                         weights=recipe.weights, head=recipe.head, hidden=recipe.hidden, dropout=recipe.dropout,
                         opt=recipe.opt, mom=0.9 if recipe.mom is None else recipe.mom, wd=recipe.wd,
                         train_bn=recipe.train_bn, lr=recipe.lr, label_smoothing=recipe.label_smoothing,
                         bn_freeze=recipe.bn_freeze, cbs=speed + list(cbs or []), path=path)
    learn.bf16_used = use_bf16
    return learn


def recipe_learner(recipe: Recipe, path=None, cbs=None):
    """(Learner with the recipe's plan applied, XrayFolders) — for REPL use; `run` adds the run folder, and first
    sizes a new run for this CPU (`for_this_cpu`)."""
    check_plan_epochs(recipe)
    folders = find_xray_folders(resolve_data(recipe.data))
    set_seed(recipe.seed)
    # Three-class mode: classes from labels.csv's fine_label (covid / pneumonia / normal) instead of folders.
    get_y, vocab = (fine_label_getter(folders, [f for s in folders.splits for f in folders.files(s)])
                    if recipe.labels == "fine_label" else (None, None))
    learn = folders_learner(recipe, folders, get_y=get_y, vocab=vocab, cbs=cbs, path=path, balance=recipe.balance)
    learn.trainable = apply_plan(learn, recipe.plan)
    return learn, folders


def check_plan_epochs(recipe: Recipe):
    "A plan that unfreezes after k epochs needs a fit of more than k (else it would silently never unfreeze)."
    k = recipe.plan.freeze_epochs
    if k is not None and recipe.epochs <= k:
        raise RecipeError(f"recipe {recipe.name!r} unfreezes its model after {k} epoch(s), but trains {recipe.epochs}",
                          f"give --epochs {k + 1} or more")
