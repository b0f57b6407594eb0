"""The audit of a trained run: its AUC within each source against the pooled AUC, what its score is worth once the
lungs, or only the borders and corners, are hidden (occlusion), and how much of its Grad-CAM mass lies on the lungs.

Regions are fractions of the model's input (H x W), for a frontal film framed as usual:
- the central (lung) region: rows and columns 15%-85%, which holds both lung fields of a PA/AP film;
- borders and corners: an 8% frame round the edge and 15% squares in the four corners, where letters, lead
  markers, arrows and letterbox bars sit (they do not reach the central region).
A masked pixel takes the image's own mean (per channel, of the normalised input): a value that says nothing about
where it is. Predictions are plain (no test-time augmentation), with and without a mask alike.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.vision.all import Callback

from .audit import NO_SOURCE, THRESHOLDS, auc_or_none, positive_class
from .gradcam import grad_cam
from .labels import fine_label_getter, join_labels
from .metrics import binary_metrics, positive_view

__all__ = ["CENTRAL", "BORDER", "CORNER", "REGIONS", "region_masks", "Occlude", "occlusion_test", "cam_mass",
           "within_source", "run_audit"]

CENTRAL = (0.15, 0.85)  # start and end of the central region, as a fraction of height and of width
BORDER = 0.08           # width of the frame round the edge
CORNER = 0.15           # side of the corner squares (as far as the central region begins)
REGIONS = ("outside the central region", "borders and corners", "lung region")  # what each occlusion masks


def region_masks(h: int, w: int) -> dict[str, torch.Tensor]:
    "{region name: (h, w) bool mask, True where masked} for `REGIONS`."
    y = (torch.arange(h, dtype=torch.float32)[:, None] + 0.5) / h
    x = (torch.arange(w, dtype=torch.float32)[None, :] + 0.5) / w
    lo, hi = CENTRAL
    central = (y >= lo) & (y < hi) & (x >= lo) & (x < hi)
    frame = (y < BORDER) | (y >= 1 - BORDER) | (x < BORDER) | (x >= 1 - BORDER)
    corners = ((y < CORNER) | (y >= 1 - CORNER)) & ((x < CORNER) | (x >= 1 - CORNER))
    return {REGIONS[0]: ~central, REGIONS[1]: frame | corners, REGIONS[2]: central}


class Occlude(Callback):
    "Mask one of `REGIONS` of every input batch with each image's own mean."
    order = 5  # before ChannelsLast (9) and BF16Autocast (10): they see the masked batch

    def __init__(self, region: str): self.region = region

    def before_batch(self):
        x = self.xb[0]
        m = region_masks(*x.shape[-2:])[self.region].to(x.device)
        self.learn.xb = (torch.where(m, x.mean((-2, -1), keepdim=True), x),)


def _scores(learn, dl, threshold: float, cbs=None) -> dict:
    probs, targs = learn.get_preds(dl=dl, cbs=cbs)
    _, p, y = positive_view(list(dl.vocab), probs.float().numpy(), targs.numpy())
    m = binary_metrics(y, p, threshold)
    return {"accuracy": m["accuracy"], "roc_auc": m["roc_auc"], "p": p, "y": y}


def occlusion_test(learn, dl, threshold: float) -> tuple[list[dict], dict]:
    """([{condition, accuracy, roc_auc, d_accuracy, d_auc}] for no mask and each of `REGIONS`, the unmasked scores
    with per-image p and y). Accuracy is at `threshold` on p(positive)."""
    base = _scores(learn, dl, threshold)
    rows = [{"condition": "none (all pixels)", "accuracy": base["accuracy"], "roc_auc": base["roc_auc"],
             "d_accuracy": 0.0, "d_auc": 0.0 if base["roc_auc"] is not None else None}]
    for r in REGIONS:
        s = _scores(learn, dl, threshold, cbs=[Occlude(r)])
        d_auc = None if s["roc_auc"] is None or base["roc_auc"] is None else s["roc_auc"] - base["roc_auc"]
        rows.append({"condition": f"{r} masked", "accuracy": s["accuracy"], "roc_auc": s["roc_auc"],
                     "d_accuracy": s["accuracy"] - base["accuracy"], "d_auc": d_auc})
    return rows, base


def cam_mass(learn, dl) -> np.ndarray:
    """Per image (in `dl`'s order): the share of its Grad-CAM mass (for the predicted class) inside the central
    region; NaN for a flat map. A map spread evenly would give the region's area, (0.85 - 0.15)^2 = 0.49."""
    out = []
    for xb, *_ in dl:
        cams, _ = grad_cam(learn.model, xb.as_subclass(torch.Tensor))
        m = region_masks(*cams.shape[-2:])[REGIONS[2]].numpy()
        total = cams.sum((1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(total > 0, (cams * m).sum((1, 2)) / total, np.nan))
    return np.concatenate(out) if out else np.zeros(0)


def within_source(y, p, sources) -> dict:
    "Pooled ROC AUC, the AUC inside each source with both classes, their unweighted mean and the gap."
    df = pd.DataFrame({"y": np.asarray(y).astype(int), "p": np.asarray(p, float), "s": list(sources)})
    rows = []
    for s, part in df.groupby("s", sort=True):
        rows.append({"source": s, "n": len(part), "positives": int(part["y"].sum()),
                     "auc": auc_or_none(part["y"], part["p"])})
    within = [r for r in rows if r["auc"] is not None]
    pooled = auc_or_none(df["y"], df["p"])
    mean = float(np.mean([r["auc"] for r in within])) if within else None
    # weighted by images: a source with 2 cases of one class gives a very noisy AUC
    weighted = float(np.average([r["auc"] for r in within], weights=[r["n"] for r in within])) if within else None
    gap = None if pooled is None or mean is None else pooled - mean
    return {"pooled_auc": pooled, "sources": rows, "mean_within_auc": mean, "weighted_within_auc": weighted, "gap": gap,
            "flag": gap is not None and gap >= THRESHOLDS["pooled_minus_within_auc"]}


def run_audit(run_dir, data) -> tuple[dict, pd.DataFrame]:
    """(findings, per-image frame: file, label, source, y, p, cam_share) of a finished run on the test split of
    `data` (or on `data` itself when it is a folder of class folders), as `evaluate` reads it."""
    from .evaluate import eval_folders, load_run, run_learner
    d, cfg, rec = load_run(run_dir)
    folders, split_dir = eval_folders(data, cfg)
    files = folders.files("train")
    get_y = fine_label_getter(folders, files)[0] if rec.labels == "fine_label" else None
    learn = run_learner(d, cfg, rec, folders, get_y)
    dl = learn.dls.test_dl(files, with_labels=True)
    thr = float((cfg.get("threshold") or {"value": 0.5})["value"])
    occ, base = occlusion_test(learn, dl, thr)
    src = join_labels(list(dl.items), folders.root, folders.labels, columns=("source",)).get("source")
    label = [Path(f).parent.name for f in dl.items]
    preds = pd.DataFrame({"file": [str(f) for f in dl.items], "label": label,
                          "source": [s or NO_SOURCE for s in src] if src else NO_SOURCE, "y": base["y"],
                          "p": base["p"], "cam_share": cam_mass(learn, dl)})
    ws = within_source(preds["y"], preds["p"], preds["source"]) if src else None
    uniform = (CENTRAL[1] - CENTRAL[0]) ** 2
    groups = [{"group": "all", "n": int(preds["cam_share"].notna().sum()), "share": float(preds["cam_share"].mean())}]
    for col in ("label", "source"):
        if col == "source" and not src: continue
        for g, part in preds.groupby(col, sort=True):
            groups.append({"group": f"{col} {g}", "n": int(part["cam_share"].notna().sum()),
                           "share": float(part["cam_share"].mean())})
    lungs = next(r for r in occ if r["condition"].startswith("lung"))
    corners = next(r for r in occ if r["condition"].startswith("borders"))
    flags = []
    if ws and ws["flag"]:
        flags.append(f"pooled AUC {ws['pooled_auc']:.3f} is {ws['gap']:.3f} above the mean within-source AUC "
                     f"{ws['mean_within_auc']:.3f}")
    lungs_flag = lungs["roc_auc"] is not None and lungs["roc_auc"] >= THRESHOLDS["lungs_masked_auc"]
    if lungs_flag: flags.append(f"with the lung region masked the AUC is still {lungs['roc_auc']:.3f}")
    corners_flag = corners["d_auc"] is not None and -corners["d_auc"] >= THRESHOLDS["corners_masked_auc_drop"]
    if corners_flag:
        flags.append(f"masking only the borders and corners costs {-corners['d_auc']:.3f} AUC "
                     f"and {-corners['d_accuracy']:.3f} accuracy")
    if groups[0]["share"] < uniform:
        flags.append(f"less Grad-CAM mass inside the central region ({groups[0]['share']:.3f}) than an even spread "
                     f"would put there ({uniform:.2f})")
    findings = {"run_dir": str(d), "run_name": rec.name, "arch": rec.arch, "split_dir": str(split_dir),
                "n": len(files), "positive": positive_class(list(dl.vocab)), "threshold": thr,
                "within_source": ws, "occlusion": occ,
                "cam": {"uniform": uniform, "mean": groups[0]["share"], "groups": groups},
                "shortcut": bool(lungs_flag or corners_flag or (ws and ws["flag"])), "flags": flags,
                "thresholds": THRESHOLDS}
    return findings, preds
