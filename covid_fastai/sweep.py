"""Sweeps: recipes (each under one or more training policies) run one after another, side by side in one table.

A sweep folder `<out>/sweeps/<timestamp>/` holds `sweep.json`, its plan: every recipe exactly as it will run
(overrides applied, data path absolute) and, once it has started, each run's folder. The comparison
(comparison.md/.csv/.html, see `report.write_sweep`) is rewritten after every finished run, so a sweep of several
hours shows its results as they come.

The VGG-16 grid takes hours on a 2-core CPU, so a sweep must survive being stopped (Ctrl-C, `kill`, a crash, a
closed session). `resume_sweep(SWEEP_DIR)` (CLI: `resume SWEEP_DIR`) carries on from the plan: finished runs are
kept as they are, a run with a finished epoch continues from its checkpoint (`train.resume`), one without starts
again in a new folder, and the rest run. `compare_runs(RUN_DIRS)` makes the same table from any finished runs.

The loop is not tied to recipe sweeps: `start_sweep` runs any plan of recipes, and the manifest's `kind` names the
summary rewritten after every finished run (`SUMMARIES`). Cross-validation (covid_fastai.cv) is such a plan: one
recipe whose items differ in their data (a fold's view) and carry a `tag` ('fold-2') and a `fold` record.

Engines (the manifest's `engine`, kept for `resume`): 'local' runs the plan one run after another in this process,
and the first failed run stops the sweep. 'ray' runs every unfinished run as a Ray task declaring
`cpus_per_run`/`gpus_per_run` (covid_fastai.ray_engine: a local Ray, or the cluster at `address`), as many at once
as the resources allow; this process writes sweep.json and the summary as each run lands (`ray.wait`). A failed
run is listed in the table with its error and the others go on; at the end `SweepFailed` says which failed, and
`resume` runs them again. A worker notes its run folder in `started/<index>` the moment it exists (the driver folds
it into sweep.json; a `resume` after the driver died finds it there), so a stopped run continues from its
checkpoint. Ctrl-C cancels the running tasks as Ctrl-C stops a run: marked interrupted, resumable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from .errors import Command, RecipeError, RunFolderError, RunInterrupted, UserError, note_fix
from .files import folder_lock, write_json
from .ray_engine import check_engine
from .learner import resolve_data
from .recipes import Recipe, match_recipes, recipe_from_dict, with_overrides
from .report import sweep_row, write_sweep
from .rundir import CHECKPOINT, OUTPUTS, new_run_dir, one_line, open_unfinished, run_status, run_summary
from .track import Tracking
from .train import resume, run

__all__ = ["SWEEP_FILE", "SUMMARIES", "SweepFailed", "compare_runs", "engine_record", "plan_sweep", "resume_sweep",
           "run_sweep", "start_sweep", "summary_md"]

SWEEP_FILE = "sweep.json"
STARTED = "started"  # Ray workers' notes of their run folders, folded into sweep.json by the driver
# manifest kind -> the writers ("module:function", called with (sweep_dir, manifest)) of its summary after every
# finished run, and the summary file the CLI points to. Names come from this table only, never from sweep.json.
SUMMARIES = {"sweep": (("covid_fastai.sweep:_write_table",), "comparison.md"),
             "cv": (("covid_fastai.sweep:_write_table", "covid_fastai.cv_report:write_cv_summary"), "cv.md")}


def plan_sweep(pattern: str, policies: str | None = None, **overrides) -> list[Recipe]:
    """Every recipe matching `pattern` (glob or comma-separated names) under each of `policies` ('assignment,modern';
    None: as the recipe file says), with the overrides applied. All are checked before any runs."""
    if policies and "policy" in overrides:
        raise RecipeError("pass either --policies (one run per policy) or --policy, not both")
    pols = [p.strip() for p in str(policies).split(",") if p.strip()] if policies else [None]
    recs = [with_overrides(r, **({"policy": p} if p else {}), **overrides) for r in match_recipes(pattern)
            for p in pols]
    # the plan is resumed from other folders and sessions: pin the data folder
    return [r if r.data == "demo" else dataclasses.replace(r, data=str(resolve_data(r.data))) for r in recs]


class SweepFailed(UserError):
    "A sweep that ran its whole plan with some runs failed: the others are kept and tabled, `resume` reruns these."

    def __init__(self, sweep_dir, failed: list[str], n: int, command: Command):
        self.sweep_dir, self.failed = Path(sweep_dir), failed
        super().__init__(f"sweep {sweep_dir}: {len(failed)} of {n} runs failed ({'; '.join(failed)})"[:900],
                         f"the table is {summary_md(sweep_dir)}; fix the problem, then run the failed again with "
                         "{command}", path=sweep_dir, command=command)


def engine_record(engine: str = "local", address: str | None = None, cpus_per_run: float = 1,
                  gpus_per_run: float = 0, cpus: int | None = None) -> dict:
    """The manifest's `engine`, checked (ray must be installed for 'ray'). address: a Ray cluster to join (default:
    a local Ray of `cpus` CPUs, default all); cpus_per_run / gpus_per_run: what each run's Ray task declares."""
    check_engine(engine, cpus_per_run, gpus_per_run)
    if engine == "local": return {"kind": "local"}
    return {"kind": "ray", "address": address, "cpus_per_run": float(cpus_per_run),
            "gpus_per_run": float(gpus_per_run), "cpus": cpus}


