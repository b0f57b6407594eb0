"""Experiment tracking (`--track mlflow,tensorboard`): the callbacks and hooks that log a run or sweep as it goes.

The run folder stays the source of truth; trackers get copies. `Tracking.of(track)` checks the trackers' packages
(the `track` extra) and opens the MLflow store before any work; `callbacks(rd)` are the fastai callbacks a run
adds to its fit, and `around(rd)`, wrapped around the run, logs what only exists once it is complete (final
metrics, report, plots: mlflow_store.py) or marks a stopped run KILLED / FAILED. A resumed run keeps the trackers
and the MLflow run it started with (config.json's `tracking`). `import_folders` logs finished run and sweep
folders after the fact (CLI: `track RUN_DIR...`).

TensorBoard is fastai's own `TensorBoardCallback`, writing into `RUN_DIR/tensorboard/`: the smoothed train loss
and the optimiser's hyper-parameters per batch, the train and valid metrics per epoch (step: the batch count). Two
of its defaults are off: `trace_model` (a TorchScript trace, `add_graph`, at every fit: it added about 23 s to a
one-epoch EfficientNet-Lite0 fit at 32 px on a 2-core CPU) and `log_preds` (one more validation batch, drawn through
`show_results`, every epoch: it fails on the head-only Learner that fits on cached features, whose inputs are
features, not images). `StepsFromEpoch` keeps its steps right when a run is resumed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from pathlib import Path

from .callbacks import FitOnlyCallback
from .errors import Command, MissingExtra, RecipeError, RunFolderError
from .mlflow_store import (SWEEP_ARTIFACTS, MlflowStore, finished_run, import_run, import_sweep, iso_ms,
                           log_finished, recipe_params, run_tags, sweep_params, sweep_tags, tracking_uri)
from .rundir import RunDir, one_line

__all__ = ["TRACKERS", "tracker_kinds", "Tracking", "MlflowEpochs", "StepsFromEpoch", "import_folders"]

TRACKERS = {"mlflow": "mlflow", "tensorboard": "tensorboard"}  # --track value: the package it needs


def tracker_kinds(track) -> tuple[str, ...]:
    """`--track` as a tuple of tracker names: 'mlflow', 'tensorboard', 'mlflow,tensorboard' (fire passes a comma
    list as a tuple) or None. Each one's package must be installed: else a one-line `MissingExtra`."""
    if track is None or track == "" or track is False: return ()
    items = track if isinstance(track, (list, tuple, set)) else str(track).split(",")
    kinds = tuple(dict.fromkeys(str(k).strip().lower() for k in items if str(k).strip()))
    for k in kinds:
        if k not in TRACKERS:
            raise RecipeError(f"--track must be mlflow, tensorboard or both (mlflow,tensorboard), got {k!r}")
        if importlib.util.find_spec(TRACKERS[k]) is None: raise MissingExtra(TRACKERS[k], "track", f"--track {k}")
    return kinds


class MlflowEpochs(FitOnlyCallback):
    """Log each finished epoch's losses and metrics (the Recorder's, as history.csv names them) to an MLflow run,
    `step` = the epoch. The run is opened at the fit's start, so its id is in config.json from the first epoch."""
    order = 62  # after the Recorder (50) has the epoch's values

    def __init__(self, tracking: Tracking): self.tracking = tracking

    def before_fit(self): self.tracking.open_run()

    def after_epoch(self):
        names, log = self.recorder.metric_names, self.recorder.log
        if len(log) != len(names): return  # an epoch fastai's SkipToEpoch skipped on resume
        vals = {n: v for n, v in zip(names, log) if n not in ("epoch", "time") and isinstance(v, (int, float))}
        tp = getattr(self.learn, "train_throughput", None)
        if tp is not None and tp.epoch_times: vals["train_seconds"] = tp.epoch_times[-1]
        self.tracking.log_epoch(vals, self.epoch)


