"""Cost of issue 21's training options on the CPU: the training augmentation per image ('xray' against
'xray_shortcut', whose CLAHE is the expensive part) and one EMA-of-weights update (timm ModelEmaV3) per
optimiser step. Generated images, no data needed; one torch thread.

    python bench/options_cost.py
"""
import statistics
import time

import numpy as np
import timm
import torch
from PIL import Image
from timm.utils.model_ema import ModelEmaV3

from covid_fastai.augment import make_aug


def _min_median(f, repeats: int = 5) -> tuple[float, float]:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


def main():
    torch.set_num_threads(1)
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, torch threads 1")
    rng = np.random.default_rng(0)
    # what DecodeOnce hands the augmentation at 224 px: an 8-bit grayscale film, short side 224
    imgs = [Image.fromarray(rng.integers(0, 256, (224, 270), dtype=np.uint8)) for _ in range(100)]
    for name in ("xray", "xray_shortcut"):
        tfm = make_aug(name, 224).item_tfms()[0].train
        torch.manual_seed(0)
        lo, med = _min_median(lambda: [tfm(im).convert("RGB") for im in imgs])
        print(f"augmentation {name}: {1000 * lo / len(imgs):.2f} / {1000 * med / len(imgs):.2f} ms per image "
              "(min / median)")
    m = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2)
    e = ModelEmaV3(m, decay=0.999, use_warmup=True, warmup_power=0.75)
    step = [0]

    def updates(n=20):
        for _ in range(n):
            step[0] += 1
            e.update(m, step=step[0])
    updates()
    lo, med = _min_median(updates)
    n = sum(p.numel() for p in m.parameters()) / 1e6
    print(f"EMA update, tf_efficientnet_lite0 ({n:.1f} M parameters): {1000 * lo / 20:.2f} / {1000 * med / 20:.2f} "
          "ms per step (min / median)")


if __name__ == "__main__":
    main()
