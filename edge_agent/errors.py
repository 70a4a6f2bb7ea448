"""The one base of the errors a user can act on, and the exit codes every command line gives them.

An error of this family carries a message that says what was wrong and what to do; a command prints
it in one line, without a traceback, and exits with the error's ``exit_code``:

- 2 (``USAGE``): the command, its flags, its configuration or its inputs cannot work as given;
  nothing was changed (a space the teacher cannot hold, a study that cannot be resumed as asked);
- 1 (``FAILED``): the work started and could not go on (a measurement, a download, a training that
  diverged, a server that went away); what was done before is kept.

Any other exception is a fault of the tool itself, and its traceback is what to report.
"""

from __future__ import annotations

import sys

FAILED, USAGE = 1, 2


class UserError(Exception):
    """An error worded for the user; the command exits with ``exit_code``."""

    exit_code = FAILED


class UsageError(UserError):
    """The command cannot work as given; nothing was changed."""

    exit_code = USAGE


def fail(exc: BaseException, prefix: str = "error", code: int | None = None) -> int:
    """Print ``prefix: exc`` on stderr; return the exit code: ``code`` if given, else the error's own
    (``FAILED`` for an exception outside this family)."""
    print(f"{prefix}: {exc}", file=sys.stderr)
    if code is not None:
        return code
    return exc.exit_code if isinstance(exc, UserError) else FAILED
