"""Reports: `report.md` and a self-contained `report.html` for one run (or one evaluation), and the sweep's
comparison (markdown, CSV and HTML), shaped like the assignment's Tables 1 and 2.

The HTML pages are the markdown rendered by python-markdown, with every image embedded as a base64 data URI
and the style sheet inline: one file that opens offline and can be mailed.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import re
from pathlib import Path

import pandas as pd

from .fit import mom_trained_with, momentum_used
from .models import head_summary
from .recipes import canonical_policy

__all__ = ["SYNTHETIC_BANNER", "write_report", "evaluation_md", "write_evaluation_report", "md_to_html",
           "write_html", "sweep_row", "write_sweep"]

SYNTHETIC_BANNER = "[SYNTHETIC demo data, not X-rays]"


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df.to_dict("records"):  # column types kept (iterrows turns an all-number row into floats)
        lines.append("| " + " | ".join(_fmt(r[c], 1 if c in _ONE_DECIMAL else 4) for c in cols) + " |")
    return "\n".join(lines)


_ONE_DECIMAL = ("train time (s)", "images/s")  # measured to a tenth; metrics keep 4 decimals


def _fmt(v, digits: int = 4) -> str:
    if isinstance(v, float): return "n/a" if v != v else f"{v:.{digits}f}"
    if v is None: return "n/a"
    return str(v)


_METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "sensitivity": "sensitivity (recall)",
                 "specificity": "specificity", "ppv": "PPV (precision)", "npv": "NPV", "f1": "F1",
                 "roc_auc": "ROC AUC", "pr_auc": "PR AUC (average precision)",
                 "sens_at_spec95": "sensitivity at specificity >= 0.95 (this split's ROC)"}


_CHOSEN = {"valid": "the run's validation split", None: "the run's validation split",
           "recipe": "no data (a fixed number in the run's settings)"}


def _ci(ci) -> str: return "n/a" if not ci else f"{ci[0]:.3f}-{ci[1]:.3f}"


def tta_words(metrics: dict) -> str:
    "'off', 'on (fastai tta)', or 'on (fastai tta, augmented passes from `xray`)'."
    if not metrics.get("tta"): return "off"
    return f"on (fastai tta, augmented passes from `{metrics['tta_aug']}`)" if metrics.get("tta_aug") else "on (fastai tta)"


def evaluation_md(metrics: dict, split_note: str = "") -> list[str]:
    "Markdown lines: clinical metrics at 0.5 and at the chosen threshold with CIs, plots, one-vs-rest, breakdowns."
    pos, thr, split = metrics["positive_class"], metrics["threshold"], metrics["split"]
    a, b = metrics["at_0.5"], metrics["at_threshold"]
    L = [f"## Clinical metrics: {pos} vs the rest, {split} split ({a['n']} images, {a['n_positive']} {pos})", "",
         f"Decision threshold on p({pos}): **{thr['value']:.4f}**, chosen on "
         f"{_CHOSEN.get(thr.get('chosen_on'), thr.get('chosen_on'))} by `{thr['rule']}` ({thr['note']}) and applied "
         f"unchanged here{split_note}. A case is called "
         f"{pos} when p >= threshold. Test-time augmentation: {tta_words(metrics)}. "
         "95% intervals: percentile bootstrap over images (1000 resamples, seeded); n/a = undefined on this data.",
         "", f"| metric | at 0.5 | 95% CI | at {thr['value']:.3f} | 95% CI |", "|---|---|---|---|---|"]
    for k, name in _METRIC_NAMES.items():
        L.append(f"| {name} | {_fmt(a[k])} | {_ci(a['ci95'].get(k))} | {_fmt(b[k])} | {_ci(b['ci95'].get(k))} |")
    L += ["", f"Confusion at 0.5 (rows true {pos} / other; columns predicted): `{a['confusion_matrix']}`; at "
          f"{thr['value']:.3f}: `{b['confusion_matrix']}`.", "",
          "![ROC and precision-recall](roc_pr.png)", "", "![calibration](calibration.png)", "",
          "![confusion matrices](confusion_matrices.png)", ""]
    if metrics.get("one_vs_rest"):
        L += ["### Each class against the rest (at 0.5 on its own probability)", "",
              _md_table(pd.DataFrame([{"class": c, **{k: v[k] for k in ("n_positive", "roc_auc", "pr_auc",
                                       "sensitivity", "specificity", "ppv", "npv")}}
                                      for c, v in metrics["one_vs_rest"].items()])), ""]
    for i, (col, rows) in enumerate(metrics.get("breakdowns", {}).items()):
        L += [f"### By {col.replace('_', ' ')} (labels.csv; at {thr['value']:.3f})", ""]
        if i == 0:
            L += ["Large differences between groups can mean the model learnt where an image came from rather than "
                  "what it shows.", ""]
        L += [_md_table(pd.DataFrame(rows)), ""]
    return L


def write_evaluation_report(out_dir, title: str, lines_before: list[str], metrics: dict, classes: list) -> Path:
    "report.md (+ report.html) of an `evaluate` folder."
    out_dir = Path(out_dir)
    L = [f"# {title}", "", *lines_before,
         f"Accuracy at argmax **{metrics['accuracy']:.4f}** ({metrics['n']} images).", "",
         _md_table(pd.DataFrame([{"class": c, **v} for c, v in metrics["per_class"].items()])), "",
         *evaluation_md(metrics), "## Best and worst classified images", "",
         "Ranked by loss; red titles are misclassified; the second row is the Grad-CAM heatmap of the predicted class.", ""]
    for c in classes:
        L += [f"![best {c}](best_{c}.png)", "", f"![worst {c}](worst_{c}.png)", ""]
    out = out_dir / "report.md"
    out.write_text("\n".join(L))
    write_html(out)
    return out


_CSS = """body{font:15px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#1d2330;max-width:1100px;
margin:0 auto;padding:24px 32px 64px;background:#fff}h1{font-size:1.6em;border-bottom:2px solid #2b6cb0;
padding-bottom:.3em}h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #d5dbe5;padding-bottom:.2em}
h3{font-size:1.08em;margin-top:1.4em}table{border-collapse:collapse;margin:.6em 0 1em;font-size:13px;
display:block;overflow-x:auto;max-width:100%}th,td{border:1px solid #d5dbe5;padding:4px 9px;text-align:left;
vertical-align:top}th{background:#eef2f8}tr:nth-child(even) td{background:#f8fafc}
img{max-width:100%;height:auto;border:1px solid #e3e7ee;margin:.3em 0}code{background:#f1f3f7;padding:1px 4px;
border-radius:3px;font-size:.92em}blockquote{margin:1em 0;padding:.6em 1em;background:#fff4e5;
border-left:4px solid #dd6b20}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));
gap:12px}.grid figure{margin:0}figcaption{font-size:12px;color:#555}"""


def _embed(match, base: Path) -> str:
    alt, src = match.group(1), match.group(2)
    f = (base / src) if not Path(src).is_absolute() else Path(src)
    if src.startswith(("data:", "http:", "https:")) or not f.is_file():
        return f'<img alt="{alt}" src="{html.escape(src)}">' if src.startswith("data:") else f"<em>[missing image: {alt}]</em>"
    mime = "image/png" if f.suffix.lower() == ".png" else "image/jpeg"
    return f'<img alt="{alt}" src="data:{mime};base64,{base64.b64encode(f.read_bytes()).decode()}">'


def md_to_html(text: str, base_dir, title: str) -> str:
    "A self-contained HTML page from markdown: inline CSS, images under `base_dir` embedded, no external resource."
    import markdown
    body = markdown.markdown(text, extensions=["tables", "fenced_code"], output_format="html")
    body = re.sub(r'<img alt="([^"]*)" src="([^"]+)"\s*/?>', lambda m: _embed(m, Path(base_dir)), body)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{_CSS}</style></head>"
            f"<body>\n{body}\n</body></html>\n")


def write_html(md_path, extra_md: str = "") -> Path:
    "`report.md` -> `report.html` beside it (self-contained); `extra_md` is appended to the HTML only."
    md_path = Path(md_path)
    text = md_path.read_text() + ("\n\n" + extra_md if extra_md else "")
    title = next((ln[2:] for ln in text.splitlines() if ln.startswith("# ")), md_path.stem)
    out = md_path.with_suffix(".html")
    out.write_text(md_to_html(text, md_path.parent, title))
    return out


def _cm_text(cm, classes) -> str:
    "Confusion matrix in one cell: rows = true class."
    return "; ".join(f"{c}: {row}" for c, row in zip(classes, cm))


def _momentum(config: dict) -> str:
    return config.get("momentum") or momentum_used(config["recipe"]["schedule"], mom_trained_with(config))


def _options_lines(rec: dict) -> list[str]:
    "A Setup line for the issue 21 options a run used (balanced draws, EMA of weights); none when they are off."
    on = ([f"training draws balanced by {rec['balance']}"] if rec.get("balance", "none") != "none" else []) + \
         ([f"EMA of weights, decay {rec['ema']} (validation and the saved model use the average)"]
          if rec.get("ema") is not None else [])
    text = "; ".join(on)
    return [f"- {text[:1].upper()}{text[1:]}"] if on else []


def _lr(config: dict) -> str:
    "The rate the fit used: the recipe's, or the one lr_find picked (config.json's `lr_find`)."
    f = config.get("lr_find")
    if not config["recipe"].get("lr_find") or not f: return f"lr {config['recipe']['lr']}"
    if f.get("used_fallback"): return f"lr {f['lr']:.3g} (lr_find found no valley: the recipe's rate)"
    return f"lr {f['lr']:.3g} (lr_find's valley, {f['iterations']} iterations; lr_find.png)"


def _fp32_size_note(config: dict) -> str:
    "Why the input size is the recipe's fp32_size: the run trained on a CPU without bf16 units."
    f = config.get("speed", {}).get("fp32_size")
    return (f" (the recipe's fp32_size: {config['speed'].get('cpu_kind')} CPU without bf16 units)"
            if f and f["used"] else "")


def _cache_note(config) -> str:
    cf = config["speed"].get("cached_features")
    if not cf: return ""
    how = "loaded from the cache" if cf["from_disk"] else "computed"
    return (f"; the frozen body ran on {cf['views']} cached view(s) per training image ({how} in "
            f"{cf['seconds']:.1f} s, counted in the training time) and the head trained on those features")


def _skipped_section(skipped: dict | None) -> list[str]:
    "The files the pre-scan left out (unreadable), so a result never silently rests on fewer images."
    if not skipped: return []
    L = ["## Skipped files", ""]
    if not skipped["count"]: return L + ["None: every image file was readable.", ""]
    L += [f"{skipped['count']} unreadable file(s) were left out before training (the `check` command "
          f"lists them too):", "", "| file | reason |", "|---|---|"]
    L += [f"| {s['file']} | {s['reason']} |" for s in skipped["files"][:200]]
    if skipped["count"] > 200: L.append(f"| ... | {skipped['count'] - 200} more in config.json |")
    return L + [""]


def write_report(run_dir, config: dict, metrics: dict, history: pd.DataFrame, files: dict) -> Path:
    "report.md tying config, curves, confusion matrix, metrics and the best/worst grids together."
    run_dir = Path(run_dir)
    rec, data = config["recipe"], config["data"]
    classes = data["classes"]
    L = [f"# {rec['name']}: {rec['description'] or rec['arch']}, {canonical_policy(rec.get('policy', 'assignment'))} policy", ""]
    if data["synthetic"]:
        L += [f"> **{SYNTHETIC_BANNER}** This run used the generated demo set ({data['path']}): drawings, "
              "not chest X-rays. Its numbers only show that the pipeline runs.", ""]
    for msg in config.get("warnings", []): L += [f"> **Warning:** {msg}", ""]
    if (run_dir / "model_card.md").is_file():
        L += ["Model card (intended use, data and licences, limitations, how to reproduce): "
              "[model_card.md](model_card.md)", ""]
    w = config["weights"]
    L += ["## Setup", "",
          f"- Architecture: `{rec['arch']}`; weights: {w.get('source')}" + (f" ({w['file']})" if w.get("file") else "")
          + (f" — {w['note']}" if w.get("note") else ""),
          f"- Plan: {rec['plan']['description']}; trainable: {config['trainable']['parameters']:,} parameters in "
          f"{config['trainable']['tensors']} tensors; train_bn={rec['train_bn']}",
          f"- Layer groups: {' | '.join(config['layer_groups'])}",
          f"- Optimiser {rec['opt']} {_lr(config)} (lr_mult {rec['lr_mult']}) momentum {_momentum(config)} wd {rec['wd']}, "
          f"schedule {rec['schedule']}, {rec['epochs']} epochs, batch {rec['bs']}",
          f"- Input {rec['size']} px{_fp32_size_note(config)}, augmentation `{rec['aug']}`, head `{rec['head']}` "
          f"({head_summary(rec['head'], rec['hidden'], rec['dropout'])}), seed {rec['seed']}",
          *_options_lines(rec),
          f"- Data: `{data['path']}`; counts {data['counts']}; validation: {data['valid']}; "
          f"test: {data['test'] or 'none'}",
          f"- Speed: bf16 autocast {config['speed']['bf16_autocast']}, channels_last "
          f"{config['speed']['channels_last']}; training {metrics['train_seconds']:.1f} s, "
          f"{metrics['train_images_per_s']:.1f} images/s; whole run {metrics['wall_seconds']:.1f} s" + _cache_note(config),
          ""]
    split = metrics["split"]
    if data["test"] is None:
        L += ["**No test/ folder: the metrics below are on the validation split**, which also steered nothing "
              "in training but is not an independent test.", ""]
    elif config.get("evaluate_on") == "valid":  # a tune's trial: settings are chosen on valid, test stays unscored
        L += ["**Test split held out: the metrics below are on the validation split** (a tune trial; the test split "
              "is scored once, for the best trial, by the tune).", ""]
    L += [f"## Results on the {split} split ({metrics['n']} images)", "",
          f"Accuracy **{metrics['accuracy']:.4f}**.", ""]
    per = pd.DataFrame([{"class": c, **v} for c, v in metrics["per_class"].items()])
    L += [_md_table(per), "",
          "F1 is given for each class. (The assignment's F1 was scikit-learn's default positive label, "
          "`normal`; the infected-class F1 is the one that speaks to missed infections.)", "",
          f"Confusion matrix at argmax (rows true, columns predicted, order {classes}): "
          f"`{metrics['confusion_matrix']}`", "",
          "![confusion matrix](confusion_matrix.png)", "",
          *evaluation_md(metrics, "" if split == "test" or metrics["threshold"].get("chosen_on") == "recipe"
                         else " (the same split: optimistic)"),
          "## Training curves", "", "![curves](curves.png)", "",
          "Per epoch (train_loss is fastai's smoothed training loss; train metrics are taken with augmentation "
          "and dropout on):", "", _md_table(history.round(4)), "",
          "## Best and worst classified images", "",
          f"Ranked by loss on the {split} split; red titles are misclassified; the second row is the Grad-CAM "
          "heatmap of the predicted class on the image as the network sees it.", ""]
    for c in classes:
        L += [f"![best {c}](best_{c}.png)", "", f"![worst {c}](worst_{c}.png)", ""]
    L += _skipped_section(data.get("skipped"))
    L += ["## Files", "", "config.json (every setting, versions, weights provenance), history.csv, metrics.json, "
          "predictions.csv (per image p(positive), label at the threshold, true class), "
          "report.html (this report, self-contained), model.safetensors (state dict of the fastai model: body `0.model.*`, head `1.*`).", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(L))
    return out


def sweep_row(run_dir, config: dict, metrics: dict) -> dict:
    "One row of the comparison table."
    rec = config["recipe"]
    classes = config["data"]["classes"]
    row = {"recipe": rec["name"], "policy": canonical_policy(rec.get("policy", "assignment")), "arch": rec["arch"],
           "experiment": rec["description"],
           "trainable layers": rec["plan"]["description"], "trainable params": config["trainable"]["parameters"],
           "weights": config["weights"].get("source"), "size (px)": rec["size"],  # fp32_size: the CPU's choice
           "split": metrics["split"], "accuracy": metrics["accuracy"]}
    for c in classes: row[f"F1 ({c})"] = metrics["per_class"][c]["f1"]
    if "at_threshold" in metrics:
        t = metrics["at_threshold"]
        row.update({"threshold": round(t["threshold"], 4), "sensitivity (t)": t["sensitivity"],
                    "specificity (t)": t["specificity"], "ROC AUC": t["roc_auc"],
                    "sensitivity at specificity >= 0.95": t.get("sens_at_spec95")})
    by_source = (metrics.get("breakdowns") or {}).get("source")
    if by_source:  # from labels.csv: the shared set's sources differ in class mix and look (see its README)
        row["accuracy (t) by source"] = ", ".join(f"{g['group']} {g['accuracy']:.3f} ({g['n']})"
                                                  for g in sorted(by_source, key=lambda g: -g["n"]))
    row.update(_audit_columns(run_dir))
    row.update({"confusion matrix (rows true)": _cm_text(metrics["confusion_matrix"], classes),
                "train time (s)": round(metrics["train_seconds"], 1),
                "images/s": round(metrics["train_images_per_s"], 1),
                "synthetic data": config["data"]["synthetic"], "run": str(run_dir)})
    return row


def _audit_columns(run_dir) -> dict:
    "The newest shortcut audit of the run (`audit RUN_DIR --data DIR`), if it has one: its headline numbers."
    audits = sorted(Path(run_dir).glob("audits/*/audit.json"))  # timestamped folders: the last is the newest
    if not audits: return {}
    a = json.loads(audits[-1].read_text())
    ws, occ = a["within_source"], {o["condition"]: o for o in a["occlusion"]}
    lungs = next((o for c, o in occ.items() if c.startswith("lung region")), {})
    return {"audit: mean within-source AUC": ws.get("mean_within_auc"), "audit: pooled AUC": ws.get("pooled_auc"),
            "audit: AUC with lungs masked": lungs.get("roc_auc"), "audit: flags": len(a.get("flags", []))}


def _figure_grid(rows: list[dict], image: str, caption: str) -> str:
    "Raw HTML: one figure per run (its `image`), side by side."
    figs = []
    for r in rows:
        f = (Path(r["run"]) / image).resolve()
        figs.append(f'<figure><img alt="{html.escape(r["recipe"])} {caption}" src="{html.escape(str(f))}">'
                    f'<figcaption>{html.escape(r["recipe"])}: {caption}</figcaption></figure>')
    return '<div class="grid">' + "".join(figs) + "</div>"


def write_sweep(out_dir, rows: list[dict], title: str, failed=()) -> tuple[Path, Path]:
    """comparison.md (one table per architecture, like the seed's Tables 1 and 2), comparison.csv and
    comparison.html (the tables plus every run's ROC/PR curves, training curves and confusion matrices side by
    side, self-contained). failed: runs of a sweep that failed, as {'recipe', 'policy', 'arch', 'run', 'error'}:
    listed under the tables, and in the CSV with an `error` column."""
    out_dir = Path(out_dir)
    df = pd.DataFrame(rows)
    fails = pd.DataFrame(list(failed), columns=["recipe", "policy", "arch", "run", "error"])
    csv_path = out_dir / "comparison.csv"
    (pd.concat([df.assign(error=""), fails], ignore_index=True) if len(fails) else df).to_csv(
        csv_path, index=False, quoting=csv.QUOTE_MINIMAL)
    L = [f"# {title}", ""]
    if rows and df["synthetic data"].any():
        L += [f"> **{SYNTHETIC_BANNER}** Some runs used the generated demo set; their numbers mean nothing "
              "about X-rays.", ""]
    if rows:
        L += ["F1 is given for each class (the assignment reported F1 of `normal`). Confusion matrices: rows are "
              "the true class. Train time and images/s cover the training phase only.", ""]
    show = [c for c in df.columns if c not in ("arch", "synthetic data")]
    for i, (arch, part) in enumerate(df.groupby("arch", sort=False) if rows else (), 1):
        L += [f"## Table {i}: {arch}", "", _md_table(part[show]), ""]
    if rows and df["policy"].nunique() > 1 and not df.duplicated(["recipe", "policy"]).any():  # one run per cell
        L += ["## Policies side by side", "", f"Each recipe under each training policy (`--policies`), on the "
              f"{'/'.join(df['split'].unique())} split.", ""]
        for value in ("accuracy", "ROC AUC"):
            if value not in df or df[value].isna().all(): continue
            L += [f"{value}:", "", _md_table(df.pivot(index="recipe", columns="policy", values=value)
                                             .reindex(index=df["recipe"].unique(), columns=df["policy"].unique()).reset_index().rename_axis(columns=None)), ""]
    if len(fails):
        L += ["## Failed runs", "", f"{len(fails)} run(s) failed; they are not in the tables above. `resume` of the "
              "sweep folder runs them again (from their last finished epoch where they have one).", "",
              _md_table(fails.drop(columns="arch")), ""]
    md_path = out_dir / "comparison.md"
    md_path.write_text("\n".join(L))
    extra = []
    for image, caption, head in (("roc_pr.png", "ROC and PR", "ROC and precision-recall curves"),
                                 ("curves.png", "loss and accuracy", "Training curves"),
                                 ("confusion_matrices.png", "confusion matrices", "Confusion matrices")):
        if rows: extra += [f"## {head}", "", _figure_grid(rows, image, caption), ""]
    write_html(md_path, "\n".join(extra))
    return md_path, csv_path
