"""The MLflow side of tracking: one store through `MlflowClient`, and what a run folder logs to it.

MLflow 3 dropped the fastai autolog and deprecated its file store, so this goes through the public client (no
global active run). The default store is local SQLite, `sqlite:///<outputs>/mlflow.db`, its artifacts beside it in
`<outputs>/mlartifacts/`; `MLFLOW_TRACKING_URI` points elsewhere. The experiment is `covid_fastai` (or
`MLFLOW_EXPERIMENT_NAME`). A run logs every recipe field as a param, per-epoch metrics (step = epoch), its final
metrics with their 95% CIs (metrics.json), report.html, the plots, config.json, and the model as a reference: the
path and sha256 of model.safetensors in tags, never a pickle. A sweep is a parent run, its runs children.
`import_run` / `import_sweep` log finished folders after the fact, as a tracked run would have.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from datetime import datetime
from pathlib import Path

from .cache import sha256_file
from .errors import RunFolderError, UserError
from .rundir import RunDir, one_line, recipe_from_config

__all__ = ["EXPERIMENT", "ARTIFACTS", "SWEEP_ARTIFACTS", "tracking_uri", "MlflowStore", "recipe_params",
           "final_metrics", "run_tags", "sweep_tags", "sweep_params", "log_finished", "finished_run", "import_run",
           "import_sweep"]

EXPERIMENT = "covid_fastai"
ARTIFACTS = ("report.html", "report.md", "config.json", "metrics.json", "history.csv")  # and every *.png
SWEEP_ARTIFACTS = ("comparison.md", "comparison.csv", "comparison.html", "sweep.json")


def tracking_uri(root) -> str:
    "`MLFLOW_TRACKING_URI`, else the SQLite store in the outputs folder `root`."
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).expanduser().resolve() / 'mlflow.db'}"


def iso_ms(iso: str | None) -> int | None:
    return int(datetime.fromisoformat(iso).timestamp() * 1000) if iso else None


class MlflowStore:
    "An MLflow tracking store and this library's experiment in it, through `MlflowClient` (no global active run)."

    def __init__(self, uri: str):
        from mlflow import MlflowClient
        self.uri = uri
        local = uri.startswith("sqlite:///")
        try:
            if local: Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment(
                str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts") if local else None)
        except Exception as e:  # MlflowException, sqlalchemy or network errors: say which store, once
            raise UserError(f"cannot open the MLflow tracking store {uri}: {one_line(e)}",
                            "fix or unset MLFLOW_TRACKING_URI (unset: sqlite:///<outputs>/mlflow.db)") from None

    def _experiment(self, artifact_root: str | None) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        if (e := self.client.get_experiment_by_name(name)) is not None: return e.experiment_id
        try:  # artifacts beside the SQLite file, not in ./mlruns of whatever folder the command ran in
            return self.client.create_experiment(name, artifact_location=artifact_root)
        except Exception:  # another process created it meanwhile
            if (e := self.client.get_experiment_by_name(name)) is not None: return e.experiment_id
            raise

    def find(self, record: dict | None) -> str | None:
        "The run id a folder recorded in this store, if the run is still there."
        if not record or record.get("tracking_uri") != self.uri or not record.get("run_id"): return None
        try: return self.client.get_run(record["run_id"]).info.run_id
        except Exception: return None

    def open_run(self, name: str, record: dict | None = None, parent: str | None = None, tags=None,
                 start_ms: int | None = None) -> str:
        "The run `record` names (continued: status RUNNING again), else a new one (a child of `parent`)."
        if rid := self.find(record):
            self.client.update_run(rid, status="RUNNING")
            return rid
        tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        if parent: tags["mlflow.parentRunId"] = parent  # what mlflow.start_run(nested=True) sets: the UI nests it
        return self.client.create_run(self.experiment_id, start_time=start_ms, tags=tags, run_name=name).info.run_id

    def record(self, run_id: str, parent: str | None = None) -> dict:
        "What config.json / sweep.json keep to find the run again."
        return {"tracking_uri": self.uri, "experiment_id": self.experiment_id, "run_id": run_id,
                **({"parent_run_id": parent} if parent else {})}

    def log(self, run_id: str, metrics: dict | None = None, step: int = 0, params: dict | None = None,
            tags: dict | None = None, ts: int | None = None):
        "Metrics (at `step`), params (those not logged yet: MLflow params are immutable) and tags, in batches."
        from mlflow.entities import Metric, Param, RunTag
        ts = ts or int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step) for k, v in (metrics or {}).items()]
        have = self.client.get_run(run_id).data.params if params else {}
        ps = [Param(k, v) for k, v in (params or {}).items() if k not in have]
        ts_ = [RunTag(k, str(v)) for k, v in (tags or {}).items() if v is not None]
        for i in range(0, max(len(ms), len(ps), len(ts_)), 100):  # MLflow's batch limit is 100 params/tags
            self.client.log_batch(run_id, metrics=ms[i:i + 100], params=ps[i:i + 100], tags=ts_[i:i + 100])

    def log_files(self, run_id: str, folder: Path, names, pattern: str | None = None):
        files = [folder / n for n in names] + (sorted(folder.glob(pattern)) if pattern else [])
        for f in files:
            if f.is_file(): self.client.log_artifact(run_id, str(f))

    def end(self, run_id: str, status: str = "FINISHED", end_ms: int | None = None):
        self.client.set_terminated(run_id, status, end_time=end_ms)


def recipe_params(config: dict) -> dict[str, str]:
    """Every field of the recipe a run used (as `recipe_from_config` rebuilds it from config.json: a resumed run's
    params equal its first start's) as an MLflow param: plain values as text, the plan as JSON."""
    rec = dataclasses.asdict(recipe_from_config(config))
    return {k: json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v) for k, v in rec.items()}


