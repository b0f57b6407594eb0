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
from .metrics import _boot_auc, binary_metrics
from .report import SYNTHETIC_BANNER, _md_table, md_to_html
from .errors import Command, RecipeError, RunFolderError
from .rundir import OUTPUTS, new_run_dir, run_status, trained_size
from .files import write_atomic, write_json

__all__ = ["METRICS", "mean_sd", "fold_predictions", "write_cv_summary", "compare_cv", "paired", "paired_auc_difference",
           "ensemble_summary", "ensemble_members"]

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


def _over_folds(folds: list[dict]) -> dict:
    "Each metric's mean ± sd over the fold rows."
    return {c: mean_sd([r[c] for r in folds]) for c in METRICS.values()}


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
            "size (px)": trained_size(d),  # fp32_size makes it the CPU's choice
            "split scored": m["split"], "run": os.path.relpath(d, cv_dir)}  # runs/<recipe>/<ts>


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
    summary = _over_folds(folds)
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
    sizes = sorted({r["size (px)"] for r in folds if r.get("size (px)")})
    if len(sizes) > 1:  # folds run on CPUs with and without bf16 units, under a recipe with fp32_size
        L += [f"**The folds trained at different input sizes ({', '.join(map(str, sizes))} px)**: the recipe's "
              "`fp32_size` applies on CPUs without bf16 units, and these folds ran on both kinds. The mean mixes "
              "two recipes; run the cv on one kind of CPU, or pass --size to fix one size everywhere.", ""]
    L += ["## Mean ± sd over folds", "", "| " + " | ".join(summary) + " |", "|" + "---|" * len(summary),
          "| " + " | ".join(_pm(s, len(folds)) for s in summary.values()) + " |", ""]
    if sources:
        src = pd.DataFrame([{**r, "ROC AUC per fold": _pm(r["ROC AUC per fold"], r["folds"])} for r in sources])
        L += ["## Within each source", "", "Every held-out image scored once, by the fold model that did not train "
              "on it. *Pooled*: all folds' predictions of the source together (they mix the fold models' "
              "calibrations); *per fold*: mean ± sd over the folds where the source had both classes. A source "
              "with one class has no AUC (n/a).", "", _md_table(src.drop(columns="folds")), ""]
    return L


# --- comparing cross-validations of several recipes on the same folds -------------------------------------------

def _read_cv(d: Path) -> tuple[dict, dict, pd.DataFrame]:
    "(sweep.json, cv.json, folds.csv) of a cv folder, or a one-line error naming it."
    if not (d / "sweep.json").is_file() or not (d / "folds.csv").is_file():
        raise RunFolderError(f"{d} is not a cv folder (no sweep.json and folds.csv)",
                             "pass folders that `cv` created, e.g. outputs/cv/best/<timestamp>", path=d)
    manifest = json.loads((d / "sweep.json").read_text())
    if not (d / "cv.json").is_file():
        raise RunFolderError(f"{d} has no finished fold yet (no cv.json)", "continue it with {command}", path=d,
                             command=Command("resume", (str(d),)))
    return manifest, json.loads((d / "cv.json").read_text()), pd.read_csv(d / "folds.csv", dtype=str,
                                                                           keep_default_na=False)


def _sizes(cv: dict, cv_dir: Path) -> set:
    "The input sizes a cv's folds trained at: cv.json's, or each fold run's config.json (an older cv.json has none)."
    return {f.get("size (px)") or (trained_size(cv_dir / f["run"]) if f.get("run") else None)
            for f in cv.get("folds", [])} - {None}


def cv_label(manifest: dict) -> str:
    "The recipe and the overrides that made a cv: `best --size 160 --balance label_in_source` (data left out)."
    extra = " ".join(f"--{k} {v}" for k, v in manifest.get("overrides", {}).items() if k != "data")
    return f"{manifest['recipe']}" + (f" {extra}" if extra else "")


