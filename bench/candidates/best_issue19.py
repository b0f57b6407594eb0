"""Issue 19 reference (not a shipped recipe): `best` as it was when issue 19 was filed (commit 7c1842d): every layer
trained (plan `full()`), batch 64, 6 epochs, the plain `xray` augmentation; the settings of V13/V16/V17, whose three
valid seeds are issue 19's accuracy criterion. With `:aug=xray_shortcut` it is that recipe plus C4 alone.
Run: python bench/ttacc.py --config bench/candidates/best_issue19.py[:seed=1][:aug=xray_shortcut]
"""
import dataclasses

from covid_fastai import full, load_recipe

recipe = dataclasses.replace(load_recipe("best"), name="best_issue19", plan=full(), bs=64, epochs=6, aug="xray",
                             description="best when issue 19 was filed: every layer, batch 64, 6 epochs, xray aug")
