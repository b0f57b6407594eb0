"""One exception type for problems a user can fix.

The CLI prints such an error as a single line (``error: ...``) and exits with status 2; anything
else is a bug and keeps its traceback. Messages name the offending path or value and the fix.
"""

__all__ = ["UserError", "WeightsUnavailable"]


class UserError(Exception):
    "A problem with the user's input or environment, explained in one line."


class WeightsUnavailable(UserError):
    "Pretrained weights were asked for but none of the sources could provide them."
