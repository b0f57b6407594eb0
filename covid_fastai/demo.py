"""A small synthetic X-ray-like data set, so that every command runs with no data at all.

These are drawings, not X-rays: a dark field, a bright mediastinum, two lung fields crossed by ribs and,
for `infected`, blurred patchy opacities inside the lungs. Every image carries the word SYNTHETIC and
the folder carries `SYNTHETIC.txt`, which every report and `config.json` of a run on it repeats.
Nothing learnt on it says anything about chest X-rays.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .cache import cache_dir
from .data import SYNTHETIC_MARKER

__all__ = ["DEMO_VERSION", "make_demo_data", "demo_data"]

DEMO_VERSION = 3  # bump when the generator or the counts change, so cached copies are rebuilt
# Per class. v3: 32 training images (one batch at the assignment's bs 128), 16 valid, 16 test, so that the main job
# (VGG-16, 10 epochs, 224 px) runs in under 5 minutes on a 2-core AVX2-only CPU (issue 19; v2's 80/24/24 took 18).
# It is a pipeline check: its numbers say that the pipeline runs, nothing more.
DEMO_COUNTS = {"train": 16, "valid": 8, "test": 8}


def _xray(rng: np.random.Generator, infected: bool, size: int = 256) -> Image.Image:
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.full((h, w), 25.0, np.float32) + rng.normal(0, 4)
    cx = w / 2 + rng.normal(0, 6)
    # body silhouette and bright mediastinum / spine
    body = ((xx - cx) / (0.46 * w)) ** 2 + ((yy - 0.62 * h) / (0.55 * h)) ** 2 < 1
    img[body] += 70
    img += 90 * np.exp(-((xx - cx) / (0.07 * w)) ** 2) * (yy > 0.12 * h)
    # lungs: dark ellipses either side of the midline
    lungs = np.zeros((h, w), bool)
    for side in (-1, 1):
        lx = cx + side * (0.2 + rng.normal(0, 0.01)) * w
        lungs |= ((xx - lx) / (0.14 * w * rng.uniform(0.9, 1.1))) ** 2 + \
                 ((yy - 0.48 * h) / (0.28 * h * rng.uniform(0.9, 1.1))) ** 2 < 1
    img[lungs] -= 55
    # ribs: faint bright arcs across the lung fields
    for k in range(7):
        y0 = 0.25 * h + k * 0.075 * h + rng.normal(0, 2)
        arc = np.abs(yy - (y0 + 0.0009 * (xx - cx) ** 2 / (w / 256))) < 2.2
        img[arc & lungs] += 22
    # diaphragm: bright below the lungs
    img[(yy > 0.78 * h + 0.0006 * (xx - cx) ** 2) & body] += 35
    if infected:  # patchy opacities (consolidation / ground glass) inside the lungs
        ys, xs = np.nonzero(lungs)
        for _ in range(rng.integers(3, 8)):
            i = rng.integers(len(ys))
            r = rng.uniform(0.04, 0.10) * w
            blob = np.exp(-(((xx - xs[i]) ** 2 + (yy - ys[i]) ** 2) / (2 * r ** 2)))
            img += rng.uniform(30, 60) * blob * lungs
    img += rng.normal(0, 6, (h, w))
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(1.2))
    ImageDraw.Draw(pil).text((4, h - 14), "SYNTHETIC", fill=200)
    return pil


def make_demo_data(dest, counts: dict | None = None, size: int = 256, seed: int = 0) -> Path:
    "Write the synthetic set to `dest` (ImageFolder layout: split/class/*.png)."
    dest = Path(dest)
    rng = np.random.default_rng(seed)
    for split, n in (counts or DEMO_COUNTS).items():
        for cls in ("infected", "normal"):
            d = dest / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _xray(rng, cls == "infected", size).save(d / f"synthetic_{split}_{cls}_{i:03d}.png")
    (dest / SYNTHETIC_MARKER).write_text(
        "SYNTHETIC demo data made by covid_fastai.demo: drawings, not chest X-rays.\n"
        "Results on it only show that the pipeline runs.\n")
    return dest


def demo_data() -> Path:
    "The demo set in the user cache, generated on first use (atomically, so parallel runs don't clash)."
    dest = cache_dir() / f"demo-v{DEMO_VERSION}"
    if (dest / SYNTHETIC_MARKER).exists(): return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=dest.parent))
    make_demo_data(tmp)
    try: tmp.rename(dest)
    except OSError: shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; use its copy
    return dest
