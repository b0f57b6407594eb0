"""Sweeps on the Ray engine (covid_fastai.sweep, covid_fastai.ray_engine): runs as concurrent Ray tasks, a failed one
in the table without stopping the others, and `resume` of the sweep.

One local Ray of 2 CPUs for the file (its start-up is most of the time), tiny runs (random init, 32 px, 1 epoch).
"""
import csv
import json
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
from fastai.vision.all import Callback

from covid_fastai.cli import main
from covid_fastai.errors import Command, RecipeError, UserError
from covid_fastai.sweep import SWEEP_FILE, SweepFailed, run_sweep

TINY = dict(pretrained=False, size=32, bs=8, epochs=1)


class Meet(Callback):
    """Test-only: each run writes its arrival time in `folder` before fitting and waits there until `n` runs have
    arrived, so the runs get past it only if they run at the same time; then the run of recipe `fail` fails."""

    def __init__(self, folder, n=2, fail=None, timeout=120):
        self.folder, self.n, self.fail, self.timeout = str(folder), n, fail, timeout

    def before_fit(self):
        name, folder = self.learn.path.parent.name, Path(self.folder)
        (folder / name).write_text(str(time.time()))
        t0 = time.time()
        while len(list(folder.iterdir())) < self.n:
            if time.time() - t0 > self.timeout: raise RuntimeError("alone at the meeting point: runs not concurrent")
            time.sleep(0.1)
        if name == self.fail: raise RuntimeError("failing on purpose")


def config(run_dir) -> dict:
    return json.loads((Path(run_dir) / "config.json").read_text())


@pytest.fixture(scope="module")
def local_ray():
    "A local Ray of 2 CPUs, started as the engine starts it (workers import this checkout), used by every sweep here."
    pytest.importorskip("ray")
    from covid_fastai.ray_engine import ray_session
    with ray_session(cpus=2) as ray:
        yield ray


def test_unknown_engine_is_one_line_before_any_folder(tmp_path):
    with pytest.raises(RecipeError, match="--engine must be local or ray, got 'dask'"):
        run_sweep("resnet18_head", out=tmp_path, engine="dask")
    with pytest.raises(RecipeError, match="--gpus_per_run must be a number >= 0"):
        run_sweep("resnet18_head", out=tmp_path, engine="ray", gpus_per_run=-1)
    assert not list(tmp_path.iterdir())


def test_a_cluster_that_does_not_answer_is_one_line_and_leaves_no_folder(tiny_data, tmp_path):
    pytest.importorskip("ray")
    with pytest.raises(UserError, match="cannot join the Ray cluster at 127.0.0.1:1: nothing answers there"):
        run_sweep("resnet18_head", out=tmp_path, engine="ray", address="127.0.0.1:1", data=str(tiny_data), **TINY)
    assert not list(tmp_path.iterdir())


