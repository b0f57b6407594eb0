"""VGG-16: entire network, under the assignment's training policy (docs/recipes.md).

Run: python recipes/vgg16_full.py [--data DIR] [--epochs N] ...
"""
from covid_fastai import ASSIGNMENT_POLICY, Recipe, full
from covid_fastai.cli import script_main

recipe = Recipe(
    name="vgg16_full",
    description="VGG-16: entire network",
    arch="vgg16.tv_in1k",
    plan=full(),
    **ASSIGNMENT_POLICY,
)

if __name__ == "__main__":
    script_main(recipe)
