"""User-facing errors.

Every problem a user can fix (bad input, unknown names, corrupt files, diverged
training) is raised as :class:`JeatError` with a one-line message that names the
problem and says what to do. The CLI prints it and exits with status 2.
"""

from __future__ import annotations


class JeatError(Exception):
    """An error caused by the user's input or environment, with an actionable message."""

    exit_code = 2
