"""ResNet-18: conv1, layer1, layer3 + head, under the assignment's training policy (docs/recipes.md).

The assignment's "few" list: whole stages, their BatchNorms included.
Run: python recipes/resnet18_few.py [--data DIR] [--epochs N] ...
"""
from covid_fastai import ASSIGNMENT_POLICY, Recipe, layers
from covid_fastai.cli import script_main

recipe = Recipe(
    name="resnet18_few",
    description="ResNet-18: conv1, layer1, layer3 + head",
    arch="resnet18.tv_in1k",
    plan=layers("conv1", "layer1", "layer3"),
    **ASSIGNMENT_POLICY,
)

if __name__ == "__main__":
    script_main(recipe)
