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
from typing import Annotated, Literal

from . import plans
from .errors import Command, RecipeError
from .options import FIXED, POSITIVE, at_least, field_hints, in_range, one_of, parse_value, to_bool

__all__ = ["Recipe", "ASSIGNMENT_POLICY", "SEED_POLICY", "MODERN_POLICY", "POLICIES", "POLICY_ALIASES",
           "canonical_policy", "cache_mode", "recipe_dirs", "recipe_files", "find_recipe", "load_recipe",
           "list_recipes", "match_recipes", "with_overrides", "OVERRIDABLE"]


# The registries a field's value is chosen from, imported only when an override is checked.
def _augmentations():
    from .augment import AUGMENTATIONS
    return AUGMENTATIONS


def _heads():
    from .models import HEADS
    return HEADS


def _optimizers():
    from .models import OPTIMIZERS
    return OPTIMIZERS


def _policies(): return POLICIES


def _threshold_rule(key, v, raw):
    from .metrics import choose_threshold
    choose_threshold([0, 1], [0.2, 0.8], v)  # raises a RecipeError on a bad rule
    return v


def _cache_rule(key, v, raw): return cache_mode(raw)


def _tta_aug_rule(key, v, raw):
    if v and v not in _augmentations():
        raise RecipeError(f"--{key} must be one of {', '.join(sorted(_augmentations()))}, or \"\" for the training "
                          f"augmentation, got {raw!r}")
    return v


def _progressive_rule(key, v, raw):
    from .callbacks import parse_progressive
    parse_progressive(v)  # raises a RecipeError on a bad schedule
    return v


def _pinned_path(key, v, raw):  # pinned: a run or sweep may be resumed from another folder
    return str(Path(v).expanduser().resolve())


# Field types carry their command-line checks (covid_fastai.options): with_overrides reads them.
PositiveInt = Annotated[int, POSITIVE]
PositiveFloat = Annotated[float, POSITIVE]
Fraction = Annotated[float, in_range(0, 1)]  # 0 <= value < 1


