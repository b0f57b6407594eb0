"""EfficientNet-Lite0: last two block stages (blocks.5, blocks.6) + conv_head + head.

Under the assignment's training policy (docs/recipes.md). EfficientNet's stages are small, so its usual partial
fine-tune is the top of the body, not one early conv.
Run: python recipes/effnet_lite0_partial.py [--data DIR] [--epochs N] ...
"""
from covid_fastai import ASSIGNMENT_POLICY, Recipe, layers
from covid_fastai.cli import script_main

recipe = Recipe(
    name="effnet_lite0_partial",
    description="EfficientNet-Lite0: last two block stages (blocks.5, blocks.6) + conv_head + head",
    arch="tf_efficientnet_lite0.in1k",
    plan=layers("blocks.5", "blocks.6", "conv_head", "bn2"),
    **ASSIGNMENT_POLICY,
)

if __name__ == "__main__":
    script_main(recipe)
