"""The multi-seed study (issue 20): every objective on digits and MNIST, judged by AutoAttack
and by judge scores of generated samples, with confidence intervals over seeds.

Variants (``--part main``): ``standard``, ``pgdat``, ``trades``, ``jem``, ``jeat`` (the
shipped ``<dataset>-jeat`` config: on digits JEAT on TRADES with JEM's sampler, the best point
this study found; on MNIST JEAT with PGD-AT's loss, lambda 0.01 and 3 SGLD steps) and
``jeat-published`` (JEAT as the published descriptions give it: CE on the adversarial examples,
the data term on them, lambda = 1, JEM's sampler: uniform re-initialisation, 20 SGLD steps), on
``digits`` (5 seeds) and ``mnist-t10k`` (3 seeds), each at its shipped config: the frontier
recipes of ``benchmarks/frontier.py``. ``--part knobs`` trains JEAT's knobs at 3 seeds (with
PGD-AT, JEM and the default beside them, so every pair is measured on the same seeds). On
digits: JEAT with PGD-AT's loss (``jeat-ce``, digits' default until this study) and its lambda
with the 3-step sampler, with JEM's sampler and with the class-conditional energy term; the
energy term on TRADES' adversarial inputs only; JEAT at PGD-AT's training budget. On MNIST:
digits' best point (JEAT on TRADES, ``jeat-trades``) on MNIST's base, at 15 epochs (about
1.7x PGD-AT's training seconds) and at PGD-AT's budget (``jeat-trades-e8``).
Issue 30's goal is checked for every JEAT variant (:func:`goal_check`): worst case and clean
within 2 points of PGD-AT, judge-FID and recall by SGLD no worse than JEM's.

Per model (a *cell*): clean accuracy, PGD-20, ``autoattack-fast`` (APGD-CE then APGD-T) and the
worst case over them (independent mode: every attack on every clean-correct point); judge-FID,
precision, recall, density, coverage, within-class diversity, judge accuracy and judge-IS
(:func:`jeat.metrics.score_samples`) of 1,000 class-conditional samples (``per_class`` x 10,
each from its own chain) drawn by seeded descent and by SGLD, scored against the training
images by a judge trained once per dataset inside the study folder; and the training time (the
sum of the run's epoch times). Once per dataset and judge, as many real test images are scored
the same way: the reference, the floor every generation score is read against. The judge-IS
stays in the JSON but not in the README's tables: with ten classes it saturates (9.56 for
almost every digits model).

Layout of the study folder (``--out``)::

    summary.json                  means, 95% t-intervals, paired differences, the references
    README.md                     the same as tables, and the trade-off plots
    tradeoff-<dataset>.png        worst-case robust accuracy against judge-FID and recall, one
                                  point per variant (mean, 95% t-intervals), Pareto front marked
    judges/<dataset>/             the judge of each dataset (a jeat run folder) + reference.json
    cells/<dataset>/<variant>/seed<k>/   a jeat run folder + cell.json (the cell's numbers),
                                  samples-<method>.png and .json (each image's chain seed and
                                  judge verdict)

A cell whose ``cell.json`` exists is finished and skipped, so the study resumes after a kill;
a cell without it is redone (from its last checkpoint when training was interrupted, from its
``model.pt`` when only the measurements were). ``cell.json`` is written atomically, last.

Full budget (``FULL``): digits at the shipped configs (digits-pgdat's network and attack, 50
epochs of PGD-7), all 360 test points, 30 generation steps; MNIST (``mnist-t10k``) at the
shipped configs (all 8,000 training images), 500 test points, 20 generation steps; 1,000
samples per method everywhere. A digits cell costs 1-3 single-thread CPU minutes (training
36-90 s, AutoAttack-fast about 30 s, generation and scores the rest); an MNIST cell about
15 minutes, so MNIST's 18 cells take about 4.5 single-thread hours.
``--part main`` and ``--part knobs`` can run as separate invocations into the same folder.

Usage::

    python benchmarks/study.py --out benchmarks/results/study            # the full study
    python benchmarks/study.py --out /tmp/s --budget smoke --datasets digits --seeds 2 \\
        --variants standard,jeat                                         # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from common import LEAN_OVERRIDES, ROOT, machine, quiet_stdout

from jeat.compare import SEEDS_LABEL, write_tradeoff_plots
from jeat.config import TrainConfig, config_to_dict, load_config
from jeat.data import ImageDataset, load_dataset
from jeat.errors import JeatError
from jeat.finish import final_evaluation, generate_sample_chains, write_grid_record
from jeat.locks import LOCK_NAME, FolderBusy, hold_folder
from jeat.metrics import JudgeBackend, score_samples, train_judge
from jeat.objectives import default_options
from jeat.report import REFERENCE_LABEL
from jeat.runs import load_trained
from jeat.samplers import Samples, sample_seeds
from jeat.stats import summarize_study, summary_markdown
from jeat.train import train
from jeat.utils import atomic_write, save_image_grid, write_json

ATTACKS = ["clean", "pgd20", "autoattack-fast"]

# The variants: (config suffix, options): an option is an objective option, or a config entry
# when its key is a dotted path or a top-level field (``epochs=20``)
PUBLISHED = [
    "robust_loss=ce", "energy_weight=1.0", "data_term=adv", "buffer_init=uniform",
    "sgld_steps=20",
]  # fmt: skip
MAIN: dict[str, tuple[str, list[str]]] = {
    "standard": ("standard", []),
    "pgdat": ("pgdat", []),
    "trades": ("trades", []),
    "jem": ("jem", []),
    "jeat": ("jeat", []),  # the shipped config: on digits JEAT on TRADES (below), elsewhere CE
    # Zhu et al. as the published descriptions give it (method notes, sections 4 and 7)
    "jeat-published": ("jeat", PUBLISHED),
}
# JEAT's knobs on digits. Until this study digits-jeat was JEAT with PGD-AT's loss (CE on the
# PGD examples), lambda 0.01 and 3 SGLD steps from class-Gaussian restarts: now
# digits-jeat-ce, the base of the first knobs. One-seed pilots (benchmarks/results/study/
# README.md) showed lambda alone barely moves SGLD's judge-FID with 3-step chains, while JEM's
# sampler (20 steps, uniform restarts) does: so lambda is varied with each sampler. Then the
# energy term on TRADES (the most robust recipe here, and the best robust SGLD generator):
# TRADES' loss plus lambda [E(x_data) - E(x_hat)] with JEM's sampler and lambda 1, the data
# term on the KL-adversarial inputs (``-adv``) or on the clean and the adversarial inputs
# (aligning the energies of clean, adversarial and sampled images, the idea of Jiang et al.
# 2025, EB-JDAT, in its simplest form): the second was the best point on the front and is
# digits-jeat now (MAIN's "jeat"). "-e20": at PGD-AT's training budget (20 epochs at about
# 2.2 CPU s each, against PGD-AT's 50 at 0.9).
DIGITS_KNOBS: dict[str, tuple[str, list[str]]] = {
    "jeat-ce": ("jeat-ce", []),
    "jeat-lambda0.1": ("jeat-ce", ["energy_weight=0.1"]),
    "jeat-lambda0.1-cond": ("jeat-ce", ["energy_weight=0.1", "conditional=true"]),
    "jeat-lambda0.1-u20": (
        "jeat-ce",
        ["energy_weight=0.1", "buffer_init=uniform", "sgld_steps=20"],
    ),
    "jeat-lambda0.3-u20": (
        "jeat-ce",
        ["energy_weight=0.3", "buffer_init=uniform", "sgld_steps=20"],
    ),
    "jeat-published-e20": ("jeat-ce", [*PUBLISHED, "epochs=20"]),
    "jeat-trades-adv": ("jeat", ["data_term=adv"]),
    "jeat-trades-adv-e20": ("jeat", ["data_term=adv", "epochs=20"]),
}
# JEAT on TRADES as digits-jeat has it (TRADES' loss, the data term on the clean and the
# KL-adversarial inputs, lambda 1, JEM's sampler), on MNIST's base (mnist-jeat: its network and
# attack): does digits' best point carry over? An epoch costs about 3x a PGD-AT one there, so
# 15 epochs are about 1.7x mnist-pgdat's training seconds (861 s on the one seed that trained,
# against 505), as digits-jeat's 31 epochs are about twice digits-pgdat's; "-e8": at that
# budget (477 s). Measured (docs/objectives.md): lambda 1 costs a third of MNIST's robustness,
# and at 15 epochs 2 of 3 seeds diverged at epoch 13.
TRADES_ENERGY = [
    "robust_loss=trades", "energy_weight=1.0", "data_term=both", "buffer_init=uniform",
    "sgld_steps=20",
]  # fmt: skip
MNIST_KNOBS: dict[str, tuple[str, list[str]]] = {
    "jeat-trades": ("jeat", [*TRADES_ENERGY, "epochs=15"]),
    "jeat-trades-e8": ("jeat", [*TRADES_ENERGY, "epochs=8"]),
}
# the knobs of each dataset (variant names unique over all of them), 3 seeds each: an MNIST
# cell costs about 15 times a digits one at the frontier recipes (benchmarks/results/frontier)
KNOBS: dict[str, dict[str, tuple[str, list[str]]]] = {
    "digits": DIGITS_KNOBS,
    "mnist": MNIST_KNOBS,
}
ALL_KNOBS = {name: v for knobs in KNOBS.values() for name, v in knobs.items()}
KNOB_SEEDS = 3

SAMPLERS = (("descent", "seeded descent"), ("sgld", "SGLD"))
# a cell's generation scores per sampler: (metric prefix, GenerationScores field)
SCORES = (
    ("fid", "frechet_distance"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("density", "density"),
    ("coverage", "coverage"),
    ("diversity", "diversity"),
    ("judge_acc", "accuracy"),
    ("is", "inception_score"),  # saturated at ten classes: in the JSON, not in the README
)
METRICS = [
    "clean",
    "pgd20",
    "autoattack_fast",
    "worst_case",
    *(f"{key}_{m}" for m, _ in SAMPLERS for key, _ in SCORES),
    "train_seconds",
]
DIFFERENCE_METRICS = [
    "clean",
    "pgd20",
    "autoattack_fast",
    "worst_case",
    "fid_descent",
    "fid_sgld",
    "recall_descent",
    "recall_sgld",
]
# the README's tables: robustness, then generation per sampler (with the reference row)
COLUMNS = [
    ("clean", "clean %", 1),
    ("pgd20", "PGD-20 %", 1),
    ("autoattack_fast", "AA-fast %", 1),
    ("worst_case", "worst %", 1),
    ("train_seconds", "train s", 0),
]


def generation_columns(method: str) -> list[tuple[str, str, int]]:
    return [
        (f"fid_{method}", "judge-FID", 1),
        (f"precision_{method}", "precision", 3),
        (f"recall_{method}", "recall", 3),
        (f"density_{method}", "density", 3),
        (f"coverage_{method}", "coverage", 3),
        (f"diversity_{method}", "diversity", 3),
        (f"judge_acc_{method}", "judge acc. %", 1),
    ]


@dataclass
class Budget:
    """One dataset's settings at one budget."""

    prefix: str  # shipped configs <prefix>-{standard,pgdat,trades,jem,jeat}
    data_name: str
    sub_dir: str  # folder under --data-dir ("" for the embedded digits)
    seeds: int
    overrides: list[str]
    n_eval: int | None  # test points of the robustness table (None: all)
    per_class: int  # generated samples per class for the judge scores
    gen_steps: int
    judge_epochs: int
    judge_overrides: list[str] = field(default_factory=list)


