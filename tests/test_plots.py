"""What each plot shows, read from the matplotlib Figure its writer saved: curves, ROC/PR, calibration,
confusion matrices, and the best/worst images of each class ranked by loss. Predictions are made up, so no
model is trained here."""
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from covid_fastai import metrics as M
from covid_fastai.interpret import Evaluation, plot_curves, plot_extremes, write_evaluation

CLASSES = ["infected", "normal"]


@pytest.fixture
def saved(monkeypatch) -> dict:
    "{file name: the Figure saved there}: matplotlib's savefig, recorded on its way through."
    figures, real = {}, Figure.savefig

    def recording(fig, path, *a, **k):
        figures[getattr(path, "name", str(path))] = fig
        return real(fig, path, *a, **k)
    monkeypatch.setattr(Figure, "savefig", recording)
    return figures


def gray(value: int) -> np.ndarray: return np.full((20, 24), value, np.uint8)


@pytest.fixture
def ev(tmp_path) -> Evaluation:
    "14 made-up predictions, 7 per class; image i is uniform gray 10 + 15 i, so a plot's image tells its file."
    rng = np.random.default_rng(3)
    n = 14
    targs = np.array([0, 1] * 7)
    p_inf = rng.uniform(0.02, 0.98, n)
    probs = np.stack([p_inf, 1 - p_inf], 1)
    items = []
    for i in range(n):
        items.append(tmp_path / f"img{i:02d}.png")
        Image.fromarray(gray(10 + 15 * i)).save(items[-1])
    return Evaluation("test", items, CLASSES, probs, targs, losses=-np.log(probs[np.arange(n), targs]),
                      preds=probs.argmax(1), interp=None)


def shown_items(fig: Figure) -> list[int]:
    "Which images (by index) a best/worst figure shows, left to right, from the pixels it was given."
    return [int((ax.images[0].get_array().mean() - 10) / 15) for ax in fig.axes if ax.images]


def test_best_and_worst_are_ranked_by_loss_per_class(ev, tmp_path, saved):
    files = plot_extremes(ev, tmp_path, k=3)
    assert sorted(files) == ["best_infected", "best_normal", "worst_infected", "worst_normal"]
    for ci, cls in enumerate(CLASSES):
        mine = sorted(np.nonzero(ev.targs == ci)[0], key=lambda i: ev.losses[i])  # 7 of this class, lowest loss first
        assert len(set(ev.losses[mine])) == 7
        best, worst = saved[f"best_{cls}.png"], saved[f"worst_{cls}.png"]
        assert shown_items(best) == mine[:3] and shown_items(worst) == mine[::-1][:3]
        titles = [ax.get_title() for ax in worst.axes if ax.images]
        assert [float(t.rsplit("loss ", 1)[1]) for t in titles] == [round(ev.losses[i], 3) for i in mine[::-1][:3]]
        assert f"worst classified '{cls}'" in worst._suptitle.get_text() and "highest loss first" in \
            worst._suptitle.get_text()
        assert files[f"worst_{cls}"].is_file()


def test_curves_plot_the_history(tmp_path, saved):
    h = pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [0.9, 0.6, 0.4], "valid_loss": [0.8, 0.7, 0.65],
                      "train_accuracy": [0.5, 0.7, 0.8], "valid_accuracy": [0.55, 0.6, 0.75]})
    plot_curves(h, tmp_path / "curves.png", "resnet18_head")
    fig = saved["curves.png"]
    loss, acc = fig.axes
    assert fig._suptitle.get_text() == "resnet18_head" and (loss.get_title(), acc.get_title()) == ("loss", "accuracy")
    for ax, cols in ((loss, ("train_loss", "valid_loss")), (acc, ("train_accuracy", "valid_accuracy"))):
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [c.replace("_", " ") for c in cols]
        for line, col in zip(ax.get_lines(), cols):
            assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == list(h[col])


