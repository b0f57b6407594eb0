"""Interpretation of a trained Learner on one split: predictions, metrics, plots.

Inference runs once per split (`Evaluation.of`); fastai's `ClassificationInterpretation` draws the confusion
matrix from those cached predictions instead of predicting again; scikit-learn computes the metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display here or in CI
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from fastai.vision.all import ClassificationInterpretation, PILImage
from sklearn import metrics as skm

__all__ = ["Evaluation", "classification_metrics", "plot_confusion_matrix", "plot_curves", "plot_extremes"]


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

    @classmethod
    def of(cls, learn, dl, split: str) -> "Evaluation":
        probs, targs, losses = learn.get_preds(dl=dl, with_loss=True)
        decoded = probs.argmax(1)
        interp = CachedInterpretation(learn, dl, losses, decoded.numpy(), targs.numpy())
        return cls(split, list(dl.items), list(dl.vocab), probs.float().numpy(), targs.numpy(),
                   losses.float().numpy(), decoded.numpy(), interp)

    def metrics(self) -> dict: return classification_metrics(self.targs, self.preds, self.classes)


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


def _save(fig, path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_confusion_matrix(ev: Evaluation, path, title: str) -> Path:
    # fastai's plot_confusion_matrix draws on a new figure and returns nothing: save the current figure.
    ev.interp.plot_confusion_matrix(title=title, figsize=(4.5, 4.5))
    return _save(plt.gcf(), path)


def plot_curves(history: pd.DataFrame, path, title: str) -> Path:
    "Loss and accuracy per epoch, train and valid, from `history.csv`."
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ep = history["epoch"] + 1
    for col, style in (("train_loss", "o-"), ("valid_loss", "s-")):
        a1.plot(ep, history[col], style, label=col.replace("_", " "))
    for col, style in (("train_accuracy", "o-"), ("valid_accuracy", "s-")):
        if col in history: a2.plot(ep, history[col], style, label=col.replace("_", " "))
    a1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    a2.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for a in (a1, a2): a.legend(); a.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def plot_extremes(ev: Evaluation, out_dir, k: int = 8, note: str = "") -> dict:
    """Best and worst classified images of each class, ranked by loss: `{best,worst}_<class>.png`.

    (The seed took the top-2 by highest logit; ranking by loss puts confidently wrong images first.)
    """
    files = {}
    for ci, cls in enumerate(ev.classes):
        idx = np.nonzero(ev.targs == ci)[0]
        order = idx[np.argsort(ev.losses[idx], kind="stable")]
        for kind, chosen in (("best", order[:k]), ("worst", order[::-1][:k])):
            n = max(len(chosen), 1)
            fig, axes = plt.subplots(1, n, figsize=(2.3 * n, 2.9), squeeze=False)
            for ax, i in zip(axes[0], chosen):
                img = PILImage.create(ev.items[i])
                img.thumbnail((256, 256))
                ax.imshow(np.asarray(img.convert("L")), cmap="gray")
                p = ev.preds[i]
                ax.set_title(f"pred {ev.classes[p]} {ev.probs[i, p]:.2f}\nloss {ev.losses[i]:.3f}", fontsize=8,
                             color="black" if p == ci else "red")
                ax.axis("off")
            if not len(chosen): axes[0][0].axis("off")
            what = "lowest" if kind == "best" else "highest"
            fig.suptitle(f"{kind} classified '{cls}' ({ev.split} split, {what} loss first){note}", fontsize=9)
            files[f"{kind}_{cls}"] = _save(fig, Path(out_dir) / f"{kind}_{cls}.png")
    return files
