import re
import shutil
from pathlib import Path

import pytest
import torch

from covid_fastai.augment import XrayAugment, make_aug
from covid_fastai.data import find_xray_folders, xray_dls
from covid_fastai.demo import DEMO_COUNTS, demo_data, make_demo_data
from covid_fastai.errors import UserError


def test_folders_found(tiny_data):
    f = find_xray_folders(tiny_data)
    assert f.classes == ["infected", "normal"] and f.synthetic and f.has_test and f.valid_name == "valid"
    assert f.counts() == {s: {"infected": n, "normal": n} for s, n in (("train", 12), ("valid", 6), ("test", 6))}


@pytest.mark.parametrize("breakage, message", [
    ("missing", "does not exist"),
    ("no_train", "has no train/ folder"),
    ("one_class", "at least 2 class folders"),
    ("empty_class", "has no images"),
    ("test_class_mismatch", "that train/ lacks"),
    ("test_class_missing", "lacks class folders ['normal'] that train/ has"),
    ("all_unreadable", "has no readable image (6 unreadable, e.g."),
])
def test_bad_layouts_are_one_line_errors(tiny_data, tmp_path, breakage, message):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    if breakage == "missing": root = tmp_path / "nope"
    if breakage == "no_train": shutil.rmtree(root / "train")
    if breakage == "one_class": shutil.rmtree(root / "train" / "normal")
    if breakage == "empty_class":
        for p in (root / "valid" / "normal").iterdir(): p.unlink()
    if breakage == "test_class_mismatch": (root / "test" / "normal").rename(root / "test" / "healthy")
    if breakage == "test_class_missing": shutil.rmtree(root / "test" / "normal")
    if breakage == "all_unreadable":
        for p in (root / "valid" / "normal").iterdir(): p.write_bytes(b"")
    with pytest.raises(UserError, match=re.escape(message)) as e:
        find_xray_folders(root)
    assert "\n" not in str(e.value) and str(root) in str(e.value)


def test_dls_sizes_and_eval_pipeline(tiny_data):
    f = find_xray_folders(tiny_data)
    dls = xray_dls(f, make_aug("seed", 32), bs=8)
    xb, yb = dls.train.one_batch()
    assert xb.shape == (8, 3, 32, 32) and set(yb.tolist()) <= {0, 1}
    assert dls.vocab == ["infected", "normal"]
    # grayscale images become 3 identical channels
    assert torch.equal(xb[:, 0], xb[:, 1]) and torch.equal(xb[:, 1], xb[:, 2])
    # validation and test use the deterministic eval pipeline (Resize -> CenterCrop): same batch twice
    v1, v2 = dls.valid.one_batch()[0], dls.valid.one_batch()[0]
    assert torch.equal(v1, v2)
    t = dls.test_dl(f.files("test"), with_labels=True).one_batch()[0]
    assert t.shape[1:] == (3, 32, 32)
    # training augmentation is random
    assert not torch.equal(dls.train.one_batch()[0], dls.train.one_batch()[0])


def test_seed_pipeline_is_the_assignments():
    aug = XrayAugment()
    names = [type(t).__name__ for t in aug.train_tfm().transforms]
    assert names == ["Resize", "RandomRotation", "RandomResizedCrop", "RandomHorizontalFlip"]
    assert aug.resize_to == 256 and aug.train_tfm().transforms[1].degrees == [-30.0, 30.0]
    assert [type(t).__name__ for t in aug.eval_tfm().transforms] == ["Resize", "CenterCrop"]
    assert XrayAugment(size=112).resize_to == 128
    assert make_aug("none", 64).train_tfm().transforms[-1].__class__.__name__ == "CenterCrop"
    with pytest.raises(UserError, match="unknown augmentation"):
        make_aug("heavy", 64)