def test_evaluation_plots_show_its_predictions(ev, tmp_path, saved):
    t = 0.4
    metrics, files = write_evaluation(tmp_path, ev, {"value": t, "rule": "0.4"}, "run X", gradcam=False)
    assert {f.name for f in files.values()} <= set(saved) and len(files) == 8
    _, p, y = ev.positive()
    cm = skm.confusion_matrix(ev.targs, ev.preds)

    ax = saved["confusion_matrix.png"].axes[0]
    assert ax.get_title() == "run X" and (ax.get_xlabel(), ax.get_ylabel()) == ("Predicted", "Actual")
    assert np.array_equal(ax.images[0].get_array(), cm) and [t.get_text() for t in ax.texts] == list(map(str, cm.ravel()))
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES and cm.tolist() == metrics["confusion_matrix"]

    roc, pr = saved["roc_pr.png"].axes
    fpr, tpr, _ = skm.roc_curve(y, p)
    curve = roc.get_lines()[0]
    assert np.allclose(curve.get_xdata(), fpr) and np.allclose(curve.get_ydata(), tpr)
    labels = [x.get_text() for x in roc.get_legend().get_texts()]
    assert labels[:3] == [f"AUC {skm.roc_auc_score(y, p):.3f}", "t = 0.5", "t = chosen 0.400"]
    at = M.binary_metrics(y, p, t)
    chosen = roc.get_lines()[2]  # the operating point at the chosen threshold
    assert (chosen.get_xdata()[0], chosen.get_ydata()[0]) == pytest.approx((1 - at["specificity"], at["sensitivity"]))
    prec, rec, _ = skm.precision_recall_curve(y, p)
    assert np.allclose(pr.get_lines()[0].get_xdata(), rec) and np.allclose(pr.get_lines()[0].get_ydata(), prec)
    assert pr.get_legend().get_texts()[0].get_text() == f"AP {skm.average_precision_score(y, p):.3f}"

    rel, hist = saved["calibration.png"].axes
    frac, mean = calibration_curve(y, p, n_bins=2, strategy="quantile")
    model = rel.get_lines()[0]
    assert model.get_label() == "model" and np.allclose(model.get_xdata(), mean) and np.allclose(model.get_ydata(), frac)
    assert sum(b.get_height() for b in hist.patches) == pytest.approx(len(p))  # stacked: every image once

    both = saved["confusion_matrices.png"].axes
    assert len(both) == 4 and np.array_equal(both[0].images[0].get_array(), cm)
    at_t = skm.confusion_matrix(1 - y, (p < t).astype(int), labels=[0, 1])  # positive first, as the labels read
    assert np.array_equal(both[2].images[0].get_array(), at_t) and "infected at t = 0.400" in both[2].get_title()
    assert np.allclose(both[3].images[0].get_array(), at_t / at_t.sum(1, keepdims=True))


def test_titles_clear_their_axes_and_leave_matplotlib_settings_alone(ev, tmp_path, saved):
    """The figures place axes titles at the top of their axes (not matplotlib's automatic placement, which measures
    every tick at every draw): that holds only while no tick, tick label or axis label sits above an axes."""
    import matplotlib
    before = dict(matplotlib.rcParams)
    write_evaluation(tmp_path, ev, {"value": 0.4, "rule": "0.4"}, "run X", gradcam=False)
    plot_curves(pd.DataFrame({"epoch": [0, 1], "train_loss": [0.9, 0.6], "valid_loss": [0.8, 0.7]}),
                tmp_path / "curves.png", "run X")
    assert dict(matplotlib.rcParams) == before
    titled = 0
    for name, fig in saved.items():
        fig.draw_without_rendering()
        renderer = fig._get_renderer()
        for ax in fig.axes:
            if not ax.get_title(): continue
            titled += 1
            title = ax.title.get_window_extent(renderer)
            assert title.y0 >= ax.get_window_extent(renderer).y1, name  # above the axes' frame
            for axis in (ax.xaxis, ax.yaxis):
                box = axis.get_tightbbox(renderer)
                assert box is None or box.y1 <= title.y0 or not box.overlaps(title), (name, ax.get_title())
    assert titled >= 13  # 1 + 2 + 1 + 4 + 2 + extremes' 7 images
