"""Sweeps that survive being stopped, and `compare` of finished runs (covid_fastai.sweep).

Tiny runs (random init, 32 px, batch 8, synthetic data) so the file stays within a minute or two.
"""
import csv
import dataclasses
import json
import signal
from pathlib import Path

import pandas as pd
import pytest
from fastai.vision.all import Callback
from test_faults import signal_at_first_checkpoint

from covid_fastai.cli import main
from covid_fastai.errors import Command, RunInterrupted
from covid_fastai.report import sweep_row
from covid_fastai.sweep import SWEEP_FILE, compare_runs, resume_sweep, run_sweep
from covid_fastai.rundir import CHECKPOINT

TINY = dict(pretrained=False, size=32, bs=8)
TINY_ARGS = ["--pretrained", "false", "--size", "32", "--bs", "8"]


class StopIn(Callback):
    "Test-only: Ctrl-C once, after epoch `epoch` of the first run of `recipe` (its checkpoint written)."
    order = 95

    def __init__(self, recipe, epoch=0): self.recipe, self.at, self.fired = recipe, epoch, False

    def before_epoch(self):
        if self.at is None and not self.fired and self.learn.path.parent.name == self.recipe:
            self.fired = True
            raise KeyboardInterrupt

    def after_epoch(self):
        if self.at is not None and not self.fired and self.learn.path.parent.name == self.recipe and self.epoch == self.at:
            self.fired = True
            raise KeyboardInterrupt


def manifest(sweep_dir) -> dict:
    return json.loads((Path(sweep_dir) / SWEEP_FILE).read_text())


def rows(sweep_dir) -> list[dict]:
    return list(csv.DictReader((Path(sweep_dir) / "comparison.csv").open()))


def test_interrupted_sweep_resumes_where_it_stopped(tiny_data, tmp_path, capsys):
    with pytest.raises(RunInterrupted) as e:
        run_sweep("resnet18_head,resnet18_one", out=tmp_path, cbs=[StopIn("resnet18_one", epoch=0)],
                  data=str(tiny_data), epochs=2, **TINY)
    (sweep,) = (tmp_path / "sweeps").iterdir()
    m = manifest(sweep)
    assert m["status"] == "interrupted" and m["out"] == str(tmp_path.resolve())
    assert [r["recipe"]["name"] for r in m["runs"]] == ["resnet18_head", "resnet18_one"]
    assert m["runs"][0]["recipe"]["data"] == str(Path(tiny_data).resolve())  # resumable from any folder
    first, second = (Path(r["run_dir"]) for r in m["runs"])
    assert json.loads((first / "config.json").read_text())["status"] == "complete"
    assert (second / CHECKPOINT).is_file()
    # the table so far: the finished run only, and the title says so
    assert [r["recipe"] for r in rows(sweep)] == ["resnet18_head"]
    assert "1 of 2 runs finished" in (sweep / "comparison.md").read_text()
    assert e.value.command == Command("resume", (str(sweep),), function="resume_sweep")  # the CLI spells it `python -m covid_fastai resume`
    assert e.value.message() == (f"{sweep} is marked incomplete; the sweep has 1 of 2 runs finished; continue it "
                                 f"with `resume_sweep('{sweep}')`")
    capsys.readouterr()

    before = (first / "metrics.json").stat().st_mtime_ns
    main(["resume", str(sweep)])  # the CLI's resume knows a sweep folder
    out = capsys.readouterr().out
    assert f"finished already in {first}" in out and f"resuming {second}" in out
    m = manifest(sweep)
    assert m["status"] == "complete" and [Path(r["run_dir"]) for r in m["runs"]] == [first, second]
    assert (first / "metrics.json").stat().st_mtime_ns == before  # kept, not run again
    cfg = json.loads((second / "config.json").read_text())
    assert cfg["status"] == "complete" and [r["from_epoch"] for r in cfg["resumed"]] == [1]
    assert list(pd.read_csv(second / "history.csv")["epoch"]) == [0, 1]
    assert len(list((tmp_path / "resnet18_one").iterdir())) == 1  # continued in its own folder
    assert [r["recipe"] for r in rows(sweep)] == ["resnet18_head", "resnet18_one"]
    assert "runs finished" not in (sweep / "comparison.md").read_text()
    with pytest.raises(SystemExit) as e:
        main(["resume", str(sweep)])
    assert e.value.code == 2 and "finished already (status complete)" in capsys.readouterr().err


