"""The fast path against fp32 eager: the same PGD-AT training timed side by side, and the
robustness of the two trained models.

Two runs of ``jeat.train`` on the same config, data and seed, differing only in ``perf``:

* ``fp32 eager``: ``perf.amp=fp32``, ``perf.channels_last=false``, ``perf.compile=false``
  (PyTorch's default precision settings: on Ampere and newer GPUs cuDNN runs these fp32
  convolutions in TF32, while matrix products stay full fp32);
* ``fast``: ``perf.amp=bf16``, ``perf.channels_last=true``, ``perf.compile=true`` (``--fast-amp``,
  ``--fast-channels-last`` and ``--no-compile`` change it).

They advance one epoch per round, in an order rotated from round to round (each continues
with ``train_and_finish(..., resume=True)``), so a slow spell of the machine hits both
alike. The first epoch of each is excluded from the timing (it pays ``torch.compile``'s
compilation). The speed-up is eager time / fast time: the median of the per-epoch ratios
with a 95% bootstrap
interval, and the ratio of the median epoch times.

Then both final models are evaluated in fp32 with the same attack seed on the same test points:
clean accuracy and PGD-20 accuracy (L-inf, the config's eval budget, the table's step size),
and the PGD-20 difference in points. The issue's targets, for an H100 and the CIFAR-10 subset:
speed-up >= 2.5 and |PGD-20 difference| <= 1 point. Each row also has a peak-memory column
(CUDA: peak allocated; CPU: host peak RSS above the RSS before the epoch), and its model-FLOPs
utilisation as ``train_throughput.py`` defines it (FLOPs of one step counted in fp32 eager mode x
images/s / the device's peak dense bf16 FLOP/s; n/a on the CPU), so the fast row answers the
issue's MFU target (>= 35% for PreAct-ResNet-18 PGD-10 on an H100) too.

Defaults: the ``cifar10-pgdat`` config on the CIFAR-10 subset under ``--data-dir`` (else the
digits, said so); on CUDA the model is PreAct-ResNet-18 and the config's 30 epochs; on the CPU
the config's ``small_cnn`` and 3 epochs (bf16 is emulated on CPUs without native bf16
instructions and compiled small CNNs are slower there, so the CPU run checks the plumbing, not
the targets).

Usage (the H100 command for the issue's target)::

    python benchmarks/fast_path.py --device cuda --data-dir ../shared/data \\
        --out benchmarks/results/fast_path

``--budget-s S`` fits the run into about ``S`` seconds (a GPU lease is short): both paths
first train two throw-away epochs (which also pays the compilation, cached for the real run),
and their second-epoch times set the number of epochs, at most the config's and at least 2;
the schedule is that of the chosen epochs, and the results say how the number was chosen.

``--quick`` is a smoke run on the digits (2 epochs, 64 test points, no compile).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    LEAN_OVERRIDES,
    ROOT,
    Measured,
    PeakMemory,
    cifar_or_digits,
    device_line,
    emit,
    first_train_images,
    machine,
    markdown_table,
    memory_label,
    mib,
    objective_step_flops,
    paired_ratio,
    peak_flops,
    quiet_stdout,
    ratio_text,
    rotated,
    work_folder,
)

from jeat.accel import Accelerator
from jeat.config import TrainConfig, load_config
from jeat.data import ImageDataset, load_dataset
from jeat.finish import final_evaluation, train_and_finish
from jeat.runs import load_trained
from jeat.utils import resolve_device

EAGER, FAST = "fp32 eager", "fast"
TARGET_SPEEDUP, TARGET_POINTS = 2.5, 1.0


def perf_overrides(args: argparse.Namespace) -> dict[str, list[str]]:
    return {
        EAGER: ["perf.amp=fp32", "perf.channels_last=false", "perf.compile=false"],
        FAST: [
            f"perf.amp={args.fast_amp}",
            f"perf.channels_last={args.fast_channels_last}",
            f"perf.compile={str(not args.no_compile).lower()}",
        ],
    }


def make_cfg(
    args: argparse.Namespace, variant: str, cuda: bool, epochs: int | None = None
) -> TrainConfig:
    epochs = args.epochs if epochs is None else epochs
    o = [*LEAN_OVERRIDES, f"epochs={epochs}", f"seed={args.seed}", f"device={args.device}"]
    model = args.model or ("preact_resnet18" if cuda else None)
    if model:
        o += [f"model.name={model}", "model.options={}"]
    if args.batch_size:
        o.append(f"batch_size={args.batch_size}")
    return load_config(args.config, [*o, *perf_overrides(args)[variant], *args.set])


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def epochs_for_budget(
    args: argparse.Namespace, data: ImageDataset, work: Path, cuda: bool
) -> dict[str, Any]:
    """Two throw-away epochs of each path, each its own ``train_and_finish()`` call as in the
    timed run;
    the number of epochs of both paths that fits the rest of ``args.budget_s`` (one round of
    margin for the final evaluations), between 2 and ``args.epochs``. A round costs what the
    second calls took on the wall clock: the epoch, and the call's own set-up, checkpoint
    loading and saving."""
    start = time.perf_counter()
    second: dict[str, float] = {}
    wall: dict[str, float] = {}
    for v in (EAGER, FAST):
        cfg, folder = make_cfg(args, v, cuda, epochs=2), work / f"calibrate-{v}"
        with quiet_stdout():
            train_and_finish(cfg, folder, data=data, stop_after=1)
            t0 = time.perf_counter()
            result = train_and_finish(cfg, folder, resume=True, data=data)
            wall[v] = time.perf_counter() - t0
        second[v] = float(result.metrics[-1]["epoch_seconds"])
        _log(
            f"calibration: {v} {second[v]:.2f}s per epoch, "
            f"{wall[v]:.2f}s per train_and_finish() call"
        )
    spent = time.perf_counter() - start
    per_round = sum(wall.values())
    fits = int((args.budget_s - spent - per_round) // per_round)
    return {
        "budget_s": args.budget_s,
        "calibration_s": spent,
        "second_epoch_s": second,
        "second_call_s": wall,
        "epochs_that_fit": fits,
        "epochs": max(2, min(args.epochs, fits)),
    }


def run(args: argparse.Namespace, data: ImageDataset, work: Path) -> dict[str, Any]:
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    variants = [EAGER, FAST]
    budget = None
    if args.budget_s:
        budget = epochs_for_budget(args, data, work, cuda)
        _log(f"budget {args.budget_s:.0f}s: {budget['epochs']} epochs (config: {args.epochs})")
        args.epochs = budget["epochs"]
    cfgs = {v: make_cfg(args, v, cuda) for v in variants}
    perf = {v: cfgs[v].perf for v in variants}
    desc = {v: Accelerator.from_perf(device, p).describe() for v, p in perf.items()}
    for v in variants:
        _log(f"{v}: {desc[v]}")
    measured = {v: Measured() for v in variants}
    last: dict[str, dict[str, Any]] = {}
    for e in range(args.epochs):
        for v in rotated(variants, e):
            with PeakMemory(device) as mem, quiet_stdout():
                result = train_and_finish(
                    cfgs[v], work / v, resume=e > 0, data=data, stop_after=e + 1
                )
            last[v] = result.metrics[-1]
            seconds = float(last[v]["epoch_seconds"])
            measured[v].add(seconds, mem.peak)
            _log(f"  epoch {e + 1}/{args.epochs}: {v} {seconds:.2f}s")

    skip = 1 if args.epochs > 1 else 0
    timed = {v: Measured(measured[v].seconds[skip:], measured[v].peaks[skip:]) for v in variants}
    speed = paired_ratio(timed[EAGER], timed[FAST])
    rows: list[dict[str, Any]] = []
    for v in variants:
        model, _, cfg = load_trained(work / v, device=str(device))
        res = final_evaluation(
            cfg, model, data, attacks=["clean", "pgd20"], mode="independent", seed=args.seed
        )
        acc = {r.attack: r.accuracy for r in res.rows}
        rows.append(
            {
                "variant": v,
                "perf": desc[v],
                "epoch_seconds": measured[v].seconds,
                "median_epoch_s": statistics.median(timed[v].seconds),
                "images_per_s": len(data.x_train) / statistics.median(timed[v].seconds),
                "peak_memory_bytes": timed[v].peak_bytes,
                "clean_acc": acc.get("clean"),
                "pgd20_acc": acc.get("pgd20"),
                "eval_n": res.n,
                "last_train_metrics": last[v],
            }
        )
    by = {r["variant"]: r for r in rows}
    gap = abs(by[FAST]["pgd20_acc"] - by[EAGER]["pgd20_acc"])
    cfg0 = cfgs[EAGER]
    # model FLOPs (fp32 eager count of one step) x images/s / the device's peak bf16 FLOP/s
    flops, batch = objective_step_flops(cfg0, data, device)
    flops_per_image = flops / batch
    peak = peak_flops(device, args.peak_tflops)
    for r in rows:
        r["achieved_flops"] = flops_per_image * r["images_per_s"]
        r["mfu"] = None if peak is None else r["achieved_flops"] / peak
    return {
        "machine": machine(),
        "device": device_line(device),
        "memory_metric": memory_label(device),
        "dataset": data.info.name,
        "train_images": len(data.x_train),
        "config": args.config,
        "model": cfg0.model.name,
        "model_options": cfg0.model.options,
        "batch_size": cfg0.batch_size,
        "epochs": args.epochs,
        "epochs_from_budget": budget,
        "args": vars(args),
        "rows": rows,
        "speedup_paired": speed,
        "speedup_of_medians": by[EAGER]["median_epoch_s"] / by[FAST]["median_epoch_s"],
        "pgd20_gap_points": gap,
        "flops_per_image": flops_per_image,
        "peak_flops": peak,
        "targets": {
            "speedup_at_least": TARGET_SPEEDUP,
            "pgd20_gap_at_most": TARGET_POINTS,
            "speedup_met": speed["median"] >= TARGET_SPEEDUP,
            "gap_met": gap <= TARGET_POINTS,
            "note": "the issue's targets are for an H100 on the CIFAR-10 subset",
        },
    }


def budget_text(budget: dict[str, Any] | None) -> str:
    if not budget:
        return ""
    return (
        f" (what fitted a {budget['budget_s']:.0f} s budget after a "
        f"{budget['calibration_s']:.0f} s calibration)"
    )


def peak_text(peak: float | None) -> str:
    return "n/a: no known peak for this device" if peak is None else f"{peak / 1e12:.1f} TFLOP/s"


def table(results: dict[str, Any]) -> str:
    mem = results["memory_metric"]
    header = ["path", "perf", "median epoch s", "images/s", "TFLOP/s", "MFU", "clean %",
              "PGD-20 %", f"{mem} (MiB)"]  # fmt: skip
    rows = [
        [
            r["variant"],
            r["perf"],
            f"{r['median_epoch_s']:.2f}",
            f"{r['images_per_s']:.0f}",
            f"{r['achieved_flops'] / 1e12:.2f}",
            "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            f"{r['clean_acc']:.1f}",
            f"{r['pgd20_acc']:.1f}",
            mib(r["peak_memory_bytes"]),
        ]
        for r in results["rows"]
    ]
    t = results["targets"]
    head = (
        f"{results['dataset']}, {results['train_images']} training images, "
        f"{results['model']} {results['model_options']}, batch {results['batch_size']}, "
        f"{results['epochs']} epochs{budget_text(results['epochs_from_budget'])}, "
        f"on {results['device']}; eval on "
        f"{results['rows'][0]['eval_n']} test points\n\n"
        f"speed-up fp32 eager / fast = {ratio_text(results['speedup_paired'])} "
        f"(median per-epoch ratio, 95% CI; ratio of medians "
        f"{results['speedup_of_medians']:.3f}); target >= {t['speedup_at_least']}: "
        f"{'met' if t['speedup_met'] else 'not met'}\n"
        f"PGD-20 gap = {results['pgd20_gap_points']:.2f} points; target <= "
        f"{t['pgd20_gap_at_most']}: {'met' if t['gap_met'] else 'not met'} ({t['note']})\n"
        f"model FLOPs per image (one step, fp32 eager count): "
        f"{results['flops_per_image'] / 1e9:.3g} GFLOP; MFU = achieved / the device's peak "
        f"dense bf16 FLOP/s ({peak_text(results['peak_flops'])})"
    )
    return head + "\n\n" + markdown_table(header, rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="smoke run on the digits")
    p.add_argument("--out", help="folder for results.json and table.md")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--config", help="default: cifar10-pgdat (digits-pgdat on the digits)")
    p.add_argument("--model", help="default: preact_resnet18 on CUDA, the config's on the CPU")
    p.add_argument("--epochs", type=int, help="default: the config's on CUDA, 3 on the CPU")
    p.add_argument("--batch-size", type=int)
    p.add_argument(
        "--train-size",
        type=int,
        help="first N training images (a multiple of the batch spares torch.compile a "
        "recompilation for the last, smaller batch)",
    )
    p.add_argument("--fast-amp", default="bf16", choices=["auto", "bf16", "fp32"])
    p.add_argument("--fast-channels-last", default="true", choices=["true", "false"])
    p.add_argument("--no-compile", action="store_true", help="the fast path without compile")
    p.add_argument("--eval-n", type=int, help="test points for the evaluation (eval.n)")
    p.add_argument("--set", action="append", default=[], help="extra config override KEY=VALUE")
    p.add_argument(
        "--budget-s", type=float, help="fit the run into about this many seconds (see above)"
    )
    p.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="keep the runs in this new folder (default: a temp folder)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if args.quick:
        data = load_dataset("digits")
        args.epochs, args.no_compile = args.epochs or 2, True
        args.eval_n = args.eval_n or 64
    else:
        data = cifar_or_digits(args.data_dir)
    data = first_train_images(data, args.train_size)
    prefix = "cifar10" if data.info.name == "cifar10" else "digits"
    args.config = args.config or f"{prefix}-pgdat"
    if args.epochs is None:
        args.epochs = load_config(args.config).epochs if device.type == "cuda" else 3
    if args.eval_n:
        args.set.append(f"eval.n={args.eval_n}")
    with work_folder(args.work, "jeat-fast-path-") as work:
        results = run(args, data, work)
    emit(results, table(results), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
