"""X-ray folders in ImageFolder layout -> fastai `DataLoaders`.

Layout: ``DIR/train/<class>/*`` is required; ``DIR/valid/<class>/*`` (also spelled ``validation`` or
``val``) and ``DIR/test/<class>/*`` are optional. Without a validation folder a seeded random part of
train (of its patients, when labels.csv names them) is held out; without a test folder there are no test
metrics (the report says so). Augmentation policies are in `covid_fastai.augment`, labels.csv in
`covid_fastai.labels`.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import torchvision.transforms as T
from fastai.callback.data import WeightedDL  # noqa: F401 (adds Datasets.weighted_dataloaders)
from fastai.vision.all import (CategoryBlock, DataBlock, FuncSplitter, IntToFloatTensor, PILImage, RandomSplitter,
                               Transform, TransformBlock, parent_label)
from PIL import Image

from .augment import XrayAugment
from .errors import DataError
from .images import UnreadableImage, get_xray_files, open_xray, scan_images
from .labels import join_labels, read_labels
from .sampling import balance_weights, group_keys

__all__ = ["XrayFolders", "find_xray_folders", "xray_datablock", "xray_dls", "SYNTHETIC_MARKER", "DATA_VIEW",
           "SkippedImagesWarning"]

VALID_NAMES = ("valid", "validation", "val")
SYNTHETIC_MARKER = "SYNTHETIC.txt"  # present at the root of generated (non-real) data sets
# At the root of a data view (covid_fastai.folds: a cross-validation fold made of symlinks), saying what it is. Its
# valid/ may lack a class: a held-out source of one class (leave one source out) is still a fold.
DATA_VIEW = "DATA_VIEW.json"


@dataclass
class XrayFolders:
    "What was found in an X-ray data folder: split -> class -> files."
    root: Path
    splits: dict  # {'train': {'infected': [Path, ...], ...}, 'valid': ..., 'test': ...}
    valid_name: str | None = None
    synthetic: bool = False
    classes: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # [(Path, reason)]: unreadable files left out by the pre-scan

    def files(self, split: str) -> list[Path]:
        return [f for c in self.classes for f in self.splits.get(split, {}).get(c, [])]

    def counts(self) -> dict:
        "{split: {class: n}} for the report and `config.json`."
        return {s: {c: len(fs) for c, fs in d.items()} for s, d in self.splits.items()}

    @property
    def has_test(self) -> bool: return "test" in self.splits

    @cached_property
    def labels(self):
        "`root/labels.csv` indexed by file (`covid_fastai.labels.read_labels`), or None: parsed once, when first asked."
        return read_labels(self.root)

    def skipped_report(self) -> dict:
        "{'count': n, 'files': [{'file', 'reason'}]} for `config.json` and the report."
        return {"count": len(self.skipped), "files": [{"file": str(f), "reason": r} for f, r in self.skipped]}


class SkippedImagesWarning(UserWarning):
    "Some image files could not be read and were left out of the run."


def _class_files(split_dir: Path) -> dict:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    return {c: get_xray_files(split_dir / c) for c in classes}


def find_xray_folders(path, scan: bool = True, test: bool = True) -> XrayFolders:
    """Check `path` has the ImageFolder layout and list its images; a `DataError` otherwise.

    scan: decode every image once (`covid_fastai.images.scan_images`) and leave unreadable ones out, with a
    `SkippedImagesWarning`; they are listed in `XrayFolders.skipped` (and so in config.json and report.md).
    A class left with no readable image is an error. Without the scan a bad file fails mid-epoch instead.
    test: list the test split too (False: never look inside test/, as cross-validation must not).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist", "pass --data DIR with train/<class>/ images inside, "
                        "or --data demo for the synthetic demo set", path=root)
    if not (root / "train").is_dir():
        raise DataError(f"{root} has no train/ folder",
                        f"put images in {root}/train/<class>/ (optionally valid/ and test/ beside it)", path=root)
    splits = {"train": _class_files(root / "train")}
    classes = list(splits["train"])
    if len(classes) < 2:
        raise DataError(f"{root}/train needs at least 2 class folders, found {classes or 'none'}",
                        "make one sub-folder per class (e.g. infected/ and normal/)", path=root / "train")
    valid_name = next((n for n in VALID_NAMES if (root / n).is_dir()), None)
    if valid_name: splits["valid"] = _class_files(root / valid_name)
    if test and (root / "test").is_dir(): splits["test"] = _class_files(root / "test")
    for split, by_class in splits.items():
        sdir = root / (valid_name if split == "valid" else split)
        extra = sorted(set(by_class) - set(classes))
        if extra:
            raise DataError(f"{sdir} has class folders {extra} that train/ lacks (train has {classes})",
                            "use the same class folder names in every split", path=sdir)
        missing = sorted(set(classes) - set(by_class))
        if missing and not (split == "valid" and (root / DATA_VIEW).is_file()):
            raise DataError(f"{sdir} lacks class folders {missing} that train/ has",
                            f"give every split the same class folders ({', '.join(classes)})", path=sdir)
        for c, fs in by_class.items():
            if not fs:
                raise DataError(f"class folder {sdir / c} has no images", "add images or remove the folder",
                                path=sdir / c)
    skipped = []
    if scan:
        allfiles = [f for by_class in splits.values() for fs in by_class.values() for f in fs]
        good, skipped = scan_images(allfiles, root)
        good = set(good)
        for split, by_class in splits.items():
            for c, fs in by_class.items():
                kept = [f for f in fs if f in good]
                if not kept:
                    f, why = next((f, r) for f, r in skipped if f.parent == fs[0].parent)
                    raise DataError(f"class folder {fs[0].parent} has no readable image ({len(fs)} unreadable, "
                                    f"e.g. {f.name}: {why})", "add readable images or remove the folder",
                                    path=fs[0].parent)
                by_class[c] = kept
        if skipped:
            first = "; ".join(f"{f}: {r}" for f, r in skipped[:3])
            warnings.warn(f"skipped {len(skipped)} unreadable image file(s) (listed in the run's config.json and "
                          f"report.md): {first}" + (" ..." if len(skipped) > 3 else ""), SkippedImagesWarning,
                          stacklevel=2)
    return XrayFolders(root, splits, valid_name, (root / SYNTHETIC_MARKER).exists(), classes, skipped)


