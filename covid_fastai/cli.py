"""Command line: `python -m covid_fastai {list,recipe,sweep,cv,tune,compare,resume,check,evaluate,predict,audit,weights,track}` (python-fire).

Overrides are recipe fields as flags: `--epochs 2 --lr 3e-4 --bs 32 --size 128 --data DIR --pretrained false
--seed 1 --out DIR`. The library raises typed errors (covid_fastai.errors) carrying the fix; the CLI alone (shell.py)
turns them into one line, `error: ...`, exit status 2, spelling any command in the fix as the shell runs it; add
`--debug` for the traceback. Ctrl-C or SIGTERM marks the run folder `interrupted`, prints how to go on
(`interrupted: ...`) and exits with status 130; `resume RUN_DIR` continues it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import Command, DataError, RecipeError, RunFolderError
from .shell import bools_by_type, fire_command, spell  # noqa: F401 (spell: the shell spelling, for callers)

__all__ = ["main", "script_main", "Commands", "spell"]


def _print_summary(run_dir: Path | None):
    "A finished run's one line; None: another process of a data-parallel run (rank 0 prints it)."
    if run_dir is None: return
    from .rundir import run_summary
    print(run_summary(run_dir))


def _eval_summary(d: Path) -> str:
    m = json.loads((d / "metrics.json").read_text())
    t, pos = m["at_threshold"], m["positive_class"]
    f = lambda v: "n/a" if v is None else f"{v:.3f}"
    return (f"{d}: {m['n']} images, accuracy {m['accuracy']:.4f}; {pos} at threshold {t['threshold']:.3f}: "
            f"sensitivity {f(t['sensitivity'])}, specificity {f(t['specificity'])}, PPV {f(t['ppv'])}, "
            f"NPV {f(t['npv'])}; ROC AUC {f(t['roc_auc'])}")


class Commands:
    "fastai + timm experiments on chest X-ray folders. Commands: list, recipe, sweep, cv, tune, compare, resume, check, evaluate, predict, audit, weights, track."

    def list(self):
        "Show the recipes with a one-line description each."
        from .recipes import list_recipes
        recs = list_recipes()
        w = max(len(r.name) for r in recs)
        for r in recs: print(f"{r.name:<{w}}  {r.describe()}")

    @bools_by_type
    def recipe(self, name: str, out: str | None = None, resume: str | None = None, export: bool = False,
               track: str | None = None, **overrides):
        """Run one recipe: NAME (see `list`) or a recipe file, e.g. `recipe vgg16_partial --data DIR --epochs 2`.

        Args:
          name: recipe name or path to a recipe .py file
          out: folder for run folders (default ./outputs)
          resume: an interrupted run folder of this recipe to continue (same as `resume RUN_DIR`)
          export: also write fastai's pickled export.pkl (true/false; model.safetensors is always written)
          track: log the run to mlflow, tensorboard or both (mlflow,tensorboard); see docs/tracking.md
          overrides: any recipe field, e.g. --epochs --lr --bs --size --data --pretrained --weights --seed --aug
        """
        if resume is not None:
            return _resume_as(name, Path(name).stem, run_dir=resume, export=export, out=out, overrides=overrides,
                              track=track)
        from .recipes import load_recipe, with_overrides
        rec = with_overrides(load_recipe(name), **overrides)  # a bad name or value is refused before fastai loads
        from .train import run
        _print_summary(run(rec, out=out, export=export, track=track))

    @bools_by_type
    def resume(self, run_dir: str, export: bool = False, track: str | None = None):
        """Continue an interrupted (or failed) run in its own folder from its last finished epoch, or an
        interrupted sweep (a folder with sweep.json) from where it stopped.

        Args:
          run_dir: the run folder, e.g. outputs/vgg16_head/20260101-120000, or a sweep folder, outputs/sweeps/...
          export: also write fastai's pickled export.pkl at the end (runs only)
          track: also log to mlflow and/or tensorboard (a run or sweep keeps the trackers it started with)
        """
        from .sweep import SWEEP_FILE, resume_sweep, summary_md
        from .train import resume
        d = Path(run_dir)
        if (d / SWEEP_FILE).is_file(): return _print_comparison(summary_md(resume_sweep(d, track=track)))
        if (d / "tune.json").is_file(): return self.tune(resume=str(d))
        if not (d / "config.json").is_file():
            raise RunFolderError(f"{d} is not a run folder (no config.json) nor a sweep folder (no {SWEEP_FILE})",
                                 "pass one a run or sweep created, e.g. outputs/<recipe>/<timestamp> or "
                                 "outputs/sweeps/<timestamp>", path=d)
        _print_summary(resume(run_dir, export=export, track=track))

    @bools_by_type
    def check(self, data: str, strict: bool = False, limit: int = 50):
        """Pre-scan an X-ray folder: unreadable files, counts per split, duplicates across splits, labels.csv.

        Exit status 0 if it can be trained on, 2 on a fatal problem, 1 with --strict true when anything was found.

        Args:
          data: the folder (ImageFolder layout: train/<class>/..., optional valid/ and test/)
          strict: exit 1 when any file is unreadable, duplicated across splits, or unlisted in labels.csv
          limit: longest list printed per kind of problem (0: all)
        """
        from .check import check_data
        from .learner import resolve_data
        try: n = int(limit)
        except (TypeError, ValueError): n = -1
        if n < 0 or str(n) != str(limit).strip():
            raise RecipeError(f"--limit must be a whole number >= 0 (0: list all), got {limit!r}")
        rep = check_data(resolve_data(data))
        print("\n".join(rep.lines(limit=n)))
        if rep.fatal:
            raise DataError(f"{rep.root} cannot be trained on: {rep.fatal[0]}" +
                            (f" (and {len(rep.fatal) - 1} more, listed above)" if len(rep.fatal) > 1 else ""),
                            "add readable images or remove the folder", path=rep.root)
        if strict and rep.warnings: sys.exit(1)

    @bools_by_type
    def evaluate(self, run_dir: str, *runs, data: str | None = None, tta: bool | None = None,
                 threshold: float | None = None, out: str | None = None):
        """Evaluate a finished run on a labelled folder (DIR/<class>/ or DIR/test/<class>/); writes
        RUN_DIR/evaluations/<timestamp>/ (metrics.json, predictions.csv, plots, report.md, report.html).
        `evaluate ensemble RUN RUN ... --data DIR` evaluates the runs' averaged probabilities, with the threshold
        chosen on their averaged validation probabilities (to OUT/ensembles/<timestamp>/, default ./outputs).

        Args:
          run_dir: a run folder (outputs/<recipe>/<timestamp>/), or `ensemble` followed by run folders
          runs: after `ensemble`, the run folders; else the data folder may come here instead of --data
          data: folder of class sub-folders, or with a test/ folder inside
          tta: test-time augmentation (default: as the run)
          threshold: decision threshold on p(infected) instead of the one the run chose on its validation split
            (an ensemble also takes a rule, youden or sens:0.95, applied to its averaged valid probabilities)
          out: folder for the evaluations/<timestamp>/ folder instead of RUN_DIR
        """
        if run_dir == "ensemble":
            if data is None: raise DataError("evaluate ensemble needs --data DIR (a labelled folder)")
            from .ensemble import evaluate_ensemble
            print(_eval_summary(evaluate_ensemble(runs, data, tta=tta, threshold=threshold, out=out)))
            return
        if data is None and len(runs) == 1: data, runs = runs[0], ()
        if runs or data is None:
            raise DataError("evaluate takes RUN_DIR and --data DIR" + (f" (got also {' '.join(runs)})" if runs else ""),
                            "for several runs, use `evaluate ensemble RUN RUN ... --data DIR`")
        from .evaluate import evaluate_run
        d = evaluate_run(run_dir, data, tta=tta, threshold=threshold, out=out)
        print(_eval_summary(d))

    @bools_by_type
    def predict(self, run_dir: str, *paths, out: str | None = None, heatmaps: bool = False, tta: bool | None = None,
                threshold: float | None = None):
        """Predict image files or folders with a finished run: CSV of file, p_infected and the label at the
        run's threshold (to --out, or RUN_DIR/predictions/<timestamp>/predictions.csv).

        Args:
          run_dir: a run folder, or `ensemble` followed by run folders (`predict ensemble RUN RUN ... IMAGES`:
            averaged probabilities, threshold chosen on the runs' averaged validation probabilities)
          paths: image files and/or folders (searched recursively)
          out: CSV file to write (must not exist)
          heatmaps: also write Grad-CAM overlays (PNG) beside the CSV
          tta: test-time augmentation (default: as the run)
          threshold: decision threshold on p(infected) for the label column instead of the run's own
        """
        if run_dir == "ensemble":  # predict ensemble RUN RUN ... IMAGES...: averaged probabilities
            from .ensemble import predict_ensemble, split_runs
            runs, paths = split_runs(paths)
            csv = predict_ensemble(runs, paths, out=out, tta=tta, threshold=threshold)
            print(f"{csv}: {sum(1 for _ in open(csv)) - 1} images")
            return
        from .evaluate import predict_run
        if not paths: raise RecipeError("predict needs image files or folders after RUN_DIR")
        csv = predict_run(run_dir, paths, out=out, heatmaps=heatmaps, tta=tta, threshold=threshold)
        print(f"{csv}: {sum(1 for _ in open(csv)) - 1} images")

    @bools_by_type
    def audit(self, run_dir: str | None = None, data: str | None = None, out: str | None = None,
              arch: str = "tf_efficientnet_lite0.in1k", size: int = 224, pretrained: bool = True):
        """Check for source shortcuts: `audit --data DIR` before training (label x source, a source probe on frozen
        ImageNet features, image statistics), `audit RUN_DIR --data DIR` after (within-source AUC, occlusion,
        Grad-CAM mass). Writes audit.md and audit.html in a new audits/<timestamp>/ folder.

        Args:
          run_dir: a finished run folder (omit to audit the data before training)
          data: the data folder; it needs labels.csv with a source column
          out: where the audits/ folder goes (default: ./outputs, or RUN_DIR for a run)
          arch: before training, the frozen body the source probe reads
          size: before training, its input size
          pretrained: before training, ImageNet weights for that body (false: random init)
        """
        from .audit import audit_data, audit_run
        if data is None: raise DataError("audit needs --data DIR (a folder with labels.csv and its source column)")
        if run_dir is None:
            d = audit_data(data, out=out, arch=arch, size=int(size), pretrained=pretrained)
        else:
            d = audit_run(run_dir, data, out=out)
        m = json.loads((d / "audit.json").read_text())
        print(("SHORTCUT: " if m["shortcut"] else "") + f"{len(m['flags'])} flag(s)" +
              "".join(f"\n  - {f}" for f in m["flags"]))
        print(f"audit: {d / 'audit.md'} and {d / 'audit.html'}")

    @bools_by_type
    def weights(self, probe_hub: bool = False):
        """Where each recipe architecture's ImageNet weights would come from here; downloads nothing.

        Args:
          probe_hub: also try one connection to the Hugging Face hub (a few seconds at most)
        """
        print(_weights_table(probe_hub))

    def sweep(self, pattern: str, out: str | None = None, policies: str | None = None, track: str | None = None,
              engine: str = "local", address: str | None = None, cpus_per_run: float = 1, gpus_per_run: float = 0,
              **overrides):
        """Run every recipe matching PATTERN (glob, or comma-separated names) and write a comparison table.

        Writes <out>/sweeps/<timestamp>/: sweep.json (the plan) and comparison.{md,csv,html}, rewritten after
        every finished run. The same overrides apply to every recipe. A stopped sweep continues with
        `resume SWEEP_DIR` (finished runs are kept, an interrupted one continues from its last epoch).

        Args:
          pattern: recipe names or globs, e.g. 'vgg16_*' or vgg16_head,vgg16_full
          out: folder for run folders (default ./outputs)
          policies: e.g. assignment,modern: run each recipe under each training policy, side by side in the table
          track: log every run to mlflow and/or tensorboard; in MLflow the sweep is a parent run
          engine: local (one run after another, here) or ray (each run a Ray task, as many at once as the CPUs and
            GPUs allow; a failed run is tabled and the others go on; exit status 2 if any failed). Needs
            pip install -e ".[dist]"; see docs/cli.md
          address: a Ray cluster to join, e.g. auto or HOST:6379 (default: start a local Ray)
          cpus_per_run: CPUs each run's Ray task declares (and torch threads it uses)
          gpus_per_run: GPUs each run's Ray task declares (e.g. 1; 0.5 puts two runs on one GPU)
        """
        from .sweep import run_sweep
        _print_comparison(run_sweep(pattern, out=out, policies=policies, track=track, engine=engine, address=address,
                                    cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run, **overrides)
                          / "comparison.md")

    def cv(self, name: str, folds: int | None = None, by: str = "patient", out: str | None = None,
           fold_seed: int = 0, engine: str = "local", address: str | None = None, cpus_per_run: float = 1,
           gpus_per_run: float = 0, **overrides):
        """Cross-validate a recipe over train+valid (the test split is never read): `cv best --folds 5 --data DIR`,
        or leave one source out with `--by source`. Writes <out>/cv/<recipe>/<timestamp>/ with one run folder per
        fold and cv.md/.html/.json/.csv (mean ± sd over folds, within-source AUC); `resume CV_DIR` continues it.

        Args:
          name: recipe name or path to a recipe .py file
          folds: number of patient-grouped folds, stratified by label and source (default 5)
          by: patient (k folds) or source (one fold per labels.csv source: train without it, score on it)
          out: root of the cv/ folder (default ./outputs)
          fold_seed: seed of the fold assignment (keep it to compare recipes on the same folds)
          engine, address, cpus_per_run, gpus_per_run: run the folds as Ray tasks, as for `sweep`
          overrides: recipe fields, e.g. --data DIR --epochs 2 (as for `recipe`)
        """
        from .cv import run_cv
        _print_comparison(run_cv(name, folds=folds, by=by, out=out, fold_seed=fold_seed, engine=engine,
                                 address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run, **overrides)
                          / "cv.md")

    @bools_by_type
    def tune(self, recipe: str | None = None, trials: int = 20, engine: str = "local", out: str | None = None,
             resume: str | None = None, metric: str = "roc_auc", space: str | None = None,
             proxy_size: int | None = None, proxy_epochs: int | None = None, proxy_cache: bool = False,
             final: str = "auto", pruner: str = "median", workers: int | None = None, cpus_per_trial: float = 1,
             address: str | None = None, seed: int = 0, **overrides):
        """Search a recipe's settings with Optuna on the validation split; the test split is scored once, for the
        best trial. Writes <out>/tunes/<recipe>/<timestamp>/ (study.db, trials.csv/md, tune.md/html, plots).
        Needs the extra: pip install -e ".[tune]" (and ".[dist]" for --engine ray). See docs/tune.md.

        Args:
          recipe: recipe name or file
          trials: finished (complete or pruned) trials to reach
          engine: local (one after another) or ray (parallel Ray tasks sharing study.db)
          out: folder for tunes/ (default ./outputs)
          resume: a stopped tune folder to continue (same as `resume TUNE_DIR`)
          metric: objective on valid: roc_auc, accuracy, balanced_accuracy, pr_auc or sens_at_spec95
          space: JSON (or a .json file) of field -> spec, e.g. '{"lr": ["log", 1e-4, 1e-2]}' (default: the recipe
            file's `space`, else lr, epochs, dropout, label_smoothing, size)
          proxy_size: cheap trials at this size (the best settings then run once at full size)
          proxy_epochs: cheap trials with this many epochs
          proxy_cache: cheap trials on cached body features (cache_features on)
          final: auto, evaluate (the best trial's model on test), rerun (its settings at full size) or none
          pruner: median or none
          workers: Ray tasks at once (default: the cluster's CPUs / cpus_per_trial)
          cpus_per_trial: CPUs each Ray task declares (and torch threads it uses)
          address: a Ray cluster to join (default: start a local Ray)
          seed: the TPE sampler's seed
          overrides: recipe fields for every trial, e.g. --data DIR --bs 32 --pretrained false
        """
        from .tune import resume_tune, tune
        if resume is not None:
            _resume_tune_as(recipe, resume, overrides)
            md = resume_tune(resume) / "tune.md"
        else:
            if not recipe: raise RecipeError("tune needs a RECIPE (or --resume TUNE_DIR)", "see {command}",
                                             command=Command("list", function="list_recipes"))
            sp = space if isinstance(space, dict) or not space else json.loads(
                Path(space).read_text() if str(space).endswith(".json") else str(space))  # fire may parse it already
            md = tune(recipe, trials=trials, engine=engine, out=out, metric=metric, space=sp, proxy_size=proxy_size,
                      proxy_epochs=proxy_epochs, proxy_cache=proxy_cache, final=final, pruner=pruner, workers=workers,
                      cpus_per_trial=cpus_per_trial, address=address, seed=seed, **overrides) / "tune.md"
        print(f"tune: {md} and {md.with_suffix('.html')}; trials in {md.parent / 'trials.md'}")

    def compare(self, *run_dirs, out: str | None = None, ensemble: bool | tuple = False):
        """Put finished runs side by side: the table a sweep writes, in <out>/comparisons/<timestamp>/. Given cv
        folders instead (the baseline first), the cross-validations side by side with each one's fold-by-fold
        difference from the baseline (cv_comparison.md).

        Args:
          run_dirs: run folders, e.g. outputs/vgg16_head/*; or cv folders, e.g. outputs/cv/best/*
          out: where the comparisons/ folder goes (default ./outputs)
          ensemble: cv folders only: add the mean of their probabilities, film by film, as one more row; alone
            for all of them, or the positions of the members (--ensemble 1,2,3: other recipes against the baseline 0)
        """
        if run_dirs and all((Path(d).expanduser() / "folds.csv").is_file() for d in run_dirs):
            from .cv_report import compare_cv
            md = compare_cv(run_dirs, out=out, ensemble=ensemble)
            print(f"{md.stem}: {md}, {md.with_suffix('.json')} and {md.with_suffix('.html')}")
            return
        from .sweep import compare_runs
        _print_comparison(compare_runs(run_dirs, out=out))

    def track(self, *run_dirs, uri: str | None = None):
        """Import finished run folders into MLflow (params, per-epoch metrics, final metrics, report, plots); a
        sweep folder becomes a parent run with its finished runs as children. A folder already there is skipped.

        Args:
          run_dirs: run or sweep folders, e.g. outputs/vgg16_head/* outputs/sweeps/20260101-120000
          uri: MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<outputs>/mlflow.db beside the runs)
        """
        from .track import import_folders
        for line in import_folders(run_dirs, uri=uri): print(line)


def _resume_as(*names, run_dir, export, out, overrides, track=None):
    "`--resume RUN_DIR` on a recipe (by name or file): the run must be of that recipe, with no new settings."
    if overrides or out is not None:
        raise RecipeError(f"--resume continues {run_dir} with the settings it recorded",
                          f"drop {', '.join('--' + k for k in [*overrides, *(['out'] if out else [])])}")
    cfg = Path(run_dir) / "config.json"
    recorded = json.loads(cfg.read_text())["recipe"]["name"] if cfg.is_file() else None
    if recorded is not None and recorded not in names:
        raise RunFolderError(f"{run_dir} is a run of recipe {recorded!r}, not {names[0]!r}", "use {command}",
                             path=run_dir, command=Command("resume", (run_dir,)))
    return Commands().resume(run_dir, export=export, track=track)


def _resume_tune_as(recipe, tune_dir, overrides):
    "`tune --resume TUNE_DIR` goes on with the tune's recorded plan: no new settings, and the recipe must be its own."
    if overrides: raise RecipeError(f"--resume continues {tune_dir} with its recorded plan",
                                    f"drop {', '.join('--' + k for k in overrides)}")
    f = Path(tune_dir) / "tune.json"
    name = json.loads(f.read_text()).get("name") if f.is_file() else None
    if recipe and name and Path(str(recipe)).stem != name:
        raise RunFolderError(f"{tune_dir} is a tune of recipe {name!r}, not {recipe!r}", "use {command}",
                             path=tune_dir, command=Command("resume", (str(tune_dir),), function="resume_tune"))


def _print_comparison(md: Path):
    print(f"{md.stem}: {md}, {md.with_suffix('.csv')} and {md.with_suffix('.html')}")

def _weights_table(probe_hub: bool) -> str:
    from .recipes import list_recipes
    from .weights import describe_sources
    by_arch = {}
    for r in list_recipes(): by_arch.setdefault(r.arch, []).append(r.name)
    lines = ["| architecture | recipes | weights would come from | state | note |", "|---|---|---|---|---|"]
    for arch, names in by_arch.items():
        d = describe_sources(arch, probe_hub=probe_hub)
        prov = d.get("offline_provider") or {}
        state = "in hub cache" if d.get("cache") else prov.get("state", "-")
        lines.append(f"| {arch} | {', '.join(names)} | {d.get('would_use') or 'nowhere'} | {state} | {d.get('note', '')} |")
    return "\n".join(lines)


def main(argv=None):
    "Entry point of `python -m covid_fastai`."
    fire_command(Commands, list(sys.argv[1:] if argv is None else argv))


def script_main(recipe, argv=None):
    "Entry point of a recipe file run with python: `python recipes/vgg16_partial.py --epochs 2`."
    from .train import run
    from .recipes import with_overrides

    @bools_by_type
    def _run(out: str | None = None, resume: str | None = None, export: bool = False, track: str | None = None,
             **overrides):
        if resume is not None:  # the same options as `python -m covid_fastai recipe NAME`
            return _resume_as(recipe.name, run_dir=resume, export=export, out=out, overrides=overrides, track=track)
        _print_summary(run(with_overrides(recipe, **overrides), out=out, export=export, track=track))

    fire_command(_run, list(sys.argv[1:] if argv is None else argv))
