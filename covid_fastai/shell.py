"""How the CLI meets the shell: strict argument checks before fire runs a command, typed errors as one line,
Ctrl-C/SIGTERM as an interrupted (resumable) run, our warnings as one line each.

`fire_command(component, argv)` is what `python -m covid_fastai` and a recipe file run with python call. A
`UserError` prints `error: ...` (exit 2), with any command in its fix spelt as a shell runs it (`Command.shell`);
`RunInterrupted` prints `interrupted: ...` (exit 130); `--debug` keeps the traceback instead.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import re
import signal
import sys
import typing
import warnings

import fire

from .errors import Command, RecipeError, RunInterrupted, UserError
from .options import parse_value
from .quiet import fastai_import_quiet

__all__ = ["spell", "bools_by_type", "fire_command"]

spell = Command.shell  # the one shell spelling of a library command


def bools_by_type(fn):
    """Read a command's options annotated `bool` (or `bool | None`) as `true`/`false` words: fire passes
    `--export false` as the string 'false'."""
    @functools.wraps(fn)
    def typed(*args, **kwargs):
        hints, bound = typing.get_type_hints(fn), inspect.signature(fn).bind(*args, **kwargs)
        for k, v in bound.arguments.items():
            if hints.get(k) in (bool, bool | None): bound.arguments[k] = parse_value(k, v, hints[k])
        return fn(*bound.args, **bound.kwargs)
    return typed


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt  # `kill` stops a run the way Ctrl-C does: run folder marked, resumable


def _one_line_warnings():
    "Our own warnings (skipped files) as one `warning: ...` line on stderr; others as Python shows them."
    show = warnings.showwarning
    if getattr(show, "covid_fastai", False): return  # installed already (main called again in one process)

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if category.__name__ == "SkippedImagesWarning": print(f"warning: {message}", file=sys.stderr, flush=True)
        else: show(message, category, filename, lineno, file, line)
    showwarning.covid_fastai = True
    warnings.showwarning = showwarning


def _check_args(fn, args, what: str, help: Command | None = None):
    """Refuse options and arguments `fn` does not take, before it runs: fire would call it with what it can use
    and only then fail on the rest, after the work was done (a CSV written at the wrong threshold)."""
    params = inspect.signature(fn).parameters
    kinds = {p.kind for p in params.values()}
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    is_flag = re.compile(r"^--?[A-Za-z_]").match  # as fire reads them: `-3` is a value, `-key` a flag
    flags, positional, i = [], [], 0
    while i < len(args):  # fire's reading: `--key value`, `--key=value`, or a bare `--key` (true)
        a = str(args[i])
        if is_flag(a):
            flags.append(a.lstrip("-").split("=", 1)[0].replace("-", "_"))
            if "=" not in a and i + 1 < len(args) and not is_flag(str(args[i + 1])): i += 1
        else: positional.append(a)
        i += 1
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        for k in flags:
            if k not in named:
                close = difflib.get_close_matches(k, named, n=2)
                opts = ", ".join("--" + n for n in named if params[n].default is not params[n].empty) or "none"
                raise RecipeError(f"unknown option --{k} for {what}" +
                                (f" (did you mean {', '.join('--' + c for c in close)}?)" if close else f": options are {opts}"))
    free = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in flags]
    if inspect.Parameter.VAR_POSITIONAL not in kinds and len(positional) > len(free):
        raise RecipeError(f"unexpected argument {positional[len(free)]!r} for {what}",
                          ("{command}" if help else "`--help`") + " shows what it takes", command=help)


def _check_command(component, argv):
    "A misspelt command or an option a command does not take: one line, before anything runs."
    if not argv or any(a in ("--help", "-h") for a in map(str, argv)): return  # fire lists commands / shows help
    if not isinstance(component, type):
        return _check_args(component, argv, "this recipe file")
    commands = [n for n, v in vars(component).items() if callable(v) and not n.startswith("_")]
    if str(argv[0]) not in commands:
        close = difflib.get_close_matches(str(argv[0]), commands, n=2)
        raise RecipeError(f"unknown command {argv[0]!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                        + f": commands are {', '.join(commands)}")
    name = str(argv[0])
    _check_args(getattr(component(), name), argv[1:], name, Command(name, options=(("help", None),)))  # bound: no self


def fire_command(component, argv):
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    import matplotlib
    matplotlib.use("Agg")  # the commands write plots to files; they never open a window
    _one_line_warnings()
    try: old = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    except ValueError: old = None  # not the main thread: leave signals alone
    try:
        _check_command(component, argv)
        with fastai_import_quiet(): fire.Fire(component, command=argv, name="covid_fastai")  # commands import fastai
    except UserError as e:
        if debug: raise
        print(f"error: {e.message(spell)}", file=sys.stderr)
        for fix, command in getattr(e, "fix_notes", []): print(fix.replace("{command}", f"`{spell(command)}`"), file=sys.stderr)
        sys.exit(2)
    except RunInterrupted as e:  # the library marked the run folder and says how to go on
        if debug: raise
        print(f"interrupted: {e.message(spell)}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        if debug: raise
        sys.exit(130)  # the shell's code for Ctrl-C; the run folder says what happened
    finally:
        if old is not None: signal.signal(signal.SIGTERM, old)
