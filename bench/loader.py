"""One epoch of a recipe's data loaders without the model (not a test): python bench/loader.py [RECIPE] [--data DIR]

Builds the recipe's fastai DataLoaders exactly as a run does (decode cache, item and batch transforms, loader
workers) and times full passes over train and valid with nothing else in the loop: the part of an epoch that
freezing layers, bf16 or a smaller batch cannot shorten. The first pass also fills the decode cache, so read the
later ones. Prints one line per pass.
"""
from __future__ import annotations

import argparse
import time

from bench import DATA  # the real data's folder ($COVID_FASTAI_REAL_DATA), as the other bench scripts default to


def passes(dl, n: int) -> list[tuple[int, float]]:
    "(images, seconds) for `n` full passes over `dl`."
    out = []
    for _ in range(n):
        t, k = time.perf_counter(), 0
        for _, yb in dl: k += len(yb)
        out.append((k, time.perf_counter() - t))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", nargs="?", default="best")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--passes", type=int, default=2)  # over train; valid gets one
    p.add_argument("--set", action="append", default=[])  # KEY=VALUE recipe overrides (e.g. bs=32)
    a = p.parse_args(argv)
    from covid_fastai.learner import recipe_learner
    from covid_fastai.recipes import load_recipe, with_overrides
    rec = with_overrides(load_recipe(a.recipe), data=a.data, **dict(kv.split("=", 1) for kv in a.set))
    learn, _ = recipe_learner(rec)
    rows = [("train", k, s) for k, s in passes(learn.dls.train, a.passes)] + \
           [("valid", k, s) for k, s in passes(learn.dls.valid, 1)]
    for split, k, s in rows: print(f"{rec.name} {split}: {k} images in {s:.1f} s ({k / s:.0f} img/s)")
    return rows


if __name__ == "__main__":
    main()