class StepsFromEpoch(FitOnlyCallback):
    """A resumed fit counts batches as the interrupted one did: fastai restarts `train_iter` at 0, and
    TensorBoard's scalars, stepped by `train_iter`, would otherwise overwrite the first epochs'. A fresh fit is
    untouched (there `train_iter` already equals epoch x batches)."""
    order = -5  # after TrainEvalCallback (-10) has set up the epoch

    def before_train(self):
        self.learn.train_iter = max(self.learn.train_iter, self.epoch * len(self.dls.train))


@dataclasses.dataclass
class Tracking:
    """The trackers of one run or sweep (`kinds`, from --track), checked and opened before any work starts.
    mlflow: the store; parent: the sweep's MLflow run id, for a child run."""
    kinds: tuple = ()
    mlflow: MlflowStore | None = None
    parent: str | None = None
    run_id: str | None = None  # the MLflow run, once open
    failed: str | None = None  # why logging stopped mid-run (the run goes on; the folder can be imported later)
    rd: RunDir | None = dataclasses.field(default=None, repr=False)
    tensorboard: object = dataclasses.field(default=None, repr=False)  # fastai's TensorBoardCallback, once made

    @classmethod
    def of(cls, track, root=None, record: dict | None = None) -> Tracking:
        """`track` (a --track value, or a `Tracking`, returned as it is) for runs under the outputs folder `root`;
        `record`: a resumed folder's `tracking` entry, whose trackers and MLflow store carry on."""
        if isinstance(track, Tracking): return track
        rec = record or {}
        kinds = tracker_kinds([*rec.get("kinds", []), *tracker_kinds(track)])
        uri = (rec.get("mlflow") or {}).get("tracking_uri") or tracking_uri(root or "outputs")
        return cls(kinds, MlflowStore(uri) if "mlflow" in kinds else None)

    def __bool__(self): return bool(self.kinds)

    def child(self) -> Tracking:
        "The same trackers for one run of the sweep this tracks (in MLflow, a child of the sweep's run)."
        return Tracking(self.kinds, self.mlflow, self.run_id)

    def open_sweep(self, sweep_dir: Path, manifest: dict, save):
        "A sweep's MLflow parent run (new, or continued on resume), recorded in sweep.json by `save()`."
        if not self: return
        manifest.setdefault("tracking", {})["kinds"] = list(self.kinds)
        if self.mlflow is not None:
            tags = sweep_tags(sweep_dir, manifest)
            self.run_id = self.mlflow.open_run(f"sweep {Path(sweep_dir).name}", manifest["tracking"].get("mlflow"),
                                               tags=tags, start_ms=iso_ms(manifest.get("created")))
            self.mlflow.log(self.run_id, params=sweep_params(manifest), tags=tags)
            manifest["tracking"]["mlflow"] = self.mlflow.record(self.run_id)
        save()

    def end_sweep(self, sweep_dir: Path, manifest: dict, error: BaseException | None = None, discard: bool = False):
        """The sweep's parent run ends: with its comparison table when complete, else KILLED or FAILED; `discard`:
        deleted, as the sweep folder is when it stopped before any run started."""
        if not self.run_id: return
        if error is not None:
            with contextlib.suppress(Exception):
                if discard: self.mlflow.client.delete_run(self.run_id)
                else: self.mlflow.end(self.run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            return
        self.mlflow.log_files(self.run_id, Path(sweep_dir), SWEEP_ARTIFACTS)
        self.mlflow.log(self.run_id, tags=sweep_tags(sweep_dir, manifest))
        self.mlflow.end(self.run_id, "FINISHED")

    def callbacks(self, rd: RunDir) -> list:
        "The fastai callbacks that log the fit of the run in `rd`; its config.json will say which trackers it used."
        self.rd = rd
        if not self.kinds: return []
        # rd.start keeps what the folder's config already holds: this survives into config.json
        rd.config.setdefault("tracking", {})["kinds"] = list(self.kinds)
        cbs = [MlflowEpochs(self)] if self.mlflow else []
        if "tensorboard" in self.kinds:
            from fastai.callback.tensorboard import TensorBoardCallback
            self.tensorboard = TensorBoardCallback(log_dir=str(rd.path / "tensorboard"), trace_model=False,
                                                   log_preds=False)
            cbs += [StepsFromEpoch(), self.tensorboard]
        return cbs

    def _warn(self, e: Exception):
        self.failed = one_line(e)
        print(f"warning: MLflow logging stopped ({self.failed}); the run goes on, and "
              f"{Command('track', (str(self.rd.path),), function='import_folders')} imports it once finished", flush=True)

    def open_run(self):
        "Open (or continue) the run's MLflow run, log its params and record its id in config.json."
        rd = self.rd
        if not self.mlflow or self.run_id or self.failed: return
        rec = (rd.config.get("tracking") or {}).get("mlflow")
        try:
            self.run_id = self.mlflow.open_run(rd.path.name, rec, self.parent, run_tags(rd), iso_ms(rd.config.get("created")))
            self.mlflow.log(self.run_id, params=recipe_params(rd.config), tags=run_tags(rd))
        except Exception as e: return self._warn(e)
        parent = self.parent or (rec or {}).get("parent_run_id")
        rd.config.setdefault("tracking", {})["mlflow"] = self.mlflow.record(self.run_id, parent)
        rd.save()

    def log_epoch(self, metrics: dict, epoch: int):
        if not self.run_id or self.failed: return
        try: self.mlflow.log(self.run_id, metrics, step=epoch)
        except Exception as e: self._warn(e)

    @contextlib.contextmanager
    def around(self, rd: RunDir):
        "Around a run: once it is complete, its final metrics and artifacts go to MLflow; a stopped run is marked so."
        self.rd = rd
        try: yield self
        except BaseException as e:
            if self.tensorboard is not None and getattr(self.tensorboard, "writer", None) is not None:
                self.tensorboard.writer.close()  # fastai closes it in after_fit, which a stopped fit never reaches
            if self.run_id and not self.failed:
                with contextlib.suppress(Exception):
                    self.mlflow.log(self.run_id, tags={"covid_fastai.status": rd.config.get("status"),
                                                       "covid_fastai.error": rd.config.get("error")})
                    self.mlflow.end(self.run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        if not self.mlflow: return
        self.open_run()  # normally open since the fit started
        if not self.run_id or self.failed:
            if self.run_id:
                with contextlib.suppress(Exception): self.mlflow.end(self.run_id, "FAILED")
            return print(f"warning: the run is not (wholly) in MLflow; {Command('track', (str(rd.path),), function='import_folders')} imports "
                         "it", flush=True)
        try:
            log_finished(self.mlflow, self.run_id, rd)
            self.mlflow.end(self.run_id, "FINISHED", iso_ms(rd.config.get("finished")))
        except Exception as e: self._warn(e)


def import_folders(paths, uri: str | None = None) -> list[str]:
    """Import run and sweep folders into MLflow (`uri`, else each folder's own store, see `tracking_uri`);
    returns one line per folder saying where it went."""
    from .sweep import SWEEP_FILE
    if importlib.util.find_spec("mlflow") is None: raise MissingExtra("mlflow", "track", "`track`")
    if isinstance(paths, (str, Path)): paths = [paths]  # one folder, as the advice `import_folders('RUN')` reads
    if not paths: raise RunFolderError("track needs run or sweep folders, e.g. outputs/vgg16_head/20260101-120000")
    stores, lines = {}, []

    def store_for(d: Path) -> MlflowStore:
        u = uri or tracking_uri(d.resolve().parent.parent)
        if u not in stores: stores[u] = MlflowStore(u)
        return stores[u]

    folders = [Path(x).expanduser() for x in paths]
    for p in folders:  # every folder checked before any store is opened or written
        if not (p / SWEEP_FILE).is_file(): finished_run(RunDir.open(p))
    for p in folders:
        if (p / SWEEP_FILE).is_file():
            pid, kids = import_sweep(p, store_for(p))
            lines.append(f"{p}: sweep run {pid} with {len(kids)} child run(s) in {store_for(p).uri}")
        else:
            rid, new = import_run(p, store_for(p))
            lines.append(f"{p}: run {rid} {'imported into' if new else 'already in'} {store_for(p).uri}")
    return lines
