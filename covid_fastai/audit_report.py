"""The audit's files: audit.md, a self-contained audit.html (plots embedded), audit.json and the per-image CSV.

Plots are drawn on explicit `matplotlib.figure.Figure` objects (no pyplot state) and written atomically.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .files import atomic_path, write_atomic, write_json

__all__ = ["write_data_audit", "write_run_audit", "plot_confounding", "plot_roc_by_source", "plot_occlusion"]

_THRESHOLD_NOTE = ("Flags are raised at fixed thresholds (`covid_fastai.audit.THRESHOLDS`): the source-only rule "
                   "beats the majority class by {source_rule_gain:.2f} or more; the source probe's balanced accuracy "
                   "is {source_pixels_balanced_accuracy:.2f} or more, or its Cohen's kappa {source_pixels_kappa:.2f} "
                   "or more; a source of 20 images or more is {one_class_source_share:.0%} one class; one image statistic separates the classes with "
                   "AUC above {stat_auc:.2f}; pooled AUC exceeds the mean within-source AUC by {pooled_minus_within_auc:.2f} "
                   "or more; AUC with the lungs masked is {lungs_masked_auc:.2f} or more; masking borders and corners "
                   "costs {corners_masked_auc_drop:.2f} AUC or more. See docs/audit.md.")


def _f(v, d: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)): return "n/a"
    return f"{v:.{d}f}"


def _signed(v) -> str: return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.3f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]


def _save(fig: Figure, path: Path) -> str:
    with atomic_path(path) as tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path.name


def plot_confounding(table: dict, classes: list, path) -> str:
    "Heat map of the label x source table: colour = share of the source's images in each class, text = counts."
    sources = list(table)
    counts = np.array([[table[s].get(c, 0) for c in classes] for s in sources], float)
    share = counts / counts.sum(1, keepdims=True).clip(min=1)
    fig = Figure(figsize=(1.6 + 1.3 * len(classes), 0.9 + 0.45 * len(sources)))
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(sources)), sources)
    for i in range(len(sources)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(counts[i, j])}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] < 0.6 else "black")
    ax.set_title("label x source (share of each source)")
    fig.colorbar(im, ax=ax, fraction=0.05)
    return _save(fig, Path(path))


def plot_roc_by_source(y, p, sources, path, positive: str) -> str:
    "ROC curve of each source that has both classes, and the pooled one."
    from sklearn.metrics import roc_curve
    fig = Figure(figsize=(5, 4.6))
    ax = fig.add_subplot()
    df = pd.DataFrame({"y": y, "p": p, "s": list(sources)})
    for s, part in df.groupby("s", sort=True):
        if part["y"].nunique() == 2:
            fpr, tpr, _ = roc_curve(part["y"], part["p"])
            ax.plot(fpr, tpr, label=f"{s} (n={len(part)})")
    if df["y"].nunique() == 2:
        fpr, tpr, _ = roc_curve(df["y"], df["p"])
        ax.plot(fpr, tpr, "k--", lw=2, label="pooled")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel(f"sensitivity ({positive})")
    ax.set_title("ROC within each source")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, Path(path))


def plot_occlusion(rows: list[dict], path) -> str:
    "Accuracy and ROC AUC without a mask and with each region masked."
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    for k, (key, name) in enumerate((("accuracy", "accuracy"), ("roc_auc", "ROC AUC"))):
        vals = [r[key] if r[key] is not None else 0 for r in rows]
        bars = ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_xticks(x, [r["condition"].replace(" masked", "\nmasked") for r in rows], fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_title("occlusion of the test images")
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, Path(path))


def _verdict(findings: dict, shortcut_text: str, clean_text: str) -> list[str]:
    if findings["shortcut"]: return [f"> **{shortcut_text}**", ""]
    if findings.get("partial_shortcut"):
        srcs = findings["partial_shortcut"]
        n = sum(sum(findings["confounding"]["table"][s].values()) for s in srcs)
        return [f"> **For part of the data a model can score without looking at the lungs:** the source is visible "
                f"in the pixels, and {', '.join(srcs)} ({n} images, {n / findings['confounding']['n']:.0%} of the "
                f"data) are almost all one class.", ""]
    if findings["flags"]: return [f"> {len(findings['flags'])} warning(s); no full shortcut (see below).", ""]
    return [f"> {clean_text}", ""]


def _html(out_dir: Path, md: str, title: str):
    from .report import md_to_html
    write_atomic(out_dir / "audit.md", md)
    write_atomic(out_dir / "audit.html", md_to_html(md, out_dir, title))


def write_data_audit(out_dir, findings: dict, stats: pd.DataFrame) -> Path:
    "audit.md, audit.html, audit.json, confound.png and image_stats.csv of the pre-training audit."
    out_dir = Path(out_dir)
    conf, px, classes = findings["confounding"], findings["pixels"], findings["classes"]
    png = plot_confounding(conf["table"], classes, out_dir / "confound.png")
    lines = [f"# Shortcut audit of {findings['data']}", ""]
    lines += _verdict(findings, "The source is visible in the pixels and the label follows the source: a model can "
                                "score well on this data without looking at the lungs.",
                      "No source shortcut flagged at the thresholds below.")
    lines += ["## Flags", ""] + ([f"- {f}" for f in findings["flags"]] or ["- none"]) + [""]
    lines += ["## Label x source", ""]
    rows = []
    for s, by in conf["table"].items():
        n = sum(by.values())
        rows.append([s, *[by.get(c, 0) for c in classes], n, _f(by.get(findings["positive"], 0) / n)])
    lines += _table(["source", *classes, "n", f"share {findings['positive']}"], rows)
    lines += [f"Cramér's V {_f(conf['cramers_v'])}. Source-only rule (each source's majority label): accuracy "
              f"{_f(conf['source_rule_accuracy'])} against {_f(conf['majority_rate'])} for always the majority class "
              f"(gain {_signed(conf['source_rule_gain'])}).", "", f"![label x source]({png})", "", "### Per split", "",
              "The rule is fitted on train (each source's majority label there) and scored on each split.", ""]
    lines += _table(["split", "n", "Cramér's V", "source-only rule", "majority class"],
                    [[s, v["n"], _f(v["cramers_v"]), _f(v["source_rule_accuracy"]), _f(v["majority_rate"])]
                     for s, v in conf["splits"].items()])
    missing = findings["missing_from_train"]
    lines += ["Sources absent from train: " + (", ".join(f"{m['source']} in {m['split']} ({m['n']})" for m in missing)
                                                if missing else "none") + ".", ""]
    lines += ["## Is the source visible in the pixels?", ""]
    if px.get("balanced_accuracy") is None:
        lines += [f"Not measured: {px.get('note', 'fewer than two sources in the validation split')}.", ""]
    else:
        lines += [f"A logistic regression on frozen `{px['arch']}` features ({px['weights']} weights, {px['size']} px), "
                  f"fitted on {px['n_train']} training images, names the source of the {px['n_valid']} validation "
                  f"images with balanced accuracy **{_f(px['balanced_accuracy'])}** (chance {_f(px['chance'])}); "
                  f"accuracy {_f(px['accuracy'])} (the largest source's share: {_f(px['majority_source_rate'])}), "
                  f"Cohen's kappa {_f(px['kappa'])}.", ""]
        lines += _table(["source", "recall"], [[s, _f(r)] for s, r in px["recall"].items()])
    lines += ["## Image statistics", "",
              f"How well each statistic alone separates {findings['positive']} from the rest (max(AUC, 1 - AUC), "
              "all splits):", ""]
    lines += _table(["statistic", "AUC", "higher in", "flag"],
                    [[s["statistic"], _f(s["auc"]), s["higher_in"] or "-", "**yes**" if s["flag"] else ""]
                     for s in findings["separating_stats"]])
    med = pd.DataFrame(findings["stat_medians"])
    lines += ["Medians per source and label (edge markers: bright small blobs near the edges):", ""]
    lines += _table(list(med.columns), [[_f(v, 2) if isinstance(v, float) else v for v in r]
                                        for r in med.itertuples(index=False)])
    lines += ["## Thresholds", "", _THRESHOLD_NOTE.format(**findings["thresholds"]), ""]
    write_json(out_dir / "audit.json", findings)
    with atomic_path(out_dir / "image_stats.csv") as tmp: stats.to_csv(tmp, index=False)
    _html(out_dir, "\n".join(lines), "Shortcut audit")
    return out_dir / "audit.md"


def write_run_audit(out_dir, findings: dict, preds: pd.DataFrame) -> Path:
    "audit.md, audit.html, audit.json, predictions.csv and plots of the audit of a trained run."
    out_dir = Path(out_dir)
    ws, occ, cam, pos = findings["within_source"], findings["occlusion"], findings["cam"], findings["positive"]
    lines = [f"# Shortcut audit of run {findings['run_name']} on {findings['split_dir']}", "",
             f"Run `{findings['run_dir']}`, {findings['n']} test images; accuracy at the run's threshold "
             f"({findings['threshold']:.4g}), plain predictions (no TTA).", ""]
    lines += _verdict(findings, "This model reads something other than the lungs.", "No shortcut flagged.")
    lines += ["## Flags", ""] + ([f"- {f}" for f in findings["flags"]] or ["- none"]) + [""]
    lines += ["## Within-source AUC", ""]
    if ws is None:
        lines += ["No source column for these images (labels.csv beside the data): not measured.", ""]
    else:
        lines += [f"Pooled ROC AUC **{_f(ws['pooled_auc'])}**; mean AUC within the sources that have both classes "
                  f"**{_f(ws['mean_within_auc'])}** (gap {_signed(ws['gap'])}; weighted by images "
                  f"{_f(ws['weighted_within_auc'])}, since a source with a handful of cases of one class gives a noisy "
                  "AUC). A large gap is the shortcut's signature: "
                  "part of the pooled score comes from telling the sources apart.", ""]
        lines += _table(["source", "n", pos, "AUC within"],
                        [[r["source"], r["n"], r["positives"], _f(r["auc"])] for r in ws["sources"]])
        png = plot_roc_by_source(preds["y"], preds["p"], preds["source"], out_dir / "roc_by_source.png", pos)
        lines += [f"![ROC by source]({png})", ""]
    lines += ["## Occlusion", "", "Masked pixels take the image's mean. Central region: the middle 70% of height and "
              "width; borders and corners: an 8% frame and 15% corner squares.", ""]
    lines += _table(["masked", "accuracy", "change", "ROC AUC", "change"],
                    [[r["condition"], _f(r["accuracy"]), _signed(r["d_accuracy"]), _f(r["roc_auc"]), _signed(r["d_auc"])]
                     for r in occ])
    lines += [f"![occlusion]({plot_occlusion(occ, out_dir / 'occlusion.png')})", ""]
    lines += ["## Grad-CAM mass", "", f"Share of each image's Grad-CAM mass (predicted class) inside the central region; "
              f"an even spread gives {_f(cam['uniform'])}. Mean over all images: **{_f(cam['mean'])}**.", ""]
    lines += _table(["group", "n", "share inside"], [[g["group"], g["n"], _f(g["share"])] for g in cam["groups"]])
    lines += ["## Thresholds", "", _THRESHOLD_NOTE.format(**findings["thresholds"]), ""]
    write_json(out_dir / "audit.json", findings)
    with atomic_path(out_dir / "predictions.csv") as tmp: preds.to_csv(tmp, index=False)
    _html(out_dir, "\n".join(lines), "Shortcut audit of a run")
    return out_dir / "audit.md"
