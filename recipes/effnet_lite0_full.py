"""EfficientNet-Lite0: entire network, under the assignment's training policy (docs/recipes.md).

Run: python recipes/effnet_lite0_full.py [--data DIR] [--epochs N] ...
"""
from covid_fastai import ASSIGNMENT_POLICY, Recipe, full
from covid_fastai.cli import script_main

recipe = Recipe(
    name="effnet_lite0_full",
    description="EfficientNet-Lite0: entire network",
    arch="tf_efficientnet_lite0.in1k",
    plan=full(),
    **ASSIGNMENT_POLICY,
)

if __name__ == "__main__":
    script_main(recipe)
