"""Cached body features: when a plan freezes the whole body, run it once per image view, train the head on
the cache.

Policy (documented in the README): the cache computes what the uncached fit would have computed. Training
images get `views` augmented views (default 2, drawn with the recipe's training augmentation, seeded), made
with the body in training mode as in an uncached fit of a frozen body: BatchNorm normalises with batch
statistics and its running statistics move towards the X-ray data. Epoch `e` trains on view `e % views`, so 10
epochs cost 2 body passes instead of 10. Validation gets its single deterministic view in eval mode, after
the training views. The BatchNorm running statistics are stored with the cache and restored when it is reused,
so later evaluation sees the same body either way. With `bn_freeze` (fastai's BnFreeze, the modern policy) the
frozen body runs in eval mode instead, and each cached view is exactly what the uncached fit computes for that
augmentation draw. With augmentation off one view is made.
Parameter-free pooling at the start of the head (e.g. ResNet's global average pool) is applied before
caching, so the cache holds 512 numbers per image instead of 512x7x7.

Caches live in `<cache>/features/<key>.safetensors`; the key covers the architecture, the weights' sha256,
every image's path and bytes (not its mtime: a data set copied again still hits), the split, input size,
augmentation, views and seed, so a change to any of them makes a new cache.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from pathlib import Path

import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.vision.all import Callback, Learner, set_seed
from safetensors.torch import load_file, save_file
from torch import nn

from .cache import cache_dir
from .cache import sha256_file
from .files import atomic_path
from .progress import phase
from .callbacks import Thaw

__all__ = ["body_is_frozen", "bn_in_training_mode", "use_feature_cache", "CACHE_SAFE_AUGS", "feature_cache_key", "split_head", "body_features", "head_learner", "FeatureViews"]

POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def bn_in_training_mode(learn) -> bool:
    "True when the body has BatchNorm layers that a fit would run in training mode (batch statistics)."
    from fastai.callback.training import bn_types  # what BnFreeze acts on
    return not getattr(learn, "bn_freeze", False) and any(isinstance(m, bn_types) for m in learn.model[0].modules())


# Augmentations under which a few cached views stand in for fresh draws every epoch (measured in bench/README.md):
# none (one exact view) and the mild X-ray policy. The seed's RandomResizedCrop(scale 0.08-1) + rotation 30 is
# not: 2 cached views scored up to 4 points below the uncached fit.
CACHE_SAFE_AUGS = ("none", "xray")


def use_feature_cache(learn, mode: str, aug: str = "none") -> tuple[bool, str]:
    """(cache?, why) for cache mode 'auto' | 'on' | 'off' (`Recipe.cache_features`).

    'auto' caches only where the cached fit matches the uncached one within noise: a frozen body whose
    BatchNorm (if any) is in eval mode (`bn_freeze`), under an augmentation in `CACHE_SAFE_AUGS`. With
    training-mode BatchNorm each uncached batch is normalised with its own statistics, and under heavy
    augmentation 2 views are too few a sample; 'on' caches there anyway (faster, measurably less accurate).
    """
    if not body_is_frozen(learn): return False, "part of the body trains"
    thaw = next((c for c in learn.cbs if isinstance(c, Thaw)), None)  # the body trains in later epochs
    if thaw is not None: return False, f"the plan unfreezes the body after {thaw.thaw_epoch} epoch(s)"
    if mode == "off": return False, "cache_features off"
    if mode == "on": return True, "cache_features on"
    if bn_in_training_mode(learn):
        return False, "BatchNorm in the frozen body runs in training mode (bn_freeze false): not cached under 'auto'"
    if aug not in CACHE_SAFE_AUGS:
        return False, f"augmentation {aug!r} is too heavy for a few cached views: not cached under 'auto'"
    return True, f"frozen body without training-mode BatchNorm, augmentation {aug!r}"


def body_is_frozen(learn) -> bool:
    "True when no body parameter trains (so the body is a fixed function of its input in eval mode)."
    return not any(p.requires_grad for p in learn.model[0].parameters())


def split_head(head: nn.Sequential) -> tuple[nn.Sequential, nn.Sequential]:
    "(leading parameter-free pooling/flatten layers, the rest); the rest shares modules with `head`."
    from fastai.layers import AdaptiveConcatPool2d
    i = 0
    while i < len(head) and isinstance(head[i], POOLS + (AdaptiveConcatPool2d, nn.Flatten)): i += 1
    return head[:i], head[i:]


def _files_digest(files) -> str:
    """A hash of the files' paths and bytes. Bytes, not modification times: a data folder copied or provisioned
    again with the same images keeps its digest, so its runs still resume and its feature caches still hit."""
    h = hashlib.sha256()
    for f in files:
        p = Path(f).resolve()
        st = p.stat()
        h.update(f"{p}|{_file_sha256(str(p), st.st_size, st.st_mtime_ns)}\n".encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=1 << 20)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    "One file's sha256, read once per process while its size and modification time stay the same."
    return sha256_file(path)


def targets_digest(dls) -> str:
    """sha256 of the class list and each train and valid item's target, in order: what `--labels` and labels.csv
    decide. Only get_y and Categorize run (`Datasets.tls[1]`), no image is decoded: milliseconds."""
    h = hashlib.sha256(json.dumps([str(c) for c in dls.vocab]).encode())
    for ds in (dls.train_ds, dls.valid_ds):
        h.update(json.dumps([int(t) for t in ds.tls[1]]).encode())
    return h.hexdigest()


def feature_cache_key(arch: str, weights_sha: str | None, train_files, valid_files, size: int, resize: int,
                      aug: str, views: int, seed: int, pre_pool: str, bn_train: bool = True,
                      targets: str | None = None, bf16: bool = False, bs: int | None = None) -> str:
    """A hash of everything the cached features depend on. The cache stores the targets too, so `targets`
    (`targets_digest`) is part of it; `bs` matters only when BatchNorm runs in training mode (batch statistics)."""
    spec = {"arch": arch, "weights": weights_sha, "train": _files_digest(train_files),
            "valid": _files_digest(valid_files), "size": size, "resize": resize, "aug": aug, "views": views,
            "seed": seed, "pre_pool": pre_pool, "bn_train": bn_train, "targets": targets, "bf16": bf16,
            "bs": bs if bn_train else None,
            "version": 4}  # 3: images decoded by open_xray (always 8-bit gray); 4: targets, bf16 and bs in the key
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


@torch.no_grad()
def body_features(learn, dl, pre_pool: nn.Module, bf16: bool, channels_last: bool = True,
                  train_mode: bool = False, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    "Run the (frozen) body and the head's leading pooling over `dl`: (features, targets); `progress.step()` per batch."
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # on the device the Learner's batches go to (a GPU where there is one: the fit has not moved the model yet)
    device = getattr(learn.dls, "device", None) or next(learn.model[0].parameters()).device
    body = learn.model[0].train(train_mode).to(device, memory_format=fmt)  # model and input in one format (else: slow)
    feats, targs = [], []
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for xb, yb in dl:
        xb = xb.as_subclass(torch.Tensor).to(device).contiguous(memory_format=fmt)
        with amp:
            f = pre_pool(body(xb))
        feats.append(f.cpu())  # bf16 when the body ran under autocast: half the cache
        targs.append(yb.as_subclass(torch.Tensor).cpu())
        if progress is not None: progress.step()
    return torch.cat(feats), torch.cat(targs)


class FeatureViews:
    "Indexable (feature, target) pairs from one of several cached views (each in its own order), switched per epoch."
    def __init__(self, views: list[torch.Tensor], targs: list[torch.Tensor]):
        self.views, self.targs, self.view = views, targs, 0

    def __len__(self): return len(self.targs[0])

    def __getitem__(self, i): return self.views[self.view][i].float(), self.targs[self.view][i]


class SwitchView(Callback):
    "Train epoch `e` on cached view `e % n_views`."
    def before_epoch(self):
        ds = self.dls.train.dataset
        if isinstance(ds, FeatureViews): ds.view = self.epoch % len(ds.views)


def _compute_or_load(learn, recipe, pre_pool, views: int, bf16: bool) -> tuple[dict, bool]:
    "The cached tensors {'train_<v>', 'train_<v>_y', 'valid', 'valid_y', 'buffer.<name>'}, and whether from disk."
    from .augment import make_aug
    aug = make_aug(recipe.aug, recipe.size, recipe.resize)
    bn_train = not recipe.bn_freeze  # BnFreeze keeps frozen BatchNorm in eval mode: features then depend on nothing else
    key = feature_cache_key(recipe.arch, learn.weights_provenance.get("sha256"), learn.dls.train.items,
                            learn.dls.valid.items, recipe.size, aug.resize_to, recipe.aug, views, recipe.seed,
                            repr(pre_pool), bn_train, targets=targets_digest(learn.dls), bf16=bf16, bs=recipe.bs)
    path = cache_dir() / "features" / f"{key}.safetensors"
    buffers = dict(learn.model[0].named_buffers())  # BatchNorm running statistics (and counters)
    if path.exists():
        try:
            t = load_file(path)
            for k, b in buffers.items(): b.copy_(t[f"buffer.{k}"])
            return t, True
        except Exception: path.unlink(missing_ok=True)  # a torn, corrupt or foreign file: recompute
    out = {}
    valid_dl = learn.dls.valid.new(shuffle=False, drop_last=False)
    n_batches = views * len(learn.dls.train.new(shuffle=True, drop_last=False)) + len(valid_dl)
    with phase(f"feature cache: the frozen body over {views} training view(s) and valid", total=n_batches) as ph:
        for v in range(views):
            set_seed(recipe.seed + v)  # each view's augmentation is reproducible
            # shuffled batches, as in training: BatchNorm's batch statistics must not see one class per batch
            dl = learn.dls.train.new(shuffle=True, drop_last=False)
            out[f"train_{v}"], out[f"train_{v}_y"] = body_features(learn, dl, pre_pool, bf16, recipe.channels_last,
                                                                   train_mode=bn_train, progress=ph)
        out["valid"], out["valid_y"] = body_features(learn, valid_dl, pre_pool, bf16, recipe.channels_last,
                                                     progress=ph)
    out.update({f"buffer.{k}": b.detach().clone() for k, b in buffers.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in out.items()}, tmp)
    return out, False


def head_learner(learn, recipe, views: int = 2, bf16: bool = False, cbs=None) -> Learner:
    """A Learner that trains `learn`'s head (shared modules) on cached body features.

    Same loss, optimiser, lr, metrics and callbacks as `learn`; `learn.model` holds the trained head afterwards.
    """
    pre_pool, rest = split_head(learn.model[1])
    views = 1 if recipe.aug == "none" else views
    t, from_disk = _compute_or_load(learn, recipe, pre_pool, views, bf16)
    set_seed(recipe.seed)  # the head's training shuffles alike whether the cache was made now or loaded
    train = FeatureViews([t[f"train_{v}"] for v in range(views)], [t[f"train_{v}_y"] for v in range(views)])
    valid = FeatureViews([t["valid"]], [t["valid_y"]])
    bs = recipe.bs
    device = getattr(learn.dls, "device", None)  # the head trains where the whole model would have
    dls = DataLoaders(DataLoader(train, bs=bs, shuffle=True, drop_last=len(train) % bs == 1, device=device),
                      DataLoader(valid, bs=bs, device=device), device=device)
    hl = Learner(dls, rest, loss_func=learn.loss_func, opt_func=learn.opt_func, lr=learn.lr, metrics=learn.metrics,
                 cbs=[SwitchView()] + list(cbs or []), path=learn.path, train_bn=learn.train_bn, wd=learn.wd)
    hl.features_from_disk, hl.feature_views = from_disk, views
    dls.vocab = learn.dls.vocab  # the images' classes, for callbacks that name them (a tune's per-epoch ROC AUC)
    return hl
