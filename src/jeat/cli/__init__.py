"""The ``jeat`` command line: a thin layer over the Python API, one module per command (its
arguments and its run together; :mod:`jeat.cli.common` holds what they share).

Every problem the user can fix ends in one line ``jeat: error: ...`` and exit status 2: bad
input, and the machine refusing a write (a read-only or full disk, no permission: see
``docs/reliability.md``). A command that writes into a run folder holds it while it runs
(:mod:`jeat.locks`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from jeat.cli import (
    analyze,
    attack,
    certify,
    compare,
    generate,
    judge,
    listings,
    report,
    score,
    train,
)
from jeat.cli import eval as eval_
from jeat.distributed import from_env
from jeat.errors import WRITE_ERRNOS, JeatError, environment_failure

__all__ = ["main", "build_parser"]

COMMANDS = (
    train,
    eval_,
    attack,
    generate,
    analyze,
    report,
    compare,
    certify,
    judge,
    score,
    listings,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jeat",
        description="Robust and generative classifiers: train, attack, evaluate, generate.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--input-range -1,1`` as ``--input-range=-1,1``: argparse would read ``-1,1`` as an
    option, not as the value the documented spelling gives."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--input-range" and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"--input-range={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    from jeat.accel import tune_host_allocator

    tune_host_allocator()  # reuse freed host memory (opt out: JEAT_MALLOC=system)
    args.holds = contextlib.ExitStack()  # the run folders the command holds (_hold_outputs)
    try:
        with args.holds:
            code = int(args.func(args) or 0)
    except JeatError as exc:
        print(f"jeat: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except (OSError, RuntimeError) as exc:
        # a write that did not go through jeat.utils.atomic_write (TensorBoard's event files,
        # an appended log line) on a read-only or full disk: the same one line
        failure = environment_failure(exc, errnos=WRITE_ERRNOS)
        if failure is None:
            raise
        print(f"jeat: error: {failure}", file=sys.stderr)
        code = failure.exit_code
    except KeyboardInterrupt:
        print("jeat: interrupted; a training run continues with --resume", file=sys.stderr)
        code = 130
    try:
        launched = from_env().enabled
    except JeatError:  # a malformed layout: the command has already said so
        launched = False
    if launched:
        _leave_torchrun_process(code)
    return code


def _leave_torchrun_process(code: int) -> None:
    """End a process that torchrun started, skipping the interpreter's shutdown.

    With two gloo processes on the 2-core test machine, between one run in 5 and one in 50
    had a rank abort after its work was done, the process group destroyed and the files written
    (``terminate called without an active exception``, SIGABRT, from C++ code run while the
    interpreter shuts down, below every Python frame); torchrun then reported the job as
    failed and killed the other rank. Everything the command does is finished and flushed by
    now, so the process leaves with its own exit code at once."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
