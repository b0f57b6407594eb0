"""Cross-validation (covid_fastai.cv, folds, cv_report): patient folds and leave-one-source-out on generated data.

A tiny synthetic set with a labels.csv written here: two films per patient, some patients in both train and valid,
sources a and b (both classes), c (infected only) and some films without a source. Its test images are garbage
bytes, so anything that opened them would fail. Fold runs: random init, 32 px, one epoch.
"""
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.vision.all import Callback

from covid_fastai.cli import main
from covid_fastai.cv import plan_cv, run_cv
from covid_fastai.cv_report import fold_predictions
from covid_fastai.metrics import binary_metrics
from covid_fastai.demo import make_demo_data
from covid_fastai.errors import DataError, RecipeError, RunInterrupted
from covid_fastai.folds import OTHER_SOURCES, source_folds, strata
from covid_fastai.sweep import SWEEP_FILE

TINY = dict(pretrained=False, size=32, bs=8, epochs=1)
TINY_ARGS = ["--pretrained", "false", "--size", "32", "--bs", "8", "--epochs", "1"]
RECIPE = "resnet18_head"


def _source(cls: str, j: int) -> str:
    if cls == "infected": return ("a", "b", "c", "c", "", "")[j]
    return ("a", "a", "b", "b", "", "")[j]


def make_cv_data(dest: Path, columns=("label", "source", "patient_id")) -> Path:
    """12 train + 4 valid films per class: patient j has films 2j and 2j+1 of train, and valid films 0-3 belong to
    patients 0 and 1 too (patients across splits). Test films: garbage (must never be opened)."""
    root = make_demo_data(dest, counts={"train": 12, "valid": 4, "test": 2}, size=32)
    rows = []
    for f in sorted(root.rglob("*.png")):
        rel = f.relative_to(root).as_posix()
        split, cls, name = rel.split("/")
        j = int(name[-7:-4]) // 2
        if split == "test":
            f.write_bytes(b"not an image")
            rows.append({"file": rel, "label": cls, "source": "a", "patient_id": f"test-{cls}-{j}"})
        else:  # one film of patient normal-0 (source a) comes from source b: a patient in two sources
            src = "b" if rel == "valid/normal/synthetic_valid_normal_001.png" else _source(cls, j)
            rows.append({"file": rel, "label": cls, "source": src, "patient_id": f"{cls}-{j}"})
    pd.DataFrame(rows)[["file", *columns]].to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="module")
def cv_data(tmp_path_factory) -> Path:
    return make_cv_data(tmp_path_factory.mktemp("cvdata"))


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine: one thread is faster and steadier
    yield
    torch.set_num_threads(n)


def pool(root: Path) -> pd.DataFrame:
    df = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    return df[~df["file"].str.startswith("test/")]


@pytest.mark.parametrize("k", [2, 3])
def test_patient_folds_are_disjoint_cover_the_pool_and_keep_both_labels(cv_data, k):
    rec, found, table, folds = plan_cv(RECIPE, folds=k, data=str(cv_data), **TINY)
    assert "test" not in found.splits  # never listed
    expected = set(pool(cv_data)["file"])
    held = [f for fold in folds for f in fold.valid]
    assert len(held) == len(set(held)) and set(held) == expected  # every train+valid film held out exactly once
    patient = dict(zip(table["file"], table["group"]))
    label = dict(zip(table["file"], table["label"]))
    for fold in folds:
        assert set(fold.train) | set(fold.valid) == expected and not set(fold.train) & set(fold.valid)
        assert not {patient[f] for f in fold.train} & {patient[f] for f in fold.valid}  # patients never cross
        assert {label[f] for f in fold.valid} == {label[f] for f in fold.train} == {"infected", "normal"}
    # patient normal-0 has films in train/ and valid/: one fold holds all four
    films = table.loc[table["patient_id"] == "normal-0", "file"]
    assert len(films) == 4 and len({next(fo.name for fo in folds if f in fo.valid) for f in films}) == 1


