"""VGG-16: convs features 0,5,10,12,19,21,26,28 + head.

The seed's "few convs" list, as its report gives it.

Seed policy (../shared/seed/NOTES.md): head Linear-380-ReLU-Dropout(0.5)-Linear, SGD lr 1e-3 momentum 0.9,
no weight decay or schedule, batch 128, 10 epochs, Resize 256 / RandomRotation 30 / RandomResizedCrop 224 /
flip, BatchNorm frozen with the body. Run: python recipes/vgg16_few.py [--data DIR] [--epochs N] ...
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