def _row(run_dir) -> dict:
    d = Path(run_dir)
    return sweep_row(d, json.loads((d / "config.json").read_text()), json.loads((d / "metrics.json").read_text()))


def run_sweep(pattern: str, out=None, policies: str | None = None, cbs=None, track=None, engine: str = "local",
              address: str | None = None, cpus_per_run: float = 1, gpus_per_run: float = 0, **overrides) -> Path:
    """Run every recipe matching `pattern` under each of `policies`; returns the sweep folder, whose
    comparison.md/.csv/.html put the runs side by side.

    out: folder for the run folders and `sweeps/` (default ./outputs)
    cbs: extra fastai callbacks for every run (tests use one to interrupt a sweep)
    track: 'mlflow' and/or 'tensorboard' for every run; in MLflow the sweep is a parent run (covid_fastai.track)
    engine: 'local' (one run after another here) or 'ray' (Ray tasks, see the module docstring; raises
      `SweepFailed` at the end if a run failed); address, cpus_per_run, gpus_per_run: see `engine_record`
    """
    if isinstance(pattern, (tuple, list)): pattern = ",".join(map(str, pattern))  # fire parses a,b as a tuple
    if isinstance(policies, (tuple, list)): policies = ",".join(map(str, policies))
    eng = engine_record(engine, address, cpus_per_run, gpus_per_run)
    recs = plan_sweep(str(pattern), policies, **overrides)
    root = (Path(out) if out is not None else OUTPUTS).expanduser().resolve()
    tracking = Tracking.of(track, root)  # a missing package fails here, before any folder exists
    made = [d for d in (root, root / "sweeps") if not d.exists()]  # removed again if nothing runs
    sweep_dir = new_run_dir(root, "sweeps")
    manifest = {"pattern": str(pattern), "policies": policies, "overrides": {k: str(v) for k, v in overrides.items()},
                "out": str(root), "created": datetime.now(timezone.utc).isoformat(), "status": "running",
                "command": sys.argv, "engine": eng, "runs": [{"recipe": dataclasses.asdict(r), "run_dir": None} for r in recs]}
    return start_sweep(sweep_dir, manifest, cbs, made, tracking)


def start_sweep(sweep_dir: Path, manifest: dict, cbs=None, made=(), tracking=None) -> Path:
    """Write `manifest` as `sweep_dir/sweep.json` and run its plan; returns `sweep_dir`.

    manifest: `out` (root of the run folders), `runs` (items {'recipe': asdict(Recipe), 'run_dir': None, optional
    'tag'}), optional `kind` (a key of `SUMMARIES`, default 'sweep'), optional `engine` (`engine_record`, default
    local) and whatever else its summary reads.
    made: folders created for it, removed with `sweep_dir` if it stops before any run started (nothing to resume).
    tracking: a `Tracking` (or a --track value) for every run; in MLflow the sweep is a parent run."""
    write_json(sweep_dir / SWEEP_FILE, manifest)
    try:
        return _carry_on(sweep_dir, manifest, cbs, Tracking.of(tracking, manifest["out"]), fresh=True)
    except BaseException:
        if not _any_started(manifest): discard(sweep_dir, made)
        raise


