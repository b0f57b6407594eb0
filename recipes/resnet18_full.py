"""ResNet-18: entire network, under the assignment's training policy (docs/recipes.md).

Run: python recipes/resnet18_full.py [--data DIR] [--epochs N] ...
"""
from covid_fastai import ASSIGNMENT_POLICY, Recipe, full
from covid_fastai.cli import script_main

recipe = Recipe(
    name="resnet18_full",
    description="ResNet-18: entire network",
    arch="resnet18.tv_in1k",
    plan=full(),
    **ASSIGNMENT_POLICY,
)

if __name__ == "__main__":
    script_main(recipe)