def paired(base: dict, other: dict, metric: str) -> dict:
    """`other - base` of one metric over the folds both finished, paired by fold: mean, sd, n, folds ahead and
    behind, and the paired t-test's two-sided p (scipy); the verdict is 'beyond the fold noise' at p < 0.05."""
    from scipy.stats import ttest_rel
    a = {r["fold"]: r[metric] for r in base["folds"] if r[metric] is not None}
    b = {r["fold"]: r[metric] for r in other["folds"] if r[metric] is not None}
    common = [f for f in a if f in b]
    d = np.array([b[f] - a[f] for f in common], dtype=float)
    s = mean_sd(d)
    p = None
    if len(d) > 1 and np.any(d != d[0]):
        p = float(ttest_rel([b[f] for f in common], [a[f] for f in common]).pvalue)
    elif len(d) > 1 and d[0] != 0:
        p = 0.0  # the same nonzero difference on every fold
    verdict = ("n/a" if s["mean"] is None else "one fold: no spread to judge by" if s["n"] < 2
               else "within the fold noise" if p is None or p >= 0.05
               else "ahead beyond the fold noise" if s["mean"] > 0 else "behind beyond the fold noise")
    return {**s, "ahead": int((d > 0).sum()), "behind": int((d < 0).sum()), "p": p, "verdict": verdict}


