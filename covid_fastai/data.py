"""X-ray folders in ImageFolder layout -> fastai `DataLoaders`.

Layout: ``DIR/train/<class>/*`` is required; ``DIR/valid/<class>/*`` (also spelled ``validation`` or
``val``) and ``DIR/test/<class>/*`` are optional. Without a validation folder a seeded random part of
train is held out; without a test folder there are no test metrics (the report says so).
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torchvision.transforms as T
from fastai.vision.all import (CategoryBlock, DataBlock, FuncSplitter, IntToFloatTensor, PILImage, RandomSplitter,
                               RandTransform, Transform, TransformBlock, get_image_files, parent_label)
from PIL import Image, ImageOps

from .errors import UserError

__all__ = ["XrayFolders", "find_xray_folders", "SeedAug", "AUGMENTATIONS", "xray_datablock", "xray_dls",
           "SYNTHETIC_MARKER"]

VALID_NAMES = ("valid", "validation", "val")
SYNTHETIC_MARKER = "SYNTHETIC.txt"  # present at the root of generated (non-real) data sets


@dataclass
class XrayFolders:
    "What was found in an X-ray data folder: split -> class -> files."
    root: Path
    splits: dict  # {'train': {'infected': [Path, ...], ...}, 'valid': ..., 'test': ...}
    valid_name: str | None = None
    synthetic: bool = False
    classes: list = field(default_factory=list)

    def files(self, split: str) -> list[Path]:
        return [f for c in self.classes for f in self.splits.get(split, {}).get(c, [])]

    def counts(self) -> dict:
        "{split: {class: n}} for the report and `config.json`."
        return {s: {c: len(fs) for c, fs in d.items()} for s, d in self.splits.items()}

    @property
    def has_test(self) -> bool: return "test" in self.splits


def _class_files(split_dir: Path) -> dict:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    return {c: sorted(get_image_files(split_dir / c)) for c in classes}


def find_xray_folders(path) -> XrayFolders:
    "Check `path` has the ImageFolder layout and list its images; one-line `UserError` otherwise."
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist: pass --data DIR with train/<class>/ images inside, "
                        f"or --data demo for the synthetic demo set")
    if not (root / "train").is_dir():
        raise UserError(f"{root} has no train/ folder: put images in {root}/train/<class>/ "
                        f"(optionally valid/ and test/ beside it)")
    splits = {"train": _class_files(root / "train")}
    classes = list(splits["train"])
    if len(classes) < 2:
        raise UserError(f"{root}/train needs at least 2 class folders, found {classes or 'none'}: "
                        f"make one sub-folder per class (e.g. infected/ and normal/)")
    valid_name = next((n for n in VALID_NAMES if (root / n).is_dir()), None)
    if valid_name: splits["valid"] = _class_files(root / valid_name)
    if (root / "test").is_dir(): splits["test"] = _class_files(root / "test")
    for split, by_class in splits.items():
        sdir = root / (valid_name if split == "valid" else split)
        extra = sorted(set(by_class) - set(classes))
        if extra:
            raise UserError(f"{sdir} has class folders {extra} that train/ lacks (train has {classes}): "
                            f"use the same class folder names in every split")
        for c, fs in by_class.items():
            if not fs:
                raise UserError(f"class folder {sdir / c} has no images: add images or remove the folder")
    return XrayFolders(root, splits, valid_name, (root / SYNTHETIC_MARKER).exists(), classes)


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


class DecodeOnce(Transform):
    """Open an image file, resize its short side to the working size, and keep the result as compact uint8.

    Later epochs (and later runs in the same process, e.g. a sweep) reuse the decoded pixels instead of decoding
    the JPEG/PNG again. Grayscale stays one channel. The cache is per process and bounded
    (`$COVID_FASTAI_DECODE_CACHE_MB`, default 4096); entries are keyed by file, size, mtime and resize.
    """
    def __init__(self, resize_to: int):
        super().__init__()
        self.resize = T.Resize(resize_to)  # the seed's first op, applied exactly once

    def encodes(self, fn: Path):
        st = os.stat(fn)
        key = (str(fn), st.st_mtime_ns, st.st_size, self.resize.size)
        arr = _DECODED.get(key)
        if arr is None:
            with Image.open(fn) as im:
                im = ImageOps.exif_transpose(im)
                im = im.convert("L" if im.mode == "L" else "RGB")
                arr = np.asarray(self.resize(im))
            _remember(key, arr)
        return PILImage(Image.fromarray(arr))


_DECODED: dict = {}
_DECODED_BYTES = [0]


def _remember(key, arr):
    budget = int(os.environ.get("COVID_FASTAI_DECODE_CACHE_MB", 4096)) * 2 ** 20
    if _DECODED_BYTES[0] + arr.nbytes <= budget:
        _DECODED[key] = arr
        _DECODED_BYTES[0] += arr.nbytes


@dataclass(frozen=True)
class SeedAug:
    """The assignment's torchvision pipeline, kept op for op so seed recipes are faithful.

    Train: Resize(`resize`) (short side) -> RandomRotation(`rotate`) -> RandomResizedCrop(`size`, `scale`)
    -> RandomHorizontalFlip. Eval: Resize(`resize`) -> CenterCrop(`size`).
    """
    size: int = 224           # crop size fed to the network
    resize: int | None = None  # short side before cropping; default keeps the seed's 256/224 ratio
    rotate: float = 30.0      # max degrees of RandomRotation (0 = off)
    scale: tuple = (0.08, 1.0)  # RandomResizedCrop area range; (1, 1) = centre-ish full crops
    flip: bool = True         # horizontal flip (never vertical: anatomy is not up-down symmetric)
    random: bool = True       # False = the eval pipeline for training too (no augmentation)

    @property
    def resize_to(self) -> int: return self.resize or round(self.size * 256 / 224)

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


# Named augmentation policies a recipe or `--aug` can pick.
AUGMENTATIONS = {
    "seed": dict(rotate=30.0, scale=(0.08, 1.0), flip=True),  # the assignment's pipeline
    "none": dict(random=False),
}


def make_aug(aug: str, size: int, resize: int | None = None) -> SeedAug:
    if aug not in AUGMENTATIONS:
        raise UserError(f"unknown augmentation {aug!r}: choose one of {sorted(AUGMENTATIONS)}")
    return SeedAug(size=size, resize=resize, **AUGMENTATIONS[aug])


def xray_datablock(folders: XrayFolders, aug: SeedAug, seed: int = 42, valid_pct: float = 0.2, get_y=None,
                   vocab=None) -> DataBlock:
    """A DataBlock over train (+ valid) images; classes from folder names (or `get_y`/`vocab`, e.g. the
    three-class fine labels of labels.csv); X-rays loaded as 3-channel images."""
    if "valid" in folders.splits:
        valid = set(folders.files("valid"))
        splitter = FuncSplitter(lambda f: f in valid)
        get_items = lambda _: folders.files("train") + folders.files("valid")
    else:
        splitter = RandomSplitter(valid_pct, seed=seed)
        get_items = lambda _: folders.files("train")
    # Images are decoded (and resized) once; grayscale X-rays become 3 identical channels after augmentation.
    images = TransformBlock(type_tfms=DecodeOnce(aug.resize_to), batch_tfms=IntToFloatTensor)
    return DataBlock(blocks=(images, CategoryBlock(vocab=vocab or folders.classes)), get_items=get_items,
                     splitter=splitter, get_y=get_y or parent_label, item_tfms=aug.item_tfms())


def default_workers() -> int:
    "Loader workers: on a 2-core machine, extra worker processes only fight torch's threads for the cores."
    n = os.cpu_count() or 1
    return 0 if n <= 2 else min(8, n // 2)


def xray_dls(folders: XrayFolders, aug: SeedAug, bs: int = 128, seed: int = 42, valid_pct: float = 0.2,
             num_workers: int | None = None, get_y=None, vocab=None, **kwargs):
    "fastai `DataLoaders` for `folders` (train/valid); the test split is made later with `dls.test_dl`."
    dblock = xray_datablock(folders, aug, seed=seed, valid_pct=valid_pct, get_y=get_y, vocab=vocab)
    nw = default_workers() if num_workers is None else num_workers
    # Workers that live across epochs keep their decode-once caches (fastai gives each worker 1 torch thread).
    kwargs.setdefault("persistent_workers", nw > 0)
    dls = dblock.dataloaders(folders.root, bs=bs, num_workers=nw, **kwargs)
    # Keep the last partial batch, as the seed's torch DataLoader did (fastai drops it, and a data set smaller
    # than one batch would train on nothing); drop it only when it is a single image, which BatchNorm refuses.
    dls.train.drop_last = len(dls.train_ds) % dls.train.bs == 1
    return dls
