"""Running a recipe: data -> Learner -> plan -> fit -> evaluation -> run folder.

Each run writes `outputs/<recipe>/<run-id>/`: config.json, history.csv, curves.png, confusion matrices, ROC/PR
and calibration plots, best/worst grids per class with Grad-CAM, metrics.json, report.md, report.html and
model.safetensors. A new run never overwrites an
earlier one.

Interruptions: every finished epoch writes `checkpoint.pt` (model, optimiser, RNG states, the loaders'
shuffling state, the recorder's smoothed loss; plain tensors and numbers, loaded with `weights_only=True`).
config.json's `status` is `running`, then `complete`, `interrupted` (Ctrl-C / SIGTERM) or `failed` (with the
error). `resume(RUN_DIR)` rebuilds the recipe from config.json and continues in the same folder from the
next epoch, ending where an uninterrupted run with the same seed would (loader workers: 0, the default on
small machines; persistent worker processes keep RNG state a checkpoint cannot see).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import platform
import random
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.torch_core import default_device, to_device
from fastai.vision.all import ProgressCallback, set_seed
from safetensors.torch import save_file

from . import __version__
from .callbacks import BF16Autocast, ChannelsLast, FitOnlyCallback, OneClassWarning, TrainThroughput, bf16_supported
from .data import SEED_RESIZE_RATIO, find_xray_folders, make_aug, patients_of, xray_dls
from .demo import demo_data
from .errors import UserError
from .features import head_learner, use_feature_cache
from .interpret import Evaluation, plot_curves, write_evaluation
from .labels import fine_label_getter, read_labels
from .metrics import binary_metrics, choose_threshold
from .models import xray_learner
from .plans import Plan, apply_plan
from .recipes import Recipe, cache_mode, load_recipe, with_overrides
from .report import SYNTHETIC_BANNER, mom_trained_with, momentum_used, write_html, write_report

__all__ = ["run", "run_recipe", "recipe_learner", "folders_learner", "new_run_dir", "resolve_data", "HistoryCSV",
           "OUTPUTS", "resume", "recipe_from_config", "EpochCheckpoint", "load_export", "CHECKPOINT",
           "run_summary"]

CHECKPOINT = "checkpoint.pt"

OUTPUTS = Path(os.environ.get("COVID_FASTAI_OUTPUTS", "outputs"))


def resolve_data(data: str) -> Path:
    "'demo' -> the synthetic set in the user cache; anything else is a folder path."
    return demo_data() if str(data) == "demo" else Path(data).expanduser().resolve()


def new_run_dir(root, name: str) -> Path:
    "A fresh `root/name/<UTC timestamp>[-k]/`; `mkdir` without exist_ok makes concurrent runs distinct."
    base = Path(root) / name
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {base}: {e.strerror}; pass --out DIR somewhere writable") from None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    for k in range(1000):
        d = base / (stamp if k == 0 else f"{stamp}-{k}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"cannot create run folder {d}: {e.strerror}; pass --out DIR somewhere writable") from None
    raise UserError(f"too many runs of {name} in the same second under {base}")


class HistoryCSV(FitOnlyCallback):
    "history.csv, one row per epoch as it finishes: losses, metrics (train and valid), seconds."
    order = 60  # after Recorder (50) has logged the epoch

    def __init__(self, fname, start_epoch: int = 0):
        self.fname, self.start_epoch = Path(fname), start_epoch  # start_epoch > 0: resuming, keep earlier rows

    def before_fit(self):
        names = [n for n in self.recorder.metric_names if n != "time"]
        self.cols = names
        header = ",".join(names + ["train_seconds", "epoch_seconds"]) + "\n"
        kept = self.fname.read_text().splitlines(keepends=True)[1:self.start_epoch + 1] if self.start_epoch else []
        self.fname.write_text(header + "".join(kept))
        self.t0 = time.perf_counter()

    def after_epoch(self):
        if self.epoch < self.start_epoch: return  # an epoch fastai's SkipToEpoch skipped on resume
        vals = dict(zip(self.recorder.metric_names, self.recorder.log))
        tp = getattr(self.learn, "train_throughput", None)
        train_s = tp.epoch_times[-1] if tp and tp.epoch_times else float("nan")
        now = time.perf_counter()
        row = [vals.get(c, "") for c in self.cols] + [f"{train_s:.3f}", f"{now - self.t0:.3f}"]
        self.t0 = now
        with self.fname.open("a") as f: f.write(",".join(str(v) for v in row) + "\n")


def _versions() -> dict:
    import fastai
    import sklearn
    import timm
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "fastai": fastai.__version__, "timm": timm.__version__, "scikit-learn": sklearn.__version__,
            "covid_fastai": __version__}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_json(path, obj):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)  # never leave a half-written file behind


def _plain(o):
    "Numpy scalars/arrays and fastai `L`s -> Python numbers/lists/tensors: loadable with `weights_only=True`."
    from fastcore.foundation import L
    if isinstance(o, torch.Tensor): return o.detach().cpu().as_subclass(torch.Tensor)  # no fastai subclasses
    if isinstance(o, dict): return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, L)): return [_plain(v) for v in o]
    if isinstance(o, np.ndarray): return torch.from_numpy(o.copy())
    if isinstance(o, np.generic): return o.item()
    return o


def _rng_state(learn) -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
            # fastai's DataLoader shuffles with its own random.Random, reseeded from itself every epoch
            "dl_train": learn.dls.train.rng.getstate(), "dl_valid": learn.dls.valid.rng.getstate()}


def _set_rng_state(learn, st: dict):
    random.setstate(_tuples(st["python"]))
    torch.set_rng_state(st["torch"])
    if st["cuda"] and torch.cuda.is_available(): torch.cuda.set_rng_state_all(st["cuda"])
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    learn.dls.train.rng.setstate(_tuples(st["dl_train"]))
    learn.dls.valid.rng.setstate(_tuples(st["dl_valid"]))


def _tuples(o):
    "random.setstate wants the nested tuples getstate gave (a saved state may come back with lists)."
    return tuple(_tuples(v) for v in o) if isinstance(o, (list, tuple)) else o


def _data_digest(learn) -> str:
    from .features import _files_digest
    items = [i for i in list(learn.dls.train.items) + list(learn.dls.valid.items) if isinstance(i, (str, Path))]
    return _files_digest(items)


def _targets_digest(learn) -> str:
    from .features import targets_digest
    return targets_digest(learn.dls)


class EpochCheckpoint(FitOnlyCallback):
    """After every finished epoch, write `fname` atomically: what `resume` needs to continue exactly.

    Also restores such a state at the start of epoch `start_epoch` (`state`: a loaded checkpoint), so the
    resumed epochs draw the same shuffles, augmentations and dropout masks as an uninterrupted run.
    """
    order = 90  # after Recorder (50) and HistoryCSV (60) have recorded the epoch

    def __init__(self, fname, data_digest: str, state: dict | None = None, targets_digest: str | None = None):
        self.fname, self.digest, self.targets, self.state = Path(fname), data_digest, targets_digest, state
        self.start_epoch = state["epoch"] + 1 if state else 0

    def before_epoch(self):
        if self.state is not None and self.epoch == self.start_epoch: self._restore()

    def after_fit(self):
        # interrupted after the last epoch's checkpoint (during evaluation): no epoch runs on resume, so restore
        # here, before the TTA and plots that follow the fit
        if self.state is not None and self.start_epoch >= self.n_epoch: self._restore()

    def _restore(self):
        _set_rng_state(self.learn, self.state["rng"])
        sl = self.recorder.smooth_loss  # fastai's train_loss is smoothed across epochs
        sl.count, sl.val = self.state["smooth_loss"]["count"], self.state["smooth_loss"]["val"]
        tp = getattr(self.learn, "train_throughput", None)
        if tp is not None:
            tp.epoch_times, tp.epoch_images = list(self.state["throughput"][0]), list(self.state["throughput"][1])

    def after_epoch(self):
        if self.epoch < self.start_epoch: return  # skipped by fastai's SkipToEpoch on resume
        tp = getattr(self.learn, "train_throughput", None)
        sl = self.recorder.smooth_loss
        ckpt = {"epoch": self.epoch, "n_epoch": self.n_epoch, "data_digest": self.digest,
                "targets_digest": self.targets,
                "model": self.learn.model.state_dict(), "opt": self.learn.opt.state_dict(),
                "rng": _rng_state(self.learn), "smooth_loss": {"count": sl.count, "val": sl.val},
                "throughput": [list(tp.epoch_times), list(tp.epoch_images)] if tp else [[], []]}
        tmp = self.fname.with_suffix(".tmp")
        torch.save(_plain(ckpt), tmp)
        tmp.replace(self.fname)  # a kill mid-write leaves the previous epoch's checkpoint intact


def folders_learner(recipe: Recipe, folders, pretrained=None, get_y=None, vocab=None, num_workers=None, cbs=None,
                    path=None):
    """The recipe's Learner over `folders`: DataLoaders, speed callbacks (channels-last, bf16 where supported) and
    model; no plan applied. `pretrained=None` follows the recipe (evaluation passes False and loads its own weights)."""
    dls = xray_dls(folders, make_aug(recipe.aug, recipe.size, recipe.resize), bs=recipe.bs, seed=recipe.seed,
                   valid_pct=recipe.valid_pct, num_workers=recipe.workers if num_workers is None else num_workers,
                   get_y=get_y, vocab=vocab)
    use_bf16 = recipe.bf16 and bf16_supported("cuda" if torch.cuda.is_available() else "cpu")
    speed = ([ChannelsLast()] if recipe.channels_last else []) + ([BF16Autocast()] if use_bf16 else [])
    learn = xray_learner(dls, recipe.arch, pretrained=recipe.pretrained if pretrained is None else pretrained,
                         weights=recipe.weights, head=recipe.head, hidden=recipe.hidden, dropout=recipe.dropout,
                         opt=recipe.opt, mom=0.9 if recipe.mom is None else recipe.mom, wd=recipe.wd, train_bn=recipe.train_bn, lr=recipe.lr,
                         label_smoothing=recipe.label_smoothing, bn_freeze=recipe.bn_freeze,
                         cbs=speed + list(cbs or []), path=path)
    learn.bf16_used = use_bf16
    return learn


def recipe_learner(recipe: Recipe, path=None, cbs=None):
    "(Learner with the recipe's plan applied, XrayFolders) — for REPL use; `run` adds the run folder."
    folders = find_xray_folders(resolve_data(recipe.data))
    set_seed(recipe.seed)
    # Three-class mode: classes from labels.csv's fine_label (covid / pneumonia / normal) instead of folders.
    get_y, vocab = (fine_label_getter(folders.root, [f for s in folders.splits for f in folders.files(s)])
                    if recipe.labels == "fine_label" else (None, None))
    learn = folders_learner(recipe, folders, get_y=get_y, vocab=vocab, cbs=cbs, path=path)
    learn.trainable = apply_plan(learn, recipe.plan)
    return learn, folders


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


def _fit(learn, recipe: Recipe, lr: float | None = None, start_epoch: int = 0):
    "Fit for the recipe's epochs; from `start_epoch` on resume (fastai skips the earlier ones, schedule intact)."
    lr = recipe.lr if lr is None else lr
    lr = slice(lr / recipe.lr_mult, lr) if recipe.lr_mult > 1 else lr
    if recipe.schedule == "one_cycle":
        # fit_one_cycle schedules the momentum too, over-writing the optimiser's: an explicit `mom` is held constant
        moms = None if recipe.mom is None else (recipe.mom,) * 3
        learn.fit_one_cycle(recipe.epochs, lr, moms=moms, start_epoch=start_epoch)
    else: learn.fit(recipe.epochs, lr, start_epoch=start_epoch)  # 'constant', the seed: no schedule


def _plain_epoch_log(learn, start_epoch: int = 0):
    "One plain line per epoch (for logs and pipes, where fastprogress's redrawn bars are noise)."
    def log(vals):
        if vals and isinstance(vals[0], int) and vals[0] < start_epoch: return  # skipped on resume
        pairs = zip(learn.recorder.metric_names, vals)
        print("  ".join(f"{n} {v:.4f}" if isinstance(v, float) else f"{n} {v}" for n, v in pairs), flush=True)
    return log


def _trainer(learn, recipe: Recipe, cbs):
    "The Learner that fits: a head-only Learner on cached body features when the body is frozen, else `learn`."
    use, why = use_feature_cache(learn, cache_mode(recipe.cache_features), recipe.aug)
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
def _deterministic(on: bool):
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


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    "One process at a time per run folder (a resume while the run still goes); released when the process dies."
    import fcntl
    with open(run_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"{run_dir} is in use by another process (a run or resume still going): wait for it "
                            f"or stop it first") from None
        yield


def _disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _how_to_continue(run_dir: Path, recipe: Recipe) -> str:
    if (run_dir / CHECKPOINT).exists(): return f"continue it with `python -m covid_fastai resume {run_dir}`"
    return f"no epoch had finished, so start it again (`python -m covid_fastai recipe {recipe.name}`)"


def _one_line(e: BaseException, limit: int = 500) -> str:
    "An exception as one line (fastai wraps callback errors in a multi-line message)."
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:limit] if msg else type(e).__name__


def _mark(run_dir: Path, config: dict, **fields):
    "Record the run's fate in config.json; best effort (a full disk may refuse even this)."
    config.update(**fields, stopped=datetime.now(timezone.utc).isoformat())
    try: _write_json(run_dir / "config.json", config)
    except OSError: pass


def run(recipe: Recipe, out=None, resume=None, export: bool = False, cbs=None, started=None) -> Path:
    """Train and evaluate `recipe`; returns the run folder.

    resume: a run folder of this recipe with a `checkpoint.pt`: continue it from the next epoch (see `resume`).
    export: also write fastai's pickled `export.pkl` (`learn.export`); load it only with `load_export(trust=True)`.
    cbs: extra fastai callbacks for the fitting Learner (tests use one to interrupt a run).
    started: called with the run folder as soon as it exists (a sweep records it, to resume the run later).
    """
    out = Path(out) if out is not None else OUTPUTS
    t_start = time.perf_counter()
    learn, folders = recipe_learner(recipe)
    read_labels(folders.root)  # a bad labels.csv (used after training, for the breakdowns) fails now, not then
    state = None
    if resume is not None:
        run_dir = Path(resume)
        try:
            state = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True)
        except Exception as e:  # torn by a crash mid-write before atomic saves, or not ours
            raise UserError(f"{run_dir / CHECKPOINT} cannot be read ({_one_line(e, 200)}): this run cannot be "
                            f"resumed; start it again with `python -m covid_fastai recipe {recipe.name}`") from None
        if state["data_digest"] != _data_digest(learn):
            raise UserError(f"the images under {folders.root} changed since {run_dir} started (files added, removed "
                            f"or modified): resuming would not continue the same run; start a new one instead")
        saved = state.get("targets_digest")  # None in checkpoints from before labels were checked
        if saved is not None and saved != _targets_digest(learn):
            raise UserError(f"the labels of the images under {folders.root} changed since {run_dir} started "
                            f"(labels.csv or the class folders): resuming would not continue the same run; start a "
                            f"new one instead")
    else:
        run_dir = new_run_dir(out, recipe.name)
    if started is not None: started(run_dir)
    with _run_lock(run_dir), _deterministic(recipe.reproducible):
        return _run_in(run_dir, recipe, learn, folders, state, export, list(cbs or []), t_start)


def _prepare(run_dir, recipe, learn, state, tp, extra_cbs, start_epoch):
    "The Learner that fits, with the run's callbacks, and the checkpoint's state loaded when resuming."
    ckpt = EpochCheckpoint(run_dir / CHECKPOINT, _data_digest(learn), state, _targets_digest(learn))
    trainer = _trainer(learn, recipe, [tp, HistoryCSV(run_dir / "history.csv", start_epoch), ckpt] + extra_cbs)
    trainer.train_throughput = tp
    trainer.recorder.train_metrics = True
    if not sys.stdout.isatty():
        for lrn in {id(learn): learn, id(trainer): trainer}.values(): lrn.remove_cb(ProgressCallback)
        trainer.logger = _plain_epoch_log(trainer, start_epoch)
    if state is not None:
        trainer.model.load_state_dict(state["model"])
        if trainer.opt is None: trainer.create_opt()
        from fastcore.foundation import L
        device = getattr(trainer.dls, "device", default_device())  # where TrainEvalCallback puts the model
        opt_state = state["opt"]["state"] if device is None else to_device(state["opt"]["state"], device)
        trainer.opt.load_state_dict({"state": opt_state, "hypers": L(state["opt"]["hypers"])})
    return trainer


def _run_facts(recipe, learn, folders, trainer) -> dict:
    "What config.json records about the data, weights, trainable parameters, speed settings and machine."
    n_train = sum(p.numel() for p in learn.model.parameters() if p.requires_grad)
    cached = trainer is not learn
    return {
        "data": {"path": str(folders.root), "synthetic": folders.synthetic, "classes": list(learn.dls.vocab),
                 "labels": recipe.labels,
                 "resize": make_aug(recipe.aug, recipe.size, recipe.resize).resize_to,  # short side before crops
                 "counts": folders.counts(),
                 "valid": (f"folder {folders.valid_name}/" if folders.valid_name
                           else f"random {recipe.valid_pct:.0%} of train"
                           + (" patients (labels.csv patient_id)" if patients_of(folders) else "")
                           + f" (seed {recipe.seed})"),
                 "test": "folder test/" if folders.has_test else None,
                 "skipped": folders.skipped_report()},
        "weights": learn.weights_provenance,
        "layer_groups": learn.group_names,
        "momentum": momentum_used(recipe.schedule, recipe.mom),
        "trainable": {"parameters": n_train, "tensors": len(learn.trainable), "names": learn.trainable},
        "speed": {"bf16_autocast": learn.bf16_used, "channels_last": recipe.channels_last,
                  "torch_threads": torch.get_num_threads(), "loader_workers": learn.dls.train.fake_l.num_workers,
                  "cached_features": ({"views": trainer.feature_views, "from_disk": trainer.features_from_disk,
                                       "seconds": round(trainer.feature_seconds, 3)} if cached else None),
                  "feature_cache_decision": learn.feature_cache_decision},
        "versions": _versions(), "git_commit": _git_commit(), "command": sys.argv,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
    }


def _own_cbs(trainer, extra_cbs) -> list:
    "The callbacks a run adds for its fit (loggers, checkpoints, warnings, the caller's): out of lr_find and evaluation."
    return [*extra_cbs, *trainer.cbs.filter(lambda c: isinstance(c, (TrainThroughput, HistoryCSV, EpochCheckpoint,
                                                                      OneClassWarning)))]


def _run_in(run_dir, recipe, learn, folders, state, export, extra_cbs, t_start) -> Path:
    learn.path = run_dir
    start_epoch = state["epoch"] + 1 if state else 0
    old = json.loads((run_dir / "config.json").read_text()) if state is not None else {}
    config = {
        "recipe": {**dataclasses.asdict(recipe), "plan": {**dataclasses.asdict(recipe.plan),
                                                          "description": recipe.plan.describe()}},
        "status": "running", "run_dir": str(run_dir),
        "created": old.get("created", datetime.now(timezone.utc).isoformat()),
        "resumed": old.get("resumed", []) + ([{"at": datetime.now(timezone.utc).isoformat(),
                                               "from_epoch": start_epoch}] if state is not None else []),
    }
    config = {**{k: v for k, v in old.items() if k not in ("error", "resume", "stopped")}, **config}
    tp = TrainThroughput()

    def warn(msg):  # kept in config.json (and so in the report), and said at once beside the epoch lines
        config.setdefault("warnings", []).append(msg)
        _write_json(run_dir / "config.json", config)
        print(f"warning: {msg}", flush=True)

    try:
        _write_json(run_dir / "config.json", config)  # from here on the folder says what it is
        trainer = _prepare(run_dir, recipe, learn, state, tp, [OneClassWarning(learn.dls.vocab, warn), *extra_cbs],
                           start_epoch)
        config.update(_run_facts(recipe, learn, folders, trainer))
        _write_json(run_dir / "config.json", config)
        if recipe.lr_find and "lr_find" not in config:  # a resumed run keeps the rate it started with
            config["lr_find"] = find_lr(trainer, recipe, run_dir, quiet=_own_cbs(trainer, extra_cbs))
            _write_json(run_dir / "config.json", config)
        _fit(trainer, recipe, config["lr_find"]["lr"] if recipe.lr_find else recipe.lr, start_epoch)
        # fastai's tta fires before_fit/after_fit: the run's callbacks leave before evaluation
        trainer.remove_cbs(_own_cbs(trainer, extra_cbs))
        _finish(run_dir, recipe, learn, folders, trainer, tp, config, export, t_start)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI turns it into KeyboardInterrupt)
        how = _how_to_continue(run_dir, recipe)
        _mark(run_dir, config, status="interrupted", **({"resume": how} if "resume" in how else {}))
        done = len(tp.epoch_times) if getattr(tp, "epoch_times", None) else 0
        print(f"interrupted: {run_dir} is marked incomplete" + (f" after {done} finished epoch(s)" if done else "")
              + f"; {how}", file=sys.stderr, flush=True)
        raise
    except OSError as e:
        if not _disk_full(e):
            _mark(run_dir, config, status="failed", error=_one_line(e))
            raise
        msg = (f"disk full while writing {e.filename or run_dir}: free some space (or pass --out DIR on another "
               f"disk), then {_how_to_continue(run_dir, recipe)}")
        _mark(run_dir, config, status="failed", error=msg)
        raise UserError(msg) from None
    except BaseException as e:
        _mark(run_dir, config, status="failed", error=_one_line(e))
        raise
    return run_dir


def _finish(run_dir, recipe, learn, folders, trainer, tp, config, export, t_start):
    "After the fit: weights, evaluation, plots, metrics, report (and export.pkl on request)."
    # Training time includes making (or loading) the feature cache, so cached and uncached runs compare fairly.
    train_s = tp.seconds + trainer.feature_seconds
    save_file({k: v.detach().contiguous() for k, v in learn.model.state_dict().items()}, run_dir / "model.safetensors")
    if export: _export(learn, run_dir)

    # Evaluate on test when there is one, else on valid (and say so); the decision threshold is chosen on valid.
    split = "test" if folders.has_test else "valid"
    dl = learn.dls.test_dl(folders.files("test"), with_labels=True) if folders.has_test else learn.dls.valid
    ev = Evaluation.of(learn, dl, split, tta=recipe.tta)
    valid_ev = ev if split == "valid" else Evaluation.of(learn, learn.dls.valid, "valid", tta=recipe.tta)
    _, pv, yv = valid_ev.positive()
    threshold = choose_threshold(yv, pv, recipe.threshold)
    threshold["chosen_on"] = "recipe" if threshold["note"] == "fixed" else "valid"  # a fixed number saw no data
    note = f" {SYNTHETIC_BANNER}" if folders.synthetic else ""
    m, files = write_evaluation(run_dir, ev, threshold, f"{recipe.name}: {split} split", note, learn=learn,
                                labels=read_labels(folders.root), root=folders.root)
    metrics = {**m, "valid": {t: binary_metrics(yv, pv, v) for t, v in (("at_0.5", 0.5),
                                                                      ("at_threshold", threshold["value"]))},
               "train_seconds": train_s, "train_images_per_s": sum(tp.epoch_images) / max(train_s, 1e-9),
               "wall_seconds": None}
    history = pd.read_csv(run_dir / "history.csv")
    files = {"curves": plot_curves(history, run_dir / "curves.png", f"{recipe.name}{note}"), **files}
    metrics["wall_seconds"] = time.perf_counter() - t_start
    _write_json(run_dir / "metrics.json", metrics)
    config.update(status="complete", finished=datetime.now(timezone.utc).isoformat(), threshold=threshold)
    write_report(run_dir, config, metrics, history, files)
    write_html(run_dir / "report.md")
    _write_json(run_dir / "config.json", config)  # 'complete' only once everything is written
    (run_dir / CHECKPOINT).unlink(missing_ok=True)  # nothing left to resume; model.safetensors has the weights


def _export(learn, run_dir: Path):
    "fastai's `export.pkl` (a pickle: whoever loads it runs code it names); the run's callbacks left after the fit."
    logger, learn.logger = learn.logger, print
    try:
        learn.export(run_dir / "export.pkl")
    finally:
        learn.logger = logger


def load_export(path, trust: bool = False):
    """Load a fastai `export.pkl` as a Learner. It is a pickle, which can run any code when loaded: `trust=True`
    is required, and a warning is given even then. For weights alone use `model.safetensors` (safe)."""
    if not trust:
        raise UserError(f"{path} is a pickle (fastai export.pkl): loading it can run arbitrary code. Load only files "
                        f"you made or trust, with trust=True (--trust_pickle true); model.safetensors holds the "
                        f"weights without that risk")
    warnings.warn(f"loading pickled Learner {path}: only do this with files you trust", UserWarning, stacklevel=2)
    from fastai.learner import load_learner
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastai's own pickle warning repeats ours
        return load_learner(path, cpu=True)


def recipe_from_config(config: dict) -> Recipe:
    "The exact `Recipe` a run used, from its config.json (its data path as recorded, absolute)."
    r = dict(config["recipe"])
    p = r.pop("plan")
    plan = Plan(p["kind"], tuple(p.get("patterns") or ()), p.get("n"))
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"plan"}
    r = {k: v for k, v in r.items() if k in fields}
    r["data"] = config["data"]["path"]
    if r.get("resize") is None:  # the short side the run used; runs before it was recorded all used size*256/224
        r["resize"] = config["data"].get("resize") or round(r.get("size", 224) * SEED_RESIZE_RATIO)
    r["mom"] = mom_trained_with(config)
    return Recipe(plan=plan, **r)


def run_summary(run_dir: Path) -> str:
    "One line for a finished run: its split accuracy, F1 per class and training time."
    m = json.loads((run_dir / "metrics.json").read_text())
    f1 = ", ".join(f"F1 {c} {v['f1']:.3f}" for c, v in m["per_class"].items())
    return (f"{run_dir}: {m['split']} accuracy {m['accuracy']:.4f}, {f1}; "
            f"trained {m['train_seconds']:.0f} s at {m['train_images_per_s']:.1f} images/s")


def resume(run_dir, export: bool = False, cbs=None) -> Path:
    "Continue an interrupted or failed run in its own folder from its last finished epoch (see module docstring)."
    run_dir = Path(run_dir).expanduser()
    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.json): pass a folder a run created, "
                        f"e.g. outputs/<recipe>/<timestamp>")
    config = json.loads(cfg_file.read_text())
    if config.get("status") == "complete":
        raise UserError(f"{run_dir} finished already (status complete): nothing to resume; start a new run with "
                        f"`python -m covid_fastai recipe {config['recipe']['name']}`")
    if not (run_dir / CHECKPOINT).is_file():
        raise UserError(f"{run_dir} has no {CHECKPOINT}: it stopped before its first epoch finished; start it "
                        f"again with `python -m covid_fastai recipe {config['recipe']['name']}`")
    return run(recipe_from_config(config), resume=run_dir, export=export, cbs=cbs)


def run_recipe(name_or_recipe, out=None, export: bool = False, cbs=None, **overrides) -> Path:
    "Run a recipe by name, path or value, with command-line style overrides (`epochs=2`, `data='DIR'`)."
    rec = name_or_recipe if isinstance(name_or_recipe, Recipe) else load_recipe(name_or_recipe)
    return run(with_overrides(rec, **overrides), out=out, export=export, cbs=cbs)
