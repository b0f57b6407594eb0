"""`python -m covid_fastai check --data DIR`: a pre-scan of an X-ray folder before any training.

It prints every unreadable file with its reason, image counts per split and class, files whose bytes
appear in more than one split (same sha256: a test image that is also a training image inflates every
metric), and, where `DIR/labels.csv` exists, images it does not list and rows naming missing files.

Exit status: 0 when the folder can be trained on (problem files are then skipped by every run, as listed);
2 on a fatal problem (a layout error, a class without one readable image, a labels.csv naming files outside
the folder), with the usual one-line `error: ...`; with `--strict true`, 1 when anything at all was found.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .cache import sha256_file
from .data import find_xray_folders
from .images import scan_images
from .labels import index_labels, read_labels_csv, relative_name
from .progress import phase

__all__ = ["DataCheck", "check_data", "sha256_file"]


@dataclass
class DataCheck:
    root: Path
    synthetic: bool
    counts: dict                      # {split: {class: (readable, unreadable)}}
    unreadable: list                  # [(path, reason)]
    duplicates: list                  # [[path, ...]] same bytes in more than one split
    labels: dict | None = None        # {'rows', 'not_listed': [...], 'missing': [...]} when labels.csv exists
    fatal: list = field(default_factory=list)  # one-line problems that stop training

    @property
    def warnings(self) -> int:
        lab = self.labels or {}
        return len(self.unreadable) + len(self.duplicates) + len(lab.get("not_listed", [])) + len(lab.get("missing", []))

    def lines(self, limit: int = 0) -> list[str]:
        "The report as text lines; `limit` > 0 shortens long lists (0: everything)."
        rel = lambda p: str(Path(p).relative_to(self.root)) if Path(p).is_relative_to(self.root) else str(p)
        cut = lambda xs: xs if not limit or len(xs) <= limit else xs[:limit]
        more = lambda xs: [f"  ... and {len(xs) - limit} more"] if limit and len(xs) > limit else []
        L = [f"data: {self.root}" + (" (SYNTHETIC demo data)" if self.synthetic else ""), "",
             f"{'split':<8}{'class':<16}{'readable':>10}{'unreadable':>12}"]
        for split, by_class in self.counts.items():
            for c, (ok, bad) in by_class.items(): L.append(f"{split:<8}{c:<16}{ok:>10}{bad:>12}")
        L += ["", f"unreadable files ({len(self.unreadable)}): skipped by every run" if self.unreadable
              else "unreadable files: none"]
        L += [f"  {rel(f)}: {r}" for f, r in cut(self.unreadable)] + more(self.unreadable)
        L += [f"duplicates across splits ({len(self.duplicates)} group(s) of identical files)" if self.duplicates
              else "duplicates across splits: none"]
        L += ["  " + " = ".join(rel(f) for f in g) for g in cut(self.duplicates)] + more(self.duplicates)
        if self.labels is not None:
            lab = self.labels
            L += [f"labels.csv: {lab['rows']} rows; {len(lab['not_listed'])} image(s) not listed, "
                  f"{len(lab['missing'])} listed file(s) missing"]
            L += [f"  not listed: {rel(f)}" for f in cut(lab["not_listed"])] + more(lab["not_listed"])
            L += [f"  missing: {rel(f)}" for f in cut(lab["missing"])] + more(lab["missing"])
        L += [""] + ([f"FATAL: {p}" for p in self.fatal] if self.fatal else
                     ["ok: usable for training" + (f" ({len(self.unreadable)} file(s) will be skipped)"
                                                    if self.unreadable else "")])
        return L


def check_data(data) -> DataCheck:
    "Scan `data` (a folder in ImageFolder layout) for everything `check` reports; layout errors raise DataError."
    folders = find_xray_folders(data, scan=False)
    root = folders.root
    split_names = {"valid": folders.valid_name or "valid"}
    allfiles = [f for s in folders.splits for f in folders.files(s)]
    _, bad = scan_images(allfiles, root)
    bad_set = dict(bad)
    counts, fatal = {}, []
    for split, by_class in folders.splits.items():
        counts[split] = {}
        for c, fs in by_class.items():
            n_bad = sum(f in bad_set for f in fs)
            counts[split][c] = (len(fs) - n_bad, n_bad)
            if n_bad == len(fs):
                fatal.append(f"class folder {root / split_names.get(split, split) / c} has no readable image")
    by_hash = defaultdict(list)
    readable = [f for f in allfiles if f not in bad_set]
    with phase(f"duplicates: hash each of {len(readable)} readable images", total=len(readable)) as ph:
        for f in ph(readable): by_hash[sha256_file(f)].append(f)
    split_of = lambda f: Path(f).relative_to(root).parts[0]
    dups = [g for g in by_hash.values() if len({split_of(f) for f in g}) > 1]
    labels = None
    df = read_labels_csv(root)  # refuses rows that point outside the folder
    if df is not None:
        index_labels(df, Path(root) / "labels.csv")  # refuses an image listed twice with different values
        listed, paths = set(df["file"]), set(df["path"])
        # joined as labels.join_labels joins: by the relative name, so a data folder of symlinks matches too
        labels = {"rows": len(df), "not_listed": [f for f in allfiles if relative_name(f, root) not in listed],
                  "missing": sorted(p for p in paths if not p.exists())}
    return DataCheck(root, folders.synthetic, counts, bad, dups, labels, fatal)
