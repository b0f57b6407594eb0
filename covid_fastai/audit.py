"""Shortcut audit: how far a data set lets a model, and how far a trained run does, read where an image came from
(its `source`) instead of the lungs (DeGrave, Janizek and Lee, Nature Machine Intelligence 2021).

Before training (`audit_data`): the label x source table, Cramér's V and the source-only rule; sources missing
from train; a source classifier on frozen ImageNet features; image statistics that alone separate the classes.
After training (`audit_run`, computed in `occlusion`): AUC within each source against the pooled AUC, occlusion
of the test images, and where the Grad-CAM mass lies. `audit_report` writes audit.md and audit.html.

The thresholds that raise a flag are data (`THRESHOLDS`), each with its reason; docs/audit.md explains them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from pathlib import Path
from scipy import ndimage
from scipy.stats.contingency import association
from sklearn import metrics as skm

from .data import XrayFolders, find_xray_folders
from .errors import DataError
from .images import open_xray
from .labels import join_labels

__all__ = ["audit_data", "audit_run", "data_audit", "THRESHOLDS", "source_frame", "confounding", "split_coverage", "image_stats", "stats_frame",
           "separating_stats", "source_from_pixels", "data_audit", "auc_or_none", "positive_class"]

# What raises a flag, and why (docs/audit.md).
THRESHOLDS = {
    # the source-only rule beats "always the majority class" by 10 points: the source alone is worth 10 points
    "source_rule_gain": 0.10,
    # a linear probe on frozen ImageNet features names the source of 4 validation images in 5 (balanced), or agrees
    # with the true source with Cohen's kappa 0.6 ("substantial": small sources drag balanced accuracy down)
    "source_pixels_balanced_accuracy": 0.80,
    "source_pixels_kappa": 0.60,
    # a source of at least 20 images that is 90% one class: inside it, the source alone gives the label
    "one_class_source_share": 0.90,
    # one image statistic alone separates the classes this well (max(AUC, 1 - AUC)), as the issue asks
    "stat_auc": 0.80,
    # pooled AUC above the mean within-source AUC by 0.05: part of the score comes from telling sources apart
    "pooled_minus_within_auc": 0.05,
    # the AUC with the lungs masked is still this high: the model reads something outside them
    "lungs_masked_auc": 0.75,
    # masking only borders and corners costs this much AUC: the model leans on what lies there
    "corners_masked_auc_drop": 0.10,
}
STATS = ("width", "height", "aspect_ratio", "mean_intensity", "border_fraction", "edge_marker_components")
NO_SOURCE = "(none)"  # images that labels.csv does not list, or lists without a source


def source_frame(folders: XrayFolders) -> pd.DataFrame:
    """One row per image of every split: file, split, label (its class folder), source (from labels.csv).
    A `DataError` when labels.csv or its source column is missing."""
    labels = folders.labels
    csv = Path(folders.root) / "labels.csv"
    if labels is None:
        raise DataError(f"{csv} does not exist", "audit needs labels.csv with a source column (one row per image: "
                        "file, label, source)", path=csv)
    if "source" not in labels.columns:
        raise DataError(f"{csv} has no source column (columns: {', '.join(labels.columns)})",
                        "add one naming where each image came from (hospital, archive or data set)", path=csv)
    rows = [(f, s, c) for s in folders.splits for c in folders.classes for f in folders.splits[s].get(c, [])]
    files = [r[0] for r in rows]
    src = join_labels(files, folders.root, labels, columns=("source",))["source"]
    return pd.DataFrame({"file": files, "split": [r[1] for r in rows], "label": [r[2] for r in rows],
                         "source": [s or NO_SOURCE for s in src]})


def positive_class(classes) -> str:
    "The class the AUCs score (as `metrics.positive_view`): infected, else the class that is not normal, else the first."
    low = [str(c).lower() for c in classes]
    if "infected" in low: return classes[low.index("infected")]
    if "normal" in low and len(classes) == 2: return classes[1 - low.index("normal")]
    return classes[0]


def _rule_accuracy(fit: pd.DataFrame, score: pd.DataFrame) -> float:
    "Accuracy on `score` of predicting each source's majority label in `fit` (its overall majority for new sources)."
    majority = fit.groupby("source")["label"].agg(lambda s: s.value_counts().index[0])
    fallback = fit["label"].value_counts().index[0]
    pred = score["source"].map(majority).fillna(fallback)
    return float((pred == score["label"]).mean())


def confounding(df: pd.DataFrame) -> dict:
    """Label x source counts, Cramér's V, the source-only rule's accuracy and the majority-class rate, overall
    (the rule fitted on all images) and per split (the rule fitted on train: what a model could learn)."""
    table = pd.crosstab(df["source"], df["label"])
    v = float(association(table.to_numpy(), method="cramer")) if min(table.shape) > 1 else 0.0
    out = {"table": {s: {c: int(n) for c, n in row.items()} for s, row in table.iterrows()},
           "cramers_v": v, "n": len(df),
           "source_rule_accuracy": _rule_accuracy(df, df),
           "majority_rate": float(df["label"].value_counts(normalize=True).iloc[0]), "splits": {}}
    train = df[df["split"] == "train"]
    for split, part in df.groupby("split", sort=False):
        t = pd.crosstab(part["source"], part["label"])
        out["splits"][split] = {
            "n": len(part), "table": {s: {c: int(n) for c, n in row.items()} for s, row in t.iterrows()},
            "cramers_v": float(association(t.to_numpy(), method="cramer")) if min(t.shape) > 1 else 0.0,
            "source_rule_accuracy": _rule_accuracy(train, part),
            "majority_rate": float(part["label"].value_counts(normalize=True).iloc[0])}
    out["one_class_sources"] = [{"source": s, "n": int(row.sum()), "label": row.idxmax(), "share": float(row.max() / row.sum())}
                                for s, row in table.iterrows()
                                if row.sum() >= 20 and row.max() / row.sum() >= THRESHOLDS["one_class_source_share"]]
    out["source_rule_gain"] = out["source_rule_accuracy"] - out["majority_rate"]
    out["label_from_source"] = out["source_rule_gain"] >= THRESHOLDS["source_rule_gain"]
    return out


def split_coverage(df: pd.DataFrame) -> list[dict]:
    "Sources present in valid or test but absent from train: a model meets them for the first time when scored."
    train = set(df.loc[df["split"] == "train", "source"])
    return [{"split": s, "source": src, "n": int(n)}
            for (s, src), n in df[df["split"] != "train"].groupby(["split", "source"]).size().items()
            if src not in train]


# --- image statistics ---------------------------------------------------------------------------------------------

def _border_fraction(a: np.ndarray, std_max: float = 3.0) -> float:
    "Share of the image in uniform rows/columns at its edges (letterbox, padding): counted inwards from each side."
    h, w = a.shape
    row_flat, col_flat = a.std(1) < std_max, a.std(0) < std_max

    def run(flat):  # uniform lines from the start, at most half
        n = np.argmin(flat) if not flat.all() else len(flat)
        return min(int(n), len(flat) // 2)
    top, bottom, left, right = run(row_flat), run(row_flat[::-1]), run(col_flat), run(col_flat[::-1])
    return 1.0 - max(h - top - bottom, 0) * max(w - left - right, 0) / (h * w)


def _edge_markers(a: np.ndarray, band: float = 0.15) -> int:
    """Bright small connected components whose centre lies in the outer `band` of the image: letters, arrows and
    lead markers. Bright = at least the 99.5th percentile and 180; small = 0.005%-1% of the image."""
    h, w = a.shape
    bright = a >= max(float(np.percentile(a, 99.5)), 180.0)
    lab, n = ndimage.label(bright)
    if n == 0: return 0
    idx = np.arange(1, n + 1)
    area = ndimage.sum_labels(bright, lab, idx)
    cy, cx = np.array(ndimage.center_of_mass(bright, lab, idx)).T
    small = (area >= max(2, 5e-5 * h * w)) & (area <= 0.01 * h * w)
    edge = (cy < band * h) | (cy > (1 - band) * h) | (cx < band * w) | (cx > (1 - band) * w)
    return int((small & edge).sum())


def image_stats(path, side: int = 256) -> dict:
    """Size, aspect ratio, mean intensity (0-255), border fraction and edge-marker count of one image; the last three
    on a copy with short side `side`, so that big files cost no more than small ones."""
    im = open_xray(path, min_side=side)
    w, h = im.size
    if min(w, h) > side: im = im.resize((round(w * side / min(w, h)), round(h * side / min(w, h))))
    a = np.asarray(im, dtype=np.float32)
    return {"width": w, "height": h, "aspect_ratio": w / h, "mean_intensity": float(a.mean()),
            "border_fraction": _border_fraction(a), "edge_marker_components": _edge_markers(a)}


def stats_frame(df: pd.DataFrame) -> pd.DataFrame:
    "`df` (file, split, label, source) with the `image_stats` columns."
    return pd.concat([df.reset_index(drop=True), pd.DataFrame([image_stats(f) for f in df["file"]])], axis=1)


def auc_or_none(y, score) -> float | None:
    "ROC AUC of `score` for binary `y`; None with one class."
    y = np.asarray(y)
    return float(skm.roc_auc_score(y, score)) if len(np.unique(y)) == 2 else None


def separating_stats(stats: pd.DataFrame, positive: str) -> list[dict]:
    "Per statistic: max(AUC, 1 - AUC) for the positive class against the rest, and whether it passes the threshold."
    y = (stats["label"] == positive).astype(int)
    out = []
    for s in STATS:
        auc = auc_or_none(y, stats[s].astype(float))
        sep = None if auc is None else max(auc, 1 - auc)
        out.append({"statistic": s, "auc": sep, "higher_in": None if auc is None or auc == 0.5 else
                    (positive if auc > 0.5 else "the rest"),
                    "flag": sep is not None and sep > THRESHOLDS["stat_auc"]})
    return out


# --- is the source visible in the pixels? ------------------------------------------------------------------------

def _frozen_features(folders: XrayFolders, arch: str, size: int, pretrained: bool, bs: int):
    """(train features, valid features, train items, valid items, weights provenance) from the frozen body of
    `arch` (ImageNet weights when `pretrained`), one deterministic view per image (`features.body_features`),
    kept in the feature cache under a key of everything they depend on (`features.feature_cache_key`)."""
    from safetensors.torch import load_file, save_file
    from .cache import cache_dir
    from .augment import make_aug
    from .data import xray_dls
    from .features import body_features, feature_cache_key, split_head
    from .files import atomic_path
    from .models import xray_learner
    from fastai.vision.all import set_seed
    aug = make_aug("none", size)
    dls = xray_dls(folders, aug, bs=bs, seed=0, num_workers=0)
    set_seed(0)  # a random-init body (pretrained false) is the same body each time, as its cache key says
    learn = xray_learner(dls, arch, pretrained=pretrained, head="linear")
    pre_pool, _ = split_head(learn.model[1])
    items = list(dls.train.items), list(dls.valid.items)
    key = feature_cache_key(arch, learn.weights_provenance.get("sha256", learn.weights_provenance.get("source")),
                            items[0], items[1], size, aug.resize_to, "none", 1, 0, "audit " + repr(pre_pool),
                            bn_train=False)
    path = cache_dir() / "features" / f"audit-{key}.safetensors"
    if path.exists():
        try:
            t = load_file(path)
            return t["train"].float().numpy(), t["valid"].float().numpy(), *items, learn.weights_provenance
        except Exception: path.unlink(missing_ok=True)  # torn or foreign: recompute
    t = {"train": body_features(learn, dls.train.new(shuffle=False, drop_last=False), pre_pool, False)[0],
         "valid": body_features(learn, dls.valid.new(shuffle=False, drop_last=False), pre_pool, False)[0]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp: save_file({k: v.float().contiguous() for k, v in t.items()}, str(tmp))
    return t["train"].numpy(), t["valid"].numpy(), *items, learn.weights_provenance


def source_from_pixels(folders: XrayFolders, df: pd.DataFrame, arch: str = "tf_efficientnet_lite0.in1k",
                       size: int = 224, pretrained: bool = True, bs: int = 64) -> dict:
    """A logistic regression from frozen ImageNet features to the source, fitted on train, scored on the validation
    split (or the part of train the library holds out): balanced accuracy against chance (1 / sources)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    xt, xv, it, iv, prov = _frozen_features(folders, arch, size, pretrained, bs)
    source = dict(zip(map(str, df["file"]), df["source"]))
    yt, yv = np.array([source[str(f)] for f in it]), np.array([source[str(f)] for f in iv])
    base = {"arch": arch, "size": size, "weights": prov.get("source"), "n_train": len(yt), "n_valid": len(yv)}
    if len(set(yt)) < 2:
        return {**base, "balanced_accuracy": None, "note": "train has one source: nothing to tell apart"}
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
    clf.fit(xt, yt)
    pred = clf.predict(xv)
    known = np.isin(yv, clf.classes_)  # a source unseen in train cannot be named: scored on the others
    sources = sorted(set(yv[known]))
    bacc = float(skm.balanced_accuracy_score(yv[known], pred[known])) if len(sources) > 1 else None
    recall = {s: float((pred[yv == s] == s).mean()) for s in sources}
    kappa = float(skm.cohen_kappa_score(yv[known], pred[known])) if len(sources) > 1 else None
    return {**base, "balanced_accuracy": bacc, "chance": 1 / len(sources) if sources else None,
            "accuracy": float((pred[known] == yv[known]).mean()) if known.any() else None,
            "majority_source_rate": float(pd.Series(yv[known]).value_counts(normalize=True).iloc[0]) if known.any()
            else None, "kappa": kappa, "recall": recall,
            "source_from_pixels": bacc is not None and (bacc >= THRESHOLDS["source_pixels_balanced_accuracy"] or
                                                        kappa >= THRESHOLDS["source_pixels_kappa"])}


