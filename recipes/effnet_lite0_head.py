"""EfficientNet-Lite0: head only (body frozen).

The CPU-fast backbone beside VGG-16 and ResNet-18 in the seed grid, with genuine ImageNet weights available
offline (covid_fastai.weights). The frozen body runs on cached features (covid_fastai.features).
Run: python recipes/effnet_lite0_head.py [--data DIR] [--epochs N] ...
"""
from covid_fastai import ASSIGNMENT_POLICY, Recipe, head
from covid_fastai.cli import script_main

recipe = Recipe(
    name="effnet_lite0_head",
    description="EfficientNet-Lite0: head only (body frozen)",
    arch="tf_efficientnet_lite0.in1k",
    plan=head(),
    **ASSIGNMENT_POLICY,
)

if __name__ == "__main__":
    script_main(recipe)
