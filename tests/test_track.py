"""Experiment tracking (covid_fastai.track, covid_fastai.mlflow_store): what a tracked run, a resumed run, a sweep
and an imported folder leave in MLflow and TensorBoard, read back through their own readers.

Tiny runs (random init, 32 px, batch 8, synthetic data, cached head features); every store is a SQLite file in a
temporary folder.
"""
import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from fastai.vision.all import Callback

from covid_fastai.cache import sha256_file
from covid_fastai.cli import main
from covid_fastai.errors import RunInterrupted
from covid_fastai.recipes import Recipe
from covid_fastai.sweep import run_sweep
from covid_fastai.train import resume, run_recipe

TINY = dict(pretrained=False, size=32, bs=8)
TINY_ARGS = ["--pretrained", "false", "--size", "32", "--bs", "8"]
RECIPE_FIELDS = {f.name for f in dataclasses.fields(Recipe)}


class StopAfter(Callback):
    "Test-only: Ctrl-C right after epoch `n` finished and was checkpointed."
    order = 95

    def __init__(self, n): self.n = n

    def after_epoch(self):
        if self.epoch == self.n: raise KeyboardInterrupt("boom")


@pytest.fixture(autouse=True)
def _no_outside_store(monkeypatch):
    "The stores these tests read are the ones they choose, whatever the environment says."
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"): monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # several helpers share this machine's cores; tiny runs gain nothing from more
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fresh_store(tmp_path_factory):
    """`fresh_store(path)`: an empty MLflow SQLite store at `path`, copied from one made once (making one runs
    MLflow's schema migrations: several seconds each); returns its URI."""
    pytest.importorskip("mlflow")
    import shutil
    template = tmp_path_factory.mktemp("template") / "mlflow.db"
    client(f"sqlite:///{template}").search_experiments()

    def make(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(template, path)
        return f"sqlite:///{path}"
    return make


def client(uri):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=uri)


def runs(uri) -> list:
    c = client(uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(exps, max_results=1000)


def history(c, run_id, key) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))


def assert_matches_folder(c, r, d: Path):
    "An MLflow run holds what the run folder holds: params, per-epoch metrics, final metrics, artifacts, model."
    from covid_fastai.mlflow_store import final_metrics, recipe_params
    cfg = json.loads((d / "config.json").read_text())
    assert set(r.data.params) == RECIPE_FIELDS
    assert r.data.params == recipe_params(cfg)
    assert json.loads(r.data.params["plan"])["kind"] == cfg["recipe"]["plan"]["kind"]
    hist = pd.read_csv(d / "history.csv")
    for col in ("train_loss", "valid_loss", "valid_accuracy"):
        assert history(c, r.info.run_id, col) == pytest.approx(list(zip(hist["epoch"], hist[col]))), col
    finals = final_metrics(json.loads((d / "metrics.json").read_text()))
    assert {"final/at_threshold/sensitivity", "final/at_threshold/sensitivity/ci95_low",
            "final/at_threshold/roc_auc/ci95_high", "final/valid/at_threshold/accuracy"} <= set(finals)
    assert {k: v for k, v in r.data.metrics.items() if k.startswith("final/")} == pytest.approx(finals)
    arts = {f.path for f in c.list_artifacts(r.info.run_id)}
    assert {"report.html", "config.json", "metrics.json", "curves.png", "roc_pr.png"} <= arts
    assert not any(a.endswith((".safetensors", ".pkl", ".pt")) for a in arts)  # the model only by reference
    assert r.data.tags["model.path"] == str((d / "model.safetensors").resolve())
    assert r.data.tags["model.sha256"] == sha256_file(d / "model.safetensors")
    assert r.info.status == "FINISHED"


@pytest.fixture(scope="module")
def tracked(tiny_data, tmp_path_factory, one_thread, fresh_store):
    "A run tracked by both trackers, stopped after its first epoch and resumed (which keeps its trackers)."
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("tracked")
    fresh_store(out / "mlflow.db")  # where the run will look for its default store
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        with pytest.raises(RunInterrupted):
            run_recipe("resnet18_head", out=out, cbs=[StopAfter(0)], track="mlflow,tensorboard",
                       data=str(tiny_data), epochs=2, **TINY)
        (d,) = (out / "resnet18_head").iterdir()
        stopped = runs(f"sqlite:///{out / 'mlflow.db'}")
        assert resume(d) == d
    return out, d, stopped