def final_metrics(m: dict, prefix: str = "final") -> dict[str, float]:
    """metrics.json as flat MLflow metrics: every number under its path (`final/at_threshold/sensitivity`), each
    95% CI as `.../ci95_low` and `.../ci95_high`; confusion matrices and flags stay in the artifacts."""
    out = {}
    for k, v in m.items():
        key = f"{prefix}/{k}"
        if isinstance(v, bool) or v is None: continue
        if isinstance(v, (int, float)):
            if math.isfinite(v): out[key] = float(v)
        elif isinstance(v, dict):
            if k == "ci95":
                for name, ci in v.items():
                    if isinstance(ci, list) and len(ci) == 2 and None not in ci:
                        out[f"{prefix}/{name}/ci95_low"], out[f"{prefix}/{name}/ci95_high"] = map(float, ci)
            else: out.update(final_metrics(v, key))
    return out


def run_tags(rd: RunDir) -> dict:
    c = rd.config
    return {"covid_fastai.run_dir": str(rd.path.resolve()), "covid_fastai.recipe": rd.name,
            "covid_fastai.policy": c["recipe"].get("policy"), "covid_fastai.arch": c["recipe"].get("arch"),
            "covid_fastai.status": c.get("status"), "mlflow.source.git.commit": c.get("git_commit")}


def log_finished(store: MlflowStore, run_id: str, rd: RunDir):
    "What a complete run adds at its end: final metrics with CIs, artifacts, the model by reference."
    d = rd.path
    model = d / "model.safetensors"
    store.log(run_id, final_metrics(json.loads((d / "metrics.json").read_text())),
              tags={**run_tags(rd), "model.path": str(model.resolve()) if model.is_file() else None,
                    "model.format": "safetensors",
                    "model.sha256": sha256_file(model) if model.is_file() else None})
    store.log_files(run_id, d, ARTIFACTS, "*.png")


def sweep_tags(sweep_dir: Path, manifest: dict) -> dict:
    return {"covid_fastai.sweep_dir": str(Path(sweep_dir).resolve()), "covid_fastai.kind": "sweep",
            "covid_fastai.status": manifest.get("status")}


