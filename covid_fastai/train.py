"""Running a recipe: data -> Learner -> plan -> fit -> evaluation -> run folder.

Each run writes `outputs/<recipe>/<run-id>/` (rundir.py): config.json, history.csv, curves.png, confusion
matrices, ROC/PR and calibration plots, best/worst grids per class with Grad-CAM, metrics.json, report.md,
report.html and model.safetensors. A new run never overwrites an earlier one.

Interruptions: every finished epoch writes `checkpoint.pt` (checkpoint.py). config.json's `status` is `running`,
then `complete`, `interrupted` (Ctrl-C / SIGTERM: `RunInterrupted` is raised, saying how to go on) or `failed`
(with the error). `resume(RUN_DIR)` rebuilds the recipe from config.json and continues in the same folder from
the next epoch, ending where an uninterrupted run with the same seed would.

Data-parallel (torchrun / accelerate launch, covid_fastai.distributed): every process builds the same Learner and
fits its shard; rank 0 alone creates, locks and writes the run folder, checkpoints and evaluates (on the full
valid and test splits, each image once).
"""
from __future__ import annotations

import dataclasses
import errno
import time
from pathlib import Path

import pandas as pd
from fastai.learner import Learner
from fastai.vision.all import ProgressCallback
from safetensors.torch import save_file

from .callbacks import HistoryCSV, OneClassWarning, TrainThroughput, cpu_kind, plain_epoch_log
from . import distributed
from .checkpoint import EpochCheckpoint, load_checkpoint, restore_fit_state
from .data import XrayFolders
from .errors import Command, RunFolderError, RunInterrupted, UserError, note_fix, recipe_command
from .export import export_learner
from .fit import deterministic, find_lr, fit_recipe, fitting_learner
from .interpret import Evaluation, plot_curves, write_evaluation
from .learner import for_this_cpu, recipe_learner, tta_aug
from .metrics import binary_metrics, choose_threshold
from .modelcard import write_model_card
from .progress import interactive, phase, phase_lines
from .provenance import run_facts
from .recipes import Recipe, load_recipe, with_overrides
from .report import SYNTHETIC_BANNER, write_html, write_report
from .rundir import CHECKPOINT, OUTPUTS, RunDir, one_line
from .track import Tracking

__all__ = ["run", "run_recipe", "resume"]


@dataclasses.dataclass
class _Run:
    "What one run carries from its start to its end."
    recipe: Recipe
    learn: Learner  # the recipe's Learner (full model; evaluated after the fit)
    folders: XrayFolders
    dir: RunDir
    state: dict | None = None  # the loaded checkpoint, when resuming
    export: bool = False
    cbs: list = dataclasses.field(default_factory=list)  # the caller's extra callbacks
    t_start: float = dataclasses.field(default_factory=time.perf_counter)
    throughput: TrainThroughput = dataclasses.field(default_factory=TrainThroughput)
    trainer: Learner | None = None  # the Learner that fits: `learn`, or a head-only one on cached features
    evaluate_on: str = "test"  # 'valid': the test split is held out (a tune's trials), see `run`

    @property
    def start_epoch(self) -> int: return self.state["epoch"] + 1 if self.state else 0


