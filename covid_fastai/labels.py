"""`labels.csv` beside an image folder: per-image metadata (file relative to the data root, label, and optional
source, fine_label, patient_id), for per-source / per-fine-label breakdowns and the three-class mode.

Reading only; paths are checked so a CSV cannot point outside its folder.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import UserError

__all__ = ["read_labels", "join_labels", "fine_label_getter", "FINE_CLASSES"]

FINE_CLASSES = ("covid", "normal", "pneumonia")  # the three-class mode's classes when labels.csv has them


def read_labels(root) -> pd.DataFrame | None:
    """`<root>/labels.csv` (columns file, label; optional source, fine_label, patient_id), indexed by `file`
    (a path relative to root), or None when there is no such file. Paths leaving the folder are refused
    (`covid_fastai.data.read_labels_csv`)."""
    from .data import read_labels_csv
    df = read_labels_csv(root)
    if df is None: return None
    df = df.drop(columns="path").drop_duplicates()  # a row repeated word for word says nothing new
    twice = df["file"].duplicated(keep=False)
    if twice.any():  # which row would win is arbitrary: refuse
        name = df.loc[twice, "file"].iloc[0]
        lines = ", ".join(str(i + 2) for i in df.index[df["file"] == name])  # header is line 1
        raise UserError(f"{Path(root) / 'labels.csv'} lists {name!r} more than once with different values (lines "
                        f"{lines}): keep one row per image")
    return df.set_index("file")


def join_labels(items, root, labels: pd.DataFrame | None, columns=("source", "fine_label", "patient_id")) -> dict:
    "{column: [value per item, '' where the item is not in labels.csv]} for the columns labels.csv has."
    if labels is None: return {}
    rel = [_relative(it, root) for it in items]
    return {c: [labels[c].get(r, "") if r is not None else "" for r in rel] for c in columns if c in labels.columns}


def _relative(item, root) -> str | None:
    "`item` relative to `root` as labels.csv writes it: as listed (a folder of symlinks joins), else resolved."
    for a, b in ((Path(item).absolute(), Path(root).absolute()), (Path(item).resolve(), Path(root).resolve())):
        try: return a.relative_to(b).as_posix()
        except ValueError: pass
    return None


def fine_label_getter(root, files) -> tuple:
    """(get_y, classes) for the three-class mode: each image's `fine_label` from `<root>/labels.csv`.

    Every image in `files` must have a row with a fine_label; the classes are the sorted labels found.
    """
    labels = read_labels(root)
    f = Path(root) / "labels.csv"
    if labels is None or "fine_label" not in labels.columns:
        raise UserError(f"--labels fine_label needs {f} with a fine_label column: add it, or use --labels folders")
    fine = labels["fine_label"].to_dict()
    table = {}
    for it in files:
        rel = _relative(it, root)
        if not fine.get(rel):
            raise UserError(f"{f} has no fine_label for {rel}: add a row for every image, or use --labels folders")
        table[str(it)] = fine[rel]
    classes = sorted(set(table.values()))
    if len(classes) < 2: raise UserError(f"{f}: fine_label has fewer than 2 classes ({classes})")
    return (lambda fn: table[str(fn)]), classes
