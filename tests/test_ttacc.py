"""bench/ttacc.py (time to accuracy): its configuration syntax, and a short run that records one row per epoch with
validation accuracy and ROC AUC against seconds since start, and the CPU kind with that run's GEMM peak."""
import math

import pytest

from conftest import bench_module


def _ttacc(): return bench_module("ttacc")


def test_configuration_syntax():
    t = _ttacc()
    assert t.parse_config("best") == ("best", {})
    assert t.parse_config("best:fastai:epochs=3") == ("best", {"bf16": "false", "channels_last": "false",
                                                               "fp32_size": "none", "epochs": "3"})
    assert t.parse_config("best:progressive=128:2,160:2:seed=1") == ("best", {"progressive": "128:2,160:2",
                                                                            "seed": "1"})


@pytest.mark.slow  # two fresh processes (imports, a 2-epoch fit each): about a minute on 2 cores
def test_short_run_records_valid_curve(tiny_data, tmp_path):
    out = tmp_path / "r.md"
    _ttacc().main(["--config", "resnet18_full", "--config", "resnet18_full:fastai", "--data", str(tiny_data), "--set",
                   "pretrained=false", "--set", "size=32", "--set", "bs=8", "--set", "epochs=2", "--set", "tta=false",
                   "--out", str(out)])
    text = out.read_text()
    assert "CPU kind `" in text and "fp32" in text and "failed" not in text
    rows = [l for l in text.splitlines() if l.startswith("| resnet18_full")]
    assert len(rows) == 2 and "channels-last False" in rows[1]
    for row in rows:
        curve = row.split("|")[3].split("<br>")
        assert [c.split(":")[0].strip() for c in curve] == ["0", "1"]
        secs = [float(c.split(":")[1].split("s")[0]) for c in curve]
        assert 0 < secs[0] <= secs[1]  # whole seconds in the table: two tiny epochs can round to the same value
        acc, auc = (float(v) for v in curve[-1].split("→")[1].split("/"))
        assert 0 <= acc <= 1 and (math.isnan(auc) or 0 <= auc <= 1)


def test_a_worker_past_its_budget_is_stopped():
    import sys
    import time
    t = _ttacc()
    start = time.perf_counter()
    code, _ = t.run_worker([sys.executable, "-c", "import time; time.sleep(120)"], budget=2)
    assert code is None and time.perf_counter() - start < 60  # stopped (SIGTERM), not waited for
    code, err = t.run_worker([sys.executable, "-c", "import sys; sys.exit('boom')"], budget=60)
    assert code == 1 and "boom" in err


@pytest.mark.slow  # a fresh process (imports, then tiny epochs until the budget): about a minute on 2 cores
def test_budget_keeps_the_epochs_reached(tiny_data, tmp_path):
    out = tmp_path / "r.md"
    _ttacc().main(["--config", "resnet18_full", "--data", str(tiny_data), "--set", "pretrained=false", "--set",
                   "size=32", "--set", "bs=8", "--set", "epochs=10000", "--set", "tta=false", "--budget", "45",
                   "--out", str(out)])
    (row,) = [l for l in out.read_text().splitlines() if l.startswith("| resnet18_full")]
    cells = row.split("|")
    assert "stopped at the budget (45 s) after" in cells[4] and "channels-last True" in cells[2]
    curve = cells[3].split("<br>")
    assert f"after {len(curve)} epochs" in cells[4]
    secs = [float(c.split(":")[1].split("s")[0]) for c in curve]
    assert [int(c.split(":")[0]) for c in curve] == list(range(len(curve))) and secs == sorted(secs) and secs[-1] <= 45
