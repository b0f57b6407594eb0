"""`best` as it was before session 14 (every layer trains: plan `full()`, batch 64, 6 epochs), the reference of issue
19's frozen-stem candidates (V36); `best` itself has `freeze_to(4)` since session 14 and batch 32 for 5 epochs since
session 15 (docs/experiments.md, "Issue 19, session 14"). It equals `bench/candidates/best_issue19.py:aug=xray_shortcut`.
Run: python bench/ttacc.py --config bench/candidates/best_full.py --config best
"""
import dataclasses

from covid_fastai import full, load_recipe

recipe = dataclasses.replace(load_recipe("best"), name="best_full", plan=full(), bs=64, epochs=6,
                             description="best with every layer trained (best before session 14)")
