"""best: the strongest model this library trains on a 2-core CPU within 15 minutes (wall clock, data included).

EfficientNet-Lite0 from genuine ImageNet weights, trained for 5 epochs at batch 32 with its stem and first three
block stages frozen (fastai's freeze_to(4)), under the modern policy with one rate for all layers, plain
cross-entropy, timm's classifier shape for the head (pool, Dropout 0.2, one Linear) and the augmentation against
source shortcuts (border and corner erasing, gamma/CLAHE); its test-time augmentation draws from the milder `xray`.
On a CPU without bf16 units (AVX2-only: fp32) it trains at 192 px instead of 224 (`fp32_size`).
Why each setting, run by run: docs/experiments.md, "Why `best` is what it is".
Run: python -m covid_fastai recipe best --data ../shared/data/cxr
"""
from covid_fastai import MODERN_POLICY, Recipe, freeze_to
from covid_fastai.cli import script_main

recipe = Recipe(
    name="best",
    description="EfficientNet-Lite0: all but the stem and blocks 0-2, best-in-budget settings",
    arch="tf_efficientnet_lite0.in1k",
    plan=freeze_to(4),
    **{**MODERN_POLICY, "lr_mult": 1.0, "label_smoothing": 0.0, "epochs": 5, "bs": 32, "head": "linear",
       "dropout": 0.2, "aug": "xray_shortcut", "tta_aug": "xray", "fp32_size": 192},
)

if __name__ == "__main__":
    script_main(recipe)
