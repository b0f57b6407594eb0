"""EfficientNet-Lite0: head only (body frozen), under the assignment's training policy (docs/recipes.md).

The CPU-fast backbone beside VGG-16 and ResNet-18 in the assignment grid, with genuine ImageNet weights available
offline (docs/weights.md). A frozen body can run on cached features (docs/speed.md).
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
