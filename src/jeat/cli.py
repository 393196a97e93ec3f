"""The ``jeat`` command line: a thin layer over the Python API.

Every problem the user can fix ends in one line ``jeat: error: ...`` and exit status 2: bad
input, and the machine refusing a write (a read-only or full disk, no permission: see
``docs/reliability.md``). A command that writes into a run folder holds it while it runs
(:mod:`jeat.locks`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from jeat.config import config_to_dict, load_config
from jeat.data import ImageDataset, dataset_slug, list_datasets, load_dataset
from jeat.distributed import from_env
from jeat.errors import WRITE_ERRNOS, EnvironmentFailure, JeatError, environment_failure
from jeat.models import list_models
from jeat.objectives import list_objectives
from jeat.userdata import parse_source

if TYPE_CHECKING:
    from torch import Tensor, nn

    from jeat.attacks import ThreatModel
    from jeat.config import TrainConfig
    from jeat.evaluate import EvalContext, EvalResult

__all__ = ["main", "build_parser"]


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
    cfg_data, data_dir: str | None, download: bool, image_size: int | None = None
) -> ImageDataset:
    return load_dataset(
        cfg_data.name,
        root=data_dir or cfg_data.root,
        download=download or cfg_data.download,
        image_size=image_size if image_size is not None else cfg_data.image_size,
    )


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
        _no_budgets(cfg)
    if args.image_size is not None:
        cfg.data.image_size = args.image_size
    data = _run_data(cfg.data, args.data_dir, args.download)
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


def cmd_eval(args: argparse.Namespace) -> int:
    from jeat.diagnose import INDICATORS, REMEDIES, parse_names
    from jeat.distributed import setup, teardown
    from jeat.finish import final_evaluation
    from jeat.sanity import curve_budgets, robustness_curve, sanity_checks, write_curve
    from jeat.utils import atomic_write, derive_seed, write_json

    if args.fix and not args.diagnose:
        raise JeatError("--fix runs the remedies of a diagnosis: add --diagnose")
    if args.indicators and not args.diagnose:
        raise JeatError("--indicators chooses what --diagnose computes: add --diagnose")
    if args.remedies and not args.fix:
        raise JeatError("--remedies chooses what --fix runs: add --fix")
    indicators = parse_names(args.indicators, INDICATORS, "indicator") if args.diagnose else None
    remedies = parse_names(args.remedies, REMEDIES, "remedy") if args.remedies else None
    shards = None
    if from_env().enabled:  # under torchrun: shard the test points across the processes
        if args.sanity or args.curve or args.diagnose:
            raise JeatError(
                "--sanity, --curve and --diagnose run on one process; drop them under torchrun "
                "(run them with a plain jeat eval)"
            )
        shards, device = setup(args.device)
        args.device = str(device)
    try:
        model, meta, cfg, data, n, threat, context = _eval_setup(args)
        # a defended table never takes the place of the run's own eval.json (the report reads
        # it)
        out = _out_base(args, _defended_name("eval", meta) + ".json")
        if shards is None or shards.is_main:  # the first process writes the files
            _hold_outputs(args, out, args.per_point)
        x, y = data.x_test[:n], data.y_test[:n]
        seed = args.seed if args.seed is not None else derive_seed(cfg.seed, 11)
        curve_eps = None
        if args.curve:  # the curve's budgets are checked before any attack runs
            curve_eps = (
                [_check_eps(threat.norm, _eps(t), data.info.shape, "--curve-eps")
                 for t in _csv(args.curve_eps)]
                if args.curve_eps
                else curve_budgets(threat, data.info.shape)
            )  # fmt: skip
        attacks = _csv(args.attacks) if args.attacks else None
        result = final_evaluation(
            cfg, model, data, attacks, args.mode, context, not args.quiet, seed, shards,
            args.order, trace=bool(args.diagnose or args.per_point),
        )  # fmt: skip
    finally:
        if shards is not None:
            teardown(shards)
    if shards is not None and not shards.is_main:
        return 0  # the first process prints and writes the (gathered, identical) table
    defended = _defence_line(meta)
    payload: dict = {"dataset": meta["dataset"], "run": str(args.run), **result.to_dict()}
    if defended:
        payload["defences"] = meta["defences"]
    written = []
    if args.sanity:
        report = sanity_checks(
            model,
            x,
            y,
            threat,
            attack=args.sanity_attack,
            black_box=args.sanity_black_box or None,
            transfer=args.sanity_transfer,
            tolerance=args.tolerance,
            batch_size=cfg.eval.batch_size,
            seed=seed,
            context=context,
            progress=not args.quiet,
        )
        payload["sanity"] = report.to_dict()
        payload["warnings"] = result.warnings + report.warnings
        print(report.table())
        if report.curve is not None:
            written += write_curve(report.curve, out, "sanity")
    if defended:
        print(defended)
    print(result.table())
    if args.sanity:
        for w in report.warnings:
            print(f"warning: {w}")
    extra_md = ""
    if args.diagnose:
        extra_md = _diagnose_and_fix(
            args, model, x, y, result, threat, cfg, seed, context, indicators, remedies, payload
        )
    if args.curve:
        assert curve_eps is not None
        curve = robustness_curve(
            model,
            x,
            y,
            args.curve,
            threat,
            curve_eps,
            cfg.eval.batch_size,
            seed,
            context,
            not args.quiet,
        )
        payload["curve"] = curve.to_dict()
        written += write_curve(curve, out, "curve")
    write_json(out, payload)
    md, csv_path = out.with_suffix(".md"), out.with_suffix(".csv")
    text = (defended + "\n\n" if defended else "") + result.markdown()
    if args.sanity:
        text += (
            "\n"
            + "\n".join(
                ["Sanity checks:", ""]
                + [
                    f"- {'ok' if c.passed else 'skipped' if c.passed is None else '**WARNING**'}: "
                    f"{c.rule} ({c.detail})"
                    for c in report.checks
                ]
            )
            + "\n"
        )
    text += extra_md
    with atomic_write(md, "w") as fh:
        fh.write(text)
    with atomic_write(csv_path, "w") as fh:
        fh.write(result.csv())
    if args.per_point:
        with atomic_write(args.per_point, "w") as fh:
            fh.write(result.per_point_csv())
        written.append(Path(args.per_point))
    for path in [out, md, csv_path, *written]:
        print(f"wrote {path}")
    return 0


def _diagnose_and_fix(
    args: argparse.Namespace,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    result: EvalResult,
    threat: ThreatModel,
    cfg: TrainConfig,
    seed: int,
    context: EvalContext,
    indicators: list[str] | None,
    remedies: list[str] | None,
    payload: dict,
) -> str:
    """``jeat eval --diagnose [--fix]``: print the diagnosis (and the remedied table), add them
    to the JSON payload; return their Markdown."""
    from jeat.diagnose import INDICATORS, diagnose, fix

    attacks = [r.group for r in result.rows if r.group and r.category != "clean"]
    attacks = list(dict.fromkeys(["clean", *attacks]))
    common = {"batch_size": cfg.eval.batch_size, "seed": seed, "mode": result.mode,
              "context": context, "progress": not args.quiet}  # fmt: skip
    _, dg = diagnose(model, x, y, attacks, threat, indicators=indicators, result=result, **common)
    print(dg.table())
    payload["diagnosis"] = dg.to_dict()
    md = "\nDiagnosis of the attacks:\n\n" + dg.markdown()
    if not args.fix:
        return md
    fixed, extra = fix(model, x, y, attacks, threat, dg, result, remedies=remedies, **common)
    if not extra:
        print("--fix: no indicator was raised, so there is no remedy to run")
        payload["fix"] = {"attacks": [], "robust_accuracy": result.robust_accuracy}
        return md + "\nNo indicator was raised: no remedy to run.\n"
    point = [i for i, ind in INDICATORS.items() if ind.scope == "point" and i != "bad-init"]
    _, after = diagnose(model, x, y, attacks, threat, indicators=point, result=fixed, **common)
    after.rows = [r for r in after.rows if r.attack.split("/")[0] in extra]
    print(f"after the remedies (added: {', '.join(extra)}):")
    print(fixed.table())
    print(after.table())
    payload["fix"] = {
        "attacks": extra,
        "robust_accuracy": fixed.robust_accuracy,
        "table": fixed.to_dict(),
        "diagnosis": after.to_dict(),
    }
    return (
        md
        + f"\nAfter the remedies (added: {', '.join(f'`{e}`' for e in extra)}):\n\n"
        + fixed.markdown()
        + "\n"
        + after.markdown()
    )


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


def cmd_attack(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from jeat.evaluate import build_attack, parse_attack
    from jeat.utils import atomic_write, save_image_grid

    model, meta, cfg, data, n, threat, context = _eval_setup(args)
    spec = parse_attack(args.attack)
    if spec.kind == "clean":
        raise JeatError("'clean' is not an attack; name one, e.g. --attack pgd20")
    out = _out_base(args, _defended_name(f"adv-{spec.kind}", meta) + ".npz")
    seed = 0 if args.seed is None else args.seed
    context.seed = seed
    built = build_attack(spec, threat, context)
    _hold_outputs(args, out)
    x, y = data.x_test[:n].to(context.device), data.y_test[:n].to(context.device)
    x_adv = x
    for _name, attack, _category in built.stages:  # composite attacks: their own cascade
        with torch.no_grad():
            alive = model(x_adv).argmax(1) == y
        idx = alive.nonzero().squeeze(1)
        if len(idx):
            gen = torch.Generator(device=x.device).manual_seed(seed)
            x_adv = x_adv.clone()
            x_adv[idx] = attack(model, x[idx], y[idx], generator=gen)
    with torch.no_grad():
        clean_pred = model(x).argmax(1)
        adv_pred = model(x_adv).argmax(1)
    clean_acc = 100 * float((clean_pred == y).float().mean())
    adv_acc = 100 * float(((adv_pred == y) & (clean_pred == y)).float().mean())
    if meta.get("defences"):
        print(_defence_line(meta))
    print(f"{spec.label} on {n} points: clean {clean_acc:.2f}%, under attack {adv_acc:.2f}%")
    with atomic_write(out, "wb") as fh:
        np.savez_compressed(
            fh,
            x=x.cpu().numpy(),
            x_adv=x_adv.cpu().numpy(),
            y=y.cpu().numpy(),
            pred_clean=clean_pred.cpu().numpy(),
            pred_adv=adv_pred.cpu().numpy(),
            attack=np.array(spec.label),
            dataset=np.array(meta["dataset"]),
            defences=np.array(meta.get("defences", []), dtype=str),
        )
    k = min(16, n)
    pairs = torch.stack([x[:k], x_adv[:k]], 1).flatten(0, 1).cpu()
    png = save_image_grid(pairs, out.with_suffix(".png"), nrow=8)
    print(f"wrote {out}\nwrote {png} (clean/adversarial pairs)")
    return 0


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


def cmd_report(args: argparse.Namespace) -> int:
    from jeat.report import write_report

    _hold_outputs(args, Path(args.out) if args.out else Path(args.run) / "report.html")
    print(f"wrote {write_report(args.run, args.out)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from jeat.compare import compare

    labels = _csv(args.labels) if args.labels else None
    _hold_outputs(args, args.out)
    out = compare(args.runs, args.out, args.allow_mixed, labels, args.reanalyze, args.device)
    print(f"wrote {out}")
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    from jeat.certify import wrm_certificate
    from jeat.runs import load_trained
    from jeat.utils import write_json

    if not args.wrm:
        raise JeatError("name a certificate: jeat certify RUN --wrm (the only one so far)")
    model, meta, cfg = load_trained(args.run, device=args.device)
    data = _run_data(cfg.data, args.data_dir, args.download)
    gamma = args.gamma
    if gamma is None:
        if cfg.objective.name != "wrm":
            raise JeatError(f"{args.run} was not trained with wrm; give the multiplier: --gamma G")
        gamma = float(cfg.objective.options.get("gamma", 2.0))
    rhos = [float(_eps(t)) for t in _csv(args.rho)]
    n = len(data.x_test) if args.n is None or args.n <= 0 else min(args.n, len(data.x_test))
    out = _out_base(args, "certify-wrm.json")
    _hold_outputs(args, out)
    cert = wrm_certificate(model, data.x_test[:n], data.y_test[:n], gamma, rhos)
    print(cert.table())
    write_json(out, {"dataset": meta["dataset"], "run": str(args.run), **cert.to_dict()})
    png = cert.plot(out.with_suffix(".png"))
    print(f"wrote {out}\nwrote {png}")
    if cert.violations:
        print(f"warning: {len(cert.violations)} attack(s) exceed the certified loss: the inner "
              "maximisation missed the maximum (non-smooth model or gamma too small)")  # fmt: skip
    return 0


def cmd_attacks(args: argparse.Namespace) -> int:
    from jeat.evaluate import list_attacks

    for name, (desc, options) in list_attacks().items():
        opts = ", ".join(f"{k}={v}" for k, v in options.items())
        print(f"{name:<24}{desc}\n{'':<24}options: {opts}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from jeat.finish import generate_samples, grid_width
    from jeat.utils import atomic_write, save_image_grid

    model, meta, cfg, data = _load_source(args, _source(args), args.dataset)
    if args.steps is not None:
        cfg.generate.steps = args.steps
    if args.radius is not None:
        cfg.generate.radius = args.radius
    if args.seeds is not None:
        cfg.generate.seeds = args.seeds
    if args.method is not None:
        cfg.generate.method = args.method
    if args.unconditional:
        cfg.generate.conditional = False
    if args.n is not None:
        cfg.generate.n_per_class = args.n
    classes = _int_list(args.classes) if args.classes else None
    out = _out_base(args, "samples.png")
    _hold_outputs(args, out, args.npz)
    images, labels = generate_samples(model, data, cfg, classes, seed=args.seed)
    g = cfg.generate
    save_image_grid(images, out, nrow=grid_width(g, len(images)))
    print(f"wrote {out}")
    if args.npz:
        with atomic_write(args.npz, "wb") as fh:
            np.savez_compressed(
                fh,
                images=images.numpy(),
                labels=(labels if labels is not None else torch.full((len(images),), -1)).numpy(),
                method=np.array(g.method),
                dataset=np.array(meta["dataset"]),
            )
        print(f"wrote {args.npz}")
    return 0


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


def _load_samples(path: str):
    """Images and labels of a ``jeat generate --npz`` file (or any .npz with ``images``)."""
    import numpy as np
    import torch

    file = Path(path)
    if not file.is_file():
        raise JeatError(f"no samples file at {file}")
    try:
        with np.load(file, allow_pickle=False) as npz:
            if "images" not in npz:
                raise JeatError(f"{file} has no 'images' array (keys: {', '.join(npz.files)})")
            images = torch.from_numpy(np.asarray(npz["images"], dtype=np.float32))
            labels = torch.from_numpy(npz["labels"]).long() if "labels" in npz else None
            dataset = str(npz["dataset"]) if "dataset" in npz else None
    except (OSError, ValueError) as exc:
        raise JeatError(f"cannot read samples from {file}: {exc}") from None
    if images.ndim == 3:  # N x H x W grey images
        images = images.unsqueeze(1)
    return images, labels, dataset


def cmd_score(args: argparse.Namespace) -> int:
    import torch

    from jeat.metrics import InceptionBackend, JudgeBackend, load_judge, score_samples
    from jeat.utils import write_json

    images, labels, made_for = _load_samples(args.samples)
    data = load_dataset(
        args.against, root=args.data_dir, download=args.download, image_size=args.image_size
    )
    if made_for is not None and made_for != data.info.name:
        print(f"note: the samples were generated for {made_for}, scored against {data.info.name}")
    n, n_real, splits = args.n, args.n_real, args.splits
    if args.quick:
        n, n_real, splits = n or 1000, n_real or 1000, 1
    gen = torch.Generator().manual_seed(args.seed)
    if n is not None and n < len(images):
        pick = torch.randperm(len(images), generator=gen)[:n]
        images = images[pick]
        labels = labels[pick] if labels is not None else None
    real = data.x_train if args.real == "train" else data.x_test
    if n_real is not None and n_real < len(real):
        real = real[torch.randperm(len(real), generator=gen)[:n_real]]
    out = Path(args.out) if args.out else Path(args.samples).with_suffix(".scores.json")
    _hold_outputs(args, out)
    backends = []
    if args.backend in ("auto", "judge"):
        backends.append(JudgeBackend(load_judge(data.info.name, args.judge, args.image_size)))
    if args.backend in ("auto", "inception"):
        try:
            backends.append(InceptionBackend(device=args.device, download=args.download))
        except JeatError as exc:
            if args.backend == "inception":
                raise
            print(f"Inception-v3 IS/FID skipped: {exc}")
    results = {}
    for backend in backends:
        s = score_samples(backend, images, real, labels, splits)
        print(f"{backend.name:<13} {s.line()}")
        results[backend.name] = s.to_dict()
    write_json(
        out,
        {"samples": str(args.samples), "against": data.info.name, "real": args.real, **results},
    )
    print(f"wrote {out}")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jeat",
        description="Robust and generative classifiers: train, attack, evaluate, generate.",
    )
    sub = p.add_subparsers(dest="command", required=True)

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

    for name, func, help_ in (
        ("eval", cmd_eval, "robustness table of a trained model"),
        ("attack", cmd_attack, "craft adversarial examples for a trained model"),
        ("generate", cmd_generate, "class-conditional samples from a trained model"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument(
            "run", nargs="?", metavar="MODEL", help="run folder or checkpoint (or use --model)"
        )
        s.add_argument("--out", help="output file (default: inside the run folder)")
        _data_args(s)
        _model_args(s)
        s.set_defaults(func=func)
        if name in ("eval", "attack"):
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
        if name == "attack":
            s.add_argument("--attack", default="pgd20", help="one attack (see jeat attacks)")
        elif name == "eval":
            s.add_argument(
                "--attacks",
                help="comma list, options after colons: clean,fgsm,pgd20,cw,autoattack,"
                "square,sgm:source=RUN,roa:size=3 (see jeat attacks)",
            )
            s.add_argument(
                "--mode",
                choices=["cascade", "independent"],
                default="cascade",
                help="cascade: later attacks only attack points still robust (default); "
                "independent: every attack on every point",
            )
            s.add_argument(
                "--order",
                choices=["cost", "given"],
                default="cost",
                help="cascade order: cost runs the white-box attacks cheapest first (default); "
                "given keeps the list's order",
            )
            s.add_argument(
                "--per-point",
                metavar="CSV",
                help="also write one row per test point: its label, the first attack that "
                "broke it, every attack's outcome and its loss trace summary",
            )
            s.add_argument(
                "--diagnose",
                action="store_true",
                help="say why attacks failed: indicators of attack failure read from each "
                "point's loss trace, and AutoAttack's checks, each with its remedy",
            )
            s.add_argument(
                "--indicators", metavar="LIST", help="comma list of indicators (default: all)"
            )
            s.add_argument(
                "--fix",
                action="store_true",
                help="with --diagnose: run the remedies of the raised indicators and print the "
                "table again",
            )
            s.add_argument(
                "--remedies", metavar="LIST", help="with --fix: run these remedies instead"
            )
            s.add_argument("--sanity", action="store_true", help="run the gradient-masking checks")
            s.add_argument("--sanity-attack", default="pgd20")
            s.add_argument("--sanity-black-box", default="square:n_queries=1000")
            s.add_argument("--sanity-transfer", help="e.g. sgm:source=runs/source")
            s.add_argument("--tolerance", type=float, default=3.0, help="sanity slack in points")
            s.add_argument("--curve", metavar="ATTACK", help="accuracy-vs-eps curve (PNG, CSV)")
            s.add_argument("--curve-eps", help="comma list of budgets (default: 0..2x eps)")
        else:
            s.add_argument(
                "--method",
                choices=["descent", "sgld"],
                help="seeded descent on E(x,y)-E(x), or SGLD on the energy",
            )
            s.add_argument(
                "--unconditional",
                action="store_true",
                help="sample E(x) instead of one row per class (sgld)",
            )
            s.add_argument("--npz", help="also save the samples (images, labels) to this .npz")
            s.add_argument("--classes", help="comma list of class indices (default: all)")
            s.add_argument("--n", type=int, help="images per class")
            s.add_argument("--steps", type=int)
            s.add_argument("--radius", type=float, help="L2 radius around the seed")
            s.add_argument("--seed", type=int)
            s.add_argument(
                "--seeds",
                choices=["class", "pooled", "uniform"],
                help="seed distribution (default: the run's config, 'class')",
            )

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

    rep = sub.add_parser("report", help="one self-contained HTML page for a run")
    rep.add_argument("run", help="run folder")
    rep.add_argument("--out", help="HTML file (default: RUN/report.html)")
    rep.set_defaults(func=cmd_report)

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

    cert = sub.add_parser("certify", help="certified bounds (WRM) against our attacks")
    cert.add_argument("run", help="run folder or checkpoint file")
    cert.add_argument("--wrm", action="store_true", help="the WRM Wasserstein certificate")
    cert.add_argument("--gamma", type=float, help="Lagrange multiplier (default: the run's)")
    cert.add_argument("--rho", default="0.1,0.5,1,2", help="transport budgets (mean ||dx||^2)")
    cert.add_argument("--n", type=int, default=500, help="test points (0: all)")
    cert.add_argument("--out", help="output JSON (default: RUN/certify-wrm.json, plus .png)")
    _data_args(cert, device="auto")
    cert.set_defaults(func=cmd_certify)

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

    sc = sub.add_parser("score", help="IS / FID of generated samples (judge and Inception-v3)")
    sc.add_argument("samples", help=".npz with an 'images' array (jeat generate --npz)")
    sc.add_argument("--against", required=True, help="dataset whose real images are the reference")
    sc.add_argument("--real", choices=["train", "test"], default="train", help="reference split")
    sc.add_argument(
        "--backend",
        choices=["auto", "judge", "inception"],
        default="auto",
        help="auto: the judge, plus Inception-v3 when available (default)",
    )
    sc.add_argument("--judge", help="judge run folder (default: the cached judge)")
    sc.add_argument("--n", type=int, help="score at most this many samples")
    sc.add_argument("--n-real", type=int, help="at most this many real images")
    sc.add_argument("--splits", type=int, default=10, help="IS splits (default 10)")
    sc.add_argument("--quick", action="store_true", help="1,000 samples, 1,000 real, 1 split")
    sc.add_argument("--seed", type=int, default=0, help="seed of the subsampling")
    sc.add_argument("--out", help="JSON output (default: SAMPLES.scores.json)")
    _data_args(sc, device="cpu")
    sc.set_defaults(func=cmd_score)

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
    return p


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


if __name__ == "__main__":
    sys.exit(main())
