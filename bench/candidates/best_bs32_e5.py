"""Issue 19 candidate (not a shipped recipe): `best` (stem and blocks 0-2 frozen, session 14) with two changes for
the 6-minute target on an AVX512-BF16 CPU without AMX: batch 32 instead of 64 (0.87x of the training time in
`best`'s own fit on that CPU, where batch 16 was slower) and 5 epochs instead of 6.
Run: python -m covid_fastai cv bench/candidates/best_bs32_e5.py --folds 5 --data ../shared/data/cxr
`best` took both changes in session 15, so best_bs32_e5 now equals `best` under another name.
"""
import dataclasses

from covid_fastai import load_recipe

recipe = dataclasses.replace(load_recipe("best"), name="best_bs32_e5", bs=32, epochs=5,
                             description="best at batch 32 for 5 epochs (issue 19 candidate)")
