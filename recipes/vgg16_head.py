"""VGG-16: FC head only (body frozen).

Seed policy (../shared/seed/NOTES.md): head Linear-380-ReLU-Dropout(0.5)-Linear, SGD lr 1e-3 momentum 0.9,
no weight decay or schedule, batch 128, 10 epochs, Resize 256 / RandomRotation 30 / RandomResizedCrop 224 /
flip, BatchNorm frozen with the body. Run: python recipes/vgg16_head.py [--data DIR] [--epochs N] ...
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
