"""Exceptions that carry a user-facing message.

The CLI turns any ``MmtardError`` into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""


class MmtardError(Exception):
    """Base class of every refusal the project makes on bad input."""


class ConfigError(MmtardError):
    """A configuration file, key or value is invalid."""


class DataError(MmtardError):
    """A dataset root, file or layout is missing or malformed."""


class ModelError(MmtardError):
    """A model name, weight file or architecture is unusable."""
