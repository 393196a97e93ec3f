"""The listings: ``jeat datasets``, ``models``, ``objectives``, ``attacks`` and ``config``."""

from __future__ import annotations

import argparse

from jeat.config import config_to_dict, load_config
from jeat.data import list_datasets
from jeat.models import list_models
from jeat.objectives import list_objectives


def cmd_attacks(args: argparse.Namespace) -> int:
    from jeat.evaluate import list_attacks

    for name, (desc, options) in list_attacks().items():
        opts = ", ".join(f"{k}={v}" for k, v in options.items())
        print(f"{name:<24}{desc}\n{'':<24}options: {opts}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    print(f"{'name':<12}{'shape':<12}{'classes':>8}  {'eps linf':>9}  description")
    for info in list_datasets():
        shape = "x".join(map(str, info.shape))
        print(
            f"{info.name:<12}{shape:<12}{info.num_classes:>8}  {info.eps_linf:>9.4g}  "
            f"{info.description}"
        )
    print(
        "\nyour own images: folder:PATH (one subfolder per class, PNG/JPEG/BMP; train/ and test/"
        "\nsubfolders when present, else a stratified 80/20 split) or npz:PATH (arrays x, y;"
        "\noptional x_test, y_test, class_names); --image-size N resizes them"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    for info in list_models():
        opts = ", ".join(f"{k}={v}" for k, v in info.defaults.items())
        print(f"{info.name:<16}{info.description} [inputs: {info.input_sizes}] options: {opts}")
    return 0


def cmd_objectives(args: argparse.Namespace) -> int:
    for name, desc in list_objectives().items():
        print(f"{name:<12}{desc}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = load_config(args.config, list(args.set or []))
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def add_parser(sub) -> None:
    for name, func, help_ in (
        ("datasets", cmd_datasets, "list datasets"),
        ("models", cmd_models, "list models"),
        ("objectives", cmd_objectives, "list training objectives"),
        ("attacks", cmd_attacks, "list attacks and their options"),
    ):
        sub.add_parser(name, help=help_).set_defaults(func=func)
    c = sub.add_parser("config", help="print a resolved config")
    c.add_argument("config", nargs="?")
    c.add_argument("--set", action="append", metavar="KEY=VALUE")
    c.set_defaults(func=cmd_config)
