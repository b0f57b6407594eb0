"""Cross-validation of one recipe over train+valid (k patient folds, or leave one source out), run as a sweep.

`run_cv(RECIPE, folds=5, by='patient')` (CLI: `cv RECIPE --folds 5 --data DIR [--by source]`) makes
`<out>/cv/<recipe>/<timestamp>/`:
- `folds.csv`: every train+valid image with its label, source, patient, stratum and the fold that holds it out;
- `folds/<fold>/`: each fold's data view (covid_fastai.folds: symlinks, no copies) with train/ and valid/ only,
  its valid/ being the held-out part, so each fold's run evaluates on it (there is no test split to find);
- `runs/<recipe>/<timestamp>/`: one normal run folder per fold (train.run);
- `sweep.json`, the plan, run by the sweep loop (covid_fastai.sweep): stopped, it continues with `resume CV_DIR`;
- `cv.md`, `cv.html`, `cv.json`, `cv.csv` (covid_fastai.cv_report), rewritten after every finished fold, and the
  sweep's comparison table of the fold runs.

The test split is never listed nor opened. Choose recipes on these means; score the test split once, at the end.
"""
from __future__ import annotations

import dataclasses
import sys
from datetime import datetime, timezone
from pathlib import Path

from .data import find_xray_folders
from .errors import RecipeError
from .folds import cv_table, kfold_folds, source_folds, write_view
from .learner import resolve_data
from .recipes import Recipe, load_recipe, with_overrides
from .rundir import OUTPUTS, new_run_dir
from .sweep import discard, engine_record, start_sweep

__all__ = ["BY", "plan_cv", "run_cv"]

BY = ("patient", "source")  # k folds of patients, or one fold per source


def plan_cv(recipe, folds: int | None = None, by: str = "patient", fold_seed: int = 0, **overrides):
    """(recipe with overrides, XrayFolders of train+valid, table of images, list of `folds.Fold`) — checked,
    nothing written. recipe: a name, a recipe file or a `Recipe`; folds: k (default 5; not with by='source')."""
    if by not in BY: raise RecipeError(f"--by {by!r}", f"use one of {', '.join(BY)}")
    if by == "source" and folds is not None:
        raise RecipeError("--by source makes one fold per source", "drop --folds")
    k = 5 if folds is None else folds
    if isinstance(k, bool) or not isinstance(k, int):
        raise RecipeError(f"--folds must be a whole number >= 2, got {folds!r}")
    rec = with_overrides(recipe if isinstance(recipe, Recipe) else load_recipe(recipe), **overrides)
    # test=False: the test split is not even listed; the fold runs scan the images they read
    found = find_xray_folders(resolve_data(rec.data), scan=False, test=False)
    table = cv_table(found)
    if by == "source":
        fold_list = source_folds(table, Path(found.root) / "labels.csv")
        table["stratum"] = ""
    else:
        fold_list, table["stratum"] = kfold_folds(table, k, seed=fold_seed)
    held = {f: fold.name for fold in fold_list for f in fold.valid}
    table["fold"] = table["file"].map(held).fillna("")  # LOSO: images without a source are never held out
    return rec, found, table, fold_list


def run_cv(recipe, folds: int | None = None, by: str = "patient", out=None, fold_seed: int = 0, cbs=None,
           engine: str = "local", address: str | None = None, cpus_per_run: float = 1, gpus_per_run: float = 0,
           **overrides) -> Path:
    """Cross-validate `recipe` (see the module docstring); returns the cv folder.

    folds: number of patient folds (default 5); by: 'patient' or 'source' (leave one source out)
    out: root of the cv folder (default ./outputs); fold_seed: seed of the fold assignment (the same folds for
    every recipe compared); cbs: extra fastai callbacks for every fold's run; overrides: recipe fields (data=DIR)
    engine: 'local' (folds one after another) or 'ray' (each fold a Ray task); address, cpus_per_run,
    gpus_per_run: as for a sweep (covid_fastai.sweep.engine_record)
    """
    eng = engine_record(engine, address, cpus_per_run, gpus_per_run)
    rec, found, table, fold_list = plan_cv(recipe, folds, by, fold_seed, **overrides)
    root = (Path(out) if out is not None else OUTPUTS).expanduser().resolve()
    made = [d for d in (root, root / "cv", root / "cv" / rec.name) if not d.exists()]
    cv_dir = new_run_dir(root / "cv", rec.name)
    try:
        table.to_csv(cv_dir / "folds.csv", index=False)
        items = []
        for fold in fold_list:
            view = write_view(fold, table, found, cv_dir / "folds" / fold.name)
            items.append({"recipe": dataclasses.asdict(dataclasses.replace(rec, data=str(view))), "run_dir": None,
                          "tag": fold.name, "fold": fold.record()})
    except BaseException:
        discard(cv_dir, made)
        raise
    what = f"{len(fold_list)} patient folds" if by == "patient" else f"leave one source out ({len(fold_list)} sources)"
    manifest = {"kind": "cv", "title": f"Cross-validation of {rec.name}: {what}", "recipe": rec.name, "by": by,
                "folds": len(fold_list), "fold_seed": fold_seed if by == "patient" else None,
                "data": str(found.root), "overrides": {k: str(v) for k, v in overrides.items()},
                "out": str(cv_dir / "runs"), "created": datetime.now(timezone.utc).isoformat(), "status": "running",
                "command": sys.argv, "engine": eng, "runs": items}
    return start_sweep(cv_dir, manifest, cbs, made)
