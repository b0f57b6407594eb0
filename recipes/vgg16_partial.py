"""VGG-16: one conv (features.10) + head, under the assignment's training policy (docs/recipes.md).

features.10 is conv3_1 (128 -> 256 channels), the first conv of VGG-16's third stage: the assignment's "one conv".
Run: python recipes/vgg16_partial.py [--data DIR] [--epochs N] ...
"""
from covid_fastai import ASSIGNMENT_POLICY, Recipe, layers
from covid_fastai.cli import script_main

recipe = Recipe(
    name="vgg16_partial",
    description="VGG-16: one conv (features.10) + head",
    arch="vgg16.tv_in1k",
    plan=layers("features.10"),
    **ASSIGNMENT_POLICY,
)

if __name__ == "__main__":
    script_main(recipe)