# Full budgets: the shipped configs (the frontier recipes); the module docstring gives the
# cell times.
FULL = {
    "digits": Budget(
        "digits",
        "digits",
        "",
        5,
        [],  # the shipped configs as they are: the frontier recipes (benchmarks/frontier.py)
        n_eval=None,
        per_class=100,
        gen_steps=30,
        judge_epochs=12,
    ),
    "mnist": Budget(
        "mnist",
        "mnist-t10k",
        "mnist",
        3,
        [],  # the shipped configs on the 8,000 training images of mnist-t10k
        n_eval=500,
        per_class=100,
        gen_steps=20,
        judge_epochs=4,
        # the recipe's width 64 would cost as much as 14 PGD-AT cells: width 32 (with batch
        # norm) reaches about 98% in 4 epochs
        judge_overrides=["model.options.width=32"],
    ),
}
# Smoke budgets: the whole pipeline in seconds (CI); the numbers mean nothing.
SMOKE = {
    "digits": Budget(
        "digits",
        "digits",
        "",
        2,
        [
            "epochs=1",
            "data.train_subset=128",
            "model.options.width=4",
            "objective.attack.steps=2",
            "objective.options.buffer_size=100",
            "objective.options.sgld_steps=2",
        ],
        n_eval=24,
        per_class=6,
        gen_steps=3,
        judge_epochs=2,
        judge_overrides=["model.options.width=8", "data.train_subset=512"],
    ),
    "mnist": Budget(
        "mnist",
        "mnist-t10k",
        "mnist",
        2,
        [
            "epochs=1",
            "data.train_subset=128",
            "model.options.width=4",
            "objective.attack.steps=2",
            "objective.attack.eps_warmup_steps=0",
            "objective.options.buffer_size=100",
            "objective.options.sgld_steps=2",
        ],
        n_eval=24,
        per_class=6,
        gen_steps=3,
        judge_epochs=2,
        judge_overrides=["model.options.width=8", "data.train_subset=512"],
    ),
}
BUDGETS = {"full": FULL, "smoke": SMOKE}
# lean runs (no final steps), evaluated by the study itself in independent mode
LEAN = [*LEAN_OVERRIDES, "eval.curve=null", "eval.mode=independent"]


