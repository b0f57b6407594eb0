"Training policies: `--policy modern` really changes optimiser, loss, head, BatchNorm, augmentation and lr choice."
import dataclasses
import json
import re

import pytest
import torch
from fastai.vision.all import BnFreeze, Callback, Learner, LabelSmoothingCrossEntropyFlat
from torch import nn
from torchvision import transforms as T

from covid_fastai.augment import make_aug
from covid_fastai.errors import UserError
from covid_fastai.features import feature_cache_key
from covid_fastai.recipes import MODERN_POLICY, SEED_POLICY, load_recipe, with_overrides
from covid_fastai.learner import recipe_learner
from covid_fastai.train import run


def _tiny(tiny_data, name, **kw):
    return with_overrides(load_recipe(name), data=str(tiny_data), pretrained=False, size=32, bs=8, **kw)


def test_policy_replaces_training_settings_and_keeps_the_experiment(tiny_data):
    seed = load_recipe("vgg16_partial")
    modern = with_overrides(seed, policy="modern")
    for k, v in MODERN_POLICY.items(): assert getattr(modern, k) == v, k
    assert (modern.arch, modern.plan, modern.name) == (seed.arch, seed.plan, seed.name)
    # explicit overrides win over the policy; switching back restores the seed's settings
    assert with_overrides(seed, policy="modern", epochs=3, lr_find="false").epochs == 3
    back = with_overrides(modern, policy="seed")
    for k, v in SEED_POLICY.items(): assert getattr(back, k) == v, k
    with pytest.raises(UserError, match="--policy must be one of assignment, modern"):
        with_overrides(seed, policy="fancy")


def test_modern_learner_has_label_smoothing_bnfreeze_fastai_head_adamw(tiny_data):
    learn, _ = recipe_learner(_tiny(tiny_data, "effnet_lite0_head", policy="modern"))
    assert isinstance(learn.loss_func, LabelSmoothingCrossEntropyFlat) and learn.loss_func.eps == 0.1
    assert any(isinstance(c, BnFreeze) for c in learn.cbs)
    assert any(isinstance(m, nn.BatchNorm1d) for m in learn.model[1].modules())  # fastai's create_head
    learn.create_opt()
    assert learn.opt.hypers[0]["wd"] == 0.01 and "sqr_mom" in learn.opt.hypers[0]  # Adam(W) state
    seed, _ = recipe_learner(_tiny(tiny_data, "effnet_lite0_head"))
    assert not isinstance(seed.loss_func, LabelSmoothingCrossEntropyFlat)
    assert not any(isinstance(c, BnFreeze) for c in seed.cbs)


