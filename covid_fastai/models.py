"""timm bodies, heads and layer groups, assembled into a fastai `Learner`.

`xray_learner` builds the timm model itself (with `pretrained=False`) and loads ImageNet weights through
`covid_fastai.weights.load_pretrained`, so every run records where its weights came from; fastai's
`vision_learner` would call the hub directly and give only two layer groups for a timm name.
"""
from __future__ import annotations

from functools import partial

import timm
from fastai.vision.all import (SGD, Adam, BnFreeze, CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat, Learner,
                               Normalize, TimmBody, accuracy, add_head, create_head, params, skm_to_fastai)
from sklearn import metrics as skm
from timm.models import group_parameters
from torch import nn

from .archs import arch_cfg, family
from .errors import RecipeError

__all__ = ["create_body", "seed_head", "linear_head", "HEADS", "head_summary", "layer_groups", "xray_learner",
           "class_f1", "OPTIMIZERS", "family"]


def create_body(arch: str) -> nn.Module:
    "A randomly initialised timm model without its classifier (weights are loaded separately)."
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        close = timm.list_models(f"*{arch.split('.')[0]}*")[:10]
        raise RecipeError(f"unknown timm architecture {arch!r} ({e})", f"similar names: {close}") from None
    if arch_cfg(arch).drop_pre_logits: model.pre_logits = nn.Identity()  # see covid_fastai.archs
    return model


def seed_head(nf: int, n_out: int, hidden: int = 380, p: float = 0.5, pool: int = 1) -> nn.Sequential:
    """The assignment's head: [pool] -> flatten -> Linear(nf*pool*pool, hidden) -> ReLU -> Dropout(p) -> Linear.

    `pool=7` keeps VGG's 7x7x512 = 25088 flattened features (torchvision's AdaptiveAvgPool2d((7, 7)));
    `pool=1` is ResNet's global average pool (512 features). `HEADS` takes it from the family's `ArchCfg.seed_pool`.
    """
    # torch.nn.Flatten (not fastai's view-based Flatten): channels-last activations are not viewable.
    return nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(nf * pool * pool, hidden),
                         nn.ReLU(inplace=True), nn.Dropout(p), nn.Linear(hidden, n_out))


def linear_head(nf: int, n_out: int, p: float = 0.2) -> nn.Sequential:
    "timm's own classifier shape: global average pool -> flatten -> Dropout(p) -> Linear(nf, n_out)."
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(p), nn.Linear(nf, n_out))


# name -> (nf, n_out, hidden, dropout, arch) -> head module
HEADS = {
    "seed": lambda nf, n_out, hidden, p, arch: seed_head(nf, n_out, hidden, p, pool=arch_cfg(arch).seed_pool),
    "fastai": lambda nf, n_out, hidden, p, arch: create_head(nf, n_out, lin_ftrs=[hidden], ps=p),
    "linear": lambda nf, n_out, hidden, p, arch: linear_head(nf, n_out, p),
}
HEADS_WITHOUT_HIDDEN = {"linear"}  # heads that ignore `hidden`


def head_summary(head: str, hidden: int, dropout: float) -> str:
    "How a run's head is described in its report, e.g. '512 hidden, dropout 0.5' (no hidden units where unused)."
    return ("" if head in HEADS_WITHOUT_HIDDEN else f"{hidden} hidden, ") + f"dropout {dropout}"


def layer_groups(body: nn.Module, arch: str) -> list[tuple[str, list[str]]]:
    """[(group label, [parameter names])] for the body, in forward order, from timm's group matchers: the family's
    `ArchCfg.group_matcher`, else the model's own coarse one (ResNet: stem + one group per stage; EfficientNet:
    stem + one group per block stage + head conv)."""
    own = arch_cfg(arch).group_matcher
    matcher = own(body) if own else body.group_matcher(coarse=True)
    groups = group_parameters(body, matcher)
    out = []
    for _, names in sorted(groups.items()):
        units = []  # top-level module names; two levels inside numbered containers (features.10, blocks.3)
        for n in names:
            parts = n.split(".")
            unit = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
            if unit not in units: units.append(unit)
        out.append((", ".join(units), names))
    return out


