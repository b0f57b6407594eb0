"""VGG-16: FC head only (body frozen), under the assignment's training policy (docs/recipes.md).

Run: python recipes/vgg16_head.py [--data DIR] [--epochs N] ...
"""
from covid_fastai import ASSIGNMENT_POLICY, Recipe, head
from covid_fastai.cli import script_main

recipe = Recipe(
    name="vgg16_head",
    description="VGG-16: FC head only (body frozen)",
    arch="vgg16.tv_in1k",
    plan=head(),
    **ASSIGNMENT_POLICY,
)

if __name__ == "__main__":
    script_main(recipe)
