"""Augmentation policies: named torchvision pipelines (the assignment's, the X-ray one, none) as one fastai item
transform, applied after `covid_fastai.data.DecodeOnce` has decoded and resized each image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torchvision.transforms as T
from fastai.vision.all import PILImage, RandTransform

from .errors import RecipeError

__all__ = ["XrayAugment", "AUGMENTATIONS", "make_aug", "ASSIGNMENT_RESIZE_RATIO"]


class TorchvisionTfm(RandTransform):
    """Apply torchvision transforms to PIL images: `train` on the training set, `valid` elsewhere.

    One transform for both sets, because fastai keeps only one item transform of each type.
    """
    order, split_idx = 1, None  # before fastai's ToTensor (order 5); runs on every split

    def __init__(self, train, valid):
        super().__init__(p=1.0)
        self.train, self.valid = train, valid

    def before_call(self, b, split_idx):
        super().before_call(b, split_idx)
        self.tfm = self.train if split_idx == 0 else self.valid

    # Augment in the image's own mode (one channel for grayscale X-rays: a third of the work), then give the
    # ImageNet body its 3 channels.
    def encodes(self, x: PILImage): return PILImage(self.tfm(x).convert("RGB"))


ASSIGNMENT_RESIZE_RATIO = 256 / 224  # the assignment's Resize 256 before its 224 crops


@dataclass(frozen=True)
class XrayAugment:
    """An augmentation policy as a torchvision pipeline, with the assignment's order of ops (kept op for op, so its
    recipes are faithful); `AUGMENTATIONS` names the settings of each policy.

    Train: Resize(`resize`) (short side) -> RandomRotation(`rotate`) -> RandomResizedCrop(`size`, `scale`)
    -> RandomHorizontalFlip. Eval: Resize(`resize`) -> CenterCrop(`size`).
    """
    size: int = 224           # crop size fed to the network
    resize: int | None = None  # short side before cropping; default round(size * resize_ratio)
    resize_ratio: float = ASSIGNMENT_RESIZE_RATIO  # default short side over size (eval crops the central 87.5%)
    rotate: float = 30.0      # max degrees of RandomRotation (0 = off)
    scale: tuple = (0.08, 1.0)  # RandomResizedCrop area range; (1, 1) = centre-ish full crops
    flip: bool = True         # horizontal flip (never vertical: anatomy is not up-down symmetric)
    random: bool = True       # False = the eval pipeline for training too (no augmentation)

    @property
    def resize_to(self) -> int: return self.resize or round(self.size * self.resize_ratio)

    def eval_tfm(self): return T.Compose([T.Resize(self.resize_to), T.CenterCrop(self.size)])

    def train_tfm(self):
        if not self.random: return self.eval_tfm()
        tfms = [T.Resize(self.resize_to)]
        if self.rotate: tfms.append(T.RandomRotation(self.rotate))
        tfms.append(T.RandomResizedCrop(self.size, scale=tuple(self.scale)))
        if self.flip: tfms.append(T.RandomHorizontalFlip())
        return T.Compose(tfms)

    def item_tfms(self):
        "The pipelines after their first op, Resize, which `DecodeOnce` applies when it decodes."
        tail = lambda c: T.Compose(c.transforms[1:])
        return [TorchvisionTfm(tail(self.train_tfm()), tail(self.eval_tfm()))]



# Named augmentation policies a recipe or `--aug` can pick. 'seed' is the assignment's (its seed notebook's)
# pipeline: the name is recorded in every run's config.json and in feature-cache keys, so it stays.
AUGMENTATIONS = {
    "seed": dict(rotate=30.0, scale=(0.08, 1.0), flip=True),  # the assignment's pipeline
    # the modern policy's: mild rotation and crops, no flips (a flipped chest puts the heart on the wrong side,
    # and mirrors the L/R markers that some sources print on the film)
    # Its crops cover 70-100% of the film, so evaluation shows the whole film too (short side = size; the centre crop
    # trims only the long side). The seed's Resize 256 + CenterCrop 224 cuts the borders and magnifies 14%: scored
    # that way, three modern models lost 6.9, 0.0 and 0.3 points of validation accuracy (docs/experiments.md).
    "xray": dict(rotate=10.0, scale=(0.7, 1.0), flip=False, resize_ratio=1.0),
    "none": dict(random=False),
}


def make_aug(aug: str, size: int, resize: int | None = None) -> XrayAugment:
    "The `XrayAugment` of the policy named `aug` at crop `size` (short side `resize`, default the policy's)."
    if aug not in AUGMENTATIONS:
        raise RecipeError(f"unknown augmentation {aug!r}", f"choose one of {sorted(AUGMENTATIONS)}")
    if resize is not None and resize < size:
        raise RecipeError(f"--resize {resize} is smaller than --size {size}",
                          f"the short side is resized before the {size} px crop, so it must be at least {size}")
    return XrayAugment(size=size, resize=resize, **AUGMENTATIONS[aug])
