"""Errors a user can fix. A script prints one line `error: <message>` and exits with status 2
(cli.run_cli); the message names the file and line, the flag, the path or the URL, and what is
wrong."""

from __future__ import annotations

TRACEBACK_ENV = "POSTTRAIN_TRACEBACK"  # set to 1 to see the full traceback of a UserError


class UserError(Exception):
    """Input a user can fix (data, a flag, a path, an unreachable server): scripts print one line
    and exit 2."""


class DataError(UserError, ValueError):
    """Bad input data; the message names file:line and field."""


class ConfigError(UserError, ValueError):
    """A flag value, or a combination of flags, that cannot work; the message names the flag."""


class MissingError(UserError, FileNotFoundError):
    """A model, adapter, checkpoint or data path that is not there; the message names it and how to
    make it."""


class DiskError(UserError, OSError):
    """An output that cannot be written (disk full, read-only, no permission); the message names
    the path, and what was there before is intact."""


class NonFiniteError(UserError, FloatingPointError):
    """The loss or the gradient stayed non-finite for several steps in a row; the last checkpoint is
    intact."""