def decode_resized(fn, size: int) -> np.ndarray:
    """`fn` as 8-bit grayscale (`open_xray`), short side resized to `size` as torchvision's `Resize(size)` does:
    what `DecodeOnce` serves, from the shared store or decoded now."""
    try:
        im = open_xray(fn, min_side=size)
    except UnreadableImage as e:  # readable at the pre-scan, so it changed during the run
        raise DataError(f"{fn} became unreadable during the run ({e})",
                        "restore it, or remove it, then resume the run", path=fn) from None
    return np.asarray(T.Resize(size)(im))


class DecodeOnce(Transform):
    """Open an image file (`open_xray`: any format, 8-bit grayscale), resize its short side to the working size,
    and keep the result as compact uint8.

    The run's train and valid images are decoded once into a store shared on disk (`covid_fastai.pixelcache`:
    memory-mapped, read by every rank and loader worker without a copy, reused by later runs over the same files
    and size); `xray_dls` opens or builds it (`use_store`). Other files (the test split, a file changed during the
    run, a store that could not be written) are decoded when asked and kept in a small per-process cache
    (`$COVID_FASTAI_DECODE_CACHE_MB`, default 1024), keyed by file, size, mtime and resize. Grayscale stays one
    channel.
    """
    def __init__(self, resize_to: int):
        super().__init__()
        self.resize = T.Resize(resize_to)  # the assignment's first op, applied exactly once
        self.store = None  # a `PixelStore`, once `use_store` has opened one

    def use_store(self, files, workers: int = 0):
        """Open (or build, once) the shared store of `files` at this working size. A cache folder that cannot be
        written only costs memory: the images are then decoded per process, with a warning."""
        from .pixelcache import open_or_build
        try:
            self.store = open_or_build(files, self.resize.size, partial(decode_resized, size=self.resize.size),
                                       workers=workers)
        except OSError as e:
            warnings.warn(f"decode cache not written ({e}); images are decoded per process instead. Fix: free disk "
                          "space or set COVID_FASTAI_CACHE to a writable folder", RuntimeWarning, stacklevel=2)
        return self.store

    def encodes(self, fn: Path):
        arr = self.store.get(fn) if self.store is not None else None
        if arr is None:
            st = os.stat(fn)
            # keyed by the file itself: the symlinks of a data view (a cross-validation fold) share its pixels
            key = (os.path.realpath(fn), st.st_mtime_ns, st.st_size, self.resize.size)
            arr = _DECODED.get(key)
            if arr is None:
                arr = decode_resized(fn, self.resize.size)
                _remember(key, arr)
        return PILImage(Image.fromarray(arr))


_DECODED: dict = {}
_DECODED_BYTES = [0]


def _remember(key, arr):
    budget = int(os.environ.get("COVID_FASTAI_DECODE_CACHE_MB", 1024)) * 2 ** 20
    if _DECODED_BYTES[0] + arr.nbytes <= budget:
        _DECODED[key] = arr
        _DECODED_BYTES[0] += arr.nbytes