def sweep_params(manifest: dict) -> dict:
    return {"pattern": str(manifest["pattern"]), "policies": str(manifest.get("policies")),
            "runs": str(len(manifest["runs"])), **{f"override.{k}": str(v) for k, v in manifest["overrides"].items()}}


def finished_run(rd: RunDir) -> RunDir:
    if rd.status == "complete" and (rd / "metrics.json").is_file(): return rd
    resumable = rd.checkpoint.is_file()
    raise RunFolderError(f"{rd.path} is not a finished run (status {rd.status})",
                         "finish it with {command}, then import it" if resumable else "leave it out", path=rd.path,
                         command=rd.resume_command if resumable else None)


def import_run(run_dir, store: MlflowStore | None = None, parent: str | None = None) -> tuple[str, bool]:
    """Log a finished run folder to MLflow as a tracked run would have: params, per-epoch metrics (history.csv),
    final metrics, artifacts, the model reference. Returns (run id, whether it was new): a folder already in
    this store (config.json records its run) is not logged twice."""
    import pandas as pd
    rd = finished_run(RunDir.open(run_dir))
    store = store or MlflowStore(tracking_uri(rd.path.parent.parent))
    rec = (rd.config.get("tracking") or {}).get("mlflow")
    if rid := store.find(rec): return rid, False
    rid = store.open_run(rd.path.name, parent=parent, tags={**run_tags(rd), "covid_fastai.imported": "true"},
                         start_ms=iso_ms(rd.config.get("created")))
    store.log(rid, params=recipe_params(rd.config))
    if (rd / "history.csv").is_file():
        for row in pd.read_csv(rd / "history.csv").to_dict("records"):
            store.log(rid, {k: v for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))
                            and math.isfinite(v)}, step=int(row["epoch"]))
    log_finished(store, rid, rd)
    store.end(rid, "FINISHED", iso_ms(rd.config.get("finished")))
    if not rec:  # the folder remembers where it went, so a second import finds it
        with rd.lock():
            rd.config.setdefault("tracking", {})["mlflow"] = store.record(rid, parent)
            rd.save()
    return rid, True


def import_sweep(sweep_dir, store: MlflowStore | None = None) -> tuple[str, list[tuple[Path, str, bool]]]:
    """A sweep folder as an MLflow parent run with its finished runs as children (those not finished are left
    out, and the parent says how the sweep stands). Returns (parent run id, [(run folder, run id, new)]); a sweep
    already in this store gains only the runs it lacks."""
    from .files import folder_lock, write_json
    from .sweep import SWEEP_FILE
    sweep_dir = Path(sweep_dir).expanduser()
    store = store or MlflowStore(tracking_uri(sweep_dir.parent.parent))
    busy = RunFolderError(f"{sweep_dir} is in use by another process (a sweep or resume still going)",
                          "wait for it or stop it first", path=sweep_dir)
    with folder_lock(sweep_dir, busy):
        manifest = json.loads((sweep_dir / SWEEP_FILE).read_text())
        rec = (manifest.get("tracking") or {}).get("mlflow")
        pid = store.find(rec)
        new = pid is None
        if new:
            pid = store.open_run(f"sweep {sweep_dir.name}", tags={**sweep_tags(sweep_dir, manifest),
                                                                   "covid_fastai.imported": "true"},
                                 start_ms=iso_ms(manifest.get("created")))
            store.log(pid, params=sweep_params(manifest))
        children = [(Path(d), *import_run(d, store, parent=pid)) for d in (it.get("run_dir") for it in manifest["runs"])
                    if d and RunDir.open(d).status == "complete"]
        if new:
            store.log_files(pid, sweep_dir, SWEEP_ARTIFACTS)
            store.end(pid, {"complete": "FINISHED", "interrupted": "KILLED"}.get(manifest.get("status"), "FAILED"))
            if not rec:  # the folder remembers where it went, so a second import finds it
                manifest.setdefault("tracking", {})["mlflow"] = store.record(pid)
                write_json(sweep_dir / SWEEP_FILE, manifest)
    return pid, children
