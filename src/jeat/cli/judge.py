"""``jeat judge train``: train and cache the judge classifier of a dataset."""

from __future__ import annotations

import argparse

from jeat.cli.common import _image_size_arg
from jeat.data import load_dataset


def cmd_judge(args: argparse.Namespace) -> int:
    from jeat.metrics import train_judge

    data = load_dataset(
        args.dataset, root=args.data_dir, download=args.download, image_size=args.image_size
    )
    _, acc, folder = train_judge(
        args.dataset,
        data=data,
        image_size=args.image_size,
        folder=args.out,
        epochs=args.epochs,
        force=args.force,
        progress=not args.quiet,
    )
    print(f"judge for {data.info.name}: test accuracy {acc:.2f}%, cached in {folder}")
    return 0


def add_parser(sub) -> None:
    judge = sub.add_parser("judge", help="the judge classifier behind judge-IS / judge-FID")
    jsub = judge.add_subparsers(dest="judge_command", required=True)
    jt = jsub.add_parser("train", help="train and cache the judge of a dataset")
    jt.add_argument("--dataset", required=True)
    jt.add_argument("--epochs", type=int, help="default: the dataset's standard recipe")
    jt.add_argument("--out", help="judge folder (default: the judge cache, see docs)")
    jt.add_argument("--force", action="store_true", help="retrain even if cached")
    jt.add_argument("--data-dir")
    jt.add_argument("--download", action="store_true")
    _image_size_arg(jt)
    jt.add_argument("--quiet", action="store_true")
    jt.set_defaults(func=cmd_judge)
