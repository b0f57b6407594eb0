"""Progress of the steps around training (covid_fastai.progress): plain start/end lines per phase in logs and pipes,
a fastprogress bar with an ETA where output is interactive."""
import re

from covid_fastai.progress import phase, phase_lines

PHASES = ["pre-scan: decode each of 48 images once", "decode cache: decode and resize each of 36 images once",
          "feature cache: ", "fit: 1 epoch(s)", "predict the test split",
          "predict the valid split", "plots and Grad-CAM grids", "metrics with bootstrap 95% CIs"]


def test_a_piped_run_prints_each_phase_as_it_starts_and_ends(labelled_run):
    lines = [ln for ln in labelled_run[1].splitlines() if ln.strip()]  # a StringIO: not a tty
    events = [(m.group(1), m.group(2)) for ln in lines if (m := re.match(r"(.+): (started|done in [\d.]+ s)$", ln))]
    assert len(events) == 2 * len(PHASES), lines
    for i, name in enumerate(PHASES):  # each phase starts, then ends, before the next one starts
        (n1, e1), (n2, e2) = events[2 * i], events[2 * i + 1]
        assert n1.startswith(name) and n1 == n2 and e1 == "started" and e2.startswith("done in"), (name, events)
    fit_start, fit_end = (lines.index(f"{PHASES[3]}: {e}") for e in ("started", events[7][1]))
    assert any(ln.startswith("epoch 0 ") for ln in lines[fit_start:fit_end]), "the epoch line sits inside the fit"
    assert not any("%" in ln and "|" in ln for ln in lines), "no redrawn bar in a pipe"


def test_phase_draws_a_fastprogress_bar_when_interactive(capsys):
    with phase("decoding", total=4, interactive=True) as ph:
        for _ in ph(range(4)): pass
    out = capsys.readouterr().out
    assert "100.00% [4/4 " in out and "decoding" in out and "<" in out  # fastprogress: elapsed<remaining (ETA)
    assert "started" not in out  # a bar, not log lines


def test_phase_lines_only_inside_a_run_when_not_interactive(capsys):
    with phase("quiet", total=2, interactive=False) as ph: ph.step(2)
    assert capsys.readouterr().out == ""  # outside a run (e.g. `evaluate`), piped output stays one summary line
    with phase_lines():
        try:
            with phase("broken", interactive=False): raise ValueError
        except ValueError:
            pass
    assert re.fullmatch(r"broken: started\nbroken: stopped \(ValueError\) in [\d.]+ s\n", capsys.readouterr().out)
