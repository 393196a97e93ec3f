"""One writer per folder: an exclusive lock on ``FOLDER/.lock`` while a command writes there.

:func:`hold_folder` creates the folder when needed, takes an exclusive ``fcntl.flock`` on
``FOLDER/.lock`` and writes the holder into it (pid, host, start time, command). Another
process that asks for the folder gets :class:`FolderBusy` at once, naming the holder (or, with
``wait=True``, waits its turn: the judge cache). The kernel drops a flock when the process that
holds it ends, however it ends (SIGKILL included), so the lock file a killed process leaves
behind never blocks anyone: the next process takes it over. Holding is re-entrant within a
process (``jeat train`` holds its run folder across the loop and the final steps, and the loop
takes it again). On release the lock file is removed, and so are the folders the hold created
when they are empty again (a run that failed before its first file).

Who holds what: ``jeat train`` (:func:`jeat.train.train`, :func:`jeat.finish.train_and_finish`)
the run folder, rank 0 alone under torchrun; the judge's training its cache folder; ``eval``,
``attack``, ``generate``, ``analyze``, ``report``, ``certify``, ``score`` and ``compare`` the run
folder they write into (:func:`jeat.runs.run_folder_of`).

Where ``fcntl`` does not exist (Windows) folders are not locked.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jeat.errors import JeatError, environment_failure

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "FolderBusy", "hold_folder", "holder"]

LOCK_NAME = ".lock"


class FolderBusy(JeatError):
    """Another process holds the folder's lock."""


@dataclass
class _Hold:
    fd: int | None  # None: the file system would not lock (see _lock)
    count: int = 1


_HELD: dict[str, _Hold] = {}  # realpath of a folder this process holds -> its hold


def _command() -> str:
    argv = list(sys.argv) or ["python"]
    head = Path(argv[0]).name
    if head in ("cli.py", "__main__.py") and "jeat" in argv[0]:
        head = "jeat"  # python -m jeat.cli ...
    text = " ".join([head, *argv[1:]])
    return text if len(text) <= 160 else text[:157] + "..."


def holder(folder: str | os.PathLike) -> dict:
    """What the lock file of ``folder`` says about its holder (or last holder): ``pid``,
    ``host``, ``since``, ``command``; empty when there is no readable lock file."""
    try:
        text = (Path(folder) / LOCK_NAME).read_text()
        info = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict) -> str:
    if not info.get("pid"):
        return "a process that is starting"
    text = f"pid {info['pid']}"
    if info.get("host") and info["host"] != socket.gethostname():
        text += f" on {info['host']}"
    if info.get("since"):
        text += f" since {info['since']}"
    if info.get("command"):
        text += f": {info['command']}"
    return text


def _missing(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    out = []
    p = folder.absolute()
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:  # deepest first; stops at the first that is not empty
        try:
            d.rmdir()
        except OSError:
            return


def _same_file(fd: int, path: Path) -> bool:
    """Is the open ``fd`` still the file at ``path`` (and not one its last holder removed)?"""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _lock(folder: Path, wait: bool, hint: str) -> int | None:
    """Open ``folder/.lock`` and flock it; the fd, or None where the file system cannot lock."""
    path = folder / LOCK_NAME
    told = False
    while True:
        folder.mkdir(parents=True, exist_ok=True)  # again: a holder may have just removed it
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _describe(holder(folder))
                if not wait:
                    raise FolderBusy(
                        f"{folder} is in use by another jeat process ({info}); "
                        f"{hint or 'wait for it to end'}"
                    ) from None
                if not told:
                    print(f"waiting for {folder}, in use by {info}", file=sys.stderr, flush=True)
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                print(
                    f"jeat: note: the file system of {folder} cannot lock files ({exc.strerror});"
                    " nothing stops another jeat process from writing into it at the same time",
                    file=sys.stderr,
                )
                os.close(fd)
                return None
            if _same_file(fd, path):
                stamp = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": _command(),
                }
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(stamp) + "\n").encode(), 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its holder removed that file on release: lock the new one


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, wait: bool = False, hint: str = "") -> Iterator[Path]:
    """Hold ``folder`` (created when missing) for this process while the block runs.

    Raises :class:`FolderBusy` (``hint`` ends its message: what to do instead) when another
    process holds it, unless ``wait``; :class:`jeat.errors.EnvironmentFailure` when the folder
    or its lock file cannot be written (a read-only or full disk, no permission)."""
    folder = Path(folder)
    created = _missing(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(folder)
        held = _HELD.get(key)
        if held is None:
            fd = _lock(folder, wait, hint) if fcntl is not None else None
    except BaseException as exc:
        _remove_empty(created)
        failure = environment_failure(exc, folder / LOCK_NAME)
        if failure is None or isinstance(exc, JeatError) or not isinstance(exc, Exception):
            raise
        raise failure from None
    if held is not None:  # this process holds it already
        held.count += 1
        try:
            yield folder
        finally:
            held.count -= 1
        return
    _HELD[key] = hold = _Hold(fd)
    try:
        yield folder
    finally:
        del _HELD[key]
        if hold.fd is not None:
            with contextlib.suppress(OSError):
                # removed before it is unlocked: a process that opened it meanwhile sees, once
                # it has the lock, that it is no longer the file at the path, and starts again
                os.unlink(folder / LOCK_NAME)
            os.close(hold.fd)
        _remove_empty(created)
