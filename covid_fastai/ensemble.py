"""Ensembles: several finished runs as one classifier that averages their class probabilities; its threshold is
chosen on the averaged probabilities of the runs' shared validation split (`evaluate ensemble`, `predict ensemble`).

Each run is rebuilt as `covid_fastai.evaluate` rebuilds one (config.json + model.safetensors). Its validation split
is rebuilt as training split it (same data folder, seed and valid_pct), so the runs must have been trained on the
same data with the same split (e.g. seeds of a recipe on a data set with a valid/ folder) and the same classes.
Results go to a new `OUT/ensembles/<timestamp>/` (default OUT: ./outputs); nothing is overwritten.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data import XrayFolders, find_xray_folders
from .errors import DataError, RecipeError
from .evaluate import (_fixed_threshold, _image_files, eval_folders, given_threshold, load_run, predict_probs,
                       run_learner)
from .files import write_json
from .images import scan_images
from .interpret import CachedInterpretation, Evaluation, predictions_frame, write_evaluation
from .labels import fine_label_getter
from .learner import resolve_data, tta_aug
from .metrics import choose_threshold
from .rundir import OUTPUTS, new_run_dir

__all__ = ["load_runs", "average", "ensemble_threshold", "evaluate_ensemble", "predict_ensemble"]


def load_runs(run_dirs) -> list[tuple]:
    "[(run folder, config, Recipe)] of at least two finished runs with the same classes; a UserError otherwise."
    runs = [load_run(d) for d in run_dirs]
    if len(runs) < 2: raise RecipeError("an ensemble needs at least two run folders", "pass RUN RUN ...")
    classes = [tuple(c["data"]["classes"]) for _, c, _ in runs]
    for (d, _, _), cl in zip(runs, classes):
        if cl != classes[0]:
            raise RecipeError(f"{d} has classes {list(cl)}, {runs[0][0]} has {list(classes[0])}",
                              "ensemble runs trained on the same classes", path=d)
    return runs


def _getter(rec, folders, files):
    return fine_label_getter(folders, files)[0] if rec.labels == "fine_label" else None


def average(evs: list[Evaluation], split: str, learn=None, dl=None) -> Evaluation:
    """One Evaluation whose probabilities are the mean of `evs`' (the same images, matched by file); losses and
    argmax predictions recomputed from the mean. `learn`, `dl`: one run's, for fastai's interpretation object."""
    first = [str(f) for f in evs[0].items]
    probs = []
    for ev in evs:
        pos = {str(f): i for i, f in enumerate(ev.items)}
        if sorted(pos) != sorted(first):
            raise DataError(f"the runs predicted different images for the {split} split ({len(pos)} vs {len(first)})",
                            "ensemble runs trained on the same data with the same split (data folder, seed, "
                            "valid_pct)")
        probs.append(ev.probs[[pos[f] for f in first]])
    p = np.mean(probs, axis=0)
    targs = evs[0].targs
    losses = -np.log(np.clip(p[np.arange(len(targs)), targs], 1e-12, None))
    preds = p.argmax(1)
    interp = CachedInterpretation(learn, dl, torch.as_tensor(losses), preds, targs) if learn is not None else None
    return Evaluation(split, list(evs[0].items), evs[0].classes, p, targs, losses, preds, interp,
                      any(e.tta for e in evs), ", ".join(sorted({e.tta_aug for e in evs if e.tta_aug})))


def valid_learner(d, cfg, rec):
    "A run's Learner over its data, split as training split it (test/ never read): `learn.dls.valid` is its valid."
    folders = find_xray_folders(resolve_data(rec.data), test=False)
    return run_learner(d, cfg, rec, folders, _getter(rec, folders, folders.files("train") + folders.files("valid")))


def _valid_evaluation(d, cfg, rec, tta) -> Evaluation:
    "A run's predictions on its validation split, rebuilt as training split the data (test/ never read)."
    learn = valid_learner(d, cfg, rec)
    return Evaluation.of(learn, learn.dls.valid, "valid", tta=rec.tta if tta is None else tta, tta_aug=tta_aug(rec))


def ensemble_threshold(runs, tta: bool | None = None, rule: str | None = None) -> dict:
    """The threshold on the averaged valid p(positive), by `rule` (default: the runs' recipes' rule, which must
    agree), with the averaged valid Evaluation under 'evaluation' (dropped before it is written)."""
    rules = sorted({r.threshold for _, _, r in runs})
    if rule is None and len(rules) > 1:
        raise RecipeError(f"the runs choose their thresholds by different rules ({', '.join(rules)})",
                          "pass --threshold RULE (youden, sens:0.95 or a number)")
    rule = rule or rules[0]
    ev = average([_valid_evaluation(d, c, r, tta) for d, c, r in runs], "valid")
    _, p, y = ev.positive()
    thr = choose_threshold(y, p, rule)
    thr["chosen_on"] = "recipe" if thr["note"] == "fixed" else "averaged valid probabilities"
    return {**thr, "valid_n": int(len(y)), "evaluation": ev}


def _threshold(runs, tta, threshold) -> dict:
    "A number given on the command line as is; else the rule chosen on the averaged valid probabilities."
    if threshold is None: return ensemble_threshold(runs, tta)
    try: float(threshold)
    except (TypeError, ValueError): return ensemble_threshold(runs, tta, str(threshold))  # a rule: youden, sens:x
    return given_threshold(_fixed_threshold(threshold))


def evaluate_ensemble(run_dirs, data, tta: bool | None = None, threshold=None, out=None) -> Path:
    """Evaluate the runs' averaged probabilities on a labelled folder (as `evaluate` reads it); writes
    `OUT/ensembles/<timestamp>/` (metrics.json, predictions.csv, plots, report.md/html) and returns it.

    tta: test-time augmentation for every run (default: as each run); threshold: a number, or a rule (youden,
    sens:0.95) chosen on the averaged valid probabilities (default: the runs' rule).
    """
    from .report import SYNTHETIC_BANNER, write_evaluation_report
    runs = load_runs(run_dirs)
    folders, split_dir = eval_folders(data, runs[0][1])
    files = folders.files("train")
    thr = _threshold(runs, tta, threshold)
    thr.pop("evaluation", None)
    evs = []
    for d, cfg, rec in runs:
        learn = run_learner(d, cfg, rec, folders, _getter(rec, folders, files))
        dl = learn.dls.test_dl(files, with_labels=True)
        evs.append(Evaluation.of(learn, dl, split_dir.name, tta=rec.tta if tta is None else tta, tta_aug=tta_aug(rec)))
    ev = average(evs, split_dir.name, learn, dl)
    out_dir = new_run_dir(Path(out) if out else OUTPUTS, "ensembles")
    synthetic = folders.synthetic
    note = f" {SYNTHETIC_BANNER}" if synthetic else ""
    names = ", ".join(f"`{r.name}`" for _, _, r in runs)
    m, _ = write_evaluation(out_dir, ev, thr, f"ensemble of {len(runs)} runs on {split_dir}", note, learn=None,
                            labels=folders.labels, root=folders.root, gradcam=False)
    m.update(runs=[str(d) for d, _, _ in runs], data=str(split_dir), synthetic=synthetic, threshold=thr)
    write_json(out_dir / "metrics.json", m)
    before = [f"> **{SYNTHETIC_BANNER}** Evaluated on generated drawings, not X-rays.", ""] if synthetic else []
    before += [f"Ensemble of {len(runs)} runs (recipes {names}): their class probabilities averaged. Threshold "
               f"{thr['value']:.3f} ({thr['rule']}, chosen on {thr['chosen_on']}). Runs:", "",
               *[f"- `{d}`" for d, _, _ in runs], "",
               f"Evaluated on `{split_dir}`: {len(files)} images, counts {folders.counts()['train']}. Per-image "
               "predictions: predictions.csv. No Grad-CAM: an ensemble has no single network to explain.", ""]
    write_evaluation_report(out_dir, f"Ensemble evaluation on {split_dir.name}{note}", before, m, ev.classes)
    return out_dir


def split_runs(args) -> tuple[list, list]:
    """(run folders, the rest) of `predict ensemble RUN RUN ... IMAGES...`: the runs are the leading folders with a
    config.json."""
    args = [str(a) for a in args]
    k = next((i for i, a in enumerate(args) if not (Path(a).expanduser() / "config.json").is_file()), len(args))
    return args[:k], args[k:]


def predict_ensemble(run_dirs, paths, out=None, tta: bool | None = None, threshold=None) -> Path:
    """CSV of file, p_<class>, p_infected and the label at the ensemble's threshold for image files/folders
    (written to `out`, which must not exist, or to `outputs/ensembles/<timestamp>/predictions.csv` beside an
    ensemble.json of the runs and the threshold)."""
    if out is not None and Path(out).exists():
        raise RecipeError(f"{out} exists", "pass another --out (predictions never overwrite)", path=out)
    runs = load_runs(run_dirs)
    if not paths: raise RecipeError("predict ensemble needs image files or folders after the run folders")
    files, unreadable = scan_images(_image_files(paths))
    if not files:
        raise DataError(f"none of the {len(unreadable)} file(s) given is a readable image",
                        "pass image files or folders of images")
    thr = _threshold(runs, tta, threshold)
    probs = []
    for d, cfg, rec in runs:
        classes = cfg["data"]["classes"]
        folders = XrayFolders(files[0].parent, {"train": {classes[0]: files}}, classes=[classes[0]])
        learn = run_learner(d, cfg, rec, folders, get_y=lambda f: classes[0])
        dl = learn.dls.test_dl(files)
        probs.append(predict_probs(learn, dl, rec, tta))
    df = predictions_frame(files, runs[0][1]["data"]["classes"], np.mean(probs, axis=0), thr["value"])
    if unreadable:
        df["error"] = ""
        df = pd.concat([df, pd.DataFrame({"file": [str(f) for f, _ in unreadable],
                                          "error": [f"unreadable: {why}" for _, why in unreadable]})],
                       ignore_index=True)
    thr.pop("evaluation", None)
    if out is None:  # a fresh folder: the CSV, and what made it beside it
        pdir = new_run_dir(OUTPUTS, "ensembles")
        write_json(pdir / "ensemble.json", {"runs": [str(d) for d, _, _ in runs], "threshold": thr})
        csv = pdir / "predictions.csv"
    else:
        csv = Path(out)
        csv.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(csv, index=False)
    return csv
