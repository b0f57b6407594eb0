"""The summary of a cross-validation: cv.json, cv.csv, cv.md and cv.html from its finished fold runs.

Per fold (from the run's metrics.json on its held-out fold): accuracy, ROC AUC and sensitivity at specificity
>= 0.95, sensitivity and specificity at p = 0.5, then mean ± sd over folds. Per source (from the runs'
predictions.csv joined to folds.csv): the within-source ROC AUC, pooled over folds and as mean ± sd over the folds
where the source has both classes. No decision threshold is chosen here: one chosen on the held-out fold itself
(a run folder's "at threshold" numbers) would flatter it.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .labels import relative_name
from .metrics import binary_metrics
from .report import SYNTHETIC_BANNER, _md_table, md_to_html
from .rundir import run_status
from .files import write_atomic, write_json

__all__ = ["METRICS", "mean_sd", "fold_predictions", "write_cv_summary"]

# metrics.json key (under at_0.5, or top level) -> column name
METRICS = {"accuracy": "accuracy", "roc_auc": "ROC AUC", "sens_at_spec95": "sensitivity at specificity >= 0.95",
           "sensitivity": "sensitivity (0.5)", "specificity": "specificity (0.5)"}


def mean_sd(values) -> dict:
    "{'mean', 'sd', 'n'} over the defined values (sd: sample standard deviation, None below 2 values)."
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return {"mean": float(np.mean(v)) if v else None, "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None,
            "n": len(v)}


def _pm(s: dict, of: int) -> str:
    "mean ± sd as the tables show it, with the count when some folds had no value."
    if s["mean"] is None: return "n/a"
    txt = f"{s['mean']:.4f} ± {s['sd']:.4f}" if s["sd"] is not None else f"{s['mean']:.4f}"
    return txt + (f" ({s['n']} of {of})" if s["n"] < of else "")


def _positive(pred: pd.DataFrame, pos: str, classes: list) -> np.ndarray:
    "y in {0, 1}: the positive view of metrics.positive_view (infected = not normal with three classes)."
    return (pred["true"] == pos if pos in classes else pred["true"].str.lower() != "normal").to_numpy().astype(int)


def fold_predictions(item: dict, table: pd.DataFrame) -> pd.DataFrame:
    "A finished fold run's held-out predictions with each image's file, label and source (from folds.csv): y, p."
    d = Path(item["run_dir"])
    m = json.loads((d / "metrics.json").read_text())
    cfg = json.loads((d / "config.json").read_text())
    pred = pd.read_csv(d / "predictions.csv", dtype={"true": str})
    view = Path(cfg["data"]["path"])
    mine = table[table["fold"] == item["tag"]]
    key = dict(zip("valid/" + mine["label"] + "/" + mine["link"], mine.index))
    rows = [key.get(relative_name(f, view)) for f in pred["file"]]
    if any(r is None for r in rows):
        raise ValueError(f"{d}/predictions.csv has images that fold {item['tag']} does not hold out")
    out = table.loc[rows, ["file", "label", "source"]].reset_index(drop=True)
    out["y"] = _positive(pred, m["positive_class"], cfg["data"]["classes"])
    out["p"] = pred[f"p_{m['positive_class']}"].to_numpy()
    return out


def _fold_row(item: dict, cv_dir: Path) -> dict:
    d = Path(item["run_dir"])
    m = json.loads((d / "metrics.json").read_text())
    a = m["at_0.5"]
    f = item["fold"]
    return {"fold": item["tag"], "held out": f["held_out"], "n train": f["n_train"], "n held out": m["n"],
            "positives": a["n_positive"], **{METRICS[k]: (m if k == "accuracy" else a)[k] for k in METRICS},
            "split scored": m["split"], "run": os.path.relpath(d, cv_dir)}  # runs/<recipe>/<timestamp>


def _source_rows(preds: list[pd.DataFrame]) -> list[dict]:
    "Per source: pooled n, positives, accuracy and ROC AUC; AUC mean ± sd over the folds where it has both classes."
    rows = []
    allp = pd.concat([p.assign(k=i) for i, p in enumerate(preds)]) if preds else pd.DataFrame()
    for src, part in (allp[allp["source"] != ""].groupby("source") if len(allp) else []):
        pooled = binary_metrics(part["y"], part["p"], 0.5)
        per_fold = [binary_metrics(g["y"], g["p"])["roc_auc"] for _, g in part.groupby("k")]
        rows.append({"source": src, "n": pooled["n"], "positives": pooled["n_positive"],
                     "accuracy (0.5)": pooled["accuracy"], "sensitivity (0.5)": pooled["sensitivity"],
                     "specificity (0.5)": pooled["specificity"], "ROC AUC pooled": pooled["roc_auc"],
                     "ROC AUC per fold": mean_sd(per_fold), "folds": len(per_fold)})
    return rows


def write_cv_summary(cv_dir, manifest: dict) -> Path:
    "cv.json, cv.csv, cv.md and cv.html of the folds finished so far; returns cv.md's path."
    cv_dir = Path(cv_dir)
    done = [it for it in manifest["runs"] if run_status(it["run_dir"]) == "complete"]
    if not done: return cv_dir / "cv.md"
    table = pd.read_csv(cv_dir / "folds.csv", dtype=str, keep_default_na=False)
    folds = [_fold_row(it, cv_dir) for it in done]
    preds = [fold_predictions(it, table) for it in done]
    summary = {c: mean_sd([r[c] for r in folds]) for c in METRICS.values()}
    sources = _source_rows(preds)
    synthetic = json.loads((Path(done[0]["run_dir"]) / "config.json").read_text())["data"]["synthetic"]
    n, loso = len(manifest["runs"]), manifest["by"] == "source"
    title = manifest["title"] + ("" if len(done) == n else f": {len(done)} of {n} folds finished")
    write_json(cv_dir / "cv.json", {"title": title, "by": manifest["by"], "data": manifest["data"],
                                    "folds_planned": n, "folds_finished": len(done), "folds": folds,
                                    "mean_sd": summary, "sources": sources, "synthetic": synthetic})
    pd.DataFrame(folds).to_csv(cv_dir / "cv.csv", index=False)
    md = "\n".join(_markdown(title, manifest, table, folds, summary, sources, synthetic, loso))
    write_atomic(cv_dir / "cv.md", md)
    write_atomic(cv_dir / "cv.html", md_to_html(md, cv_dir, title))
    return cv_dir / "cv.md"


def _markdown(title, manifest, table, folds, summary, sources, synthetic, loso) -> list[str]:
    n_groups = table["group"].nunique()
    L = [f"# {title}", ""]
    if synthetic: L += [f"> **{SYNTHETIC_BANNER}** These numbers mean nothing about X-rays.", ""]
    L += [f"Data: train + valid of `{manifest['data']}` ({len(table)} images, {n_groups} patients or ungrouped "
          "images); the test split was not read. Each fold trains a normal run (its folder, under this one, is in "
          "the table) and scores the part it held out. Accuracy, sensitivity and specificity are at p = 0.5 (no threshold is "
          "chosen on the held-out part); sensitivity at specificity >= 0.95 is read off the fold's own ROC curve, "
          "threshold-free like the AUC. ± is the sample standard deviation over folds.", ""]
    if loso:
        one = [r["held out"] for r in folds if r["ROC AUC"] is None]
        L += ["Leave one source out: each fold trains without one source and scores that source only (images "
              "without a source always train; films of a patient also seen in the held-out source are left out "
              "of that fold's training)." + (f" {', '.join(one)} held one class only: no ROC AUC nor sensitivity "
              "at specificity; its accuracy is its sensitivity (all positive) or its specificity (all negative)."
              if one else ""), ""]
    else:
        merged = sorted(set(table.loc[table["stratum"] != table["label"] + "|" + table["source"], "stratum"]))
        L += [f"Folds: scikit-learn StratifiedGroupKFold ({manifest['folds']} folds, shuffled, seed "
              f"{manifest['fold_seed']}) over patients, stratified by label and source"
              + (f"; label|source strata with fewer patients than folds were merged into {', '.join(merged)}"
                 if merged else "") + ". Patients never cross folds; folds.csv lists every image's fold.", ""]
    show = [c for c in folds[0] if c not in ("split scored",)]
    L += ["## Per fold", "", _md_table(pd.DataFrame(folds)[show]), ""]
    L += ["## Mean ± sd over folds", "", "| " + " | ".join(summary) + " |", "|" + "---|" * len(summary),
          "| " + " | ".join(_pm(s, len(folds)) for s in summary.values()) + " |", ""]
    if sources:
        src = pd.DataFrame([{**r, "ROC AUC per fold": _pm(r["ROC AUC per fold"], r["folds"])} for r in sources])
        L += ["## Within each source", "", "Every held-out image scored once, by the fold model that did not train "
              "on it. *Pooled*: all folds' predictions of the source together (they mix the fold models' "
              "calibrations); *per fold*: mean ± sd over the folds where the source had both classes. A source "
              "with one class has no AUC (n/a).", "", _md_table(src.drop(columns="folds")), ""]
    return L
