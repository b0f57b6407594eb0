"""`best` as it was before session 14 (every layer trains: plan `full()`), the reference of issue 19's frozen-stem
candidates; `best` itself has `freeze_to(4)` since then (docs/experiments.md, "Issue 19, session 14").
Run: python bench/ttacc.py --config bench/candidates/best_full.py --config best
"""
import dataclasses

from covid_fastai import full, load_recipe

recipe = dataclasses.replace(load_recipe("best"), name="best_full", plan=full(),
                             description="best with every layer trained (best before session 14)")