@dataclass
class Cell:
    dataset: str
    variant: str
    seed: int
    config: str
    options: list[str]

    @property
    def run(self) -> str:
        return f"cells/{self.dataset}/{self.variant}/seed{self.seed}"


def plan(args: argparse.Namespace) -> list[Cell]:
    budgets = BUDGETS[args.budget]
    cells: list[Cell] = []
    for ds in args.datasets:
        b = budgets[ds]
        variants = dict(MAIN) if args.part in ("main", "all") else {}
        knobs = KNOBS.get(ds, {})
        if args.part in ("knobs", "all"):
            variants.update(knobs)
        if args.part == "knobs" and knobs:
            # the knobs compare with the default JEAT, PGD-AT and JEM: train those too
            variants = {k: MAIN[k] for k in ("pgdat", "jem", "jeat")} | variants
        if args.variants:
            variants = {k: v for k, v in variants.items() if k in args.variants}
        for variant, (suffix, opts) in variants.items():
            n_seeds = args.seeds or (KNOB_SEEDS if variant in ALL_KNOBS else b.seeds)
            for seed in range(n_seeds):
                cells.append(Cell(ds, variant, seed, f"{b.prefix}-{suffix}", opts))
    return cells


def option_override(option: str) -> str:
    """A variant's option as a config override: ``epochs=20`` and dotted paths as given, any
    other key an objective option."""
    key = option.split("=", 1)[0]
    return option if "." in key or key in TOP_LEVEL else f"objective.options.{option}"


TOP_LEVEL = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def cell_config(cell: Cell, b: Budget) -> TrainConfig:
    base = load_config(cell.config)
    sets = [
        f"data.name={b.data_name}",
        f"seed={cell.seed}",
        f"eval.n={'null' if b.n_eval is None else b.n_eval}",
        f"eval.attacks=[{','.join(ATTACKS)}]",
        f"generate.steps={b.gen_steps}",
        *LEAN,
        *(option_override(o) for o in cell.options),
        *b.overrides,  # last: a smoke budget's sizes win over a variant's
    ]
    # options of the energy objectives only (buffer size, SGLD steps) do not apply elsewhere
    if base.objective.name not in ("jem", "jeat"):
        sets = [s for s in sets if not s.startswith("objective.options.")]
    return load_config(cell.config, sets)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (untracked results do not count)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip())


def read_cell(folder: Path) -> dict[str, Any] | None:
    """A finished cell's numbers, or None when the cell must be (re)done."""
    path = folder / "cell.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and "metrics" in data else None


# Config entries that do not change the trained weights: what is measured after training and
# how (the per-epoch evaluation, which ``keep: best`` reads, does count).
AFTER_TRAINING = frozenset({
    "generate", "analysis", "final_eval", "final_samples", "final_analysis", "final_scores",
    "final_report", "tensorboard", "progress", "device", "checkpoint_every_steps",
})  # fmt: skip
AFTER_TRAINING_EVAL = frozenset({"n", "attacks", "mode", "batch_size", "curve"})
EPOCH_CHECK = frozenset({"epoch_n", "epoch_steps"})
ADOPTED = "adopted.json"  # in a cell's run folder: the run its weights were copied from


