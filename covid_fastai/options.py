"""Command-line values read by type: a field's annotation says what a value must be, so the checks live on the field.

`Recipe`'s fields (covid_fastai.recipes) are annotated with plain types (`bool`, `int`, `float`, `str`, `X | None`,
`Literal[...]`) and, where a type is not enough, `Annotated[type, rule, ...]`: `POSITIVE` (> 0), `in_range(lo, hi)`,
`at_least(lo, why)`, `one_of(registry)`, or any function `(key, value, raw) -> value`. `parse_value(key, value, hint)`
reads a string (`'3'`, `'false'`, `'none'`) into what the field holds, or raises one `RecipeError` naming `--key`.
"""
from __future__ import annotations

import math
import types
import typing
from typing import Annotated, Literal, Union, get_args, get_origin

from .errors import RecipeError

__all__ = ["to_bool", "POSITIVE", "FIXED", "in_range", "at_least", "one_of", "parse_value", "field_hints"]


def to_bool(key: str, v) -> bool:
    "True/False from a bool or a word (1/true/yes/on, 0/false/no/off/none); `key` names the option in the error."
    if isinstance(v, bool): return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"): return True
    if s in ("0", "false", "no", "off", "none"): return False
    raise RecipeError(f"--{key} must be true or false, got {v!r}")


def _positive(key, v, raw):
    if not v > 0: raise RecipeError(f"--{key} must be a positive {_noun(v)}, got {raw!r}")
    return v


POSITIVE = _positive  # a number > 0
FIXED = object()      # marks a field only a recipe file sets (no command-line override)


def _noun(v) -> str: return "whole number" if isinstance(v, int) else "number"


def in_range(lo: float, hi: float = math.inf):
    "A number with lo <= value < hi."
    def _in_range(key, v, raw):
        if not lo <= v < hi: raise RecipeError(f"--{key} out of range: {raw!r}")
        return v
    return _in_range


def at_least(lo: float, why: str = ""):
    "A number >= lo; `why` says what lo means."
    def _at_least(key, v, raw):
        if v < lo:
            raise RecipeError(f"--{key} must be at least {lo:g}" + (f" ({why})" if why else "") + f", got {raw!r}")
        return v
    return _at_least


def one_of(registry, aliases: dict | None = None):
    """A name among `registry()`'s keys (a zero-argument function, so a registry is imported only when an override is
    checked); `aliases` maps former names to current ones, accepted but not listed."""
    def _one_of(key, v, raw):
        names, v = sorted(registry()), (aliases or {}).get(str(v), str(v))
        if v not in names: raise RecipeError(f"--{key} must be one of {', '.join(names)}, got {raw!r}")
        return v
    return _one_of


def _unwrap(hint) -> tuple:
    "(base type, optional, rules) of a field annotation."
    optional, rules = False, []
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        optional, hint = len(args) < len(get_args(hint)), args[0]
    if get_origin(hint) is Annotated:
        hint, *rules = get_args(hint)
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        rules.insert(0, one_of(lambda: choices))
        hint = str
    return hint, optional, rules


def parse_value(key: str, v, hint):
    "`v` (a string from the command line, or a value) as field type `hint` requires; `RecipeError` otherwise."
    base, optional, rules = _unwrap(hint)
    raw = v
    if optional and (v is None or str(v).strip().lower() == "none"): return None
    if base is bool: v = to_bool(key, v)
    elif base in (int, float):
        try: v = base(str(v))
        except ValueError:
            kind = f"{'positive ' if POSITIVE in rules else ''}{'whole number' if base is int else 'number'}"
            raise RecipeError(f"--{key} must be a {kind}, got {v!r}") from None
    elif base is str: v = str(v)
    for rule in rules:
        if rule is not FIXED: v = rule(key, v, raw)
    return v


def field_hints(cls) -> dict:
    "{field name: annotation with its rules} of a dataclass (annotations written as strings resolved)."
    return typing.get_type_hints(cls, include_extras=True)
