"""Bad input, faults and resumption (issue 6): every case builds its bad input and asserts the outcome.

Runs are tiny (random init, 32 px, batch 8) so the whole file stays within a few tens of seconds.
"""
import dataclasses
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.vision.all import Callback
from PIL import Image
from safetensors.torch import load_file

from covid_fastai.cli import main
from covid_fastai.plans import freeze_to
from covid_fastai.recipes import load_recipe
from covid_fastai.errors import Command, RunFolderError, RunInterrupted, UserError, recipe_command
from covid_fastai.rundir import RunDir
from covid_fastai.export import load_export
from covid_fastai.rundir import CHECKPOINT, new_run_dir
from covid_fastai.train import resume, run_recipe
from test_images import gradient, write_dicom

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(pretrained=False, size=32, bs=8)
TINY_ARGS = ["--pretrained", "false", "--size", "32", "--bs", "8"]


def main_exit(args, capsys):
    "Run the CLI in-process: (exit code, stderr lines)."
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err.strip().splitlines()


# ---------------------------------------------------------------- messy data: every kind of odd file

BAD = {  # file (relative to the data folder) -> what check/run must say about it
    "train/normal/zero_bytes.jpg": "empty file (0 bytes)",
    "train/infected/notes.jpg": "not an image",
    "valid/normal/truncated.jpg": "truncated or corrupt",
    "test/infected/report.dcm": "no pixel data",
}


