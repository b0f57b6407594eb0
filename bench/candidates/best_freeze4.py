"""Issue 19 candidate (not a shipped recipe): `best` as it was (bench/candidates/best_full.py) with one change, its
first 4 layer groups frozen (for Lite0 the stem and blocks 0-2, at 112 to 28 px the costliest part of the backward pass;
`python bench/levers.py --freeze 4`).
Batch 64 and 6 epochs as `best` had then (V37, V38); best_freeze4 is `bench/candidates/best_b64_e6.py` under another name.
Run: python bench/ttacc.py --config bench/candidates/best_freeze4.py[:seed=1]
"""
import dataclasses

from covid_fastai import freeze_to, load_recipe

recipe = dataclasses.replace(load_recipe("best"), name="best_freeze4", plan=freeze_to(4), bs=64, epochs=6,
                             description="best with the stem and blocks 0-2 frozen (issue 19 candidate)")
