"""Errors a user sees as one line (what, where, got, expected), never as a traceback."""


class MMPipeError(Exception):
    """Base for errors the CLI prints as one line and exits non-zero on."""


class ConfigError(MMPipeError, ValueError):
    """A config file, key or value is wrong."""


class InputError(MMPipeError, ValueError):
    """An input (manifest, artifact, column) is missing or malformed."""


class AccountingError(MMPipeError, AssertionError):
    """A stage lost, duplicated or invented rows: kept + quarantined != input."""


class LeakageError(MMPipeError, AssertionError):
    """A split shares content, near-duplicate clusters or groups between train, val and test."""
