"""The error for bad input that every layer raises: `ConfigError` (a config value, a file, a
command-line option). The CLI prints it as one line and exits 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value, key or file is wrong; the message names it and the fix."""
