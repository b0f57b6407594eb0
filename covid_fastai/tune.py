"""Hyper-parameter search on the validation split: an Optuna study over a declared space, one run folder per trial.

`tune(RECIPE, trials=N)` makes `<out>/tunes/<recipe>/<UTC timestamp>/` (a new folder per tune, never reused):

    tune.json     the plan (recipe with overrides, space, proxies, objective, pruner, engine) and how it stands
    study.db      Optuna's SQLite storage: resumable, and parallel workers share it
    runs/         one ordinary run folder per trial, evaluated on the validation split only (test held out)
    trials.csv/.md, tune.md/.html, history.png, importance.png, intermediate.png   (tune_report.py)
    evaluations/ or final/   the test split's one score, for the best trial

Each trial is `train.run(recipe + the trial's settings, evaluate_on="valid")`; its objective is a validation metric
from its metrics.json (`valid.at_0.5.<metric>`, default ROC AUC of p(infected)). Optuna's fastai integration
(`FastAIPruningCallback`) reports the per-epoch validation ROC AUC (or accuracy) and stops unpromising trials
(MedianPruner). When the trials are done the test split is scored once, for the best trial: its model is evaluated
on test (`evaluate_run`), or, when the trials ran on cheap proxies (smaller size, fewer epochs, cached features),
its settings are run once at full size with test evaluation. See docs/tune.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
import runpy
import sys
from datetime import datetime, timezone
from pathlib import Path

from .errors import Command, RecipeError, RunFolderError, RunInterrupted, note_fix
from .files import folder_lock, write_json
from .learner import resolve_data
from .recipes import OVERRIDABLE, Recipe, load_recipe, recipe_from_dict, with_overrides
from .rundir import OUTPUTS, new_run_dir, open_unfinished
from .ray_engine import check_engine
from .tune_trials import (METRICS, TUNE_FILE, EpochRocAuc, finished, load_study, need_optuna, need_ray,  # noqa: F401
                          pruning_callback, run_ray, run_trials, storage, trial_recipe)

__all__ = ["DEFAULT_SPACE", "TUNE_FILE", "METRICS", "tune", "resume_tune", "score_test_once", "recipe_space",
           "check_space", "EpochRocAuc", "pruning_callback", "need_optuna"]

# What a trial may change, as data: field -> ("log", lo, hi) | ("float", lo, hi) | ("int", lo, hi) | ("choice", [..])
DEFAULT_SPACE = {
    "lr": ("log", 1e-4, 1e-2),
    "epochs": ("int", 3, 10),
    "dropout": ("float", 0.1, 0.6),
    "label_smoothing": ("float", 0.0, 0.2),
    "size": ("choice", [160, 192, 224]),
}


# -- the space --------------------------------------------------------------------------------------------------
def recipe_space(recipe: Recipe) -> dict | None:
    "The `space = {...}` a recipe file declares beside its `recipe = Recipe(...)`, or None."
    if not recipe.source or not Path(recipe.source).is_file(): return None
    return runpy.run_path(recipe.source, run_name="covid_fastai_recipe_space").get("space")


def check_space(space: dict, recipe: Recipe) -> dict:
    "`space` with each spec checked (shape, field, and every end or choice as a value of the field); JSON-ready."
    if not isinstance(space, dict) or not space:
        raise RecipeError(f"a search space must be a non-empty dict of field -> spec, got {space!r}",
                          'e.g. {"lr": ["log", 1e-4, 1e-2], "size": ["choice", [160, 224]]}')
    out = {}
    for k, spec in space.items():
        if k not in OVERRIDABLE:
            raise RecipeError(f"the search space names {k!r}, which is not a recipe option",
                              f"use recipe fields: {', '.join(OVERRIDABLE)}")
        kind, *args = spec if isinstance(spec, (list, tuple)) and spec else (None,)
        ok = (kind == "choice" and len(args) == 1 and isinstance(args[0], (list, tuple)) and len(args[0]) > 0) or \
             (kind in ("log", "float", "int") and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
              and args[0] < args[1] and (kind != "log" or args[0] > 0))
        if not ok:
            raise RecipeError(f"bad search spec for {k}: {spec!r}", '("log"|"float"|"int", low, high) with low < '
                              'high (log: low > 0), or ("choice", [values])')
        values = list(args[0]) if kind == "choice" else args
        for v in values: with_overrides(recipe, **{k: v})  # a bad value fails now, not in trial 7
        out[k] = [kind, list(args[0])] if kind == "choice" else [kind, *args]
    return out


# -- the tune: plan, trials, the one test score -------------------------------------------------------------------
def tune(recipe, trials: int = 20, out=None, engine: str = "local", metric: str = "roc_auc", space: dict | None = None,
         proxy_size: int | None = None, proxy_epochs: int | None = None, proxy_cache: bool = False,
         final: str = "auto", pruner="median", workers: int | None = None, cpus_per_trial: float = 1,
         address: str | None = None, seed: int = 0, cbs=None, **overrides) -> Path:
    """Search `recipe`'s settings on the validation split with `trials` finished trials; returns the tune folder.

    recipe: name, file or Recipe; overrides (`data='DIR'`, `bs=32`) apply to every trial and to the final run.
    metric: the objective, valid `metrics.json` `valid.at_0.5.<metric>` (one of METRICS; higher is better).
    space: {field: spec} (see DEFAULT_SPACE); default: the recipe file's `space`, else DEFAULT_SPACE.
    proxy_size / proxy_epochs / proxy_cache: cheap trials (that size, that many epochs, cached body features); the
      field leaves the space, and the best settings are then run once at full size for the test score.
    final: how test is scored once, for the best trial: 'evaluate' its model, 'rerun' its settings without proxies,
      'none', or 'auto' (rerun when proxies were used, else evaluate).
    pruner: 'median' (MedianPruner: 2 startup trials, 1 warm-up epoch), 'none', or an Optuna pruner (tests).
    engine: 'local' (trials one after another in this process) or 'ray' (`workers` Ray tasks sharing the storage,
      `cpus_per_trial` each; `address` joins a running cluster, else a local Ray starts).
    cbs: extra fastai callbacks for every trial's fit (local engine; tests use one to interrupt).
    """
    optuna = need_optuna()
    base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    declared = None if space else recipe_space(base)
    space_from = "given" if space else "recipe file" if declared else "default"
    space = space or declared or DEFAULT_SPACE
    base = with_overrides(base, **overrides)
    if base.data != "demo": base = dataclasses.replace(base, data=str(resolve_data(base.data)))  # resumed elsewhere
    n = _whole("trials", trials)
    if metric not in METRICS: raise RecipeError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    check_engine(engine, cpus_per_trial, per="trial")  # ray installed for 'ray', a CPU need that makes sense
    if final not in ("auto", "evaluate", "rerun", "none"):
        raise RecipeError(f"--final must be auto, evaluate, rerun or none, got {final!r}")
    proxies = {"size": proxy_size, "epochs": proxy_epochs,  # the fields the proxies fix for every trial
               "cache_features": "on" if str(proxy_cache).lower() in ("true", "1", "on", "yes") else None}
    proxies = {k: v for k, v in proxies.items() if v is not None}
    with_overrides(base, **proxies)  # checked now
    space = check_space({k: v for k, v in space.items() if k not in proxies}, base)
    if isinstance(pruner, str):
        if pruner not in ("median", "none"): raise RecipeError(f"--pruner must be median or none, got {pruner!r}")
        pruner_spec, pruner = {"kind": pruner, "n_startup_trials": 2, "n_warmup_steps": 1}, None
    else: pruner_spec = {"kind": "custom", "repr": repr(pruner)}  # resumed with the median pruner unless given again
    root = (Path(out) if out is not None else OUTPUTS).expanduser().resolve()
    tune_dir = new_run_dir(root / "tunes", base.name)
    plan = {"recipe": dataclasses.asdict(base), "name": base.name, "study": f"{base.name}-{tune_dir.name}",
            "trials": n, "metric": metric, "monitor": "accuracy" if metric == "accuracy" else "roc_auc",
            "direction": "maximize", "space": space, "space_from": space_from, "proxy_overrides": proxies,
            "fixed_by_proxy": sorted(proxies), "final_how": final, "pruner": pruner_spec, "seed": int(seed),
            "engine": {"kind": engine, "workers": workers, "cpus_per_trial": float(cpus_per_trial),
                       "address": address, "cpus": os.cpu_count()},
            "storage": "study.db (SQLite)", "created": datetime.now(timezone.utc).isoformat(), "command": sys.argv,
            "overrides": {k: str(v) for k, v in overrides.items()}, "status": "running"}
    write_json(tune_dir / TUNE_FILE, plan)
    optuna.create_study(study_name=plan["study"], storage=storage(tune_dir), direction="maximize")
    return _carry_on(tune_dir, plan, pruner, cbs or ())


def resume_tune(tune_dir, pruner=None, cbs=None) -> Path:
    """Continue a stopped tune in its folder: trials that were running when it stopped are recorded as failed, and
    new trials run until the study has its number of finished (complete or pruned) trials; then the test score."""
    tune_dir, plan = open_unfinished(tune_dir, TUNE_FILE, "tune", "outputs/tunes/<recipe>/<timestamp>",
                                     lambda d, m: d / "tune.md")
    return _carry_on(tune_dir, plan, pruner, cbs or ())


def _whole(name, v) -> int:
    try: n = int(v)
    except (TypeError, ValueError): n = 0
    if n < 1 or str(n) != str(v).strip(): raise RecipeError(f"--{name} must be a whole number >= 1, got {v!r}")
    return n


def _fail_orphans(tune_dir, plan):
    """Trials still `RUNNING` when a tune starts or resumes belong to a process that stopped (the tune folder's lock
    says no other tune runs): record them as failed, so the study goes on without them and keeps their numbers."""
    from optuna.trial import TrialState
    st = storage(tune_dir)
    sid = st.get_study_id_from_name(plan["study"])
    for t in st.get_all_trials(sid, deepcopy=False, states=(TrialState.RUNNING,)):
        tid = st.get_trial_id_from_study_id_trial_number(sid, t.number)
        st.set_trial_user_attr(tid, "error", "interrupted: its process stopped before the trial ended")
        st.set_trial_state_values(tid, TrialState.FAIL)


def _carry_on(tune_dir: Path, plan: dict, pruner, cbs) -> Path:
    from .tune_report import write_tune_report
    busy = RunFolderError(f"{tune_dir} is in use by another process (a tune or resume still going)",
                          "wait for it or stop it first", path=tune_dir)
    go_on = Command("resume", (str(tune_dir),), function="resume_tune")

    def save(): write_json(tune_dir / TUNE_FILE, plan)
    with folder_lock(tune_dir, busy):
        _fail_orphans(tune_dir, plan)
        plan.pop("error", None)
        plan["status"] = "running"
        save()
        study = load_study(tune_dir, plan, pruner)
        try:
            while (left := plan["trials"] - finished(study)) > 0:
                before = finished(study)
                if plan["engine"]["kind"] == "ray": run_ray(tune_dir, plan, left)
                else: run_trials(tune_dir, plan, left, pruner, cbs)
                if finished(study) == before:  # every trial of this round failed: a bug or bad settings, not luck
                    errs = [t.user_attrs.get("error") for t in study.get_trials(deepcopy=False) if t.state.name == "FAIL"]
                    raise RecipeError(f"every trial of tune {tune_dir} failed; the last: {errs[-1] if errs else '?'}",
                                      f"see {tune_dir / 'trials.md'}", path=tune_dir)
            write_tune_report(tune_dir, plan, study)
            if "final" not in plan:
                plan["final"] = score_test_once(tune_dir, plan, study)
                save()
        except BaseException as e:
            stopped = isinstance(e, KeyboardInterrupt)
            plan.update(status="interrupted" if stopped else "failed",
                        **({} if stopped else {"error": " ".join(str(e).split())[:500] or type(e).__name__}))
            save()
            write_tune_report(tune_dir, plan, study)
            done = f"{finished(study)} of {plan['trials']} trials finished"
            if stopped: raise RunInterrupted(tune_dir, 0, f"the tune has {done}; continue it with {{command}}", go_on) from e
            note_fix(e, f"tune {tune_dir} stopped with {done}; fix the problem, then continue it with {{command}}", go_on)
            raise
        plan["status"] = "complete"
        save()
        write_tune_report(tune_dir, plan, study)
    return tune_dir


def score_test_once(tune_dir: Path, plan: dict, study) -> dict:
    """The test split's one score, for the best trial: its model evaluated on test (`evaluate_run`), or its settings
    run once without proxies with test evaluation; {'how', 'trial', 'params', 'dir', 'test': metrics}."""
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        return {"how": "none", "note": "no trial completed (all pruned or failed): nothing scored on test"}
    best = study.best_trial  # COMPLETE trials only
    data = resolve_data(recipe_from_dict(plan["recipe"]).data)
    how = plan["final_how"] if plan["final_how"] != "auto" else "rerun" if plan["proxy_overrides"] else "evaluate"
    out = {"how": how, "trial": best.number, "params": best.params, "valid": best.value}
    if how == "none": return {**out, "note": "not asked for (--final none): the test split was not scored"}
    if not (data / "test").is_dir(): return {**out, "how": "none", "note": f"{data} has no test/ split: nothing scored"}
    if how == "evaluate":
        from .evaluate import evaluate_run
        d = evaluate_run(best.user_attrs["run_dir"], str(data), out=tune_dir)
        m = json.loads((d / "metrics.json").read_text())
    else:
        from .train import run
        d = run(trial_recipe(plan, best.params, proxies=False), out=tune_dir / "final", evaluate_on="test")
        m = json.loads((d / "metrics.json").read_text())
        out["valid_full"] = m["valid"]["at_0.5"].get(plan["metric"])
    t = m.get("at_threshold", {})
    return {**out, "dir": str(d), "split": m.get("split", "test"),
            "test": {"n": m.get("n"), "accuracy": m.get("accuracy"), **{k: t.get(k) for k in
                     ("threshold", "roc_auc", "pr_auc", "sensitivity", "specificity", "balanced_accuracy")}}}