def discard(sweep_dir: Path, made=()):
    "Remove a sweep folder that holds nothing to resume, and the (then empty) folders made for it."
    shutil.rmtree(sweep_dir, ignore_errors=True)
    for d in reversed(list(made)):
        with contextlib.suppress(OSError): d.rmdir()


def summary_md(sweep_dir) -> Path:
    "The summary a sweep folder's kind writes (comparison.md, cv.md)."
    kind = json.loads((Path(sweep_dir) / SWEEP_FILE).read_text()).get("kind", "sweep")
    return Path(sweep_dir) / SUMMARIES[kind][1]


def resume_sweep(sweep_dir, cbs=None, track=None) -> Path:
    """Carry on with an interrupted or failed sweep from its `sweep.json` (see the module docstring); it keeps the
    trackers it started with, and `track` adds more."""
    sweep_dir, manifest = open_unfinished(sweep_dir, SWEEP_FILE, "sweep", "outputs/sweeps/<timestamp>",
                                          lambda d, m: summary_md(d))
    return _carry_on(sweep_dir, manifest, cbs, Tracking.of(track, manifest["out"], manifest.get("tracking")))


def _any_started(manifest) -> bool:
    return any(it["run_dir"] for it in manifest["runs"])


def _carry_on(sweep_dir: Path, manifest: dict, cbs, tracking: Tracking, fresh: bool = False) -> Path:
    """Run (or resume) every planned run that has not finished, rewriting the table after each.
    fresh: a new sweep, whose folder goes if it stops before any run started (bad data, no weights, ...)."""
    items = manifest["runs"]

    def save(): write_json(sweep_dir / SWEEP_FILE, manifest)
    go_on = Command("resume", (str(sweep_dir),), function="resume_sweep")
    busy = RunFolderError(f"{sweep_dir} is in use by another process (a sweep or resume still going)",
                          "wait for it or stop it first", path=sweep_dir)
    with folder_lock(sweep_dir, busy):
        manifest.pop("error", None)
        manifest["status"] = "running"
        _fold_in_started(sweep_dir, manifest)  # notes of Ray workers whose driver stopped before reading them
        save()
        tracking.open_sweep(sweep_dir, manifest, save)  # MLflow: the parent of the runs
        try:
            if manifest.get("engine", {}).get("kind") == "ray":
                failed = _ray_runs(sweep_dir, manifest, cbs, tracking, save)
                if failed: raise SweepFailed(sweep_dir, failed, len(items), go_on)
            else:
                _local_runs(sweep_dir, manifest, cbs, tracking, save)
        except BaseException as e:
            gone = fresh and not _any_started(manifest) and not isinstance(e, SweepFailed)
            tracking.end_sweep(sweep_dir, manifest, e, discard=gone)
            if gone: raise  # run_sweep removes the folder: nothing to resume
            stopped = isinstance(e, KeyboardInterrupt)  # Ctrl-C, or SIGTERM turned into it by the CLI
            manifest.update(status="interrupted" if stopped else "failed",
                            **({} if stopped else {"error": " ".join(str(e).split())[:500] or type(e).__name__}))
            save()
            done = f"{_n_done(items)} of {len(items)} runs finished"
            if stopped:
                raise RunInterrupted(sweep_dir, 0, f"the sweep has {done}; continue it with {{command}}", go_on) from e
            if not isinstance(e, SweepFailed):  # its own message says how to go on
                note_fix(e, f"sweep {sweep_dir} stopped with {done}; fix the problem, then continue it with {{command}}",
                         go_on)
            raise
        manifest["status"] = "complete"
        save()
        tracking.end_sweep(sweep_dir, manifest)
    return sweep_dir


