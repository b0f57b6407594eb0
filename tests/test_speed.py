"""Speed features behave as stated: bf16 autocast really casts, channels-last really applies, fp32 fallback, and
the feature cache is used, reused and invalidated."""
import json
import platform
import shutil
import time

import pandas as pd
import pytest
import torch

import covid_fastai.features as F
import covid_fastai.learner as L
from covid_fastai.augment import make_aug
from covid_fastai.callbacks import BF16Autocast, ChannelsLast, bf16_supported
from covid_fastai.errors import UserError
from covid_fastai.features import use_feature_cache
from covid_fastai.recipes import cache_mode, load_recipe, with_overrides
from covid_fastai.learner import recipe_learner
from covid_fastai.train import run_recipe

TINY = dict(pretrained=False, size=32, bs=8)


def _fit_one_batch_recording(learn):
    "Fit one batch; record dtype/format of the first conv's input and output and of pred and loss."
    seen = {}
    conv = learn.model[0].model.conv1

    def hook(m, inp, out):
        seen.setdefault("in_cl", inp[0].is_contiguous(memory_format=torch.channels_last))
        seen.setdefault("out_dtype", out.dtype)
    h = conv.register_forward_hook(hook)
    from fastai.callback.core import Callback, CancelFitException

    class Stop(Callback):
        order = 99
        def after_loss(self): seen.update(pred=self.pred.dtype, loss=self.loss.dtype)
        def after_step(self): raise CancelFitException()
    try:
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[Stop()])
    finally:
        h.remove()
    return seen


@pytest.mark.skipif(not bf16_supported(), reason="this CPU has no bf16 support: the fp32 fallback test covers it")
def test_bf16_autocast_and_channels_last_really_apply(tiny_data):
    learn, _ = recipe_learner(with_overrides(load_recipe("resnet18_full"), data=str(tiny_data), **TINY))
    assert learn.bf16_used and any(isinstance(c, BF16Autocast) for c in learn.cbs)
    seen = _fit_one_batch_recording(learn)
    assert seen["out_dtype"] == torch.bfloat16 and seen["in_cl"]
    assert seen["pred"] == torch.float32 and seen["loss"] == torch.float32  # loss in fp32
    assert learn.model[0].model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_fp32_fallback_and_switches_off(tiny_data, monkeypatch):
    monkeypatch.setattr(L, "bf16_supported", lambda *a: False)  # a CPU without bf16
    learn, _ = recipe_learner(with_overrides(load_recipe("resnet18_full"), data=str(tiny_data), **TINY))
    assert not learn.bf16_used and not any(isinstance(c, BF16Autocast) for c in learn.cbs)
    assert _fit_one_batch_recording(learn)["out_dtype"] == torch.float32
    learn, _ = recipe_learner(with_overrides(load_recipe("resnet18_full"), data=str(tiny_data), bf16=False,
                                             channels_last=False, **TINY))
    assert not any(isinstance(c, (BF16Autocast, ChannelsLast)) for c in learn.cbs)
    seen = _fit_one_batch_recording(learn)
    assert seen["out_dtype"] == torch.float32 and not seen["in_cl"]


@pytest.fixture
def body_calls(monkeypatch):
    calls = []
    real = F.body_features

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(F, "body_features", counting)
    return calls


def _config(d): return json.loads((d / "config.json").read_text())


def _speed(d): return _config(d)["speed"]["cached_features"]


def _cached_head(out=None, epochs=1, **overrides):
    """The head Learner a resnet18_head run would fit on cached features (its cache made or loaded as the run's
    would be), without the fit and evaluation around it: for tests about the cache alone."""
    rec = with_overrides(load_recipe("resnet18_head"), epochs=epochs, **overrides)
    learn, _ = recipe_learner(rec)
    return F.head_learner(learn, rec, views=rec.cache_views, bf16=learn.bf16_used)


