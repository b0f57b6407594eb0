"""Clinical metrics of a classifier's probabilities: numbers only (no model, no plots).

The binary view is always "positive class vs the rest": `infected` when the classes have it; with three
classes (covid / pneumonia / normal) p_infected = 1 - p_normal (= p_covid + p_pneumonia); with two classes one
of which is `normal`, the other one; otherwise class index 0. A case is called positive when its probability is >= the threshold (scikit-learn's `roc_curve`
convention). Point estimates come from scikit-learn; 95% confidence intervals from a seeded percentile
bootstrap over cases, vectorised in numpy. A metric that is undefined on the data (e.g. sensitivity with no
positive case, AUC with one class) is `None`, never an error.
"""
from __future__ import annotations

import math
import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn import metrics as skm

from .errors import RecipeError

__all__ = ["positive_view", "choose_threshold", "sensitivity_at_specificity", "binary_metrics", "bootstrap_ci",
           "one_vs_rest", "group_metrics", "BOOTSTRAP_METRICS"]

BOOTSTRAP_METRICS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1",
                     "roc_auc", "pr_auc")


def _num(v):
    "float, or None where undefined (nan)."
    v = float(v)
    return None if math.isnan(v) else v


def positive_view(classes: list, probs: np.ndarray, targs: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """(name of the positive view, p_positive (n,), y_positive (n,) in {0,1}).

    infected present -> its probability; two classes, one of them `normal` (e.g. normal/pneumonia) -> the other
    class; 3+ classes with `normal` -> 'infected' = not normal (one minus p_normal); else class index 0 against the
    rest. Names compare case-insensitively (NORMAL/PNEUMONIA folders), so `normal` is never the positive class.
    """
    classes = list(classes)
    low = [str(c).lower() for c in classes]
    if "infected" in low:
        i = low.index("infected")
        return str(classes[i]), probs[:, i], (targs == i).astype(int)
    if "normal" in low:
        i = low.index("normal")
        if len(classes) == 2:  # the other class is the disease: its own probability and name
            j = 1 - i
            return str(classes[j]), probs[:, j], (targs == j).astype(int)
        return "infected", 1.0 - probs[:, i], (targs != i).astype(int)
    return str(classes[0]), probs[:, 0], (targs == 0).astype(int)


def choose_threshold(y, p, rule="youden") -> dict:
    """Decision threshold on p_positive from labelled (validation) cases.

    rule: 'youden' (max sensitivity + specificity - 1 over the ROC curve), 'sens:0.95' (the highest threshold
    whose sensitivity reaches 0.95), or a number in (0, 1) used as is. With one class only in `y` the data
    cannot choose: 0.5 is used and the result says so.
    """
    rule = str(rule).strip()
    try:
        t = float(rule)
    except ValueError:
        t = None
    if t is not None:
        if not 0 < t < 1: raise RecipeError(f"--threshold {rule!r}", "a fixed threshold must be between 0 and 1")
        return {"rule": rule, "value": t, "note": "fixed"}
    if rule != "youden" and not rule.startswith("sens:"):
        raise RecipeError(f"--threshold {rule!r}", "use youden, sens:0.95 (a target sensitivity) or a number in (0, 1)")
    target = None
    if rule.startswith("sens:"):
        try: target = float(rule[5:])
        except ValueError: target = -1
        if not 0 < target <= 1:
            raise RecipeError(f"--threshold {rule!r}", "the target sensitivity must be a number in (0, 1], e.g. sens:0.95")
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    if len(np.unique(y)) < 2:
        return {"rule": rule, "value": 0.5, "note": "only one class in the data that chooses: fell back to 0.5"}
    fpr, tpr, thr = skm.roc_curve(y, p, drop_intermediate=False)
    thr = np.minimum(thr, 1.0)  # roc_curve's first threshold is +inf (nothing positive)
    if target is None:
        i = int(np.argmax(tpr - fpr))  # first (highest-threshold) maximum of Youden's J
        if i == 0 or tpr[i] - fpr[i] <= 0:  # no threshold does better than chance on this split
            return {"rule": rule, "value": 0.5, "note": "no threshold beats chance on the data that chooses: "
                                                        "fell back to 0.5"}
        note = f"Youden's J = {tpr[i] - fpr[i]:.4f}"
    else:
        i = int(np.argmax(tpr >= target - 1e-12))
        note = f"sensitivity {tpr[i]:.4f} >= {target}"
    return {"rule": rule, "value": float(thr[i]), "note": note}


def sensitivity_at_specificity(y, p, min_specificity: float = 0.95) -> float | None:
    """The highest sensitivity any threshold reaches on (y, p) while specificity stays >= `min_specificity`.

    A point read off this split's own ROC curve, so threshold-free like the AUC (and as optimistic as any
    threshold chosen on the data it is scored on); None with one class only.
    """
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    if len(np.unique(y)) < 2: return None
    fpr, tpr, _ = skm.roc_curve(y, p, drop_intermediate=False)
    return float(tpr[(1 - fpr) >= min_specificity - 1e-12].max())


def binary_metrics(y, p, threshold: float = 0.5) -> dict:
    """Accuracy, balanced accuracy, sensitivity, specificity, PPV, NPV, F1, ROC AUC and PR AUC (scikit-learn),
    and the threshold-free sensitivity at specificity >= 0.95 (`sens_at_spec95`)."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    pred = (p >= threshold).astype(int)
    two = len(np.unique(y)) == 2
    nan = float("nan")
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {
        "threshold": float(threshold), "n": int(len(y)), "n_positive": int(y.sum()),
        "accuracy": _num(skm.accuracy_score(y, pred)) if len(y) else None,
        "balanced_accuracy": _num(skm.balanced_accuracy_score(y, pred)) if two else None,
        "sensitivity": _num(skm.recall_score(y, pred, pos_label=1, zero_division=nan)),
        "specificity": _num(skm.recall_score(y, pred, pos_label=0, zero_division=nan)),
        "ppv": _num(skm.precision_score(y, pred, pos_label=1, zero_division=nan)),
        "npv": _num(skm.precision_score(y, pred, pos_label=0, zero_division=nan)),
        "f1": _num(skm.f1_score(y, pred, pos_label=1, zero_division=nan)) if tp + fp + fn else None,
        "roc_auc": _num(skm.roc_auc_score(y, p)) if two else None,
        "pr_auc": _num(skm.average_precision_score(y, p)) if two else None,
        "sens_at_spec95": sensitivity_at_specificity(y, p, 0.95),
        "confusion_matrix": [[int(tp), int(fn)], [int(fp), int(tn)]],  # rows true (positive, negative)
    }


def _ratio(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _boot_auc(yb, pb):
    "ROC AUC of each row (Mann-Whitney with average ranks for ties, as scikit-learn)."
    n1 = yb.sum(1)
    n0 = yb.shape[1] - n1
    r = rankdata(pb, axis=1)
    return _ratio((r * yb).sum(1) - n1 * (n1 + 1) / 2, n1 * n0)


def _boot_ap(yb, pb):
    "Average precision of each row: sum over distinct thresholds of (R_k - R_{k-1}) * P_k, as scikit-learn."
    order = np.argsort(-pb, axis=1, kind="stable")
    ps, ys = np.take_along_axis(pb, order, 1), np.take_along_axis(yb, order, 1)
    tps = np.cumsum(ys, 1)
    fps = np.cumsum(1 - ys, 1)
    last = np.ones_like(ps, dtype=bool)
    last[:, :-1] = ps[:, :-1] != ps[:, 1:]  # the end of each group of tied scores is one threshold
    prec = tps / (tps + fps)
    kept = np.where(last, tps, 0)
    prev = np.maximum.accumulate(np.concatenate([np.zeros((len(ps), 1)), kept[:, :-1]], 1), 1)
    return _ratio(np.where(last, (tps - prev) * prec, 0).sum(1), tps[:, -1].astype(float))


def bootstrap_ci(y, p, threshold: float, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    "{metric: [low, high]} percentile bootstrap intervals (None where undefined in most resamples)."
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    if len(y) < 2 or n_boot <= 0: return {m: None for m in BOOTSTRAP_METRICS}
    idx = np.random.default_rng(seed).integers(0, len(y), (n_boot, len(y)))
    yb, pb = y[idx], p[idx]
    pred = pb >= threshold
    tp = (pred & (yb == 1)).sum(1); fp = (pred & (yb == 0)).sum(1)
    fn = (~pred & (yb == 1)).sum(1); tn = (~pred & (yb == 0)).sum(1)
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    vals = {"accuracy": (tp + tn) / len(y), "balanced_accuracy": (sens + spec) / 2, "sensitivity": sens,
            "specificity": spec, "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn), "roc_auc": _boot_auc(yb, pb), "pr_auc": _boot_ap(yb, pb)}
    a = (1 - level) / 2 * 100
    out = {}
    for m, v in vals.items():
        v = v[~np.isnan(v)]
        out[m] = [float(np.percentile(v, a)), float(np.percentile(v, 100 - a))] if len(v) >= n_boot // 2 else None
    return out


def one_vs_rest(classes, probs, targs, threshold: float = 0.5) -> dict:
    "Per class (one vs the rest): the binary metrics at `threshold` on that class's probability."
    return {c: binary_metrics((np.asarray(targs) == i).astype(int), probs[:, i], threshold)
            for i, c in enumerate(classes)}


def group_metrics(y, p, threshold: float, groups) -> list[dict]:
    "Per value of `groups` (source, fine label...): n, positives, accuracy, sensitivity, specificity."
    df = pd.DataFrame({"y": np.asarray(y).astype(int), "p": np.asarray(p, float), "g": list(groups)})
    rows = []
    for g, part in df.groupby("g", sort=True, dropna=False):
        m = binary_metrics(part["y"].to_numpy(), part["p"].to_numpy(), threshold)
        rows.append({"group": "(none)" if pd.isna(g) or g == "" else str(g), "n": m["n"],
                     "positives": m["n_positive"], "accuracy": m["accuracy"], "sensitivity": m["sensitivity"],
                     "specificity": m["specificity"]})
    return rows