def _tag(i: int, items) -> str:
    rec = recipe_from_dict(items[i]["recipe"])
    tag = f"[{i + 1}/{len(items)}] {rec.name} ({rec.policy} policy)"
    return tag + (f", {items[i]['tag']}" if items[i].get("tag") else "")  # e.g. a cv's fold


def _unfinished(items):
    """(index, item, tag, its stopped run folder to resume or None) of each run not finished yet, in plan order,
    checked as it comes (a run finished meanwhile is skipped); the finished ones are printed as such."""
    for i, item in enumerate(items):
        d, tag = item["run_dir"], _tag(i, items)
        if run_status(d) == "complete":
            print(f"== {tag}: finished already in {d}", flush=True)
            continue
        yield i, item, tag, (d if d and (Path(d) / CHECKPOINT).is_file() else None)


def _local_runs(sweep_dir: Path, manifest: dict, cbs, tracking: Tracking, save):
    "The local engine: every unfinished run in turn, in this process; the first failure stops the sweep."
    items, root = manifest["runs"], Path(manifest["out"])
    for i, item, tag, again in _unfinished(items):
        if again:
            print(f"== {tag}: resuming {again}", flush=True)
            resume(again, cbs=cbs, track=tracking.child())
        else:
            rec = recipe_from_dict(item["recipe"])
            print(f"== {tag}: {rec.describe()}", flush=True)

            def started(run_dir, item=item):
                item["run_dir"] = str(run_dir)
                save()
            run(rec, out=root, cbs=cbs, started=started, track=tracking.child())
        print(f"   {run_summary(Path(item['run_dir']))}", flush=True)
        _write_summary(sweep_dir, manifest)


def _ray_runs(sweep_dir: Path, manifest: dict, cbs, tracking: Tracking, save) -> list[str]:
    """The Ray engine: every unfinished run as a Ray task, the summary rewritten as each lands; returns
    'recipe: error' of each failed run (its item keeps `error`). Ctrl-C cancels the running ones (marked, resumable)."""
    from .ray_engine import ray_session, remote
    items, eng = manifest["runs"], manifest["engine"]
    notes = sweep_dir / STARTED
    notes.mkdir(exist_ok=True)
    child = tracking.child()
    track = (child.kinds, child.mlflow.uri if child.mlflow else None, child.parent)  # rebuilt in the worker
    failed = []
    with ray_session(eng.get("address"), eng.get("cpus")) as ray:
        task = remote(_ray_run, eng["cpus_per_run"], eng["gpus_per_run"])
        pending = {}
        for i, item, tag, again in _unfinished(items):
            item.pop("error", None)
            print(f"== {tag}: " + (f"resuming {again}" if again else recipe_from_dict(item["recipe"]).describe()) +
                  " (a Ray task)", flush=True)
            pending[task.remote(item["recipe"], manifest["out"], again, str(notes / str(i)), cbs, track,
                                eng["cpus_per_run"])] = i
        save()
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
                if _fold_in_started(sweep_dir, manifest): save()
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        items[i]["run_dir"] = ray.get(ref)
                        print(f"   {_tag(i, items)}: {run_summary(Path(items[i]['run_dir']))}", flush=True)
                    except Exception as e:  # a failed run: reported, and the others go on
                        items[i]["error"] = one_line(getattr(e, "cause", None) or e)
                        failed.append(f"{recipe_from_dict(items[i]['recipe']).name}: {items[i]['error']}")
                        print(f"   {_tag(i, items)} failed: {items[i]['error']}", flush=True)
                    _fold_in_started(sweep_dir, manifest)
                    save()
                    _write_summary(sweep_dir, manifest)
        except BaseException:  # Ctrl-C here: stop the runs as Ctrl-C stops a run, then record where they are
            for ref in pending: ray.cancel(ref)
            with contextlib.suppress(BaseException):
                ray.wait(list(pending), num_returns=len(pending), timeout=60)
            _fold_in_started(sweep_dir, manifest)
            save()
            raise
    for i, item in enumerate(items):  # a finished run's note has served
        if run_status(item["run_dir"]) == "complete": (notes / str(i)).unlink(missing_ok=True)
    with contextlib.suppress(OSError): notes.rmdir()
    return failed


