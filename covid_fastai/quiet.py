"""fastai's import calls torch.jit.script, which torch 2.14 deprecates with a FutureWarning on every command.

`fastai_import_quiet()` holds one filter for that warning while the package imports fastai (its lazy names, the
CLI's commands) and takes it off again after: the process's filters stay as they were (a user's own
torch.jit.script still warns), and those fastai and torch add meanwhile stay in place.
"""
from __future__ import annotations

import contextlib
import re
import warnings

__all__ = ["fastai_import_quiet"]

_JIT_DEPRECATION = ("ignore", re.compile(r".*torch\.jit\.script.*is deprecated", re.I), FutureWarning, None, 0)


@contextlib.contextmanager
def fastai_import_quiet():
    "The jit deprecation filter for the block's duration; comes off however the block ends (a broken extra too)."
    added = _JIT_DEPRECATION not in warnings.filters
    if added: warnings.filters.insert(0, _JIT_DEPRECATION)
    try: yield
    finally:
        if added and _JIT_DEPRECATION in warnings.filters: warnings.filters.remove(_JIT_DEPRECATION)