def test_without_labels_csv_each_film_is_its_own_group(tmp_path):
    root = make_demo_data(tmp_path / "plain", counts={"train": 6, "valid": 3, "test": 1}, size=32)
    _, _, table, folds = plan_cv(RECIPE, folds=3, data=str(root), **TINY)
    assert table["group"].nunique() == len(table) == 18 and set(table["stratum"]) == {"infected|", "normal|"}
    for fold in folds: assert {Path(f).parts[1] for f in fold.valid} == {"infected", "normal"}


def test_small_strata_merge_so_every_stratum_reaches_every_fold():
    df = pd.DataFrame({"label": ["inf"] * 7 + ["nor"] * 6,
                       "source": ["a", "a", "a", "b", "c", "c", "c", "a", "a", "a", "b", "b", "d"]})
    df["group"] = [f"g{i}" for i in range(len(df))]
    s = strata(df, 3)
    # inf|b (1) and inf|c... c has 3: kept; b alone would miss folds: inf|other sources has 1 group -> inf|a
    assert list(s[:7]) == ["inf|a"] * 4 + ["inf|c"] * 3
    assert list(s[7:]) == ["nor|a"] * 3 + [f"nor|{OTHER_SOURCES}"] * 3  # b (2) + d (1) together reach 3
    assert (s.groupby(s).size() >= 3).all()


def test_too_few_patients_for_the_folds_is_a_data_error(cv_data):
    with pytest.raises(DataError, match="has 6 patient"):
        plan_cv(RECIPE, folds=7, data=str(cv_data), **TINY)
    with pytest.raises(RecipeError, match="one fold per source"):
        plan_cv(RECIPE, folds=3, by="source", data=str(cv_data), **TINY)


def test_leave_one_source_out_refuses_a_fold_with_nothing_of_a_class_to_train_on():
    df = pd.DataFrame({"file": list("wxyz"), "label": ["inf", "inf", "nor", "nor"], "source": ["a", "b", "a", "a"],
                       "group": list("wxyz")})
    with pytest.raises(DataError, match="leaving out source a leaves no nor film to train on"):
        source_folds(df, "labels.csv")
    df.loc[3, "source"] = "b"
    assert [len(f.valid) for f in source_folds(df, "labels.csv")] == [2, 2]


class StopSecondRun(Callback):
    "Test-only: Ctrl-C at the start of the second fold's run."
    order = 95

    def __init__(self): self.runs, self.fired = [], False

    def before_epoch(self):
        if self.learn.path not in self.runs: self.runs.append(self.learn.path)
        if len(self.runs) == 2 and not self.fired:
            self.fired = True
            raise KeyboardInterrupt


def links_of(view: Path, split: str) -> set:
    "The original files a view's split links to."
    return {os.path.realpath(p) for p in (view / split).rglob("*.png")}