def training_part(config: dict[str, Any]) -> dict[str, Any]:
    """The entries of a resolved config that decide the trained weights. The per-epoch check
    (``eval.epoch_*``) runs under its own random state, so it counts only when ``keep: best``
    selects an epoch by it."""
    part = {k: v for k, v in config.items() if k not in AFTER_TRAINING}
    if isinstance(part.get("eval"), dict):
        after = AFTER_TRAINING_EVAL | (EPOCH_CHECK if part.get("keep") == "last" else set())
        part["eval"] = {k: v for k, v in part["eval"].items() if k not in after}
    objective = part.get("objective")
    if isinstance(objective, dict) and isinstance(objective.get("options"), dict):
        # an option spelled out at its default value trains the same model as one left out
        try:
            defaults = default_options(objective.get("name", ""))
        except JeatError:
            defaults = {}
        part["objective"] = {**objective, "options": {**defaults, **objective["options"]}}
    return part


def stale_cell(cell: Cell, b: Budget, folder: Path) -> str | None:
    """Why a finished cell no longer stands for its variant (None when it does): its run's
    training config differs from what the variant resolves to now."""
    try:
        have = training_part(yaml.safe_load((folder / "config.yaml").read_text()))
    except (OSError, yaml.YAMLError, AttributeError):
        return "its run's config.yaml is missing or unreadable"
    if have != training_part(config_to_dict(cell_config(cell, b))):
        return "its variant's training config changed"
    return None


def adoptable_runs(roots: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Finished jeat runs under ``roots`` (a ``model.pt`` beside its ``config.yaml``), with the
    training part of each one's config."""
    found = []
    for root in roots:
        for cfg_path in sorted(root.rglob("config.yaml")):
            run = cfg_path.parent
            if not (run / "model.pt").exists() or not (run / "metrics.jsonl").exists():
                continue
            try:
                found.append((run, training_part(yaml.safe_load(cfg_path.read_text()))))
            except (OSError, yaml.YAMLError, AttributeError):
                continue
    return found


def adopt_run(
    cfg: TrainConfig, folder: Path, runs: list[tuple[Path, dict[str, Any]]]
) -> Path | None:
    """Copy a finished run trained at exactly the cell's training config (seed included) from
    another benchmark's work folder (``--adopt``), instead of training it again: the weights
    are the same run's. Returns the source, or None when no run matches."""
    want = training_part(config_to_dict(cfg))
    for run, part in runs:
        if part == want:
            clear_folder(folder)
            for name in ("model.pt", "config.yaml", "metrics.jsonl", "run.json"):
                if (run / name).exists():
                    shutil.copy2(run / name, folder / name)
            source = run.resolve()
            shown = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
            write_json(folder / ADOPTED, {"trained_by": str(shown)})
            return run
    return None


def clear_folder(folder: Path) -> None:
    """Empty ``folder`` (created when missing) of what a killed run left, keeping the lock
    this process holds on it."""
    folder.mkdir(parents=True, exist_ok=True)
    for child in folder.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def train_cell(
    cfg: TrainConfig, folder: Path, data: ImageDataset,
    adoptable: list[tuple[Path, dict[str, Any]]] | None = None,
) -> Path | None:  # fmt: skip
    """Train the cell's run: reuse a finished model, adopt a finished run of the same training
    config from ``adoptable`` (returning its folder), resume an interrupted run, else start
    afresh (removing what a run killed before its first checkpoint left)."""
    if (folder / "model.pt").exists():
        return None
    if adoptable and not (folder / "checkpoints" / "last.pt").exists():
        source = adopt_run(cfg, folder, adoptable)
        if source is not None:
            return source
    resume = (folder / "checkpoints" / "last.pt").exists()
    if not resume:
        clear_folder(folder)
    with quiet_stdout():
        train(cfg, folder, resume=resume, data=data)
    return None


def measure_cell(
    cell: Cell, cfg: TrainConfig, folder: Path, data: ImageDataset, judge: torch.nn.Module,
    b: Budget,
) -> dict[str, Any]:  # fmt: skip
    model, _, _ = load_trained(folder)
    model.eval()
    t0 = time.perf_counter()
    table = final_evaluation(cfg, model, data)
    eval_seconds = time.perf_counter() - t0
    write_json(folder / "eval.json", {"dataset": data.info.name, **table.to_dict()})
    aa_rows = [r for r in table.rows if r.group == "autoattack-fast"]
    metrics: dict[str, Any] = {
        "clean": table.row("clean").accuracy,
        "pgd20": table.row("pgd20").accuracy,
        "autoattack_fast": aa_rows[-1].accuracy if aa_rows else None,
        "worst_case": table.robust_accuracy,
    }
    backend = JudgeBackend(judge)
    scores: dict[str, Any] = {}
    t0 = time.perf_counter()
    for method, _ in SAMPLERS:
        g = dataclasses.replace(cfg.generate, method=method, conditional=True)
        gen_cfg = dataclasses.replace(cfg, generate=g)
        chains = generate_sample_chains(model, data, gen_cfg, n_per_class=b.per_class)
        images, labels = chains.images, chains.labels
        s = score_samples(
            backend, images, data.x_train, labels, splits=10, real_labels=data.y_train
        )
        scores[method] = s.to_dict()
        for key, name in SCORES:
            metrics[f"{key}_{method}"] = getattr(s, name)
        # the grid: the first images of each class, each from its own chain, with the judge's
        # verdict on each recorded beside it (samples-METHOD.json)
        k, show = data.info.num_classes, min(b.per_class, 8)
        keep = torch.arange(k * b.per_class).view(k, b.per_class)[:, :show].reshape(-1)
        grid = Samples(images[keep], labels[keep] if labels is not None else None,
                       [chains.seeds[i] for i in keep.tolist()])  # fmt: skip
        png = folder / f"samples-{method}.png"
        save_image_grid(grid.images, png, nrow=show)
        write_grid_record(png, grid, show, judge, folder.parents[3] / "judges" / cell.dataset,
                          method)  # fmt: skip
    gen_seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    metrics["train_seconds"] = sum(r["epoch_seconds"] for r in rows)
    return {
        "dataset": cell.dataset,
        "data": data.info.name,
        "variant": cell.variant,
        "seed": cell.seed,
        "run": cell.run,
        "config": cell.config,
        "options": cell.options,
        "status": "ok",
        "metrics": metrics,
        "eval": table.to_dict(),
        "scores": scores,
        "eval_seconds": eval_seconds,
        "generation_seconds": gen_seconds,
        "epochs": cfg.epochs,
        "train_images": len(data.x_train) if cfg.data.train_subset is None
        else min(cfg.data.train_subset, len(data.x_train)),
    }  # fmt: skip


def failed_cell(cell: Cell, error: str) -> dict[str, Any]:
    return {
        "dataset": cell.dataset,
        "variant": cell.variant,
        "seed": cell.seed,
        "run": cell.run,
        "config": cell.config,
        "options": cell.options,
        "status": "diverged",
        "error": error,
        "metrics": dict.fromkeys(METRICS),
    }


def load_data(ds: str, b: Budget, data_dir: Path) -> ImageDataset:
    root = data_dir / b.sub_dir if b.sub_dir else None
    return load_dataset(b.data_name, root=root)


def judge_for(ds: str, b: Budget, data: ImageDataset, out: Path) -> tuple[torch.nn.Module, float]:
    folder = out / "judges" / ds
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "model.pt").exists():
        raise JeatError(
            f"{folder} holds a judge's record but not its weights (model.pt stays out of git): "
            "a study from a clean clone cannot be extended with the same judge; move the folder "
            "aside to train a new one (its FIDs are then not comparable with the old cells') or "
            "start a new --out folder"
        )
    t0, cpu0 = time.time(), time.process_time()
    with quiet_stdout():
        judge, acc, _ = train_judge(
            b.data_name,
            data=data,
            folder=folder,
            epochs=b.judge_epochs,
            progress=False,
            overrides=tuple(b.judge_overrides),
        )
    print(f"judge of {ds}: {time.time() - t0:.0f} s, CPU {time.process_time() - cpu0:.0f} s")
    return judge, acc


