"""Issue 19 candidate (not a shipped recipe): `best` with one change, its first 4 layer groups (stem, blocks 0-2)
frozen for the first 4 of its 5 epochs only; in the last epoch everything trains (`freeze_to(4, freeze_epochs=4)`).
The question: does the frozen stem's share of the valid AUC gap (C6, docs/experiments.md "Issue 19, session 17")
come back when the stem trains at the end, for a fifth more training time?
Run: python bench/ttacc.py --config bench/candidates/best_thaw4.py[:seed=1]
"""
import dataclasses

from covid_fastai import freeze_to, load_recipe

recipe = dataclasses.replace(load_recipe("best"), name="best_thaw4", plan=freeze_to(4, freeze_epochs=4),
                             description="best, stem and blocks 0-2 frozen for 4 of 5 epochs (issue 19 candidate)")
