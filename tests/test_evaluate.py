"""A finished run's clinical evaluation: the numbers in metrics.json against scikit-learn on its own
predictions; `evaluate` and `predict` on folders; breakdowns from labels.csv; TTA; the three-class mode; the
HTML report in headless Chromium. One small run (conftest's `tiny_run`) serves most tests."""
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn import metrics as skm

from covid_fastai.cli import main
from covid_fastai.train import run_recipe

ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "covid_fastai", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture
def run_dir(tiny_run) -> Path:
    return tiny_run  # conftest.py: one run per test session


def test_run_metrics_match_sklearn_on_its_predictions(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    pred = pd.read_csv(run_dir / "predictions.csv")
    y, p = (pred["true"] == "infected").to_numpy().astype(int), pred["p_infected"].to_numpy()
    t = m["threshold"]["value"]
    assert (pred["label"] == np.where(p >= t, "infected", "normal")).all()
    yhat = (p >= t).astype(int)
    at = m["at_threshold"]
    assert at["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-6)
    assert at["pr_auc"] == pytest.approx(skm.average_precision_score(y, p), abs=1e-6)
    assert at["sensitivity"] == pytest.approx(skm.recall_score(y, yhat))
    assert at["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - yhat))
    assert at["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, yhat))
    assert m["at_0.5"]["sensitivity"] == pytest.approx(skm.recall_score(y, (p >= 0.5).astype(int)))
    for k, ci in at["ci95"].items():
        if ci is not None and at[k] is not None: assert ci[0] - 1e-9 <= at[k] <= ci[1] + 1e-9, k
    rep = (run_dir / "report.md").read_text()
    assert "## Clinical metrics: infected vs the rest" in rep and "roc_pr.png" in rep and "calibration.png" in rep


def test_evaluate_command_reproduces_the_run_and_never_overwrites(run_dir, tiny_data, capsys):
    r = cli("evaluate", run_dir, "--data", tiny_data)  # from the shell once; in-process the second time
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sensitivity" in r.stdout and "ROC AUC" in r.stdout and len(r.stdout.strip().splitlines()) == 1
    main(["evaluate", str(run_dir), "--data", str(tiny_data)])
    outs = [Path(s.split(":")[0]) for s in (r.stdout, capsys.readouterr().out)]
    assert outs[0] != outs[1] and all(o.parent == run_dir / "evaluations" for o in outs)
    a, b = (json.loads(p.read_text()) for p in (run_dir / "metrics.json", outs[0] / "metrics.json"))
    assert b["threshold"]["value"] == a["threshold"]["value"] and b["n"] == a["n"]  # the run's threshold, unchanged
    for k in ("sensitivity", "specificity", "roc_auc", "pr_auc"):
        assert b["at_threshold"][k] == pytest.approx(a["at_threshold"][k], abs=0.02), k
    for f in ("report.md", "report.html", "predictions.csv", "roc_pr.png", "calibration.png", "worst_normal.png"):
        assert (outs[0] / f).is_file(), f


def test_evaluate_breakdowns_from_labels_csv(run_dir, tiny_data, tmp_path):
    data = tmp_path / "eval"
    shutil.copytree(tiny_data / "test", data)
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    src = ["siteA" if i % 2 else "siteB" for i in range(len(files))]
    pd.DataFrame({"file": files, "label": [f.split("/")[0] for f in files], "source": src}).to_csv(
        data / "labels.csv", index=False)
    from covid_fastai.evaluate import evaluate_run
    d = evaluate_run(run_dir, data, threshold=0.5)
    m = json.loads((d / "metrics.json").read_text())
    rows = {r["group"]: r for r in m["breakdowns"]["source"]}
    assert set(rows) == {"siteA", "siteB"} and sum(r["n"] for r in rows.values()) == len(files)
    pred = pd.read_csv(d / "predictions.csv")
    pred["source"] = [src[files.index(Path(f).relative_to(data).as_posix())] for f in pred["file"]]
    part = pred[pred["source"] == "siteA"]
    assert rows["siteA"]["accuracy"] == pytest.approx(((part["p_infected"] >= 0.5) == (part["true"] == "infected")).mean())
    assert m["threshold"]["chosen_on"] == "command line" and "By source" in (d / "report.md").read_text()


def test_predict_csv_and_heatmaps(run_dir, tiny_data, tmp_path, capsys):
    one = next((tiny_data / "valid" / "normal").iterdir())
    out = tmp_path / "p" / "preds.csv"
    main(["predict", str(run_dir), str(tiny_data / "test"), str(one), "--out", str(out), "--heatmaps"])
    assert capsys.readouterr().out.strip() == f"{out}: 13 images"
    df = pd.read_csv(out)
    assert len(df) == len(list((tiny_data / "test").rglob("*.png"))) + 1 and str(one) == df["file"].iloc[-1]
    t = json.loads((run_dir / "metrics.json").read_text())["threshold"]["value"]
    assert ((df["p_infected"] >= t) == (df["label"] == "infected")).all() and df["p_infected"].between(0, 1).all()
    with Image.open(df["heatmap"].iloc[0]) as im: assert im.size == (64, 64)
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run_dir), str(one), "--out", str(out)])
    assert e.value.code == 2 and "exists" in capsys.readouterr().err
    first = Path(df["heatmap"].iloc[0]).read_bytes()
    with pytest.raises(SystemExit) as e:  # another file, same stem: the heatmap folder would be shared
        main(["predict", str(run_dir), str(one), "--out", str(out.with_suffix(".txt")), "--heatmaps"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == f"error: {out.parent / 'preds_heatmaps'} exists: pass another --out " \
                                        f"(heatmaps never overwrite)"
    assert Path(df["heatmap"].iloc[0]).read_bytes() == first and not out.with_suffix(".txt").exists()


def test_predict_threshold_and_evaluate_out(run_dir, tiny_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "p.csv"
    main(["predict", str(run_dir), str(tiny_data / "test"), "--threshold", "0.99", "--out", str(out)])
    df = pd.read_csv(out)
    assert ((df["p_infected"] >= 0.99) == (df["label"] == "infected")).all()
    main(["evaluate", str(run_dir), "--data", str(tiny_data), "--threshold", "0.4", "--out", str(tmp_path / "ev")])
    (ev,) = (tmp_path / "ev" / "evaluations").iterdir()
    assert json.loads((ev / "metrics.json").read_text())["threshold"]["value"] == 0.4
    capsys.readouterr()
    import covid_fastai.evaluate as E  # an existing --out is refused before the model is loaded and run

    monkeypatch.setattr(E, "load_run", lambda *a, **k: pytest.fail("loaded the run before refusing --out"))
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run_dir), str(tiny_data / "test"), "--out", str(out)])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == \
        f"error: {out} exists: pass another --out (predictions never overwrite)"


def test_evaluate_on_one_class_says_undefined_without_warnings(run_dir, tiny_data, tmp_path):
    from covid_fastai.evaluate import evaluate_run
    one = tmp_path / "only" / "infected"
    shutil.copytree(tiny_data / "test" / "infected", one)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # sklearn's and matplotlib's complaints about one class
        d = evaluate_run(run_dir, tmp_path / "only", out=tmp_path / "ev")
    m = json.loads((d / "metrics.json").read_text())
    assert m["balanced_accuracy"] is None and m["at_0.5"]["roc_auc"] is None and m["at_0.5"]["specificity"] is None
    assert m["n"] == len(list(one.iterdir()))


def test_grad_cam_explains_the_class_shown(run_dir, tiny_data, tmp_path, monkeypatch):
    "Grids: the (TTA) prediction in the title; predict: the CSV's label. Not one plain pass's own argmax."
    import covid_fastai.evaluate as E
    import covid_fastai.interpret as I
    seen = []
    real = I.cam_images

    def spy(learn, files, target=None):
        seen.append((list(map(str, files)), target))
        return real(learn, files, target)
    monkeypatch.setattr(I, "cam_images", spy)
    monkeypatch.setattr(E, "cam_images", spy)
    d = E.evaluate_run(run_dir, tiny_data, tta=True, out=tmp_path / "ev")
    pred = pd.read_csv(d / "predictions.csv").set_index("file")
    shown = [(f, t) for files, tgt in seen for f, t in zip(files, tgt)]
    assert shown and all(t == (0 if pred.loc[f, "p_infected"] >= 0.5 else 1) for f, t in shown)  # argmax of TTA
    seen.clear()
    out = tmp_path / "p.csv"
    E.predict_run(run_dir, [tiny_data / "test"], out=out, heatmaps=True)
    df = pd.read_csv(out).set_index("file")
    shown = [(f, t) for files, tgt in seen for f, t in zip(files, tgt)]
    assert len(shown) == len(df) and all(["infected", "normal"][t] == df.loc[f, "label"] for f, t in shown)


def test_evaluate_threshold_rule_is_one_line(run_dir, tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(run_dir), "--data", str(tiny_data), "--threshold", "youden", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == ("error: --threshold must be a number between 0 and 1, got 'youden' (the run's "
                                         "own threshold, chosen on its validation split, is the default)")
    assert not (tmp_path / "o").exists()


def test_predict_lists_unreadable_files_instead_of_crashing(run_dir, tiny_data, tmp_path, capsys):
    one = next((tiny_data / "valid" / "normal").iterdir())
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    out = tmp_path / "preds.csv"
    with pytest.warns(UserWarning, match="skipped 1 unreadable file"):
        main(["predict", str(run_dir), str(one), str(bad), "--out", str(out)])
    df = pd.read_csv(out, keep_default_na=False)
    assert list(df["file"]) == [str(one), str(bad)]
    assert df["error"].iloc[0] == "" and df["error"].iloc[1].startswith("unreadable:")
    assert df["p_infected"].iloc[1] == "" and 0 <= float(df["p_infected"].iloc[0]) <= 1
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run_dir), str(bad), "--out", str(tmp_path / "x.csv")])
    assert e.value.code == 2 and "none of the 1 file(s) given is a readable image" in capsys.readouterr().err