@dataclass(frozen=True)
class Recipe:
    name: Annotated[str, FIXED]     # what the CLI and the output folder call it
    arch: str                       # timm name with pretrained tag, e.g. 'vgg16.tv_in1k'
    plan: Annotated[plans.Plan, FIXED]  # which parameters train (see covid_fastai.plans)
    description: Annotated[str, FIXED] = ""  # one line for `list` and the reports
    # data
    data: str = "demo"              # a folder in ImageFolder layout, or 'demo' (synthetic)
    size: PositiveInt = 224         # network input size (crop)
    # input size where training runs on a CPU without bf16 units (AVX2-only: fp32, about 2x the time of a bf16 step,
    # docs/speed.md); None: `size` there too. An explicit --size sets both
    fp32_size: PositiveInt | None = None
    resize: PositiveInt | None = None  # short side before cropping (default: the aug's, see augment.AUGMENTATIONS)
    aug: Annotated[str, one_of(_augmentations)] = "seed"  # augmentation policy: 'seed' is the assignment's pipeline
    bs: PositiveInt = 128           # batch size
    valid_pct: Fraction = 0.2       # held-out part of train when the data has no valid/ folder
    # weighted training draws (fastai WeightedDL, covid_fastai.sampling): 'label' = each class equally often,
    # 'source_label' = each (labels.csv source, label) cell equally often, 'label_in_source' = each source as often
    # as its share of the images, its labels equally; 'none' = every image once per epoch
    balance: Literal["none", "label", "source_label", "label_in_source"] = "none"
    # model
    pretrained: bool = True         # ImageNet weights (covid_fastai.weights) or random init
    weights: Annotated[str, _pinned_path] | None = None  # explicit weights file (.pth / .safetensors) to load
    head: Annotated[str, one_of(_heads)] = "seed"  # 'seed' (the assignment's Linear-hidden-ReLU-Dropout-Linear),
                                    # 'fastai' (create_head) or 'linear' (timm's classifier: pool, dropout, Linear)
    hidden: PositiveInt = 380       # hidden units of the head
    dropout: Fraction = 0.5         # dropout before the last Linear
    train_bn: bool = False          # train BatchNorm affine params in frozen parts (fastai default True)
    bn_freeze: bool = False         # frozen BatchNorm layers in eval mode (fastai BnFreeze): fixed running stats
    # optimisation
    opt: Annotated[str, one_of(_optimizers)] = "sgd"  # 'sgd' or 'adamw'
    lr: PositiveFloat = 1e-3        # learning rate (the head's); with lr_find, the fallback when it finds nothing
    lr_find: bool = False           # pick lr with fastai's lr_find (valley suggestion) before fitting
    # discriminative rates: lowest group's lr = lr / lr_mult (1 = one rate, the assignment's); below 1 the lowest
    # group's rate would exceed the head's
    lr_mult: Annotated[float, POSITIVE, at_least(1, "1 = one rate for every layer group")] = 1.0
    # data-parallel runs (docs/distributed.md): the global batch is bs x processes; 'linear' multiplies lr by the
    # number of processes (the linear scaling rule), 'none' keeps it
    lr_scaling: Literal["none", "linear"] = "none"
    label_smoothing: Fraction = 0.0  # label smoothing of the cross-entropy (0 = plain, the assignment's)
    mom: Fraction | None = 0.9      # SGD momentum / Adam beta1, held constant. None (modern): 0.9, and under one_cycle
                                    # fastai's momentum cycle 0.95 -> 0.85 -> 0.95, which fit_one_cycle sets per batch
    wd: Annotated[float, in_range(0)] = 0.0  # weight decay
    schedule: Literal["constant", "one_cycle"] = "constant"  # learn.fit (the assignment's) or fit_one_cycle
    epochs: PositiveInt = 10
    # decay of an exponential moving average of the weights (timm ModelEmaV3, e.g. 0.999; covid_fastai.ema): the
    # average is what validation scores and what the run saves. None = off
    ema: Annotated[float, POSITIVE, in_range(0, 1)] | None = None
    # the training policy the settings above came from: see POLICIES ('seed', its former name, is read as 'assignment')
    policy: Annotated[str, one_of(_policies, aliases={"seed": "assignment"})] = "assignment"
    seed: int = 42                  # RNG seed (fastai set_seed) for weights init, splits, shuffling, augmentation
    # speed
    bf16: bool = True               # bf16 autocast where the CPU/GPU supports it
    channels_last: bool = True      # channels-last memory format
    workers: int | None = None      # DataLoader workers (None: 0 on <=2 cores)
    # progressive resizing (fastai's technique): "SIZE:EPOCHS,..." trains the first epochs on batches downscaled to
    # SIZE, e.g. "128:2,160:2"; later epochs and all evaluation at `size`. "" (default): off
    progressive: Annotated[str, _progressive_rule] = ""
    # frozen body: run it once per view, train the head on cached features. 'auto': only where that matches the
    # uncached fit (no BatchNorm in training mode, see covid_fastai.features); 'on' also with training-mode
    # BatchNorm; 'off' never
    cache_features: Annotated[str, _cache_rule] = "auto"
    cache_views: PositiveInt = 2    # augmented views of each training image in the feature cache
    reproducible: bool = False      # torch deterministic algorithms, no cuDNN autotuning (README: its cost)
    # evaluation
    threshold: Annotated[str, _threshold_rule] = "youden"  # on p(infected), chosen on valid: youden | sens:0.95 | 0.3
    tta: bool = False               # test-time augmentation (fastai tta) for valid/test predictions
    # augmentation policy TTA's augmented passes draw from, at `aug`'s short side; "" (default): `aug`, the training one
    tta_aug: Annotated[str, _tta_aug_rule] = ""
    labels: Literal["fine_label", "folders"] = "folders"  # classes from folders, or <data>/labels.csv's fine_label
    source: Annotated[str, FIXED] = field(default="", compare=False)  # the file the recipe came from (set on load)

    def __post_init__(self):  # runs recorded before the rename say policy 'seed' (config.json, sweep.json)
        object.__setattr__(self, "policy", canonical_policy(self.policy))

    def describe(self) -> str:
        "One line: what trains, and under which training policy."
        return f"{self.description or f'{self.arch}: {self.plan.describe()}'}, {self.policy} policy"


# The assignment's training policy, for faithful reproduction (see ../shared/seed/NOTES.md). Its head and
# augmentation keep their recorded names, 'seed'.
ASSIGNMENT_POLICY = dict(policy="assignment", head="seed", hidden=380, dropout=0.5, opt="sgd", lr=1e-3,
                         lr_find=False, lr_mult=1.0, mom=0.9, wd=0.0, schedule="constant", epochs=10, bs=128, size=224,
                         fp32_size=None, aug="seed", train_bn=False, bn_freeze=False, label_smoothing=0.0, tta=False)
SEED_POLICY = ASSIGNMENT_POLICY  # former name

