"Clinical metrics against direct scikit-learn calls on hand-made cases; thresholds; bootstrap; labels.csv."
import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from covid_fastai.errors import UserError
from covid_fastai.labels import join_labels, read_labels
from covid_fastai.metrics import (_boot_ap, _boot_auc, binary_metrics, bootstrap_ci, choose_threshold,
                                  group_metrics, one_vs_rest, positive_view)

Y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1])
P = np.array([0.9, 0.8, 0.7, 0.45, 0.3, 0.6, 0.4, 0.35, 0.2, 0.1, 0.4, 0.55])


@pytest.mark.parametrize("t", [0.5, 0.42, 0.25])
def test_binary_metrics_match_sklearn(t):
    m = binary_metrics(Y, P, t)
    pred = (P >= t).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(Y, pred).ravel()
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn)) == pytest.approx(skm.recall_score(Y, pred))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["ppv"] == pytest.approx(skm.precision_score(Y, pred)) and m["npv"] == pytest.approx(tn / (tn + fn))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(Y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(Y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(Y, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(Y, P))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(Y, P))
    assert m["confusion_matrix"] == [[tp, fn], [fp, tn]]


def test_sensitivity_at_specificity_reads_the_roc_curve():
    # 6 negatives: specificity >= 0.95 allows no false positive; the top 3 scores are positives, the 4th (0.6) is not
    assert binary_metrics(Y, P)["sens_at_spec95"] == 0.5
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(y * 0.3 + rng.random(400) * 0.7, 0, 1)
    best = max(((p >= t) & (y == 1)).sum() / (y == 1).sum() for t in np.unique(p)
               if ((p < t) & (y == 0)).sum() / (y == 0).sum() >= 0.95)
    assert binary_metrics(y, p)["sens_at_spec95"] == pytest.approx(best)
    assert binary_metrics(np.ones(3, int), np.array([0.2, 0.5, 0.9]))["sens_at_spec95"] is None


def test_undefined_metrics_are_none():
    m = binary_metrics(np.ones(4, int), np.array([0.9, 0.2, 0.7, 0.6]), 0.5)
    assert m["sensitivity"] == 0.75 and m["specificity"] is None and m["npv"] == 0.0
    assert m["roc_auc"] is None and m["pr_auc"] is None and m["balanced_accuracy"] is None
    m = binary_metrics(np.zeros(3, int), np.array([0.1, 0.2, 0.3]), 0.5)
    assert m["ppv"] is None and m["sensitivity"] is None and m["f1"] is None and m["specificity"] == 1.0


def test_youden_and_target_sensitivity_thresholds():
    # positives 0.8, 0.7, 0.6, 0.3; negatives 0.65, 0.2, 0.1
    y = np.array([1, 1, 1, 1, 0, 0, 0])
    p = np.array([0.8, 0.7, 0.6, 0.3, 0.65, 0.2, 0.1])
    # J(0.7) = 0.5, J(0.6) = 0.75 - 1/3, J(0.3) = 1 - 1/3 = 0.667: the optimum is 0.3
    t = choose_threshold(y, p, "youden")
    assert t["value"] == pytest.approx(0.3)
    assert choose_threshold(y, p, "sens:0.5")["value"] == pytest.approx(0.7)
    assert choose_threshold(y, p, "sens:0.95")["value"] == pytest.approx(0.3)
    assert choose_threshold(y, p, "0.4")["value"] == 0.4
    assert choose_threshold(np.ones(3), p[:3])["value"] == 0.5
    for bad in ("yoden", "sens:2", "1.5", "sens:x"):
        with pytest.raises(UserError, match="--threshold"): choose_threshold(y, p, bad)


def test_bootstrap_vectorised_auc_ap_match_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (5, 40))
    p = np.round(rng.random((5, 40)), 1)  # many ties
    for i in range(5):
        assert _boot_auc(y[i:i + 1], p[i:i + 1])[0] == pytest.approx(skm.roc_auc_score(y[i], p[i]))
        assert _boot_ap(y[i:i + 1], p[i:i + 1])[0] == pytest.approx(skm.average_precision_score(y[i], p[i]))


