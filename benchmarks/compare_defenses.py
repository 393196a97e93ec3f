"""Train every defence with one budget, then print its full robustness table and its
generation scores: which defences are robust to what, and which also generate?

Defences (the shipped configs ``<dataset>-<config>``, all on the same small_cnn, optimiser,
epochs, batch and seed; only what defines each defence differs):

========  ===========  ================================================================
row       config       what it is
========  ===========  ================================================================
standard  standard     cross-entropy on clean images (the undefended reference)
pgd-at    pgdat        Madry PGD-10 adversarial training (L-inf)
trades    trades       TRADES, beta 6 (L-inf)
wrm       wrm          WRM, gamma 2, 15 ascent steps, ELU activations (Wasserstein / L2)
k-wta     kwta         PGD-AT with k-WTA activations (top 10%): a gradient-masking defence
doa       doa          DOA: adversarial training against the rectangular occlusion attack
jeat      jeat         JEAT, the robust *and* generative hybrid (the reference for generation)
========  ===========  ================================================================

Each model is evaluated with :func:`jeat.evaluate.evaluate` in ``independent`` mode (every
attack on every clean-correct point, so each column is that attack's own accuracy), the same
table ``jeat eval --mode independent`` prints, with the sanity warnings it raises. Attacks by
default: FGSM, PGD-20, CW-30 and an adaptive PGD-20 (five restarts; BPDA through k-WTA layers,
i.e. plain 5-restart PGD on the other models) at the dataset's L-inf budget; PGD-20 at its L2
budget; transfer from the standard model; ROA (the rectangular occlusion attack, its default
rectangle); and on digits AutoAttack. ``--attacks`` replaces the list.

Generation: ``--per-class`` class-conditional samples per class from every model, by seeded
descent and by SGLD, scored by an independently trained standard *judge* classifier
(judge-based Inception-style score, judge Fréchet distance to the test images, judge accuracy;
see ``jeat.metrics``: judge-based scores, not Inception Score / FID).

Datasets: ``digits`` (embedded in scikit-learn, always available), ``mnist`` (the 10,000 MNIST
test images split 8,000 / 2,000) and ``cifar10`` (the CIFAR-10 subset), the last two from
``--data-dir`` (``../shared/data`` by default).

Usage (the command that produced ``benchmarks/results/compare_defenses/``)::

    python benchmarks/compare_defenses.py --data-dir ../shared/data

Trained runs go to ``--work``; a run folder that already holds a ``model.pt`` is reused, so an
interrupted benchmark resumes where it stopped (a run killed mid-training resumes from its last
checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import ROOT, generation_scores, machine, reference_scores, train_judge, train_or_reuse

from jeat.attacks import LinfBall
from jeat.config import TrainConfig, load_config
from jeat.data import DatasetInfo, load_dataset
from jeat.evaluate import EvalContext, EvalResult, evaluate

DEFENCES = {
    "standard": "standard",
    "pgd-at": "pgdat",
    "trades": "trades",
    "wrm": "wrm",
    "k-wta": "kwta",
    "doa": "doa",
    "jeat": "jeat",
}


@dataclass
class DatasetSpec:
    config_prefix: str  # shipped configs <prefix>-<defence config>
    data_name: str
    sub_dir: str | None  # folder under --data-dir; None: embedded data
    epochs: int
    width: int
    overrides: list[str] = field(default_factory=list)
    autoattack: bool = False  # AutoAttack in the default attack list (CPU cost)
    seed_resolution: int = 16


DATASETS = {
    "digits": DatasetSpec("digits", "digits", None, epochs=12, width=32, autoattack=True),
    "mnist": DatasetSpec(
        "mnist",
        "mnist-t10k",
        "mnist",
        epochs=6,
        width=16,
        overrides=[  # PGD-10 at eps 0.3 instead of the config's PGD-40 (CPU budget)
            "objective.attack.steps=10",
            "objective.attack.step_size=0.075",
            "objective.attack.eps_warmup_steps=126",
            "schedule.warmup_steps=60",
            "optim.lr=2e-3",
        ],
    ),
    "cifar10": DatasetSpec("cifar10", "cifar10", "", epochs=10, width=16, seed_resolution=8),
}


def default_attacks(spec: DatasetSpec, info: DatasetInfo, standard_dir: Path) -> list[str]:
    attacks = [
        "clean",
        "fgsm",
        "pgd20",
        "cw30",
        "pgd20:bpda=1:restarts=5",
        f"pgd20:norm=l2:eps={info.eps_l2:g}",
        f"transfer:source={standard_dir}",
        "roa",
    ]
    return attacks + (["autoattack"] if spec.autoattack else [])


def _cfg(spec: DatasetSpec, config: str, args: argparse.Namespace, extra=()) -> TrainConfig:
    return load_config(
        f"{spec.config_prefix}-{config}",
        [
            f"data.name={spec.data_name}",
            f"epochs={args.epochs or spec.epochs}",
            f"model.options.width={args.width or spec.width}",
            f"seed={args.seed}",
            "final_eval=false",
            "final_samples=false",
            "eval.epoch_n=0",
            f"progress={str(not args.quiet).lower()}",
            *spec.overrides,
            *extra,
        ],
    )


def _summary(result: EvalResult) -> dict:
    """Accuracy per attack, and the worst case over the L-inf rows only (the table's own
    worst case mixes threat models: L2 and occlusion rows too)."""
    acc = {r.attack: r.accuracy for r in result.rows}
    linf = [r.accuracy for r in result.rows if r.threat.startswith("linf")]
    return {
        "accuracy": acc,
        "linf_worst": min(x for x in linf if x is not None) if linf else None,
        "worst_any": result.robust_accuracy,
        "warnings": list(result.warnings),
    }


def run_dataset(name: str, args: argparse.Namespace, out: Path) -> dict:
    spec = DATASETS[name]
    root = None if spec.sub_dir is None else Path(args.data_dir) / spec.sub_dir
    data = load_dataset(spec.data_name, root=root)
    info = data.info
    epochs, width = args.epochs or spec.epochs, args.width or spec.width
    work = Path(args.work) / name
    out.mkdir(parents=True, exist_ok=True)
    print(f"== {name}: {len(data.x_train)} train / {len(data.x_test)} test images", flush=True)

    judge_epochs = args.judge_epochs or epochs
    judge_cfg = _cfg(
        spec,
        "standard",
        args,
        [f"seed={args.seed + 1000}", f"model.options.width={2 * width}", f"epochs={judge_epochs}"],
    )
    judge, judge_acc = train_judge(judge_cfg, work / f"judge-e{judge_epochs}-w{2 * width}", data)
    print(f"  judge: small_cnn width {2 * width}, test accuracy {judge_acc:.2f}%", flush=True)

    n = args.n or len(data.x_test)
    x, y = data.x_test[:n], data.y_test[:n]
    tag = f"e{epochs}-w{width}-s{args.seed}"
    eps = None
    rows = []
    defences = [d.strip() for d in args.defences.split(",") if d.strip()]
    for label in defences:
        cfg = _cfg(spec, DEFENCES[label], args)
        eps = cfg.eval.eps if cfg.eval.eps is not None else info.eps_linf
        print(f"-- {label}", flush=True)
        model, epoch_s = train_or_reuse(cfg, work / f"{label}-{tag}", data)
        attacks = args.attacks.split(",") if args.attacks else None
        attacks = attacks or default_attacks(spec, info, work / f"standard-{tag}")
        ctx = EvalContext(image_shape=tuple(info.shape))
        t0 = time.perf_counter()
        result = evaluate(
            model, x, y, attacks, LinfBall(eps), mode="independent", context=ctx, seed=args.seed
        )
        eval_s = time.perf_counter() - t0
        print(result.table(), flush=True)
        (out / f"eval-{label}.md").write_text(result.markdown())
        (out / f"eval-{label}.json").write_text(json.dumps(result.to_dict(), indent=2))
        row = {
            "model": label,
            "config": f"{spec.config_prefix}-{DEFENCES[label]}",
            "seconds_per_epoch": epoch_s,
            "eval_seconds": eval_s,
            **_summary(result),
        }
        for method in ("descent", "sgld"):
            row[method] = generation_scores(
                model,
                data,
                judge,
                method=method,
                steps=args.gen_steps,
                per_class=args.per_class,
                seed=args.seed + 7,
                seed_resolution=spec.seed_resolution,
                grid=out / f"samples-{label}-{method}.png",
            )
        rows.append(row)
        print(
            f"  descent FD {row['descent']['judge_fd']:.2f} acc "
            f"{row['descent']['judge_accuracy']:.1f}%  sgld FD {row['sgld']['judge_fd']:.2f} "
            f"acc {row['sgld']['judge_accuracy']:.1f}%",
            flush=True,
        )
    result = {
        "dataset": name,
        "data": spec.data_name,
        "n_train": len(data.x_train),
        "n_test": n,
        "eps_linf": eps,
        "eps_l2": info.eps_l2,
        "epochs": epochs,
        "width": width,
        "seed": args.seed,
        "judge": {"width": 2 * width, "epochs": judge_epochs, "test_accuracy": judge_acc},
        "samples_per_model": info.num_classes * args.per_class,
        "generation_steps": args.gen_steps,
        "rows": rows,
        "references": reference_scores(
            data, judge, args.per_class, args.seed + 7, spec.seed_resolution
        ),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(markdown(result))
    print(markdown(result), flush=True)
    return result


def _short(attack: str) -> str:
    """Column title of an attack label."""
    if attack.startswith("transfer:"):
        return "transfer (standard)"
    return {"pgd20:bpda=1:restarts=5": "PGD-20 ×5 (BPDA)"}.get(attack, attack)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(r: dict) -> str:
    attacks = list(r["rows"][0]["accuracy"]) if r["rows"] else []
    lines = [
        f"### {r['dataset']} ({r['data']}: {r['n_train']} train / {r['n_test']} test points, "
        f"L-inf ε {r['eps_linf']:.4g}, L2 ε {r['eps_l2']:g}, {r['epochs']} epochs, small_cnn "
        f"width {r['width']}, seed {r['seed']})",
        "",
        "Robust accuracy (%) per attack, each attack on every clean-correct point "
        "(`jeat eval --mode independent`); L-inf worst = the minimum over the L-inf rows. "
        "A † marks a model the sanity rules flag (warnings below the tables).",
        "",
        "| model | " + " | ".join(_short(a) for a in attacks) + " | L-inf worst | s/epoch |",
        "|---|" + "---|" * (len(attacks) + 2),
    ]
    for row in r["rows"]:
        flag = " †" if row["warnings"] else ""
        cells = [_pct(row["accuracy"].get(a)) for a in attacks]
        lines.append(
            f"| {row['model']}{flag} | " + " | ".join(cells) + f" | {_pct(row['linf_worst'])} | "
            f"{row['seconds_per_epoch']:.1f} |"
        )
    lines += [
        "",
        f"Generation: {r['samples_per_model']} class-conditional samples per model, "
        f"{r['generation_steps']} steps from class-Gaussian seeds, scored by a judge "
        f"(standard small_cnn width {r['judge']['width']}, {r['judge']['epochs']} epochs, test "
        f"accuracy {r['judge']['test_accuracy']:.2f}%). FD = judge Fréchet distance to the test "
        "images (lower is better); acc = share the judge assigns to the intended class; score "
        "= judge Inception-style score. Judge-based scores, not Inception Score / FID.",
        "",
        "| model | descent FD | descent acc % | descent score "
        "| SGLD FD | SGLD acc % | SGLD score |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        d, s = row["descent"], row["sgld"]
        lines.append(
            f"| {row['model']} | {d['judge_fd']:.2f} | {d['judge_accuracy']:.1f} | "
            f"{d['judge_score']:.2f} | {s['judge_fd']:.2f} | {s['judge_accuracy']:.1f} | "
            f"{s['judge_score']:.2f} |"
        )
    for label, ref in r["references"].items():
        lines.append(
            f"| *{label}* | {ref['judge_fd']:.2f} | {ref['judge_accuracy']:.1f} | "
            f"{ref['judge_score']:.2f} | | | |"
        )
    warned = [row for row in r["rows"] if row["warnings"]]
    if warned:
        lines += ["", "Sanity warnings:", ""]
        for row in warned:
            lines += [f"- **{row['model']}**: {w}" for w in row["warnings"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--datasets", default="digits,cifar10")
    p.add_argument("--defences", default=",".join(DEFENCES))
    p.add_argument("--epochs", type=int, help="epochs of every model (default: per dataset)")
    p.add_argument("--width", type=int, help="small_cnn width (default: per dataset)")
    p.add_argument("--judge-epochs", type=int, help="epochs of the judge (default: --epochs)")
    p.add_argument("--attacks", help="comma-separated attack list (default: see the docstring)")
    p.add_argument("--n", type=int, help="test points to evaluate (default: all)")
    p.add_argument("--per-class", type=int, default=100, help="samples per class to score")
    p.add_argument("--gen-steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(ROOT / "runs" / "benchmarks" / "defenses"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare_defenses"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        p.error(f"unknown dataset(s) {unknown}; choose from {sorted(DATASETS)}")
    bad = [d for d in args.defences.split(",") if d.strip() and d.strip() not in DEFENCES]
    if bad:
        p.error(f"unknown defence(s) {bad}; choose from {', '.join(DEFENCES)}")
    out = Path(args.out)
    for n in names:
        started = time.time()
        result = run_dataset(n, args, out / n)
        result["command"] = "python benchmarks/compare_defenses.py " + " ".join(sys.argv[1:])
        result["machine"] = machine()
        result["minutes"] = (time.time() - started) / 60
        (out / n / "results.json").write_text(json.dumps(result, indent=2))
    # the summary holds every dataset measured so far, each with the command that measured it
    parts = ["# compare_defenses", ""]
    for n in DATASETS:
        f = out / n / "results.json"
        if f.exists():
            r = json.loads(f.read_text())
            parts += [
                markdown(r),
                f"Command: `{r['command']}`; {r['machine']}; {r['minutes']:.1f} min.",
                "",
            ]
    (out / "README.md").write_text("\n".join(parts))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    raise SystemExit(main())
