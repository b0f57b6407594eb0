"Hyper-parameter search: a 4-trial Optuna search on generated data, resumable after a kill, pruned trials recorded, test untouched."
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

optuna = pytest.importorskip("optuna")
pytest.importorskip("optuna_integration")
from fastai.callback.core import Callback  # noqa: E402

import covid_fastai.data as data_mod  # noqa: E402
from covid_fastai import tune as tune_mod  # noqa: E402
from covid_fastai.cli import main  # noqa: E402
from covid_fastai.errors import RecipeError, RunInterrupted  # noqa: E402
from covid_fastai.recipes import load_recipe  # noqa: E402
from covid_fastai.tune import check_space, recipe_space, resume_tune, tune  # noqa: E402
from covid_fastai.tune_trials import storage  # noqa: E402

SPACE = {"lr": ("log", 1e-4, 1e-2), "dropout": ("float", 0.1, 0.5), "size": ("choice", [32, 40])}
TINY = dict(pretrained=False, bs=8, epochs=2)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class PruneOdd(optuna.pruners.BasePruner):
    "Prunes every odd-numbered trial as soon as it reports epoch 0; lets even ones finish."
    def prune(self, study, trial) -> bool: return trial.number % 2 == 1 and trial.last_step is not None


class StopInFit(Callback):
    "Ctrl-C in the middle of the n-th fit it sees (the n-th trial), once."
    def __init__(self, n): self.n, self.fits = n, 0
    def before_fit(self): self.fits += 1
    def after_batch(self):
        if self.fits == self.n and self.training: raise KeyboardInterrupt


class DecodeSentinel:
    "Records every test image decoded for a model (DecodeOnce -> open_xray), and whether the final step was running."
    def __init__(self, monkeypatch, tmp_path):
        self.in_final, self.during_trials, self.during_final = False, [], []
        real_open, real_final = data_mod.open_xray, tune_mod.score_test_once
        # nothing decoded earlier in the session hides a read: not the per-process cache, nor a shared decode store
        # that an earlier test built on disk over the same files
        monkeypatch.setattr(data_mod, "_DECODED", {})
        monkeypatch.setenv("COVID_FASTAI_CACHE", str(tmp_path / "cache"))

        def spy_open(fn, *a, **kw):
            if Path(fn).parent.parent.name == "test":
                (self.during_final if self.in_final else self.during_trials).append(Path(fn))
            return real_open(fn, *a, **kw)

        def spy_final(*a, **kw):
            self.in_final = True
            try: return real_final(*a, **kw)
            finally: self.in_final = False
        monkeypatch.setattr(data_mod, "open_xray", spy_open)
        monkeypatch.setattr(tune_mod, "score_test_once", spy_final)


def _states(tune_dir) -> dict:
    df = pd.read_csv(tune_dir / "trials.csv")
    assert df["trial"].is_unique
    return dict(zip(df["trial"], df["state"]))


def test_tune_resumes_after_a_kill_records_pruned_trials_and_scores_test_once(tiny_data, tmp_path, monkeypatch,
                                                                            one_thread, capsys):
    sentinel = DecodeSentinel(monkeypatch, tmp_path)
    # 1. trials 0 (complete) and 1 (pruned after epoch 0) finish; Ctrl-C stops trial 2 mid-fit
    with pytest.raises(RunInterrupted, match="the tune has 2 of 4 trials finished"):
        tune("effnet_lite0_head", trials=4, out=tmp_path, space=SPACE, pruner=PruneOdd(), cbs=[StopInFit(3)],
             data=str(tiny_data), **TINY)
    tune_dir = next((tmp_path / "tunes" / "effnet_lite0_head").iterdir())
    plan = json.loads((tune_dir / "tune.json").read_text())
    assert plan["status"] == "interrupted" and "final" not in plan
    assert _states(tune_dir) == {0: "COMPLETE", 1: "PRUNED", 2: "FAIL"}
    # ... and a kill -9 leaves a trial RUNNING in the storage (a worker that died without a word)
    study = optuna.load_study(study_name=plan["study"], storage=storage(tune_dir))
    assert study.ask().number == 3
    assert not sentinel.during_trials and not sentinel.during_final  # no test image reached a model

    # 2. resume: the orphan is recorded as failed, trials 4 (complete) and 5 (pruned) make 4 finished; then test once
    assert resume_tune(tune_dir, pruner=PruneOdd()) == tune_dir
    states = _states(tune_dir)
    assert states == {0: "COMPLETE", 1: "PRUNED", 2: "FAIL", 3: "FAIL", 4: "COMPLETE", 5: "PRUNED"}
    trials = pd.read_csv(tune_dir / "trials.csv").set_index("trial")
    assert trials.loc[2, "note"] == "interrupted" and "process stopped" in trials.loc[3, "note"]
    assert set(trials.columns) >= {"lr", "dropout", "size", "value", "run folder"}

    # every trial's run folder was evaluated on valid only; pruned ones stopped after one epoch and say so
    for n in (0, 1, 4, 5):
        run = tune_dir / trials.loc[n, "run folder"]
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["evaluate_on"] == "valid" and cfg["recipe"]["size"] == trials.loc[n, "size"]
        if states[n] == "PRUNED":
            assert cfg["status"] == "pruned" and len(pd.read_csv(run / "history.csv")) == 1
            assert not (run / "metrics.json").exists()
        else:
            m = json.loads((run / "metrics.json").read_text())
            assert m["split"] == "valid" and cfg["status"] == "complete"
            assert trials.loc[n, "value"] == pytest.approx(m["valid"]["at_0.5"]["roc_auc"])
        assert not (run / "evaluations").exists()  # the final score goes to the tune folder

    # the test split: untouched by every trial, scored once at the end, for the best complete trial
    assert not sentinel.during_trials
    assert sorted(set(sentinel.during_final)) == sorted(f for f in tiny_data.rglob("*.png") if f.parts[-3] == "test")
    plan = json.loads((tune_dir / "tune.json").read_text())
    best = max((n for n in (0, 4)), key=lambda n: trials.loc[n, "value"])
    assert plan["status"] == "complete" and plan["final"]["how"] == "evaluate" and plan["final"]["trial"] == best
    final = json.loads((Path(plan["final"]["dir"]) / "metrics.json").read_text())
    assert final["n"] == 12 and plan["final"]["test"]["accuracy"] == final["accuracy"]
    md = (tune_dir / "tune.md").read_text()
    assert "Test scored once, for the best trial" in md and f"(trial {best}:" in md
    assert "4 of 4 trials finished" in md and "| 1 | PRUNED |" in md
    for f in ("trials.md", "tune.html", "history.png", "importance.png", "intermediate.png", "study.db"):
        assert (tune_dir / f).stat().st_size > 0, f

    # a finished tune is not resumed again (test is never scored twice)
    with pytest.raises(SystemExit) as e:
        main(["resume", str(tune_dir)])
    assert e.value.code == 2 and "finished already" in capsys.readouterr().err


