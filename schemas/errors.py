"""The line between a user's mistake and a bug, as the command line reports it.

`UserError` (and its subclasses: a bad checkpoint, INPUT, OUTPUT, plan, option, ...) is something the user
can fix: `fiqa` prints its message as one line and exits with status 2. Any other exception is a bug: `fiqa`
lets its traceback show and exits with status 1, so that a report carries what is needed to fix it.

`StallError` is a scoring run that stopped making progress: one line, exit status 1 (rerunning resumes
it). It lives here, not with the scoring code, so that the command line can catch it without importing
torch (650 MB and seconds) for commands that never score.

`UserError` subclasses ValueError so that callers of the Python API who caught ValueError for bad
arguments keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix (an argument, a file, a setting): one line, exit status 2."""


class StallError(RuntimeError):
    """No scored batch arrived for longer than the stall timeout: the run is failed, not left hanging."""
