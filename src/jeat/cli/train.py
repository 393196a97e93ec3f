"""``jeat train``: train a model, then its final steps (evaluation, samples, analysis, report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jeat.cli.common import (
    _BUDGET_KEYS,
    _builtin_config,
    _check_eps,
    _eps,
    _image_size_arg,
    _quoted,
)
from jeat.config import load_config
from jeat.data import dataset_slug
from jeat.errors import WRITE_ERRNOS, EnvironmentFailure
from jeat.userdata import parse_source


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """Turn shortcut flags into ``key=value`` overrides (explicit --set wins, coming last)."""
    pairs = [
        ("data.name", _quoted(args.dataset)),
        ("data.root", _quoted(args.data_dir)),
        ("data.image_size", args.image_size),
        ("model.name", args.model),
        ("objective.name", args.objective),
        ("epochs", args.epochs),
        ("seed", args.seed),
        ("device", args.device),
        ("batch_size", args.batch_size),
        ("optim.lr", args.lr),
    ]
    out = [f"{k}={v}" for k, v in pairs if v is not None]
    if args.dataset and parse_source(args.dataset) and _builtin_config(args.config):
        # the built-in configs' budgets belong to their own datasets: use the data's defaults
        out += [f"{k}=null" for k in _BUDGET_KEYS]
    if args.eps is not None:
        out += [f"objective.attack.eps={args.eps!r}", f"eval.eps={args.eps!r}"]
        out.append("objective.attack.step_size=null")
    if args.download:
        out.append("data.download=true")
    if args.quiet:
        out.append("progress=false")
    return out + list(args.set or [])


def cmd_train(args: argparse.Namespace) -> int:
    from jeat.finish import train_and_finish

    cfg = load_config(args.config, _train_overrides(args))
    if args.eps is not None:  # the L-inf budgets here; L2 ones once the images' size is known
        _check_eps(cfg.objective.attack.norm, args.eps)
        _check_eps(cfg.eval.norm, args.eps)
    out = Path(args.out or f"runs/{dataset_slug(cfg.data.name)}-{cfg.objective.name}-s{cfg.seed}")
    from jeat.distributed import from_env
    from jeat.runs import RunPaths

    try:
        result = train_and_finish(
            cfg, out, resume=args.resume, argv=["jeat", *sys.argv[1:]], stop_after=args.stop_after
        )
    except EnvironmentFailure as exc:
        if exc.errno not in WRITE_ERRNOS or not RunPaths(out).checkpoint.exists():
            raise
        raise EnvironmentFailure(
            f"{exc}; the last checkpoint is intact: continue with jeat train --out {out} --resume",
            exc.path,
            exc.errno,
        ) from None
    if from_env().is_main:
        print(f"run folder: {result.paths.root}")
    return 0


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model (then evaluate it and write samples)")
    t.add_argument("--config", help="YAML file or built-in name (default: digits-pgdat)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--out", help="run folder (default: runs/DATASET-OBJECTIVE-sSEED)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument(
        "--stop-after",
        type=int,
        metavar="EPOCH",
        help="stop once this epoch is checkpointed (same schedule; continue with --resume)",
    )
    t.add_argument("--dataset", help="a name from `jeat datasets`, folder:PATH or npz:PATH")
    t.add_argument("--model")
    t.add_argument("--objective")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument(
        "--eps",
        type=_eps,
        help="training and evaluation budget in [0,1] pixel units, e.g. 8/255 (default: the "
        "config's; for folder:/npz: data with a built-in config, 8/255)",
    )
    t.add_argument("--seed", type=int)
    t.add_argument("--device")
    t.add_argument("--data-dir")
    t.add_argument("--download", action="store_true", help="download missing dataset files")
    _image_size_arg(t)
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=cmd_train)
