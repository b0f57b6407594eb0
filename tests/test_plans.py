"For every recipe's plan, exactly which parameters train; plus freeze_to, train_bn, errors, discriminative lr."
import dataclasses
import re

import pytest
from fastai.vision.all import Callback

from covid_fastai import plans
from covid_fastai.callbacks import Thaw
from covid_fastai.errors import UserError
from covid_fastai.features import use_feature_cache
from covid_fastai.recipes import load_recipe, recipe_files, recipe_from_dict, with_overrides
from covid_fastai.learner import recipe_learner

HEAD = {"head.2.weight", "head.2.bias", "head.5.weight", "head.5.bias"}
VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG_ALL = {f"body.features.{i}.{w}" for i in VGG_CONVS for w in ("weight", "bias")}


def _learner(tiny_data, name, **kw):
    rec = with_overrides(load_recipe(name), data=str(tiny_data), pretrained=False, size=32, bs=8, **kw)
    learn, _ = recipe_learner(rec)
    return learn


def _all_body(learn):
    return {f"body.{n}" for n, _ in learn.model[0].model.named_parameters()}


def _under(learn, *prefixes):
    return {n for n in _all_body(learn) if any(n.startswith(f"body.{p}.") for p in prefixes)}


EXPECTED = {
    "vgg16_head": lambda l: HEAD,
    "vgg16_partial": lambda l: {"body.features.10.weight", "body.features.10.bias"} | HEAD,
    "vgg16_few": lambda l: {f"body.features.{i}.{w}" for i in (0, 5, 10, 12, 19, 21, 26, 28)
                            for w in ("weight", "bias")} | HEAD,
    "vgg16_full": lambda l: VGG_ALL | HEAD,
    "resnet18_head": lambda l: HEAD,
    "resnet18_one": lambda l: {"body.layer3.0.conv1.weight"} | HEAD,
    "resnet18_few": lambda l: {"body.conv1.weight"} | _under(l, "layer1", "layer3") | HEAD,
    "resnet18_full": lambda l: _all_body(l) | HEAD,
    "effnet_lite0_head": lambda l: HEAD,
    "effnet_lite0_partial": lambda l: _under(l, "blocks.5", "blocks.6", "conv_head", "bn2") | HEAD,
    "effnet_lite0_full": lambda l: _all_body(l) | HEAD,
    # freeze_to(4): the stem (conv_stem, bn1) and blocks 0-2 frozen; timm's classifier shape: one Linear
    "best": lambda l: _under(l, "blocks.3", "blocks.4", "blocks.5", "blocks.6", "conv_head", "bn2")
    | {"head.3.weight", "head.3.bias"},
}


def test_every_recipe_has_an_expectation():
    assert set(EXPECTED) == set(recipe_files())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_trainable_parameters(tiny_data, name):
    learn = _learner(tiny_data, name)
    trainable = {n for n, p in learn.model[0].model.named_parameters() if p.requires_grad}
    trainable = {f"body.{n}" for n in trainable} | {f"head.{n}" for n, p in learn.model[1].named_parameters()
                                                   if p.requires_grad}
    assert trainable == EXPECTED[name](learn)
    assert set(learn.trainable) == trainable  # what the run records in config.json
    if name == "resnet18_few":  # the seed named conv1, not bn1; layer1/layer3 include their BatchNorms
        assert "body.bn1.weight" not in trainable and "body.layer1.0.bn1.weight" in trainable


def test_train_bn_keeps_frozen_batchnorm_trainable(tiny_data):
    learn = _learner(tiny_data, "resnet18_head", train_bn=True)
    bn = {n for n in _all_body(learn) if re.search(r"\.bn\d\.|downsample\.1\.|^body\.bn1\.", n)}
    assert bn and set(learn.trainable) == bn | HEAD


def test_freeze_to_over_layer_groups(tiny_data):
    learn = _learner(tiny_data, "resnet18_full")
    assert learn.group_names == ["conv1, bn1", "layer1.0, layer1.1", "layer2.0, layer2.1", "layer3.0, layer3.1",
                                 "layer4.0, layer4.1", "head"]
    names = set(plans.apply_plan(learn, plans.freeze_to(4)))
    assert names == _under(learn, "layer4") | HEAD
    names = set(plans.apply_plan(learn, plans.freeze_to(0)))
    assert names == _all_body(learn) | HEAD
    with pytest.raises(UserError, match="out of range.*6 layer groups"):
        plans.apply_plan(learn, plans.freeze_to(6))


def test_vgg_layer_groups_are_stages(tiny_data):
    learn = _learner(tiny_data, "vgg16_head")
    assert learn.group_names == ["features.0, features.2", "features.5, features.7",
                                 "features.10, features.12, features.14", "features.17, features.19, features.21",
                                 "features.24, features.26, features.28", "head"]
    assert len(learn.opt.param_lists) == 6


