"""Issue 21's training options on generated data: balanced sampling, anti-shortcut augmentation, EMA of weights,
ensembles. Each test fails if its feature does nothing."""
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from covid_fastai.errors import DataError, RecipeError


def _sourced(tiny_data, root: Path) -> Path:
    "A copy of tiny_data whose labels.csv puts all infected films and one normal in siteA, other normals in siteB."
    shutil.copytree(tiny_data, root)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    normals = [f for f in files if f.startswith("train/normal")]
    src = ["siteA" if f.split("/")[1] == "infected" or f == normals[0] else "siteB" for f in files]
    pd.DataFrame({"file": files, "source": src}).to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="module")
def sourced(tiny_data, tmp_path_factory) -> Path:
    return _sourced(tiny_data, tmp_path_factory.mktemp("sourced") / "data")


# --- options -------------------------------------------------------------------------------------------------------

def test_options_default_off_and_are_checked():
    from covid_fastai.recipes import load_recipe, with_overrides
    r = load_recipe("resnet18_head")
    assert (r.balance, r.ema) == ("none", None)
    assert with_overrides(r, balance="source_label", ema="0.99").ema == 0.99
    assert with_overrides(r, ema="none").ema is None
    with pytest.raises(RecipeError, match="--balance must be one of label, label_in_source, none, source_label"):
        with_overrides(r, balance="source")
    for bad in ("0", "1", "1.5"):
        with pytest.raises(RecipeError, match="--ema"): with_overrides(r, ema=bad)


# --- balanced sampling ------------------------------------------------------------------------------------------------

def test_balance_weights_equal_per_group():
    from covid_fastai.sampling import balance_weights
    g = ["a"] * 9 + ["b"]
    w = balance_weights(g)
    assert w.sum() == pytest.approx(1) and w[:9].sum() == pytest.approx(0.5) and w[9] == pytest.approx(0.5)
    # label_in_source: siteA (9 infected, 1 normal) keeps its 10 of 14 items' share, split evenly; siteB 4 of 14
    g = [("A", "inf")] * 9 + [("A", "norm")] + [("B", "norm")] * 4
    w = balance_weights(g, "label_in_source")
    assert w[:9].sum() == pytest.approx(5 / 14) and w[9] == pytest.approx(5 / 14)
    assert w[10:].sum() == pytest.approx(4 / 14)
    assert balance_weights(g, "source_label")[9] == pytest.approx(1 / 3)


def _draws(dls, epochs=40) -> Counter:
    items = dls.train.items
    return Counter(str(items[i]) for _ in range(epochs) for i in dls.train.get_idxs())


def test_source_label_loader_draws_cells_equally(sourced):
    from covid_fastai.augment import make_aug
    from covid_fastai.data import find_xray_folders, xray_dls
    folders = find_xray_folders(sourced, scan=False)
    aug = make_aug("none", 32)
    plain, bal = (xray_dls(folders, aug, bs=4, num_workers=0, balance=b) for b in ("none", "source_label"))
    lone = str(min(f for f in folders.files("train") if f.parent.name == "normal"))  # siteA's only normal film
    d_plain, d_bal = _draws(plain), _draws(bal)
    assert d_plain[lone] == 40  # every image once per epoch: 1/24 of the draws
    # three cells (siteA infected, siteA normal, siteB normal): the lone film gets a third of the draws
    assert d_bal[lone] / sum(d_bal.values()) == pytest.approx(1 / 3, abs=0.06)
    assert bal.valid.get_idxs() == list(range(len(bal.valid_ds)))  # validation is read as it is
    # label_in_source: siteA keeps its 13 of 24 films' share, half of it for its lone normal
    lis = xray_dls(folders, aug, bs=4, num_workers=0, balance="label_in_source")
    assert lis.train.wgts[[str(i) for i in lis.train.items].index(lone)] == pytest.approx(13 / 48)


