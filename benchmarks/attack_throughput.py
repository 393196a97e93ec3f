"""Attack throughput: our PGD-20 against torchattacks', and our PGD-20 on the fast path.

On the same model, batch and device, interleaved in one process (every round runs all rows,
in an order rotated from round to round, after one untimed warm-up round; medians):

* ``torchattacks``: ``torchattacks.PGD`` (L-inf, step eps/4, 20 steps, random start);
* (a) ``fp32 eager``: ``jeat.attacks.PGD(LinfBall(eps), steps=20)``, the same attack, called
  with ``check=False`` as the training loop calls it (torchattacks validates nothing either);
* (b) ``bf16 autocast``: (a) inside ``Accelerator.autocast()`` (``perf.amp=bf16``);
* (c) ``channels-last``: the model and the batch in NHWC layout (``perf.channels_last``);
* (d) ``compiled``: ``torch.compile`` of the model (``perf.compile``); the warm-up round
  pays the compilation;
* (e) ``all``: (b), (c) and (d) together.

Each row gets images per second, its time ratio to (a) (below 1: faster), and a peak-memory
column: on CUDA the peak allocated memory, on the CPU the host peak RSS above the RSS before
the call. The headline is ours / torchattacks = time of (a) / time of torchattacks (target:
<= 1.0 on the CPU): the ratio of the medians, and the median of the per-round ratios with a
95% bootstrap interval. The process runs with :func:`jeat.accel.tune_host_allocator` (as the
``jeat`` command does; it applies to both libraries alike) unless ``--allocator system``.

Models (untrained weights: the cost of PGD does not depend on them):

* ``digits``: the ``digits-pgdat`` config's ``small_cnn`` (width 32) on the 360 digits test
  images (1x8x8);
* ``cifar-shape``: the ``cifar10-pgdat`` config's ``small_cnn`` (width 32) on uniform random
  3x32x32 images with random labels;
* ``preact_resnet18`` (CUDA only, or ``--resnet`` on the CPU): PreAct-ResNet-18 on random
  3x32x32 images, batch 128.

CPU default: the CIFAR-shaped batch is 128 (as in ``eval_cost.py``), not the 256 used on CUDA:
bf16 is emulated on a CPU without native bf16 instructions (about 11x slower than fp32 on the
AVX2 machine the shipped results come from), and at 256 the run would take about 20 minutes of
an idle 2-core CPU.

Usage (the command that produced ``benchmarks/results/attack_throughput/``)::

    python benchmarks/attack_throughput.py --out benchmarks/results/attack_throughput

``--quick`` is a smoke run of seconds (small batches, one round, no torch.compile rows).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from typing import Any

import torch
from common import (
    Measured,
    device_line,
    emit,
    interleaved,
    machine,
    markdown_table,
    memory_label,
    mib,
    num,
    paired_ratio,
    ratio_text,
)
from torch import Tensor, nn

from jeat.accel import Accelerator, tune_host_allocator
from jeat.attacks import PGD, LinfBall
from jeat.data import dataset_info, load_dataset
from jeat.models import create_model
from jeat.utils import resolve_device

STEPS = 20
# row key -> (label, amp, channels_last, compile)
VARIANTS: dict[str, tuple[str, str, bool, bool]] = {
    "a": ("(a) fp32 eager", "fp32", False, False),
    "b": ("(b) bf16 autocast", "bf16", False, False),
    "c": ("(c) channels-last", "fp32", True, False),
    "d": ("(d) torch.compile", "fp32", False, True),
    "e": ("(e) bf16 + channels-last + compile", "bf16", True, True),
}
TORCHATTACKS = "torchattacks"


def ours_call(
    model: nn.Module, acc: Accelerator, x: Tensor, y: Tensor, eps: float, seed: int
) -> Callable[[], object]:
    """One PGD-20 run of ours on the prepared model ``model`` under ``acc``'s settings."""
    attack = PGD(LinfBall(eps), steps=STEPS)
    xb = acc.batch(x)
    calls = [seed]

    def run() -> Tensor:
        calls[0] += 1  # a fresh random start each call, reproducible from the seed
        gen = torch.Generator(device=x.device).manual_seed(calls[0])
        with acc.autocast():
            return attack(model, xb, y, generator=gen, check=False)

    return run


def bench_model(
    name: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    device: torch.device,
    variants: list[str],
    repeats: int,
) -> dict[str, Any]:
    """All rows for one model and batch, interleaved."""
    import torchattacks

    model = model.to(device).eval()
    x, y = x.to(device), y.to(device)
    calls: dict[str, Callable[[], object]] = {}
    ref = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=STEPS, random_start=True)
    calls[TORCHATTACKS] = lambda: ref(x, y)
    for key in variants:
        _, amp, channels_last, compiled = VARIANTS[key]
        acc = Accelerator.create(device, amp=amp, channels_last=channels_last, compile=compiled)
        net = acc.prepare(copy.deepcopy(model)).eval()
        calls[key] = ours_call(net, acc, x, y, eps, seed=1000 * (ord(key) - ord("a")))
    print(f"{name}: batch {tuple(x.shape)}, {len(calls)} rows, {repeats} rounds", flush=True)
    timings = interleaved(calls, repeats, device, warmup=1, log=_log)
    return summarise(name, x, timings)


