"""Errors a user sees as one line (what, where, got, expected), never as a traceback."""

import re

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def row_detail(e: BaseException, prefix: str = "") -> str:
    """Why one row failed, for its quarantine ``detail``: ``prefix + 'Type: first line'``, at most
    200 characters, without memory addresses (Pillow names a ``BytesIO`` by its ``repr``), so the
    same failure gives the same bytes in every run."""
    return _ADDRESS.sub("", f"{prefix}{type(e).__name__}: {e}").splitlines()[0][:200]


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