def test_run_stopped_before_its_first_epoch_starts_again(tiny_data, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_sweep("resnet18_one", out=tmp_path, cbs=[StopIn("resnet18_one", epoch=None)],
                  data=str(tiny_data), epochs=1, **TINY)
    (sweep,) = (tmp_path / "sweeps").iterdir()
    (old,) = (tmp_path / "resnet18_one").iterdir()
    assert not (old / CHECKPOINT).exists() and not (sweep / "comparison.md").exists()
    assert resume_sweep(sweep) == sweep
    (item,) = manifest(sweep)["runs"]
    new = Path(item["run_dir"])
    assert new != old and new.parent == old.parent  # a new folder; the stopped one stays as it was
    assert json.loads((old / "config.json").read_text())["status"] == "interrupted"
    assert json.loads((new / "config.json").read_text())["status"] == "complete"


def test_killed_sweep_resumes_from_the_cli(tiny_data, tmp_path):
    "SIGKILL (a closed session) leaves no chance to mark anything: `resume` must still carry on."
    args = ["sweep", "resnet18_head,resnet18_one", "--data", tiny_data, "--epochs", 6, "--out", tmp_path, *TINY_ARGS]
    p = signal_at_first_checkpoint(args, tmp_path / "resnet18_one", signal.SIGKILL)
    if p.returncode == 0:
        pytest.skip("the sweep finished before the signal arrived (machine too fast for 6 tiny epochs)")
    (sweep,) = (tmp_path / "sweeps").iterdir()
    assert manifest(sweep)["status"] == "running"  # as the kill left it
    main(["resume", str(sweep)])  # in this process: the kill above already ran `python -m covid_fastai` for real
    m = manifest(sweep)
    assert m["status"] == "complete"
    (one,) = (tmp_path / "resnet18_one").iterdir()
    assert Path(m["runs"][1]["run_dir"]) == one
    assert json.loads((one / "config.json").read_text())["resumed"][0]["from_epoch"] >= 1
    assert list(pd.read_csv(one / "history.csv")["epoch"]) == list(range(6))
    assert [r["recipe"] for r in rows(sweep)] == ["resnet18_head", "resnet18_one"]


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory):
    "A sweep of one recipe under both policies, and a run stopped after one epoch."
    out = tmp_path_factory.mktemp("finished")
    sweep = run_sweep("resnet18_head", out=out, policies="seed,modern", data=str(tiny_data), epochs=1, **TINY)
    with pytest.raises(KeyboardInterrupt):
        run_sweep("resnet18_one", out=out, cbs=[StopIn("resnet18_one", epoch=0)], data=str(tiny_data), epochs=2,
                  **TINY)
    runs = [Path(r["run_dir"]) for r in manifest(sweep)["runs"]]
    (stopped,) = (out / "resnet18_one").iterdir()
    return out, sweep, runs, stopped


def test_compare_puts_finished_runs_side_by_side(finished, tmp_path):
    _, sweep, (seed, modern), _ = finished
    md = (sweep / "comparison.md").read_text()
    assert "## Policies side by side" in md and "ROC AUC:" in md
    main(["compare", str(seed), str(modern), "--out", str(tmp_path)])  # the CLI, in this process
    (cmp,) = (tmp_path / "comparisons").iterdir()
    got = rows(cmp)
    assert [(g["recipe"], g["policy"], g["run"]) for g in got] == [("resnet18_head", "assignment", str(seed)),
                                                                   ("resnet18_head", "modern", str(modern))]
    assert got == rows(sweep)  # the same table the sweep wrote
    # two runs of the same recipe and policy are not averaged into one cell
    md = compare_runs([seed, seed], out=tmp_path).read_text()
    assert "## Policies side by side" not in md and md.count(f"| {seed} |") == 2


def test_compare_refuses_unfinished_runs(finished, tmp_path, capsys):
    _, _, (seed, _), stopped = finished
    for bad, msg in [(stopped, f"{stopped} is not a finished run (status interrupted): continue it with "
                               f"`python -m covid_fastai resume {stopped}`"),
                     (tmp_path, f"{tmp_path} is not a run folder (no config.json)")]:
        with pytest.raises(SystemExit) as e:
            main(["compare", str(seed), str(bad), "--out", str(tmp_path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "comparisons").exists()  # nothing half-written


def test_sweep_row_gives_per_source_accuracy_and_the_roc_point(finished):
    seed = finished[2][0]
    config = json.loads((seed / "config.json").read_text())
    metrics = json.loads((seed / "metrics.json").read_text())
    assert "accuracy (t) by source" not in sweep_row(seed, config, metrics)  # no labels.csv: no sources
    metrics["breakdowns"] = {"source": [{"group": "small", "n": 3, "accuracy": 2 / 3},
                                        {"group": "big", "n": 10, "accuracy": 0.9}]}
    row = sweep_row(seed, config, metrics)
    assert row["accuracy (t) by source"] == "big 0.900 (10), small 0.667 (3)"
    assert row["sensitivity at specificity >= 0.95"] == metrics["at_threshold"]["sens_at_spec95"]
    assert row["size (px)"] == config["recipe"]["size"]  # the size it trained at (fp32_size: the CPU's choice)


def test_the_plan_holds_each_recipe_exactly():
    "sweep.json's recipes come back equal to the planned ones (plans with patterns, policies, overrides)."
    from covid_fastai.recipes import recipe_from_dict
    from covid_fastai.sweep import plan_sweep
    recs = plan_sweep("*", policies="seed,modern", epochs=3, data="demo")
    assert len(recs) > 10 and any(r.plan.patterns for r in recs)
    for r in recs:
        assert recipe_from_dict(json.loads(json.dumps(dataclasses.asdict(r)))) == r