def data_audit(data, arch: str = "tf_efficientnet_lite0.in1k", size: int = 224, pretrained: bool = True,
               bs: int = 64) -> tuple[dict, pd.DataFrame]:
    "(findings, per-image frame with statistics) of the pre-training audit of the folder `data`."
    folders = find_xray_folders(data)
    df = source_frame(folders)
    pos = positive_class(folders.classes)
    conf = confounding(df)
    stats = stats_frame(df)
    seps = separating_stats(stats, pos)
    pixels = source_from_pixels(folders, df, arch, size, pretrained, bs)
    missing = split_coverage(df)
    flags = []
    if conf["label_from_source"]:
        flags.append(f"the label is predictable from the source: the source-only rule scores "
                     f"{conf['source_rule_accuracy']:.3f} against {conf['majority_rate']:.3f} for the majority class")
    if pixels.get("source_from_pixels"):
        flags.append(f"the source is visible in the pixels: a linear probe on frozen {arch} features "
                     f"({pixels['weights']} weights) names it with balanced accuracy "
                     f"{pixels['balanced_accuracy']:.3f} (chance {pixels['chance']:.3f}), accuracy "
                     f"{pixels['accuracy']:.3f} (largest source {pixels['majority_source_rate']:.3f}), "
                     f"Cohen's kappa {pixels['kappa']:.3f}")
    for o in conf["one_class_sources"]:
        flags.append(f"source {o['source']} is {o['share']:.0%} {o['label']} ({o['n']} images): inside it the source "
                     f"gives the label")
    for m in missing:
        flags.append(f"source {m['source']} is in {m['split']} ({m['n']} images) but not in train")
    for s in seps:
        if s["flag"]: flags.append(f"{s['statistic']} alone separates the classes: AUC {s['auc']:.3f}")
    shortcut = bool(conf["label_from_source"] and pixels.get("source_from_pixels"))
    # part of the data: sources that give the label, visible in the pixels
    partial = [o["source"] for o in conf["one_class_sources"]] if pixels.get("source_from_pixels") else []
    medians = stats.groupby(["source", "label"])[list(STATS)].median().reset_index()
    return ({"data": str(folders.root), "classes": folders.classes, "positive": pos, "confounding": conf,
             "missing_from_train": missing, "pixels": pixels, "separating_stats": seps,
             "stat_medians": medians.to_dict("records"), "shortcut": shortcut,
             "partial_shortcut": partial, "flags": flags,
             "thresholds": THRESHOLDS}, stats)