def patients_of(folders: XrayFolders) -> dict | None:
    "{image path: patient_id} from labels.csv when it has that column with any value, else None."
    labels = folders.labels
    if labels is None or "patient_id" not in labels.columns or not labels["patient_id"].astype(bool).any(): return None
    files = folders.files("train")
    return dict(zip(files, join_labels(files, folders.root, labels, columns=("patient_id",))["patient_id"]))


def patient_splitter(valid_pct: float, seed: int, patient: dict):
    """A fastai splitter that holds out a random `valid_pct` of the patients, not of the images: one patient's films
    are alike, and in both sets they would flatter the validation score. An image without a patient is its own."""
    def _inner(items):
        groups = [patient.get(o) or f"image:{o}" for o in items]
        ids = sorted(set(groups))
        held = set(np.random.default_rng(seed).permutation(ids)[:int(round(valid_pct * len(ids)))])
        return ([i for i, g in enumerate(groups) if g not in held], [i for i, g in enumerate(groups) if g in held])
    return _inner


def xray_datablock(folders: XrayFolders, aug: XrayAugment, seed: int = 42, valid_pct: float = 0.2, get_y=None,
                   vocab=None) -> DataBlock:
    """A DataBlock over train (+ valid) images; classes from folder names (or `get_y`/`vocab`, e.g. the
    three-class fine labels of labels.csv); X-rays loaded as 3-channel images."""
    if "valid" in folders.splits:
        valid = set(folders.files("valid"))
        splitter = FuncSplitter(lambda f: f in valid)
        get_items = lambda _: folders.files("train") + folders.files("valid")
    else:
        patient = patients_of(folders)
        splitter = (RandomSplitter(valid_pct, seed=seed) if patient is None
                    else patient_splitter(valid_pct, seed, patient))
        get_items = lambda _: folders.files("train")
    # Images are decoded (and resized) once; grayscale X-rays become 3 identical channels after augmentation.
    images = TransformBlock(type_tfms=DecodeOnce(aug.resize_to), batch_tfms=IntToFloatTensor)
    return DataBlock(blocks=(images, CategoryBlock(vocab=vocab or folders.classes)), get_items=get_items,
                     splitter=splitter, get_y=get_y or parent_label, item_tfms=aug.item_tfms())


def decode_once(dls) -> DecodeOnce:
    "The `DecodeOnce` transform of `dls` (shared by its train, valid and test loaders)."
    return next(t for t in dls.train.dataset.tls[0].tfms.fs if isinstance(t, DecodeOnce))


def _build_workers() -> int:
    "Processes that build the decode store: none on 2 cores (they would only compete), else as loader workers."
    return default_workers()


def default_workers() -> int:
    "Loader workers: on a 2-core machine, extra worker processes only fight torch's threads for the cores."
    n = os.cpu_count() or 1
    return 0 if n <= 2 else min(8, n // 2)


def xray_dls(folders: XrayFolders, aug: XrayAugment, bs: int = 128, seed: int = 42, valid_pct: float = 0.2,
             num_workers: int | None = None, get_y=None, vocab=None,
             balance: str = "none",  # weighted training draws: 'label', 'source_label', 'label_in_source'
                                    # (covid_fastai.sampling)
             **kwargs):
    "fastai `DataLoaders` for `folders` (train/valid); the test split is made later with `dls.test_dl`."
    dblock = xray_datablock(folders, aug, seed=seed, valid_pct=valid_pct, get_y=get_y, vocab=vocab)
    nw = default_workers() if num_workers is None else num_workers
    # Workers that live across epochs keep their decode-once caches (fastai gives each worker 1 torch thread).
    kwargs.setdefault("persistent_workers", nw > 0)
    if balance == "none": dls = dblock.dataloaders(folders.root, bs=bs, num_workers=nw, **kwargs)
    else:
        # fastai's WeightedDL for train (weights over the train split's items, in order), as
        # DataBlock.weighted_dataloaders does, plus the `path` it leaves out
        dss = dblock.datasets(folders.root)
        items = list(dss.train.items)
        label_of = get_y or parent_label
        wgts = balance_weights(group_keys(items, [label_of(f) for f in items], balance, folders), balance)
        dls = dss.weighted_dataloaders(wgts, bs=bs, num_workers=nw, path=folders.root, after_item=dblock.item_tfms,
                                       after_batch=dblock.batch_tfms, **kwargs)
    # Before any worker starts: workers inherit the open store (or reopen it by path), so none decodes again.
    decode_once(dls).use_store(list(dls.train.items) + list(dls.valid.items), workers=_build_workers())
    # Keep the last partial batch, as the seed's torch DataLoader did (fastai drops it, and a data set smaller
    # than one batch would train on nothing); drop it only when it is a single image, which BatchNorm refuses.
    dls.train.drop_last = len(dls.train_ds) % dls.train.bs == 1
    return dls
