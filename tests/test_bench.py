"""bench/bench.py: its data-path measurement (6) runs against the library as it is now, on generated data: the bench
imports library internals (the decode store, the loaders, the augmentation), which move as the library changes."""
from conftest import bench_module


def test_data_path_measurement_runs_on_a_tiny_set(tiny_data, monkeypatch):
    from covid_fastai import data as D
    b = bench_module("bench")
    monkeypatch.setattr(b, "DATA", tiny_data)
    # the measurement empties the process-wide decode store on purpose (cold passes): give it its own for this test
    monkeypatch.setattr(D, "_DECODED", {})
    monkeypatch.setattr(D, "_DECODED_BYTES", [0])
    table = b.bench6(quick=True)
    rows = [r for r in table.splitlines() if r.startswith("| ") and "images/s" not in r]
    assert [r.split(" | ")[0] for r in rows[:3]] == ["| 0 workers", "| 1 workers", "| 2 workers"]
    assert all(float(r.split(" | ")[-1].rstrip(" |").split(" / ")[-1]) > 0 for r in rows)
    assert any("augmentation only: PIL" in r for r in rows)


def test_command_line_carries_the_cpu_limits_it_ran_under(monkeypatch):
    b = bench_module("bench")
    for k in b.CPU_LIMITS: monkeypatch.delenv(k, raising=False)
    assert b.command_line("bench/ttacc.py", ["--config", "best:seed=1"]) == \
        "Command: `python bench/ttacc.py --config best:seed=1`"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert b.command_line("bench/ttacc.py", ["--config", "best"], label="AVX2 emulated") == \
        "Command: `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/ttacc.py --config best`"
