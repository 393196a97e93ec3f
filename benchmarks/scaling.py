"""How the cost of adversarial training grows with the training set and with the model.

(a) **Training-set size.** PGD-AT epochs (the shipped ``cifar10-pgdat`` config as it is:
    ``small_cnn`` width 32, PGD-10, batch 128, crop-and-flip augmentation) through
    ``jeat.train.train`` on the first 1,000, 2,000, 3,000, 4,000 and all 5,085 images of the
    CIFAR-10 subset (``digits-pgdat`` on 360 / 720 / 1,080 / 1,437 digits when ``--data-dir``
    holds no CIFAR-10). One untimed warm-up epoch first, then ``--rounds`` rounds of one fresh
    one-epoch run per size, in ascending order in even rounds and descending in odd ones (drift
    in the machine's load then hits small and large sizes alike); a size's time is the median
    over rounds. Reported: seconds per epoch and per image, the least-squares line
    ``seconds = a + b * images`` with its R², and each size's per-image time relative to the
    largest size's (constant per-image time, i.e. ratios near 1, means linear cost).

(b) **Model size.** Seconds per image of one PGD-10 training step (the ``cifar10-pgdat``
    objective and optimiser: PGD-10 at 8/255, step 2/255, then the cross-entropy step with Adam)
    on random 3x32x32 images for ``small_cnn`` width 16 / 32 / 64, ``preact_resnet18`` (its
    defaults: width 64, batch norm) and WRN-28-k for k = 1, 2, 4, 10 (``norm=none``, as JEM and
    JEAT train it). One untimed step per model (under the FLOP counter, which gives the FLOPs
    per image: forward and backward of the ten attack steps and the training step), then
    ``--steps`` timed steps per model, interleaved across models in a rotated order; the median
    step time over the batch gives seconds per image, and FLOPs per image over it the achieved
    FLOP/s. CPU default batch: 8 for every model (WRN-28-10 costs about 10.5 GFLOP per image
    forward, 5.2 G multiply-adds, and a PGD-10 step some 25 times that); CUDA default: 128.

Every row has a peak-memory column: on CUDA the peak allocated memory, on the CPU the host peak
RSS above the RSS before the row (an epoch's ``train_and_finish()`` call for (a), one step
for (b), where
all models are alive throughout, so their weights are in the baseline).

Usage (the command that produced ``benchmarks/results/scaling/``)::

    python benchmarks/scaling.py --data-dir ../shared/data --out benchmarks/results/scaling

``--quick`` is a smoke run of seconds (digits sizes 64 / 128 / 192, three small models).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from common import (
    LEAN_OVERRIDES,
    ROOT,
    Measured,
    PeakMemory,
    cifar_or_digits,
    count_flops,
    device_line,
    emit,
    interleaved,
    machine,
    markdown_table,
    memory_label,
    mib,
    num,
    peak_flops,
    quiet_stdout,
    work_folder,
)

from jeat.config import load_config
from jeat.data import ImageDataset, dataset_info, load_dataset
from jeat.finish import train_and_finish
from jeat.models import create_model
from jeat.objectives import create_objective
from jeat.train import make_optimizer
from jeat.utils import resolve_device

CIFAR_SIZES = [1000, 2000, 3000, 4000, 5085]
DIGITS_SIZES = [360, 720, 1080, 1437]
# (label, model name, options)
MODELS: list[tuple[str, str, dict[str, Any]]] = [
    ("small_cnn w16", "small_cnn", {"width": 16, "norm": "none"}),
    ("small_cnn w32", "small_cnn", {"width": 32, "norm": "none"}),
    ("small_cnn w64", "small_cnn", {"width": 64, "norm": "none"}),
    ("preact_resnet18", "preact_resnet18", {}),
    ("WRN-28-1", "wrn", {"depth": 28, "widen": 1, "norm": "none"}),
    ("WRN-28-2", "wrn", {"depth": 28, "widen": 2, "norm": "none"}),
    ("WRN-28-4", "wrn", {"depth": 28, "widen": 4, "norm": "none"}),
    ("WRN-28-10", "wrn", {"depth": 28, "widen": 10, "norm": "none"}),
]
QUICK_MODELS = [
    ("small_cnn w8", "small_cnn", {"width": 8, "norm": "none"}),
    ("small_cnn w16", "small_cnn", {"width": 16, "norm": "none"}),
    ("WRN-10-1", "wrn", {"depth": 10, "widen": 1, "norm": "none"}),
]


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x``: (a, b, R²)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    b = sxy / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


def dataset_scaling(
    args: argparse.Namespace, data: ImageDataset, sizes: list[int], work: Path
) -> dict[str, Any]:
    device = resolve_device(args.device)
    prefix = "cifar10" if data.info.name == "cifar10" else "digits"
    extra = ["model.options.width=8"] if args.quick else []

    def one_epoch(n: int, folder: Path) -> tuple[float, int | None]:
        overrides = [*LEAN_OVERRIDES, "epochs=1", f"seed={args.seed}", f"device={args.device}"]
        cfg = load_config(f"{prefix}-pgdat", [*overrides, f"data.train_subset={n}", *extra])
        with PeakMemory(device) as mem, quiet_stdout():
            result = train_and_finish(cfg, folder, data=data)
        return float(result.metrics[-1]["epoch_seconds"]), mem.peak

    cfg = load_config(f"{prefix}-pgdat", [*LEAN_OVERRIDES, *extra])
    print(
        f"(a) {prefix}-pgdat: {cfg.model.name} {cfg.model.options}, batch {cfg.batch_size}, "
        f"sizes {sizes}, {args.rounds} round(s)",
        flush=True,
    )
    seconds, _ = one_epoch(sizes[0], work / "warmup")
    _log(f"  warm-up epoch on {sizes[0]} images: {seconds:.2f}s")
    measured = {n: Measured() for n in sizes}
    for r in range(args.rounds):
        for n in sizes if r % 2 == 0 else sizes[::-1]:
            seconds, peak = one_epoch(n, work / f"r{r}-n{n}")
            measured[n].add(seconds, peak)
            _log(f"  round {r + 1}/{args.rounds}: {n} images {seconds:.2f}s")
    times = [measured[n].median for n in sizes]
    a, b, r2 = linear_fit([float(n) for n in sizes], times)
    largest = times[-1] / sizes[-1]
    rows = [
        {
            "images": n,
            "epoch_s": t,
            "s_per_image": t / n,
            "per_image_vs_largest": (t / n) / largest,
            "peak_memory_bytes": measured[n].peak_bytes,
            "epoch_seconds": measured[n].seconds,
        }
        for n, t in zip(sizes, times, strict=True)
    ]
    return {
        "config": f"{prefix}-pgdat",
        "model": cfg.model.name,
        "model_options": cfg.model.options,
        "batch_size": cfg.batch_size,
        "rounds": args.rounds,
        "fit": {"intercept_s": a, "s_per_image": b, "r2": r2},
        "rows": rows,
    }


def model_scaling(args: argparse.Namespace, models: list[tuple[str, str, dict]]) -> dict:
    device = resolve_device(args.device)
    info = dataset_info("cifar10")  # shape, classes and normalisation only: the images are random
    cfg = load_config("cifar10-pgdat", [])
    batch = args.batch or (128 if device.type == "cuda" else 8)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand(batch, *info.shape, generator=gen).to(device)
    y = torch.randint(0, info.num_classes, (batch,), generator=gen).to(device)
    print(
        f"(b) PGD-10 training step ({cfg.objective.attack.steps} steps at 8/255, Adam), batch "
        f"{batch}, {len(models)} models, {args.steps} timed steps each",
        flush=True,
    )
    steps: dict[str, Any] = {}
    facts: dict[str, dict[str, Any]] = {}
    for label, name, options in models:
        torch.manual_seed(args.seed)
        model = create_model(
            name,
            in_channels=info.shape[0],
            num_classes=info.num_classes,
            mean=info.mean,
            std=info.std,
            **options,
        ).to(device)
        model.train()
        objective = create_objective(cfg.objective, info)
        opt = make_optimizer(cfg, model)

        def step(model=model, objective=objective, opt=opt) -> None:
            loss = objective(model, x, y).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        with torch.no_grad():
            forward = count_flops(lambda model=model: model(x))
        flops = count_flops(step)  # also the untimed warm-up step
        params = sum(p.numel() for p in model.parameters())
        facts[label] = {"model": name, "options": options, "params": params}
        facts[label]["forward_flops_per_image"] = forward / batch
        facts[label]["step_flops_per_image"] = flops / batch
        _log(f"  {label}: {params / 1e6:.2f} M parameters, {flops / batch / 1e9:.3g} GFLOP/image")
        steps[label] = step
    timings = interleaved(steps, args.steps, device, warmup=0, log=_log)
    peak = peak_flops(device, args.peak_tflops)
    rows = []
    for label, m in timings.items():
        f = facts[label]
        per_image = m.median / batch
        achieved = f["step_flops_per_image"] / per_image
        rows.append(
            {
                "label": label,
                **f,
                "batch": batch,
                "step_s": m.median,
                "s_per_image": per_image,
                "achieved_flops": achieved,
                "mfu": None if peak is None else achieved / peak,
                "peak_memory_bytes": m.peak_bytes,
                "step_seconds": m.seconds,
            }
        )
    return {"batch": batch, "steps": args.steps, "peak_flops": peak, "rows": rows}


def table(results: dict[str, Any]) -> str:
    mem = results["memory_metric"]
    parts = []
    if "dataset" in results:
        d = results["dataset"]
        fit = d["fit"]
        parts.append(
            f"(a) {d['config']} epochs ({d['model']} {d['model_options']}, batch "
            f"{d['batch_size']}), median of {d['rounds']} round(s); least-squares fit: "
            f"seconds = {fit['intercept_s']:.2f} + {1000 * fit['s_per_image']:.3f} ms x images, "
            f"R² = {fit['r2']:.4f}\n\n"
            + markdown_table(
                ["images", "s / epoch", "ms / image", "per-image vs largest", f"{mem} (MiB)"],
                [
                    [
                        str(r["images"]),
                        f"{r['epoch_s']:.2f}",
                        f"{1000 * r['s_per_image']:.3f}",
                        f"{r['per_image_vs_largest']:.3f}",
                        mib(r["peak_memory_bytes"]),
                    ]
                    for r in d["rows"]
                ],
            )
        )
    if "models" in results:
        m = results["models"]
        rows = []
        for r in m["rows"]:
            rows.append(
                [
                    r["label"],
                    f"{r['params'] / 1e6:.2f}",
                    f"{r['forward_flops_per_image'] / 1e9:.3g}",
                    f"{r['step_flops_per_image'] / 1e9:.3g}",
                    f"{1000 * r['s_per_image']:.1f}",
                    num(r["achieved_flops"] / 1e9),
                    "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                    mib(r["peak_memory_bytes"]),
                ]
            )
        header = [
            "model",
            "M params",
            "GFLOP/image forward",
            "GFLOP/image PGD-10 step",
            "ms / image",
            "achieved GFLOP/s",
            "MFU",
            f"{mem} (MiB)",
        ]
        parts.append(
            f"(b) one PGD-10 training step, batch {m['batch']}, median of {m['steps']} steps "
            "per model\n\n" + markdown_table(header, rows)
        )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="smoke run of seconds")
    p.add_argument("--out", help="folder for results.json and table.md")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--parts", default="dataset,models", help="dataset and/or models")
    p.add_argument("--sizes", help="training-set sizes for (a), comma-separated")
    p.add_argument("--rounds", type=int, default=2, help="timed epochs per size in (a)")
    p.add_argument("--batch", type=int, help="batch of (b) (default: 8 on the CPU, 128 on CUDA)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model in (b)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    if not parts or parts - {"dataset", "models"}:
        p.error("--parts takes dataset and/or models")
    device = resolve_device(args.device)
    results: dict[str, Any] = {
        "machine": machine(),
        "device": device_line(device),
        "memory_metric": memory_label(device),
        "args": vars(args),
    }
    models = MODELS
    if args.quick:
        args.rounds, args.steps, args.batch = 1, 1, args.batch or 2
        models = QUICK_MODELS
    if "dataset" in parts:
        if args.quick:
            data, sizes = load_dataset("digits"), [64, 128, 192]
        else:
            data = cifar_or_digits(args.data_dir)
            sizes = CIFAR_SIZES if data.info.name == "cifar10" else DIGITS_SIZES
        if args.sizes:
            sizes = [int(s) for s in args.sizes.split(",")]
        sizes = sorted({min(n, len(data.x_train)) for n in sizes})
        if len(sizes) < 2:
            p.error("the fit needs at least two distinct sizes")
        with work_folder(None, "jeat-scaling-") as tmp:
            results["dataset"] = dataset_scaling(args, data, sizes, tmp)
    if "models" in parts:
        results["models"] = model_scaling(args, models)
    emit(results, table(results), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