def test_label_loader_draws_classes_equally(tiny_data, tmp_path):
    from covid_fastai.augment import make_aug
    from covid_fastai.data import find_xray_folders, xray_dls
    root = tmp_path / "few_normals"
    shutil.copytree(tiny_data, root)
    for f in sorted((root / "train" / "normal").iterdir())[3:]: f.unlink()  # 12 infected, 3 normal
    folders = find_xray_folders(root, scan=False)
    plain, bal = (xray_dls(folders, make_aug("none", 32), bs=4, num_workers=0, balance=b) for b in ("none", "label"))
    share = lambda d: sum(v for k, v in d.items() if "/normal/" in k) / sum(d.values())
    assert share(_draws(plain)) == pytest.approx(3 / 15)
    assert share(_draws(bal)) == pytest.approx(0.5, abs=0.06)


def test_source_label_without_sources_is_one_line_error(tiny_data):
    from covid_fastai.augment import make_aug
    from covid_fastai.data import find_xray_folders, xray_dls
    folders = find_xray_folders(tiny_data, scan=False)
    with pytest.raises(DataError, match=r"--balance source_label needs .*labels.csv with a source column: .*"
                                        r"--balance label") as e:
        xray_dls(folders, make_aug("none", 32), bs=4, num_workers=0, balance="source_label")
    assert "\n" not in str(e.value)


# --- augmentation against shortcuts -----------------------------------------------------------------------------------

def test_border_erase_fills_an_edge_only():
    from covid_fastai.augment import BorderErase
    torch.manual_seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    a = np.asarray(img)
    changed = 0
    for _ in range(20):
        o = np.asarray(BorderErase(p=1.0)(img))
        assert o.shape == a.shape and (o[24:40, 24:40] == a[24:40, 24:40]).all()  # the centre is never touched
        diff = o != a
        changed += diff.any()
        rows, cols = np.nonzero(diff)
        # a strip or corner: the erased pixels reach an edge and hold one grey level
        assert rows.min() == 0 or rows.max() == 63 or cols.min() == 0 or cols.max() == 63
        assert len(np.unique(o[diff])) <= 1
    assert changed >= 18
    assert (np.asarray(BorderErase(p=0.0)(img)) == a).all()


def test_contrast_jitter_changes_levels_keeps_mode():
    from covid_fastai.augment import ContrastJitter
    torch.manual_seed(0)
    ramp = Image.fromarray(np.tile((np.arange(64) * 4).astype(np.uint8), (64, 1)))
    noise = Image.fromarray(np.random.default_rng(1).integers(60, 120, (64, 64), dtype=np.uint8))
    gam = np.asarray(ContrastJitter(p=1.0, clahe=0.0)(ramp)).astype(int)
    assert np.abs(gam - np.asarray(ramp)).mean() > 2 and (np.diff(gam[0]) >= 0).all()  # gamma: monotone
    cl = ContrastJitter(p=1.0, clahe=1.0)(noise)
    assert cl.mode == "L" and np.asarray(cl).std() > 1.5 * np.asarray(noise).std()  # CLAHE stretches contrast
    assert ContrastJitter(p=1.0)(noise.convert("RGB")).mode == "RGB"


def test_shortcut_policy_trains_with_it_evaluates_without():
    from covid_fastai.augment import BorderErase, ContrastJitter, make_aug
    a, x = make_aug("xray_shortcut", 48), make_aug("xray", 48)
    ops = [type(t) for t in a.train_tfm().transforms]
    assert ContrastJitter in ops and BorderErase in ops
    assert not {ContrastJitter, BorderErase} & {type(t) for t in x.train_tfm().transforms}
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (60, 70), dtype=np.uint8))
    assert (np.asarray(a.eval_tfm()(img)) == np.asarray(x.eval_tfm()(img))).all()
    tfm = a.item_tfms()[0]
    tfm.before_call(None, split_idx=1)
    assert tfm.tfm is tfm.valid and BorderErase not in [type(t) for t in tfm.valid.transforms]