def test_linear_head_is_timms_classifier_shape_and_trains_cached(tiny_data, tmp_path):
    "head='linear': pool -> flatten -> Dropout(p) -> one Linear(nf, 2); a cached head-only run trains it."
    rec = _tiny(tiny_data, "effnet_lite0_head", policy="modern", head="linear", dropout=0.3, epochs=1, tta=False)
    learn, _ = recipe_learner(rec)
    lins = [m for m in learn.model[1].modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lins] == [(learn.model[0].model.num_features, 2)]
    assert [m.p for m in learn.model[1].modules() if isinstance(m, nn.Dropout)] == [0.3]
    d = run(rec, out=tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["recipe"]["head"] == "linear" and cfg["status"] == "complete"
    report = (d / "report.md").read_text()
    assert "head `linear` (dropout 0.3)" in report  # no hidden layer to report
    assert re.search(r"^\| 0 \| \d+\.\d{4} \|", report, re.M)  # the history table's epoch is a whole number
    with pytest.raises(UserError, match="--head must be one of fastai, linear, seed"):
        with_overrides(rec, head="mlp")


def _bn_stats(learn):
    return [b.clone() for n, b in learn.model[0].named_buffers() if n.endswith("running_mean")]


@pytest.mark.parametrize("bn_freeze", [True, False])
def test_bn_freeze_keeps_frozen_running_stats(tiny_data, bn_freeze):
    "Head-only, uncached: BnFreeze leaves the frozen body's BatchNorm statistics alone; training mode moves them."
    learn, _ = recipe_learner(_tiny(tiny_data, "effnet_lite0_head", bn_freeze=bn_freeze, cache_features=False))
    before = _bn_stats(learn)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    same = all(torch.equal(a, b) for a, b in zip(before, _bn_stats(learn)))
    assert same == bn_freeze


def test_bn_mode_is_part_of_the_feature_cache_key():
    args = ("arch", "sha", [], [], 224, 256, "seed", 2, 42, "pool")
    assert feature_cache_key(*args, bn_train=True) != feature_cache_key(*args, bn_train=False)


def test_xray_augmentation_is_mild_and_never_flips():
    ops = make_aug("xray", 224).train_tfm().transforms
    kinds = {type(o): o for o in ops}
    assert kinds[T.RandomRotation].degrees == [-10.0, 10.0]
    assert tuple(kinds[T.RandomResizedCrop].scale) == (0.7, 1.0)
    assert not any(isinstance(o, (T.RandomHorizontalFlip, T.RandomVerticalFlip)) for o in ops)


def test_xray_evaluation_sees_the_whole_film():
    "xray: short side resized to the crop size, so the centre crop trims only the long side; seed keeps 256/224."
    from PIL import Image
    im = Image.new("L", (300, 240))
    for size in (224, 160):
        xray = make_aug("xray", size)
        assert xray.resize_to == size and xray.eval_tfm()(im).size == (size, size)
        assert make_aug("seed", size).resize_to == round(size * 256 / 224)
    assert make_aug("xray", 224, resize=256).resize_to == 256  # an explicit --resize wins
    # a square film is shown whole: nothing cropped, only resized
    sq = Image.linear_gradient("L").resize((300, 300))
    assert list(make_aug("xray", 224).eval_tfm()(sq).getdata()) == list(sq.resize((224, 224), Image.BILINEAR).getdata())


@pytest.mark.parametrize("cached", [True, False])
def test_lr_find_picks_the_rate_the_fit_uses(tiny_data, tmp_path, monkeypatch, cached):
    seen = {}
    real = Learner.fit_one_cycle

    def spy(self, n_epoch, lr_max=None, *a, **kw):
        seen["lr_max"] = lr_max
        return real(self, n_epoch, lr_max, *a, **kw)

    monkeypatch.setattr(Learner, "fit_one_cycle", spy)
    rec = _tiny(tiny_data, "effnet_lite0_head", policy="modern", epochs=1, cache_features=cached, lr_find=True,
                lr_mult=10, threshold="0.3")
    d = run(rec, out=tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    lr = cfg["lr_find"]["lr"]
    assert lr > 0 and (d / "lr_find.png").stat().st_size > 0
    assert seen["lr_max"] == slice(lr / 10, lr)  # discriminative rates around the found lr
    assert len(open(d / "history.csv").read().splitlines()) == 2  # lr_find's mock training is not logged
    report = (d / "report.md").read_text()
    assert f"adamw lr {lr:.3g} (lr_find" in report  # the rate the fit used, not the recipe's 1e-3
    # (the same run, to save a fit) a fixed --threshold was chosen on no data, and the report says so
    assert cfg["threshold"]["chosen_on"] == "recipe" and "chosen on no data (a fixed number" in report


class _GroupLrs(Callback):
    "Records each parameter group's learning rate at every training batch."
    def before_fit(self): self.seen = []
    def after_batch(self):
        if self.training: self.seen.append([h["lr"] for h in self.opt.hypers])


def test_modern_gives_discriminative_rates_over_the_plans_groups(tiny_data, tmp_path):
    spy = _GroupLrs()
    rec = _tiny(tiny_data, "resnet18_few", policy="modern", epochs=1)
    assert rec.lr_mult == 100
    run(rec, out=tmp_path, cbs=[spy])
    first = spy.seen[0]
    assert len(first) > 2 and all(a < b for a, b in zip(first, first[1:]))  # body groups rise towards the head
    for lrs in spy.seen:  # fastai's slice(lr/100, lr): the ratio holds all through the one-cycle schedule
        assert lrs[-1] / lrs[0] == pytest.approx(100)
    assert max(max(lrs) for lrs in spy.seen) <= rec.lr * (1 + 1e-6)  # the head's rate is the policy's lr


class _Moms(Callback):
    "Records the optimiser's momentum (Adam beta1) at every training batch."
    def before_fit(self): self.seen = []
    def after_batch(self):
        if self.training: self.seen.append(self.opt.hypers[-1]["mom"])


def test_one_cycle_momentum_cycles_unless_mom_is_given(tiny_data, tmp_path):
    "fit_one_cycle schedules the momentum itself: modern leaves it fastai's cycle; an explicit --mom holds."
    spy = _Moms()
    rec = _tiny(tiny_data, "resnet18_one", policy="modern", epochs=2)
    assert rec.mom is None
    d = run(rec, out=tmp_path, cbs=[spy])
    assert max(spy.seen) == pytest.approx(0.95) and min(spy.seen) < 0.9  # 0.95 -> 0.85 -> 0.95
    assert "momentum 0.95→0.85→0.95 (fastai's one-cycle)" in (d / "report.md").read_text()
    d = run(dataclasses.replace(rec, mom=0.8), out=tmp_path, cbs=[spy])
    assert spy.seen and set(spy.seen) == {0.8}
    assert json.loads((d / "config.json").read_text())["momentum"] == "0.8 (constant)"
    from covid_fastai.report import _momentum  # runs recorded before "momentum" existed always cycled
    assert _momentum({"recipe": {"schedule": "one_cycle", "mom": 0.9}}).startswith("0.95→0.85→0.95")
    from covid_fastai.rundir import recipe_from_config  # and resume such a run the same way
    cfg = json.loads((d / "config.json").read_text())
    assert recipe_from_config(cfg).mom == 0.8
    del cfg["momentum"]
    assert recipe_from_config(cfg).mom is None
    assert with_overrides(rec, mom="none").mom is None and with_overrides(rec, mom="0.7").mom == 0.7


def test_lr_mult_below_one_is_refused():
    with pytest.raises(UserError, match="--lr_mult must be at least 1"):
        with_overrides(load_recipe("best"), lr_mult="0.5")


def test_best_keeps_one_rate():
    assert load_recipe("best").lr_mult == 1  # chosen on valid with one rate (docs/experiments.md)
