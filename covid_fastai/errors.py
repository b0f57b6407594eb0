"""Errors a user can fix, typed, each carrying what is wrong (the path or value) and the fix.

Only the CLI turns them into one `error: ...` line (exit status 2); anything else is a bug and keeps its
traceback. A fix that is a library command carries it as a `Command`: the CLI spells it
`python -m covid_fastai resume RUN`, and Python callers read `resume('RUN')`.
"""
from __future__ import annotations

import shlex
from typing import NamedTuple

__all__ = ["Command", "UserError", "DataError", "RecipeError", "RunFolderError", "ModelFileError",
           "WeightsUnavailable", "RunInterrupted", "note_fix", "recipe_command", "MissingExtra", "first_line"]


class Command(NamedTuple):
    "A library command that fixes or continues something: `name` is the CLI command and the Python function."
    name: str
    args: tuple = ()
    options: tuple = ()  # (flag, value) pairs, e.g. (("data", "DIR"),)
    function: str = ""   # the Python function where its name is not the command's (`list` -> `list_recipes`)

    def __str__(self):  # the Python spelling
        opts = [f"{k}={v!r}" for k, v in self.options]
        return f"{self.function or self.name}({', '.join([*map(repr, map(str, self.args)), *opts])})"

    def shell(self) -> str:
        "As a shell runs it: `python -m covid_fastai NAME ARGS --opt VALUE` (the one shell spelling; the CLI's)."
        opts = [f"--{k}" if v is None or v is True else f"--{k} {shlex.quote(str(v))}" for k, v in self.options]
        return " ".join(["python -m covid_fastai", self.name, *(shlex.quote(str(a)) for a in self.args), *opts])


def recipe_command(name: str) -> Command:
    "Run recipe `name` again: `recipe NAME` in a shell, `run_recipe('NAME')` in Python."
    return Command("recipe", (name,), function="run_recipe")


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line: `problem` names the path or value,
    `fix` says what to do. In `fix`, `{command}` stands for `command`, spelt for whoever reads it."""

    def __init__(self, problem: str, fix: str = "", *, path=None, command: Command | None = None):
        self.problem, self.fix, self.path, self.command = problem, fix, path, command
        super().__init__(self.message())

    def message(self, spell=str) -> str:
        "The one line, with `command` spelt by `spell` (the CLI passes its shell spelling)."
        fix = self.fix.replace("{command}", f"`{spell(self.command)}`") if self.command is not None else self.fix
        return f"{self.problem}: {fix}" if fix else self.problem


class DataError(UserError):
    "A data folder, labels.csv or image that cannot be used as it is."


class RecipeError(UserError):
    "An unknown recipe, option or option value."


class RunFolderError(UserError):
    "A run or sweep folder that is missing, busy, finished or cannot be resumed."


class ModelFileError(UserError):
    "A run's model file that is missing, damaged or does not fit its recipe."


class WeightsUnavailable(UserError):
    "Pretrained weights were asked for but none of the sources could provide them."


class MissingExtra(UserError):
    "An optional package a command needs is not installed: names it and the extra of this package that brings it."

    def __init__(self, package: str, extra: str, what: str = ""):
        super().__init__(f"{what or 'this'} needs the package {package!r}, which is not installed",
                         f'pip install -e ".[{extra}]"')
        self.package, self.extra = package, extra


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run: the folder is marked `interrupted` (config.json) before this is raised.
    `fix` says how to go on, with `{command}` standing for `command` (`resume RUN`, or the recipe again when no
    epoch had finished), as in `UserError`."""

    def __init__(self, run_dir, epochs_done: int, fix: str, command: Command):
        self.run_dir, self.epochs_done, self.fix, self.command = run_dir, epochs_done, fix, command
        super().__init__(self.message())

    def message(self, spell=str) -> str:
        done = f" after {self.epochs_done} finished epoch(s)" if self.epochs_done else ""
        return f"{self.run_dir} is marked incomplete{done}; {self.fix.replace('{command}', f'`{spell(self.command)}`')}"


def note_fix(e: BaseException, fix: str, command: Command):
    """Add how to go on to an error passing through a caller (a sweep around a failed run). Python shows it as a
    note; the CLI prints it after the error line, with `{command}` spelt its way."""
    e.add_note(fix.replace("{command}", f"`{command}`"))
    e.fix_notes = [*getattr(e, "fix_notes", []), (fix, command)]


def first_line(e: BaseException) -> str:
    "An exception's first line (a parser's message can run over several), or its type name when it says nothing."
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
