"""Balanced sampling: per-image weights for fastai's `WeightedDL`, so that each label (or each source x label cell
of labels.csv) is drawn equally often in training.

`balance='label'` gives every class the same share of the training draws. `balance='source_label'` gives every
(source, label) cell that has images the same share: a source whose films are 97% infected then shows its few
normal films as often as its infected ones, so "this source" stops predicting "infected"; small sources weigh as
much as large ones. `balance='label_in_source'` balances the labels within each source but keeps each source's
share of the draws (its share of the images), so a source's few films of one label are repeated less. A source
with one label only cannot be balanced by sampling; its cell still gets its share. Only training draws are
weighted; validation and test are read as they are.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from .errors import DataError
from .labels import join_labels

__all__ = ["BALANCE_MODES", "balance_weights", "group_keys"]

BALANCE_MODES = ("none", "label", "source_label", "label_in_source")


def group_keys(items, labels: list, mode: str, folders=None) -> list:
    """The group of each training item: its label ('label'), or (source, label) from `folders.labels`
    ('source_label', 'label_in_source'); a `DataError` when labels.csv gives no source for some item."""
    if mode == "label": return list(labels)
    if mode not in BALANCE_MODES[2:]: raise ValueError(f"balance must be one of {BALANCE_MODES}, got {mode!r}")
    csv = folders.root / "labels.csv"
    table = folders.labels
    if table is None or "source" not in table.columns:
        raise DataError(f"--balance {mode} needs {csv} with a source column",
                        "add it (file,label,source), or use --balance label", path=csv)
    sources = join_labels(items, folders.root, table, columns=("source",))["source"]
    missing = [it for it, s in zip(items, sources) if not s]
    if missing:
        raise DataError(f"{csv} gives no source for {len(missing)} training image(s), e.g. {missing[0]}",
                        "add a source for every image, or use --balance label", path=csv)
    return list(zip(sources, labels))


def balance_weights(groups: list, mode: str = "label") -> np.ndarray:
    """Per-item sampling weights (summing to 1): every distinct group the same total weight; with mode
    'label_in_source' and (source, label) groups, every source its share of the items, split equally between its
    labels."""
    n = Counter(groups)
    if mode == "label_in_source":
        size, labels = Counter(s for s, _ in groups), Counter(s for s, _ in n)  # items, labels per source
        w = np.array([size[s] / labels[s] / n[(s, lab)] for s, lab in groups])
    else: w = np.array([1.0 / n[g] for g in groups])
    return w / w.sum()
