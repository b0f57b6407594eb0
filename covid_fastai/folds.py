"""Cross-validation folds over a data folder's train+valid images, and each fold's data view (a folder of symlinks).

The pool is train + valid; test/ is never listed. Folds keep a patient's films together (labels.csv `patient_id`;
an image without one, or without labels.csv, is its own group):
- `kfold_folds`: scikit-learn's `StratifiedGroupKFold` over the groups, stratified by label + source (the class
  folder, and labels.csv's `source` where it has one). It stratifies one y, so y is the stratum 'label|source'.
  A stratum with fewer groups than folds cannot reach every fold: it joins its label's 'label|other sources'
  stratum, and if that one is still too small, its label's largest stratum (`strata`). A class with fewer
  groups than folds is an error (some folds would have none of it).
- `source_folds` (leave one source out): one fold per source; it trains on the other sources and holds out that
  one. Images without a source always train. A patient filmed in two sources is not trained on while one of its
  sources is held out (those films are `dropped` from that fold).

`write_view` makes a fold's data folder: `train/<class>/` and `valid/<class>/` of symlinks to the original files,
named `<split>__<path inside the class folder>` (unique), a labels.csv of the original rows with `file` rewritten
and a DATA_VIEW.json saying what it is, so a fold is a normal data folder for `train.run`, `evaluate`, `audit` and
the report's breakdowns.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .data import DATA_VIEW, SYNTHETIC_MARKER, XrayFolders
from .files import write_json
from .errors import DataError

__all__ = ["Fold", "cv_table", "strata", "kfold_folds", "source_folds", "write_view", "OTHER_SOURCES"]

OTHER_SOURCES = "other sources"  # the merged stratum of a label's rare sources


@dataclass
class Fold:
    "One fold: what it trains on and what it holds out, as files relative to the data root."
    name: str                # 'fold-1' or 'source-ieee8023' (its view folder and tag)
    held_out: str            # what its valid part is, in words: 'fold 1 of 5', 'source ieee8023'
    train: list = field(default_factory=list)
    valid: list = field(default_factory=list)
    dropped: list = field(default_factory=list)  # left out of train: their patient is also in the held-out part

    def record(self) -> dict:
        "The fold as sweep.json carries it (counts, not file lists: folds.csv has those)."
        return {"name": self.name, "held_out": self.held_out, "n_train": len(self.train), "n_valid": len(self.valid),
                "n_dropped": len(self.dropped)}


def cv_table(folders: XrayFolders) -> pd.DataFrame:
    """One row per train+valid image: file (relative to the root, as labels.csv writes it), split, label (class
    folder), link (its name in a view's class folder), source and patient_id ('' where unknown), group."""
    from .labels import relative_name
    rows = []
    for split in ("train", "valid"):
        for c in folders.classes:
            for f in folders.splits.get(split, {}).get(c, []):
                inside = Path(f).relative_to(_split_dir(folders, split) / c).as_posix()
                rows.append({"file": relative_name(f, folders.root), "split": split, "label": c,
                             "link": f"{split}__{inside.replace('/', '__')}"})
    df = pd.DataFrame(rows, columns=["file", "split", "label", "link"])
    labels = folders.labels
    for col in ("source", "patient_id"):
        has = labels is not None and col in labels.columns
        df[col] = [str(labels[col].get(f, "")) if has else "" for f in df["file"]]
    df["group"] = np.where(df["patient_id"] != "", "patient:" + df["patient_id"], "image:" + df["file"])
    return df


def _split_dir(folders: XrayFolders, split: str) -> Path:
    return Path(folders.root) / (folders.valid_name if split == "valid" else split)


def _n_groups(df: pd.DataFrame, by) -> pd.Series:
    return df.groupby(by)["group"].nunique()


def strata(df: pd.DataFrame, k: int) -> pd.Series:
    """Each image's stratum, 'label|source', with strata of fewer than `k` groups merged (see module docstring)."""
    s = df["label"] + "|" + df["source"]
    small = _n_groups(df.assign(s=s), "s")
    s = s.where(s.map(small) >= k, df["label"] + "|" + OTHER_SOURCES)
    counts = _n_groups(df.assign(s=s), "s")
    for lab in df["label"].unique():
        other = f"{lab}|{OTHER_SOURCES}"
        if other in counts and counts[other] < k:
            mine = counts[[i for i in counts.index if i.startswith(f"{lab}|") and i != other]]
            if len(mine): s = s.where(s != other, mine.idxmax())
    return s


def kfold_folds(df: pd.DataFrame, k: int = 5, seed: int = 0) -> tuple[list[Fold], pd.Series]:
    "(k patient-grouped, label+source stratified folds, each image's stratum); see the module docstring."
    from sklearn.model_selection import StratifiedGroupKFold
    if k < 2: raise DataError(f"--folds {k}: cross-validation needs at least 2 folds", "pass --folds 5")
    per_label = _n_groups(df, "label")
    if per_label.min() < k:
        lab = per_label.idxmin()
        raise DataError(f"class {lab!r} has {per_label.min()} patient(s) (or ungrouped images) in train+valid, "
                        f"fewer than --folds {k}", f"pass --folds {max(2, per_label.min())} or fewer")
    s = strata(df, k)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    for i, (tr, va) in enumerate(cv.split(np.zeros(len(df)), s.to_numpy(), df["group"].to_numpy()), 1):
        folds.append(Fold(f"fold-{i}", f"fold {i} of {k}", df["file"].iloc[tr].tolist(), df["file"].iloc[va].tolist()))
    return folds, s


def source_folds(df: pd.DataFrame, labels_csv) -> list[Fold]:
    "One fold per source (leave one source out); see the module docstring."
    if not (df["source"] != "").any():
        raise DataError(f"--by source needs {labels_csv} with a source column naming each image's source",
                        "add it, or leave out --by source for patient folds", path=labels_csv)
    sources = sorted(set(df["source"]) - {""})
    if len(sources) < 2:
        raise DataError(f"{labels_csv} names one source ({sources[0]}): leaving it out leaves nothing to train on",
                        "use patient folds (leave out --by source)", path=labels_csv)
    folds = []
    for src in sources:
        out = df["source"] == src
        crossing = df["group"].isin(set(df.loc[out, "group"])) & ~out  # same patient, another source
        lacking = sorted(set(df["label"]) - set(df.loc[~out & ~crossing, "label"]))
        if lacking:
            raise DataError(f"leaving out source {src} leaves no {', '.join(lacking)} film to train on",
                            "use patient folds (leave out --by source)", path=labels_csv)
        folds.append(Fold(f"source-{_safe(src)}", f"source {src}", df.loc[~out & ~crossing, "file"].tolist(),
                          df.loc[out, "file"].tolist(), df.loc[crossing, "file"].tolist()))
    return folds


def _safe(name: str) -> str:
    "A source name as a folder name."
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "_"


def write_view(fold: Fold, df: pd.DataFrame, folders: XrayFolders, dest) -> Path:
    """The fold's data folder at `dest` (see the module docstring), described by its DATA_VIEW.json; returns it.
    Its valid/ may lack a class folder (a held-out source of one class): the DATA_VIEW file allows that."""
    dest = Path(dest)
    rows = df.set_index("file")
    root = Path(folders.root).absolute()
    try:
        for split, files in (("train", fold.train), ("valid", fold.valid)):
            for f in files:
                r = rows.loc[f]
                (dest / split / r["label"]).mkdir(parents=True, exist_ok=True)
                os.symlink(root / f, dest / split / r["label"] / r["link"])
        if folders.synthetic: os.symlink(root / SYNTHETIC_MARKER, dest / SYNTHETIC_MARKER)
        write_json(dest / DATA_VIEW, {"kind": "cross-validation fold", "data": str(root), **fold.record()})
    except OSError as e:
        raise DataError(f"cannot make the data view {dest}: {e.strerror}",
                        "cross-validation links the images in place: pass --out DIR on a disk that allows "
                        "symbolic links", path=dest) from None
    if folders.labels is not None:
        view = {f: f"{split}/{rows.loc[f, 'label']}/{rows.loc[f, 'link']}"
                for split, files in (("train", fold.train), ("valid", fold.valid)) for f in files}
        listed = folders.labels.reset_index()
        listed = listed[listed["file"].isin(view)]
        listed.assign(file=listed["file"].map(view)).to_csv(dest / "labels.csv", index=False)
    return dest
