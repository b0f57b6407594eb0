"""Reports: `report.md` for one run, and the sweep's comparison table (markdown + CSV), shaped like the
assignment's Tables 1 and 2."""
from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

__all__ = ["SYNTHETIC_BANNER", "write_report", "sweep_row", "write_sweep"]

SYNTHETIC_BANNER = "[SYNTHETIC demo data, not X-rays]"


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float): return f"{v:.4f}"
    return str(v)


def _cm_text(cm, classes) -> str:
    "Confusion matrix in one cell: rows = true class."
    return "; ".join(f"{c}: {row}" for c, row in zip(classes, cm))


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
    L += [f"{skipped['count']} unreadable file(s) were left out before training (`python -m covid_fastai check "
          f"--data DIR` lists them too):", "", "| file | reason |", "|---|---|"]
    L += [f"| {s['file']} | {s['reason']} |" for s in skipped["files"][:200]]
    if skipped["count"] > 200: L.append(f"| ... | {skipped['count'] - 200} more in config.json |")
    return L + [""]


def write_report(run_dir, config: dict, metrics: dict, history: pd.DataFrame, files: dict) -> Path:
    "report.md tying config, curves, confusion matrix, metrics and the best/worst grids together."
    run_dir = Path(run_dir)
    rec, data = config["recipe"], config["data"]
    classes = data["classes"]
    L = [f"# {rec['name']}: {rec['description'] or rec['arch']}", ""]
    if data["synthetic"]:
        L += [f"> **{SYNTHETIC_BANNER}** This run used the generated demo set ({data['path']}): drawings, "
              "not chest X-rays. Its numbers only show that the pipeline runs.", ""]
    w = config["weights"]
    L += ["## Setup", "",
          f"- Architecture: `{rec['arch']}`; weights: {w.get('source')}" + (f" ({w['file']})" if w.get("file") else "")
          + (f" — {w['note']}" if w.get("note") else ""),
          f"- Plan: {rec['plan']['description']}; trainable: {config['trainable']['parameters']:,} parameters in "
          f"{config['trainable']['tensors']} tensors; train_bn={rec['train_bn']}",
          f"- Layer groups: {' | '.join(config['layer_groups'])}",
          f"- Optimiser {rec['opt']} lr {rec['lr']} (lr_mult {rec['lr_mult']}) momentum {rec['mom']} wd {rec['wd']}, "
          f"schedule {rec['schedule']}, {rec['epochs']} epochs, batch {rec['bs']}",
          f"- Input {rec['size']} px, augmentation `{rec['aug']}`, head `{rec['head']}` ({rec['hidden']} hidden, "
          f"dropout {rec['dropout']}), seed {rec['seed']}",
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
    L += [f"## Results on the {split} split ({metrics['n']} images)", "",
          f"Accuracy **{metrics['accuracy']:.4f}**.", ""]
    per = pd.DataFrame([{"class": c, **v} for c, v in metrics["per_class"].items()])
    L += [_md_table(per), "",
          "F1 is given for each class. (The assignment's F1 was scikit-learn's default positive label, "
          "`normal`; the infected-class F1 is the one that speaks to missed infections.)", "",
          f"Confusion matrix (rows true, columns predicted, order {classes}): `{metrics['confusion_matrix']}`", "",
          "![confusion matrix](confusion_matrix.png)", "",
          "## Training curves", "", "![curves](curves.png)", "",
          "Per epoch (train_loss is fastai's smoothed training loss; train metrics are taken with augmentation "
          "and dropout on):", "", _md_table(history.round(4)), "",
          "## Best and worst classified images", "",
          f"Ranked by loss on the {split} split; red titles are misclassified.", ""]
    for c in classes:
        L += [f"![best {c}](best_{c}.png)", "", f"![worst {c}](worst_{c}.png)", ""]
    L += _skipped_section(data.get("skipped"))
    L += ["## Files", "", "config.json (every setting, versions, weights provenance), history.csv, metrics.json, "
          "model.safetensors (state dict of the fastai model: body `0.model.*`, head `1.*`).", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(L))
    return out


def sweep_row(run_dir, config: dict, metrics: dict) -> dict:
    "One row of the comparison table."
    rec = config["recipe"]
    classes = config["data"]["classes"]
    row = {"recipe": rec["name"], "policy": rec.get("policy", "seed"), "arch": rec["arch"],
           "experiment": rec["description"],
           "trainable layers": rec["plan"]["description"], "trainable params": config["trainable"]["parameters"],
           "weights": config["weights"].get("source"), "split": metrics["split"], "accuracy": metrics["accuracy"]}
    for c in classes: row[f"F1 ({c})"] = metrics["per_class"][c]["f1"]
    row.update({"confusion matrix (rows true)": _cm_text(metrics["confusion_matrix"], classes),
                "train time (s)": round(metrics["train_seconds"], 1),
                "images/s": round(metrics["train_images_per_s"], 1),
                "synthetic data": config["data"]["synthetic"], "run": str(run_dir)})
    return row


def write_sweep(out_dir, rows: list[dict], title: str) -> tuple[Path, Path]:
    "comparison.md (one table per architecture, like the seed's Tables 1 and 2) and comparison.csv."
    out_dir = Path(out_dir)
    df = pd.DataFrame(rows)
    csv_path = out_dir / "comparison.csv"
    df.to_csv(csv_path, index=False, quoting=csv.QUOTE_MINIMAL)
    L = [f"# {title}", ""]
    if df["synthetic data"].any():
        L += [f"> **{SYNTHETIC_BANNER}** Some runs used the generated demo set; their numbers mean nothing "
              "about X-rays.", ""]
    L += ["F1 is given for each class (the assignment reported F1 of `normal`). Confusion matrices: rows are "
          "the true class. Train time and images/s cover the training phase only.", ""]
    show = [c for c in df.columns if c not in ("arch", "synthetic data")]
    for i, (arch, part) in enumerate(df.groupby("arch", sort=False), 1):
        L += [f"## Table {i}: {arch}", "", _md_table(part[show]), ""]
    if df["policy"].nunique() > 1:
        L += ["## Policies side by side", "", f"Accuracy on the {'/'.join(df['split'].unique())} split of each recipe "
              "under each training policy (`--policies`).", "",
              _md_table(df.pivot_table(index="recipe", columns="policy", values="accuracy", sort=False)
                        .reset_index().rename_axis(columns=None)), ""]
    md_path = out_dir / "comparison.md"
    md_path.write_text("\n".join(L))
    return md_path, csv_path
