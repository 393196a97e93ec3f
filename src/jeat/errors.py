"""User-facing errors.

Every problem a user can fix (bad input, unknown names, corrupt files, diverged training) is
raised as :class:`JeatError` with a one-line message that names the problem and says what to
do. So is every failure of the machine under a file jeat writes (a read-only or full disk, a
folder without write permission): :class:`EnvironmentFailure`, made from the ``OSError`` by
:func:`environment_failure` at the one place where files are written
(:func:`jeat.utils.atomic_write`). The CLI prints either as one line and exits with status 2
(see ``docs/reliability.md``); a traceback (exit 1) is a bug in jeat.
"""

from __future__ import annotations

import errno
import os

__all__ = ["JeatError", "EnvironmentFailure", "environment_failure", "WRITE_ERRNOS"]


class JeatError(Exception):
    """An error caused by the user's input or environment, with an actionable message."""

    exit_code = 2


class EnvironmentFailure(JeatError):
    """The machine refused to write a file: ``path`` is the file, ``errno`` the reason."""

    def __init__(self, message: str, path: str | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = code


# errno -> (what happened, what to do)
_ENVIRONMENT: dict[int, tuple[str, str]] = {
    errno.EROFS: ("the file system is read-only", "choose a folder on a writable disk"),
    errno.ENOSPC: ("no space left on the device", "free some space or choose another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another disk"),
    errno.EFBIG: ("file too large for this file system or limit", "choose another disk"),
    errno.EACCES: ("permission denied", "choose a folder you can write to"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to"),
    errno.ENOENT: ("a folder on its path does not exist", "create it or choose another path"),
    errno.ENOTDIR: ("a part of its path is a file, not a folder", "choose another path"),
    errno.EISDIR: ("it is a folder", "give a file name"),
}


# the errnos that only a write can raise: a failure with one of them is the disk's, wherever it
# surfaces (the others, such as EACCES, also come from reading, so they count only where jeat
# creates, renames or locks a file of its own)
WRITE_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def environment_failure(
    exc: BaseException,
    path: str | os.PathLike | None = None,
    errnos: frozenset[int] | None = None,
) -> EnvironmentFailure | None:
    """The :class:`EnvironmentFailure` behind ``exc``, or None when the machine is not to blame.

    Looks through ``exc`` and the exceptions it was raised from or during (``torch.save`` on a
    full disk raises ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``
    during the ``OSError: [Errno 28]`` of the file's ``write``) for an ``OSError`` with one of
    ``errnos`` (default: all of the table above); ``path`` (default: the ``OSError``'s file
    name) is the file named."""
    kinds = _ENVIRONMENT.keys() if errnos is None else errnos
    if isinstance(exc, EnvironmentFailure):
        return exc
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in kinds and e.errno in _ENVIRONMENT:
            what, advice = _ENVIRONMENT[e.errno]
            name = os.fspath(path) if path is not None else e.filename
            where = f"cannot write {name}" if name else "cannot write a file"
            return EnvironmentFailure(f"{where}: {what}; {advice}", name, e.errno)
        todo += [e.__cause__, e.__context__]
    return None
