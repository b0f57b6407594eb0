"""Issue 19 reference (not a shipped recipe): `best` as it was before session 15 (stem and blocks 0-2 frozen, batch
64, 6 epochs), so that the session-15 comparisons reproduce after `best` took batch 32 and 5 epochs.
Run: python -m covid_fastai cv bench/candidates/best_b64_e6.py --folds 5 --data ../shared/data/cxr
"""
import dataclasses

from covid_fastai import load_recipe

recipe = dataclasses.replace(load_recipe("best"), name="best_b64_e6", bs=64, epochs=6,
                             description="best before session 15: batch 64, 6 epochs (issue 19 reference)")