@phase_lines()  # in logs and pipes, each step around training prints a line as it starts and ends
def run(recipe: Recipe, out=None, resume=None, export: bool = False, cbs=None, started=None, track=None,
        evaluate_on: str = "test") -> Path | None:
    """Train and evaluate `recipe`; returns the run folder (None on the other processes of a data-parallel run).

    resume: a run folder of this recipe with a `checkpoint.pt`: continue it from the next epoch (see `resume`).
    export: also write fastai's pickled `export.pkl` (`learn.export`); load it only with `load_export(trust=True)`.
    cbs: extra fastai callbacks for the fitting Learner (tests use one to interrupt a run).
    started: called with the run folder as soon as it exists (a sweep records it, to resume the run later).
    track: 'mlflow', 'tensorboard' or both ('mlflow,tensorboard'), see covid_fastai.track; a resumed run keeps
      the trackers it started with.
    evaluate_on: 'test' evaluates on the test split when the data has one, else on valid; 'valid' always on valid,
    leaving the test split unscored (a tune's trials choose settings on valid only; config.json records it).
    """
    if evaluate_on not in ("test", "valid"):
        raise ValueError(f"evaluate_on must be 'test' or 'valid', got {evaluate_on!r}")
    t_start = time.perf_counter()
    distributed.setup()  # one of several processes (torchrun, accelerate launch): join them
    before = RunDir.open(resume).config if resume is not None else None
    if before is not None: distributed.check_resume_world(before, resume)  # as many processes as before
    # the size on this CPU (the recipe's fp32_size where it has no bf16 units); a resumed run keeps its own size
    here = for_this_cpu(recipe) if before is None else recipe
    if not distributed.is_main(): return _follow(here, resume)
    if here is not recipe:
        print(f"this CPU has no bf16 units ({cpu_kind()}): training at {here.size} px, the recipe's fp32_size "
              f"({recipe.size} px elsewhere; --size {recipe.size} trains at that size here too)", flush=True)
    fp32_size_used = (here is not recipe if before is None
                      else bool(((before.get("speed") or {}).get("fp32_size") or {}).get("used")))
    recipe = here
    record = before.get("tracking") if before is not None else None
    tracking = Tracking.of(track, Path(resume).parent.parent if resume is not None else out or OUTPUTS, record)
    learn, folders = recipe_learner(recipe)
    learn.fp32_size_used = fp32_size_used  # config.json's speed.fp32_size.used
    folders.labels  # a bad labels.csv (used after training, for the breakdowns) fails now, not then
    if resume is not None:
        rd = RunDir.open(resume)
        state = load_checkpoint(rd.path, learn, recipe.name, folders.root)
    else:
        rd, state = RunDir.new(Path(out) if out is not None else OUTPUTS, recipe.name), None
    if started is not None: started(rd.path)
    r = _Run(recipe, learn, folders, rd, state, export, [*(cbs or []), *tracking.callbacks(rd)], t_start,
             evaluate_on=evaluate_on)
    with rd.lock(), deterministic(recipe.reproducible), tracking.around(rd):
        _run_in(r)
    return rd.path


def _follow(recipe: Recipe, resume=None) -> None:
    "Rank > 0 of a data-parallel run: the same Learner, checkpoint state and fit as rank 0, and no files written."
    learn, folders = recipe_learner(recipe)
    state = load_checkpoint(resume, learn, recipe.name, folders.root) if resume is not None else None
    with deterministic(recipe.reproducible):
        trainer = fitting_learner(learn, recipe, [EpochCheckpoint.of(learn, None, state)] if state else [])
        trainer.recorder.train_metrics = True  # as rank 0's: its metrics gather from every process
        if state is not None: restore_fit_state(trainer, state)
        lr = _fit_lr(recipe, None)
        with distributed.data_parallel(trainer): fit_recipe(trainer, recipe, lr, state["epoch"] + 1 if state else 0)


def _fit_lr(recipe: Recipe, lr: float | None) -> float:
    "The rate every process fits with: rank 0's `lr` (its lr_find's, or the recipe's), scaled under lr_scaling."
    return distributed.scaled_lr(distributed.agree(lr), recipe)


