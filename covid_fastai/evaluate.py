"""Finished runs on new images: `evaluate` (labelled folders -> metrics, plots, report) and `predict`
(any images -> CSV of p_infected and labels at the run's threshold, optional Grad-CAM overlays).

A run is rebuilt from its `config.json` recipe (random init, nothing downloaded) and its `model.safetensors`
(safetensors only: no pickle is ever loaded). Images are listed as training lists them
(`covid_fastai.images.get_xray_files`: DICOM files too).
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pandas as pd

from fastai.vision.all import ProgressCallback
from safetensors import SafetensorError
from safetensors.torch import load_file

from .data import SYNTHETIC_MARKER, XrayFolders
from .errors import DataError, ModelFileError, RecipeError, RunFolderError, first_line, recipe_command
from .files import write_json
from .images import get_xray_files, scan_images
from .interpret import Evaluation, cam_images, predictions_frame, write_evaluation
from .labels import fine_label_getter
from .recipes import Recipe
from .augment import tta_dl
from .learner import folders_learner, tta_aug
from .rundir import RunDir, new_run_dir

__all__ = ["load_run", "run_learner", "eval_folders", "evaluate_run", "predict_run"]


def load_run(run_dir) -> tuple[Path, dict, Recipe]:
    "(run folder, config, Recipe) of a finished run; `RunFolderError` when it is not one."
    d = Path(run_dir).expanduser()
    if not d.is_dir():
        raise RunFolderError(f"run folder {d} does not exist", "pass a folder made by `recipe` or `sweep`", path=d)
    if not (d / "config.json").is_file():
        raise RunFolderError(f"{d} has no config.json", "pass a run folder (outputs/<recipe>/<timestamp>/)", path=d)
    if not (d / "model.safetensors").is_file():
        raise RunFolderError(f"{d} has no model.safetensors (the run did not finish?)", "pass a finished run folder",
                             path=d)
    rd = RunDir.open(d)
    return d, rd.config, rd.recipe()


def run_learner(d: Path, cfg: dict, rec: Recipe, folders: XrayFolders, get_y=None):
    "The run's Learner (its classes and eval transform) over `folders`, with the saved weights loaded."
    rec = dataclasses.replace(rec, bf16=bool(cfg["speed"].get("bf16_autocast")))  # as the run computed
    learn = folders_learner(rec, folders, pretrained=False, get_y=get_y, vocab=cfg["data"]["classes"], num_workers=0,
                            path=d)
    f = d / "model.safetensors"
    again = recipe_command(rec.name)
    try:
        sd = load_file(f)
    except (SafetensorError, OSError) as e:  # truncated or overwritten: safetensors checks its header
        raise ModelFileError(f"{f} is damaged ({first_line(e)})", "restore it from a copy, or train the run again "
                             "with {command}", path=f, command=again) from None
    try:
        learn.model.load_state_dict(sd)
    except RuntimeError as e:
        raise ModelFileError(f"{f} does not fit the run's recipe ({first_line(e)})", path=f) from None
    learn.model.to(learn.dls.device).eval()
    learn.remove_cb(ProgressCallback)  # one summary line per command; no redrawn bars in logs
    return learn


def _class_dirs(d: Path) -> dict:
    "{class: image files} of `d`'s class folders, listed as training lists them (DICOM included)."
    return {c.name: get_xray_files(c) for c in sorted(d.iterdir()) if c.is_dir() and not c.name.startswith(".")}


def eval_folders(data, cfg: dict) -> tuple[XrayFolders, Path]:
    """(XrayFolders over the images to evaluate, the folder they came from): `DIR/test/<class>/` when DIR has a
    test/ folder, else `DIR/<class>/`. Class folders must be among the run's classes (or, in the three-class
    mode, the folder classes it was trained from)."""
    root = Path(data).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist", "pass --data DIR with class folders", path=root)
    split_dir = root / "test" if (root / "test").is_dir() else root
    if split_dir == root and (root / "train").is_dir():
        raise DataError(f"{root} has train/ but no test/ folder",
                        f"pass {root}/<split> (e.g. valid) to evaluate a split", path=root)
    by_class = {c: fs for c, fs in _class_dirs(split_dir).items() if fs}
    if not by_class:
        raise DataError(f"{split_dir} has no class folders with images", "use DIR/<class>/ or DIR/test/<class>/",
                        path=split_dir)
    allowed = cfg["data"]["classes"] if cfg["data"].get("labels", "folders") == "folders" else \
        list(cfg["data"]["counts"]["train"])
    extra = sorted(set(by_class) - set(allowed))
    if extra:
        raise DataError(f"{split_dir} has class folders {extra} that the run does not know (its classes: {allowed})",
                        "evaluate on folders named after the run's classes", path=split_dir)
    return XrayFolders(root, {"train": by_class}, synthetic=(root / SYNTHETIC_MARKER).exists(),
                       classes=list(by_class)), split_dir


def _fixed_threshold(threshold) -> float | None:
    "A threshold given on the command line: a number in (0, 1), or None for the run's own."
    if threshold is None: return None
    try: t = float(threshold)
    except (TypeError, ValueError): t = None
    if t is None or not 0 < t < 1:  # rules like youden need the valid split: the run already applied its own
        raise RecipeError(f"--threshold must be a number between 0 and 1, got {threshold!r} (the run's own "
                          f"threshold, chosen on its validation split, is the default)")
    return t


def given_threshold(t: float) -> dict:
    "The threshold record of a number given on the command line (`_fixed_threshold`'s)."
    return {"rule": str(t), "value": t, "note": "given on the command line", "chosen_on": "command line"}


def evaluate_run(run_dir, data, tta: bool | None = None, threshold: float | None = None, out=None) -> Path:
    """Evaluate a finished run on a labelled folder; writes `RUN_DIR/evaluations/<timestamp>/` (metrics.json,
    predictions.csv, plots, report.md, report.html) and returns it.

    tta: fastai test-time augmentation (default: as the run); threshold: a number to use instead of the
    threshold the run chose on its validation split.
    """
    from .report import SYNTHETIC_BANNER, write_evaluation_report
    t = _fixed_threshold(threshold)  # checked before any loading
    d, cfg, rec = load_run(run_dir)
    folders, split_dir = eval_folders(data, cfg)
    files = folders.files("train")
    get_y = fine_label_getter(folders, files)[0] if rec.labels == "fine_label" else None
    learn = run_learner(d, cfg, rec, folders, get_y)
    thr = dict(cfg.get("threshold") or {"rule": "0.5", "value": 0.5, "note": "the run recorded no threshold"})
    if threshold is not None:
        thr = given_threshold(t)
    tta = rec.tta if tta is None else bool(tta)
    if tta != rec.tta and threshold is None:  # TTA shifts probabilities: the run's threshold may not transfer
        thr["note"] += f"; chosen with TTA {'on' if rec.tta else 'off'}, applied here with TTA {'on' if tta else 'off'}"
    ev = Evaluation.of(learn, learn.dls.test_dl(files, with_labels=True), split_dir.name, tta=tta, tta_aug=tta_aug(rec))
    out_dir = new_run_dir(Path(out) if out else d, "evaluations")
    synthetic = folders.synthetic
    note = f" {SYNTHETIC_BANNER}" if synthetic else ""
    m, _ = write_evaluation(out_dir, ev, thr, f"{rec.name} on {split_dir}", note, learn=learn,
                            labels=folders.labels, root=folders.root)
    m.update(run_dir=str(d), data=str(split_dir), synthetic=synthetic)
    write_json(out_dir / "metrics.json", m)
    before = [f"> **{SYNTHETIC_BANNER}** Evaluated on generated drawings, not X-rays.", ""] if synthetic else []
    before += [f"Run `{d}` (recipe `{rec.name}`, `{rec.arch}`, weights from its model.safetensors) evaluated on "
               f"`{split_dir}`: {len(files)} images, counts {folders.counts()['train']}. Per-image predictions: "
               "predictions.csv.", ""]
    write_evaluation_report(out_dir, f"Evaluation of {rec.name} on {split_dir.name}{note}", before, m, ev.classes)
    return out_dir


def _image_files(paths) -> list[Path]:
    out = []
    for p in paths:
        p = Path(str(p)).expanduser()
        if p.is_dir(): out += get_xray_files(p)
        elif p.is_file(): out.append(p)
        else: raise DataError(f"{p} does not exist", "pass image files or folders of images", path=p)
    if not out: raise DataError(f"no images found in {', '.join(map(str, paths))}")
    return out


def predict_probs(learn, dl, rec: Recipe, tta: bool | None = None):
    "Class probabilities of `dl` (no labels needed), with the run's TTA and its passes' augmentation unless `tta`."
    use_tta = rec.tta if tta is None else tta
    return (learn.tta(dl=tta_dl(dl, tta_aug(rec)))[0] if use_tta else learn.get_preds(dl=dl)[0]).float().numpy()


def predict_run(run_dir, paths, out=None, heatmaps: bool = False, tta: bool | None = None,
                threshold: float | None = None) -> Path:
    """CSV of file, p_infected, label at the run's threshold (or `threshold`) for image files/folders (written to
    `out` or `RUN_DIR/predictions/<timestamp>.csv`); with `heatmaps`, Grad-CAM overlays in `<csv stem>_heatmaps/`."""
    from PIL import Image

    t = _fixed_threshold(threshold)
    if out is not None and Path(out).exists():  # before the model runs: never overwrite, never waste the work
        raise RecipeError(f"{out} exists", "pass another --out (predictions never overwrite)", path=out)
    d, cfg, rec = load_run(run_dir)
    files, unreadable = scan_images(_image_files(paths))  # bad files get a row saying why, not a traceback
    if not files:
        raise DataError(f"none of the {len(unreadable)} file(s) given is a readable image (first: "
                        f"{unreadable[0][0]}: {unreadable[0][1]})", "pass image files or folders of images")
    if unreadable:
        warnings.warn(f"skipped {len(unreadable)} unreadable file(s), listed in the CSV with the reason: "
                      f"{unreadable[0][0]}: {unreadable[0][1]}" + (" ..." if len(unreadable) > 1 else ""),
                      stacklevel=2)
    classes = cfg["data"]["classes"]
    folders = XrayFolders(files[0].parent, {"train": {classes[0]: files}}, classes=[classes[0]])
    learn = run_learner(d, cfg, rec, folders, get_y=lambda f: classes[0])  # labels unused: predictions only
    dl = learn.dls.test_dl(files)
    probs = predict_probs(learn, dl, rec, tta)
    thr = t if t is not None else (cfg.get("threshold") or {"value": 0.5})["value"]
    df = predictions_frame(files, classes, probs, thr)
    if out is None:
        pdir = new_run_dir(d, "predictions")  # a fresh timestamped folder: never overwrites
        csv = pdir / "predictions.csv"
    else:
        csv = Path(out)
        if csv.exists():
            raise RecipeError(f"{csv} exists", "pass another --out (predictions never overwrite)", path=csv)
        csv.parent.mkdir(parents=True, exist_ok=True)
    if heatmaps:
        hdir = csv.parent / f"{csv.stem}_heatmaps"
        try: hdir.mkdir()
        except FileExistsError:
            raise RecipeError(f"{hdir} exists", "pass another --out (heatmaps never overwrite)", path=hdir) from None
        from .gradcam import overlay
        cols = []
        # each heatmap explains the class in the CSV's label column (decided at the run's threshold, maybe on TTA
        # probabilities), not whatever one plain forward pass would pick
        target = [classes.index(lab) if lab in classes else int(probs[k].argmax())
                  for k, lab in enumerate(df["label"])]
        for i in range(0, len(files), 16):
            chunk = files[i:i + 16]
            imgs, cams, _ = cam_images(learn, chunk, target=target[i:i + 16])
            for j, f in enumerate(chunk):
                h = hdir / f"{i + j:05d}_{f.stem}.png"
                Image.fromarray(overlay(imgs[j], cams[j])).save(h)
                cols.append(str(h))
        df["heatmap"] = cols
    if unreadable:
        df["error"] = ""
        df = pd.concat([df, pd.DataFrame({"file": [str(f) for f, _ in unreadable],
                                          "error": [f"unreadable: {why}" for _, why in unreadable]})],
                       ignore_index=True)
    df.to_csv(csv, index=False)
    return csv
