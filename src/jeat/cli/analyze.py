"""``jeat analyze``: the energy landscape of one or several models, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from jeat.cli.common import (
    _check_eps,
    _data_args,
    _eps,
    _hold_outputs,
    _load_source,
    _model_args,
    _out_base,
)
from jeat.errors import JeatError


def cmd_analyze(args: argparse.Namespace) -> int:
    from jeat.finish import final_analysis

    runs: dict = {}
    data = None
    sources = [*args.runs, *([args.model_source] if args.model_source else [])]
    if not sources:
        raise JeatError("name at least one model: run folders or checkpoints, or --model SOURCE")
    if args.weights and len(sources) > 1:
        raise JeatError("--weights goes with one model; analyse a factory model on its own")
    for run in sources:
        model, meta, cfg, run_data = _load_source(args, run, args.dataset)
        if data is None:
            data = run_data
        elif tuple(run_data.info.shape) != tuple(data.info.shape):
            raise JeatError(
                f"{run} was trained on {meta['dataset']}, whose images differ from "
                f"{data.info.name}'s; analyse runs of one dataset together"
            )
        path = Path(run)
        name = (path if path.is_dir() else path.parent).name or str(path)
        while name in runs:
            name += "'"
        runs[name] = (model, cfg)
    assert data is not None
    if args.eps is not None:
        _check_eps("linf", args.eps)
    args.run = sources[0]
    out = _out_base(args, "analysis")
    _hold_outputs(args, out)
    result = final_analysis(
        runs,
        data,
        out,
        n=args.n,
        grid=args.grid,
        samples_per_class=args.samples_per_class,
        eps=args.eps,
        seed=args.seed,
    )
    print(result.table())
    print(f"wrote {out}/ ({', '.join(sorted(result.files))})")
    return 0


def add_parser(sub) -> None:
    an = sub.add_parser("analyze", help="energy landscape of one or several runs, side by side")
    an.add_argument("runs", nargs="*", help="run folders or checkpoints (same dataset)")
    _model_args(an)
    an.add_argument("--n", type=int, help="test images (default: the run's analysis.n, 64)")
    an.add_argument("--eps", type=_eps, help="L-inf budget, e.g. 8/255 (default: the run's)")
    an.add_argument("--grid", type=int, help="contour points per axis (default 21)")
    an.add_argument(
        "--samples-per-class",
        type=int,
        help="generated images per class in the histograms (0: none; default 4)",
    )
    an.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    an.add_argument("--out", help="output folder (default: FIRST_RUN/analysis)")
    _data_args(an, device="auto")
    an.set_defaults(func=cmd_analyze)
