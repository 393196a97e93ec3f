"""What the commands share: small parsers, the model and data options, loading a model source
with its data, the folders a command holds, and where its files go."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from jeat.config import load_config
from jeat.data import ImageDataset, load_dataset
from jeat.errors import JeatError
from jeat.userdata import parse_source


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise JeatError(f"expected comma-separated integers, got '{text}'") from None


def _quoted(text: str | None) -> str | None:
    """A string value for a ``key=value`` override that the value parser keeps as it is (a
    path may hold ``: `` or look like a number)."""
    return None if text is None else json.dumps(text)


_BUDGET_KEYS = ("objective.attack.eps", "objective.attack.step_size", "eval.eps")


def _builtin_config(name: str | None) -> bool:
    from jeat.config import builtin_configs

    return name is None or (name in builtin_configs() and not Path(name).exists())


def _no_budgets(cfg) -> None:
    """Budgets from the dataset (:class:`jeat.data.DatasetInfo`), not from the default config,
    whose ε is digits'."""
    cfg.objective.attack.eps = None
    cfg.objective.attack.step_size = None
    cfg.eval.eps = None


_OUT_HINT = "wait for it to end, or write elsewhere with --out"


def _hold_outputs(args: argparse.Namespace, *paths: str | Path | None) -> None:
    """Hold the run folders that ``paths`` (the command's output files or folders) lie in
    until the command ends (:func:`main` releases them): one process writes a run folder at a
    time, and a second stops at once, naming the first."""
    from jeat.locks import hold_folder
    from jeat.runs import run_folder_of

    for path in paths:
        folder = run_folder_of(path) if path is not None else None
        if folder is not None:
            args.holds.enter_context(hold_folder(folder, hint=_OUT_HINT))


def _run_data(
    cfg_data,
    data_dir: str | None,
    download: bool,
    image_size: int | None = None,
    split: bool = True,
) -> ImageDataset:
    return load_dataset(
        cfg_data.name,
        root=data_dir or cfg_data.root,
        download=download or cfg_data.download,
        image_size=image_size if image_size is not None else cfg_data.image_size,
        split=split,
    )


def points_phrase(data: ImageDataset, n: int) -> str:
    """How many images of how many a table attacks, and from which split: the first line of
    ``jeat eval``'s table, e.g. ``360 of 360 images of npz:/d/test.npz, all of them (...)``."""
    from jeat.userdata import WHOLE

    name, total = data.info.name, len(data.x_test)
    if data.split == WHOLE:
        if n < total:
            return (
                f"{n} of {total} images of {name}: the first {n} (--n); the data has no "
                "train/test split of its own"
            )
        return f"{n} of {total} images of {name}, {WHOLE}"
    if data.split.startswith("stratified"):
        whole = len(data.x_train) + total
        return f"{n} of {whole} images of {name}: the test share of a {data.split}"
    where = f" ({data.split})" if data.split else ""
    return f"{n} of {total} test images of {name}{where}"


def _source(args: argparse.Namespace) -> str:
    """The one model source of eval / attack / generate: the positional MODEL or --model."""
    if args.run and args.model_source:
        raise JeatError("give the model once: as MODEL or as --model, not both")
    source = args.run or args.model_source
    if not source:
        raise JeatError("name a model: a run folder or checkpoint, or --model SOURCE")
    args.run = source
    return source


