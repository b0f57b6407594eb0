"""Interpretation of a trained Learner on one split: predictions, metrics, plots.

Inference runs once per split (`Evaluation.of`, optionally with fastai's test-time augmentation), and
`ev.interp` is fastai's `ClassificationInterpretation` over those cached predictions (for notebooks);
scikit-learn computes the metrics (covid_fastai.metrics). Each plot is a `*_figure` function returning a
matplotlib `Figure` of its own, outside pyplot, so it draws under any backend and chooses none; the `plot_*`
writers save one as PNG. `assess` and `write_evaluation` turn one evaluated split into metrics.json content
and every plot.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch
from fastai.vision.all import ClassificationInterpretation
from matplotlib.figure import Figure
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from . import metrics as M
from .augment import tta_dl
from .images import open_xray
from .labels import join_labels
from .progress import phase

__all__ = ["Evaluation", "classification_metrics", "plot_confusion_matrix", "plot_curves", "plot_extremes",
           "plot_roc_pr", "plot_calibration", "plot_confusion_matrices", "assess", "write_evaluation",
           "predictions_frame", "cam_images", "rank_by_loss", "confusion_matrix_figure", "curves_figure",
           "extremes_figure", "roc_pr_figure", "calibration_figure", "confusion_matrices_figure"]


class CachedInterpretation(ClassificationInterpretation):
    "fastai's interpretation over predictions already made (its `confusion_matrix` would predict again)."
    def __init__(self, learn, dl, losses, decoded, targs):
        super().__init__(learn, dl, losses)
        self.decoded, self.targs = decoded, targs

    def confusion_matrix(self):
        return skm.confusion_matrix(self.targs, self.decoded, labels=list(range(len(self.vocab))))


@dataclass
class Evaluation:
    "Predictions of a Learner on one split."
    split: str               # 'test' or 'valid'
    items: list              # image files, in prediction order
    classes: list
    probs: np.ndarray        # (n, n_classes) softmax probabilities
    targs: np.ndarray        # (n,) true class indices
    losses: np.ndarray       # (n,) per-image cross-entropy
    preds: np.ndarray        # (n,) predicted class indices (argmax)
    interp: CachedInterpretation
    tta: bool = False        # predictions averaged with fastai's test-time augmentation
    tta_aug: str = ""        # the augmentation policy of TTA's passes, when not the training one

    @classmethod
    def of(cls, learn, dl, split: str, tta: bool = False,
           tta_aug=None,  # an `XrayAugment` for TTA's augmented passes (None: the training augmentation)
           ) -> "Evaluation":
        with phase(f"predict the {split} split" + (" (test-time augmentation: 5 passes)" if tta else "")):
            return cls._predict(learn, dl, split, tta, tta_aug)

    @classmethod
    def _predict(cls, learn, dl, split: str, tta: bool, tta_aug=None) -> "Evaluation":
        if tta:
            # fastai's tta: 4 passes with the training augmentation (the dataset's split_idx set to 0, which
            # TorchvisionTfm reads) or `tta_aug`'s, averaged, then mixed 0.75/0.25 with the plain prediction.
            probs, targs = learn.tta(dl=tta_dl(dl, tta_aug))
            losses = torch.nn.functional.nll_loss(probs.float().clamp_min(1e-12).log(), targs.long(), reduction="none")
        else:
            probs, targs, losses = learn.get_preds(dl=dl, with_loss=True)
        decoded = probs.argmax(1)
        interp = CachedInterpretation(learn, dl, losses, decoded.numpy(), targs.numpy())
        return cls(split, list(dl.items), list(dl.vocab), probs.float().numpy(), targs.numpy(),
                   losses.float().numpy(), decoded.numpy(), interp, tta, tta_aug.name if tta and tta_aug else "")

    def metrics(self) -> dict: return classification_metrics(self.targs, self.preds, self.classes)

    def positive(self) -> tuple[str, np.ndarray, np.ndarray]:
        "(positive class name, p_positive, y_positive): see `covid_fastai.metrics.positive_view`."
        return M.positive_view(self.classes, self.probs, self.targs)

    # Interactive plots: each returns a matplotlib Figure (the cell's value shows inline in Jupyter; `.savefig` else).
    def plot_confusion_matrix(self, title: str = ""):
        "fastai's confusion matrix at argmax."
        return confusion_matrix_figure(self, title or f"{self.split} split")

    def plot_confusion_matrices(self, threshold: float = 0.5, title: str = ""):
        "Counts and row-normalised confusion matrices at argmax and at `threshold` on p(positive)."
        return confusion_matrices_figure(self, threshold, title or f"{self.split} split")

    def plot_roc_pr(self, threshold: float = 0.5, title: str = ""):
        "ROC and precision-recall curves, with the 0.5 and `threshold` operating points."
        return roc_pr_figure(self, threshold, title or f"{self.split} split")

    def plot_calibration(self, title: str = ""):
        "Reliability curve of p(positive) over a histogram of the probabilities."
        return calibration_figure(self, title or f"calibration: {self.split}")


def classification_metrics(targs, preds, classes) -> dict:
    "Accuracy, per-class precision/recall/F1/support and the confusion matrix (rows = true), via scikit-learn."
    labels = list(range(len(classes)))
    p, r, f, s = skm.precision_recall_fscore_support(targs, preds, labels=labels, zero_division=0)
    return {
        "n": int(len(targs)),
        "accuracy": float(skm.accuracy_score(targs, preds)),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "confusion_matrix": skm.confusion_matrix(targs, preds, labels=labels).tolist(),
        "confusion_matrix_axes": {"rows": "true class", "columns": "predicted class", "order": list(classes)},
    }


def _save(fig: Figure, path, tight: bool = True) -> Path:
    # a Figure of its own, outside pyplot: nothing to close, any backend (or none) is fine
    fig.savefig(path, dpi=110, bbox_inches="tight" if tight else None)
    return Path(path)


def _titles_at_top(figure_fn):
    """A figure builder whose axes titles sit at the top of their axes (rc `axes.titley` = 1.0) rather than being
    placed automatically. Auto placement only moves a title above ticks or labels drawn on top, which none of
    these figures have, so the image is the same; but it measures every axis's ticks for every title at each
    draw, most of a grid's drawing time. rc_context: the process's settings stay as they were."""
    @functools.wraps(figure_fn)
    def _fn(*args, **kwargs):
        with matplotlib.rc_context({"axes.titley": 1.0}): return figure_fn(*args, **kwargs)
    return _fn


@_titles_at_top
def confusion_matrix_figure(ev: Evaluation, title: str) -> Figure:
    "Counts, rows = true class: fastai's `plot_confusion_matrix` look, on a Figure of its own (fastai's uses pyplot)."
    cm = skm.confusion_matrix(ev.targs, ev.preds, labels=list(range(len(ev.classes))))
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.imshow(cm, interpolation="nearest", cmap="Blues")
    ticks = np.arange(len(ev.classes))
    ax.set_xticks(ticks, ev.classes, rotation=90)
    ax.set_yticks(ticks, ev.classes)
    for i, j in np.ndindex(cm.shape):
        ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set(title=title, xlabel="Predicted", ylabel="Actual", ylim=(len(ev.classes) - 0.5, -0.5))
    fig.tight_layout()
    return fig


def plot_confusion_matrix(ev: Evaluation, path, title: str) -> Path:
    return _save(confusion_matrix_figure(ev, title), path)


@_titles_at_top
def curves_figure(history: pd.DataFrame, title: str) -> Figure:
    "Loss and accuracy per epoch, train and valid, from `history.csv`."
    fig = Figure(figsize=(10, 3.8))
    a1, a2 = fig.subplots(1, 2)
    ep = history["epoch"] + 1
    for col, style in (("train_loss", "o-"), ("valid_loss", "s-")):
        a1.plot(ep, history[col], style, label=col.replace("_", " "))
    for col, style in (("train_accuracy", "o-"), ("valid_accuracy", "s-")):
        if col in history: a2.plot(ep, history[col], style, label=col.replace("_", " "))
    a1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    a2.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for a in (a1, a2): a.legend(); a.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def plot_curves(history: pd.DataFrame, path, title: str) -> Path:
    return _save(curves_figure(history, title), path)


def cam_images(learn, files, target=None) -> tuple[list, np.ndarray, np.ndarray]:
    """([model-view image (H, W, 3) uint8], heatmaps (n, H, W), probabilities) for image files: the eval
    transform the model sees, and Grad-CAM of `target` (default: the predicted class)."""
    from .gradcam import grad_cam
    dl = learn.dls.test_dl(list(files), bs=max(len(files), 1))
    x = dl.one_batch()[0]
    cams, probs = grad_cam(learn.model, x, target)
    shown = dl.decode((x,))[0]  # un-normalised, 0-255
    imgs = [np.clip(t.permute(1, 2, 0).cpu().float().numpy(), 0, 255).astype(np.uint8) for t in shown]
    return imgs, cams, probs


def rank_by_loss(ev: Evaluation, k: int = 8) -> dict:
    """`{"best_<class>": indices, "worst_<class>": indices}`: per true class, the `k` images of lowest loss
    (lowest first) and of highest loss (highest first).
    (The seed took the top-2 by highest logit; ranking by loss puts confidently wrong images first.)"""
    ranked = {}
    for ci, cls in enumerate(ev.classes):
        idx = np.nonzero(ev.targs == ci)[0]
        order = idx[np.argsort(ev.losses[idx], kind="stable")]
        ranked[f"best_{cls}"], ranked[f"worst_{cls}"] = order[:k], order[::-1][:k]
    return ranked


@_titles_at_top
def extremes_figure(ev: Evaluation, kind: str, cls: str, chosen, note: str = "", learn=None) -> Figure:
    """The images `chosen` (indices into `ev`) of true class `cls`, one per column, titled with the prediction,
    its probability, p(positive) and the loss; with `learn`, a second row shows the Grad-CAM heatmap of the
    predicted class on the image as the model sees it."""
    pos_name, p_pos, _ = ev.positive()
    ci = ev.classes.index(cls)
    n = max(len(chosen), 1)
    rows = 2 if learn is not None and len(chosen) else 1
    fig = Figure(figsize=(2.3 * n, 2.9 if rows == 1 else 5.2))
    axes = fig.subplots(rows, n, squeeze=False)
    # explain the class the title names: ev.preds may come from TTA, cam_images' own argmax from one pass
    cams = cam_images(learn, [ev.items[i] for i in chosen], target=[int(ev.preds[i]) for i in chosen]) \
        if rows == 2 else None
    for j, (ax, i) in enumerate(zip(axes[0], chosen)):
        img = open_xray(ev.items[i])  # DICOM too, as training reads it
        img.thumbnail((256, 256))
        ax.imshow(np.asarray(img.convert("L")), cmap="gray", interpolation="nearest")  # already display-sized
        p = ev.preds[i]
        ax.set_title(f"pred {ev.classes[p]} {ev.probs[i, p]:.2f}\np({pos_name}) {p_pos[i]:.2f} "
                     f"loss {ev.losses[i]:.3f}", fontsize=8, color="black" if p == ci else "red")
        if cams is not None:
            from .gradcam import overlay
            axes[1][j].imshow(overlay(cams[0][j], cams[1][j]))
            axes[1][j].set_title(f"Grad-CAM: {ev.classes[p]}", fontsize=8)
    for ax in axes.flat: ax.axis("off")
    what = "lowest" if kind == "best" else "highest"
    fig.suptitle(f"{kind} classified '{cls}' ({ev.split} split, {what} loss first){note}", fontsize=9)
    # fixed margins instead of bbox "tight" (a second full draw): these grids are most of a run's plotting
    fig.subplots_adjust(left=0.01, right=0.99, top=0.8 if rows == 1 else 0.87, bottom=0.01, wspace=0.08, hspace=0.3)
    return fig


def plot_extremes(ev: Evaluation, out_dir, k: int = 8, note: str = "", learn=None, step=None) -> dict:
    """Best and worst classified images of each class, ranked by loss (`rank_by_loss`): `{best,worst}_<class>.png`.
    `step()` is called after each grid (a progress bar's)."""
    files = {}
    for name, chosen in rank_by_loss(ev, k).items():
        kind, cls = name.split("_", 1)
        fig = extremes_figure(ev, kind, cls, chosen, note, learn)
        files[name] = _save(fig, Path(out_dir) / f"{name}.png", tight=False)
        if step is not None: step()
    return files


@_titles_at_top
def roc_pr_figure(ev: Evaluation, threshold: float, title: str) -> Figure:
    "ROC and precision-recall curves of the positive view, with the 0.5 and chosen operating points."
    name, p, y = ev.positive()
    fig = Figure(figsize=(9, 4))
    a1, a2 = fig.subplots(1, 2)
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = skm.roc_curve(y, p)
        prec, rec, _ = skm.precision_recall_curve(y, p)
        a1.plot(fpr, tpr, label=f"AUC {skm.roc_auc_score(y, p):.3f}")
        a2.plot(rec, prec, label=f"AP {skm.average_precision_score(y, p):.3f}")
        a2.axhline(y.mean(), ls=":", c="gray", label=f"prevalence {y.mean():.2f}")
        for t, mk, col, lab in ((0.5, "o", "tab:orange", "0.5"), (threshold, "s", "tab:green", f"chosen {threshold:.3f}")):
            m = M.binary_metrics(y, p, t)
            if m["specificity"] is not None and m["sensitivity"] is not None:
                a1.plot(1 - m["specificity"], m["sensitivity"], mk, c=col, label=f"t = {lab}")
            if m["ppv"] is not None and m["sensitivity"] is not None:
                a2.plot(m["sensitivity"], m["ppv"], mk, c=col, label=f"t = {lab}")
    else:
        for a in (a1, a2): a.text(0.5, 0.5, "one class only: undefined", ha="center")
    a1.plot([0, 1], [0, 1], ls=":", c="gray")
    a1.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC ({name} vs rest)", xlim=(0, 1), ylim=(0, 1.02))
    a2.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="precision-recall", xlim=(0, 1),
           ylim=(0, 1.02))
    for a in (a1, a2):
        if a.get_legend_handles_labels()[0]: a.legend(fontsize=8, loc="lower right" if a is a1 else "lower left")
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_roc_pr(ev: Evaluation, threshold: float, path, title: str) -> Path:
    return _save(roc_pr_figure(ev, threshold, title), path)