@pytest.mark.parametrize("make, message", [
    (lambda d, tmp: tmp / "nope", "does not exist"),
    (lambda d, tmp: shutil.copytree(d, tmp / "c", ignore=shutil.ignore_patterns("model.safetensors")),
     "has no model.safetensors"),
])
def test_evaluate_bad_run_dir_is_one_line(run_dir, tiny_data, tmp_path, capsys, make, message):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(make(run_dir, tmp_path)), "--data", str(tiny_data)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("args, message", [
    (["recipe", "resnet18_head", "--threshold", "yoden"], "--threshold 'yoden': use youden, sens:0.95"),
    (["recipe", "resnet18_head", "--threshold", "sens:1.5"], "target sensitivity must be a number in (0, 1]"),
    (["recipe", "resnet18_head", "--labels", "fine"], "--labels must be one of fine_label, folders"),
    (["recipe", "resnet18_head", "--tta", "maybe"], "--tta must be true or false"),
    (["recipe", "resnet18_head", "--tta_aug", "xray_shortcuts"], "--tta_aug must be one of none, seed, xray, "
                                                                 "xray_shortcut, or \"\" for the training"),
    (["predict", "/no/run"], "predict needs image files or folders"),
])
def test_evaluation_options_bad_input_is_one_line(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and message in err, err
    assert not (tmp_path / "o").exists()


def test_evaluate_needs_a_split_when_given_a_whole_data_set(run_dir, tiny_data, tmp_path, capsys):
    shutil.copytree(tiny_data / "train", tmp_path / "d" / "train")
    with pytest.raises(SystemExit):
        main(["evaluate", str(run_dir), "--data", str(tmp_path / "d")])
    assert "has train/ but no test/ folder" in capsys.readouterr().err


def test_evaluate_unknown_class_folder_is_one_line(run_dir, tiny_data, tmp_path, capsys):
    shutil.copytree(tiny_data / "test" / "normal", tmp_path / "d" / "covid")
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(run_dir), "--data", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "['covid'] that the run does not know" in err and "\n" not in err


def test_tta_augments_and_is_recorded(run_dir, tiny_data):
    from covid_fastai.evaluate import eval_folders, load_run, run_learner
    from covid_fastai.interpret import Evaluation
    d, cfg, rec = load_run(run_dir)
    folders, _ = eval_folders(tiny_data, cfg)
    learn = run_learner(d, cfg, rec, folders)
    dl = learn.dls.test_dl(folders.files("train"), with_labels=True)
    plain, tta, again = (Evaluation.of(learn, dl, "test", tta=t) for t in (False, True, False))
    assert tta.tta and np.abs(tta.probs - plain.probs).max() > 1e-4  # the training augmentation ran
    assert np.array_equal(plain.probs, again.probs)  # and plain prediction is unaffected afterwards
    assert np.allclose(tta.probs.sum(1), 1, atol=1e-5) and (tta.losses > 0).all()


def test_tta_aug_draws_the_passes_from_its_policy(run_dir, tiny_data, tmp_path):
    """A recipe's `tta_aug`: passes from 'none' mix back to the plain prediction (fails if the swap is dropped or the
    new loader loses its batch transforms); the training policy's own passes equal plain TTA; read from config.json."""
    from fastai.vision.all import set_seed
    from covid_fastai.augment import TorchvisionTfm, tta_dl
    from covid_fastai.evaluate import eval_folders, evaluate_run, load_run, run_learner
    from covid_fastai.interpret import Evaluation
    from covid_fastai.learner import tta_aug
    from covid_fastai.recipes import with_overrides
    d, cfg, rec = load_run(run_dir)
    folders, _ = eval_folders(tiny_data, cfg)
    learn = run_learner(d, cfg, rec, folders)
    dl = learn.dls.test_dl(folders.files("train"), with_labels=True)
    assert tta_aug(rec) is None and tta_dl(dl) is dl

    def tta(aug=None):
        set_seed(7)
        return Evaluation.of(learn, dl, "test", tta=True, tta_aug=aug).probs
    plain = Evaluation.of(learn, dl, "test").probs
    none = tta_aug(with_overrides(rec, tta_aug="none"))
    assert not none.random and none.resize_to == cfg["data"]["resize"]  # at the run's short side
    assert np.allclose(tta(none), plain, atol=1e-5)
    own = tta_aug(with_overrides(rec, tta_aug=rec.aug))
    assert np.allclose(tta(own), tta(), atol=1e-6) and np.abs(tta() - plain).max() > 1e-4
    (t,) = [t for t in dl.after_item.fs if isinstance(t, TorchvisionTfm)]
    assert all(u is not t for u in tta_dl(dl, none).after_item.fs)  # a new loader; `dl` keeps its own
    # evaluate reads it from the run's config.json
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    c = json.loads((copy / "config.json").read_text())
    c["recipe"]["tta_aug"] = "none"
    (copy / "config.json").write_text(json.dumps(c))
    on, off = (evaluate_run(copy, tiny_data, tta=t, out=tmp_path / str(t)) for t in (True, False))
    assert np.allclose(pd.read_csv(on / "predictions.csv")["p_infected"],
                       pd.read_csv(off / "predictions.csv")["p_infected"], atol=1e-5)
    m = json.loads((on / "metrics.json").read_text())
    assert m["tta"] and m["tta_aug"] == "none" and json.loads((off / "metrics.json").read_text())["tta_aug"] is None
    assert "Test-time augmentation: on (fastai tta, augmented passes from `none`)" in (on / "report.md").read_text()


def test_three_class_fine_label_mode_with_tta(fine_labelled, tmp_path):
    data, files = fine_labelled.root, fine_labelled.files
    # a plan that trains the body (no feature cache), with TTA: fastai's tta fires before_fit/after_fit, which
    # must not reset the training log or the throughput
    d = run_recipe("resnet18_one", out=tmp_path / "o", data=str(data), epochs=2, pretrained=False, size=32, bs=8,
                   labels="fine_label", threshold="sens:0.9", tta="true")
    m = json.loads((d / "metrics.json").read_text())
    assert m["tta"] and len(pd.read_csv(d / "history.csv")) == 2 and m["train_images_per_s"] > 0
    assert list(m["per_class"]) == ["covid", "normal", "pneumonia"] and set(m["one_vs_rest"]) == set(m["per_class"])
    assert m["positive_class"] == "infected" and m["threshold"]["rule"] == "sens:0.9"
    assert m["at_threshold"]["n_positive"] == sum(1 for f in files if f.startswith("test/infected"))
    assert m["breakdowns"]["fine_label"] and "Each class against the rest" in (d / "report.md").read_text()
    pred = pd.read_csv(d / "predictions.csv")
    assert np.allclose(pred["p_infected"], pred["p_covid"] + pred["p_pneumonia"], atol=1e-5)


def _chromium():
    return next((c for c in ("chromium", "chromium-browser", "google-chrome", "chrome") if shutil.which(c)), None)


def test_report_html_renders_in_headless_chromium(run_dir, tmp_path):
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 8 and "<style>" in page and "missing image" not in page
    assert "src=\"http" not in page and "<link" not in page and "<script" not in page  # self-contained
    exe = _chromium()
    if exe is None: pytest.skip("no chromium binary found: install chromium to render report.html in a browser")
    shot = tmp_path / "report.png"
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={shot}", "--window-size=1280,2400", (run_dir / "report.html").as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        a = np.asarray(im.convert("L"), dtype=float)
    assert a.shape == (2400, 1280) and a.std() > 20  # not a blank page
    assert (a[: 600] < 128).mean() > 0.01  # text and tables at the top, not only images further down


def test_evaluation_uses_the_geometry_the_run_used(run_dir, tmp_path):
    "config.json records the short side; evaluate/resume rebuild with it; older configs (none recorded) used 256/224."
    from covid_fastai.evaluate import load_run
    from covid_fastai.rundir import recipe_from_config
    _, cfg, rec = load_run(run_dir)
    assert cfg["data"]["resize"] == rec.resize == round(64 * 256 / 224)  # seed augmentation at 64 px
    xray = {**cfg, "recipe": {**cfg["recipe"], "aug": "xray"}, "data": {**cfg["data"], "resize": 64}}
    assert recipe_from_config(xray).resize == 64
    old = {**xray, "data": {k: v for k, v in cfg["data"].items() if k != "resize"}}
    assert recipe_from_config(old).resize == 73  # made before the xray geometry changed: evaluated as it ran


def _as_dicom(src: Path, dst: Path) -> Path:
    "A copy of the image folder `src` with every PNG rewritten as a DICOM file without extension (found by magic)."
    from test_images import write_dicom
    for i, f in enumerate(sorted(src.rglob("*.png"))):
        out = dst / f.parent.relative_to(src) / f"IM{i:04d}"
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as im: write_dicom(out, np.asarray(im.convert("L")).astype(np.uint16) * 16)
    return dst


def test_evaluate_and_predict_read_dicom_folders_as_training_does(run_dir, tiny_data, tmp_path):
    "Training lists DICOM files (covid_fastai.images.get_xray_files): so do `evaluate --data` and `predict`."
    from covid_fastai.evaluate import eval_folders, load_run
    dcm = _as_dicom(tiny_data / "test", tmp_path / "dcm")
    n = len(list((tiny_data / "test").rglob("*.png")))
    folders, split_dir = eval_folders(dcm, load_run(run_dir)[1])
    assert split_dir == dcm and folders.counts()["train"] == {"infected": n // 2, "normal": n // 2}
    out = tmp_path / "p.csv"
    main(["predict", str(run_dir), str(dcm), "--out", str(out), "--heatmaps"])
    df = pd.read_csv(out)
    assert len(df) == n and "error" not in df and df["p_infected"].between(0, 1).all()


def test_evaluate_writes_a_report_for_a_dicom_folder(run_dir, tiny_data, tmp_path):
    from covid_fastai.evaluate import evaluate_run
    dcm = _as_dicom(tiny_data / "test", tmp_path / "dcm")
    m = json.loads((evaluate_run(run_dir, dcm, out=tmp_path / "ev") / "metrics.json").read_text())
    assert m["n"] == len(list((tiny_data / "test").rglob("*.png"))) and m["data"] == str(dcm)


def test_evaluate_on_a_damaged_model_file_is_one_line(run_dir, tiny_data, tmp_path, capsys):
    from covid_fastai.errors import ModelFileError
    from covid_fastai.evaluate import evaluate_run
    d = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("evaluations", "predictions"))
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated: SafetensorError "invalid header length"
    with pytest.raises(ModelFileError) as e:
        evaluate_run(d, tiny_data)
    assert e.value.path == f and "run_recipe('resnet18_head')" in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(d), "--data", str(tiny_data)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {f} is damaged (") and err[0].endswith(
        "restore it from a copy, or train the run again with `python -m covid_fastai recipe resnet18_head`"), err