def paired_auc_difference(y, p_base, p_other, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """ROC AUC(p_other) - AUC(p_base) on the same films, with its percentile interval over bootstrap resamples of the
    films drawn within each class (the same resample for both, so the difference is paired). None without both
    classes."""
    y, a, b = np.asarray(y).astype(int), np.asarray(p_base, float), np.asarray(p_other, float)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if not len(pos) or not len(neg): return {"difference": None, "low": None, "high": None, "n_boot": 0}
    rng = np.random.default_rng(seed)
    idx = np.concatenate([np.stack([pos[rng.integers(0, len(pos), len(pos))] for _ in range(n_boot)]),
                          np.stack([neg[rng.integers(0, len(neg), len(neg))] for _ in range(n_boot)])], axis=1)
    diffs = _boot_auc(y[idx], b[idx]) - _boot_auc(y[idx], a[idx])  # one resample of films for both: paired
    lo, hi = np.percentile(diffs, [50 * (1 - level), 50 * (1 + level)])
    point = _boot_auc(y[None], b[None]) - _boot_auc(y[None], a[None])
    return {"difference": float(point[0]), "low": float(lo), "high": float(hi), "n_boot": n_boot}


def _pooled_predictions(d: Path, manifest: dict, table: pd.DataFrame) -> pd.DataFrame:
    "Every held-out film of a cv's finished folds: file, source, y, p."
    done = [it for it in manifest["runs"] if run_status(it["run_dir"]) == "complete"]
    return pd.concat([fold_predictions(it, table) for it in done], ignore_index=True)


def _source_differences(base: pd.DataFrame, other: pd.DataFrame) -> dict:
    "{source: paired_auc_difference} over the films both cvs scored, for each source with both classes."
    both = base.merge(other[["file", "p"]], on="file", suffixes=("", "_other"))
    return {src: paired_auc_difference(g["y"], g["p"], g["p_other"])
            for src, g in both[both["source"] != ""].groupby("source") if g["y"].nunique() == 2}


def ensemble_summary(pooled: list[pd.DataFrame], table: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """The cv summary (folds, mean_sd, sources) of the mean of several cvs' probabilities, film by film, on the
    films every one of them scored: the cross-validation of their ensemble, without training anything."""
    mean = pooled[0][["file", "label", "source", "y"]].copy()
    for i, p in enumerate(pooled): mean = mean.merge(p[["file", "p"]].rename(columns={"p": f"p{i}"}), on="file")
    mean["p"] = mean[[f"p{i}" for i in range(len(pooled))]].mean(axis=1)
    mean = mean.merge(table[["file", "fold"]], on="file")
    by_fold = list(mean.groupby("fold", sort=True))
    folds = [{"fold": tag, **{METRICS[k]: m[k] for k in METRICS}}
             for tag, g in by_fold for m in [binary_metrics(g["y"], g["p"], 0.5)]]
    summary = {"folds": folds, "folds_finished": len(folds), "folds_planned": table["fold"].nunique(),
               "mean_sd": _over_folds(folds), "sources": _source_rows([g for _, g in by_fold])}
    return summary, mean[["file", "label", "source", "y", "p"]]


def _sources_side_by_side(names: list[str], summaries: list[dict]) -> list[dict]:
    "One row per source: its n / positives, then 'pooled AUC / accuracy (0.5)' under each cv's number."
    def row_of(c, s): return next((r for r in c["sources"] if r["source"] == s), None)
    rows = []
    for s in sorted({r["source"] for c in summaries for r in c["sources"]}):
        row = {"source": s, "n / positives": next(f"{r['n']} / {r['positives']}" for c in summaries
                                                   if (r := row_of(c, s)))}
        for n, c in zip(names, summaries):
            r = row_of(c, s) or {}
            auc, acc = r.get("ROC AUC pooled"), r.get("accuracy (0.5)")
            row[n.split(":")[0]] = ("n/a" if auc is None else f"{auc:.4f}") + " / " + (
                "n/a" if acc is None else f"{acc:.4f}")
        rows.append(row)
    return rows


def _comparison_markdown(title, folds_said, names, dirs, means, diffs, src_rows, src_diffs) -> list[str]:
    L = [f"# {title}", "", f"Baseline: **{names[0]}**. The same folds in every cv ({folds_said}), so each difference "
         "is paired by fold. Metrics as in each cv.md: on the held-out part, at p = 0.5 where a threshold is needed, "
         "never chosen on it.", ""]
    L += ["## Mean ± sd over folds", "", _md_table(pd.DataFrame(means).drop(columns="folder")), ""]
    L += ["## Difference from the baseline, fold by fold", "",
          "mean ± sd over folds of (this cv − baseline); ahead/behind: folds where it is higher/lower; p: paired "
          "t-test, two-sided. *Beyond the fold noise* means p < 0.05; anything else is not a result.", ""]
    rows = [{"cv": n, "metric": k, "difference": _pm(s, s["n"]),
             "ahead / behind": f"{s['ahead']} / {s['behind']} of {s['n']}",
             "p": "n/a" if s["p"] is None else f"{s['p']:.3f}", "verdict": s["verdict"]}
            for n, per in diffs.items() for k, s in per.items()]
    L += [_md_table(pd.DataFrame(rows)), ""]
    if src_rows:
        L += ["## Within each source: ROC AUC pooled / accuracy (0.5)", "", "Columns are the cvs by number. "
              "Pooled over folds (every held-out image scored once by the fold model that did not train on it).", "",
              _md_table(pd.DataFrame(src_rows)), ""]
    diff_rows = [{"source": src, **{n.split(":")[0]: ("n/a" if (r := per.get(src)) is None else
                                                      f"{r['difference']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]")
                                    for n, per in src_diffs.items()}}
                 for src in sorted({s for per in src_diffs.values() for s in per})]
    if diff_rows:
        L += ["## Within each source: ROC AUC difference from the baseline", "", "On the films both cvs scored, "
              "pooled over folds; in brackets the 95% interval of a paired bootstrap (2,000 resamples of the films, "
              "within each class). An interval that holds 0 is not a result. A source with few films of one class "
              "gives a wide interval: that is its real uncertainty.", "", _md_table(pd.DataFrame(diff_rows)), ""]
    return L + ["Folders:", ""] + [f"- {n}: `{d}`" for n, d in zip(names, dirs)] + [""]


def ensemble_members(ensemble, n: int) -> list[int]:
    """Which of `n` cvs (0 = the baseline) an `ensemble` choice averages: False/None none, True all, or their
    positions ((1, 2, 3) or '1,2,3': an ensemble of other recipes set against the baseline)."""
    if ensemble is None or ensemble is False: return []
    if ensemble is True: return list(range(n))
    try:
        idx = [int(i) for i in (str(ensemble).split(",") if isinstance(ensemble, str) else
                                (ensemble if isinstance(ensemble, (tuple, list)) else [ensemble]))]
    except ValueError:
        idx = []
    if len(set(idx)) < 2 or not all(0 <= i < n for i in idx):
        raise RecipeError(f"--ensemble {ensemble!r}: give two or more positions of the cvs, from 0 (the baseline) to "
                          f"{n - 1}", "e.g. --ensemble 1,2,3, or --ensemble alone for all of them")
    return sorted(set(idx))


def compare_cv(cv_dirs, out=None, ensemble: bool | tuple | str = False) -> Path:
    """cv_comparison.md/.json/.html: cross-validations of several recipes side by side, the first as the baseline.
    Each metric's mean ± sd over folds, each later cv's per-fold difference from the first (paired, so it needs
    the same folds: the same --folds or --by, and --fold_seed, on the same data), and the within-source ROC AUC
    and accuracy (pooled) of every cv. `ensemble`: one more row, the mean of their probabilities film by film
    (`ensemble_summary`), compared with the baseline the same way: True for all of them, or the positions of the
    members (`ensemble_members`). Written in `<out>/comparisons/<timestamp>/`; returns the .md's path."""
    dirs = [Path(d).expanduser() for d in cv_dirs]
    if len(dirs) < 2: raise RunFolderError("compare needs two cv folders or more, the baseline first",
                                           "e.g. compare outputs/cv/best/A outputs/cv/best/B")
    cvs = [(d, *_read_cv(d)) for d in dirs]
    base_d, base_m, _, base_t = cvs[0]
    for d, m, _, t in cvs[1:]:
        same = (m["by"] == base_m["by"] and len(t) == len(base_t)
                and t.set_index("file")["fold"].sort_index().equals(base_t.set_index("file")["fold"].sort_index()))
        if not same:
            raise RunFolderError(f"{d} holds out other folds than {base_d}, so they cannot be compared fold by fold",
                                 f"run both with the same --folds/--by and --fold_seed on the same data", path=d)
    names = [f"{i}: {cv_label(m)}" for i, (_, m, _, _) in enumerate(cvs)]
    pooled = [_pooled_predictions(d, m, t) for d, m, _, t in cvs]
    sizes = [_sizes(c, d) for d, _, c, _ in cvs]
    members = ensemble_members(ensemble, len(cvs))
    if members:
        sizes.append(set().union(*(sizes[i] for i in members)))
        summary, mean = ensemble_summary([pooled[i] for i in members], base_t)
        said = f"0-{len(cvs) - 1}" if members == list(range(len(cvs))) else ", ".join(map(str, members))
        names.append(f"E: mean of the probabilities of cvs {said}")
        cvs.append((Path("(computed from the cvs above)"), base_m, summary, base_t))
        pooled.append(mean)
    means = [{"cv": n, "folder": str(d), "folds": f"{c['folds_finished']} of {c['folds_planned']}",
              **{k: _pm(c["mean_sd"][k], c["folds_finished"]) for k in METRICS.values()},
              "size (px)": ", ".join(map(str, sorted(z))) or "n/a"}
             for n, (d, m, c, _), z in zip(names, cvs, sizes)]
    diffs = {n: {k: paired(cvs[0][2], c, k) for k in METRICS.values()} for n, (_, _, c, _) in zip(names[1:], cvs[1:])}
    src_rows = _sources_side_by_side(names, [c for _, _, c, _ in cvs])
    src_diffs = {n: _source_differences(pooled[0], p) for n, p in zip(names[1:], pooled[1:])}
    out_dir = new_run_dir((Path(out) if out is not None else OUTPUTS).expanduser(), "comparisons")
    loso = base_m["by"] == "source"
    title = f"Comparison of {len(cvs)} cross-validations ({'leave one source out' if loso else base_m['title']})"
    folds_said = "one per source" if loso else f"{base_m['folds']} patient folds, fold seed {base_m['fold_seed']}"
    L = _comparison_markdown(title, folds_said, names, [d for d, _, _, _ in cvs], means, diffs, src_rows, src_diffs)
    md = "\n".join(L)
    write_json(out_dir / "cv_comparison.json", {"title": title, "baseline": names[0], "means": means,
                                                "differences": diffs, "sources": src_rows,
                                                "source_auc_differences": src_diffs})
    write_atomic(out_dir / "cv_comparison.md", md)
    write_atomic(out_dir / "cv_comparison.html", md_to_html(md, out_dir, title))
    return out_dir / "cv_comparison.md"