def _load_source(args: argparse.Namespace, source: str, dataset: str | None):
    """Model (eval mode, on ``--device``), metadata, config and data for one model source
    (:func:`jeat.sources.load_model`): a jeat run brings its config and dataset (``--dataset``
    overrides it); any other model takes the default config with ``--dataset``, which it
    needs. The width of the logits is checked against the dataset's classes."""
    from jeat.sources import check_width, load_model

    loaded = load_model(
        source,
        weights=args.weights,
        num_classes=args.num_classes,
        normalize=args.normalize,
        input_range=args.input_range,
        trust_pickle=args.trust_pickle,
        device=args.device,
    )
    if loaded.config is not None:
        cfg = loaded.config
        if dataset:
            cfg.data.name = dataset
            cfg.data.image_size = None
    else:
        if not dataset:
            raise JeatError(
                f"{source} is not a jeat run: name its data with --dataset (digits, cifar10, ... "
                "see jeat datasets)"
            )
        cfg = load_config(None)
        cfg.data.name = dataset
        cfg.eval.n = None  # the whole test set, unless --n says otherwise
        _no_budgets(cfg)
    if args.image_size is not None:
        cfg.data.image_size = args.image_size
    # a model trained elsewhere is evaluated on every image of a user's folder:/npz: data
    # unless the data has its own train/test split or --split asks for the seeded one
    whole = loaded.config is None and not getattr(args, "split", False)
    data = _run_data(cfg.data, args.data_dir, args.download, split=not whole)
    trained = loaded.meta.get("image_shape")
    if trained is not None and list(trained) != list(data.info.shape):
        fmt = "x".join
        raise JeatError(
            f"{source} was trained on {fmt(map(str, trained))} images, but {data.info.name}'s "
            f"are {fmt(map(str, data.info.shape))} (C x H x W)"
            + (f"; pass --image-size {trained[-1]}" if parse_source(data.info.name) else "")
        )
    check_width(loaded, data.x_test, data.info.num_classes, f"dataset {data.info.name}")
    meta = {**loaded.meta, "dataset": data.info.name}
    return loaded.model, meta, cfg, data


def _model_args(p: argparse.ArgumentParser) -> None:
    """The options of a model source (see jeat.sources)."""
    p.add_argument(
        "--model",
        dest="model_source",
        metavar="SOURCE",
        help="run folder/checkpoint, py:FILE.py:FACTORY, package.module:FACTORY, TorchScript "
        "file or .pt2 export",
    )
    p.add_argument("--weights", help="state_dict (.pt) or .safetensors for a factory")
    p.add_argument("--num-classes", type=int, help="check the model's logits have this width")
    p.add_argument("--normalize", metavar="MEAN;STD", help="put (x - mean) / std in front")
    p.add_argument(
        "--input-range",
        choices=["0,1", "-1,1"],
        default="0,1",
        help="-1,1: the model takes [-1, 1] inputs (adapter z = 2x - 1; eps stays in pixels)",
    )
    p.add_argument(
        "--trust-pickle", action="store_true", help="allow a fully pickled model (runs its code)"
    )
    p.add_argument(
        "--dataset",
        help="data to use: a name from `jeat datasets`, folder:PATH or npz:PATH (default: the "
        "run's; needed for other models)",
    )


def _eval_setup(args: argparse.Namespace):
    """Model, data, config, test points and threat for ``eval`` and ``attack``."""
    from jeat.defences import describe, parse_defences, wrap
    from jeat.evaluate import EvalContext
    from jeat.runs import eval_threat

    defences = parse_defences(getattr(args, "defence", None))  # a bad spec fails first
    model, meta, cfg, data = _load_source(args, _source(args), args.dataset)
    if defences:  # test-time defences wrap the loaded model, the first innermost
        model = wrap(model, defences)
        meta["defences"] = describe(model)
    if args.norm:
        cfg.eval.norm = args.norm
    if args.eps is not None:
        if args.eps < 0:
            raise JeatError(f"--eps must be >= 0, got {args.eps}")
        cfg.eval.eps = _check_eps(cfg.eval.norm, args.eps, data.info.shape)
    if args.n is not None:
        cfg.eval.n = None if args.n <= 0 else args.n
    if args.batch_size < 1:
        raise JeatError(f"--batch-size must be >= 1, got {args.batch_size}")
    cfg.eval.batch_size = args.batch_size
    n = len(data.x_test) if cfg.eval.n is None else min(cfg.eval.n, len(data.x_test))
    context = EvalContext(
        device=next(model.parameters()).device,
        num_classes=data.info.num_classes,
        image_shape=data.info.shape,
    )
    return model, meta, cfg, data, n, eval_threat(cfg, data.info), context