def test_shortcut_policy_without_scikit_image_names_the_extra(monkeypatch):
    import sys
    from covid_fastai.augment import make_aug
    from covid_fastai.errors import MissingExtra
    monkeypatch.setitem(sys.modules, "skimage.exposure", None)  # import fails as when it is not installed
    with pytest.raises(MissingExtra, match=r'xray_shortcut.*scikit-image.*pip install -e "\.\[aug\]"'):
        make_aug("xray_shortcut", 48)
    make_aug("xray", 48)  # the other policies need nothing more


# --- EMA -----------------------------------------------------------------------------------------------------------

def test_ema_validates_and_keeps_the_average():
    from fastai.callback.core import Callback
    from fastai.test_utils import synth_learner
    from covid_fastai.ema import WeightsEMA

    class Probe(Callback):
        order = 30  # after WeightsEMA (20)
        def before_fit(self): self.valid_models = []
        def before_validate(self): self.valid_models.append(self.learn.model)
        def after_step(self): self.last = {k: v.clone() for k, v in self.learn.model.state_dict().items()}

    probe, ema = Probe(), WeightsEMA(0.9)
    learn = synth_learner(n_trn=8, lr=0.1, cbs=[ema, probe])
    model = learn.model
    learn.fit(3)
    assert all(m is ema.ema.module for m in probe.valid_models)  # validation scored the average
    assert learn.model is model  # the trained model is back after each validation
    final = learn.model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in ema.ema.module.state_dict().items())
    assert any(not torch.equal(final[k], probe.last[k]) for k in final)  # ... not the last step's weights
    assert ema.step == 3 * len(learn.dls.train)


def test_ema_resumes_its_average_and_sits_out_lr_find():
    from fastai.test_utils import synth_learner
    from covid_fastai.ema import WeightsEMA
    first = WeightsEMA(0.9)
    learn = synth_learner(n_trn=8, lr=0.1, cbs=[first])
    learn.fit(2)
    saved = first.state_dict()
    again = WeightsEMA(0.9)
    again.load_state_dict(saved)  # what restore_fit_state does with a checkpoint's "ema"
    learn2 = synth_learner(n_trn=8, lr=0.1, cbs=[again])
    learn2.fit(1)
    assert again.step == saved["step"] + len(learn2.dls.train)  # the warmup goes on from where it was
    probe = WeightsEMA(0.9)
    learn3 = synth_learner(n_trn=8, lr=0.1, cbs=[probe])
    learn3.lr_find(num_it=5, show_plot=False)
    assert probe.ema is None  # lr_find's trial weights are never averaged


# --- one run with all three, and its checkpoint -------------------------------------------------------------------

def test_run_records_options_and_checkpoint_keeps_ema(sourced, tmp_path):
    from fastai.callback.core import Callback
    from covid_fastai.train import run_recipe

    class KeepCheckpoint(Callback):  # the run removes checkpoint.pt once complete: keep the epoch's copy
        order = 95  # after EpochCheckpoint (90)
        def after_epoch(self): shutil.copy(self.learn.path / "checkpoint.pt", tmp_path / "ckpt.pt")

    d = run_recipe("resnet18_head", out=tmp_path, data=str(sourced), epochs=1, pretrained=False, size=32, bs=8,
                   lr=0.01, balance="source_label", ema=0.9, aug="xray_shortcut", cache_features="on",
                   cbs=[KeepCheckpoint()])
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["status"] == "complete"
    assert (cfg["recipe"]["balance"], cfg["recipe"]["ema"], cfg["recipe"]["aug"]) == ("source_label", 0.9,
                                                                                     "xray_shortcut")
    assert "weights the image draws" in cfg["speed"]["feature_cache_decision"]  # the cache would ignore the weights
    setup = (d / "report.md").read_text()
    assert "Training draws balanced by source_label; EMA of weights, decay 0.9" in setup
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["ema"]["step"] == 3  # 24 training films, bs 8
    assert any(not torch.equal(ckpt["ema"]["module"][k], v) for k, v in ckpt["model"].items())


