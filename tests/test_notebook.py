"""docs/example.ipynb runs top to bottom in a Jupyter kernel (nbclient), so it cannot rot, and behaves as fastai
does in a notebook: fastprogress bars during a run, plots inline (each once), no error."""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "example.ipynb"


def _by_tag(nb) -> dict:
    return {t: c for c in nb.cells if c.cell_type == "code" for t in c.metadata.get("tags", [])}


def _images(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.outputs)


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code")


def test_example_notebook_runs_with_bars_and_inline_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it: one thread on a busy test machine
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()  # raises CellExecutionError on any failing cell
    cells = _by_tag(nb)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    run = cells["run"]
    html = " ".join(o.get("data", {}).get("text/html", "") for o in run.outputs)
    assert "<progress" in html, "a run from Python shows fastprogress's notebook bars"
    assert "pre-scan" in html or "plots and Grad-CAM" in html  # the library's own phases too, not only fastai's
    assert _images(run) == 0, "a run writes its plots to files, not into the notebook"
    # the default out folder is relative (./outputs): the run folder still comes back whole (fastai once doubled it)
    run_dir = Path(run.outputs[-1]["data"]["text/plain"].split("'")[1])
    assert run_dir.parent == tmp_path / "outputs" / "resnet18_head" and (run_dir / "model_card.md").is_file()
    assert "Not for clinical use" in cells["card"].outputs[0]["data"]["text/markdown"]
    assert "<progress" in " ".join(o.get("data", {}).get("text/html", "") for o in cells["fit"].outputs)
    for tag in ("show_results", "top_losses"):
        assert _images(cells[tag]) >= 1, f"{tag}: no inline image"
    for tag in ("roc_pr", "confusion"):  # a returned Figure shows once, as the cell's value
        assert _images(cells[tag]) == 1, f"{tag}: {_images(cells[tag])} images"