def test_feature_cache_used_reused_and_invalidated(tiny_data, tmp_path, body_calls):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    # 'on': cached even with training-mode BatchNorm, whose statistics the cache must store and restore
    kw = dict(out=tmp_path / "o", data=str(data), epochs=3, cache_features="on", **TINY)
    t0 = time.perf_counter()
    d1 = run_recipe("resnet18_head", **kw)
    wall = time.perf_counter() - t0
    s1 = _speed(d1)
    assert set(s1) == {"views", "from_disk", "seconds"} and s1["views"] == 2 and s1["from_disk"] is False
    # making the cache takes time, inside the run, and the training time counts it (cached and uncached runs
    # compare fairly): train_seconds = the epochs' training phases + the cache's seconds
    epochs_s = pd.read_csv(d1 / "history.csv")["train_seconds"].sum()
    assert 0 < s1["seconds"] < wall
    assert json.loads((d1 / "metrics.json").read_text())["train_seconds"] == pytest.approx(epochs_s + s1["seconds"],
                                                                                              abs=0.01)
    assert len(body_calls) == 3  # 2 training views + validation, not 3 epochs x (train + valid)
    d2 = run_recipe("resnet18_head", **kw)
    assert _speed(d2)["from_disk"] and len(body_calls) == 3
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (d1, d2))
    assert m1["confusion_matrix"] == m2["confusion_matrix"]  # same results from the reused cache
    from safetensors.torch import load_file
    bn = "0.model.layer1.0.bn1.running_mean"  # BatchNorm statistics from the training-mode pass, restored on reuse
    s1, s2 = load_file(d1 / "model.safetensors"), load_file(d2 / "model.safetensors")
    assert torch.equal(s1[bn], s2[bn]) and not torch.equal(s1[bn], torch.zeros_like(s1[bn]))
    assert _cached_head(**{**kw, "size": 48}).features_from_disk is False  # input size changed
    assert len(body_calls) == 6
    assert _cached_head(**kw).features_from_disk is True and len(body_calls) == 6  # the runs' cache, unchanged
    f = next((data / "train" / "normal").iterdir())  # data changed
    f.write_bytes(next((data / "train" / "infected").iterdir()).read_bytes())
    assert _cached_head(**kw).features_from_disk is False and len(body_calls) == 9


def test_feature_cache_follows_the_labels(fine_labelled, tmp_path, body_calls):
    "The cache stores targets: other labels for the same images (--labels fine_label, an edited labels.csv) miss it."
    kw = dict(out=tmp_path / "o", data=str(fine_labelled.root), epochs=1, cache_features="on", **TINY)
    run_recipe("resnet18_head", **kw)
    assert len(body_calls) == 3
    assert not _cached_head(labels="fine_label", **kw).features_from_disk  # same images, three classes
    assert len(body_calls) == 6
    assert _cached_head(labels="fine_label", **kw).features_from_disk and len(body_calls) == 6
    fine_labelled.relabel_one_training_film()
    assert not _cached_head(labels="fine_label", **kw).features_from_disk and len(body_calls) == 9


def _decision(name, **overrides) -> tuple[bool, str]:
    "(cache?, why) as a run of recipe `name` decides it, without the run."
    rec = with_overrides(load_recipe(name), **overrides)
    learn, _ = recipe_learner(rec)
    return use_feature_cache(learn, cache_mode(rec.cache_features), rec.aug)


