"""Host allocator: CPU attack and training time with glibc's default ``malloc`` behaviour
against :func:`jeat.accel.tune_host_allocator` (what the ``jeat`` command runs with).

The setting is process-wide, so every measurement is a fresh child process started with
``JEAT_MALLOC=system`` or ``JEAT_MALLOC=tuned``; round ``r`` runs both, in an order rotated from
round to round. A child does one untimed warm-up call, then ``--calls`` timed calls, and reports
their median seconds, its minor page faults and kernel (system) CPU seconds per call, and its
peak RSS. Tasks:

* ``attack``: our PGD-20 (L-inf 8/255, step eps/4) on the ``cifar10-pgdat`` ``small_cnn``
  (width 32, untrained) and a batch of 128 uniform random 3x32x32 images;
* ``resnet-attack`` (``--resnet``): the same with PreAct-ResNet-18;
* ``train``: one PGD-AT epoch of ``jeat.train`` (``digits-pgdat``, 1,437 embedded digits
  images, final steps off);
* ``cifar-train``: one PGD-AT epoch of ``cifar10-pgdat`` (PGD-10, ``small_cnn`` width 32) on
  the first 512 images of the CIFAR-10 subset under ``--data-dir``; skipped, saying so, when
  the data are not there.

The ratio tuned / system is the median of the per-round ratios with a 95% bootstrap interval
(below 1: the tuned allocator is faster).

Usage (the command that produced ``benchmarks/results/host_allocator/``)::

    python benchmarks/host_allocator.py --out benchmarks/results/host_allocator
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    LEAN_OVERRIDES,
    ROOT,
    Measured,
    emit,
    machine,
    markdown_table,
    paired_ratio,
    quiet_stdout,
    ratio_text,
    rotated,
)

MODES = ("system", "tuned")
TASKS = ("attack", "train", "cifar-train")
CIFAR_TRAIN_IMAGES = 512


def child(mode: str, task: str, calls: int, data_dir: str) -> dict[str, Any]:
    """Run in a fresh process: set the allocator, then time ``task``."""
    import torch

    from jeat.accel import tune_host_allocator
    from jeat.attacks import PGD, LinfBall
    from jeat.config import load_config
    from jeat.data import ImageDataset, load_dataset
    from jeat.finish import train_and_finish
    from jeat.models import create_model

    applied = tune_host_allocator()
    if applied != (mode == "tuned"):
        raise SystemExit(f"JEAT_MALLOC={mode} but tune_host_allocator() returned {applied}")
    torch.manual_seed(0)
    if task in ("attack", "resnet-attack"):
        name = "preact_resnet18" if task == "resnet-attack" else "small_cnn"
        opts = {"width": 32, "norm": "none", "activation": "relu"} if name == "small_cnn" else {}
        model = create_model(name, in_channels=3, num_classes=10, **opts).eval()
        x, y = torch.rand(128, 3, 32, 32), torch.randint(0, 10, (128,))
        attack = PGD(LinfBall(8 / 255), steps=20)

        def run() -> None:
            attack(model, x, y, check=False)

    else:
        work = Path(tempfile.mkdtemp(prefix="jeat-alloc-"))
        data = None
        if task == "cifar-train":
            d = load_dataset("cifar10", root=data_dir)
            n = CIFAR_TRAIN_IMAGES
            data = ImageDataset(d.info, d.x_train[:n], d.y_train[:n], d.x_test, d.y_test)
        name = "cifar10-pgdat" if task == "cifar-train" else "digits-pgdat"
        cfg = load_config(name, [*LEAN_OVERRIDES, "epochs=1", "device=cpu"])
        count = [0]

        def run() -> None:
            count[0] += 1
            with quiet_stdout():
                train_and_finish(cfg, work / str(count[0]), data=data)

    run()  # warm-up
    seconds, faults, kernel = [], [], []
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        kernel.append(after.ru_stime - before.ru_stime)
    return {
        "seconds": statistics.median(seconds),
        "minor_faults": statistics.median(faults),
        "system_cpu_s": statistics.median(kernel),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def spawn(mode: str, task: str, calls: int, data_dir: str) -> dict[str, Any]:
    env = {**os.environ, "JEAT_MALLOC": mode}
    cmd = [sys.executable, __file__, "--child", mode, task, "--calls", str(calls)]
    cmd += ["--data-dir", data_dir]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child {mode} {task} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict[str, Any]) -> str:
    rows = []
    for task, block in results["tasks"].items():
        for mode in MODES:
            r = block[mode]
            rows.append(
                [
                    task,
                    mode,
                    f"{statistics.median(r['seconds']):.2f}",
                    f"{statistics.median(r['minor_faults']):,.0f}",
                    f"{statistics.median(r['system_cpu_s']):.2f}",
                    f"{max(r['peak_rss_bytes']) / 2**20:.0f}",
                ]
            )
    header = ["task", "allocator", "median s", "minor faults", "kernel CPU s", "peak RSS MiB"]
    lines = [
        f"{t}: tuned / system = {ratio_text(b['tuned_over_system'])} "
        f"(median per-round ratio, 95% CI, {b['tuned_over_system']['rounds']} rounds)"
        for t, b in results["tasks"].items()
    ]
    return "\n".join(lines) + "\n\n" + markdown_table(header, rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=2, metavar=("MODE", "TASK"), help=argparse.SUPPRESS)
    p.add_argument("--calls", type=int, default=2, help="timed calls per child")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--resnet", action="store_true", help="add the PreAct-ResNet-18 attack")
    p.add_argument("--quick", action="store_true", help="smoke run: one round, one call")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", help="folder for results.json and table.md")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.calls, args.data_dir)))
        return 0
    if args.quick:
        args.rounds, args.calls = 1, 1
    tasks = [*TASKS, "resnet-attack"] if args.resnet else list(TASKS)
    if not (Path(args.data_dir) / "cifar-10-batches-py").is_dir():
        print(f"no CIFAR-10 subset under {args.data_dir}: the cifar-train task is skipped")
        tasks.remove("cifar-train")
    runs: dict[str, dict[str, dict[str, list]]] = {t: {m: {} for m in MODES} for t in tasks}
    measured = {t: {m: Measured() for m in MODES} for t in tasks}
    for r in range(args.rounds):
        for task in tasks:
            for mode in rotated(list(MODES), r):
                got = spawn(mode, task, args.calls, args.data_dir)
                for k, v in got.items():
                    runs[task][mode].setdefault(k, []).append(v)
                measured[task][mode].add(got["seconds"], got["peak_rss_bytes"])
                print(
                    f"  round {r + 1}/{args.rounds}: {task} {mode} {got['seconds']:.2f}s, "
                    f"{got['minor_faults']:,} faults",
                    file=sys.stderr,
                    flush=True,
                )
    results: dict[str, Any] = {
        "machine": machine(),
        "args": vars(args),
        "tasks": {
            t: {
                **runs[t],
                "tuned_over_system": paired_ratio(measured[t]["tuned"], measured[t]["system"]),
            }
            for t in tasks
        },
    }
    emit(results, table(results), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