# fastai practice: AdamW with one-cycle, label smoothing, fastai's head, frozen BatchNorm statistics in frozen parts,
# mild X-ray augmentation, test-time augmentation (fastai `tta`) for the valid (threshold) and test predictions.
# Discriminative rates as in fastai's `fine_tune`: slice(lr/100, lr) over the plan's layer groups. With one AdamW
# rate of 1e-3 VGG-16 (no BatchNorm to rescale) blew up when 8 of its convs trained (docs/experiments.md, V20).
# lr_find is a switch (`--lr_find true`), off by default: on this data its valley (one epoch of mock training)
# suggested 1e-5..4e-4 and lost to a fixed 1e-3.
MODERN_POLICY = dict(policy="modern", head="fastai", hidden=512, dropout=0.5, opt="adamw", lr=1e-3, lr_find=False,
                     lr_mult=100.0, mom=None, wd=0.01, schedule="one_cycle", epochs=10, bs=64, size=224, fp32_size=None,
                     aug="xray", train_bn=False, bn_freeze=True, label_smoothing=0.1, tta=True)

POLICIES = {"assignment": ASSIGNMENT_POLICY, "modern": MODERN_POLICY}
POLICY_ALIASES = {"seed": "assignment"}  # former policy names, still read from options, sweeps and old runs


def canonical_policy(name: str) -> str:
    "The current name of a training policy (`seed` -> `assignment`); other names as given."
    return POLICY_ALIASES.get(name, name)


def cache_mode(v) -> str:
    "'auto', 'on' or 'off' from a recipe's `cache_features` (true/false accepted for on/off)."
    if str(v).strip().lower() == "auto": return "auto"
    try: return "on" if to_bool("cache_features", v) else "off"
    except RecipeError: raise RecipeError(f"--cache_features must be auto, on or off, got {v!r}") from None


_to_bool = to_bool  # former private name (cli.py used it)
_HINTS = field_hints(Recipe)
# What a command-line override may set: every field but those a recipe file alone sets.
OVERRIDABLE = [f.name for f in dataclasses.fields(Recipe) if FIXED not in getattr(_HINTS[f.name], "__metadata__", ())]


def recipe_from_dict(d: dict) -> Recipe:
    """The Recipe that `dataclasses.asdict` wrote to JSON (sweep.json, tune.json, config.json): the plan's tuple
    comes back as a list, and fields this version's Recipe lacks are dropped."""
    d = dict(d)
    p = d.pop("plan")
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"plan"}
    return Recipe(plan=plans.Plan.from_dict(p),
                  **{k: v for k, v in d.items() if k in fields})


def with_overrides(recipe: Recipe, **overrides) -> Recipe:
    """A copy of `recipe` with command-line style overrides checked and applied (`epochs='3'` works); each is read
    as its field's type says (covid_fastai.options.parse_value).

    `policy='modern'` (or 'assignment') first replaces every training setting with that policy's (see POLICIES),
    keeping the recipe's architecture, plan and data; the other overrides then apply on top.
    """
    bad = [k for k in overrides if k not in OVERRIDABLE]
    if bad:
        hint = difflib.get_close_matches(bad[0], OVERRIDABLE, n=3)
        raise RecipeError(f"unknown option --{bad[0]}" + (f" (did you mean {', '.join('--' + h for h in hint)}?)"
                          if hint else f": options are {', '.join('--' + o for o in OVERRIDABLE)}"))
    checked = {k: parse_value(k, v, _HINTS[k]) for k, v in overrides.items()}
    if "policy" in checked: recipe = dataclasses.replace(recipe, **POLICIES[checked["policy"]])
    if "size" in checked: checked.setdefault("fp32_size", None)  # the size asked for, on every CPU
    out = dataclasses.replace(recipe, **checked)
    if out.weights and not out.pretrained:
        raise RecipeError(f"--weights {out.weights} is loaded only with pretrained weights on",
                          "drop --pretrained false (or --weights for a random-init run)")
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
    raise RecipeError(f"unknown recipe {name!r}", f"did you mean {', '.join(close)}?" if close else "see {command}",
                      command=None if close else Command("list", function="list_recipes"))


def load_recipe(name_or_path) -> Recipe:
    "Execute a recipe file (its `__main__` block does not run) and return its `recipe`."
    path = find_recipe(str(name_or_path))
    spec = importlib.util.spec_from_file_location(f"covid_fastai_recipe_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rec = getattr(mod, "recipe", None)
    if not isinstance(rec, Recipe):
        raise RecipeError(f"{path} defines no `recipe = Recipe(...)`", "see recipes/vgg16_partial.py for the shape",
                          path=path)
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
            raise RecipeError(f"no recipe matches {p!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""),
                              "see {command}", command=Command("list", function="list_recipes"))
        names += [n for n in hits if n not in names]
    return [load_recipe(n) for n in names]
