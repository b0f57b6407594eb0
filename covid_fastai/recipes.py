"""Recipes: one named experiment each, as plain data, kept one per file in `recipes/`.

A recipe file is a short Python file that defines `recipe = Recipe(...)` and ends with
`if __name__ == "__main__": main(recipe)`, so it runs with python. The CLI finds recipe files by name
in `./recipes`, in the `recipes/` beside this package (a source checkout), and in the folders listed in
`$COVID_FASTAI_RECIPES` (separated by `os.pathsep`).
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import plans
from .errors import UserError

__all__ = ["Recipe", "SEED_POLICY", "MODERN_POLICY", "POLICIES", "cache_mode", "recipe_dirs", "recipe_files", "find_recipe", "load_recipe", "list_recipes",
           "match_recipes", "with_overrides"]


@dataclass(frozen=True)
class Recipe:
    name: str                       # what the CLI and the output folder call it
    arch: str                       # timm name with pretrained tag, e.g. 'vgg16.tv_in1k'
    plan: plans.Plan                # which parameters train (see covid_fastai.plans)
    description: str = ""           # one line for `list` and the reports
    # data
    data: str = "demo"              # a folder in ImageFolder layout, or 'demo' (synthetic)
    size: int = 224                 # network input size (crop)
    resize: int | None = None       # short side before cropping (default: the augmentation's, see data.AUGMENTATIONS)
    aug: str = "seed"               # augmentation policy: see covid_fastai.data.AUGMENTATIONS
    bs: int = 128                   # batch size
    valid_pct: float = 0.2          # held-out part of train when the data has no valid/ folder
    # model
    pretrained: bool = True         # ImageNet weights (covid_fastai.weights) or random init
    weights: str | None = None      # explicit weights file (.pth / .safetensors) to load
    head: str = "seed"              # 'seed' (Linear-hidden-ReLU-Dropout-Linear), 'fastai' (create_head) or 'linear'
                                    # (timm's classifier: pool, dropout, Linear)
    hidden: int = 380               # hidden units of the head
    dropout: float = 0.5            # dropout before the last Linear
    train_bn: bool = False          # train BatchNorm affine params in frozen parts (fastai default True)
    bn_freeze: bool = False         # frozen BatchNorm layers in eval mode (fastai BnFreeze): fixed running stats
    # optimisation
    opt: str = "sgd"                # 'sgd' or 'adamw'
    lr: float = 1e-3                # learning rate (the head's); with lr_find, the fallback when it finds nothing
    lr_find: bool = False           # pick lr with fastai's lr_find (valley suggestion) before fitting
    lr_mult: float = 1.0            # discriminative rates: lowest group's lr = lr / lr_mult (1 = one rate, the seed)
    label_smoothing: float = 0.0    # label smoothing of the cross-entropy (0 = plain, the seed)
    mom: float | None = 0.9         # SGD momentum / Adam beta1, held constant. None (modern): 0.9, and under one_cycle
                                    # fastai's momentum cycle 0.95 -> 0.85 -> 0.95, which fit_one_cycle sets per batch
    wd: float = 0.0                 # weight decay
    schedule: str = "constant"      # 'constant' (learn.fit, the seed) or 'one_cycle' (fit_one_cycle)
    epochs: int = 10
    policy: str = "seed"            # the training policy the settings above came from: see POLICIES
    seed: int = 42                  # fastai set_seed for weights init, splits, shuffling, augmentation
    # speed
    bf16: bool = True               # bf16 autocast where the CPU/GPU supports it
    channels_last: bool = True      # channels-last memory format
    workers: int | None = None      # DataLoader workers (None: 0 on <=2 cores)
    cache_features: str = "auto"    # frozen body: run it once per view, train the head on cached features. 'auto':
                                    # only where that matches the uncached fit (no BatchNorm in training mode, see
                                    # covid_fastai.features); 'on' also with training-mode BatchNorm; 'off' never
    cache_views: int = 2            # augmented views of each training image in the feature cache
    reproducible: bool = False      # torch deterministic algorithms, no cuDNN autotuning (README: its cost)
    # evaluation
    threshold: str = "youden"       # decision threshold on p(infected), chosen on valid: youden | sens:0.95 | 0.3
    tta: bool = False               # test-time augmentation (fastai tta) for valid/test predictions
    labels: str = "folders"         # classes from 'folders', or 'fine_label' of <data>/labels.csv (3 classes)
    source: str = field(default="", compare=False)  # the file the recipe came from (filled in on load)

    def describe(self) -> str:
        "One line: what trains, and under which training policy."
        return f"{self.description or f'{self.arch}: {self.plan.describe()}'}, {self.policy} policy"


# The assignment's training policy, for faithful reproduction (see ../shared/seed/NOTES.md).
SEED_POLICY = dict(policy="seed", head="seed", hidden=380, dropout=0.5, opt="sgd", lr=1e-3, lr_find=False,
                   lr_mult=1.0, mom=0.9, wd=0.0, schedule="constant", epochs=10, bs=128, size=224, aug="seed",
                   train_bn=False, bn_freeze=False, label_smoothing=0.0, tta=False)

# fastai practice: AdamW with one-cycle, label smoothing, fastai's head, frozen BatchNorm statistics in frozen parts,
# mild X-ray augmentation, test-time augmentation (fastai `tta`) for the valid (threshold) and test predictions.
# Discriminative rates as in fastai's `fine_tune`: slice(lr/100, lr) over the plan's layer groups. With one AdamW
# rate of 1e-3 VGG-16 (no BatchNorm to rescale) blew up when 8 of its convs trained (docs/experiments.md, V20).
# lr_find is a switch (`--lr_find true`), off by default: on this data its valley (one epoch of mock training)
# suggested 1e-5..4e-4 and lost to a fixed 1e-3.
MODERN_POLICY = dict(policy="modern", head="fastai", hidden=512, dropout=0.5, opt="adamw", lr=1e-3, lr_find=False,
                     lr_mult=100.0, mom=None, wd=0.01, schedule="one_cycle", epochs=10, bs=64, size=224, aug="xray",
                     train_bn=False, bn_freeze=True, label_smoothing=0.1, tta=True)

POLICIES = {"seed": SEED_POLICY, "modern": MODERN_POLICY}

# What a command-line override may set, with checks; everything else in Recipe is fixed by the recipe file.
_POSITIVE_INT = ("epochs", "bs", "size", "resize", "hidden", "cache_views")
_POSITIVE_FLOAT = ("lr", "lr_mult")
_BOOL = ("pretrained", "bf16", "channels_last", "train_bn", "bn_freeze", "lr_find", "reproducible",
         "tta")


def _to_bool(key, v):
    if isinstance(v, bool): return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"): return True
    if s in ("0", "false", "no", "off", "none"): return False
    raise UserError(f"--{key} must be true or false, got {v!r}")


def _choices(key):
    "Allowed values of the fields that name a policy (looked up where each policy is defined)."
    if key == "aug":
        from .data import AUGMENTATIONS
        return sorted(AUGMENTATIONS)
    if key == "opt":
        from .models import OPTIMIZERS
        return sorted(OPTIMIZERS)
    if key == "policy": return sorted(POLICIES)
    if key == "head":
        from .models import HEADS
        return sorted(HEADS)
    return {"schedule": ["constant", "one_cycle"],
            "labels": ["fine_label", "folders"]}.get(key)


def cache_mode(v) -> str:
    "'auto', 'on' or 'off' from a recipe's `cache_features` (true/false accepted for on/off)."
    if str(v).strip().lower() == "auto": return "auto"
    try: return "on" if _to_bool("cache_features", v) else "off"
    except UserError: raise UserError(f"--cache_features must be auto, on or off, got {v!r}") from None


def _check(key, v):
    if key in _BOOL: return _to_bool(key, v)
    if key == "cache_features": return cache_mode(v)
    if key == "threshold":
        from .metrics import choose_threshold
        choose_threshold([0, 1], [0.2, 0.8], v)  # raises a UserError on a bad rule
        return str(v)
    if _choices(key) is not None:
        if str(v) not in _choices(key):
            raise UserError(f"--{key} must be one of {', '.join(_choices(key))}, got {v!r}")
        return str(v)
    if key in _POSITIVE_INT:
        try: iv = int(str(v))
        except ValueError: raise UserError(f"--{key} must be a positive whole number, got {v!r}") from None
        if iv <= 0: raise UserError(f"--{key} must be a positive whole number, got {v!r}")
        return iv
    if key in _POSITIVE_FLOAT:
        try: fv = float(str(v))
        except ValueError: raise UserError(f"--{key} must be a positive number, got {v!r}") from None
        if not fv > 0: raise UserError(f"--{key} must be a positive number, got {v!r}")
        if key == "lr_mult" and fv < 1:  # the lowest group's rate is lr / lr_mult: below 1 it would exceed the head's
            raise UserError(f"--lr_mult must be at least 1 (1 = one rate for every layer group), got {v!r}")
        return fv
    if key in ("seed", "workers"):
        try: return int(str(v))
        except ValueError: raise UserError(f"--{key} must be a whole number, got {v!r}") from None
    if key == "mom" and str(v).strip().lower() == "none": return None
    if key == "weights" and v is not None:  # pinned: a run or sweep may be resumed from another folder
        return str(Path(str(v)).expanduser().resolve())
    if key in ("dropout", "valid_pct", "wd", "mom", "label_smoothing"):
        try: fv = float(str(v))
        except ValueError: raise UserError(f"--{key} must be a number, got {v!r}") from None
        if not 0 <= fv < (1 if key != "wd" else float("inf")):
            raise UserError(f"--{key} out of range: {v!r}")
        return fv
    return None if v is None else str(v)


OVERRIDABLE = [f.name for f in dataclasses.fields(Recipe) if f.name not in ("name", "plan", "description", "source")]


def with_overrides(recipe: Recipe, **overrides) -> Recipe:
    """A copy of `recipe` with command-line style overrides checked and applied (`epochs='3'` works).

    `policy='modern'` (or 'seed') first replaces every training setting with that policy's (see POLICIES), keeping
    the recipe's architecture, plan and data; the other overrides then apply on top.
    """
    bad = [k for k in overrides if k not in OVERRIDABLE]
    if bad:
        hint = difflib.get_close_matches(bad[0], OVERRIDABLE, n=3)
        raise UserError(f"unknown option --{bad[0]}" + (f" (did you mean {', '.join('--' + h for h in hint)}?)"
                        if hint else f": options are {', '.join('--' + o for o in OVERRIDABLE)}"))
    checked = {k: _check(k, v) for k, v in overrides.items()}
    if "policy" in checked: recipe = dataclasses.replace(recipe, **POLICIES[checked["policy"]])
    out = dataclasses.replace(recipe, **checked)
    if out.weights and not out.pretrained:
        raise UserError(f"--weights {out.weights} is loaded only with pretrained weights on: drop --pretrained false "
                        f"(or --weights for a random-init run)")
    return out


def recipe_dirs() -> list[Path]:
    dirs = [Path.cwd() / "recipes", Path(__file__).resolve().parent.parent / "recipes"]
    dirs += [Path(p) for p in os.environ.get("COVID_FASTAI_RECIPES", "").split(os.pathsep) if p]
    out = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]: out.append(d)
    return out


def recipe_files() -> dict[str, Path]:
    "{recipe name: file}; a name found in several folders comes from the first (cwd wins)."
    found = {}
    for d in recipe_dirs():
        for f in sorted(d.glob("*.py")):
            if not f.name.startswith("_"): found.setdefault(f.stem, f)
    return found


def find_recipe(name: str) -> Path:
    "The file of recipe `name` (or `name` itself if it is a path to a .py file)."
    if name.endswith(".py") and Path(name).is_file(): return Path(name)
    files = recipe_files()
    if name in files: return files[name]
    close = difflib.get_close_matches(name, list(files), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "see `python -m covid_fastai list`"
    raise UserError(f"unknown recipe {name!r}: {hint}")


def load_recipe(name_or_path) -> Recipe:
    "Execute a recipe file (its `__main__` block does not run) and return its `recipe`."
    path = find_recipe(str(name_or_path))
    spec = importlib.util.spec_from_file_location(f"covid_fastai_recipe_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rec = getattr(mod, "recipe", None)
    if not isinstance(rec, Recipe):
        raise UserError(f"{path} defines no `recipe = Recipe(...)`: see recipes/vgg16_partial.py for the shape")
    return dataclasses.replace(rec, source=str(path))


def list_recipes() -> list[Recipe]:
    return [load_recipe(f) for f in recipe_files().values()]


def match_recipes(pattern: str) -> list[Recipe]:
    "Recipes whose name matches a glob (`vgg16_*`) or a comma-separated list of names/globs."
    pats = [p.strip() for p in pattern.split(",") if p.strip()]
    files = list(recipe_files())
    names = []  # in the order listed, each once: a typo must not quietly drop a run from an hours-long sweep
    for p in pats:
        hits = [n for n in files if fnmatch.fnmatchcase(n, p)]
        if not hits:
            close = difflib.get_close_matches(p, files, n=3, cutoff=0.5)
            raise UserError(f"no recipe matches {p!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                            + ": see `python -m covid_fastai list`")
        names += [n for n in hits if n not in names]
    return [load_recipe(n) for n in names]
