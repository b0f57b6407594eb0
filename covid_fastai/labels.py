"""`labels.csv` beside an image folder, parsed in one place: per-image metadata (file relative to the data root,
label, and optional source, fine_label, patient_id), for per-source / per-fine-label breakdowns, patient-wise
validation splits and the three-class mode.

Reading only; paths are checked so a CSV cannot point outside its folder. A run parses the file once:
`XrayFolders.labels` (covid_fastai.data) holds the result.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .errors import DataError, first_line

__all__ = ["read_labels_csv", "index_labels", "read_labels", "join_labels", "relative_name", "fine_label_getter"]


def read_labels_csv(root) -> pd.DataFrame | None:
    """`root/labels.csv` as a DataFrame (None when there is none), one row per line, with a `path` column of
    absolute paths.

    Its `file` column names images relative to `root`; a row whose file is absolute or climbs out of `root`
    (`../`, `train/../../x`) is refused with a `DataError`: a labels file must not point the library at files
    elsewhere on the machine. (The check is on the path as written: a data folder may itself be made of
    symlinks, which its owner chose.)
    """
    root = Path(root).expanduser().resolve()
    f = root / "labels.csv"
    if not f.is_file(): return None
    try:
        df = pd.read_csv(f, dtype=str, keep_default_na=False)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{f} cannot be read as CSV ({first_line(e)})", "fix or remove it", path=f) from None
    if "file" not in df.columns:
        raise DataError(f"{f} has no 'file' column (columns: {', '.join(df.columns)})",
                        f"add one with image paths relative to {root}", path=f)
    files, paths = [], []
    for i, name in enumerate(df["file"], start=2):  # line numbers as an editor shows them (header is line 1)
        rel = os.path.normpath(name.replace("\\", "/")) if name else ""
        if (not rel or os.path.isabs(rel) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":")
                or rel == ".." or rel.startswith("../")):
            raise DataError(f"{f} line {i}: file {name!r} is outside the data folder {root}",
                            "labels.csv may only name files inside it, by relative path (e.g. train/normal/x.jpg)",
                            path=f)
        files.append(Path(rel).as_posix())
        paths.append(root / rel)
    return df.assign(file=files, path=paths)


def index_labels(rows: pd.DataFrame | None, f) -> pd.DataFrame | None:
    """`read_labels_csv`'s rows (from file `f`) indexed by `file`, one row per image. A row repeated word for word
    is dropped; an image listed twice with different values is refused (which row would win is arbitrary)."""
    if rows is None: return None
    df = rows.drop(columns="path").drop_duplicates()
    twice = df["file"].duplicated(keep=False)
    if twice.any():
        name = df.loc[twice, "file"].iloc[0]
        lines = ", ".join(str(i + 2) for i in df.index[df["file"] == name])  # header is line 1
        raise DataError(f"{f} lists {name!r} more than once with different values (lines {lines})",
                        "keep one row per image", path=f)
    return df.set_index("file")


def read_labels(root) -> pd.DataFrame | None:
    """`<root>/labels.csv` (columns file, label; optional source, fine_label, patient_id), indexed by `file`
    (a path relative to root), or None when there is no such file. Paths leaving the folder are refused.
    Within a run, use `XrayFolders.labels` (parsed once) instead."""
    return index_labels(read_labels_csv(root), Path(root) / "labels.csv")


def join_labels(items, root, labels: pd.DataFrame | None, columns=("source", "fine_label", "patient_id")) -> dict:
    "{column: [value per item, '' where the item is not in labels.csv]} for the columns labels.csv has."
    if labels is None: return {}
    rel = [relative_name(it, root) for it in items]
    return {c: [labels[c].get(r, "") if r is not None else "" for r in rel] for c in columns if c in labels.columns}


def relative_name(item, root) -> str | None:
    "`item` relative to `root` as labels.csv writes it: as listed (a folder of symlinks joins), else resolved."
    for a, b in ((Path(item).absolute(), Path(root).absolute()), (Path(item).resolve(), Path(root).resolve())):
        try: return a.relative_to(b).as_posix()
        except ValueError: pass
    return None


def fine_label_getter(folders, files) -> tuple:
    """(get_y, classes) for the three-class mode: each image's `fine_label` from labels.csv.

    folders: an `XrayFolders` (its labels.csv, parsed once) or a data root (labels.csv read now).
    Every image in `files` must have a row with a fine_label; the classes are the sorted labels found.
    """
    if isinstance(folders, (str, os.PathLike)): root, labels = Path(folders), read_labels(folders)
    else: root, labels = Path(folders.root), folders.labels
    f = root / "labels.csv"
    if labels is None or "fine_label" not in labels.columns:
        raise DataError(f"--labels fine_label needs {f} with a fine_label column",
                        "add it, or use --labels folders", path=f)
    fine = labels["fine_label"].to_dict()
    table = {}
    for it in files:
        rel = relative_name(it, root)
        if not fine.get(rel):
            raise DataError(f"{f} has no fine_label for {rel}", "add a row for every image, or use --labels folders",
                            path=f)
        table[str(it)] = fine[rel]
    classes = sorted(set(table.values()))
    if len(classes) < 2: raise DataError(f"{f}: fine_label has fewer than 2 classes ({classes})", path=f)
    return (lambda fn: table[str(fn)]), classes
