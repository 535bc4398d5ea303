"""The one exception family for mistakes a user can fix (bad input, bad settings).

``python -m data.prepare`` prints these as a single ``error: ...`` line and exits with 2;
anything else is a bug and keeps its traceback.
"""


class DataError(ValueError):
    """A user-fixable problem; the message names the bad value and what would be right."""