def audit_data(data, out=None, arch: str = "tf_efficientnet_lite0.in1k", size: int = 224, pretrained: bool = True,
               bs: int = 64) -> Path:
    """Audit a data folder before training; writes `<out>/audits/<timestamp>/` (audit.md, audit.html, audit.json,
    image_stats.csv, confound.png) and returns it. `out` defaults to the outputs folder.

    arch, size, pretrained: the frozen body whose features the source probe reads (ImageNet weights by default)."""
    from .audit_report import write_data_audit
    from .learner import resolve_data
    from .rundir import OUTPUTS, new_run_dir
    findings, stats = data_audit(resolve_data(str(data)), arch=arch, size=size, pretrained=pretrained, bs=bs)
    out_dir = new_run_dir(Path(out) if out else OUTPUTS, "audits")  # a fresh folder: never overwrites
    write_data_audit(out_dir, findings, stats)
    return out_dir


def audit_run(run_dir, data, out=None) -> Path:
    """Audit a finished run on the test split of `data`; writes `RUN_DIR/audits/<timestamp>/` (or under `out`):
    audit.md, audit.html, audit.json, predictions.csv and plots, and returns it."""
    from .audit_report import write_run_audit
    from .learner import resolve_data
    from .rundir import new_run_dir
    from .occlusion import run_audit
    findings, preds = run_audit(run_dir, resolve_data(str(data)))
    out_dir = new_run_dir(Path(out) if out else Path(run_dir), "audits")
    write_run_audit(out_dir, findings, preds)
    if out is None:  # the run's model card names its audits: write it again with this one
        from .modelcard import write_model_card
        write_model_card(run_dir)
    return out_dir