@pytest.fixture(scope="module")
def messy_data(tiny_data, tmp_path_factory):
    "tiny_data plus unreadable files, odd-but-valid images (16-bit, RGBA, palette, CMYK, EXIF, 8x8, DICOM) and a duplicate."
    root = tmp_path_factory.mktemp("messy") / "cxr"
    shutil.copytree(tiny_data, root)
    (root / "train/normal/zero_bytes.jpg").write_bytes(b"")
    (root / "train/infected/notes.jpg").write_text("patient list, not an image\n" * 10)
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128), np.uint8)).save(b, "JPEG")
    (root / "valid/normal/truncated.jpg").write_bytes(b.getvalue()[: len(b.getvalue()) // 2])
    write_dicom(root / "test/infected/report.dcm", None)
    # readable oddities, which must train like any other image
    Image.fromarray(gradient(hi=4095, dtype=np.uint16)).save(root / "train/infected/x16.png")
    Image.fromarray(gradient()).convert("RGBA").save(root / "train/normal/rgba.png")
    Image.fromarray(gradient()).convert("RGB").convert("P", palette=Image.ADAPTIVE).save(root / "train/normal/pal.png")
    Image.fromarray(gradient()).convert("RGB").convert("CMYK").save(root / "train/infected/cmyk.jpg", "JPEG")
    Image.fromarray(gradient(8, 8)).save(root / "train/normal/tiny8.png")
    Image.fromarray(gradient()).save(root / "train/infected/png_named.jpg", "PNG")
    write_dicom(root / "train/infected/chest.dcm", gradient(64, 64, 4095, np.uint16), "MONOCHROME1",
                slope=1.0, intercept=0.0, center=2048, width=4096)
    # the same bytes in train and test: leakage `check` must point out
    shutil.copy(root / "train/normal" / sorted(p.name for p in (root / "train/normal").glob("synthetic*"))[0],
                root / "test/normal/copy_of_train.png")
    return root


def test_check_lists_problems_counts_and_duplicates(messy_data, capsys):
    main(["check", "--data", str(messy_data)])  # returns: exit status 0
    out = capsys.readouterr().out
    for f, reason in BAD.items():
        assert re.search(rf"^  {re.escape(f)}: .*{re.escape(reason)}", out, re.M), (f, out)
    assert "unreadable files (4)" in out
    # counts per split and class: readable, unreadable (train/infected: 12 + 4 odd readable files, 1 unreadable)
    assert re.search(r"^train\s+infected\s+16\s+1$", out, re.M) and re.search(r"^valid\s+normal\s+6\s+1$", out, re.M)
    assert re.search(r"^test\s+normal\s+7\s+0$", out, re.M)
    assert "duplicates across splits (1 group" in out and "test/normal/copy_of_train.png" in out
    assert "ok: usable for training (4 file(s) will be skipped)" in out
    # --strict turns findings into exit status 1
    code, _ = main_exit(["check", "--data", messy_data, "--strict", "true"], capsys)
    assert code == 1


def test_run_on_messy_data_skips_and_reports(messy_data, tmp_path):
    with pytest.warns(UserWarning, match="skipped 4 unreadable image file"):
        d = run_recipe("resnet18_one", out=tmp_path, data=str(messy_data), epochs=1, **TINY)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["status"] == "complete" and cfg["data"]["skipped"]["count"] == 4
    assert {str(Path(s["file"]).relative_to(messy_data)) for s in cfg["data"]["skipped"]["files"]} == set(BAD)
    assert cfg["data"]["counts"]["train"] == {"infected": 16, "normal": 15}  # the odd files trained
    rep = (d / "report.md").read_text()
    assert "## Skipped files" in rep and "4 unreadable file(s)" in rep and "zero_bytes.jpg | empty file" in rep


def test_check_fatal_and_labels_csv(tiny_data, tmp_path, capsys):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    pd.DataFrame({"file": files[1:] + ["train/normal/gone.png"], "label": "x"}).to_csv(root / "labels.csv", index=False)
    code = None
    try: main(["check", "--data", str(root)])
    except SystemExit as e: code = e.code
    out = capsys.readouterr().out
    assert code is None and f"labels.csv: {len(files)} rows; 1 image(s) not listed, 1 listed file(s) missing" in out
    assert f"not listed: {files[0]}" in out and "missing: train/normal/gone.png" in out
    # a data folder made of symlinks to the split folders (as a view without test/ is): rows still join
    view = tmp_path / "view"
    view.mkdir()
    for s in ("train", "valid", "test"): (view / s).symlink_to(root / s, target_is_directory=True)
    pd.DataFrame({"file": files, "label": "x"}).to_csv(view / "labels.csv", index=False)
    main(["check", "--data", str(view)])
    assert f"labels.csv: {len(files)} rows; 0 image(s) not listed" in capsys.readouterr().out
    # one image listed twice with different values: refused by check and by a run, before any training
    pd.DataFrame({"file": files + files[:1], "label": "x", "fine_label": ["covid"] * len(files) + ["normal"]}).to_csv(
        root / "labels.csv", index=False)
    msg = (f"error: {root}/labels.csv lists {files[0]!r} more than once with different values (lines 2, "
           f"{len(files) + 2}): keep one row per image")
    assert main_exit(["check", "--data", root], capsys) == (2, [msg])
    assert main_exit(["recipe", "resnet18_head", "--data", root, "--out", tmp_path / "o", *TINY_ARGS], capsys) == (2, [msg])
    assert not (tmp_path / "o").exists()
    # a labels.csv pointing outside the data folder is refused
    (root / "labels.csv").write_text("file,label\n../../etc/passwd,normal\n")
    code, err = main_exit(["check", "--data", root], capsys)
    assert code == 2 and len(err) == 1 and "is outside the data folder" in err[0] and "../../etc/passwd" in err[0]
    # a class with no readable image is fatal
    (root / "labels.csv").unlink()
    for p in (root / "test/normal").iterdir(): p.write_bytes(b"")
    code, err = main_exit(["check", "--data", root], capsys)
    assert code == 2 and err == [f"error: {root} cannot be trained on: class folder {root}/test/normal has no "
                                 f"readable image: add readable images or remove the folder"]


# ---------------------------------------------------------------- folder layout and arguments: one line, exit 2

def _layout(tiny_data, tmp_path, breakage):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    if breakage == "no_train": shutil.rmtree(root / "train")
    if breakage == "empty_class":
        for p in (root / "train/normal").iterdir(): p.unlink()
    if breakage == "one_class": shutil.rmtree(root / "train/normal")
    if breakage == "test_classes_differ": (root / "test/normal").rename(root / "test/healthy")
    return root


@pytest.mark.parametrize("breakage, expect", [
    ("missing", "data folder {root} does not exist: pass --data DIR"),
    ("no_train", "{root} has no train/ folder: put images in {root}/train/<class>/"),
    ("empty_class", "class folder {root}/train/normal has no images: add images or remove the folder"),
    ("one_class", "{root}/train needs at least 2 class folders, found ['infected']"),
    ("test_classes_differ", "{root}/test has class folders ['healthy'] that train/ lacks"),
])
def test_layout_errors_from_the_cli(tiny_data, tmp_path, capsys, breakage, expect):
    root = tmp_path / "nope" if breakage == "missing" else _layout(tiny_data, tmp_path, breakage)
    out = tmp_path / "out"
    code, err = main_exit(["recipe", "resnet18_head", "--data", root, "--out", out, *TINY_ARGS], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expect.format(root=root) in err[0], err
    assert not out.exists()  # nothing half-made
    code, err = main_exit(["check", "--data", root], capsys)  # check says the same
    assert code == 2 and expect.format(root=root) in err[0]


@pytest.mark.parametrize("args, expect", [
    (["recipe", "vgg16_hed"], "unknown recipe 'vgg16_hed': did you mean vgg16_head"),
    (["recipe", "vgg16_head", "--epochs", "-1"], "--epochs must be a positive whole number, got -1"),
    (["recipe", "vgg16_head", "--epochs", "ten"], "--epochs must be a positive whole number, got 'ten'"),
    (["recipe", "vgg16_head", "--lr", "-0.1"], "--lr must be a positive number, got -0.1"),
    (["recipe", "vgg16_head", "--lr", "fast"], "--lr must be a positive number, got 'fast'"),
    (["recipe", "vgg16_head", "--bs", "-8"], "--bs must be a positive whole number, got -8"),
    (["recipe", "vgg16_head", "--bs", "big"], "--bs must be a positive whole number, got 'big'"),
    (["recipe", "vgg16_head", "--reproducible", "sometimes"], "--reproducible must be true or false"),
    (["recipe", "vgg16_head", "--export", "perhaps"], "--export must be true or false"),
])
def test_bad_arguments(args, expect, capsys, tmp_path):
    code, err = main_exit([*args, "--out", tmp_path], capsys)
    assert code == 2 and len(err) == 1 and expect in err[0], err
    assert not any(tmp_path.iterdir())


def test_unknown_layer_pattern_lists_valid_names(tiny_data, tmp_path, capsys):
    f = tmp_path / "bad_layers.py"
    f.write_text("from covid_fastai import Recipe, layers\n"
                 "recipe = Recipe(name='bad_layers', arch='resnet18.tv_in1k', plan=layers('layer9'))\n")
    code, err = main_exit(["recipe", f, "--data", tiny_data, "--out", tmp_path / "o", *TINY_ARGS], capsys)
    assert code == 2 and len(err) == 1, err
    assert "layer pattern 'layer9' matches no module of resnet18.tv_in1k: valid names are" in err[0]
    assert all(n in err[0] for n in ("conv1", "layer1", "layer4.1", "layer3.0"))
    assert not (tmp_path / "o").exists()


def test_output_folder_not_writable(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a path under a regular file can never be created, even as root
    code, err = main_exit(["recipe", "resnet18_head", "--data", tiny_data, "--out", blocker / "runs", *TINY_ARGS], capsys)
    assert code == 2 and len(err) == 1
    assert f"cannot create output folder {blocker}/runs/resnet18_head" in err[0] and "--out DIR" in err[0]


def test_disk_full_while_saving(tiny_data, tmp_path, capsys, monkeypatch):
    from covid_fastai import train

    def full(tensors, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(train, "save_file", full)
    code, err = main_exit(["recipe", "resnet18_one", "--data", tiny_data, "--epochs", 1, "--out", tmp_path,
                           *TINY_ARGS], capsys)
    (d,) = (tmp_path / "resnet18_one").iterdir()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: disk full while writing {d}/model.safetensors")
    assert f"continue it with `python -m covid_fastai resume {d}`" in err[0]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["status"] == "failed" and "disk full" in cfg["error"]
    # the finished epoch's checkpoint survives, so the run can be finished once there is space
    monkeypatch.undo()
    d2 = resume(d)
    assert d2 == d and json.loads((d / "config.json").read_text())["status"] == "complete"


def test_debug_shows_the_traceback(capsys, tmp_path):
    with pytest.raises(UserError, match="unknown recipe"):
        main(["recipe", "no_such_recipe", "--debug"])


# ---------------------------------------------------------------- interruptions and resume

class StopAfter(Callback):
    "Test-only: Ctrl-C (KeyboardInterrupt) right after epoch `n` finished and was checkpointed."
    order = 95

    def __init__(self, n, exc=KeyboardInterrupt): self.n, self.exc = n, exc

    def after_epoch(self):
        if self.epoch == self.n: raise self.exc("boom")


def _same_run(a: Path, b: Path):
    "Two run folders hold the same result: metrics, per-epoch history (not timings) and weights."
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for k in ("accuracy", "per_class", "confusion_matrix", "n"): assert ma[k] == mb[k], k
    ha, hb = (pd.read_csv(d / "history.csv").drop(columns=["train_seconds", "epoch_seconds"]) for d in (a, b))
    pd.testing.assert_frame_equal(ha, hb, check_exact=False, rtol=0, atol=1e-6)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)


@pytest.mark.parametrize("recipe, schedule, extra, stop", [
    ("resnet18_one", "one_cycle", {}, 0),                      # full Learner, 1cycle schedule
    ("resnet18_head", "constant", {"cache_features": "on"}, 0),   # head on cached features
    # stopped after the last epoch's checkpoint (as by Ctrl-C during evaluation): no epoch left to run, yet the
    # TTA that follows must draw the same augmentations and the timings must survive
    ("resnet18_one", "one_cycle", {"tta": "true"}, 2),
    # a plan that unfreezes after epoch 0: the resumed fit starts frozen, as the plan says, and thaws at once
    (dataclasses.replace(load_recipe("resnet18_full"), plan=freeze_to(3, freeze_epochs=1)), "one_cycle", {}, 0)],
    ids=["one_cycle", "cached", "tta_after_last", "thaw_at_resume"])
def test_interrupted_run_resumes_to_the_same_result(tiny_data, tmp_path, recipe, schedule, extra, stop):
    kw = dict(data=str(tiny_data), epochs=3, schedule=schedule, **TINY, **extra)
    full = run_recipe(recipe, out=tmp_path / "full", **kw)
    with pytest.raises(RunInterrupted) as e:
        run_recipe(recipe, out=tmp_path / "cut", cbs=[StopAfter(stop)], **kw)
    (d,) = (tmp_path / "cut" / getattr(recipe, "name", recipe)).iterdir()
    assert (e.value.run_dir, e.value.epochs_done, e.value.command) == (d, stop + 1, Command("resume", (str(d),)))
    assert e.value.fix == "continue it with {command}" and isinstance(e.value.__cause__, KeyboardInterrupt)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["status"] == "interrupted" and cfg["resume"] == f"continue it with `resume('{d}')`"
    assert not (d / "metrics.json").exists() and len(pd.read_csv(d / "history.csv")) == stop + 1
    ckpt = torch.load(d / CHECKPOINT, weights_only=True)  # plain tensors and numbers: no pickle needed
    assert ckpt["epoch"] == stop and ckpt["n_epoch"] == 3
    assert resume(d) == d
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["status"] == "complete" and [r["from_epoch"] for r in cfg["resumed"]] == [stop + 1]
    m = json.loads((d / "metrics.json").read_text())
    assert m["train_seconds"] > 0 and m["train_images_per_s"] > 0  # the interrupted process's epochs count
    pa, pb = (pd.read_csv(x / "predictions.csv") for x in (full, d))
    p_cols = [c for c in pa.columns if c.startswith("p_")]
    np.testing.assert_allclose(pa[p_cols].to_numpy(), pb[p_cols].to_numpy(), rtol=0, atol=1e-6)
    assert list(pd.read_csv(d / "history.csv")["epoch"]) == [0, 1, 2]
    assert not (d / CHECKPOINT).exists()  # a complete run keeps model.safetensors only
    assert (cfg["speed"]["cached_features"] is not None) == (recipe == "resnet18_head")
    _same_run(full, d)


def signal_at_first_checkpoint(args, run_parent: Path, sig) -> subprocess.Popen:
    "Start the CLI with `args`, send `sig` once a run folder under `run_parent` has a checkpoint; the finished process."
    p = subprocess.Popen([sys.executable, "-m", "covid_fastai", *map(str, args)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(run_parent.glob("*/" + CHECKPOINT)) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(sig)
    p.out, p.err = p.communicate(timeout=120)
    return p


def test_kill_marks_interrupted_then_cli_resume(tiny_data, tmp_path, capsys):
    args = ["recipe", "resnet18_one", "--data", tiny_data, "--epochs", 12, "--out", tmp_path, *TINY_ARGS]
    p = signal_at_first_checkpoint(args, tmp_path / "resnet18_one", signal.SIGTERM)  # `kill`
    err = p.err
    (d,) = (tmp_path / "resnet18_one").iterdir()
    if p.returncode == 0:
        pytest.skip("the run finished before the signal arrived (machine too fast for 12 tiny epochs)")
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert f"interrupted: {d} is marked incomplete" in err and f"python -m covid_fastai resume {d}" in err
    assert json.loads((d / "config.json").read_text())["status"] == "interrupted"
    main(["recipe", "resnet18_one", "--resume", str(d)])  # same as `resume RUN_DIR`
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"{d}: test accuracy")
    assert json.loads((d / "config.json").read_text())["status"] == "complete"
    assert list(pd.read_csv(d / "history.csv")["epoch"]) == list(range(12))


def test_failed_run_is_marked_failed(tiny_data, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        run_recipe("resnet18_one", out=tmp_path, cbs=[StopAfter(0, RuntimeError)], data=str(tiny_data),
                   epochs=2, **TINY)
    (d,) = (tmp_path / "resnet18_one").iterdir()
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["status"] == "failed" and cfg["error"].startswith("RuntimeError: ") and cfg["error"].endswith("boom") and "stopped" in cfg


def test_resume_refusals(tiny_data, tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        run_recipe("resnet18_head", out=tmp_path, cbs=[StopAfter(0)], data=str(tiny_data), epochs=2, **TINY)
    (d,) = (tmp_path / "resnet18_head").iterdir()
    capsys.readouterr()  # the run's own 'interrupted: ...' line
    code, err = main_exit(["recipe", "vgg16_head", "--resume", d], capsys)
    assert code == 2 and "is a run of recipe 'resnet18_head', not 'vgg16_head'" in err[0]
    code, err = main_exit(["recipe", "resnet18_head", "--resume", d, "--epochs", 5], capsys)
    assert code == 2 and "drop --epochs" in err[0]
    code, err = main_exit(["resume", tmp_path], capsys)
    assert code == 2 and f"{tmp_path} is not a run folder (no config.json) nor a sweep folder" in err[0]
    with RunDir(d).lock():  # the run (or another resume) still going in some process
        with pytest.raises(RunFolderError, match="is in use by another process"):
            resume(d)
    good = (d / CHECKPOINT).read_bytes()
    (d / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(RunFolderError, match=rf"{CHECKPOINT} cannot be read .*start it again") as e:
        resume(d)
    assert e.value.command == recipe_command("resnet18_head")
    (d / CHECKPOINT).write_bytes(good)
    resume(d)
    code, err = main_exit(["resume", d], capsys)
    assert code == 2 and err == [f"error: {d} finished already (status complete): nothing to resume; start a new "
                                 f"run with `python -m covid_fastai recipe resnet18_head`"]


def test_resume_follows_the_images_bytes_not_their_file_times(tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    with pytest.raises(KeyboardInterrupt):
        run_recipe("resnet18_head", out=tmp_path / "o", cbs=[StopAfter(0)], data=str(data), epochs=2, **TINY)
    (d,) = (tmp_path / "o" / "resnet18_head").iterdir()
    capsys.readouterr()
    f = next((data / "train" / "normal").iterdir())
    good = f.read_bytes()
    f.write_bytes(next((data / "train" / "infected").iterdir()).read_bytes())  # an image really changed
    code, err = main_exit(["resume", d], capsys)
    assert code == 2 and err == [f"error: the images under {data} changed since {d} started (files added, removed or "
                                 f"modified): resuming would not continue the same run; start a new one instead"]
    f.write_bytes(good)
    for g in data.rglob("*.*"):  # the same images provisioned again: new modification times, same bytes
        os.utime(g, ns=(10**18, 10**18))
    resume(d)
    assert json.loads((d / "config.json").read_text())["status"] == "complete"


def test_resume_refuses_changed_labels(fine_labelled, tmp_path, capsys):
    "Same images, other targets (labels.csv edited): the run would not continue as it started."
    data = fine_labelled.root
    with pytest.raises(KeyboardInterrupt):
        run_recipe("resnet18_head", out=tmp_path / "o", cbs=[StopAfter(0)], data=str(data), epochs=2,
                   labels="fine_label", **TINY)
    (d,) = (tmp_path / "o" / "resnet18_head").iterdir()
    capsys.readouterr()
    fine_labelled.relabel_one_training_film()
    code, err = main_exit(["resume", d], capsys)
    assert code == 2 and err == [f"error: the labels of the images under {data} changed since {d} started (labels.csv "
                                 f"or the class folders): resuming would not continue the same run; start a new one "
                                 f"instead"]


# ---------------------------------------------------------------- reproducibility, run folders

def test_same_seed_same_metrics_with_reproducible(tiny_data, tmp_path):
    a, b = (run_recipe("resnet18_one", out=tmp_path, data=str(tiny_data), epochs=2, reproducible=True, **TINY)
            for _ in range(2))
    assert a != b
    _same_run(a, b)
    assert json.loads((a / "config.json").read_text())["recipe"]["reproducible"] is True
    assert not torch.are_deterministic_algorithms_enabled()  # switched off again after the run


def test_concurrent_runs_get_distinct_folders(tmp_path):
    with ThreadPoolExecutor(8) as ex:
        dirs = list(ex.map(lambda _: new_run_dir(tmp_path, "resnet18_head"), range(16)))
    assert len(set(dirs)) == 16 and all(d.is_dir() and not any(d.iterdir()) for d in dirs)


# ---------------------------------------------------------------- security

def test_every_torch_load_is_weights_only():
    calls = []
    for f in (ROOT / "covid_fastai").glob("*.py"):
        src = f.read_text()
        for m in re.finditer(r"torch\.load\(", src):
            depth, i = 1, m.end()
            while depth: depth += {"(": 1, ")": -1}.get(src[i], 0); i += 1
            calls.append((f.name, src[m.start():i]))
    assert calls and all("weights_only=True" in c for _, c in calls), calls


def test_export_pkl_only_on_request_and_loaded_only_when_trusted(tiny_data, tiny_run, tmp_path, capsys):
    assert not (tiny_run / "export.pkl").exists()
    d = run_recipe("resnet18_one", out=tmp_path, data=str(tiny_data), epochs=1, export=True, **TINY)
    pkl = d / "export.pkl"
    assert pkl.is_file()
    with pytest.raises(UserError, match="is a pickle .*loading it can run arbitrary code.*trust=True"):
        load_export(pkl)
    with pytest.warns(UserWarning, match="loading pickled Learner"):
        learn = load_export(pkl, trust=True)
    img = next((tiny_data / "test/normal").iterdir())
    label, _, probs = learn.predict(img)
    assert label in ("infected", "normal") and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)


def test_interrupted_before_any_epoch_says_start_again(tiny_data, tmp_path, capsys):
    class StopAtStart(Callback):
        def before_epoch(self): raise KeyboardInterrupt
    with pytest.raises(RunInterrupted) as e:
        run_recipe("resnet18_one", out=tmp_path, cbs=[StopAtStart()], data=str(tiny_data), epochs=2, **TINY)
    (d,) = (tmp_path / "resnet18_one").iterdir()
    assert e.value.message() == (f"{d} is marked incomplete; no epoch had finished, so start it again "
                                 f"(`run_recipe('resnet18_one')`)")
    assert e.value.command == recipe_command("resnet18_one") and e.value.epochs_done == 0
    assert "marked incomplete" not in capsys.readouterr().err  # the library prints nothing: the CLI says it
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["status"] == "interrupted" and "resume" not in cfg and cfg["data"]["counts"]
    code, err = main_exit(["resume", d], capsys)
    assert code == 2 and f"{d} has no {CHECKPOINT}: it stopped before its first epoch finished" in err[0]


class _AlwaysNormal(Callback):
    "Validation logits that favour 'normal' for every image: what a diverged fit looks like from outside."
    def after_pred(self):
        if not self.training: self.learn.pred = torch.tensor([-5.0, 5.0]).expand(len(self.pred), 2).clone()


@pytest.mark.parametrize("cache", ["off", "on"])  # on: a head-only Learner on cached features, which has no vocab
def test_one_class_validation_is_warned_and_recorded(tiny_data, tmp_path, capsys, cache):
    d = run_recipe("resnet18_head", out=tmp_path, data=str(tiny_data), epochs=2, cache_features=cache,
                   cbs=[_AlwaysNormal()], **TINY)
    cfg = json.loads((d / "config.json").read_text())
    assert [w.split(":")[0] for w in cfg["warnings"]] == ["epoch 0", "epoch 1"]
    assert all("every validation image was predicted 'normal'" in w for w in cfg["warnings"])
    assert "warning: epoch 1: every validation image was predicted 'normal'" in capsys.readouterr().out
    assert "> **Warning:** epoch 0: every validation image" in (d / "report.md").read_text()


def test_one_class_message_only_for_one_predicted_class_of_several():
    from covid_fastai.callbacks import one_class_message
    vocab = ["infected", "normal"]
    assert one_class_message(3, [0, 8], [3, 5], vocab).startswith("epoch 3: every validation image was predicted 'normal'")
    assert one_class_message(3, [2, 6], [3, 5], vocab) is None  # both classes predicted
    assert one_class_message(3, [0, 8], [0, 8], vocab) is None  # a one-class validation split: nothing to say