def test_tracked_run_reads_back_through_mlflow(tracked):
    out, d, stopped = tracked
    uri = f"sqlite:///{out / 'mlflow.db'}"  # the default store: beside the runs, in the outputs folder
    (r,) = runs(uri)  # resuming continued the same MLflow run
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["tracking"]["kinds"] == ["mlflow", "tensorboard"]
    assert cfg["tracking"]["mlflow"]["run_id"] == r.info.run_id and cfg["tracking"]["mlflow"]["tracking_uri"] == uri
    assert [(s.info.run_id, s.info.status) for s in stopped] == [(r.info.run_id, "KILLED")]
    assert history(client(uri), r.info.run_id, "valid_loss")[0][0] == 0 and len(stopped) == 1
    assert_matches_folder(client(uri), r, d)  # one point per epoch: the resumed epoch 0 was not logged twice
    assert r.data.tags["covid_fastai.run_dir"] == str(d.resolve()) and r.data.tags["covid_fastai.status"] == "complete"
    assert Path(r.info.artifact_uri.removeprefix("file://")).is_relative_to(out)  # not ./mlruns of the cwd


def test_tensorboard_event_file_has_the_epoch_scalars(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, d, _ = tracked
    ea = EventAccumulator(str(d / "tensorboard"))
    ea.Reload()
    hist = pd.read_csv(d / "history.csv")
    for col in ("valid_loss", "valid_accuracy", "train_accuracy"):
        ev = ea.Scalars(col)
        assert [e.value for e in ev] == pytest.approx(list(hist[col]), rel=1e-6), col
        steps = [e.step for e in ev]
        assert steps == sorted(set(steps)) and steps[0] > 0, steps  # the resumed epoch did not restart at step 0
    assert len(ea.Scalars("train_loss")) > 2 and "lr_0" in ea.Tags()["scalars"]  # per batch, as fastai logs


def test_importing_a_run_folder_matches_it(tracked, tmp_path, capsys, fresh_store):
    _, d, _ = tracked
    uri = fresh_store(tmp_path / "other.db")
    main(["track", str(d), "--uri", uri])
    assert capsys.readouterr().out.strip() == f"{d}: run {runs(uri)[0].info.run_id} imported into {uri}"
    (r,) = runs(uri)
    assert_matches_folder(client(uri), r, d)
    assert r.data.tags["covid_fastai.imported"] == "true"
    # the folder is a run of the live store: importing it there again adds nothing
    live = f"sqlite:///{d.parent.parent / 'mlflow.db'}"
    main(["track", str(d)])
    assert "already in" in capsys.readouterr().out and len(runs(live)) == 1


class StopSecondFit(Callback):
    "Test-only: Ctrl-C after the first epoch of the second fit it joins (the second run of a sweep)."
    order = 95

    def __init__(self): self.fits = 0

    def before_fit(self): self.fits += 1

    def after_epoch(self):
        if self.fits == 2 and self.epoch == 0: raise KeyboardInterrupt("boom")


def test_sweep_is_a_parent_with_one_child_per_recipe(tiny_data, tmp_path, capsys, one_thread, fresh_store):
    "Stopped in its second run and resumed from the CLI: still one parent, one child per run, each continued."
    fresh_store(tmp_path / "mlflow.db")
    with pytest.raises(RunInterrupted):
        run_sweep("resnet18_head", out=tmp_path, policies="assignment,modern", cbs=[StopSecondFit()],
                  track="mlflow", data=str(tiny_data), epochs=2, **TINY)
    (sweep,) = (tmp_path / "sweeps").iterdir()
    uri = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert sorted(r.info.status for r in runs(uri)) == ["FINISHED", "KILLED", "KILLED"]  # the sweep and its run
    main(["resume", str(sweep)])  # the sweep keeps its trackers
    manifest = json.loads((sweep / "sweep.json").read_text())
    by_id = {r.info.run_id: r for r in runs(uri)}
    parent = by_id[manifest["tracking"]["mlflow"]["run_id"]]
    kids = [r for r in by_id.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    dirs = [Path(it["run_dir"]) for it in manifest["runs"]]
    assert len(by_id) == 3 and sorted(k.data.tags["covid_fastai.run_dir"] for k in kids) == sorted(map(str, dirs))
    assert sorted(k.data.params["policy"] for k in kids) == ["assignment", "modern"]
    assert parent.info.status == "FINISHED" and parent.data.params["pattern"] == "resnet18_head"
    assert {"comparison.md", "comparison.csv", "sweep.json"} <= {f.path for f in client(uri).list_artifacts(parent.info.run_id)}
    for k in kids: assert_matches_folder(client(uri), k, Path(k.data.tags["covid_fastai.run_dir"]))
    capsys.readouterr()

    # the same sweep folder imported into another store: a parent and the same children again
    other = fresh_store(tmp_path / "other" / "other.db")
    main(["track", str(sweep), "--uri", other])
    assert "with 2 child run(s)" in capsys.readouterr().out
    got = runs(other)
    (p,) = [r for r in got if "mlflow.parentRunId" not in r.data.tags]
    assert len(got) == 3 and all(r.data.tags["mlflow.parentRunId"] == p.info.run_id for r in got if r is not p)
    for k in got:
        if k is not p: assert_matches_folder(client(other), k, Path(k.data.tags["covid_fastai.run_dir"]))


def test_missing_package_fails_before_any_work(tiny_data, tmp_path, capsys, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: find_spec and import both fail
    for args in (["recipe", "resnet18_head"], ["sweep", "resnet18_head"]):
        with pytest.raises(SystemExit) as e:
            main([*args, "--track", "mlflow", "--data", str(tiny_data), "--out", str(tmp_path), *TINY_ARGS])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err == [
            """error: --track mlflow needs the package 'mlflow', which is not installed: pip install -e ".[track]\""""]
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(SystemExit) as e:  # fire reads a comma list as a tuple
        main(["recipe", "resnet18_head", "--track", "mlflow,tensorboard", "--data", str(tiny_data), "--out",
              str(tmp_path), *TINY_ARGS])
    assert e.value.code == 2 and "error: --track tensorboard needs the package 'tensorboard'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(SystemExit):
        main(["track", str(tmp_path)])
    assert "error: `track` needs the package 'mlflow'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no run folder, no sweep folder, no store
    with pytest.raises(SystemExit) as e:
        main(["recipe", "resnet18_head", "--track", "wandb", "--data", str(tiny_data), "--out", str(tmp_path)])
    assert "--track must be mlflow, tensorboard or both (mlflow,tensorboard), got 'wandb'" in capsys.readouterr().err


def test_track_refuses_unfinished_and_foreign_folders(tracked, tmp_path, capsys):
    _, d, _ = tracked
    uri = f"sqlite:///{tmp_path / 'x.db'}"
    with pytest.raises(SystemExit) as e:
        main(["track", str(tmp_path), "--uri", uri])
    assert e.value.code == 2 and "is not a run folder (no config.json)" in capsys.readouterr().err
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    cfg = {**json.loads((d / "config.json").read_text()), "status": "interrupted"}
    (stopped / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as e:
        main(["track", str(stopped), "--uri", uri])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: {stopped} is not a finished run (status interrupted): leave it out")
    assert not (tmp_path / "x.db").exists()  # refused before any store was opened


def test_sweep_that_never_started_a_run_leaves_no_parent_run(tiny_data, tmp_path, fresh_store, capsys):
    "A sweep that fails before its first run is removed, folder and MLflow parent run alike."
    import shutil
    bad = tmp_path / "one_class"
    shutil.copytree(tiny_data / "train" / "infected", bad / "train" / "infected")
    uri = fresh_store(tmp_path / "out" / "mlflow.db")
    with pytest.raises(SystemExit) as e:
        main(["sweep", "resnet18_head", "--track", "mlflow", "--data", str(bad), "--out", str(tmp_path / "out"),
              *TINY_ARGS])
    assert e.value.code == 2 and "needs at least 2 class folders" in capsys.readouterr().err
    assert not (tmp_path / "out" / "sweeps").exists() and runs(uri) == []


def test_mlflow_failing_mid_run_does_not_stop_it(tracked, tmp_path, capsys):
    "A store that fails after the run opened: a warning naming `track RUN_DIR`, the run goes on, MLflow says FAILED."
    from covid_fastai.rundir import RunDir
    from covid_fastai.track import Tracking

    class FlakyStore:  # opens runs, then fails on the first epoch's metrics
        uri, ended = "sqlite:///x.db", []
        def find(self, rec): return None
        def open_run(self, *a, **k): return "r1"
        def record(self, run_id, parent=None): return {"tracking_uri": self.uri, "run_id": run_id}
        def log(self, run_id, metrics=None, step=0, params=None, tags=None):
            if metrics: raise ConnectionError("server went away")
        def end(self, run_id, status="FINISHED", end_ms=None): self.ended.append(status)

    _, d, _ = tracked
    rd = RunDir(tmp_path, json.loads((d / "config.json").read_text()))
    t = Tracking(("mlflow",), FlakyStore())
    t.callbacks(rd)
    with t.around(rd):
        t.open_run()
        t.log_epoch({"valid_loss": 0.5}, 0)
        t.log_epoch({"valid_loss": 0.4}, 1)  # no second warning, no second try
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"warning: MLflow logging stopped (ConnectionError: server went away); the run goes on, and "
                      f"import_folders('{tmp_path}') imports it once finished")
    assert len(out) == 2 and "imports it" in out[1] and FlakyStore.ended == ["FAILED"]
    assert json.loads((tmp_path / "config.json").read_text())["tracking"]["mlflow"]["run_id"] == "r1"