def _run_in(r: _Run):
    "Fit and finish `r` in its folder, recording its fate in config.json however it ends."
    rd, learn = r.dir, r.learn
    learn.path = rd.path
    config = rd.start(r.recipe, r.start_epoch)
    if r.evaluate_on != "test": config["evaluate_on"] = r.evaluate_on  # a resume keeps holding the test split out

    def warn(msg):  # kept in config.json (and so in the report), and said at once beside the epoch lines
        config.setdefault("warnings", []).append(msg)
        rd.save()
        print(f"warning: {msg}", flush=True)

    try:
        trainer = _prepare(r, warn)
        config.update(run_facts(r.recipe, learn, r.folders, trainer))
        rd.save()
        if r.recipe.lr_find and "lr_find" not in config:  # a resumed run keeps the rate it started with
            with phase("lr_find"), distributed.alone():  # data-parallel: rank 0's, while the others wait for it
                config["lr_find"] = find_lr(trainer, r.recipe, rd.path, quiet=_own_cbs(r))
            rd.save()
        lr = _fit_lr(r.recipe, config["lr_find"]["lr"] if r.recipe.lr_find else r.recipe.lr)
        if distributed.world_size() > 1:
            config["distributed"] = distributed.facts(r.recipe, lr)
            rd.save()
        with phase(f"fit: {r.recipe.epochs} epoch(s)" + (f", from epoch {r.start_epoch}" if r.start_epoch else "")):
            with distributed.data_parallel(trainer): fit_recipe(trainer, r.recipe, lr, r.start_epoch)
        trainer.remove_cbs(_own_cbs(r))  # fastai's tta fires before_fit/after_fit: the run's callbacks leave first
        with distributed.alone(): _finish(r)  # data-parallel: rank 0 evaluates the whole splits by itself
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (the CLI turns it into KeyboardInterrupt)
        fix, command = _how_to_continue(r)
        done = len(getattr(r.throughput, "epoch_times", None) or [])
        rd.mark("interrupted", **({"resume": _spelt(fix, command)} if rd.checkpoint.exists() else {}))
        raise RunInterrupted(rd.path, done, fix, command) from e
    except OSError as e:
        if not _disk_full(e):
            rd.mark("failed", error=one_line(e))
            raise
        fix, command = _how_to_continue(r)
        err = RunFolderError(f"disk full while writing {e.filename or rd.path}",
                             f"free some space (or pass --out DIR on another disk), then {fix}", path=rd.path,
                             command=command)
        rd.mark("failed", error=str(err))
        raise err from None
    except BaseException as e:
        rd.mark("failed", error=one_line(e))
        if isinstance(e, UserError) and rd.checkpoint.exists():  # the user fixes it, then the run goes on
            note_fix(e, f"{rd.path} keeps its finished epochs: continue it with {{command}}", rd.resume_command)
        raise


def _prepare(r: _Run, warn) -> Learner:
    """The Learner that fits, with the run's callbacks, and the checkpoint's state loaded when resuming.
    `warn(message)`: where the one-class warning goes."""
    learn, d = r.learn, r.dir
    cbs = [r.throughput, HistoryCSV(d / "history.csv", r.start_epoch), EpochCheckpoint.of(learn, d.checkpoint, r.state),
           OneClassWarning(learn.dls.vocab, warn), *r.cbs]
    trainer = fitting_learner(learn, r.recipe, cbs)
    trainer.train_throughput = r.throughput
    trainer.recorder.train_metrics = True
    if not interactive():  # a log or pipe (a notebook's stdout is no tty, but its bars draw well)
        for lrn in {id(learn): learn, id(trainer): trainer}.values(): lrn.remove_cb(ProgressCallback)
        trainer.logger = plain_epoch_log(trainer, r.start_epoch)
    if r.state is not None: restore_fit_state(trainer, r.state)
    r.trainer = trainer
    return trainer


def _own_cbs(r: _Run) -> list:
    "The run's own fit callbacks (loggers, checkpoint, warnings, the caller's): out of lr_find and evaluation."
    return [*r.cbs, *r.trainer.cbs.filter(lambda c: isinstance(c, (TrainThroughput, HistoryCSV, EpochCheckpoint,
                                                                     OneClassWarning)))]


