"""The shortcut audit on generated films: a planted shortcut (a bright corner marker on every infected film, and a
source with letterbox bars that is mostly infected) is flagged before training and shows up in a trained model's
occlusion tests; clean films (two look-alike sources, both classes in each, a texture in the lungs) are not flagged."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covid_fastai import audit_data, audit_run
from covid_fastai.errors import DataError
from covid_fastai.occlusion import REGIONS, region_masks

SIZE = 64
# (split, source, class) -> count. Planted: source A (letterboxed) mostly infected, B mostly normal.
PLANTED = {("train", "A", "infected"): 32, ("train", "A", "normal"): 8, ("train", "B", "infected"): 8,
           ("train", "B", "normal"): 32}
PLANTED.update({(s, src, c): n // 4 for s in ("valid", "test") for (_, src, c), n in list(PLANTED.items())})
CLEAN = {(s, src, c): n for s, n in (("train", 20), ("valid", 8), ("test", 6)) for src in "AB"
         for c in ("infected", "normal")}


def film(rng, infected: bool, marker: bool, letterbox: bool, lung_texture: bool) -> Image.Image:
    "A drawn frontal film: body, two darker lungs, noise; optional corner marker, letterbox bars, lung texture."
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    img = np.full((SIZE, SIZE), 40.0 + rng.normal(0, 6), np.float32)
    img[((xx - 32) / 28) ** 2 + ((yy - 38) / 34) ** 2 < 1] += 60
    lungs = np.zeros((SIZE, SIZE), bool)
    for cx in (21, 43):
        lungs |= ((xx - cx) / 9) ** 2 + ((yy - 30) / 16) ** 2 < 1
    img[lungs] -= 35
    if lung_texture and infected:  # zero-mean stripes: the class lives in the lungs, not in the mean
        img += 25 * np.sign(np.sin(yy * 1.6)) * lungs
    img += rng.normal(0, 5, img.shape)
    if letterbox: img[:, :5] = img[:, -5:] = 0
    if marker: img[2:7, 2:7] = 255
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L")


def make_films(root, counts: dict, planted: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for (split, source, cls), n in counts.items():
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            inf = cls == "infected"
            im = film(rng, inf, marker=planted and inf, letterbox=planted and source == "A", lung_texture=not planted)
            name = f"{split}/{cls}/{source}_{i:03d}.png"
            im.save(root / name)
            rows.append({"file": name, "label": cls, "source": source})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


PROBE = dict(arch="resnet18", size=SIZE, pretrained=False, bs=32)  # a random-init body: no download, seconds


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "One torch thread: on a few busy cores, more threads spin against each other (ten times slower here)."
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_films(tmp_path_factory.mktemp("planted"), PLANTED, planted=True)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_films(tmp_path_factory.mktemp("clean"), CLEAN, planted=False, seed=1)


def findings(d):
    return json.loads((d / "audit.json").read_text())


def test_planted_shortcut_is_flagged_before_training(planted, tmp_path):
    d = audit_data(planted, out=tmp_path, **PROBE)
    m = findings(d)
    assert m["shortcut"], m["flags"]
    conf = m["confounding"]
    assert conf["label_from_source"] and conf["source_rule_accuracy"] == pytest.approx(0.8)
    assert conf["majority_rate"] == pytest.approx(0.5) and conf["cramers_v"] == pytest.approx(0.6)
    assert m["pixels"]["balanced_accuracy"] >= 0.8
    by_stat = {s["statistic"]: s for s in m["separating_stats"]}
    assert by_stat["edge_marker_components"]["flag"] and by_stat["edge_marker_components"]["auc"] > 0.95
    assert by_stat["edge_marker_components"]["higher_in"] == "infected"
    assert not by_stat["width"]["flag"] and not by_stat["mean_intensity"]["flag"]
    md = (d / "audit.md").read_text()
    assert "without looking at the lungs" in md and "edge_marker_components alone separates" in md
    html = (d / "audit.html").read_text()
    assert "data:image/png;base64," in html and "<img" in html and 'src="confound.png"' not in html


def test_clean_data_is_not_flagged(clean, tmp_path):
    m = findings(audit_data(clean, out=tmp_path, **PROBE))
    assert not m["shortcut"] and m["flags"] == [], m["flags"]
    assert m["confounding"]["cramers_v"] == pytest.approx(0.0)
    assert m["pixels"]["balanced_accuracy"] < 0.8


def test_source_missing_from_train_is_flagged(clean, tmp_path):
    from covid_fastai.audit import source_frame, split_coverage
    from covid_fastai.data import find_xray_folders
    df = source_frame(find_xray_folders(clean))
    df.loc[(df["split"] == "test") & (df.index % 2 == 0), "source"] = "C"
    assert split_coverage(df) == [{"split": "test", "source": "C", "n": int((df["source"] == "C").sum())}]


def test_missing_source_column_is_one_line_data_error(clean, tmp_path):
    import shutil
    data = shutil.copytree(clean, tmp_path / "d")
    pd.read_csv(data / "labels.csv").drop(columns="source").to_csv(data / "labels.csv", index=False)
    with pytest.raises(DataError, match="has no source column") as e:
        audit_data(data, out=tmp_path, **PROBE)
    assert "\n" not in str(e.value) and e.value.path == data / "labels.csv"
    (data / "labels.csv").unlink()
    with pytest.raises(DataError, match="labels.csv does not exist"):
        audit_data(data, out=tmp_path, **PROBE)


def test_regions_do_not_overlap_and_cover_what_they_say():
    m = region_masks(100, 100)
    outside, edges, lungs = (m[r] for r in REGIONS)
    assert (outside ^ lungs).all()              # complements
    assert not (edges & lungs).any()           # borders and corners never reach the central region
    assert edges[0, 50] and edges[10, 10] and not edges[10, 50] and lungs[50, 50]
    assert lungs.float().mean() == pytest.approx(0.49)


@pytest.fixture(scope="module")
def planted_run(planted, tmp_path_factory):
    from covid_fastai.train import run_recipe
    return run_recipe("resnet18_full", out=tmp_path_factory.mktemp("runs"), data=str(planted), epochs=3,
                      pretrained=False, size=SIZE, resize=SIZE, aug="none", bs=16, opt="adamw", lr=3e-3,
                      schedule="one_cycle", tta=False, bf16=False, channels_last=False)


def test_model_on_planted_shortcut_fails_when_corners_are_masked(planted, planted_run, tmp_path):
    d = audit_run(planted_run, planted, out=tmp_path)
    m = findings(d)
    occ = {r["condition"]: r for r in m["occlusion"]}
    base, corners, lungs = occ["none (all pixels)"], occ["borders and corners masked"], occ["lung region masked"]
    assert base["accuracy"] >= 0.9, occ
    assert corners["d_accuracy"] <= -0.3 and corners["d_auc"] <= -0.2, occ
    assert abs(lungs["d_accuracy"]) <= 0.1 and lungs["roc_auc"] >= 0.9, occ
    assert m["shortcut"] and any("lung region masked" in f for f in m["flags"])
    assert {r["source"] for r in m["within_source"]["sources"]} == {"A", "B"}
    assert (d / "audit.html").is_file() and {"occlusion.png", "roc_by_source.png"} <= {p.name for p in d.iterdir()}
    assert audit_run(planted_run, planted, out=tmp_path) != d  # a second audit never overwrites the first


def test_comparison_table_carries_the_runs_newest_audit(planted, planted_run):
    from covid_fastai.report import sweep_row
    def row(): return sweep_row(planted_run, *(json.loads((planted_run / f).read_text())
                                              for f in ("config.json", "metrics.json")))
    assert not [k for k in row() if k.startswith("audit:")]  # no audit in the run folder yet: no columns
    d = audit_run(planted_run, planted)  # the default: RUN_DIR/audits/<stamp>/
    m = findings(d)
    assert f"audits/{d.name}/audit.md" in (planted_run / "model_card.md").read_text()  # the card names it
    lungs = next(o for o in m["occlusion"] if o["condition"] == "lung region masked")
    r = row()
    assert (r["audit: mean within-source AUC"], r["audit: AUC with lungs masked"], r["audit: flags"]) == \
        (m["within_source"]["mean_within_auc"], lungs["roc_auc"], len(m["flags"]))


def test_cli_audit_prints_the_flags_and_where_the_report_is(planted, tmp_path, capsys):
    from covid_fastai.cli import main
    main(["audit", "--data", str(planted), "--out", str(tmp_path), "--arch", "resnet18", "--size", str(SIZE),
          "--pretrained", "false"])
    out = capsys.readouterr().out
    assert out.startswith("SHORTCUT: 3 flag(s)") and "edge_marker_components" in out
    assert out.strip().splitlines()[-1].endswith("audit.html") and len(list((tmp_path / "audits").iterdir())) == 1
    with pytest.raises(SystemExit) as e:
        main(["audit", "--out", str(tmp_path)])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == \
        "error: audit needs --data DIR (a folder with labels.csv and its source column)"


def test_a_source_that_is_almost_one_class_is_named():
    from covid_fastai.audit import confounding
    rows = [("train", "infected", "X")] * 19 + [("train", "normal", "X")] + [("train", "infected", "Y")] * 18 + \
           [("train", "normal", "Y")] * 2 + [("train", "normal", "Z")] * 20
    df = pd.DataFrame(rows, columns=["split", "label", "source"])
    assert [o["source"] for o in confounding(df)["one_class_sources"]] == ["X", "Y", "Z"]
    assert [o["source"] for o in confounding(df.iloc[1:])["one_class_sources"]] == ["Y", "Z"]  # X: 19, too few


def test_within_source_auc_sees_a_score_that_only_tells_sources_apart():
    from covid_fastai.occlusion import within_source
    # source A: all high scores, mostly infected; B: all low, mostly normal; inside each the score is noise
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(40), np.zeros(10), np.ones(10), np.zeros(40)]
    p = np.r_[0.7 + 0.2 * rng.random(50), 0.1 + 0.2 * rng.random(50)]
    w = within_source(y, p, ["A"] * 50 + ["B"] * 50)
    assert w["pooled_auc"] > 0.75 and abs(w["mean_within_auc"] - 0.5) < 0.2 and w["flag"]
    assert w["weighted_within_auc"] == pytest.approx(w["mean_within_auc"])  # equal sizes