def test_proxies_leave_the_space_and_the_best_settings_rerun_at_full_settings(tiny_data, tmp_path, one_thread):
    d = tune("effnet_lite0_head", trials=1, out=tmp_path, space=SPACE, proxy_size=24, proxy_epochs=1,
             pruner="none", data=str(tiny_data), size=40, **TINY)
    plan = json.loads((d / "tune.json").read_text())
    assert plan["proxy_overrides"] == {"size": 24, "epochs": 1} and "size" not in plan["space"]
    trial_run = d / pd.read_csv(d / "trials.csv")["run folder"][0]
    assert json.loads((trial_run / "config.json").read_text())["recipe"]["size"] == 24
    assert len(pd.read_csv(trial_run / "history.csv")) == 1
    f = plan["final"]
    assert f["how"] == "rerun" and f["split"] == "test"
    full = json.loads((Path(f["dir"]) / "config.json").read_text())["recipe"]
    assert (full["size"], full["epochs"], full["lr"]) == (40, 2, pytest.approx(f["params"]["lr"]))
    assert "size 24, epochs 1 for every trial" in (d / "tune.md").read_text()


def test_trials_table_the_size_each_trial_trained_at_and_warns_when_they_differ(tiny_data, tmp_path, monkeypatch,
                                                                                 one_thread):
    # two Ray workers of two CPU kinds, simulated: the recipe's fp32_size applies on every other trial's "CPU"
    import covid_fastai.learner as L
    kinds = iter([True, False])
    monkeypatch.setattr(L, "fp32_cpu", lambda: next(kinds))
    d = tune("effnet_lite0_head", trials=2, out=tmp_path, space={"lr": ("log", 1e-4, 1e-2)}, pruner="none",
             final="none", data=str(tiny_data), size=32, fp32_size=24, **{**TINY, "epochs": 1})
    df = pd.read_csv(d / "trials.csv")
    assert sorted(df["size (px)"]) == [24, 32]
    assert "**The trials trained at different input sizes (24, 32 px)**" in (d / "tune.md").read_text()


def test_space_checks_and_recipe_space(tmp_path):
    rec = load_recipe("effnet_lite0_head")
    assert check_space(SPACE, rec)["size"] == ["choice", [32, 40]]
    for bad, msg in [({"lrr": ("log", 1e-4, 1e-2)}, "not a recipe option"), ({"lr": ("log", 0, 1)}, "bad search spec"),
                     ({"dropout": ("float", 0.1, 1.5)}, "dropout"), ({"size": ("choice", [])}, "bad search spec")]:
        with pytest.raises(RecipeError, match=msg): check_space(bad, rec)
    f = tmp_path / "spaced.py"
    f.write_text(Path(rec.source).read_text() + '\nspace = {"lr": ("log", 1e-5, 1e-3)}\n')
    assert recipe_space(load_recipe(str(f))) == {"lr": ("log", 1e-5, 1e-3)}
    assert recipe_space(rec) is None


def test_without_the_extra_tune_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    with pytest.raises(SystemExit) as e:
        main(["tune", "effnet_lite0_head", "--trials", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and 'pip install -e ".[tune]"' in err[0] and "optuna" in err[0]


@pytest.mark.slow  # a local Ray and two worker processes importing torch: about a minute on 2 busy cores
def test_ray_engine_runs_trials_as_parallel_workers_on_the_shared_storage(tiny_data, tmp_path):
    pytest.importorskip("ray")
    d = tune("effnet_lite0_head", trials=2, out=tmp_path, engine="ray", workers=2, cpus_per_trial=1, pruner="none",
             space={"lr": ("log", 1e-4, 1e-2), "dropout": ("float", 0.1, 0.5)}, data=str(tiny_data), size=32,
             **{**TINY, "epochs": 1})
    df = pd.read_csv(d / "trials.csv")
    assert list(df["state"]) == ["COMPLETE", "COMPLETE"] and df["lr"].nunique() == 2  # each worker drew its own
    assert json.loads((d / "tune.json").read_text())["final"]["split"] == "test"