def class_f1(i: int, name: str):
    "F1 of class index `i` (one-vs-rest), as a fastai metric named `f1_<name>`."
    m = skm_to_fastai(skm.f1_score, labels=[i], average="macro", zero_division=0)
    m.name = f"f1_{name}"
    return m


OPTIMIZERS = {
    # the seed: torch SGD with momentum 0.9, no weight decay (fastai's SGD steps identically)
    "sgd": lambda mom, wd: partial(SGD, mom=mom, wd=wd),
    "adamw": lambda mom, wd: partial(Adam, mom=mom, wd=wd, decouple_wd=True),
}


def _splitter(groups):
    names = [set(ns) for _, ns in groups]

    def split(model):
        body = dict(model[0].model.named_parameters())
        return [[body[n] for n in sorted(ns, key=list(body).index)] for ns in names] + [params(model[1])]
    return split


def xray_learner(dls, arch: str, pretrained: bool = True, weights=None, head: str = "seed", hidden: int = 380,
                 dropout: float = 0.5, opt: str = "sgd", mom: float = 0.9, wd: float = 0.0, train_bn: bool = True,
                 lr: float = 1e-3, label_smoothing: float = 0.0, bn_freeze: bool = False, cbs=None, path=None,
                 **kwargs) -> Learner:
    """A fastai `Learner` around timm `arch`, ImageNet weights when `pretrained`.

    head: 'seed' (the assignment's Linear-380-ReLU-Dropout-Linear), 'fastai' (`create_head` with
    `lin_ftrs=[hidden]`: concat pool, BatchNorm, two dropouts) or 'linear' (timm's classifier: pool, Dropout(dropout),
    one Linear; `hidden` unused). Layer groups: one per stage of the body, then the head (`learn.group_names`).
    label_smoothing: > 0 uses fastai's `LabelSmoothingCrossEntropyFlat(eps=label_smoothing)`.
    bn_freeze: adds fastai's `BnFreeze`: BatchNorm layers whose parameters are frozen stay in eval mode.
    """
    body = create_body(arch)
    if pretrained:
        from .weights import load_pretrained
        provenance = load_pretrained(body, arch, weights=weights)
    else:
        provenance = {"source": "random-init", "note": "pretrained=False: no ImageNet weights"}
    nf, n_out = body.num_features, dls.c
    if head not in HEADS: raise RecipeError(f"unknown head {head!r}", f"choose one of {', '.join(HEADS)}")
    head_mod = HEADS[head](nf, n_out, hidden, dropout, arch)
    model = add_head(TimmBody(body), nf, n_out, head=head_mod)
    # Normalise with the statistics the weights were trained with (timm's pretrained config), always, so
    # random-init and pretrained runs see the same inputs.
    cfg = body.pretrained_cfg
    if not dls.after_batch.fs.filter(lambda t: isinstance(t, Normalize)):
        dls.add_tfms([Normalize.from_stats(cfg["mean"], cfg["std"])], "after_batch")
    groups = layer_groups(body, arch)
    if opt not in OPTIMIZERS: raise RecipeError(f"unknown optimiser {opt!r}", f"choose one of {sorted(OPTIMIZERS)}")
    metrics = [accuracy] + [class_f1(i, c) for i, c in enumerate(dls.vocab)]
    loss = LabelSmoothingCrossEntropyFlat(eps=label_smoothing) if label_smoothing > 0 else CrossEntropyLossFlat()
    cbs = list(cbs or []) + ([BnFreeze()] if bn_freeze else [])
    learn = Learner(dls, model, loss_func=loss, opt_func=OPTIMIZERS[opt](mom, wd), lr=lr,
                    splitter=_splitter(groups), metrics=metrics, cbs=cbs, path=path, train_bn=train_bn,
                    wd=wd, **kwargs)
    learn.arch, learn.weights_provenance, learn.bn_freeze = arch, provenance, bn_freeze
    learn.group_names = [g for g, _ in groups] + ["head"]
    return learn
