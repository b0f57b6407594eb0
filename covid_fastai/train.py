"""Running a recipe: data -> Learner -> plan -> fit -> evaluation -> run folder.

Each run writes `outputs/<recipe>/<run-id>/`: config.json, history.csv, curves.png, confusion matrices, ROC/PR
and calibration plots, best/worst grids per class with Grad-CAM, metrics.json, report.md, report.html and
model.safetensors. A new run never overwrites an
earlier one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from fastai.vision.all import ProgressCallback, set_seed
from safetensors.torch import save_file

from . import __version__
from .callbacks import BF16Autocast, ChannelsLast, FitOnlyCallback, TrainThroughput, bf16_supported
from .data import find_xray_folders, make_aug, xray_dls
from .demo import demo_data
from .errors import UserError
from .features import body_is_frozen, head_learner
from .interpret import Evaluation, plot_curves, write_evaluation
from .labels import fine_label_getter, read_labels
from .metrics import binary_metrics, choose_threshold
from .models import xray_learner
from .plans import apply_plan
from .recipes import Recipe, load_recipe, with_overrides
from .report import SYNTHETIC_BANNER, write_html, write_report

__all__ = ["run", "run_recipe", "recipe_learner", "new_run_dir", "resolve_data", "HistoryCSV", "OUTPUTS"]

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

    def __init__(self, fname): self.fname = Path(fname)

    def before_fit(self):
        names = [n for n in self.recorder.metric_names if n != "time"]
        self.cols = names
        self.fname.write_text(",".join(names + ["train_seconds", "epoch_seconds"]) + "\n")
        self.t0 = time.perf_counter()

    def after_epoch(self):
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


def recipe_learner(recipe: Recipe, path=None, cbs=None):
    "(Learner with the recipe's plan applied, XrayFolders) — for REPL use; `run` adds the run folder."
    folders = find_xray_folders(resolve_data(recipe.data))
    set_seed(recipe.seed)
    # Three-class mode: classes from labels.csv's fine_label (covid / pneumonia / normal) instead of folders.
    get_y, vocab = (fine_label_getter(folders.root, [f for s in folders.splits for f in folders.files(s)])
                    if recipe.labels == "fine_label" else (None, None))
    dls = xray_dls(folders, make_aug(recipe.aug, recipe.size, recipe.resize), bs=recipe.bs, seed=recipe.seed,
                   valid_pct=recipe.valid_pct, num_workers=recipe.workers, get_y=get_y, vocab=vocab)
    use_bf16 = recipe.bf16 and bf16_supported("cuda" if torch.cuda.is_available() else "cpu")
    speed = ([ChannelsLast()] if recipe.channels_last else []) + ([BF16Autocast()] if use_bf16 else [])
    learn = xray_learner(dls, recipe.arch, pretrained=recipe.pretrained, weights=recipe.weights, head=recipe.head,
                         hidden=recipe.hidden, dropout=recipe.dropout, opt=recipe.opt, mom=recipe.mom, wd=recipe.wd,
                         train_bn=recipe.train_bn, lr=recipe.lr, cbs=speed + list(cbs or []), path=path)
    learn.bf16_used = use_bf16
    learn.trainable = apply_plan(learn, recipe.plan)
    return learn, folders


def _fit(learn, recipe: Recipe):
    lr = slice(recipe.lr / recipe.lr_mult, recipe.lr) if recipe.lr_mult > 1 else recipe.lr
    if recipe.schedule == "one_cycle": learn.fit_one_cycle(recipe.epochs, lr)
    else: learn.fit(recipe.epochs, lr)  # 'constant', the seed: no schedule


def _plain_epoch_log(learn):
    "One plain line per epoch (for logs and pipes, where fastprogress's redrawn bars are noise)."
    def log(vals):
        pairs = zip(learn.recorder.metric_names, vals)
        print("  ".join(f"{n} {v:.4f}" if isinstance(v, float) else f"{n} {v}" for n, v in pairs), flush=True)
    return log


def _trainer(learn, recipe: Recipe, cbs):
    "The Learner that fits: a head-only Learner on cached body features when the body is frozen, else `learn`."
    if recipe.cache_features and body_is_frozen(learn):
        t0 = time.perf_counter()
        hl = head_learner(learn, recipe, views=recipe.cache_views, bf16=learn.bf16_used, cbs=cbs)
        hl.feature_seconds = time.perf_counter() - t0
        return hl
    learn.add_cbs(cbs)
    learn.feature_seconds = 0.0
    return learn


def run(recipe: Recipe, out=None) -> Path:
    "Train and evaluate `recipe`; returns the new run folder."
    out = Path(out) if out is not None else OUTPUTS
    t_start = time.perf_counter()
    learn, folders = recipe_learner(recipe)
    run_dir = new_run_dir(out, recipe.name)
    learn.path = run_dir
    tp = TrainThroughput()
    fit_cbs = [tp, HistoryCSV(run_dir / "history.csv")]
    trainer = _trainer(learn, recipe, fit_cbs)
    trainer.train_throughput = tp
    trainer.recorder.train_metrics = True
    if not sys.stdout.isatty():
        for lrn in {id(learn): learn, id(trainer): trainer}.values(): lrn.remove_cb(ProgressCallback)
        trainer.logger = _plain_epoch_log(trainer)
    n_train = sum(p.numel() for p in learn.model.parameters() if p.requires_grad)
    cached = trainer is not learn
    config = {
        "recipe": {**dataclasses.asdict(recipe), "plan": {**dataclasses.asdict(recipe.plan),
                                                          "description": recipe.plan.describe()}},
        "status": "running", "run_dir": str(run_dir), "created": datetime.now(timezone.utc).isoformat(),
        "data": {"path": str(folders.root), "synthetic": folders.synthetic, "classes": list(learn.dls.vocab),
                 "labels": recipe.labels,
                 "counts": folders.counts(),
                 "valid": (f"folder {folders.valid_name}/" if folders.valid_name
                           else f"random {recipe.valid_pct:.0%} of train (seed {recipe.seed})"),
                 "test": "folder test/" if folders.has_test else None},
        "weights": learn.weights_provenance,
        "layer_groups": learn.group_names,
        "trainable": {"parameters": n_train, "tensors": len(learn.trainable), "names": learn.trainable},
        "speed": {"bf16_autocast": learn.bf16_used, "channels_last": recipe.channels_last,
                  "torch_threads": torch.get_num_threads(), "loader_workers": learn.dls.train.fake_l.num_workers,
                  "cached_features": ({"views": trainer.feature_views, "from_disk": trainer.features_from_disk,
                                       "seconds": round(trainer.feature_seconds, 3)} if cached else None)},
        "versions": _versions(), "git_commit": _git_commit(), "command": sys.argv,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
    }
    _write_json(run_dir / "config.json", config)
    _fit(trainer, recipe)
    trainer.remove_cbs(fit_cbs)  # fastai's tta fires before_fit/after_fit: keep the training log and timings intact
    # Training time includes making (or loading) the feature cache, so cached and uncached runs compare fairly.
    train_s = tp.seconds + trainer.feature_seconds
    save_file({k: v.detach().contiguous() for k, v in learn.model.state_dict().items()}, run_dir / "model.safetensors")

    # Evaluate on test when there is one, else on valid (and say so); the decision threshold is chosen on valid.
    split = "test" if folders.has_test else "valid"
    dl = learn.dls.test_dl(folders.files("test"), with_labels=True) if folders.has_test else learn.dls.valid
    ev = Evaluation.of(learn, dl, split, tta=recipe.tta)
    valid_ev = ev if split == "valid" else Evaluation.of(learn, learn.dls.valid, "valid", tta=recipe.tta)
    _, pv, yv = valid_ev.positive()
    threshold = {**choose_threshold(yv, pv, recipe.threshold), "chosen_on": "valid"}
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
    _write_json(run_dir / "config.json", config)
    write_report(run_dir, config, metrics, history, files)
    write_html(run_dir / "report.md")
    return run_dir


def run_recipe(name_or_recipe, out=None, **overrides) -> Path:
    "Run a recipe by name, path or value, with command-line style overrides (`epochs=2`, `data='DIR'`)."
    rec = name_or_recipe if isinstance(name_or_recipe, Recipe) else load_recipe(name_or_recipe)
    return run(with_overrides(rec, **overrides), out=out)
