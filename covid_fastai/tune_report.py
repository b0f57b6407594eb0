"""A tune folder's report: the trials table (trials.csv/.md), Optuna's plots, tune.md and tune.html."""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import pandas as pd

from .errors import Command
from .report import SYNTHETIC_BANNER, write_html
from .rundir import trained_size

__all__ = ["trials_frame", "write_tune_report"]


def _rel(p, base: Path) -> str:
    if not p: return ""
    try: return str(Path(p).relative_to(base))
    except ValueError: return str(p)


def trials_frame(study, tune_dir) -> pd.DataFrame:
    """One row per trial: number, state (COMPLETE, PRUNED, FAIL, RUNNING), its settings, value, epochs, the input size
    it trained at, run folder."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        steps = sorted(t.intermediate_values)
        run_dir = t.user_attrs.get("run_dir")
        rows.append({"trial": t.number, "state": t.state.name, **t.params, "value": t.value,
                     "epochs reported": len(steps),
                     "last epoch value": t.intermediate_values[steps[-1]] if steps else None,
                     "size (px)": trained_size(run_dir),
                     "run folder": _rel(run_dir, Path(tune_dir)),
                     "note": t.user_attrs.get("error", "")})
    return pd.DataFrame(rows)


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and v != v): return ""
    if isinstance(v, float): return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                      *("| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in df.to_dict("records"))])


def _plot(fn, study, path: Path, labels=None, **kw) -> str | None:
    """Draw one of optuna.visualization.matplotlib's plots into `path`; None, with the reason, when it cannot.
    Optuna's plots set pyplot's ggplot style: rc_context keeps that to this figure."""
    import matplotlib
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            ax = fn(study, **kw)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            plt.close("all")
            return f"not drawn: {' '.join(str(e).split())[:200]}"
        ax0 = ax.flat[0] if hasattr(ax, "flat") else ax
        if labels: ax0.set(xlabel=labels[0], ylabel=labels[1])
        fig = ax0.figure
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
    return None


def write_plots(tune_dir: Path, study, monitor: str = "roc_auc") -> dict:
    "{name: (file, note)}: history, parameter importance (fANOVA, 2+ complete trials) and the per-epoch values."
    from optuna.visualization import matplotlib as ov
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    from optuna.importance import FanovaImportanceEvaluator  # fANOVA (scikit-learn's forests), seeded: repeatable
    plots = {"history": ov.plot_optimization_history,
             "importance": functools.partial(ov.plot_param_importances, evaluator=FanovaImportanceEvaluator(seed=0)),
             "intermediate": ov.plot_intermediate_values}
    out = {}
    for name, fn in plots.items():
        path = Path(tune_dir) / f"{name}.png"
        if name == "importance" and len(done) < 2:
            out[name] = (None, f"not drawn: importance needs 2 or more complete trials ({len(done)} so far)")
            continue
        note = _plot(fn, study, path, labels=("epoch", f"valid_{monitor}") if name == "intermediate" else None)
        out[name] = (None if note else path.name, note)
    return out


def _final_md(plan: dict) -> list[str]:
    f = plan.get("final")
    if f is None:
        return ["Not scored yet: the test split is scored once, for the best trial, when the trials are done.", ""]
    if f.get("how") == "none": return [f"Not scored: {f['note']}.", ""]
    t = f["test"]
    how = ("its model (trained in the trial) evaluated on the test split with `evaluate_run`" if f["how"] == "evaluate"
           else "its settings run once more without the proxies, with test evaluation")
    num = lambda v: "n/a" if v is None else f"{v:.4f}"
    params = ", ".join(f"{k}={_cell(v)}" for k, v in f["params"].items())
    lines = [f"**Test scored once, for the best trial** (trial {f['trial']}: {params}; valid {plan['metric']} "
             f"{num(f['valid'])}): {how}, in `{f['dir']}`.", "",
             f"- test: {t['n']} images, accuracy {num(t['accuracy'])}, ROC AUC {num(t['roc_auc'])}, PR AUC "
             f"{num(t['pr_auc'])}; at the threshold chosen on valid ({num(t['threshold'])}): sensitivity "
             f"{num(t['sensitivity'])}, specificity {num(t['specificity'])}"]
    if "valid_full" in f: lines.append(f"- valid {plan['metric']} of that full run: {num(f['valid_full'])}")
    return lines + ["", "No other trial saw the test split: every trial was evaluated on the validation split only.", ""]


def write_tune_report(tune_dir, plan: dict, study) -> Path:
    "trials.csv, trials.md, the plots, tune.md and tune.html in the tune folder; returns tune.md."
    tune_dir = Path(tune_dir)
    df = trials_frame(study, tune_dir)
    df.to_csv(tune_dir / "trials.csv", index=False)
    (tune_dir / "trials.md").write_text(f"# Trials of tune {plan['study']}\n\n" + (_md(df) if len(df) else "none yet") + "\n")
    plots = write_plots(tune_dir, study, plan["monitor"])
    counts = df["state"].value_counts().to_dict() if len(df) else {}
    finished = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
    data = plan["recipe"]["data"]
    synthetic = data == "demo" or (Path(data) / "SYNTHETIC.txt").exists()
    space = "\n".join(f"| {k} | {v[0]} | {', '.join(map(_cell, v[1])) if v[0] == 'choice' else f'{_cell(v[1])} to {_cell(v[2])}'} |"
                      for k, v in plan["space"].items())
    proxies = plan["proxy_overrides"]
    eng = plan["engine"]
    pr = plan["pruner"]
    L = [f"# Tune of {plan['name']} ({plan['created'][:16].replace('T', ' ')} UTC)", ""]
    if synthetic: L += [f"> **{SYNTHETIC_BANNER}**", ""]
    L += [f"- Status: **{plan['status']}**; {finished} of {plan['trials']} trials finished "
          f"({', '.join(f'{v} {k.lower()}' for k, v in counts.items()) or 'none yet'})"
          + (f"; error: {plan['error']}" if plan.get("error") else ""),
          f"- Objective: validation **{plan['metric']}** (`metrics.json` `valid.at_0.5.{plan['metric']}`), maximised. "
          "Every trial is a run evaluated on the validation split only; the test split is held out until the end.",
          f"- Data: `{data}`; recipe `{plan['name']}` with overrides {plan['overrides'] or 'none'}",
          "- Proxies: " + (", ".join(f"{k} {v}" for k, v in proxies.items()) + " for every trial (those fields left "
                            "the space); the best settings are run once at full settings for the test score"
                            if proxies else "none (trials ran at full settings)"),
          "- Pruner: " + ("none" if pr["kind"] == "none" else f"{pr['kind']}" + (
              f" (n_startup_trials {pr['n_startup_trials']}, n_warmup_steps {pr['n_warmup_steps']})"
              if pr["kind"] == "median" else f" {pr.get('repr', '')}")) +
          f", fed each epoch's `valid_{plan['monitor']}` by optuna-integration's FastAIPruningCallback",
          f"- Engine: {eng['kind']}" + (f" ({eng['workers'] or 'auto'} workers, {eng['cpus_per_trial']:g} CPUs per "
                                        f"trial{', cluster ' + eng['address'] if eng['address'] else ', local Ray'})"
                                        if eng["kind"] == "ray" else " (trials one after another)") +
          f"; storage `study.db` (SQLite), sampler TPE (seed {plan['seed']})",
          f"- Continue a stopped tune with `{Command('resume', (str(tune_dir),)).shell()}`", "",
          f"## Search space ({plan['space_from']})", "", "| field | kind | range |", "|---|---|---|", space, ""]
    done = df[df["state"] == "COMPLETE"] if len(df) else df
    if len(done):
        b = done.loc[done["value"].idxmax()]
        L += ["## Best trial (on valid)", "",
              f"Trial {b['trial']}: valid {plan['metric']} **{b['value']:.4f}** with "
              + ", ".join(f"{k}={_cell(b[k])}" for k in plan["space"]) + f"; run folder `{b['run folder']}`.", ""]
    sizes = sorted({int(v) for v in df["size (px)"].dropna()}) if len(df) and "size" not in plan["space"] else []
    if len(sizes) > 1:  # trials on Ray workers with and without bf16 units, under a recipe with fp32_size
        L += [f"**The trials trained at different input sizes ({', '.join(map(str, sizes))} px)**: the recipe's "
              "`fp32_size` applies on CPUs without bf16 units, and these trials ran on both kinds, so their values "
              "mix two sizes. Run the tune on one kind of CPU, or pass --size (or --proxy_size) to fix one size.", ""]
    L += ["## Test split", "", *_final_md(plan), "## Trials", "", "Also in trials.csv.", "", _md(df) if len(df) else "none yet", ""]
    L += ["## Plots", ""]
    for name, (file, note) in plots.items():
        L += [f"![{name}]({file})" if file else f"- {name}: {note}", ""]
    md = tune_dir / "tune.md"
    md.write_text("\n".join(L))
    write_html(md)
    return md


def load_tune(tune_dir) -> dict:
    return json.loads((Path(tune_dir) / "tune.json").read_text())
