"""``jeat eval``: the robustness table, the masking checks, the curve, and the diagnosis
with its remedies (``--diagnose --fix``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from jeat.cli.common import (
    _check_eps,
    _csv,
    _defence_line,
    _defended_name,
    _eps,
    _eval_setup,
    _hold_outputs,
    _out_base,
    attack_args,
    model_command,
    points_phrase,
)
from jeat.distributed import from_env
from jeat.errors import JeatError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from jeat.attacks import ThreatModel
    from jeat.config import TrainConfig
    from jeat.evaluate import EvalContext, EvalResult


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
    if args.bpda_module and not args.diagnose:
        raise JeatError("--bpda-module names a module for the remedies of --diagnose: add it")
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
        result.points = points_phrase(data, n)
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
            args, model, x, y, result, threat, cfg, seed, context, indicators, remedies, payload,
            data.x_train,
        )  # fmt: skip
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
    inputs: Tensor | None = None,
) -> str:
    """``jeat eval --diagnose [--fix]``: print the diagnosis (and the remedied table), add them
    to the JSON payload; return their Markdown."""
    from jeat.diagnose import INDICATORS, diagnose, fix, remedy_costs

    attacks = [r.group for r in result.rows if r.group and r.category != "clean"]
    attacks = list(dict.fromkeys(["clean", *attacks]))
    common = {"batch_size": cfg.eval.batch_size, "seed": seed, "mode": result.mode,
              "context": context, "progress": not args.quiet}  # fmt: skip
    rows_before = len(result.rows)
    _, dg = diagnose(
        model, x, y, attacks, threat, indicators=indicators, result=result,
        bpda_module=args.bpda_module, **common,
    )  # fmt: skip
    print(dg.table())
    payload["diagnosis"] = dg.to_dict()
    md = "\nDiagnosis of the attacks:\n\n" + dg.markdown()
    if len(result.rows) > rows_before:  # the probes broke points: they count
        print("the table with the probes' points (every point a probe broke counts as broken):")
        print(result.table())
        payload.update({k: v for k, v in result.to_dict().items() if k != "points"})
        md += "\nThe table with the probes' points:\n\n" + result.markdown()
    if not args.fix:
        return md
    fixed, extra = fix(
        model, x, y, attacks, threat, dg, result, remedies=remedies, inputs=inputs, **common
    )
    if not extra:
        print("--fix: no indicator was raised, so there is no remedy to run")
        payload["fix"] = {"attacks": [], "robust_accuracy": result.robust_accuracy}
        return md + "\nNo indicator was raised: no remedy to run.\n"
    point = [i for i, ind in INDICATORS.items() if ind.scope == "point" and i != "bad-init"]
    _, after = diagnose(model, x, y, attacks, threat, indicators=point, result=fixed, **common)
    after.rows = [r for r in after.rows if r.attack.split("/")[0] in extra]
    costs = remedy_costs(fixed, extra)
    print(f"after the remedies (added: {', '.join(extra)}):")
    print(fixed.table())
    print("cost of each remedy: " + "; ".join(
        f"{c.attack} {c.seconds:.1f} s (attacked {c.attacked}, broke {c.broken})" for c in costs
    ))  # fmt: skip
    print(after.table())
    payload["fix"] = {
        "attacks": extra,
        "robust_accuracy": fixed.robust_accuracy,
        "costs": [vars(c) for c in costs],
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


def add_parser(sub) -> None:
    s = model_command(sub, "eval", "robustness table of a trained model", cmd_eval)
    attack_args(s, "eval")
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
    s.add_argument("--indicators", metavar="LIST", help="comma list of indicators (default: all)")
    s.add_argument(
        "--fix",
        action="store_true",
        help="with --diagnose: run the remedies of the raised indicators and print the table again",
    )
    s.add_argument("--remedies", metavar="LIST", help="with --fix: run these remedies instead")
    s.add_argument(
        "--bpda-module",
        metavar="NAME",
        help="with --diagnose: the module of your model whose step is not differentiable "
        "(e.g. pre, or net.pre); --fix attacks through a learned approximation of it (BPDA)",
    )
    s.add_argument("--sanity", action="store_true", help="run the gradient-masking checks")
    s.add_argument("--sanity-attack", default="pgd20")
    s.add_argument("--sanity-black-box", default="square:n_queries=1000")
    s.add_argument("--sanity-transfer", help="e.g. sgm:source=runs/source")
    s.add_argument("--tolerance", type=float, default=3.0, help="sanity slack in points")
    s.add_argument("--curve", metavar="ATTACK", help="accuracy-vs-eps curve (PNG, CSV)")
    s.add_argument("--curve-eps", help="comma list of budgets (default: 0..2x eps)")