def test_bootstrap_ci_brackets_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    ci = bootstrap_ci(y, p, 0.5, n_boot=500, seed=3)
    m = binary_metrics(y, p, 0.5)
    for k, (lo, hi) in ci.items():
        assert lo <= m[k] <= hi and hi - lo < 0.3, k
    assert ci == bootstrap_ci(y, p, 0.5, n_boot=500, seed=3)
    assert bootstrap_ci(np.ones(10, int), p[:10], 0.5)["specificity"] is None


def test_three_classes_one_vs_rest_and_infected_view():
    classes = ["covid", "normal", "pneumonia"]
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8]])
    targs = np.array([0, 1, 2, 0, 1])
    name, p, y = positive_view(classes, probs, targs)
    assert name == "infected" and list(y) == [1, 0, 1, 1, 0]
    assert p == pytest.approx(probs[:, 0] + probs[:, 2])
    ovr = one_vs_rest(classes, probs, targs)
    assert ovr["covid"]["roc_auc"] == pytest.approx(skm.roc_auc_score(targs == 0, probs[:, 0]))
    assert ovr["pneumonia"]["sensitivity"] == 1.0
    assert positive_view(["infected", "normal"], probs[:, :2], targs)[0] == "infected"


@pytest.mark.parametrize("classes", [["normal", "pneumonia"], ["NORMAL", "PNEUMONIA"]])
def test_normal_is_never_the_positive_class(classes):
    "Kermany-style folders: the disease is positive, so sensitivity and the ROC are about finding it."
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    name, p, y = positive_view(classes, probs, np.array([0, 1, 1]))
    assert name == classes[1] and list(p) == [0.1, 0.8, 0.4] and list(y) == [0, 1, 1]
    assert positive_view(["covid", "pneumonia"], probs, np.array([0, 1, 1]))[0] == "covid"  # no normal: index 0


def test_group_metrics_per_source():
    rows = group_metrics(Y, P, 0.5, ["a"] * 6 + ["b"] * 6)
    assert [r["group"] for r in rows] == ["a", "b"] and rows[0]["n"] == 6
    assert rows[0]["sensitivity"] == pytest.approx(3 / 5) and rows[0]["specificity"] == 0.0
    assert rows[1]["positives"] == 1


def test_labels_csv_join_and_path_escape(tmp_path):
    (tmp_path / "test" / "normal").mkdir(parents=True)
    (tmp_path / "labels.csv").write_text("file,label,source\ntest/normal/a.png,normal,x\ntest/normal/b.png,normal,y\n")
    lab = read_labels(tmp_path)
    j = join_labels([tmp_path / "test/normal/b.png", tmp_path / "test/normal/c.png"], tmp_path, lab)
    assert j == {"source": ["y", ""]}
    for bad in ("../x.png", "/etc/passwd"):
        (tmp_path / "labels.csv").write_text(f"file,label\n{bad},normal\n")
        with pytest.raises(UserError, match="relative"): read_labels(tmp_path)
    assert read_labels(tmp_path / "test") is None


@pytest.mark.realdata
def test_real_labels_join_and_breakdown(real_data):
    "The real data's labels.csv joins to every test image; per-source metrics from fabricated predictions."
    lab = read_labels(real_data)
    files = sorted((real_data / "test").rglob("*.jpg"))
    j = join_labels(files, real_data, lab)
    assert {"source", "fine_label", "patient_id"} <= set(j) and all(j["source"]) and len(files) > 100
    y = np.array([f.parent.name == "infected" for f in files], int)
    p = np.where(np.array(j["source"]) == "kermany", 0.9, 0.1)  # a "source shortcut" classifier
    rows = {r["group"]: r for r in group_metrics(y, p, 0.5, j["source"])}
    assert rows["kermany"]["sensitivity"] == 1.0 and rows["kermany"]["specificity"] == 0.0
    assert set(pd.Series(j["fine_label"]).unique()) == {"covid", "pneumonia", "normal"}


def test_comparison_markdown_gives_times_one_decimal_and_metrics_four():
    from covid_fastai.report import _md_table
    md = _md_table(pd.DataFrame([{"accuracy": 0.89722, "train time (s)": 3800.9, "images/s": 4.4, "ROC AUC": float("nan")}]))
    assert md.splitlines()[-1] == "| 0.8972 | 3800.9 | 4.4 | n/a |"
