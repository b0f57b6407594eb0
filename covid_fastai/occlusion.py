"""Occlusion and Grad-CAM checks of a trained model: what its score is worth once the lungs, or only the borders
and corners, are hidden, and how much of its Grad-CAM mass lies on the lungs.

Regions are fractions of the model's input (H x W), for a frontal film framed as usual:
- the central (lung) region: rows and columns 15%-85%, which holds both lung fields of a PA/AP film;
- borders and corners: an 8% frame round the edge and 15% squares in the four corners, where letters, lead
  markers, arrows and letterbox bars sit (they do not reach the central region).
A masked pixel takes the image's own mean (per channel, of the normalised input): a value that says nothing about
where it is. Predictions are plain (no test-time augmentation), with and without a mask alike.
"""
from __future__ import annotations

import numpy as np
import torch
from fastai.vision.all import Callback

from .gradcam import grad_cam
from .metrics import binary_metrics, positive_view

__all__ = ["CENTRAL", "BORDER", "CORNER", "REGIONS", "region_masks", "Occlude", "occlusion_test", "cam_mass"]

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