@_titles_at_top
def calibration_figure(ev: Evaluation, title: str, bins: int = 10) -> Figure:
    "Reliability curve of p(positive) (quantile bins) over a histogram of the probabilities."
    name, p, y = ev.positive()
    fig = Figure(figsize=(4.8, 5.4))
    a1, a2 = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    if len(np.unique(y)) == 2:
        frac, mean = calibration_curve(y, p, n_bins=min(bins, max(2, len(y) // 5)), strategy="quantile")
        a1.plot(mean, frac, "o-", label="model")
        a1.text(0.02, 0.9, f"Brier {skm.brier_score_loss(y, p):.4f}", fontsize=8)
    a1.plot([0, 1], [0, 1], ":", c="gray", label="perfectly calibrated")
    a1.set(ylabel=f"observed fraction {name}", title=title, xlim=(0, 1), ylim=(0, 1.02))
    a1.legend(fontsize=8, loc="lower right"); a1.grid(alpha=0.3)
    a2.hist([p[y == 1], p[y == 0]], bins=20, range=(0, 1), label=[name, "rest"], stacked=True)
    a2.set(xlabel=f"predicted p({name})", ylabel="images"); a2.legend(fontsize=7)
    return fig


def plot_calibration(ev: Evaluation, path, title: str, bins: int = 10) -> Path:
    return _save(calibration_figure(ev, title, bins), path)


@_titles_at_top
def confusion_matrices_figure(ev: Evaluation, threshold: float, title: str) -> Figure:
    "Counts and row-normalised confusion matrices at argmax (= 0.5 for two classes) and at the chosen threshold."
    name, p, y = ev.positive()
    two = len(ev.classes) == 2
    views = [("argmax" + (" (t = 0.5)" if two else ""), ev.targs, ev.preds, ev.classes)]
    pos_labels = [name, "not " + name if not two else next(c for c in ev.classes if c != name)]
    views.append((f"{name} at t = {threshold:.3f}", 1 - y, (p < threshold).astype(int), pos_labels))
    fig = Figure(figsize=(8.4, 3.9 * len(views)))
    axes = fig.subplots(len(views), 2, squeeze=False)
    for (lab, t, pr, names), row in zip(views, axes):
        for ax, norm in zip(row, (None, "true")):
            skm.ConfusionMatrixDisplay.from_predictions(t, pr, labels=list(range(len(names))), display_labels=names,
                                                        normalize=norm, ax=ax, colorbar=False, cmap="Blues",
                                                        values_format=".2f" if norm else "d")
            ax.set_title(f"{lab}: {'row-normalised' if norm else 'counts'}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_confusion_matrices(ev: Evaluation, threshold: float, path, title: str) -> Path:
    return _save(confusion_matrices_figure(ev, threshold, title), path)


def predictions_frame(items, classes, probs, threshold, targs=None) -> pd.DataFrame:
    "Per image: file, p(positive), label at `threshold` (and per-class probabilities with 3+ classes, true class)."
    name, p, _ = M.positive_view(classes, probs, np.zeros(len(probs), int))
    df = pd.DataFrame({"file": [str(f) for f in items], f"p_{name}": p,
                       "label": np.where(p >= threshold, name, "not " + name if len(classes) > 2 else
                                         next((c for c in classes if c != name), "other"))})
    if len(classes) > 2 or name != "infected":
        for i, c in enumerate(classes): df[f"p_{c}"] = probs[:, i]
        df["argmax"] = [classes[i] for i in probs.argmax(1)]
    if targs is not None: df["true"] = [classes[i] for i in targs]
    df["threshold"] = threshold
    return df


def assess(ev: Evaluation, threshold: dict, labels: pd.DataFrame | None = None, root=None, n_boot: int = 1000,
           seed: int = 0) -> dict:
    """metrics.json content for one evaluated split: argmax metrics (accuracy, per class, confusion matrix),
    the positive view at 0.5 and at `threshold` (a `choose_threshold` result) with bootstrap 95% CIs,
    one-vs-rest per class with 3+ classes, and per-source / per-fine-label breakdowns from labels.csv."""
    name, p, y = ev.positive()
    out = {"split": ev.split, **ev.metrics(), "tta": ev.tta, "tta_aug": ev.tta_aug or None, "positive_class": name,
           # undefined with one class present (sklearn would warn and give that class's recall)
           "balanced_accuracy": float(skm.balanced_accuracy_score(ev.targs, ev.preds))
           if len(np.unique(ev.targs)) > 1 else None, "threshold": threshold}
    for key, t in (("at_0.5", 0.5), ("at_threshold", threshold["value"])):
        out[key] = {**M.binary_metrics(y, p, t), "ci95": M.bootstrap_ci(y, p, t, n_boot=n_boot, seed=seed)}
    if len(ev.classes) > 2: out["one_vs_rest"] = M.one_vs_rest(ev.classes, ev.probs, ev.targs)
    joined = join_labels(ev.items, root, labels) if root is not None else {}
    out["breakdowns"] = {c: M.group_metrics(y, p, threshold["value"], vals) for c, vals in joined.items()
                         if c in ("source", "fine_label") and any(vals)}
    return out


def write_evaluation(out_dir, ev: Evaluation, threshold: dict, title: str, note: str = "", learn=None,
                     labels=None, root=None, gradcam: bool = True) -> tuple[dict, dict]:
    "(metrics, {plot name: file}) for one evaluated split, plots written into `out_dir`."
    out_dir = Path(out_dir)
    t = threshold["value"]
    grids = "plots and Grad-CAM grids" if learn is not None and gradcam else "plots"
    with phase(grids, total=4 + 2 * len(ev.classes)) as ph:
        files = {"confusion_matrix": plot_confusion_matrix(ev, out_dir / "confusion_matrix.png", f"{title}{note}"),
                 "confusion_matrices": plot_confusion_matrices(ev, t, out_dir / "confusion_matrices.png",
                                                               f"{title}{note}"),
                 "roc_pr": plot_roc_pr(ev, t, out_dir / "roc_pr.png", f"{title}{note}"),
                 "calibration": plot_calibration(ev, out_dir / "calibration.png", f"calibration: {ev.split}{note}")}
        ph.step(len(files))
        files.update(plot_extremes(ev, out_dir, note=note, learn=learn if gradcam else None, step=ph.step))
    predictions_frame(ev.items, ev.classes, ev.probs, t, ev.targs).to_csv(out_dir / "predictions.csv", index=False)
    with phase("metrics with bootstrap 95% CIs"):
        return assess(ev, threshold, labels, root), files
