"""``jeat report``: one self-contained HTML page for a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from jeat.cli.common import _hold_outputs


def cmd_report(args: argparse.Namespace) -> int:
    from jeat.report import write_report

    _hold_outputs(args, Path(args.out) if args.out else Path(args.run) / "report.html")
    print(f"wrote {write_report(args.run, args.out)}")
    return 0


def add_parser(sub) -> None:
    rep = sub.add_parser("report", help="one self-contained HTML page for a run")
    rep.add_argument("run", help="run folder")
    rep.add_argument("--out", help="HTML file (default: RUN/report.html)")
    rep.set_defaults(func=cmd_report)
