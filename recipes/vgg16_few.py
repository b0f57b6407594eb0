"""VGG-16: convs features 0,5,10,12,19,21,26,28 + head, under the assignment's training policy (docs/recipes.md).

The assignment's "few convs" list, as its report gives it.
Run: python recipes/vgg16_few.py [--data DIR] [--epochs N] ...
"""
from covid_fastai import ASSIGNMENT_POLICY, Recipe, layers
from covid_fastai.cli import script_main

recipe = Recipe(
    name="vgg16_few",
    description="VGG-16: convs features 0,5,10,12,19,21,26,28 + head",
    arch="vgg16.tv_in1k",
    plan=layers("features.0", "features.5", "features.10", "features.12",
                "features.19", "features.21", "features.26", "features.28"),
    **ASSIGNMENT_POLICY,
)

if __name__ == "__main__":
    script_main(recipe)