def test_unknown_pattern_lists_valid_names(tiny_data):
    learn = _learner(tiny_data, "vgg16_head")
    with pytest.raises(UserError) as e:
        plans.apply_plan(learn, plans.layers("features.11"))
    msg = str(e.value)
    assert "'features.11' matches no module" in msg and "features.10" in msg and "features.28" in msg
    assert "\n" not in msg


def test_glob_patterns(tiny_data):
    learn = _learner(tiny_data, "resnet18_head")
    names = set(plans.apply_plan(learn, plans.layers("layer4.*.conv2")))
    assert names == {"body.layer4.0.conv2.weight", "body.layer4.1.conv2.weight"} | HEAD


def test_discriminative_learning_rates(tiny_data):
    learn = _learner(tiny_data, "resnet18_full")
    learn.fit(1, slice(1e-5, 1e-3))
    lrs = [h["lr"] for h in learn.opt.hypers]
    assert len(lrs) == 6 and lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs, lrs[1:]))


def test_frozen_parameters_do_not_change(tiny_data):
    learn = _learner(tiny_data, "vgg16_partial")
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    learn.fit(1, 1e-2)
    changed = {n for n, p in learn.model.named_parameters() if not (p.detach() == before[n]).all()}
    assert changed == {"0.model.features.10.weight", "0.model.features.10.bias", "1.2.weight", "1.2.bias",
                       "1.5.weight", "1.5.bias"}


# ---------------------------------------------------------------- freeze_epochs: frozen early, everything later

def _thawing(tiny_data, plan, **kw):
    rec = dataclasses.replace(load_recipe("resnet18_full"), plan=plan)
    return with_overrides(rec, data=str(tiny_data), pretrained=False, size=32, bs=8, **kw)


class _Snapshots(Callback):
    "The stem's conv weight and BatchNorm running mean after each epoch, and which parameters trained in it."
    order = 99

    def before_fit(self):
        body = self.learn.model[0].model
        self.conv, self.bn = [body.conv1.weight.detach().clone()], [body.bn1.running_mean.clone()]
        self.grad = []

    def before_train(self): self.grad.append(all(p.requires_grad for p in self.learn.model.parameters()))

    def after_epoch(self):
        body = self.learn.model[0].model
        self.conv.append(body.conv1.weight.detach().clone())
        self.bn.append(body.bn1.running_mean.clone())


def test_freeze_epochs_unfreezes_everything_at_its_epoch(tiny_data):
    "freeze_to(3, freeze_epochs=2): the stem is fixed for 2 epochs, then trains (its BatchNorm statistics too)."
    learn, _ = recipe_learner(_thawing(tiny_data, plans.freeze_to(3, freeze_epochs=2), bn_freeze=True))
    assert set(learn.trainable) == _under(learn, "layer3", "layer4") | HEAD  # as freeze_to(3) until epoch 2
    snap = _Snapshots()
    learn.fit_one_cycle(3, 1e-2, cbs=snap)
    assert snap.grad == [False, False, True]
    same = [bool((a == b).all()) for a, b in zip(snap.conv, snap.conv[1:])]
    assert same == [True, True, False]
    same_bn = [bool((a == b).all()) for a, b in zip(snap.bn, snap.bn[1:])]
    assert same_bn == [True, True, False]  # BnFreeze held the frozen stem's statistics, then let them train


def test_freeze_epochs_is_recorded_and_read_back(tiny_data):
    rec = _thawing(tiny_data, plans.head(freeze_epochs=1))
    assert rec.plan.describe() == "head only for 1 epoch(s), then entire network"
    assert recipe_from_dict(dataclasses.asdict(rec)).plan == rec.plan
    learn, _ = recipe_learner(rec)
    assert [type(c) for c in learn.cbs].count(Thaw) == 1
    plans.apply_plan(learn, plans.head())  # a plan applied again replaces the last, Thaw included
    assert not any(isinstance(c, Thaw) for c in learn.cbs)


def test_a_plan_that_thaws_is_never_cached(tiny_data):
    "head(freeze_epochs=1) starts with a frozen body, but the body trains later: cached features would be wrong."
    learn, _ = recipe_learner(_thawing(tiny_data, plans.head(freeze_epochs=1), bn_freeze=True))
    assert use_feature_cache(learn, "on") == (False, "the plan unfreezes the body after 1 epoch(s)")
    learn, _ = recipe_learner(_thawing(tiny_data, plans.head(), bn_freeze=True))
    assert use_feature_cache(learn, "on")[0]


def test_freeze_epochs_errors(tiny_data):
    with pytest.raises(UserError, match="unfreezes its model after 3 epoch.*trains 3.*--epochs 4"):
        recipe_learner(_thawing(tiny_data, plans.freeze_to(3, freeze_epochs=3), epochs=3))
    with pytest.raises(UserError, match="full\\(\\) has nothing to freeze"):
        plans.Plan("full", freeze_epochs=1)
    with pytest.raises(UserError, match="freeze_epochs=0 is below 1"):
        plans.freeze_to(3, freeze_epochs=0)