def test_feature_cache_only_for_frozen_bodies(tiny_data, tmp_path, body_calls):
    kw = dict(data=str(tiny_data), epochs=1, **TINY)
    assert _decision("resnet18_one", **kw)[0] is False  # a conv trains: no cache
    assert _decision("resnet18_head", cache_features=False, bn_freeze=True, **kw)[0] is False
    assert _decision("resnet18_head", train_bn=True, **kw)[0] is False  # BatchNorm trains
    # 'auto' (the default): not with training-mode BatchNorm, whose batch statistics a cache cannot reproduce;
    # a run follows the decision and records it
    d = run_recipe("resnet18_head", out=tmp_path, **kw)
    assert _speed(d) is None and "training mode" in _config(d)["speed"]["feature_cache_decision"]
    assert body_calls == []
    assert _speed(run_recipe("resnet18_head", out=tmp_path, aug="none", bn_freeze=True, **kw))["views"] == 1
    use, why = _decision("vgg16_head", **kw)  # no BatchNorm, but the seed's heavy augmentation
    assert not use and "too heavy" in why
    assert _decision("vgg16_head", aug="xray", **kw)[0] is True  # mild augmentation: cached
    with pytest.raises(UserError, match="--cache_features must be auto, on or off"):
        run_recipe("resnet18_head", out=tmp_path, cache_features="sometimes", **kw)


def test_cached_head_is_the_models_head(tiny_data, tmp_path):
    "The head trained on cached features is the head the saved model and the evaluation use."
    rec = with_overrides(load_recipe("resnet18_head"), data=str(tiny_data), epochs=2, **TINY)
    learn, folders = recipe_learner(rec)
    before = learn.model[1][5].weight.detach().clone()
    hl = F.head_learner(learn, rec)
    with hl.no_bar(), hl.no_logging(): hl.fit(2, 1e-2)
    assert not torch.equal(before, learn.model[1][5].weight)  # shared module was trained
    assert hl.dls.device == learn.dls.device == hl.dls.train.device  # cached batches go where the model goes
    assert F.split_head(learn.model[1])[0][0].__class__.__name__ == "AdaptiveAvgPool2d"


def test_decode_once_cache(tiny_data, tmp_path, monkeypatch):
    """Train and valid images are decoded once, into the shared store, when the loaders are made; epochs then read
    the store. A file changed during the run is decoded again (per process); a new loader sees a new store."""
    import numpy as np
    from PIL import Image

    from covid_fastai import data as D
    monkeypatch.setattr(D, "_DECODED", {})
    monkeypatch.setattr(D, "_DECODED_BYTES", [0])
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    f = D.find_xray_folders(root)  # its pre-scan opens every file once; count the opens after it
    opened = []
    real_open = Image.open
    monkeypatch.setattr(D.Image, "open", lambda fp, *a, **k: (opened.append(str(fp)), real_open(fp, *a, **k))[1])
    dls = D.xray_dls(f, make_aug("seed", 32), bs=8)
    fitted = f.files("train") + f.files("valid")
    # once each for the store, plus fastai's one-item type check of each loader, which runs before the store opens
    assert set(opened) == set(map(str, fitted)) and len(fitted) <= len(opened) <= len(fitted) + 2
    n0 = len(opened)
    for _ in range(2): list(dls.train)
    assert len(opened) == n0  # epochs read the store
    store = D.decode_once(dls).store
    assert len(store) == 36 and all(min(store.get(p).shape) == 37 for p in fitted)
    assert store.get(fitted[0]).dtype == np.uint8 and store.get(fitted[0]).ndim == 2
    changed = f.files("train")[0]
    changed.write_bytes(f.files("train")[1].read_bytes())  # new content, size and mtime: decoded again
    list(dls.train)
    list(dls.train)
    assert len(opened) == n0 + 1 and opened[-1] == str(changed) and store.get(changed) is None
    D.xray_dls(D.find_xray_folders(root, scan=False), make_aug("seed", 32), bs=8)  # the changed set: a new store
    assert len(opened) >= n0 + 1 + 36