def reference_for(
    ds: str, b: Budget, data: ImageDataset, judge: torch.nn.Module, out: Path
) -> dict[str, Any]:
    """The reference of dataset ``ds``: as many real test images as a cell scores samples
    (at most all), scored against the training images like the samples, by the study's judge
    (:func:`jeat.metrics.score_samples`). Computed once per dataset and judge and cached in
    ``judges/<ds>/reference.json`` (redone when the sample count differs)."""
    path = out / "judges" / ds / "reference.json"
    n = min(b.per_class * data.info.num_classes, len(data.x_test))
    if path.exists():
        try:
            cached = json.loads(path.read_text())
            if cached.get("n_samples") == n and cached.get("n_real") == len(data.x_train):
                return cached
        except (OSError, ValueError, AttributeError):
            pass
    pick = torch.randperm(len(data.x_test), generator=torch.Generator().manual_seed(0))[:n]
    s = score_samples(JudgeBackend(judge), data.x_test[pick], data.x_train, data.y_test[pick],
                      splits=10, real_labels=data.y_train)  # fmt: skip
    record = {key: getattr(s, name) for key, name in SCORES}
    record.update(images="test", n_samples=s.n_samples, n_real=s.n_real, scores=s.to_dict())
    write_json(path, record)
    return record


def seeds_reference_for(
    ds: str, b: Budget, data: ImageDataset, judge: torch.nn.Module, out: Path
) -> dict[str, Any]:
    """The samplers' starting points alone: as many class-conditional seeds as a cell
    generates (``per_class`` per class, drawn as the dataset's shipped configs draw them:
    ``generate.seeds`` and ``generate.seed_resolution``), scored like the samples by the
    study's judge. No model is involved, so a generator is read against it: on 8x8 digits
    the class-Gaussian seeds alone are already classified and spread like the data. Cached in
    ``judges/<ds>/seeds.json`` (redone when the sample count differs)."""
    path = out / "judges" / ds / "seeds.json"
    k = data.info.num_classes
    n = b.per_class * k
    if path.exists():
        try:
            cached = json.loads(path.read_text())
            if cached.get("n_samples") == n and cached.get("n_real") == len(data.x_train):
                return cached
        except (OSError, ValueError, AttributeError):
            pass
    g = load_config(f"{b.prefix}-pgdat").generate
    labels = torch.arange(k).repeat_interleave(b.per_class)
    seeds = sample_seeds(g.seeds, data, labels, torch.Generator().manual_seed(0),
                         max_side=g.seed_resolution)  # fmt: skip
    s = score_samples(JudgeBackend(judge), seeds, data.x_train, labels, splits=10,
                      real_labels=data.y_train)  # fmt: skip
    record = {key: getattr(s, name) for key, name in SCORES}
    record.update(images=f"{g.seeds} seeds", n_samples=s.n_samples, n_real=s.n_real,
                  scores=s.to_dict())  # fmt: skip
    write_json(path, record)
    return record


def references(out: Path, name: str = "reference.json") -> dict[str, dict[str, Any]]:
    """Every dataset's cached reference (``seeds.json``: its seeds' scores) in the study
    folder (also an earlier invocation's)."""
    found = {}
    for path in sorted((out / "judges").glob(f"*/{name}")):
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return found