def _out_base(args: argparse.Namespace, default_name: str) -> Path:
    """``--out``, else a file in the run's folder; for a model that is not a jeat run,
    ``jeat-out/NAME/`` in the working directory (never next to the user's own files)."""
    if args.out:
        return Path(args.out)
    run = Path(args.run)
    if run.is_dir():
        return run / default_name
    if run.is_file() and (run.parent / "config.yaml").exists():
        return run.parent / default_name
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in run.name or str(run))
    return Path("jeat-out") / name.strip("-.") / default_name


def _defence_line(meta: dict) -> str:
    """The test-time defences a model was wrapped in (``--defence``), or "" for none."""
    if not meta.get("defences"):
        return ""
    return f"test-time defences (innermost first): {', '.join(meta['defences'])}"


def _defended_name(stem: str, meta: dict) -> str:
    """``stem``, or ``stem-DEFENCES`` for a model wrapped in test-time defences, e.g.
    ``eval-quantize-levels4``."""
    specs = meta.get("defences") or []
    tags = [re.sub(r"[^A-Za-z0-9._+-]", "", d.replace(":", "-")) for d in specs]
    return "+".join([f"{stem}-{tags[0]}", *tags[1:]]) if tags else stem


def _data_args(p: argparse.ArgumentParser, device: str = "auto") -> None:
    """The options every command that loads a run's dataset takes."""
    p.add_argument("--device", default=device)
    p.add_argument("--data-dir", help="folder holding the dataset's original files")
    p.add_argument("--download", action="store_true", help="download missing dataset files")
    _image_size_arg(p)


def _image_size_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="resize the images of a folder:/npz: dataset to N x N",
    )


def _eps(text: str) -> float:
    from jeat.config import parse_value

    value = parse_value(text)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"not a number: {text}")
    return float(value)


def _check_eps(norm: str, eps: float, shape=None, what: str = "--eps") -> float:
    """``--eps`` read as a budget that someone means (:func:`jeat.attacks.threats.check_budget`:
    an L-inf budget of 8 was meant as 8/255)."""
    from jeat.attacks.threats import check_budget

    return check_budget(norm, eps, shape, what)


def model_command(sub, name: str, help_: str, func) -> argparse.ArgumentParser:
    """The parser of a command that loads one model (eval, attack, generate): the MODEL
    positional, --out, the data and the model-source options."""
    s = sub.add_parser(name, help=help_)
    s.add_argument(
        "run", nargs="?", metavar="MODEL", help="run folder or checkpoint (or use --model)"
    )
    s.add_argument("--out", help="output file (default: inside the run folder)")
    _data_args(s)
    _model_args(s)
    s.set_defaults(func=func)
    return s


def attack_args(s: argparse.ArgumentParser, name: str) -> None:
    """The options eval and attack share: the threat, the points, the seed, test-time defences."""
    s.add_argument("--norm", choices=["linf", "l2"])
    s.add_argument("--eps", type=_eps, help="budget in [0,1] pixel units, e.g. 8/255")
    s.add_argument(
        "--n",
        "--points",
        dest="n",
        type=int,
        help="test points (0: all); under torchrun write --points (torchrun reads --n "
        "as an abbreviation of its own options)",
    )
    s.add_argument(
        "--split",
        action="store_true",
        help="folder:/npz: data without its own train/test split: attack the test share of "
        "the seeded stratified 80/20 split (default for a model that is not a jeat run: every "
        "image)",
    )
    s.add_argument("--batch-size", type=int, default=256)
    default_seed = "from the run's seed" if name == "eval" else "0"
    s.add_argument("--seed", type=int, help=f"attack seed (default: {default_seed})")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument(
        "--defence",
        "--defense",
        dest="defence",
        action="append",
        metavar="SPEC",
        help="wrap the model in a test-time defence: noise:sigma=0.1, purify:steps=10, "
        "quantize:levels=4, median:size=3, softmax, zero-grad (repeat or comma list; "
        "the first is innermost)",
    )
