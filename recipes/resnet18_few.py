"""ResNet-18: conv1, layer1, layer3 + head.

The seed's "few" list: conv1, layer1, layer3 (whole stages, their BatchNorms included).

Seed policy (../shared/seed/NOTES.md): head Linear-380-ReLU-Dropout(0.5)-Linear, SGD lr 1e-3 momentum 0.9,
no weight decay or schedule, batch 128, 10 epochs, Resize 256 / RandomRotation 30 / RandomResizedCrop 224 /
flip, BatchNorm frozen with the body. Run: python recipes/resnet18_few.py [--data DIR] [--epochs N] ...
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
