"""Model cards: `model_card.md` in a run folder, built from what the run recorded (config.json, metrics.json) and
the data's labels.csv.

In the spirit of MONAI bundle metadata and Mitchell et al.'s "Model Cards for Model Reporting" (FAT* 2019): what
the model is for (and not for), the data it learnt from (sources, counts, licences, how patients were split),
its metrics with confidence intervals, per source and at its decision threshold, what is known to limit it,
where its starting weights came from and how to train it again. Every run writes one; `write_model_card(RUN_DIR)`
(re)writes it for any finished run, older ones included.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pandas as pd

from .errors import Command
from .files import write_atomic
from .labels import read_labels_csv

__all__ = ["write_model_card", "model_card", "MODEL_CARD"]

MODEL_CARD = "model_card.md"
_VALID_NAMES = ("valid", "validation", "val")
# A source of at least this many images that is this much one class: inside it, the source alone gives the label
# (the audit's `one_class_source_share`, docs/audit.md).
ONE_CLASS_MIN, ONE_CLASS_SHARE = 20, 0.90
_METRICS = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("sensitivity", "sensitivity"),
            ("specificity", "specificity"), ("ppv", "PPV"), ("npv", "NPV"), ("f1", "F1"), ("roc_auc", "ROC AUC"),
            ("pr_auc", "PR AUC"))


def _f(v, d: int = 3) -> str: return "n/a" if v is None or v != v else f"{v:.{d}f}"
def _ci(ci) -> str: return "n/a" if not ci else f"{ci[0]:.3f}–{ci[1]:.3f}"


def _table(rows: list[dict]) -> list[str]:
    if not rows: return []
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_f(r[c]) if isinstance(r[c], float) or r[c] is None else str(r[c]) for c in cols) + " |"
            for r in rows]
    return out + [""]


def _labels_frame(root: Path) -> pd.DataFrame | None:
    "labels.csv with `split` (the folder it lies in) and `klass` (its class folder) from each file's path."
    try: df = read_labels_csv(root) if root.is_dir() else None
    except Exception: return None  # the card describes what can be read; a broken labels.csv is the run's problem
    if df is None: return None
    parts = df["file"].str.split("/")
    split = parts.str[0].map(lambda s: "valid" if s in _VALID_NAMES else s)
    return df.assign(split=split, klass=parts.str[1].fillna(""))


def _command(argv) -> str:
    "The command line a run recorded (`sys.argv`), as a shell runs it; Python callers recorded their interpreter."
    if not argv: return ""
    head = Path(argv[0])
    if head.name == "__main__.py" and head.parent.name == "covid_fastai" or head.name == "covid_fastai":
        return shlex.join(["python", "-m", "covid_fastai", *argv[1:]])
    if head.suffix == ".py": return shlex.join(["python", *argv])
    return ""


def _intended_use(config: dict) -> list[str]:
    synthetic = config["data"].get("synthetic")
    L = ["## Intended use", ""]
    if synthetic:
        L += ["> **Synthetic demo run: a pipeline check.** It trained on generated drawings (the demo set), not chest "
              "X-rays. Every number below only shows that the pipeline runs; none says anything about X-rays.", ""]
    L += ["- **Use:** research and teaching — comparing fine-tuning choices (architecture, trainable layers, "
          "training policy) for chest X-ray classification, and studying what such models learn.",
          "- **Not for clinical use.** This model is not a medical device. It has not been validated prospectively, "
          "on other hospitals or against radiologists, and must not be used for diagnosis, triage or screening of "
          "any person.",
          "- **Out of scope:** images other than frontal chest X-rays, patient populations or sources absent from "
          "the training data, and any decision about a person.", ""]
    return L


def _model(config: dict, metrics: dict) -> list[str]:
    rec, data = config["recipe"], config["data"]
    thr = config.get("threshold") or metrics.get("threshold") or {}
    trainable = config.get("trainable", {})
    L = ["## Model", "",
         f"- Task: {len(data['classes'])}-class image classification, classes {', '.join(data['classes'])} "
         f"(from {data.get('labels', 'folders')}); positive view: `{metrics.get('positive_class', '?')}` vs the rest.",
         f"- Architecture: `{rec['arch']}` (timm) with a fastai head `{rec.get('head')}`; input {rec['size']} px.",
         f"- Fine-tuning: {rec['plan'].get('description', rec['plan'].get('kind'))}; "
         f"{trainable.get('parameters', 0):,} trainable parameters; {rec['epochs']} epoch(s), {rec['opt']} lr "
         f"{(config.get('lr_find') or {}).get('lr', rec['lr'])}, {rec['schedule']} schedule, seed {rec['seed']}.",
         f"- Decision threshold on p({metrics.get('positive_class', 'positive')}): **{_f(thr.get('value'), 4)}** "
         f"(rule `{thr.get('rule')}`, chosen on {thr.get('chosen_on', 'valid')}: {thr.get('note', '')}).",
         "- Weights file: `model.safetensors` (the fastai model's state dict; no pickle).", ""]
    return L


def _data(config: dict, labels: pd.DataFrame | None) -> list[str]:
    data = config["data"]
    L = ["## Training data", "", f"- Folder: `{data['path']}`" + (" (synthetic demo set)" if data.get("synthetic")
                                                                     else ""),
         f"- Validation split: {data['valid']}. " + _patient_note(data["valid"], labels),
         f"- Test split: {data.get('test') or 'none (the metrics below are on the validation split)'}."]
    skipped = (data.get("skipped") or {}).get("count")
    if skipped: L.append(f"- {skipped} unreadable file(s) were left out (listed in config.json and report.md).")
    L += ["", "Images per split and class:", ""]
    counts = data["counts"]
    folder_classes = list(dict.fromkeys(c for by in counts.values() for c in by))  # class folders (not fine labels)
    L += _table([{"split": s, **{c: by.get(c, 0) for c in folder_classes}, "total": sum(by.values())}
                 for s, by in counts.items()])
    if labels is None:
        return L + ["No labels.csv beside the data: its sources, licences and patients are not known to this card.", ""]
    if "source" in labels.columns:
        t = labels.assign(source=labels["source"].replace("", "(none)")).groupby(["source", "split", "klass"]).size()
        rows = []
        for src in sorted(t.index.get_level_values(0).unique()):
            r = {"source": src}
            for s in counts:
                for c in folder_classes: r[f"{s} {c}"] = int(t.get((src, s, c), 0))
            rows.append(r)
        L += ["Images per source (labels.csv `source`), by split and class folder:", "", *_table(rows)]
    if "licence" in labels.columns:
        by = ["source", "licence"] if "source" in labels.columns else ["licence"]
        lic = labels.assign(licence=labels["licence"].replace("", "(not given)")).groupby(by).size().reset_index(
            name="images")
        L += ["Licences (labels.csv `licence`; check each before any reuse of the data or the model):", "",
              *_table(lic.to_dict("records"))]
    else:
        L += ["labels.csv has no `licence` column: the data's licences are not recorded here.", ""]
    return L


def _patient_note(valid: str, labels) -> str:
    if valid.startswith("folder"):
        return "The split was made before the library saw the data (folders); whether patients are disjoint " \
               "across splits is up to whoever made it" + (" (labels.csv lists patient ids)." if labels is not None
                                                           and "patient_id" in labels.columns else ".")
    if "patients" in valid: return "Patients were held out whole: no patient has films on both sides."
    return "Images (not patients) were held out at random: films of one patient may sit on both sides, which " \
           "flatters the validation score."


def _metrics(metrics: dict) -> list[str]:
    pos, split, thr = metrics["positive_class"], metrics["split"], metrics["threshold"]
    a, b = metrics["at_0.5"], metrics["at_threshold"]
    L = [f"## Metrics ({split} split, {metrics['n']} images, {a['n_positive']} {pos})", ""]
    if split != "test":
        L += ["**No test folder: these are validation-split numbers**, and the threshold was chosen on the same "
              "split (optimistic).", ""]
    L += [f"`{pos}` vs the rest; 95% intervals are percentile bootstrap over images (1000 resamples, seeded); "
          f"n/a = undefined on this data. Test-time augmentation {'on' if metrics.get('tta') else 'off'}"
          + (f", its augmented passes from `{metrics['tta_aug']}`." if metrics.get("tta") and metrics.get("tta_aug")
             else "."), "",
          f"| metric | at threshold {_f(thr['value'])} | 95% CI | at 0.5 | 95% CI |", "|---|---|---|---|---|"]
    for k, name in _METRICS:
        L.append(f"| {name} | {_f(b.get(k))} | {_ci(b['ci95'].get(k))} | {_f(a.get(k))} | {_ci(a['ci95'].get(k))} |")
    L += ["", "Per class (argmax): " + "; ".join(f"{c} F1 {_f(v['f1'])} (n {v['support']})"
                                               for c, v in metrics["per_class"].items()) + ".", ""]
    for col, rows in (metrics.get("breakdowns") or {}).items():
        L += [f"Per {col.replace('_', ' ')} (labels.csv) at threshold {_f(thr['value'])}:", "", *_table(rows)]
    if not (metrics.get("breakdowns") or {}).get("source"):
        L += ["No per-source breakdown: labels.csv gives no `source` for these images.", ""]
    return L


def _limitations(config: dict, metrics: dict, labels, run_dir: Path) -> list[str]:
    L = ["## Known limitations", ""]
    if config["data"].get("synthetic"):
        L.append("- Trained and scored on synthetic drawings: a pipeline check only.")
    src = [g for g in (metrics.get("breakdowns") or {}).get("source", []) if g["accuracy"] is not None]
    if len(src) > 1:
        lo, hi = min(src, key=lambda g: g["accuracy"]), max(src, key=lambda g: g["accuracy"])
        L.append(f"- **Source entanglement (measured):** accuracy by source ranges from {_f(lo['accuracy'])} "
                 f"({lo['group']}, n {lo['n']}) to {_f(hi['accuracy'])} ({hi['group']}, n {hi['n']}), a spread of "
                 f"{hi['accuracy'] - lo['accuracy']:.3f}. Sources differ in class mix and look, so part of the "
                 "score may come from recognising where an image came from rather than what it shows.")
    if labels is not None and "source" in labels.columns:
        t = labels[labels["source"] != ""].groupby(["source", "klass"]).size().unstack(fill_value=0)
        for s, row in t.iterrows():
            n = int(row.sum())
            if n >= ONE_CLASS_MIN and row.max() / n >= ONE_CLASS_SHARE:
                L.append(f"- Source `{s}` is {row.max() / n:.0%} `{row.idxmax()}` ({n} images): within it the source "
                         "alone gives the label.")
    audits = sorted((run_dir / "audits").glob("*/audit.md")) if (run_dir / "audits").is_dir() else []
    if audits:
        a = audits[-1]
        try: flags = json.loads((a.parent / "audit.json").read_text()).get("flags", [])
        except (OSError, ValueError): flags = []
        L.append(f"- Shortcut audit: [{a.relative_to(run_dir).as_posix()}]({a.relative_to(run_dir).as_posix()})"
                 + (f", {len(flags)} flag(s): " + "; ".join(flags) if flags else ", no flag raised") + ".")
    elif not config["data"].get("synthetic"):
        L.append("- No shortcut audit has been run for this model: "
                 f"`{Command('audit', (str(run_dir),), (('data', config['data']['path']),)).shell()}`.")
    n = metrics.get("n", 0)
    if n and n < 500:
        L.append(f"- Scored on {n} images only: the intervals above are wide, and small subgroups are wider still.")
    L += [f"- Warning during training: {w}" for w in config.get("warnings", [])]
    L += ["- Calibration was not adjusted after training (see calibration.png in the report).",
          "- The threshold was chosen on this data set's validation split; another population needs its own.", ""]
    return L


def _provenance(config: dict, run_dir: Path) -> list[str]:
    w = config.get("weights") or {}
    L = ["## Weights provenance", ""]
    L += [f"- {k}: `{v}`" for k, v in w.items() if v not in (None, "")] or ["- not recorded"]
    return L + [""]


def _reproduce(config: dict, run_dir: Path) -> list[str]:
    cmd = _command(config.get("command"))
    L = ["## How to reproduce", ""]
    if cmd: L += [f"The command that trained it (relative paths from where it was started; the data it read: "
                  f"`{config['data']['path']}`):", "", "```", cmd, "```", ""]
    else: L += [f"It was started from Python (`{' '.join(config.get('command') or []) or '?'}`).", ""]
    L += ["The exact recipe it used (every field, from config.json), from Python:", "", "```python",
          "import covid_fastai", f"covid_fastai.run(covid_fastai.RunDir.open({str(run_dir)!r}).recipe())", "```", "",
          f"- Code: covid_fastai {(config.get('versions') or {}).get('covid_fastai', '?')}, git commit "
          f"`{config.get('git_commit') or 'unknown (not run from a git checkout)'}`.",
          "- Libraries: " + ", ".join(f"{k} {v}" for k, v in (config.get("versions") or {}).items()) + ".",
          f"- Machine: {(config.get('machine') or {}).get('platform', '?')}; bf16 autocast "
          f"{(config.get('speed') or {}).get('bf16_autocast')}; deterministic algorithms "
          f"{config['recipe'].get('reproducible')}. Same seed, data and machine give the same results; another "
          "machine or library version may differ slightly.", ""]
    return L


def model_card(run_dir, config: dict | None = None, metrics: dict | None = None) -> str:
    "The model card of a run (markdown); `config` and `metrics` default to the folder's config.json and metrics.json."
    run_dir = Path(run_dir)
    config = config if config is not None else json.loads((run_dir / "config.json").read_text())
    metrics = metrics if metrics is not None else json.loads((run_dir / "metrics.json").read_text())
    rec = config["recipe"]
    labels = _labels_frame(Path(config["data"]["path"]))
    L = [f"# Model card: {rec['name']}", "",
         f"{rec.get('description') or rec['arch']}. Run `{run_dir.name}`, finished {config.get('finished', '?')}; "
         "full results in [report.html](report.html) ([report.md](report.md)).", ""]
    L += _intended_use(config) + _model(config, metrics) + _data(config, labels) + _metrics(metrics)
    L += _limitations(config, metrics, labels, run_dir) + _provenance(config, run_dir) + _reproduce(config, run_dir)
    return "\n".join(L)


def write_model_card(run_dir, config: dict | None = None, metrics: dict | None = None) -> Path:
    "Write `RUN_DIR/model_card.md` (see `model_card`); returns its path."
    out = Path(run_dir) / MODEL_CARD
    write_atomic(out, model_card(run_dir, config, metrics))
    return out