# issue 30's goal: a JEAT as robust as the best PGD-AT and generating as well as JEM
GOAL_POINTS = 2.0  # worst case and clean accuracy: within this many points of PGD-AT
GOAL_SHARE = 0.10  # judge-FID and recall by SGLD: within this share of JEM's


def goal_check(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The goal per dataset and JEAT variant (issue 30): worst-case robust accuracy with
    autoattack-fast and clean accuracy within 2 points of PGD-AT (the 95% interval of the
    paired difference lies above -2), judge-FID by SGLD no worse than JEM's (the interval of
    the difference lies below +10% of JEM's mean) and recall by SGLD no worse (above -10% of
    JEM's mean). Each row holds the intervals behind its verdicts."""
    diffs: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for d in summary["differences"]:
        diffs.setdefault((d["dataset"], d["a"], d["b"]), {})[d["metric"]] = d
    means = {
        (g["dataset"], g["variant"]): {k: (m or {}).get("mean") for k, m in g["metrics"].items()}
        for g in summary["groups"]
    }
    rows = []
    for (dataset, variant, b), vs_pgdat in diffs.items():
        if b != "pgdat" or not {"worst_case", "clean"} <= set(vs_pgdat):
            continue
        vs_jem = diffs.get((dataset, variant, "jem"), {})
        jem = means.get((dataset, "jem"), {})
        checks: dict[str, Any] = {}

        def above(d: dict[str, Any] | None, bound: float) -> bool | None:
            return None if d is None or d["low"] is None else d["low"] > bound

        def below(d: dict[str, Any] | None, bound: float) -> bool | None:
            return None if d is None or d["high"] is None else d["high"] < bound

        checks["worst_case"] = above(vs_pgdat["worst_case"], -GOAL_POINTS)
        checks["clean"] = above(vs_pgdat["clean"], -GOAL_POINTS)
        fid, recall = jem.get("fid_sgld"), jem.get("recall_sgld")
        checks["fid_sgld"] = (
            None if fid is None else below(vs_jem.get("fid_sgld"), GOAL_SHARE * fid)
        )
        checks["recall_sgld"] = (
            None if recall is None else above(vs_jem.get("recall_sgld"), -GOAL_SHARE * recall)
        )
        interval = {
            "worst_case": vs_pgdat["worst_case"],
            "clean": vs_pgdat["clean"],
            "fid_sgld": vs_jem.get("fid_sgld"),
            "recall_sgld": vs_jem.get("recall_sgld"),
        }
        rows.append(
            {
                "dataset": dataset,
                "variant": variant,
                "checks": checks,
                "differences": {
                    k: None if d is None else {x: d[x] for x in ("mean", "low", "high", "n")}
                    for k, d in interval.items()
                },
                "jem": {"fid_sgld": fid, "recall_sgld": recall},
                "met": all(v is True for v in checks.values()),
            }
        )
    return rows


def _difference_text(d: dict[str, Any] | None, digits: int = 1) -> str:
    if d is None:
        return "-"
    if d["low"] is None:
        return f"{d['mean']:+.{digits}f} (n={d['n']})"
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}] (n={d['n']})"


