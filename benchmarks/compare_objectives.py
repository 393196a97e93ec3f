"""Compare standard, PGD-AT, JEM and JEAT on the same model, data and epoch budget.

For each dataset it trains the four objectives (plus any JEAT variants) from the shipped configs
``<dataset>-{standard,pgdat,jem,jeat}`` with the benchmark's overrides, then measures on the
test split: clean and PGD-20 accuracy, and the quality of 1,000+ class-conditional samples per
model (``--per-class`` x classes) scored by an independently trained standard *judge*
classifier (Inception-style judge score, judge Fréchet distance, judge accuracy; see
``jeat.metrics``: these are judge-based scores, not Inception Scores or FIDs). It also times
one optimiser step of each objective side by side on the same batch, in one process, and prints
the cost relative to PGD-AT.

Datasets (from the folder the repository's ``../shared/data`` convention provides):

* ``mnist``: the 10,000 MNIST test images split 8,000 / 2,000 (``mnist-t10k``);
* ``cifar10``: the CIFAR-10 subset in ``cifar-10-batches-py`` (5,085 train / 1,017 test).

Usage (the command that produced ``benchmarks/results/compare_objectives/``)::

    python benchmarks/compare_objectives.py --data-dir ../shared/data

Trained runs go to ``--work`` (default ``runs/benchmarks``); a run folder that already holds a
``model.pt`` is reused, so an interrupted benchmark resumes where it stopped (a run killed
mid-training resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import ROOT, generation_scores, machine, reference_scores, train_judge, train_or_reuse

from jeat.attacks import LinfBall
from jeat.config import TrainConfig, load_config
from jeat.data import ImageDataset, load_dataset
from jeat.evaluate import evaluate
from jeat.objectives import create_objective
from jeat.runs import build_model
from jeat.train import make_optimizer


@dataclass
class DatasetSpec:
    config_prefix: str  # shipped configs <prefix>-{standard,pgdat,jem,jeat}
    data_name: str
    sub_dir: str  # folder under --data-dir
    overrides: list[str] = field(default_factory=list)  # the benchmark's settings
    seed_resolution: int = 16


DATASETS = {
    "mnist": DatasetSpec(
        "mnist",
        "mnist-t10k",
        "mnist",
        [
            # PGD-10 at eps 0.3 (step 2.5 eps / 10) instead of the config's PGD-40: CPU budget
            "objective.attack.steps=10",
            "objective.attack.step_size=0.075",
            "objective.attack.eps_warmup_steps=126",  # two epochs of 63 steps
            "schedule.warmup_steps=60",
            "optim.lr=2e-3",
        ],
    ),
    "cifar10": DatasetSpec("cifar10", "cifar10", "", [], seed_resolution=8),
}

OBJECTIVES = {"standard": "standard", "pgd-at": "pgdat", "jem": "jem", "jeat": "jeat"}


def _cfg(spec: DatasetSpec, objective: str, args: argparse.Namespace, extra=()) -> TrainConfig:
    return load_config(
        f"{spec.config_prefix}-{OBJECTIVES[objective]}",
        [
            f"data.name={spec.data_name}",
            f"epochs={args.epochs}",
            f"model.options.width={args.width}",
            f"seed={args.seed}",
            "final_eval=false",
            "final_samples=false",
            "eval.epoch_n=0",
            f"progress={str(not args.quiet).lower()}",
            *spec.overrides,
            *extra,
        ],
    )


def step_costs(
    cfgs: dict[str, TrainConfig], data: ImageDataset, rounds: int, batch: int
) -> dict[str, float]:
    """Median seconds of one optimiser step per objective, timed round-robin on one batch."""
    x, y = data.x_train[:batch], data.y_train[:batch]
    runs = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        model = build_model(cfg, data.info)
        objective = create_objective(cfg.objective, data.info)
        objective.setup(data, torch.device("cpu"))
        runs[name] = (model, objective, make_optimizer(cfg, model))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds + 1):
        for name, (model, objective, opt) in runs.items():
            torch.manual_seed(r)
            t = time.perf_counter()
            loss = objective(model, x, y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_dataset(name: str, args: argparse.Namespace, out: Path) -> dict:
    spec = DATASETS[name]
    root = Path(args.data_dir) / spec.sub_dir if spec.sub_dir else Path(args.data_dir)
    data = load_dataset(spec.data_name, root=root)
    info = data.info
    work = Path(args.work) / name
    out.mkdir(parents=True, exist_ok=True)
    print(f"== {name}: {len(data.x_train)} train / {len(data.x_test)} test images", flush=True)

    # 1. the judge: an independent standard classifier (own seed, twice the width, trained
    #    for --judge-epochs so that it is a good classifier of the dataset)
    judge_epochs = args.judge_epochs or args.epochs
    judge_cfg = _cfg(
        spec,
        "standard",
        args,
        [
            f"seed={args.seed + 1000}",
            f"model.options.width={2 * args.width}",
            f"epochs={judge_epochs}",
        ],
    )
    judge_dir = work / ("judge" if judge_epochs == args.epochs else f"judge-e{judge_epochs}")
    judge, judge_accuracy = train_judge(judge_cfg, judge_dir, data)
    print(f"  judge: small_cnn width {2 * args.width}, test accuracy {judge_accuracy:.2f}%")

    # 2. the models
    variants: dict[str, tuple[str, list[str]]] = {o: (o, []) for o in OBJECTIVES}
    for v in args.jeat_variant:
        label, _, sets = v.partition("=")
        variants[label] = ("jeat", [f"objective.options.{s}" for s in sets.split(",") if s])
    eps = None
    rows = []
    k = info.num_classes
    per = args.per_class
    gen_seed = args.seed + 7
    for label, (objective, extra) in variants.items():
        cfg = _cfg(spec, objective, args, extra)
        eps = cfg.eval.eps if cfg.eval.eps is not None else info.eps_linf
        print(f"-- {label}", flush=True)
        model, epoch_s = train_or_reuse(cfg, work / label, data)
        table = evaluate(model, data.x_test, data.y_test, ["clean", "pgd20"], LinfBall(eps))
        row = {
            "model": label,
            "objective": objective,
            "options": extra,
            "clean": table.rows[0].accuracy,
            "pgd20": table.rows[1].accuracy,
            "seconds_per_epoch": epoch_s,
        }
        for method in ("descent", "sgld"):
            row[method] = generation_scores(
                model,
                data,
                judge,
                method=method,
                steps=args.gen_steps,
                per_class=per,
                seed=gen_seed,
                seed_resolution=spec.seed_resolution,
                grid=out / f"samples-{label}-{method}.png",
            )
        rows.append(row)
        print(
            f"  clean {row['clean']:.2f}  pgd20 {row['pgd20']:.2f}  {epoch_s:.1f} s/epoch  "
            f"descent FD {row['descent']['judge_fd']:.2f}  sgld FD {row['sgld']['judge_fd']:.2f}",
            flush=True,
        )

    # 3. references: the seeds the samplers start from, and real training images
    references = reference_scores(data, judge, per, gen_seed, spec.seed_resolution)

    # 4. cost of one step, side by side in this process
    cost_cfgs = {
        "standard": _cfg(spec, "standard", args),
        "pgd-at": _cfg(spec, "pgd-at", args),
        "jeat (default)": _cfg(spec, "jeat", args),
        "jeat (JEM's 20 SGLD steps)": _cfg(spec, "jeat", args, ["objective.options.sgld_steps=20"]),
        "jem (published: 20 SGLD steps)": _cfg(spec, "jem", args),
    }
    batch = cost_cfgs["pgd-at"].batch_size
    costs = step_costs(cost_cfgs, data, args.cost_rounds, batch)
    jeat_default = create_objective(cost_cfgs["jeat (default)"].objective, info).opts
    result = {
        "dataset": name,
        "data": spec.data_name,
        "n_train": len(data.x_train),
        "n_test": len(data.x_test),
        "eps_linf": eps,
        "epochs": args.epochs,
        "width": args.width,
        "judge": {
            "width": 2 * args.width,
            "epochs": judge_epochs,
            "test_accuracy": judge_accuracy,
        },
        "samples_per_model": k * per,
        "generation_steps": args.gen_steps,
        "rows": rows,
        "references": references,
        "step_seconds": costs,
        "step_cost_vs_pgd_at": {n: c / costs["pgd-at"] for n, c in costs.items()},
        "jeat_default_sampler": {
            "sgld_steps": jeat_default["sgld_steps"],
            "sample_batch": jeat_default["sample_batch"] or batch,
            "batch_size": batch,
        },
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [
        f"### {r['dataset']} ({r['data']}: {r['n_train']} train / {r['n_test']} test, "
        f"L-inf eps {r['eps_linf']:.4g}, {r['epochs']} epochs, small_cnn width {r['width']})",
        "",
        f"Judge: standard small_cnn width {r['judge']['width']}, {r['judge']['epochs']} "
        "epochs, test accuracy "
        f"{r['judge']['test_accuracy']:.2f}%. Generation: {r['samples_per_model']} "
        f"class-conditional samples per model, {r['generation_steps']} steps from "
        "class-Gaussian seeds. FD = judge Fréchet distance to the test images (lower is "
        "better); score = judge Inception-style score (higher is better); acc = share judged "
        "as the intended class. These are judge-based scores, not Inception Score / FID.",
        "",
        "| model | clean % | PGD-20 % | s/epoch | descent FD | descent score | descent acc % "
        "| SGLD FD | SGLD score | SGLD acc % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        d, s = row["descent"], row["sgld"]
        lines.append(
            f"| {row['model']} | {row['clean']:.2f} | {row['pgd20']:.2f} | "
            f"{row['seconds_per_epoch']:.1f} | {d['judge_fd']:.2f} | {d['judge_score']:.2f} | "
            f"{d['judge_accuracy']:.1f} | {s['judge_fd']:.2f} | {s['judge_score']:.2f} | "
            f"{s['judge_accuracy']:.1f} |"
        )
    for label, ref in r["references"].items():
        lines.append(
            f"| *{label}* | | | | {ref['judge_fd']:.2f} | {ref['judge_score']:.2f} | "
            f"{ref['judge_accuracy']:.1f} | | | |"
        )
    jd = r["jeat_default_sampler"]
    lines += [
        "",
        f"Cost of one optimiser step (batch {jd['batch_size']}), median of interleaved runs in "
        f"one process; the default JEAT runs {jd['sgld_steps']} SGLD steps on "
        f"{jd['sample_batch']} buffer samples per step:",
        "",
        "| objective | s/step | × PGD-AT |",
        "|---|---|---|",
    ]
    for name, sec in r["step_seconds"].items():
        lines.append(f"| {name} | {sec:.3f} | {r['step_cost_vs_pgd_at'][name]:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--datasets", default="mnist,cifar10")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument(
        "--judge-epochs", type=int, help="epochs of the judge classifier (default: --epochs)"
    )
    p.add_argument("--width", type=int, default=16, help="small_cnn width of the compared models")
    p.add_argument("--per-class", type=int, default=100, help="samples per class to score")
    p.add_argument("--gen-steps", type=int, default=60)
    p.add_argument("--cost-rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--jeat-variant",
        action="append",
        default=[],
        help="extra JEAT row: label=opt=value,opt=value (objective options), repeatable",
    )
    p.add_argument("--work", default=str(ROOT / "runs" / "benchmarks"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare_objectives"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        p.error(f"unknown dataset(s) {unknown}; choose from {sorted(DATASETS)}")
    torch.set_num_threads(torch.get_num_threads())
    out = Path(args.out)
    started = time.time()
    results = [run_dataset(n, args, out / n) for n in names]
    header = [
        "# compare_objectives",
        "",
        "Command: `python benchmarks/compare_objectives.py " + " ".join(sys.argv[1:]) + "`",
        "",
        f"Machine: {machine()}; total {(time.time() - started) / 60:.1f} min.",
        "",
    ]
    body = "\n".join(markdown(r) for r in results)
    existing = out / "README.md"
    if set(names) == set(DATASETS) or not existing.exists():
        existing.write_text("\n".join(header) + body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
