"""Where a recipe's training epoch goes, phase by phase (not a test):
python bench/fit_phases.py [RECIPE] [--data DIR] [--set KEY=VALUE ...] -> bench/results-fit-phases.md

Runs the recipe as `recipe` does (its plan, policy, callbacks, bf16 and channels-last), for one epoch by default,
with one more fastai callback that reads the clock at every batch event of the training batches. It sits last in
each event, so each phase holds the callbacks that run before it in that event:
- load: the training loader's next batch (and the batch's `before_batch` callbacks: channels-last, autocast);
- forward: `model(*xb)`; loss: the loss function; backward; step: the optimizer step;
- after: `zero_grad` and every `after_batch` callback (metrics, recorder, throughput, progress).
The step benchmark (bench/levers.py) times forward + backward + step alone; this shows what a real fit adds.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict

from bench import DATA, ROOT, append_results, command_line, machine

OUT = ROOT / "bench" / "results-fit-phases.md"
PHASES = {"before_batch": "load", "after_pred": "forward", "after_loss": "loss", "after_backward": "backward",
          "after_step": "step", "after_batch": "after"}  # the event that ends each phase


def phase_timer():
    "A fastai callback that sums, per phase, the seconds of the training batches (validation is not counted)."
    from fastai.callback.core import Callback

    class PhaseTimer(Callback):
        order = 10_000  # last in every event
        run_valid = False

        def before_fit(self): self.seconds, self.batches, self.images = defaultdict(float), 0, 0

        def before_train(self): self.t = time.perf_counter()

        def _mark(self, event):
            now = time.perf_counter()
            self.seconds[PHASES[event]] += now - self.t
            self.t = now

        def before_batch(self): self._mark("before_batch")
        def after_pred(self): self._mark("after_pred")
        def after_loss(self): self._mark("after_loss")
        def before_backward(self): self.t = time.perf_counter()  # nothing runs between after_loss and here
        def after_backward(self): self._mark("after_backward")
        def after_step(self): self._mark("after_step")

        def after_batch(self):
            self._mark("after_batch")
            self.batches += 1
            self.images += len(self.learn.yb[0])

    return PhaseTimer()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", nargs="?", default="best")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--set", action="append", default=[])  # KEY=VALUE recipe overrides; epochs=1 unless set
    p.add_argument("--label", default="")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    from covid_fastai.callbacks import cpu_kind
    from covid_fastai.train import run_recipe
    overrides = {"epochs": "1", "tta": "false", **dict(kv.split("=", 1) for kv in a.set)}
    timer = phase_timer()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fit-phases-") as out:
        run_recipe(a.recipe, out=out, cbs=[timer], data=a.data, **overrides)
    wall = time.perf_counter() - t
    total = sum(timer.seconds.values())
    rows = [f"| {ph} | {timer.seconds[ph]:.1f} | {1000 * timer.seconds[ph] / timer.batches:.0f} | "
            f"{timer.seconds[ph] / total:.0%} |" for ph in PHASES.values()]
    append_results(a.out, [
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: `{a.recipe}`", "",
        f"CPU kind `{cpu_kind()}`{f' ({a.label})' if a.label else ''}. {machine()}.", "",
        command_line("bench/fit_phases.py", argv, a.label), "",
        f"Overrides: {', '.join(f'{k}={v}' for k, v in overrides.items())}. Training batches: {timer.batches} "
        f"({timer.images} images) in {total:.1f} s, {timer.images / total:.1f} img/s; the whole run (start, "
        f"validation, evaluation, plots) {wall:.0f} s.", "",
        "| phase | seconds | ms per batch | share |", "|---|---|---|---|", *rows, ""])
    return timer


if __name__ == "__main__":
    main()
