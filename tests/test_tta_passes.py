"""bench/tta_passes.py: fold models rebuilt from a cv re-score their own held-out films (no TTA reproduces the
run's predictions.csv exactly), TTA passes really augment (from another augmentation policy when asked), another evaluation size changes the
pixels and not the films, and the
table has one row per setting."""
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from conftest import bench_module
from test_cv import RECIPE, TINY, make_cv_data, one_thread  # noqa: F401 (a fixture)

from covid_fastai.cv import run_cv


def test_fold_models_rescore_their_held_out_films(tmp_path, one_thread):
    data = make_cv_data(tmp_path / "data")
    run_cv(RECIPE, folds=2, out=tmp_path, data=str(data), **TINY)
    (cv_dir,) = (tmp_path / "cv" / RECIPE).iterdir()
    out = tmp_path / "tta.md"
    rows = bench_module("tta_passes").main([str(cv_dir), "--n", "0,1,4,4:none,0@40", "--out", str(out)])
    assert len(rows) == 2 * 5 and list(rows["setting"][:5]) == ["0", "1", "4", "4:none", "0@40"]
    for fold, part in rows.groupby("fold"):
        run = cv_dir / pd.read_csv(cv_dir / "cv.csv").set_index("fold").loc[fold, "run"]
        pred = pd.read_csv(run / "predictions.csv")
        m = json.loads((run / "metrics.json").read_text())
        plain, aug = part[part["n"] == 0].iloc[0], part[part["n"] == 1].iloc[0]
        # the recipe runs without TTA, so n = 0 is the run's own prediction, film by film
        own = dict(zip(map(os.path.realpath, pred["file"]), pred[f"p_{m['positive_class']}"]))
        assert len(plain["p"]) == len(own)
        assert np.allclose(plain["p"], [own[os.path.realpath(f)] for f in plain["files"]], atol=1e-5)
        assert not np.allclose(plain["p"], aug["p"])  # the augmented pass sees other pixels
        # passes drawn from the 'none' policy see the plain pixels: 4 of them mix back to the plain prediction
        assert np.allclose(plain["p"], part[part["setting"] == "4:none"].iloc[0]["p"], atol=1e-5)
        # the same films at another evaluation size: the same weights, other pixels, other predictions
        larger = part[part["setting"] == "0@40"].iloc[0]
        assert larger["files"] == plain["files"] and not np.allclose(plain["p"], larger["p"])
        labels = pd.read_csv(Path(json.loads((run / "config.json").read_text())["data"]["path"]) / "labels.csv",
                             keep_default_na=False)
        held = labels[labels["file"].str.startswith("valid/")]
        assert sorted(plain["source"]) == sorted(held["source"])
    text = out.read_text()
    assert "| none | 1 |" in text and "| n=1 | 2 |" in text and "| n=4 | 5 |" in text and "ahead/behind" in text
    assert "| n=4, aug none | 5 |" in text and "| none, 40 px | 1 |" in text