def _finish(r: _Run):
    "After the fit: weights, evaluation, plots, metrics, report (and export.pkl on request)."
    rec, learn, folders, d, tp = r.recipe, r.learn, r.folders, r.dir, r.throughput
    # Training time includes making (or loading) the feature cache, so cached and uncached runs compare fairly.
    train_s = tp.seconds + r.trainer.feature_seconds
    world = d.config.get("distributed", {}).get("world_size", 1)  # rank 0 timed its shard, the others theirs alongside
    save_file({k: v.detach().contiguous() for k, v in learn.model.state_dict().items()}, d / "model.safetensors")
    if r.export: export_learner(learn, d.path)

    # Evaluate on test when there is one (and the caller does not hold it out), else on valid (and say so); the
    # decision threshold is chosen on valid.
    split = "test" if folders.has_test and r.evaluate_on == "test" else "valid"
    dl = learn.dls.test_dl(folders.files("test"), with_labels=True) if split == "test" else learn.dls.valid
    passes = tta_aug(rec)
    ev = Evaluation.of(learn, dl, split, tta=rec.tta, tta_aug=passes)
    valid_ev = ev if split == "valid" else Evaluation.of(learn, learn.dls.valid, "valid", tta=rec.tta, tta_aug=passes)
    _, pv, yv = valid_ev.positive()
    threshold = choose_threshold(yv, pv, rec.threshold)
    threshold["chosen_on"] = "recipe" if threshold["note"] == "fixed" else "valid"  # a fixed number saw no data
    note = f" {SYNTHETIC_BANNER}" if folders.synthetic else ""
    m, files = write_evaluation(d.path, ev, threshold, f"{rec.name}: {split} split", note, learn=learn,
                                labels=folders.labels, root=folders.root)
    metrics = {**m, "valid": {t: binary_metrics(yv, pv, v) for t, v in (("at_0.5", 0.5),
                                                                      ("at_threshold", threshold["value"]))},
               "train_seconds": train_s, "train_images_per_s": sum(tp.epoch_images) * world / max(train_s, 1e-9),
               "wall_seconds": None}
    history = pd.read_csv(d / "history.csv")
    files = {"curves": plot_curves(history, d / "curves.png", f"{rec.name}{note}"), **files}
    metrics["wall_seconds"] = time.perf_counter() - r.t_start
    d.write_json("metrics.json", metrics)

    def report(config):
        write_model_card(d.path, config, metrics)
        write_report(d.path, config, metrics, history, files)
        write_html(d / "report.md")
    d.complete(report, threshold=threshold)


def _disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _how_to_continue(r: _Run) -> tuple[str, Command]:
    "(fix, command) for a run that stopped: resume it from its checkpoint, or start the recipe again."
    if r.dir.checkpoint.exists(): return "continue it with {command}", r.dir.resume_command
    return "no epoch had finished, so start it again ({command})", recipe_command(r.recipe.name)


def _spelt(fix: str, command: Command) -> str:
    "A fix as config.json records it: the command in its Python spelling, `resume('RUN')`."
    return fix.replace("{command}", f"`{command}`")


def resume(run_dir, export: bool = False, cbs=None, track=None) -> Path:
    "Continue an interrupted or failed run in its own folder from its last finished epoch (see module docstring)."
    rd = RunDir.open(run_dir)
    again = recipe_command(rd.name)
    if rd.status == "complete":
        raise RunFolderError(f"{rd.path} finished already (status complete)",
                             "nothing to resume; start a new run with {command}", path=rd.path, command=again)
    if not rd.checkpoint.is_file():
        raise RunFolderError(f"{rd.path} has no {CHECKPOINT}",
                             "it stopped before its first epoch finished; start it again with {command}",
                             path=rd.path, command=again)
    return run(rd.recipe(), resume=rd.path, export=export, cbs=cbs, track=track,
               evaluate_on=rd.config.get("evaluate_on", "test"))


def run_recipe(name_or_recipe, out=None, export: bool = False, cbs=None, track=None, **overrides) -> Path:
    "Run a recipe by name, path or value, with command-line style overrides (`epochs=2`, `data='DIR'`)."
    rec = name_or_recipe if isinstance(name_or_recipe, Recipe) else load_recipe(name_or_recipe)
    return run(with_overrides(rec, **overrides), out=out, export=export, cbs=cbs, track=track)