def test_decoded_eval_pipeline_equals_the_seeds(tiny_data):
    "Decode-once + CenterCrop gives exactly torchvision's Resize(256/224 ratio) + CenterCrop on the file."
    import torchvision.transforms as TV
    from PIL import Image

    from covid_fastai import data as D
    f = D.find_xray_folders(tiny_data)
    dls = D.xray_dls(f, make_aug("seed", 32), bs=4)
    xb = dls.valid.one_batch()[0]
    ref = TV.Compose([TV.Resize(37), TV.CenterCrop(32), TV.PILToTensor()])
    for i, fn in enumerate(dls.valid.items[:4]):
        want = ref(Image.open(fn).convert("RGB")).float() / 255
        got = dls.valid.after_batch.decode((xb[i:i + 1],))[0][0].float() / 255
        assert torch.allclose(got, want, atol=1 / 255 + 1e-6)


def test_frozen_vgg_prefix_builds_no_graph(tiny_data):
    """vgg16_partial (the main job) trains features.10 onwards: the frozen prefix before it must run without
    autograd recording (no grad_fn, no saved activations), so its cost is a plain forward pass."""
    learn, _ = recipe_learner(with_overrides(load_recipe("vgg16_partial"), data=str(tiny_data), pretrained=False,
                                             size=32, bs=4))
    mods = dict(learn.model.named_modules())
    prefix, first = (next(m for n, m in mods.items() if n.endswith(f"features.{i}")) for i in (9, 10))
    seen = {}
    hooks = [prefix.register_forward_hook(lambda m, i, o: seen.setdefault("prefix", o)),
             first.register_forward_hook(lambda m, i, o: seen.setdefault("first", o))]
    try:
        learn.model.train()
        learn.model(learn.dls.one_batch()[0])
    finally:
        for h in hooks: h.remove()
    assert seen["prefix"].grad_fn is None and not seen["prefix"].requires_grad
    assert seen["first"].requires_grad  # and the layer that trains does record


def test_progressive_resize_schedule_and_errors():
    from covid_fastai.callbacks import ProgressiveResize, parse_progressive
    cb = ProgressiveResize(parse_progressive("128:2, 160:1"))
    assert [cb.size_at(e) for e in range(5)] == [128, 128, 160, None, None]
    assert parse_progressive("") == []
    for bad in ("128", "128:0", "a:b", "4:1"):
        with pytest.raises(UserError, match="progressive"): parse_progressive(bad)
    with pytest.raises(UserError, match="progressive"): with_overrides(load_recipe("best"), progressive="160")


def test_progressive_resize_trains_small_then_full_and_evaluates_full(tiny_data, tmp_path):
    rec = with_overrides(load_recipe("resnet18_full"), data=str(tiny_data), epochs=2, progressive="16:1",
                         bs=8, size=32, pretrained=False, tta=False)
    sizes = []
    from fastai.callback.core import Callback

    class Spy(Callback):
        order = 50  # after the resize
        def before_batch(self): sizes.append((self.epoch, self.training, tuple(self.xb[0].shape[-2:])))
    d = run_recipe(rec, out=tmp_path, cbs=[Spy()])
    assert {s for e, t, s in sizes if t and e == 0} == {(16, 16)}
    assert {s for e, t, s in sizes if t and e == 1} == {(32, 32)}
    assert {s for e, t, s in sizes if not t} == {(32, 32)}  # validation at full size, resized or not
    assert _config(d)["speed"]["progressive"] == "16:1" and _config(d)["speed"]["cpu_kind"]


