"""Training throughput of the objectives, and of our PGD-AT against a plain PyTorch loop.

1. Images per second of whole training epochs run by ``jeat.train.train`` for the objectives
   ``standard``, ``pgd-at`` (PGD-10), ``jem`` and ``jeat`` on the same model and data: the
   shipped ``cifar10-*`` configs (their ``small_cnn``, width 32) on the CIFAR-10 subset when
   ``--data-dir`` holds it, else the ``digits-*`` configs on the embedded digits. Each
   objective's time per epoch is reported relative to ``standard``.
2. A **reference PGD-AT loop** written here in plain PyTorch (not jeat's training code): the
   same architecture built from the same initial-weight seed as ``train_and_finish()``, the config's
   optimiser (Adam, learning rate, betas, weight decay) with its linear warm-up and cosine
   schedule, the same batch size, PGD-10 inline (random start in the L-inf ball, signed steps of
   the config's step size, projection, model in eval mode during the attack as jeat's default
   ``attack_mode: eval``), cross-entropy on the adversarial batch, no augmentation. Ours runs
   with ``data.augment=false`` for parity (every objective does, so they compare like with
   like; ``--augment`` turns it on for ours). Prints ours / reference (target: <= 1.0).
3. FLOPs of one training step per objective (``torch.utils.flop_counter.FlopCounterMode``,
   counting everything the step executes forward and backward: attack steps, SGLD steps and the
   final loss; matrix products and convolutions only, 2 FLOPs per multiply-add), as FLOPs per
   image, and the FLOP/s the timed epochs achieved. On CUDA also the model-FLOPs utilisation:
   achieved FLOP/s / the device's peak dense bf16 FLOP/s (H100 and H200 SXM 989.4, H100 and
   H200 NVL 835, H100 PCIe 756, A100 312 TFLOP/s; ``--peak-tflops`` overrides). On the CPU it
   is n/a.

Interleaving: every variant advances one epoch per round, in an order rotated from round to
round; our runs continue with ``train_and_finish(..., resume=True)`` and one more epoch each
round. The
first epoch of every variant is excluded as warm-up; the rest give the median. A peak-memory
column covers each row (CUDA: peak allocated; CPU: host peak RSS above the RSS before the
row's ``train_and_finish()`` call, which includes setting up the run and writing its
checkpoint, or the
reference loop's epoch).

CPU default: the first 1,024 images of the training set (``--train-size``; the whole 5,085-image
subset on CUDA), so that four objectives and the reference loop, three epochs each, fit in
about 20 minutes of a shared 2-core CPU.

Usage (the command that produced ``benchmarks/results/train_throughput/``)::

    python benchmarks/train_throughput.py --data-dir ../shared/data \\
        --out benchmarks/results/train_throughput

Other examples: ``--device cuda --model preact_resnet18 --objectives pgd-at``, ``--amp bf16
--channels-last true --compile``, ``--set model.options.width=16``. ``--quick`` is a smoke run
of seconds on the digits.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    LEAN_OVERRIDES,
    ROOT,
    Measured,
    PeakMemory,
    cifar_or_digits,
    count_flops,
    device_line,
    emit,
    first_train_images,
    machine,
    markdown_table,
    memory_label,
    mib,
    num,
    objective_step_flops,
    peak_flops,
    quiet_stdout,
    rotated,
    work_folder,
)
from torch import Tensor

from jeat.accel import Accelerator
from jeat.config import TrainConfig, load_config
from jeat.data import ImageDataset, load_dataset
from jeat.finish import train_and_finish
from jeat.runs import build_model
from jeat.utils import derive_seed, resolve_device

OBJECTIVES = {"standard": "standard", "pgd-at": "pgdat", "jem": "jem", "jeat": "jeat"}
REFERENCE = "reference"


class ReferencePGDAT:
    """Madry PGD adversarial training in plain PyTorch, for comparison with ``train_and_finish()``.

    jeat only builds the network (so both loops train the same architecture from the same
    initial weights); the loop, the attack, the loss, the optimiser and the schedule are
    written here. ``perf`` settings in the config are applied the plain way (``torch.autocast``,
    ``channels_last`` tensors, ``torch.compile``), ``auto`` resolved as jeat resolves it.
    """

    def __init__(
        self, cfg: TrainConfig, data: ImageDataset, device: torch.device, compile: bool = True
    ) -> None:
        torch.manual_seed(
            derive_seed(cfg.seed, 0, 0, 0)
        )  # train_and_finish()'s initial-weight seed
        self.model = build_model(cfg, data.info).to(device)
        perf = Accelerator.from_perf(device, cfg.perf)
        self.amp, self.channels_last = perf.amp_dtype, perf.channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.net = torch.compile(self.model) if perf.compile and compile else self.model
        a = cfg.objective.attack
        if a.norm.lower() != "linf":
            raise SystemExit("the reference loop implements the L-inf attack only")
        self.eps = data.info.eps_linf if a.eps is None else float(a.eps)
        self.steps = a.steps
        self.alpha = a.step_size if a.step_size is not None else 2.5 * self.eps / a.steps
        o = cfg.optim
        params = self.model.parameters()
        if o.name == "adam":
            betas = (float(o.betas[0]), float(o.betas[1]))
            self.opt: torch.optim.Optimizer = torch.optim.Adam(
                params, lr=o.lr, betas=betas, weight_decay=o.weight_decay
            )
        elif o.name == "sgd":
            self.opt = torch.optim.SGD(
                params,
                lr=o.lr,
                momentum=o.momentum,
                nesterov=o.nesterov and o.momentum > 0,
                weight_decay=o.weight_decay,
            )
        else:
            raise SystemExit(f"the reference loop implements adam and sgd, not {o.name}")
        self.x, self.y = data.x_train.to(device), data.y_train.to(device)
        self.batch = cfg.batch_size
        total = math.ceil(len(self.x) / self.batch) * cfg.epochs
        warm = cfg.schedule.warmup_steps

        def factor(step: int) -> float:  # linear warm-up, then cosine to zero
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.device = device
        self.noise = torch.Generator(device=device).manual_seed(cfg.seed)
        self.order = torch.Generator().manual_seed(cfg.seed)
        self.last: dict[str, float] = {}

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.amp is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.amp):
                yield

    def attack(self, x: Tensor, y: Tensor) -> Tensor:
        """PGD in the L-inf ball from a uniform random start (model in eval mode)."""
        self.model.eval()
        start = torch.rand(x.shape, generator=self.noise, device=x.device, dtype=x.dtype)
        x_adv = (x + self.eps * (2 * start - 1)).clamp(0.0, 1.0)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(self.net(x_adv).float(), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + self.alpha * grad.sign()
            x_adv = torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps).clamp(0, 1)
        self.model.train()
        return x_adv.detach()

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One optimiser step on the adversarial batch; its loss and correct count (on-device)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            x_adv = self.attack(x, y)
            logits = self.net(x_adv)
            loss = F.cross_entropy(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.schedule.step()
        return loss.detach(), (logits.argmax(1) == y).sum()

    def epoch(self) -> float:
        """One epoch over the training images in a fresh random order; its seconds."""
        start = time.perf_counter()
        perm = torch.randperm(len(self.x), generator=self.order).to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for i in range(0, len(perm), self.batch):
            idx = perm[i : i + self.batch]
            loss, right = self.step(self.x[idx], self.y[idx])
            loss_sum += loss * len(idx)
            correct += right
        n = len(perm)
        self.last = {"loss": loss_sum.item() / n, "acc": 100.0 * correct.item() / n}  # syncs
        return time.perf_counter() - start


def make_cfg(prefix: str, objective: str, epochs: int, args: argparse.Namespace) -> TrainConfig:
    o = [
        *LEAN_OVERRIDES,
        f"epochs={epochs}",
        f"seed={args.seed}",
        f"device={args.device}",
        f"data.augment={str(args.augment).lower()}",
    ]
    if args.model:
        o += [f"model.name={args.model}", "model.options={}"]
    if args.batch_size:
        o.append(f"batch_size={args.batch_size}")
    if args.amp:
        o.append(f"perf.amp={args.amp}")
    if args.channels_last:
        o.append(
            f"perf.channels_last={'null' if args.channels_last == 'auto' else args.channels_last}"
        )
    if args.compile:
        o.append("perf.compile=true")
    return load_config(f"{prefix}-{OBJECTIVES[objective]}", [*o, *args.set])


def step_flops(
    cfg: TrainConfig, data: ImageDataset, device: torch.device, objective: str
) -> tuple[int, int]:
    """FLOPs of one training step (forward and backward of everything it runs) on the first
    ``batch_size`` training images, in fp32 eager mode; and the batch size."""
    if objective != REFERENCE:
        return objective_step_flops(cfg, data, device)
    n = min(cfg.batch_size, len(data.x_train))
    x, y = data.x_train[:n].to(device), data.y_train[:n].to(device)
    ref = ReferencePGDAT(cfg, data, device, compile=False)
    ref.amp = None
    return count_flops(lambda: ref.step(x, y)), n


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, data: ImageDataset, work: Path) -> dict[str, Any]:
    device = resolve_device(args.device)
    prefix = "cifar10" if data.info.name == "cifar10" else "digits"
    data = first_train_images(data, args.train_size)
    n_train = len(data.x_train)
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    variants = list(objectives)
    if "pgd-at" in objectives and not args.no_reference:
        variants.append(REFERENCE)
    cfgs = {
        v: make_cfg(prefix, "pgd-at" if v == REFERENCE else v, args.epochs, args) for v in variants
    }
    ref = ReferencePGDAT(cfgs[REFERENCE], data, device) if REFERENCE in variants else None
    perf = cfgs[variants[0]].perf
    print(
        f"{data.info.name}: {n_train} training images, {args.epochs} epochs per variant, "
        f"{cfgs[variants[0]].model.name} {cfgs[variants[0]].model.options}, batch "
        f"{cfgs[variants[0]].batch_size}, perf {perf}, device {device_line(device)}",
        flush=True,
    )
    measured = {v: Measured() for v in variants}
    for e in range(args.epochs):
        for v in rotated(variants, e):
            if v == REFERENCE:
                assert ref is not None
                with PeakMemory(device) as mem:
                    seconds = ref.epoch()
            else:
                cfg = make_cfg(prefix, v, e + 1, args)
                with PeakMemory(device) as mem, quiet_stdout():
                    result = train_and_finish(cfg, work / v, resume=e > 0, data=data)
                seconds = float(result.metrics[-1]["epoch_seconds"])
            measured[v].add(seconds, mem.peak)
            _log(f"  epoch {e + 1}/{args.epochs}: {v} {seconds:.2f}s")

    peak = peak_flops(device, args.peak_tflops)
    rows: list[dict[str, Any]] = []
    for v in variants:
        secs = measured[v].seconds
        timed = secs[1:] if len(secs) > 1 else secs
        median = statistics.median(timed)
        flops, flop_batch = step_flops(cfgs[v], data, device, v)
        per_image = flops / flop_batch
        images_per_s = n_train / median
        achieved = per_image * images_per_s
        events = work / v / "events.jsonl"
        rows.append(
            {
                "variant": v,
                "label": "reference PGD-AT loop (plain PyTorch)" if v == REFERENCE else v,
                "epoch_seconds": secs,
                "median_epoch_s": median,
                "images_per_s": images_per_s,
                "flops_per_image": per_image,
                "achieved_flops": achieved,
                "mfu": None if peak is None else achieved / peak,
                "peak_memory_bytes": measured[v].peak_after(1 if len(secs) > 1 else 0),
                "recoveries": len(events.read_text().splitlines()) if events.exists() else 0,
            }
        )
    by = {r["variant"]: r for r in rows}
    std = by.get("standard")
    for r in rows:
        ratio = None if std is None else r["median_epoch_s"] / std["median_epoch_s"]
        r["time_ratio_to_standard"] = ratio
    results: dict[str, Any] = {
        "machine": machine(),
        "device": device_line(device),
        "memory_metric": memory_label(device),
        "peak_flops": peak,
        "dataset": data.info.name,
        "train_images": n_train,
        "model": cfgs[variants[0]].model.name,
        "model_options": cfgs[variants[0]].model.options,
        "batch_size": cfgs[variants[0]].batch_size,
        "perf": Accelerator.from_perf(device, perf).describe(),
        "epochs": args.epochs,
        "args": vars(args),
        "rows": rows,
    }
    if ref is not None:
        results["ours_over_reference"] = (
            by["pgd-at"]["median_epoch_s"] / by[REFERENCE]["median_epoch_s"]
        )
        results["reference_last_epoch"] = ref.last
    return results


def table(results: dict[str, Any]) -> str:
    mem = results["memory_metric"]
    header = [
        "objective",
        "median epoch s",
        "images/s",
        "time / standard",
        "GFLOP per image",
        "achieved GFLOP/s",
        "MFU",
        f"{mem} (MiB)",
    ]
    rows = []
    for r in results["rows"]:
        ratio = r["time_ratio_to_standard"]
        rows.append(
            [
                r["label"],
                f"{r['median_epoch_s']:.2f}",
                num(r["images_per_s"]),
                "n/a" if ratio is None else f"{ratio:.2f}",
                f"{r['flops_per_image'] / 1e9:.3g}",
                num(r["achieved_flops"] / 1e9),
                "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                mib(r["peak_memory_bytes"]),
            ]
        )
    head = (
        f"{results['dataset']}, {results['train_images']} training images, "
        f"{results['model']} {results['model_options']}, batch {results['batch_size']}, "
        f"{results['perf']}, median of epochs 2-{results['epochs']} (time and memory)"
    )
    if "ours_over_reference" in results:
        head += f"; PGD-AT ours / reference loop = {results['ours_over_reference']:.2f}"
    return head + "\n\n" + markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="smoke run of seconds on the digits")
    p.add_argument("--out", help="folder for results.json and table.md")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--epochs", type=int, default=3, help="per variant; the first is warm-up")
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--train-size", type=int, help="first N training images (CPU default 1024)")
    p.add_argument("--model", help="model name (its default options; --set adds options)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--amp", choices=["auto", "bf16", "fp32"], help="perf.amp")
    p.add_argument("--channels-last", choices=["auto", "true", "false"], help="perf.channels_last")
    p.add_argument("--compile", action="store_true", help="perf.compile=true")
    p.add_argument("--augment", action="store_true", help="our runs with data augmentation")
    p.add_argument("--no-reference", action="store_true", help="skip the plain PGD-AT loop")
    p.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s")
    p.add_argument("--set", action="append", default=[], help="extra config override KEY=VALUE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="keep the runs in this new folder (default: a temp folder)")
    args = p.parse_args(argv)
    if unknown := [
        o for o in args.objectives.split(",") if o.strip() and o.strip() not in OBJECTIVES
    ]:
        p.error(f"unknown objective(s) {unknown}; choose from {', '.join(OBJECTIVES)}")
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    device = resolve_device(args.device)
    if args.quick:
        data = load_dataset("digits")
        args.train_size, args.epochs = 128, 2
        args.set = ["model.options.width=8", *args.set]
    else:
        data = cifar_or_digits(args.data_dir)
        if args.train_size is None and device.type != "cuda":
            args.train_size = 1024
    with work_folder(args.work, "jeat-train-throughput-") as work:
        results = run(args, data, work)
    emit(results, table(results), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