def test_ray_sweep_runs_at_once_tables_a_failure_and_resumes(local_ray, tiny_data, tmp_path, capsys):
    meet, out = tmp_path / "meet", tmp_path / "out"
    meet.mkdir()
    with pytest.raises(SweepFailed) as e:
        run_sweep("resnet18_head,resnet18_one", out=out, engine="ray", cpus_per_run=1,
                  cbs=[Meet(meet, fail="resnet18_one")], data=str(tiny_data), **TINY)
    (sweep,) = (out / "sweeps").iterdir()
    m = json.loads((sweep / SWEEP_FILE).read_text())
    assert m["status"] == "failed" and m["engine"] == {"kind": "ray", "address": None, "cpus_per_run": 1.0,
                                                       "gpus_per_run": 0.0, "cpus": None}
    # the sweep says one failed (the CLI prints a UserError as one line, exit status 2), and how to go on
    (failed,) = e.value.failed
    assert isinstance(e.value, UserError) and failed.startswith("resnet18_one: RuntimeError: ")
    assert failed.endswith("failing on purpose")  # fastai's wording around a callback's error in between
    assert f"sweep {sweep}: 1 of 2 runs failed" in str(e.value)
    assert e.value.command == Command("resume", (str(sweep),), function="resume_sweep")
    ok, bad = (Path(r["run_dir"]) for r in m["runs"])
    assert config(ok)["status"] == "complete" and config(bad)["status"] == "failed"
    assert m["runs"][1]["error"] == failed.split(": ", 1)[1] and "error" not in m["runs"][0]
    # at the same time: both reached the meeting point (each waited for the other), in two processes
    assert sorted(p.name for p in meet.iterdir()) == ["resnet18_head", "resnet18_one"]
    assert config(ok)["created"] < config(bad)["stopped"] and config(bad)["created"] < config(ok)["finished"]
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    assert [(r["recipe"], r["run"], r["error"]) for r in rows] == [
        ("resnet18_head", str(ok), ""), ("resnet18_one", str(bad), m["runs"][1]["error"])]
    md = (sweep / "comparison.md").read_text()
    assert "1 of 2 runs finished, 1 failed" in md and "## Failed runs" in md and "failing on purpose" in md
    capsys.readouterr()

    # the CLI: that error as one line naming the shell command that goes on, exit status 2
    with pytest.MonkeyPatch.context() as mp:
        def fails(*a, **k): raise e.value
        mp.setattr("covid_fastai.sweep.run_sweep", fails)
        with pytest.raises(SystemExit) as exit_:
            main(["sweep", "resnet18_head,resnet18_one", "--engine", "ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: sweep {sweep}: 1 of 2 runs failed")
    assert err[0].endswith(f"`python -m covid_fastai resume {sweep}`")

    before = (ok / "metrics.json").stat().st_mtime_ns
    main(["resume", str(sweep)])  # with the engine it recorded (the same Ray here), without the failing callback
    said = capsys.readouterr().out
    assert f"finished already in {ok}" in said and "(a Ray task)" in said
    m = json.loads((sweep / SWEEP_FILE).read_text())
    assert m["status"] == "complete" and "error" not in m["runs"][1]
    again = Path(m["runs"][1]["run_dir"])
    assert Path(m["runs"][0]["run_dir"]) == ok and (ok / "metrics.json").stat().st_mtime_ns == before  # kept
    assert again != bad and again.parent == bad.parent and config(again)["status"] == "complete"
    assert config(bad)["status"] == "failed"  # the failed folder stays as it was
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    assert [r["recipe"] for r in rows] == ["resnet18_head", "resnet18_one"] and "error" not in rows[0]
    assert "Failed runs" not in (sweep / "comparison.md").read_text()
    assert not (sweep / "started").exists()  # the workers' notes were folded into sweep.json


@pytest.mark.slow  # a CLI process starting its own Ray, 12 tiny epochs in two workers, then the resume: 1-2 min
def test_killed_ray_sweep_marks_its_runs_interrupted_and_resumes_them(local_ray, tiny_data, tmp_path, capsys):
    from test_faults import signal_at_first_checkpoint
    args = ["sweep", "resnet18_head,resnet18_one", "--engine", "ray", "--data", tiny_data, "--epochs", 12,
            "--out", tmp_path, "--pretrained", "false", "--size", 32, "--bs", 8]
    p = signal_at_first_checkpoint(args, tmp_path / "resnet18_one", signal.SIGTERM)  # `kill` of the driver
    if p.returncode == 0: pytest.skip("the sweep finished before the signal arrived")
    (sweep,) = (tmp_path / "sweeps").iterdir()
    assert p.returncode == 130 and f"python -m covid_fastai resume {sweep}" in p.err, p.err[-2000:]
    m = json.loads((sweep / SWEEP_FILE).read_text())
    assert m["status"] == "interrupted"
    stopped = [Path(r["run_dir"]) for r in m["runs"]]
    one = config(stopped[1])
    assert one["status"] == "interrupted" and (stopped[1] / "checkpoint.pt").is_file()  # cancelled as Ctrl-C stops
    main(["resume", str(sweep)])
    m = json.loads((sweep / SWEEP_FILE).read_text())
    assert m["status"] == "complete" and [Path(r["run_dir"]) for r in m["runs"]] == stopped  # in their folders
    assert config(stopped[1])["resumed"][0]["from_epoch"] >= 1
    assert list(pd.read_csv(stopped[1] / "history.csv")["epoch"]) == list(range(12))