def test_fp32_size_is_the_size_on_a_cpu_without_bf16(tiny_data, tmp_path, monkeypatch, capsys):
    import dataclasses
    from fastai.callback.core import Callback
    rec = with_overrides(load_recipe("resnet18_full"), data=str(tiny_data), epochs=1, bs=8, size=64,
                         pretrained=False, tta=False)
    rec = dataclasses.replace(rec, fp32_size=32)  # as a recipe file sets it
    # an explicit size, or another policy, is that size on every CPU; fp32_size given with it stays
    assert with_overrides(rec, size=48).fp32_size is None and with_overrides(rec, policy="modern").fp32_size is None
    assert with_overrides(rec, size=48, fp32_size=40).fp32_size == 40 and with_overrides(rec, epochs=2).fp32_size == 32
    monkeypatch.setattr(L, "fp32_cpu", lambda: False)  # bf16 units (or a GPU): the recipe as written
    assert L.for_this_cpu(rec) is rec
    monkeypatch.setattr(L, "fp32_cpu", lambda: True)  # AVX2-only: fp32_size, once
    here = L.for_this_cpu(rec)
    assert here.size == 32 and L.for_this_cpu(here) is here
    assert L.for_this_cpu(dataclasses.replace(rec, fp32_size=None)).size == 64

    sizes = set()

    class Spy(Callback):
        order = 50
        def before_batch(self): sizes.add(tuple(self.xb[0].shape[-2:]))
    d = run_recipe(rec, out=tmp_path, cbs=[Spy()])
    assert sizes == {(32, 32)}  # training and validation at fp32_size
    assert "training at 32 px, the recipe's fp32_size (64 px elsewhere" in capsys.readouterr().out
    cfg = _config(d)
    assert cfg["recipe"]["size"] == 32 and cfg["speed"]["fp32_size"] == {"size": 32, "used": True}
    assert "Input 32 px (the recipe's fp32_size" in (d / "report.md").read_text()
    # evaluation keeps the size its run trained at, whatever this CPU is and whatever fp32_size says
    import covid_fastai.evaluate as E
    cfg["recipe"]["fp32_size"] = 16  # as if trained at 32 px on a CPU with bf16 units, fp32_size 16
    (d / "config.json").write_text(json.dumps(cfg))
    seen, real_of = [], E.Evaluation.of
    monkeypatch.setattr(E.Evaluation, "of", lambda learn, dl, *a, **k: seen.append(dl.one_batch()[0].shape[-1])
                        or real_of(learn, dl, *a, **k))
    E.evaluate_run(d, tiny_data / "test")
    assert seen == [32]


def test_a_resumed_run_keeps_the_size_it_started_at(tiny_data, tmp_path, monkeypatch):
    "Started on a CPU with bf16 units, resumed on one without: the run goes on at its own size, not at fp32_size."
    import dataclasses
    from fastai.callback.core import Callback
    from covid_fastai.errors import RunInterrupted
    from covid_fastai.train import resume
    rec = dataclasses.replace(with_overrides(load_recipe("resnet18_full"), data=str(tiny_data), epochs=2, bs=8,
                                             size=64, pretrained=False, tta=False), fp32_size=32)
    sizes = []

    class Spy(Callback):
        order = 50
        def before_batch(self): sizes.append((self.epoch, tuple(self.xb[0].shape[-2:])))

    class StopAfterFirst(Callback):
        order = 95
        def after_epoch(self):
            if self.epoch == 0: raise KeyboardInterrupt

    monkeypatch.setattr(L, "fp32_cpu", lambda: False)
    with pytest.raises(RunInterrupted) as e: run_recipe(rec, out=tmp_path, cbs=[Spy(), StopAfterFirst()])
    monkeypatch.setattr(L, "fp32_cpu", lambda: True)
    d = resume(e.value.run_dir, cbs=[Spy()])
    assert {s for ep, s in sizes} == {(64, 64)} and {ep for ep, s in sizes} == {0, 1}
    cfg = _config(d)
    assert cfg["recipe"]["size"] == 64 and cfg["speed"]["fp32_size"] == {"size": 32, "used": False}


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the AVX2 limits are x86 settings")
def test_cpu_limits_make_an_fp32_cpu():
    "The documented emulation of an AVX2-only CPU (docs/speed.md) is what `fp32_cpu` and `cpu_kind` detect."
    import os
    import subprocess
    import sys
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", "import covid_fastai as c; print(c.fp32_cpu(), c.cpu_kind())"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if torch.cuda.is_available(): assert out.stdout.split()[0] == "False"
    else: assert out.stdout.split() in (["True", "avx2"], ["True", "default"])  # 'default': a CPU below AVX2
