"""``jeat compare``: runs (or a study folder) side by side on one HTML page."""

from __future__ import annotations

import argparse

from jeat.cli.common import _csv, _hold_outputs


def cmd_compare(args: argparse.Namespace) -> int:
    from jeat.compare import compare

    labels = _csv(args.labels) if args.labels else None
    _hold_outputs(args, args.out)
    out = compare(args.runs, args.out, args.allow_mixed, labels, args.reanalyze, args.device)
    print(f"wrote {out}")
    return 0


def add_parser(sub) -> None:
    cmp = sub.add_parser("compare", help="runs (or a study folder) side by side on one HTML page")
    cmp.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or one study folder")
    cmp.add_argument(
        "--out", help="HTML file (default: compare.html here; STUDY/compare.html for a study)"
    )
    cmp.add_argument(
        "--allow-mixed", action="store_true", help="compare runs of different datasets"
    )
    cmp.add_argument("--labels", help="comma list of names for the runs (default: folder names)")
    cmp.add_argument(
        "--reanalyze",
        action="store_true",
        help="analyse the energy landscapes again, together on the same images (default: "
        "each run's saved analysis/)",
    )
    cmp.add_argument("--device", default="cpu", help="device of --reanalyze (default cpu)")
    cmp.set_defaults(func=cmd_compare)
