"""ResNet-18: one conv (layer3.0.conv1) + head, under the assignment's training policy (docs/recipes.md).

The assignment's ResNet "one conv" row was labelled "feature layer 10", copied from the VGG table. We pick the
same position as VGG's features.10: the first conv of the third stage (layer3.0.conv1, 128 -> 256 channels).
Run: python recipes/resnet18_one.py [--data DIR] [--epochs N] ...
"""
from covid_fastai import ASSIGNMENT_POLICY, Recipe, layers
from covid_fastai.cli import script_main

recipe = Recipe(
    name="resnet18_one",
    description="ResNet-18: one conv (layer3.0.conv1) + head",
    arch="resnet18.tv_in1k",
    plan=layers("layer3.0.conv1"),
    **ASSIGNMENT_POLICY,
)

if __name__ == "__main__":
    script_main(recipe)