# --- ensembles -----------------------------------------------------------------------------------------------------

def test_average_matches_items_by_file():
    from covid_fastai.ensemble import average
    from covid_fastai.interpret import Evaluation
    p1 = np.array([[0.9, 0.1], [0.2, 0.8]])
    e1 = Evaluation("test", ["a", "b"], ["infected", "normal"], p1, np.array([0, 1]), None, None, None)
    e2 = Evaluation("test", ["b", "a"], ["infected", "normal"], np.array([[0.6, 0.4], [0.5, 0.5]]),
                    np.array([1, 0]), None, None, None)
    ev = average([e1, e2], "test")
    assert np.allclose(ev.probs, [[0.7, 0.3], [0.4, 0.6]]) and list(ev.preds) == [0, 1]
    e3 = Evaluation("test", ["a", "c"], ["infected", "normal"], p1, np.array([0, 1]), None, None, None)
    with pytest.raises(DataError, match="different images"): average([e1, e3], "test")


@pytest.fixture(scope="module")
def second_run(tiny_data, tmp_path_factory):
    from covid_fastai.train import run_recipe
    return run_recipe("resnet18_head", out=tmp_path_factory.mktemp("runs2"), data=str(tiny_data), epochs=1,
                      pretrained=False, size=32, bs=8, lr=0.01, seed=7)  # another size: each run keeps its own


def test_evaluate_and_predict_ensemble(tiny_run, second_run, tiny_data, tmp_path, capsys):
    from covid_fastai.cli import Commands
    from covid_fastai.evaluate import predict_run
    Commands().evaluate("ensemble", str(tiny_run), str(second_run), data=str(tiny_data), out=str(tmp_path / "o"))
    out = capsys.readouterr().out
    d = Path(out.split(":")[0])
    assert d.parent == tmp_path / "o" / "ensembles"
    m = json.loads((d / "metrics.json").read_text())
    assert m["runs"] == [str(tiny_run), str(second_run)] and m["n"] == 12
    assert m["threshold"]["chosen_on"] == "averaged valid probabilities" and m["threshold"]["valid_n"] == 12
    assert (d / "report.html").exists()
    # the ensemble's p_infected is the mean of the runs' own
    singles = [pd.read_csv(predict_run(r, [tiny_data / "test"], out=tmp_path / f"p{i}.csv"))
               for i, r in enumerate((tiny_run, second_run))]
    ens = pd.read_csv(d / "predictions.csv")
    mean = (singles[0].set_index("file")["p_infected"] + singles[1].set_index("file")["p_infected"]) / 2
    got = ens.set_index("file")["p_infected"]
    assert np.allclose(got.loc[mean.index], mean, atol=1e-5)
    assert not np.allclose(got.loc[mean.index], singles[0].set_index("file")["p_infected"], atol=1e-5)
    Commands().predict("ensemble", str(tiny_run), str(second_run), str(tiny_data / "test"),
                       out=str(tmp_path / "e.csv"))
    pe = pd.read_csv(tmp_path / "e.csv").set_index("file")["p_infected"]
    assert np.allclose(pe.loc[mean.index], mean, atol=1e-5)
    t = m["threshold"]["value"]
    assert (pd.read_csv(tmp_path / "e.csv").set_index("file")["label"].loc[mean.index] ==
            np.where(mean >= t, "infected", "normal")).all()  # labelled at the threshold chosen on valid


def test_ensemble_needs_two_runs_and_data(tiny_run, tiny_data):
    from covid_fastai.cli import Commands
    with pytest.raises(RecipeError, match="at least two run folders"):
        Commands().evaluate("ensemble", str(tiny_run), data=str(tiny_data))
    with pytest.raises(DataError, match="needs --data"): Commands().evaluate("ensemble", str(tiny_run), str(tiny_run))
