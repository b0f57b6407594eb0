"""Progress of the steps around training (pre-scan, feature cache, evaluation, bootstrap, plots), one mechanism.

`phase(name, total)` is a context manager: in a terminal or a notebook it draws a fastprogress bar with an ETA
over the phase's `total` steps (as fastai draws epochs); in a log or pipe, inside a run (`phase_lines`), it
prints one plain line as the phase starts and one as it ends, with its seconds, beside the per-epoch lines
(`callbacks.plain_epoch_log`). Outside a run, piped output stays quiet (commands such as `evaluate` print one
summary line). Steps: `ph.step()` after each one, or iterate `ph(iterable)`.

    with phase("pre-scan: decode each image once", total=len(files)) as ph:
        for f in ph(files): ...
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import time

__all__ = ["phase", "phase_lines", "interactive"]

_LINES = contextvars.ContextVar("covid_fastai_phase_lines", default=False)


def interactive() -> bool:
    "Whether redrawn bars read well here: stdout is a terminal, or this runs in a notebook (whose stdout is no tty)."
    isatty = getattr(sys.stdout, "isatty", None)
    if callable(isatty) and isatty(): return True
    from fastprogress.core import in_notebook
    return in_notebook()


@contextlib.contextmanager
def phase_lines(on: bool = True):
    "Within this context (a run), phases in non-interactive output print their start and end lines."
    token = _LINES.set(on)
    try: yield
    finally: _LINES.reset(token)


class phase:
    """One step around training. `total`: its number of steps (images, batches, plots) for a bar with an ETA; None
    for a step with no count (no bar; its lines still print). `interactive`: draw the bar (default: `interactive()`)."""

    def __init__(self, name: str, total: int | None = None, interactive: bool | None = None):
        self.name, self.total, self.interactive = name, total, interactive
        self.done, self.bar = 0, None

    def __enter__(self):
        bars = interactive() if self.interactive is None else self.interactive
        self.lines = not bars and _LINES.get()
        self.t0 = time.perf_counter()
        if self.lines: print(f"{self.name}: started", flush=True)
        if bars and self.total:
            from fastprogress.fastprogress import progress_bar  # the notebook or console bar, as fastai's
            self.bar = progress_bar(range(self.total), total=self.total)
            self.bar.comment = self.name  # shown after the ETA (the console bar takes no `comment` argument)
            self.bar.update(0)
        return self

    def step(self, n: int = 1):
        "`n` more steps done."
        self.done += n
        if self.bar is not None: self.bar.update(min(self.done, self.total))

    def __call__(self, iterable):
        "The items of `iterable`, one step each."
        for o in iterable:
            yield o
            self.step()

    def __exit__(self, exc_type, exc, tb):
        if self.bar is not None:
            if self.done < self.total and exc_type is None: self.bar.update(self.total)  # fewer steps than announced
            if not _notebook_bar(self.bar): print(flush=True)  # the console bar ends its line with '\r' only
        if self.lines:
            how = "done" if exc_type is None else f"stopped ({exc_type.__name__})"
            print(f"{self.name}: {how} in {time.perf_counter() - self.t0:.1f} s", flush=True)
        return False


def _notebook_bar(bar) -> bool:
    return type(bar).__name__.startswith("NB")
