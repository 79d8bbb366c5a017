"""The error for bad input that every layer raises: `ConfigError` (a config value, a file, a
command-line option), and `short_repr` for the bad value it names. The CLI prints it as one
line and exits 2."""

from __future__ import annotations

import reprlib


class ConfigError(ValueError):
    """A configuration value, key or file is wrong; the message names it and the fix."""


SHORT_REPR = 120  # characters of a bad value an error message shows at most
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring = 2, 4, 4, 60


def short_repr(value: object) -> str:
    """`repr(value)` cut to SHORT_REPR characters for an error message: a bad value may be a
    long text or a huge nested list, which would bury the message (or, printed whole,
    exhaust memory)."""
    text = _SHORT.repr(value)
    return text if len(text) <= SHORT_REPR else text[: SHORT_REPR - 3] + "..."
