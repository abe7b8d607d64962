"""Errors that users see.

``ResserveError`` is the base of every expected failure (bad input, missing data, a refused
file). The CLI prints its message as one line and exits non-zero; anything else is a bug.
"""


class ResserveError(Exception):
    """An expected failure with a message written for the user."""

    exit_code: int = 1
