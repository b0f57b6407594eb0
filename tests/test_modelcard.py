"""Model cards (covid_fastai.modelcard): a tiny run's model_card.md has every section with the run's own numbers,
the licences and sources of its labels.csv, and report.md / report.html link to it."""
import json
import re
import pytest

from covid_fastai import model_card, write_model_card

SECTIONS = ["## Intended use", "## Model", "## Training data", "## Metrics", "## Known limitations",
            "## Weights provenance", "## How to reproduce"]


@pytest.fixture(scope="module")
def run_dir(labelled_run):
    return labelled_run[0]


def test_card_has_every_section_with_the_runs_numbers(run_dir):
    card = (run_dir / "model_card.md").read_text()
    m = json.loads((run_dir / "metrics.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    pos = [card.index(s) for s in SECTIONS]
    assert pos == sorted(pos), "sections missing or out of order"
    assert "Not for clinical use" in card and "pipeline check" in card  # tiny_data is the synthetic generator's
    t = m["at_threshold"]
    acc_row = next(ln for ln in card.splitlines() if ln.startswith("| accuracy |"))
    lo, hi = t["ci95"]["accuracy"]
    assert acc_row == (f"| accuracy | {t['accuracy']:.3f} | {lo:.3f}–{hi:.3f} | {m['at_0.5']['accuracy']:.3f} | "
                       f"{m['at_0.5']['ci95']['accuracy'][0]:.3f}–{m['at_0.5']['ci95']['accuracy'][1]:.3f} |")
    assert f"**{m['threshold']['value']:.4f}**" in card and f"{m['split']} split, {m['n']} images" in card
    for g in m["breakdowns"]["source"]:  # per source, as the evaluation measured it
        assert f"| {g['group']} | {g['n']} | {g['positives']} | {g['accuracy']:.3f} |" in card
    assert cfg["git_commit"] is None or cfg["git_commit"] in card
    assert f"RunDir.open({str(run_dir)!r}).recipe()" in card
    assert f"- source: `{cfg['weights']['source']}`" in card


def test_card_reads_licences_sources_and_one_class_sources(run_dir):
    card = (run_dir / "model_card.md").read_text()
    assert "| siteA | CC BY 4.0 | 25 |" in card and "| siteB | research use only | 23 |" in card
    # siteA: 12 train + 6 valid + 6 test infected films and one test normal film
    row = next(ln for ln in card.splitlines() if ln.startswith("| siteA | "))
    assert row.startswith("| siteA | 12 | 0 | 6 | 0 | 6 | 1 |"), row
    assert re.search(r"Source `siteA` is 96% `infected` \(25 images\)", card)
    assert re.search(r"Source `siteB` is 100% `normal` \(23 images\)", card)
    assert "accuracy by source ranges from" in card


def test_patient_handling_follows_the_split(run_dir):
    cfg = json.loads((run_dir / "config.json").read_text())
    assert "whether patients are disjoint across splits is up to whoever made it" in model_card(run_dir)
    cfg["data"]["valid"] = "random 20% of train patients (labels.csv patient_id) (seed 42)"
    assert "Patients were held out whole" in model_card(run_dir, config=cfg)
    cfg["data"]["valid"] = "random 20% of train (seed 42)"
    assert "films of one patient may sit on both sides" in model_card(run_dir, config=cfg)


def test_report_links_to_the_card_and_old_runs_regenerate(run_dir):
    assert "[model_card.md](model_card.md)" in (run_dir / "report.md").read_text()
    assert 'href="model_card.md"' in (run_dir / "report.html").read_text()
    first = (run_dir / "model_card.md").read_text()
    (run_dir / "model_card.md").unlink()  # an old run, from before cards: regenerate from the folder alone
    assert write_model_card(run_dir).read_text() == first