def test_cv_runs_every_fold_on_its_held_out_part_and_resumes(cv_data, tmp_path, capsys, one_thread, monkeypatch):
    import covid_fastai.learner as L
    monkeypatch.setattr(L, "fp32_cpu", lambda: False)  # begun on a CPU with bf16 units ...
    with pytest.raises(RunInterrupted):
        run_cv(RECIPE, folds=2, out=tmp_path, cbs=[StopSecondRun()], data=str(cv_data), **TINY, fp32_size=24)
    (cv_dir,) = (tmp_path / "cv" / RECIPE).iterdir()
    m = json.loads((cv_dir / SWEEP_FILE).read_text())
    assert m["kind"] == "cv" and m["status"] == "interrupted" and len(m["runs"]) == 2
    first = Path(m["runs"][0]["run_dir"])
    before = (first / "metrics.json").stat().st_mtime_ns
    assert "1 of 2 folds finished" in (cv_dir / "cv.md").read_text()
    capsys.readouterr()

    monkeypatch.setattr(L, "fp32_cpu", lambda: True)  # ... resumed on one without: fold 2 trains at fp32_size
    main(["resume", str(cv_dir)])  # the sweep loop carries on: fold 1 kept, fold 2 runs
    assert f"cv: {cv_dir / 'cv.md'}" in capsys.readouterr().out
    m = json.loads((cv_dir / SWEEP_FILE).read_text())
    assert m["status"] == "complete" and (first / "metrics.json").stat().st_mtime_ns == before
    table = pd.read_csv(cv_dir / "folds.csv", dtype=str, keep_default_na=False)
    assert set(table["file"]) == set(pool(cv_data)["file"])
    originals = {os.path.realpath(cv_data / f) for f in table["file"]}
    tests = {os.path.realpath(p) for p in (cv_data / "test").rglob("*.png")}
    for item in m["runs"]:
        run, view = Path(item["run_dir"]), Path(item["recipe"]["data"])
        cfg = json.loads((run / "config.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        held = table.loc[table["fold"] == item["tag"], "file"]
        assert cfg["status"] == "complete" and cfg["data"]["path"] == str(view) and not (view / "test").exists()
        assert metrics["split"] == "valid" and metrics["n"] == len(held) == item["fold"]["n_valid"]
        assert links_of(view, "valid") == {os.path.realpath(cv_data / f) for f in held}
        assert links_of(view, "train") | links_of(view, "valid") == originals and not originals & tests
        assert (run / "model.safetensors").is_file() and (run / "report.md").is_file()
        preds = pd.read_csv(run / "predictions.csv")
        assert {os.path.realpath(f) for f in preds["file"]} == {os.path.realpath(cv_data / f) for f in held}
        # the view's labels.csv joins its rows: the run's per-source breakdown covers every held-out film
        assert sum(g["n"] for g in metrics["breakdowns"]["source"]) == len(held)
    summary = json.loads((cv_dir / "cv.json").read_text())
    accs = [json.loads((Path(it["run_dir"]) / "metrics.json").read_text())["accuracy"] for it in m["runs"]]
    assert summary["mean_sd"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert summary["mean_sd"]["accuracy"]["sd"] == pytest.approx(np.std(accs, ddof=1))
    md = (cv_dir / "cv.md").read_text()
    assert "## Mean ± sd over folds" in md and f"{np.mean(accs):.4f} ± {np.std(accs, ddof=1):.4f}" in md
    assert "the test split was not read" in md and (cv_dir / "cv.html").is_file() and (cv_dir / "cv.csv").is_file()
    assert [f["size (px)"] for f in summary["folds"]] == [32, 24] and "different input sizes (24, 32 px)" in md
    by_source = {r["source"]: r for r in summary["sources"]}
    assert set(by_source) == {"a", "b", "c"} and by_source["c"]["ROC AUC pooled"] is None  # c: infected only
    assert by_source["a"]["n"] == (pool(cv_data)["source"] == "a").sum()


def test_leave_one_source_out_holds_out_exactly_each_source(cv_data, tmp_path, capsys, one_thread):
    main(["cv", RECIPE, "--by", "source", "--data", str(cv_data), "--out", str(tmp_path), *TINY_ARGS])
    (cv_dir,) = (tmp_path / "cv" / RECIPE).iterdir()
    m = json.loads((cv_dir / SWEEP_FILE).read_text())
    df = pool(cv_data)
    assert [it["tag"] for it in m["runs"]] == ["source-a", "source-b", "source-c"]
    for item, src in zip(m["runs"], "abc"):
        view = Path(item["recipe"]["data"])
        assert links_of(view, "valid") == {os.path.realpath(cv_data / f) for f in df.loc[df["source"] == src, "file"]}
        train = links_of(view, "train")
        assert {os.path.realpath(cv_data / f) for f in df.loc[df["source"] == "", "file"]} <= train  # no source: always trains
        assert not {os.path.realpath(cv_data / f) for f in df.loc[df["source"] == src]} & train
        metrics = json.loads((Path(item["run_dir"]) / "metrics.json").read_text())
        assert metrics["split"] == "valid" and metrics["n"] == (df["source"] == src).sum()
        # patient normal-0 is in sources a and b: while either is held out, none of its films trains
        normal0 = {os.path.realpath(cv_data / f) for f in df.loc[df["patient_id"] == "normal-0", "file"]}
        assert (not normal0 & train) == (src in "ab")
        assert item["fold"]["n_dropped"] == {"a": 1, "b": 3, "c": 0}[src]
    summary = json.loads((cv_dir / "cv.json").read_text())
    assert [r["held out"] for r in summary["folds"]] == ["source a", "source b", "source c"]
    assert summary["folds"][2]["ROC AUC"] is None and summary["folds"][2]["positives"] == 4  # one class: no AUC
    md = (cv_dir / "cv.md").read_text()
    assert "source c held one class only: no ROC AUC" in md and "(2 of 3)" in md  # AUC mean over a and b


def test_leave_one_source_out_without_a_source_column_is_one_line(tmp_path, capsys):
    root = make_cv_data(tmp_path / "nosource", columns=("label", "patient_id"))
    with pytest.raises(SystemExit) as e:
        main(["cv", RECIPE, "--by", "source", "--data", str(root), "--out", str(tmp_path / "o"), *TINY_ARGS])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: --by source needs {root.resolve() / 'labels.csv'} with a source column")
    assert not (tmp_path / "o").exists()  # nothing planned, nothing written


def _cv(folds_acc: dict) -> dict:
    return {"folds": [{"fold": f, "accuracy": a} for f, a in folds_acc.items()]}


def test_paired_difference_is_fold_by_fold_and_judged_by_a_paired_t_test():
    from scipy.stats import ttest_rel
    from covid_fastai.cv_report import paired
    base = _cv({"fold-1": 0.90, "fold-2": 0.95, "fold-3": 0.80, "fold-4": 0.85, "fold-5": 0.92})
    ahead = _cv({"fold-1": 0.92, "fold-2": 0.96, "fold-3": 0.83, "fold-4": 0.86, "fold-5": 0.94})
    s = paired(base, ahead, "accuracy")
    assert s["mean"] == pytest.approx(0.018) and (s["ahead"], s["behind"], s["n"]) == (5, 0, 5)
    assert s["p"] == pytest.approx(ttest_rel([0.92, 0.96, 0.83, 0.86, 0.94], [0.90, 0.95, 0.80, 0.85, 0.92]).pvalue)
    assert s["p"] < 0.05 and s["verdict"] == "ahead beyond the fold noise"
    # the same mean gain, but one fold far behind: a spread over folds that is larger than the gain is noise
    mixed = _cv({"fold-1": 0.99, "fold-2": 0.99, "fold-3": 0.89, "fold-4": 0.90, "fold-5": 0.76})
    s = paired(base, mixed, "accuracy")
    assert (s["ahead"], s["behind"]) == (4, 1) and s["p"] > 0.05 and s["verdict"] == "within the fold noise"
    # only folds both finished are paired
    s = paired(base, _cv({"fold-2": 0.90, "fold-4": 0.80}), "accuracy")
    assert s["n"] == 2 and s["mean"] == pytest.approx(-0.05) and s["verdict"] == "behind beyond the fold noise"


def test_compare_puts_cvs_side_by_side_paired_by_fold_and_refuses_other_folds(cv_data, tmp_path, capsys, one_thread):
    a = run_cv(RECIPE, folds=2, out=tmp_path / "a", data=str(cv_data), **TINY)
    b = run_cv(RECIPE, folds=2, out=tmp_path / "b", data=str(cv_data), **{**TINY, "lr": 3e-2})
    main(["compare", str(a), str(b), "--out", str(tmp_path / "o")])
    assert "cv_comparison:" in capsys.readouterr().out
    (out,) = (tmp_path / "o" / "comparisons").iterdir()
    got = json.loads((out / "cv_comparison.json").read_text())
    fa, fb = (json.loads((d / "cv.json").read_text())["folds"] for d in (a, b))
    want = np.mean([y["ROC AUC"] - x["ROC AUC"] for x, y in zip(fa, fb)])
    label = f"1: {RECIPE} --pretrained False --size 32 --bs 8 --epochs 1 --lr 0.03"
    assert got["differences"][label]["ROC AUC"]["mean"] == pytest.approx(want)
    md = (out / "cv_comparison.md").read_text()
    assert "## Difference from the baseline, fold by fold" in md and "| a | " in md and (out / "cv_comparison.html").is_file()
    assert "## Within each source: ROC AUC difference from the baseline" in md
    assert [m["size (px)"] for m in got["means"]] == ["32", "32"]  # the size each cv's folds trained at
    old = json.loads((b / "cv.json").read_text())  # a cv.json written before it gave sizes: from the fold runs
    (b / "cv.json").write_text(json.dumps({**old, "folds": [{k: v for k, v in f.items() if k != "size (px)"}
                                                            for f in old["folds"]]}))
    main(["compare", str(a), str(b), "--out", str(tmp_path / "o2")])
    (o2,) = (tmp_path / "o2" / "comparisons").iterdir()
    assert [m["size (px)"] for m in json.loads((o2 / "cv_comparison.json").read_text())["means"]] == ["32", "32"]
    (b / "cv.json").write_text(json.dumps(old))
    assert set(got["source_auc_differences"][label]) == {"a", "b"}  # c is infected only
    # --ensemble: one more row, the mean of the two cvs' probabilities, film by film, scored per fold
    main(["compare", str(a), str(b), "--ensemble", "--out", str(tmp_path / "e")])
    (out,) = (tmp_path / "e" / "comparisons").iterdir()
    got = json.loads((out / "cv_comparison.json").read_text())
    table = pd.read_csv(a / "folds.csv", dtype=str, keep_default_na=False)
    pa, pb = (pd.concat([fold_predictions(it, table) for it in json.loads((d / SWEEP_FILE).read_text())["runs"]])
              for d in (a, b))
    both = pa.merge(pb[["file", "p"]], on="file").merge(table[["file", "fold"]], on="file")
    assert len(both) == len(pool(cv_data))
    want = [binary_metrics(g["y"], (g["p_x"] + g["p_y"]) / 2)["roc_auc"] for _, g in both.groupby("fold")]
    (ens,) = [k for k in got["differences"] if k.startswith("E: ")]
    assert [m["ROC AUC"] for m in got["means"] if m["cv"] == ens] == [f"{np.mean(want):.4f} ± {np.std(want, ddof=1):.4f}"]
    # --ensemble 1,2: members chosen by position, set against the baseline; b averaged with itself is b
    main(["compare", str(a), str(b), str(b), "--ensemble", "1,2", "--out", str(tmp_path / "s")])
    (out,) = (tmp_path / "s" / "comparisons").iterdir()
    got = json.loads((out / "cv_comparison.json").read_text())
    assert [m["cv"][:3] for m in got["means"]] == ["0: ", "1: ", "2: ", "E: "] and got["means"][3]["cv"].endswith("cvs 1, 2")
    assert {k: v for k, v in got["means"][3].items() if k not in ("cv", "folder")} == \
        {k: v for k, v in got["means"][1].items() if k not in ("cv", "folder")}
    with pytest.raises(SystemExit):
        main(["compare", str(a), str(b), "--ensemble", "1", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "two or more positions" in err
    other = run_cv(RECIPE, folds=2, fold_seed=1, out=tmp_path / "c", data=str(cv_data), **TINY)
    with pytest.raises(SystemExit):
        main(["compare", str(a), str(other), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds out other folds" in err and str(other) in err


def test_paired_auc_difference_matches_sklearn_and_its_interval_is_paired():
    from sklearn.metrics import roc_auc_score
    from covid_fastai.cv_report import paired_auc_difference
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(40), np.zeros(12)].astype(int)
    a = np.clip(y * 0.3 + rng.uniform(0, 0.7, len(y)), 0, 1)
    b = np.clip(y * 0.5 + rng.uniform(0, 0.5, len(y)), 0, 1)
    r = paired_auc_difference(y, a, b, n_boot=500)
    assert r["difference"] == pytest.approx(roc_auc_score(y, b) - roc_auc_score(y, a))
    assert r["low"] <= r["difference"] <= r["high"] and r["low"] > 0  # b separates better on every resample
    same = paired_auc_difference(y, a, a, n_boot=200)  # paired: the same scores differ by exactly 0 on every resample
    assert same["difference"] == same["low"] == same["high"] == 0
    assert paired_auc_difference(np.ones(5), a[:5], b[:5])["difference"] is None