def summarise(name: str, x: Tensor, timings: dict[str, Measured]) -> dict[str, Any]:
    n = x.shape[0]
    base = timings["a"].median if "a" in timings else None
    rows = []
    for key, m in timings.items():
        label = "torchattacks.PGD (fp32 eager)" if key == TORCHATTACKS else VARIANTS[key][0]
        rows.append(
            {
                "row": key,
                "label": label,
                "median_s": m.median,
                "images_per_s": n / m.median,
                "time_ratio_to_a": None if base is None else m.median / base,
                "peak_memory_bytes": m.peak_bytes,
                "seconds": m.seconds,
            }
        )
    out: dict[str, Any] = {"model": name, "batch": list(x.shape), "steps": STEPS, "rows": rows}
    if base is not None:
        out["ours_over_torchattacks"] = base / timings[TORCHATTACKS].median
        out["ours_over_torchattacks_paired"] = paired_ratio(timings["a"], timings[TORCHATTACKS])
    return out


def _headline(block: dict[str, Any]) -> str:
    """Ratio of medians, then the median per-round ratio with its 95% bootstrap interval."""
    p = block["ours_over_torchattacks_paired"]
    return (
        f"{block['ours_over_torchattacks']:.3f} (ratio of medians); per-round median "
        f"{ratio_text(p)} ({p['level']:.0%} CI, {p['rounds']} rounds, "
        f"{p['rounds_below_1']} with ours faster)"
    )


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def table(results: dict[str, Any]) -> str:
    mem = results["memory_metric"]
    parts = []
    for block in results["models"]:
        shape = "x".join(map(str, block["batch"]))
        head = f"**{block['model']}**, PGD-{block['steps']}, batch {shape}"
        if "ours_over_torchattacks" in block:
            head += f": ours / torchattacks = {_headline(block)}"
        rows = []
        for r in block["rows"]:
            ratio = r["time_ratio_to_a"]
            rows.append(
                [
                    r["label"],
                    f"{r['median_s']:.3f}",
                    num(r["images_per_s"]),
                    "n/a" if ratio is None else f"{ratio:.2f}",
                    mib(r["peak_memory_bytes"]),
                ]
            )
        header = ["row", "median s", "images/s", "time / (a)", f"{mem} (MiB)"]
        parts.append(head + "\n\n" + markdown_table(header, rows))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny batches, one round")
    p.add_argument("--out", help="folder for results.json and table.md")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up)")
    p.add_argument("--digits-batch", type=int, default=360)
    p.add_argument("--cifar-batch", type=int, help="default: 256 on CUDA, 128 on the CPU")
    p.add_argument("--resnet-batch", type=int, default=128)
    p.add_argument("--resnet", action="store_true", help="preact_resnet18 rows on the CPU too")
    p.add_argument(
        "--variants", default="a,b,c,d,e", help="rows of ours (a-e); torchattacks always runs"
    )
    p.add_argument(
        "--allocator",
        choices=["tuned", "system"],
        default="tuned",
        help="host malloc as the jeat command runs it (tuned) or glibc's defaults (system)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.allocator == "tuned":
        tune_host_allocator(force=True)
    device = resolve_device(args.device)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    cifar_batch = args.cifar_batch or (256 if device.type == "cuda" else 128)
    digits_batch, resnet_batch, repeats = args.digits_batch, args.resnet_batch, args.repeats
    if args.quick:
        digits_batch, cifar_batch, resnet_batch, repeats = 32, 4, 4, 1
        if args.variants == p.get_default("variants"):
            variants = [v for v in variants if not VARIANTS[v][3]]
            print("quick: the torch.compile rows (d, e) are skipped (compiling takes minutes)")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    digits = load_dataset("digits")
    info = digits.info
    specs: list[tuple[str, nn.Module, Tensor, Tensor, float]] = []
    small = {"width": 32, "norm": "none", "activation": "relu"}
    m = create_model(
        "small_cnn", in_channels=1, num_classes=10, mean=info.mean, std=info.std, **small
    )
    specs.append(
        (
            "digits small_cnn",
            m,
            digits.x_test[:digits_batch],
            digits.y_test[:digits_batch],
            info.eps_linf,
        )
    )
    cifar = dataset_info("cifar10")  # normalisation constants only: no data needed
    cifar_mean, cifar_std = cifar.mean, cifar.std
    xc = torch.rand(cifar_batch, 3, 32, 32, generator=gen)
    yc = torch.randint(0, 10, (cifar_batch,), generator=gen)
    m = create_model(
        "small_cnn", in_channels=3, num_classes=10, mean=cifar_mean, std=cifar_std, **small
    )
    specs.append(("cifar-shape small_cnn", m, xc, yc, 8 / 255))
    if device.type == "cuda" or args.resnet:
        xr = torch.rand(resnet_batch, 3, 32, 32, generator=gen)
        yr = torch.randint(0, 10, (resnet_batch,), generator=gen)
        m = create_model(
            "preact_resnet18", in_channels=3, num_classes=10, mean=cifar_mean, std=cifar_std
        )
        specs.append(("cifar-shape preact_resnet18", m, xr, yr, 8 / 255))

    results: dict[str, Any] = {
        "machine": machine(),
        "device": device_line(device),
        "memory_metric": memory_label(device),
        "args": vars(args),
        "variants": {k: VARIANTS[k][0] for k in variants},
        "models": [],
    }
    for name, model, x, y, eps in specs:
        block = bench_model(name, model, x, y, eps, device, variants, repeats)
        results["models"].append(block)
        if "ours_over_torchattacks" in block:
            print(f"{name}: ours / torchattacks = {_headline(block)}")
    emit(results, table(results), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
