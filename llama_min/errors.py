"""The project's one error type for mistakes a user can make (a bad file, flag, key or request).

`LlamaMinError` subclasses ValueError, so `except ValueError` keeps working for library callers.
Its message names the file, key or flag and what was expected; the command-line front ends print
it as one line (`error: ...`) and exit with code 2 (1 for environment failures).
"""

from __future__ import annotations


class LlamaMinError(ValueError):
    """A user-caused error: the message names the file/key/flag and what was expected."""


class EnvironmentFailure(LlamaMinError):
    """The machine, not the input, is at fault (no network, disk full, read-only folder): exit code 1."""