def test_random_valid_split_without_valid_folder(tiny_data, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    shutil.rmtree(root / "valid")
    f = find_xray_folders(root)
    assert f.valid_name is None
    a = xray_dls(f, make_aug("none", 32), bs=4, seed=1, valid_pct=0.25)
    b = xray_dls(f, make_aug("none", 32), bs=4, seed=1, valid_pct=0.25)
    assert len(a.valid_ds) == 6 and len(a.train_ds) == 18
    assert list(a.valid.items) == list(b.valid.items)  # seeded


def test_random_valid_split_keeps_each_patient_on_one_side(tiny_data, tmp_path):
    "With patient_id in labels.csv the held-out part is a share of the patients: no patient in both sets."
    import pandas as pd
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    shutil.rmtree(root / "valid")
    files = sorted(p.relative_to(root).as_posix() for p in (root / "train").rglob("*.png"))
    patient = {f: f"p{i // 3}" for i, f in enumerate(files)}  # 24 films, 8 patients of 3 films each
    pd.DataFrame({"file": files, "patient_id": [patient[f] for f in files]}).to_csv(root / "labels.csv", index=False)
    f = find_xray_folders(root)
    for seed in (1, 2, 3):
        dls = xray_dls(f, make_aug("none", 32), bs=4, seed=seed, valid_pct=0.25)
        side = lambda dl: {patient[Path(i).relative_to(root).as_posix()] for i in dl.items}
        assert not side(dls.train) & side(dls.valid) and len(side(dls.valid)) == 2  # 25% of 8 patients
        assert len(dls.valid_ds) == 6 and len(dls.train_ds) == 18


def test_small_train_set_still_trains(tiny_data):
    "A train set smaller than a batch keeps its one partial batch (fastai would drop it)."
    f = find_xray_folders(tiny_data)
    dls = xray_dls(f, make_aug("none", 32), bs=128)
    assert len(dls.train) == 1 and len(dls.train.one_batch()[1]) == 24
    dls = xray_dls(f, make_aug("none", 32), bs=23)  # 24 % 23 == 1: a lone image would break BatchNorm
    assert len(dls.train) == 1 and len(dls.train.one_batch()[1]) == 23


def test_demo_data_is_cached_and_marked(tmp_path):
    d = demo_data()
    assert (d / "SYNTHETIC.txt").exists() and demo_data() == d
    f = find_xray_folders(d)
    n = DEMO_COUNTS["train"]
    assert f.synthetic and f.counts()["train"] == {"infected": n, "normal": n}


def test_demo_generator_is_deterministic(tmp_path):
    a = make_demo_data(tmp_path / "a", counts={"train": 2}, size=64)
    b = make_demo_data(tmp_path / "b", counts={"train": 2}, size=64)
    fa = sorted((a / "train").rglob("*.png"))
    assert [p.read_bytes() for p in fa] == [(b / p.relative_to(a)).read_bytes() for p in fa]


def test_unreadable_files_are_skipped_with_a_warning(tiny_data, tmp_path):
    from covid_fastai.data import SkippedImagesWarning
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    (root / "train" / "normal" / "empty.jpg").write_bytes(b"")
    (root / "valid" / "infected" / "notes.png").write_text("not an image")
    with pytest.warns(SkippedImagesWarning, match="skipped 2 unreadable image file"):
        f = find_xray_folders(root)
    assert f.counts()["train"] == {"infected": 12, "normal": 12} and f.counts()["valid"]["infected"] == 6
    rep = f.skipped_report()
    assert rep["count"] == 2 and {Path(x["file"]).name for x in rep["files"]} == {"empty.jpg", "notes.png"}
    assert "empty file" in str(rep)


def test_labels_csv_paths_must_stay_inside_the_data_folder(tmp_path):
    from covid_fastai.labels import read_labels_csv
    assert read_labels_csv(tmp_path) is None
    (tmp_path / "labels.csv").write_text("file,label\ntrain/normal/a.jpg,normal\n")
    df = read_labels_csv(tmp_path)
    assert list(df["path"]) == [tmp_path.resolve() / "train/normal/a.jpg"]
    for bad in ("../elsewhere/a.jpg", "/etc/passwd", "train/../../x.jpg"):
        (tmp_path / "labels.csv").write_text(f"file,label\ntrain/normal/a.jpg,normal\n{bad},normal\n")
        with pytest.raises(UserError, match=r"line 3: file .* is outside the data folder") as e:
            read_labels_csv(tmp_path)
        assert bad in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "labels.csv").write_text("path,label\nx,y\n")
    with pytest.raises(UserError, match="has no 'file' column"):
        read_labels_csv(tmp_path)


def test_labels_csv_is_parsed_once_per_folders_object(tiny_data, tmp_path, monkeypatch):
    "XrayFolders.labels parses labels.csv when first asked; the splitter, fine labels and breakdowns share it."
    import pandas as pd
    from covid_fastai.data import patients_of
    from covid_fastai.labels import fine_label_getter
    root = shutil.copytree(tiny_data, tmp_path / "d")
    shutil.rmtree(root / "valid")  # no valid/ folder: held out by patient
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    pd.DataFrame({"file": files, "patient_id": [f"p{i // 2}" for i in range(len(files))],
                  "fine_label": [f.split("/")[1] for f in files]}).to_csv(root / "labels.csv", index=False)
    calls = []
    real = pd.read_csv
    monkeypatch.setattr(pd, "read_csv", lambda f, *a, **k: calls.append(f) or real(f, *a, **k))
    folders = find_xray_folders(root)
    xray_dls(folders, make_aug("seed", 32), bs=4, num_workers=0)
    assert patients_of(folders) and fine_label_getter(folders, folders.files("train"))[1] == ["infected", "normal"]
    assert folders.labels is folders.labels and [Path(f).name for f in calls] == ["labels.csv"]


def test_labels_module_does_not_import_the_data_module():
    "Dependencies point one way: data.py uses labels.py, never the reverse."
    import ast
    import covid_fastai.labels as L
    tree = ast.parse(Path(L.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "data" not in imported and not any(m and m.endswith(".data") for m in imported)


def test_every_augmentation_policy_is_an_xray_augment():
    assert isinstance(make_aug("xray", 64), XrayAugment)


def test_fine_labels_from_a_root_or_from_folders(fine_labelled):
    from covid_fastai.labels import fine_label_getter
    folders = find_xray_folders(fine_labelled.root)
    files = folders.files("train")
    by_root, by_folders = fine_label_getter(fine_labelled.root, files), fine_label_getter(folders, files)
    assert by_root[1] == by_folders[1] == ["covid", "normal", "pneumonia"]
    assert [by_root[0](f) for f in files] == [by_folders[0](f) for f in files]
