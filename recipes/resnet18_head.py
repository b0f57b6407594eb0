"""ResNet-18: FC head only (body frozen), under the assignment's training policy (docs/recipes.md).

resnet18.tv_in1k: the torchvision weights the assignment used (docs/weights.md).
Run: python recipes/resnet18_head.py [--data DIR] [--epochs N] ...
"""
from covid_fastai import ASSIGNMENT_POLICY, Recipe, head
from covid_fastai.cli import script_main

recipe = Recipe(
    name="resnet18_head",
    description="ResNet-18: FC head only (body frozen)",
    arch="resnet18.tv_in1k",
    plan=head(),
    **ASSIGNMENT_POLICY,
)

if __name__ == "__main__":
    script_main(recipe)
