"""The frontier benchmark (issue 29): jeat's training recipes against a plain PyTorch PGD-AT
loop at a matched CPU budget, under AutoAttack, over seeds.

The reference is :func:`plain_pgd_at` below: a short loop that imports nothing from ``jeat``
(only the data reach it from jeat's loaders, as tensors), written the way a researcher with a
40-line script would write it. Its recipe, the same on every dataset:

* the network: two 3x3 convolutions (16 and 32 channels, ReLU; a 2x2 max-pool after each on
  images larger than 8x8), a hidden layer of 100 and the linear head; no normalisation layer;
* Adam, learning rate 2e-3, constant; batch 64; no augmentation;
* PGD-7 with a random start in the L-inf ball, step 0.3 x eps (0.06 at eps 0.2), the loss
  cross-entropy, the model in train mode (it has no batch norm or dropout);
* no schedule of any kind, so it trains for exactly the time it is given: it stops at the
  first epoch end past the budget less half an epoch.

The budget is counted in training seconds measured in this run, with the same number of
torch threads for everything (``--threads``, default 1): per dataset and seed, the CPU seconds
of this process that jeat's ``pgd-at`` recipe (the shipped config) took to train, validation
checks and checkpoints included. CPU seconds of a one-thread process hold whatever else the
machine runs (two benchmarks can share a 2-core machine); ``--clock wall`` counts wall-clock
seconds instead, for an otherwise idle machine. Both are recorded. The plain loop trains
for that many seconds; the other recipes are shipped configs whose seconds are reported beside
it (a recipe over the budget by more than 10% is flagged).

Per dataset, recipe, budget fraction and seed (a *cell*): clean accuracy, PGD-20,
``autoattack-fast`` (APGD-CE then APGD-T) and the worst case over them on the same test points
(independent mode), the training seconds, and the table's masking warnings
(:mod:`jeat.sanity`), printed. At the full budget every recipe runs ``seeds`` seeds, and the
benchmark prints, per dataset, each recipe's means with 95% t-intervals and the paired
difference *jeat's best recipe − the plain loop* on the worst case (:mod:`jeat.stats`). The
fractions below 1 (and above) run seed 0 only and draw the robust accuracy against seconds
curve of each recipe (``frontier-<dataset>.png``): a jeat recipe at fraction f trains
``round(f x epochs)`` epochs (its schedule compressed), the plain loop f x the budget.

Layout of ``--out``::

    results.json, README.md          the tables (README.md is written by hand around table.md)
    table.md                          the tables this script prints
    frontier-<dataset>.png            worst-case robust accuracy against training seconds
    cells/<dataset>/<recipe>/f<fraction>/seed<k>/cell.json   one measured cell

A cell whose ``cell.json`` exists is skipped, so a killed benchmark resumes; jeat runs live in
``--work`` (default ``runs/frontier-work`` under the repository, which git ignores).

Usage::

    python benchmarks/frontier.py --out benchmarks/results/frontier --data-dir ../shared/data
    python benchmarks/frontier.py --out /tmp/f --budget smoke      # the pipeline in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import ROOT, machine, markdown_table, quiet_stdout
from torch import Tensor, nn

from jeat.config import TrainConfig, config_to_dict, load_config
from jeat.data import ImageDataset, load_dataset
from jeat.evaluate import EvalResult, evaluate
from jeat.runs import eval_threat
from jeat.stats import paired_difference, t_interval
from jeat.train import train, train_view
from jeat.utils import write_json

ATTACKS = ["clean", "pgd20", "autoattack-fast"]
PLAIN = "plain"


# --------------------------------------------------------------------------- the reference
def plain_pgd_at(
    x_train: Tensor,
    y_train: Tensor,
    eps: float,
    seconds: float,
    seed: int,
    num_classes: int = 10,
    width: int = 16,
    batch_size: int = 64,
    lr: float = 2e-3,
    steps: int = 7,
    step_ratio: float = 0.3,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[nn.Module, float, int, float]:
    """Plain PGD adversarial training (Madry et al. 2018) for ``seconds`` of training time.

    The recipe is the module docstring's. Returns the network (eval mode), the seconds it
    trained, the epochs it ran and the seconds of its last epoch, all by ``clock``. Uses
    nothing from jeat.
    """
    torch.manual_seed(seed)
    c, h, w = x_train.shape[1:]
    pool = h > 8
    side = h // 4 if pool else h
    net = nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1),
        nn.ReLU(),
        *([nn.MaxPool2d(2)] if pool else []),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        *([nn.MaxPool2d(2)] if pool else []),
        nn.Flatten(),
        nn.Linear(2 * width * side * (w // 4 if pool else w), 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    step = step_ratio * eps
    start, epochs, per_epoch = clock(), 0, 0.0
    while True:
        t_epoch = clock()
        for idx in torch.randperm(len(x_train)).split(batch_size):
            x, y = x_train[idx], y_train[idx]
            delta = torch.empty_like(x).uniform_(-eps, eps)
            delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
            for _ in range(steps):
                loss = F.cross_entropy(net(x + delta), y)
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta + step * grad.sign()).clamp(-eps, eps)
                delta = ((x + delta).clamp(0, 1) - x).detach().requires_grad_(True)
            loss = F.cross_entropy(net(x + delta.detach()), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs += 1
        per_epoch = clock() - t_epoch
        if clock() - start >= seconds - per_epoch / 2:
            break
    return net.eval(), clock() - start, epochs, per_epoch


# --------------------------------------------------------------------------- the plan
@dataclass
class Dataset:
    """One dataset of the benchmark at one budget."""

    name: str  # jeat dataset name
    sub_dir: str  # its folder under --data-dir ("" for the embedded digits)
    recipes: dict[str, str]  # recipe name -> shipped config (pgd-at first: it sets the budget)
    overrides: list[str] = field(default_factory=list)  # applied to every jeat recipe
    recipe_overrides: dict[str, list[str]] = field(default_factory=dict)  # and per recipe
    n_test: int | None = None  # test points (None: all)
    seeds: int = 3
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)  # of the budget; 1.0 with all seeds


FULL = {
    "digits": Dataset(
        "digits",
        "",
        # JEAT at PGD-AT's budget: digits-jeat-ce (CE on the PGD examples); the shipped
        # digits-jeat (JEAT on TRADES with JEM's sampler, the study's best generator) needs
        # about twice the budget (docs/objectives.md)
        {"pgd-at": "digits-pgdat", "trades": "digits-trades", "jeat": "digits-jeat-ce"},
        # five seeds: the plain loop's worst case varies by about 2 points (sd) between seeds
        seeds=5,
    ),
    "mnist-t10k": Dataset(
        "mnist-t10k",
        "mnist",
        {"pgd-at": "mnist-pgdat", "trades": "mnist-trades", "jeat": "mnist-jeat"},
        overrides=["data.name=mnist-t10k"],
        n_test=500,
        # eight seeds: trained from scratch at eps 0.3 the plain loop stalls on some seeds
        # (10-29% worst case against about 80%), and three or five seeds cannot bound a
        # difference that varies this much (benchmarks/results/frontier/README.md)
        seeds=8,
        fractions=(0.25, 0.5, 1.0),
    ),
    "cifar10": Dataset(
        "cifar10",
        "cifar-10-batches-py",
        {"pgd-at": "cifar10-pgdat", "trades": "cifar10-trades", "jeat": "cifar10-jeat"},
        n_test=500,
        fractions=(0.25, 0.5, 1.0),
    ),
}
# The pipeline in seconds (a test runs it); the numbers mean nothing.
SMOKE_OVERRIDES = [
    "epochs=2",
    "data.train_subset=160",
    "model.options.width=4",
    "objective.attack.steps=2",
    "eval.epoch_steps=2",
]
SMOKE = {
    "digits": Dataset(
        "digits",
        "",
        {"pgd-at": "digits-pgdat", "jeat": "digits-jeat-ce"},
        overrides=SMOKE_OVERRIDES,
        recipe_overrides={"jeat": ["objective.options.buffer_size=100"]},
        n_test=24,
        seeds=2,
        fractions=(0.5, 1.0),
    ),
}
BUDGETS = {"full": FULL, "smoke": SMOKE}
# jeat runs trained here are measured here: no final steps, no progress bar
LEAN = [
    "progress=false",
    "final_eval=false",
    "final_samples=false",
    "final_analysis=false",
    "final_scores=false",
    "final_report=false",
    "tensorboard=false",
]


@dataclass
class Cell:
    dataset: str
    recipe: str
    fraction: float
    seed: int

    @property
    def folder(self) -> str:
        return f"cells/{self.dataset}/{self.recipe}/f{self.fraction:g}/seed{self.seed}"


def plan(budgets: dict[str, Dataset], datasets: list[str], seeds: int | None) -> list[Cell]:
    """Every cell, in the order they run: per dataset, seed by seed at the full budget (the
    pgd-at recipe first: it sets the budget the plain loop gets), then the other fractions."""
    cells = []
    for name in datasets:
        d = budgets[name]
        recipes = [*d.recipes, PLAIN]
        for seed in range(seeds or d.seeds):
            cells += [Cell(name, r, 1.0, seed) for r in recipes]
        cells += [Cell(name, r, f, 0) for f in d.fractions if f != 1.0 for r in recipes]
    return cells


def recipe_config(d: Dataset, recipe: str, fraction: float, seed: int) -> TrainConfig:
    base = load_config(d.recipes[recipe], d.overrides)
    epochs = max(1, round(fraction * base.epochs))
    return load_config(d.recipes[recipe], [*d.overrides, *LEAN, f"seed={seed}", f"epochs={epochs}"])


# --------------------------------------------------------------------------- measuring
def measure(model: nn.Module, data: ImageDataset, cfg: TrainConfig, n: int | None, seed: int):
    k = len(data.x_test) if n is None else min(n, len(data.x_test))
    return evaluate(
        model,
        data.x_test[:k],
        data.y_test[:k],
        ATTACKS,
        eval_threat(cfg, data.info),
        seed=1000 + seed,
        mode="independent",
        num_classes=data.info.num_classes,
    )


def numbers(res: EvalResult) -> dict[str, Any]:
    aa = [r for r in res.rows if r.group == "autoattack-fast"]
    return {
        "clean": res.row("clean").accuracy,
        "pgd20": res.row("pgd20").accuracy,
        # AutoAttack's own accuracy: its last component's row (independent mode: the points
        # robust to both of its components)
        "autoattack_fast": aa[-1].accuracy if aa else None,
        "worst_case": res.robust_accuracy,
        "n_test": len(res.robust),
        "warnings": list(res.warnings),
    }


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def run_cell(
    cell: Cell,
    d: Dataset,
    data: ImageDataset,
    out: Path,
    work: Path,
    budget: float | None,
    clock: str,
) -> dict[str, Any]:
    cfg = recipe_config(d, "pgd-at", 1.0, cell.seed)  # the threat model of the dataset
    tick = CLOCKS[clock]
    wall = time.perf_counter()
    if cell.recipe == PLAIN:
        if budget is None:
            raise SystemExit(f"{cell.folder}: no pgd-at cell measured the budget yet")
        eps = eval_threat(cfg, data.info).eps
        view = train_view(cfg, data)  # the pgd-at recipe's training images
        model, seconds, epochs, last = plain_pgd_at(
            view.x_train, view.y_train, eps, budget * cell.fraction, cell.seed,
            data.info.num_classes, clock=tick,
        )  # fmt: skip
        detail: dict[str, Any] = {
            "epochs": epochs,
            "budget_seconds": budget * cell.fraction,
            "last_epoch_seconds": last,
        }
    else:
        cfg = recipe_config(d, cell.recipe, cell.fraction, cell.seed)
        folder = work / cell.folder
        if folder.exists():
            shutil.rmtree(folder)  # a killed cell restarts: its time must be one clean run
        start = tick()
        with quiet_stdout():
            result = train(cfg, folder, data=data)
        seconds = tick() - start
        model = result.model.eval()
        kept = json.loads((folder / "run.json").read_text()).get("kept", {})
        detail = {"epochs": cfg.epochs, "kept": kept, "config": config_to_dict(cfg)}
    res = measure(model, data, cfg, d.n_test, cell.seed)
    row = {
        "dataset": cell.dataset,
        "recipe": cell.recipe,
        "fraction": cell.fraction,
        "seed": cell.seed,
        "train_seconds": seconds,
        "clock": clock,
        "wall_seconds": time.perf_counter() - wall,
        **numbers(res),
        **detail,
    }
    write_json(out / cell.folder / "cell.json", row)
    return row


def stale(row: dict[str, Any], cell: Cell, d: Dataset, budget: float | None) -> str | None:
    """Why a measured cell no longer stands for its recipe (None when it does): a jeat
    recipe's resolved config changed, or the plain loop's budget (its pgd-at cell was
    measured again)."""
    if cell.recipe == PLAIN:
        want = None if budget is None else budget * cell.fraction
        have = row.get("budget_seconds")
        if want is not None and (have is None or abs(have - want) > 1e-6 * max(1.0, want)):
            return "the pgd-at budget it gets changed"
        return None
    cfg = recipe_config(d, cell.recipe, cell.fraction, cell.seed)
    return None if row.get("config") == config_to_dict(cfg) else "its recipe's config changed"


def warm_up(d: Dataset, data: ImageDataset, work: Path) -> None:
    """One untimed epoch of every jeat recipe and of the plain loop on a few images, so that
    no cell's time holds the process's first-call costs (imports, allocator growth)."""
    for recipe in d.recipes:
        cfg = recipe_config(d, recipe, 1.0, 0)
        sets = ["epochs=1", f"data.train_subset={min(128, len(data.x_train))}"]
        cfg = load_config(d.recipes[recipe], [*d.overrides, *d.recipe_overrides.get(recipe, []),
                                              *LEAN, *sets])  # fmt: skip
        folder = work / "warm-up" / f"{d.name}-{os.getpid()}" / recipe  # one per process
        shutil.rmtree(folder, ignore_errors=True)
        with quiet_stdout():
            train(cfg, folder, data=data)
        shutil.rmtree(folder, ignore_errors=True)
    plain_pgd_at(data.x_train[:128], data.y_train[:128], 0.1, 0.0, 0, data.info.num_classes)


# --------------------------------------------------------------------------- reporting
def interval_text(values: list[float], digits: int = 1) -> str:
    i = t_interval(values)
    if i.low is None:
        return f"{i.mean:.{digits}f} (one seed)"
    return f"{i.mean:.{digits}f} [{i.low:.{digits}f}, {i.high:.{digits}f}]"


def summarize(rows: list[dict[str, Any]], budgets: dict[str, Dataset]) -> tuple[dict, str]:
    """Per dataset: each recipe's means and intervals at the full budget, and jeat's best
    recipe minus the plain loop (paired by seed) on the worst case."""
    summary: dict[str, Any] = {}
    text = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        full = [r for r in rows if r["dataset"] == name and r["fraction"] == 1.0]
        recipes = list(dict.fromkeys(r["recipe"] for r in full))
        by = {
            k: sorted((r for r in full if r["recipe"] == k), key=lambda r: r["seed"])
            for k in recipes
        }
        seeds = sorted({r["seed"] for r in full})
        # a recipe measured on fewer seeds keeps its row (its seeds named); the paired
        # difference uses only the recipes measured on every seed
        complete = [k for k, v in by.items() if [r["seed"] for r in v] == seeds]
        table_rows, stats = [], {}
        budget_of = {r["seed"]: r["train_seconds"] for r in by.get("pgd-at", [])}
        for k, cells in by.items():
            budget = [budget_of.get(c["seed"]) for c in cells]
            entry = {
                m: t_interval([float(c[m]) for c in cells]).to_dict()
                for m in ("clean", "pgd20", "autoattack_fast", "worst_case", "train_seconds")
            }
            ratio = [c["train_seconds"] / b for c, b in zip(cells, budget, strict=True) if b]
            entry["seconds_over_budget"] = max(ratio) if ratio else None
            stats[k] = entry
            # one entry per kind of warning: its first sentence, counts dropped, and the seeds
            flagged: dict[str, set[int]] = {}
            for c in cells:
                for w in c["warnings"]:
                    kind = re.sub(r"\d+", "N", w.split("!")[0].split(". ")[0])
                    flagged.setdefault(kind, set()).add(c["seed"])
            flags = [f"{k} (seed {', '.join(map(str, sorted(v)))})" for k, v in flagged.items()]
            table_rows.append(
                [
                    k,
                    ", ".join(str(c["seed"]) for c in cells),
                    interval_text([c["clean"] for c in cells]),
                    interval_text([c["pgd20"] for c in cells]),
                    interval_text([c["autoattack_fast"] for c in cells]),
                    interval_text([c["worst_case"] for c in cells]),
                    interval_text([c["train_seconds"] for c in cells], 0),
                    "-"
                    if not ratio
                    else f"{max(ratio):.2f}" + (" (over)" if max(ratio) > 1.1 else ""),
                    "; ".join(flags) or "none",
                ]
            )
        lines = [
            f"### {name}: {len(seeds)} seeds, {full[0]['n_test']} test points, full budget",
            "",
            markdown_table(
                ["recipe", "seeds", "clean %", "PGD-20 %", "AA-fast %", "worst %", "train s",
                 "s / budget (max)", "masking warnings"],
                table_rows,
            ),
        ]  # fmt: skip
        jeat = [k for k in complete if k != PLAIN]
        diff = None
        if PLAIN in complete and jeat and len(seeds) >= 2:
            best = max(jeat, key=lambda k: stats[k]["worst_case"]["mean"])
            d = paired_difference(
                [c["worst_case"] for c in by[best]],
                [c["worst_case"] for c in by[PLAIN]],
                names=(best, PLAIN),
            )
            diff = d.to_dict()
            i = d.interval
            holds = i.low is not None and i.low > -1.0
            lines.append(
                f"jeat's best recipe ({best}) - the plain loop, worst case: {i.mean:+.1f} "
                f"[{i.low:+.1f}, {i.high:+.1f}] points ({d.verdict}); not below the plain loop "
                f"(interval above -1): {'yes' if holds else 'NO'}\n"
            )
        summary[name] = {"recipes": stats, "best_minus_plain": diff, "seeds": seeds}
        text.append("\n".join(lines))
    return summary, "\n".join(text)


def plot_curves(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Worst-case robust accuracy against training seconds, one line per recipe (seed 0 at
    every fraction; the full budget's mean over seeds with its interval as an error bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        mine = [r for r in rows if r["dataset"] == name]
        for recipe in dict.fromkeys(r["recipe"] for r in mine):
            pts = sorted(
                (r["train_seconds"], r["worst_case"])
                for r in mine
                if r["recipe"] == recipe and r["seed"] == 0
            )
            full = [r for r in mine if r["recipe"] == recipe and r["fraction"] == 1.0]
            if not pts:  # this run measured other seeds only: their mean alone
                pts = [(full[0]["train_seconds"], full[0]["worst_case"])]
            (line,) = ax.plot(*zip(*pts, strict=True), marker="o", label=recipe)
            if len(full) >= 2:
                acc = t_interval([r["worst_case"] for r in full])
                sec = t_interval([r["train_seconds"] for r in full])
                ax.errorbar(
                    sec.mean, acc.mean, yerr=acc.half_width, xerr=sec.half_width,
                    color=line.get_color(), capsize=3, marker="s",
                )  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel(f"training seconds ({rows[0].get('clock', 'wall')} clock)")
        ax.set_ylabel("worst-case robust accuracy % (with autoattack-fast)")
        ax.set_title(f"{name}: robust accuracy against training time")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"frontier-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results folder (cells resume from it)")
    p.add_argument("--work", help="where the jeat runs are trained (default: runs/frontier-work)")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    p.add_argument("--datasets", help="comma-separated subset of the budget's datasets")
    p.add_argument("--seeds", type=int, help="seeds at the full budget (default: per dataset)")
    p.add_argument(
        "--only-seed",
        type=int,
        help="run only this seed's full-budget cells (to share the seeds between processes; "
        "a later run without it summarises every cell)",
    )
    p.add_argument(
        "--summarize",
        action="store_true",
        help="measure nothing: summarise the cells already measured (a cell not measured yet, "
        "or stale, is left out and named)",
    )
    p.add_argument("--recipes", help="comma-separated subset of the recipes (plain: the loop)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=1, help="torch threads for everything")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="how training seconds are counted: this process's CPU time or wall-clock time",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    budgets = BUDGETS[args.budget]
    names = args.datasets.split(",") if args.datasets else list(budgets)
    unknown = [n for n in names if n not in budgets]
    if unknown:
        raise SystemExit(f"unknown dataset(s) {unknown}; this budget has {list(budgets)}")
    out = Path(args.out)
    work = Path(args.work) if args.work else ROOT / "runs" / "frontier-work"
    rows: list[dict[str, Any]] = []
    budget_of: dict[tuple[str, int], float] = {}
    for name in names:
        d = budgets[name]
        root = Path(args.data_dir) / d.sub_dir if d.sub_dir else None
        try:
            data = load_dataset(d.name, root=None if root is None else Path(args.data_dir))
        except Exception as exc:  # noqa: BLE001 - any missing data skips the dataset
            print(f"skipping {name}: its data is not under {args.data_dir} ({exc})")
            continue
        warmed = False
        cells = plan(budgets, [name], args.seeds)
        if args.only_seed is not None:
            cells = [c for c in cells if c.fraction == 1.0 and c.seed == args.only_seed]
        if args.recipes:
            # the plain loop's budget is what the pgd-at cell of its seed measured
            keep = {*args.recipes.split(","), *(["pgd-at"] if PLAIN in args.recipes else [])}
            cells = [c for c in cells if c.recipe in keep]
        for cell in cells:
            path = out / cell.folder / "cell.json"
            budget = budget_of.get((name, cell.seed if cell.fraction == 1.0 else 0))
            row = json.loads(path.read_text()) if path.exists() else None
            why = "not measured" if row is None else stale(row, cell, d, budget)
            reused = why is None
            if args.summarize and (row is None or why is not None):
                print(f"{cell.folder}: left out ({why})")
                continue
            if row is None or why is not None:
                if row is not None:
                    print(f"{cell.folder}: measured again ({why})")
                if not warmed:
                    warm_up(d, data, work)
                    warmed = True
                row = run_cell(cell, d, data, out, work, budget, args.clock)
            if cell.recipe == "pgd-at" and cell.fraction == 1.0:
                budget_of[(name, cell.seed)] = row["train_seconds"]
            rows.append(row)
            warn = f"  masking: {'; '.join(row['warnings'])}" if row["warnings"] else ""
            print(
                f"{cell.folder}: {row['train_seconds']:.1f} s, clean {row['clean']:.1f}, "
                f"PGD-20 {row['pgd20']:.1f}, AA-fast {row['autoattack_fast']:.1f}, worst "
                f"{row['worst_case']:.1f}{warn}{' (reused)' if reused else ''}",
                flush=True,
            )
    if not rows:
        print("nothing measured")
        return 1
    summary, text = summarize(rows, budgets)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "results.json",
        {"machine": machine(), "threads": args.threads, "clock": args.clock,
         "budget": args.budget, "summary": summary, "cells": rows},
    )  # fmt: skip
    (out / "table.md").write_text(text + "\n")
    for path in plot_curves(rows, out):
        print(f"wrote {path}")
    print(f"wrote {out}/results.json and table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