def goal_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    mark = {True: "yes", False: "no", None: "-"}
    lines = [
        "### The goal: as robust as PGD-AT, generating as well as JEM",
        "",
        "Per JEAT variant, paired differences over seeds with their 95% intervals: worst case "
        "(with autoattack-fast) and clean accuracy against PGD-AT (met when the interval lies "
        f"above −{GOAL_POINTS:g} points), judge-FID and recall by SGLD against JEM (met when "
        f"the FID interval lies below +{100 * GOAL_SHARE:.0f}% of JEM's mean FID and the "
        f"recall interval above −{100 * GOAL_SHARE:.0f}% of JEM's mean recall).",
        "",
        "| dataset | variant | worst − PGD-AT | clean − PGD-AT | FID SGLD − JEM | recall SGLD − "
        "JEM | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, c = r["differences"], r["checks"]
        lines.append(
            f"| {r['dataset']} | {r['variant']} | {_difference_text(d['worst_case'])} "
            f"({mark[c['worst_case']]}) | {_difference_text(d['clean'])} ({mark[c['clean']]}) "
            f"| {_difference_text(d['fid_sgld'])} ({mark[c['fid_sgld']]}) | "
            f"{_difference_text(d['recall_sgld'], 3)} ({mark[c['recall_sgld']]}) | "
            f"{'yes' if r['met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def finished_cells(out: Path) -> list[dict[str, Any]]:
    """Every finished cell in the study folder (also those of an earlier invocation with
    another ``--part`` or ``--variants``), in the order datasets, variants, seeds."""
    order = {v: i for i, v in enumerate([*MAIN, *ALL_KNOBS])}
    datasets = {d: i for i, d in enumerate(FULL)}
    cells = []
    for path in sorted((out / "cells").glob("*/*/seed*/cell.json")):
        record = read_cell(path.parent)
        if record is not None:
            cells.append(record)
    return sorted(
        cells,
        key=lambda c: (
            datasets.get(c["dataset"], len(datasets)),
            order.get(c["variant"], len(order)),
            c["variant"],
            c["seed"],
        ),
    )


def judge_accuracies(out: Path) -> dict[str, float]:
    found = {}
    for path in sorted((out / "judges").glob("*/judge.json")):
        try:
            found[path.parent.name] = float(json.loads(path.read_text())["test_accuracy"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def write_summary(
    out: Path, args: argparse.Namespace, cells: list[dict[str, Any]], judges: dict[str, float]
) -> dict[str, Any]:
    """summary.json and README.md over every finished cell in the folder (``cells``, this
    invocation's, are among them)."""
    cells = finished_cells(out)
    judges = {**judge_accuracies(out), **judges}
    refs = references(out)
    starts = references(out, "seeds.json")
    variants = list(dict.fromkeys(c["variant"] for c in cells))
    pairs = [(v, "pgdat") for v in variants if v.startswith("jeat")]
    pairs += [(v, "jem") for v in variants if v.startswith("jeat")]
    pairs += [(v, "jeat") for v in variants if v.startswith("jeat-")]
    summary = summarize_study(
        cells,
        METRICS,
        pairs=pairs,
        difference_metrics=DIFFERENCE_METRICS,
        commit=git_commit(),
        budget=args.budget,
        extra={
            "commit_dirty": git_dirty(),
            "part": args.part,
            "machine": machine(),
            "judge_accuracy": judges,
            "attacks": ATTACKS,
            "eval_mode": "independent",
            # per dataset: real test images scored like the samples (scores without "scores")
            "reference": {
                d: {k: v for k, v in r.items() if k != "scores"} for d, r in refs.items()
            },
            # per dataset: the samplers' starting points alone, scored like the samples
            "seeds_reference": {
                d: {k: v for k, v in r.items() if k != "scores"} for d, r in starts.items()
            },
        },
    )
    summary["goal"] = goal_check(summary)
    write_json(out / "summary.json", summary)
    plots = write_tradeoff_plots(summary, out)
    budgets = BUDGETS[args.budget]
    lines = [
        "# Study: objectives over seeds",
        "",
        "Written by `python benchmarks/study.py "
        + " ".join(getattr(args, "argv", []))
        + f"` (budget `{args.budget}`, commit `{summary['commit']}`, {machine()}).",
        "",
        "Each entry is the mean over seeds ± the half-width of its 95% t-interval (`n=1`: one "
        "seed, an anecdote, no interval). Accuracies in % of the test points (robustness: "
        "L∞ at the dataset's budget, independent mode; worst = the per-point worst case over "
        "PGD-20 and autoattack-fast). train s: the sum of the run's epoch times on a shared "
        "machine. Generation: class-conditional samples by seeded descent and by SGLD, each "
        "image from its own chain, against the training images in the judge's feature space "
        "(judge-based scores, not Inception Score / FID): judge-FID; precision and recall "
        "(Kynkäänniemi et al. 2019, k = 3: the share of samples inside the real images' k-NN "
        "manifold, and of real images inside the samples'); density and coverage (Naeem et al. "
        "2020, k = 5); diversity (per class, the samples' mean pairwise feature distance over "
        "the real images', averaged over classes: 1 = as varied as the data); judge acc.: the "
        f"share judged as the class asked for. The row '{REFERENCE_LABEL}' scores as many "
        "real test images the same way: the floor. The row '" + SEEDS_LABEL + "' scores the "
        "samplers' starting points (the class-conditional Gaussian seeds every chain starts "
        "from) the same way, with no model involved: a sampler that ends worse than it "
        "started has made its seeds less like the data. The judge-IS is in `summary.json` but "
        "not here: at ten classes it saturates (9.56 for nearly every digits model).",
        "",
        "Judges: "
        + ", ".join(f"{d} {a:.1f}% test accuracy" for d, a in judges.items())
        + ". Budgets: "
        + "; ".join(
            f"{d}: {' '.join(budgets[d].overrides) or 'the shipped configs'}, "
            f"{budgets[d].per_class * 10} samples per "
            f"method, eval on {budgets[d].n_eval or 'all'} test points"
            for d in judges
        ),
        "",
        "A paired difference A − B is computed per seed (both trained with that seed). Its "
        "verdict is 'A higher' / 'A lower' when the 95% interval excludes zero, else 'no "
        "difference shown'. For FID lower is better.",
        "",
        *readme_tables(summary, refs, plots, starts),
        summary_markdown({**summary, "groups": []}, COLUMNS),  # the paired differences
        goal_markdown(summary["goal"]),
    ]
    with atomic_write(out / "README.md", "w") as fh:
        fh.write("\n".join(lines))
    return summary


def readme_tables(
    summary: dict[str, Any],
    refs: dict[str, dict[str, Any]],
    plots: dict[str, Path],
    starts: dict[str, dict[str, Any]] | None = None,
) -> list[str]:
    """Per dataset: the robustness table, a generation table per sampler with the reference
    row, and the trade-off plot."""
    parts = []
    for dataset in dict.fromkeys(g["dataset"] for g in summary["groups"]):
        one = {**summary, "groups": [g for g in summary["groups"] if g["dataset"] == dataset],
               "differences": []}  # fmt: skip
        parts.append(summary_markdown(one, COLUMNS))
        ref = refs.get(dataset) or {}
        start = (starts or {}).get(dataset) or {}
        for method, name in SAMPLERS:
            rows = []
            if ref:
                rows.append((REFERENCE_LABEL, {f"{k}_{method}": ref.get(k) for k, _ in SCORES}))
            if start:
                rows.append((SEEDS_LABEL, {f"{k}_{method}": start.get(k) for k, _ in SCORES}))
            extra = {dataset: rows} if rows else None
            parts.append(summary_markdown(one, generation_columns(method),
                                          f"{{dataset}}: generation by {name}", extra))  # fmt: skip
        if dataset in plots:
            parts.append(
                f"![{dataset}: worst-case robust accuracy against judge-FID and recall]"
                f"({plots[dataset].name})\n"
            )
    return parts


def run_cell(
    cell: Cell, cfg: TrainConfig, folder: Path, data: ImageDataset, judge: torch.nn.Module,
    b: Budget, adoptable: list[tuple[Path, dict[str, Any]]],
) -> dict[str, Any]:  # fmt: skip
    """Train (or adopt) and measure one cell; write and return its ``cell.json`` record."""
    t0, cpu0 = time.time(), time.process_time()
    try:
        train_cell(cfg, folder, data, adoptable)
    except JeatError as exc:
        if "training diverged" not in str(exc):
            raise
        # a run that diverged and did not recover is a result, not a crash: the cell is
        # recorded without numbers and the group summarises the seeds that trained
        record = failed_cell(cell, str(exc))
        write_json(folder / "cell.json", record)
        return record
    record = measure_cell(cell, cfg, folder, data, judge, b)
    record["config_resolved"] = config_to_dict(cfg)
    if (folder / ADOPTED).exists():
        # the weights come from another benchmark's run of the same training config
        record["trained_by"] = json.loads((folder / ADOPTED).read_text())["trained_by"]
    # this invocation's wall and CPU time on the cell (all threads; the CPU time is the
    # steadier measure on a shared machine)
    record["cell_seconds"] = time.time() - t0
    record["cell_cpu_seconds"] = time.process_time() - cpu0
    write_json(folder / "cell.json", record)  # atomic, last: the cell is finished
    return record


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = plan(args)
    if not cells:
        raise JeatError("nothing to run: no variant matches --variants for these datasets")
    budgets = BUDGETS[args.budget]
    done: list[dict[str, Any]] = []
    judges: dict[str, float] = {}
    started = time.time()
    trained_now = 0
    adoptable = adoptable_runs([Path(a) for a in args.adopt])
    if args.adopt:
        print(f"{len(adoptable)} finished runs to adopt from under {', '.join(args.adopt)}")
    by_dataset: dict[str, list[Cell]] = {}
    for c in cells:
        by_dataset.setdefault(c.dataset, []).append(c)
    i = 0
    for ds, ds_cells in by_dataset.items():
        b = budgets[ds]
        data = load_data(ds, b, Path(args.data_dir))
        judge, judge_acc = judge_for(ds, b, data, out)
        judges[ds] = judge_acc
        reference_for(ds, b, data, judge, out)
        seeds_reference_for(ds, b, data, judge, out)
        print(f"== {ds}: {len(data.x_train)} train / {len(data.x_test)} test images; judge "
              f"{judge_acc:.1f}% ({time.time() - started:.0f} s)", flush=True)  # fmt: skip
        for cell in ds_cells:
            i += 1
            folder = out / cell.run
            head = f"[{i}/{len(cells)}] {cell.run}"
            finished = read_cell(folder)
            if finished is None or stale_cell(cell, b, folder) is not None:
                # one process per cell: parallel invocations into one study share its cells
                with contextlib.ExitStack() as stack:
                    try:
                        stack.enter_context(hold_folder(folder))
                    except FolderBusy:
                        print(f"{head}: another process is on it, skipped", flush=True)
                        continue
                    finished = read_cell(folder)  # it may have finished it meanwhile
                    why = None if finished is None else stale_cell(cell, b, folder)
                    if why is not None:
                        print(f"{head}: trained again ({why})", flush=True)
                        clear_folder(folder)
                        finished = None
                    if finished is None:
                        record = run_cell(cell, cell_config(cell, b), folder, data, judge, b,
                                          adoptable)  # fmt: skip
            if finished is not None:
                print(f"{head}: done, skipped", flush=True)
                done.append(finished)
                continue
            if record["status"] != "ok":
                done.append(record)
                print(f"{head}: {record['error']}", flush=True)
                write_summary(out, args, done, judges)
                continue
            done.append(record)
            trained_now += 1
            m = record["metrics"]
            elapsed = time.time() - started
            left = len(cells) - i
            eta = elapsed / trained_now * left if trained_now else 0.0
            print(
                f"{head}: clean {m['clean']:.1f}  pgd20 {m['pgd20']:.1f}  "
                f"aa {m['autoattack_fast']:.1f}  worst {m['worst_case']:.1f}  "
                f"fid {m['fid_descent']:.1f}/{m['fid_sgld']:.1f}  "
                f"recall {m['recall_descent']:.2f}/{m['recall_sgld']:.2f}  "
                f"train {m['train_seconds']:.0f} s"
                f"  cell {record['cell_seconds']:.0f} s, CPU {record['cell_cpu_seconds']:.0f} s"
                f"  (elapsed {elapsed / 60:.1f} min, "
                f"about {eta / 60:.0f} min left)",
                flush=True,
            )
            write_summary(out, args, done, judges)
    summary = write_summary(out, args, done, judges)
    print(f"wrote {out / 'summary.json'} and {out / 'README.md'} "
          f"({(time.time() - started) / 60:.1f} min)", flush=True)  # fmt: skip
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the study folder (created; resumed if present)")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    p.add_argument("--datasets", default="digits,mnist", help="comma-separated: digits, mnist")
    p.add_argument("--seeds", type=int, help="seeds per variant (default: 5 digits, 3 mnist)")
    p.add_argument("--part", choices=["main", "knobs", "all"], default="all")
    p.add_argument("--variants", help="comma-separated subset of the variants to run")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument(
        "--adopt",
        action="append",
        default=[],
        help="a folder of finished jeat runs (e.g. runs/frontier-work, the frontier's): a cell "
        "whose training config (seed included) equals one of them is not trained again but "
        "measured on a copy of that run; its cell.json names the source (repeatable)",
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in args.datasets if d not in FULL]
    if unknown:
        p.error(f"unknown dataset(s) {unknown}; choose from {sorted(FULL)}")
    if args.seeds is not None and args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.variants:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        known = set(MAIN) | set(ALL_KNOBS)
        bad = [v for v in args.variants if v not in known]
        if bad:
            p.error(f"unknown variant(s) {bad}; choose from {sorted(known)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("JEAT_STUDY_THREADS", torch.get_num_threads())))
    try:
        run_study(args)
    except JeatError as exc:
        print(f"study: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