def _ray_run(recipe: dict, out: str, again: str | None, note: str, cbs, track, cpus: float) -> str:
    """One run of a sweep, in a Ray worker: a new run of `recipe` under `out` (its folder noted in the file `note`
    as soon as it exists), or `again`, a stopped run folder, continued; returns the run folder."""
    from .mlflow_store import MlflowStore
    from .ray_engine import use_threads
    use_threads(cpus)
    kinds, uri, parent = track
    tracking = Tracking(tuple(kinds), MlflowStore(uri) if uri else None, parent)
    if again: return str(resume(again, cbs=cbs, track=tracking))
    return str(run(recipe_from_dict(recipe), out=out, cbs=cbs, track=tracking,
                   started=lambda d: write_json(Path(note), str(d))))


def _fold_in_started(sweep_dir: Path, manifest: dict) -> bool:
    "Fold the Ray workers' notes (`started/<index>`: a run's folder) into the manifest; True if any was new."
    new = False
    for f in sorted((Path(sweep_dir) / STARTED).glob("*")):
        if not f.name.isdigit() or int(f.name) >= len(manifest["runs"]): continue
        with contextlib.suppress(ValueError, OSError):
            d = json.loads(f.read_text())
            item = manifest["runs"][int(f.name)]
            new |= item["run_dir"] != d
            item["run_dir"] = d
    return new


def _n_done(items) -> int:
    return sum(run_status(it["run_dir"]) == "complete" for it in items)


def _write_summary(sweep_dir: Path, manifest: dict):
    "Rewrite the summaries of the manifest's kind (SUMMARIES) from the runs finished so far."
    for name in SUMMARIES[manifest.get("kind", "sweep")][0]:
        module, fn = name.split(":")
        getattr(importlib.import_module(module), fn)(sweep_dir, manifest)


def _write_table(sweep_dir: Path, manifest: dict):
    "The comparison of the runs finished so far, in plan order, and of those that failed (Ray engine)."
    items = manifest["runs"]
    done = [it["run_dir"] for it in items if run_status(it["run_dir"]) == "complete"]
    failed = [it for it in items if it.get("error") and run_status(it["run_dir"]) != "complete"]
    if not done and not failed: return
    n = len(items)
    what = manifest.get("title") or f"Sweep {manifest['pattern']}"
    title = f"{what} ({manifest['created'][:16].replace('T', ' ')} UTC)"
    if len(done) < n: title += f": {len(done)} of {n} runs finished" + (f", {len(failed)} failed" if failed else "")
    write_sweep(sweep_dir, [_row(d) for d in done], title, failed=[_failed_row(it) for it in failed])


def _failed_row(item: dict) -> dict:
    rec = item["recipe"]
    return {"recipe": rec["name"], "policy": rec.get("policy"), "arch": rec.get("arch"),
            "run": item["run_dir"] or "(no folder: it failed before starting)", "error": item["error"]}


def compare_runs(run_dirs, out=None, title: str | None = None) -> Path:
    """comparison.md/.csv/.html of finished run folders, side by side (the table a sweep writes), in
    `<out>/comparisons/<timestamp>/` (out default ./outputs); returns comparison.md's path."""
    dirs = [Path(d).expanduser() for d in run_dirs]
    if not dirs: raise RunFolderError("compare needs run folders, e.g. outputs/vgg16_head/20260101-120000")
    for d in dirs:
        st = run_status(d)
        if st is None:
            raise RunFolderError(f"{d} is not a run folder (no config.json)",
                                 "pass folders a run created, e.g. outputs/<recipe>/<timestamp>", path=d)
        if st != "complete" or not (d / "metrics.json").is_file():
            resumable = (d / CHECKPOINT).is_file()
            raise RunFolderError(f"{d} is not a finished run (status {st})",
                                 "continue it with {command}" if resumable else "leave it out", path=d,
                                 command=Command("resume", (str(d),)) if resumable else None)
    out_dir = new_run_dir((Path(out) if out is not None else OUTPUTS).expanduser(), "comparisons")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md, _ = write_sweep(out_dir, [_row(d) for d in dirs], title or f"Comparison of {len(dirs)} runs ({stamp})")
    return md
