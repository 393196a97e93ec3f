"""How far ``autoattack-fast`` (the reference APGD-CE then APGD-T, no FAB-T, no Square) is from
full standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square with 5,000 queries), per model.

For every model (dataset x objective) the script trains a run into ``--work/<name>`` unless one
is there (lean: no final eval, samples, analysis, scores or report), then evaluates, on the same
first ``N`` test points and in cascade mode, ``clean,autoattack-fast`` and
``clean,autoattack:n_queries=5000``. It records both robust accuracies, their difference (fast -
full, in points), the number of points full AutoAttack broke that fast did not (and the reverse),
and both wall-clock times.

Resumable: trained runs are reused, and every measured cell (model x attack) is written to
``--out/results.json`` as soon as it finishes and skipped on the next start. ``table.md`` is
rewritten from ``results.json`` after every cell.

    python benchmarks/autoattack_fast.py --datasets digits --out benchmarks/results/autoattack_fast
    python benchmarks/autoattack_fast.py --datasets mnist --epochs mnist=2 --n mnist=100 ...

k-WTA models mask gradients (their adaptive attack is ``pgd20:bpda=1``); AutoAttack runs on them
as is, so their rows measure the reference attacks against a gradient-masking model.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from common import train_or_reuse

from jeat.attacks import LinfBall
from jeat.config import load_config
from jeat.data import load_dataset
from jeat.evaluate import evaluate
from jeat.runs import load_trained

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ("standard", "pgdat", "trades", "jeat", "kwta")
# dataset key -> (config prefix, load_dataset name, eps, default N, data.name override)
DATASETS: dict[str, tuple[str, str, float, int, str | None]] = {
    "digits": ("digits", "digits", 0.2, 200, None),
    "mnist": ("mnist", "mnist-t10k", 0.3, 100, "mnist-t10k"),
    "cifar": ("cifar10", "cifar10", 8 / 255, 64, None),
}
LEAN = [
    "final_eval=false",
    "final_samples=false",
    "final_analysis=false",
    "final_scores=false",
    "final_report=false",
    "progress=false",
]
CELLS = {"fast": "autoattack-fast", "full": "autoattack:n_queries=5000"}


def per_dataset(values: list[str], cast: type) -> dict[str, Any]:
    """``["mnist=2", "cifar=3"]`` -> ``{"mnist": 2, "cifar": 3}``."""
    out = {}
    for v in values:
        key, _, val = v.partition("=")
        out[key.strip()] = cast(val)
    return out


def trained(name: str, overrides: list[str], folder: Path, data: Any) -> dict[str, Any]:
    """Train (or resume, or reuse) one run (:func:`common.train_or_reuse`); returns what the
    results record about it."""
    train_or_reuse(load_config(name, overrides), folder, data)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return {
        "config": name,
        "overrides": overrides,
        "epochs_run": len(rows),
        "train_seconds": sum(r.get("epoch_seconds", 0.0) for r in rows),
    }


def cell(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str, eps: float):
    t0 = time.perf_counter()
    res = evaluate(model, x, y, ["clean", attack], LinfBall(eps))
    seconds = time.perf_counter() - t0
    assert res.robust is not None
    return {
        "attack": attack,
        "robust_accuracy": res.robust_accuracy,
        "clean_accuracy": res.rows[0].accuracy,
        "seconds": seconds,
        "rows": [
            {"attack": r.attack, "accuracy": r.accuracy, "seconds": r.seconds} for r in res.rows
        ],
        "robust": [int(v) for v in res.robust.tolist()],
        "warnings": list(res.warnings),
    }


def compare(entry: dict[str, Any]) -> None:
    """Fill in the fast - full numbers once both cells of a model are measured."""
    fast, full = entry["cells"].get("fast"), entry["cells"].get("full")
    if not (fast and full):
        return
    rf, rF = fast["robust"], full["robust"]
    entry["fast_minus_full"] = fast["robust_accuracy"] - full["robust_accuracy"]
    entry["broken_by_full_only"] = sum(a == 1 and b == 0 for a, b in zip(rf, rF, strict=True))
    entry["broken_by_fast_only"] = sum(a == 0 and b == 1 for a, b in zip(rf, rF, strict=True))
    entry["time_ratio_full_over_fast"] = full["seconds"] / fast["seconds"]


def table(results: dict[str, Any]) -> str:
    lines = [
        "| model | ε | points | clean % | fast % | full % | fast − full (points) | "
        "broken by full only | broken by fast only | fast s | full s | full / fast time | "
        "full, after each stage (APGD-CE / APGD-T / FAB-T / Square) % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results["models"].items():
        fast, full = e["cells"].get("fast"), e["cells"].get("full")
        if not (fast and full):
            continue
        lines.append(
            f"| {name} | {e['eps']:.4g} | {e['n']} | {fast['clean_accuracy']:.1f} | "
            f"{fast['robust_accuracy']:.1f} | {full['robust_accuracy']:.1f} | "
            f"{e['fast_minus_full']:+.1f} | {e['broken_by_full_only']} | "
            f"{e['broken_by_fast_only']} | {fast['seconds']:.0f} | {full['seconds']:.0f} | "
            f"{e['time_ratio_full_over_fast']:.1f} | "
            + " / ".join(f"{r['accuracy']:.1f}" for r in full["rows"][1:])
            + " |"
        )
    return "\n".join(lines) + "\n"


def save(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out / "results.json")
    (out / "table.md").write_text(table(results))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="digits", help="comma list of digits, mnist, cifar")
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--n", nargs="*", default=[], help="points per dataset, e.g. mnist=100")
    p.add_argument("--epochs", nargs="*", default=[], help="epochs per dataset, e.g. mnist=2")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        dest="extra",
        help="extra overrides per dataset, e.g. mnist:objective.attack.eps_warmup_steps=100",
    )
    p.add_argument("--work", default="runs/benchmarks/aa")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared/data"))
    p.add_argument("--out", default="benchmarks/results/autoattack_fast")
    p.add_argument("--cells", default="fast,full", help="comma list of fast, full (order run)")
    args = p.parse_args()
    n_of, epochs_of = per_dataset(args.n, int), per_dataset(args.epochs, int)
    extra: dict[str, list[str]] = {}
    for s in args.extra:
        key, _, ov = s.partition(":")
        extra.setdefault(key, []).append(ov)
    out = Path(args.out)
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"models": {}}
    results.update(
        machine=platform.platform(),
        processor=platform.processor() or platform.machine(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    for ds in [s.strip() for s in args.datasets.split(",") if s.strip()]:
        prefix, data_name, eps, n_default, data_override = DATASETS[ds]
        data = load_dataset(data_name, root=None if ds == "digits" else Path(args.data_dir))
        n = n_of.get(ds, n_default)
        x, y = data.x_test[:n], data.y_test[:n]
        for obj in [s.strip() for s in args.objectives.split(",") if s.strip()]:
            name = f"{prefix}-{obj}"
            overrides = list(LEAN)
            if data_override:
                overrides += [f"data.name={data_override}", f"data.root={args.data_dir}"]
            elif ds != "digits":
                overrides.append(f"data.root={args.data_dir}")
            if ds in epochs_of:
                overrides.append(f"epochs={epochs_of[ds]}")
            overrides += extra.get(ds, [])
            entry = results["models"].setdefault(name, {"cells": {}})
            if entry.get("n") not in (None, n) or entry.get("overrides") not in (None, overrides):
                print(f"{name}: settings changed, measuring again", flush=True)
                entry = results["models"][name] = {"cells": {}}
            print(f"{name}: {n} points, eps {eps:.4g}", flush=True)
            entry.update(trained(name, overrides, Path(args.work) / name, data))
            entry.update(n=n, eps=eps, dataset=data_name, overrides=overrides)
            model = load_trained(Path(args.work) / name)[0].eval()
            for key in [s.strip() for s in args.cells.split(",") if s.strip()]:
                if key in entry["cells"]:
                    print(f"  {key}: measured already", flush=True)
                    continue
                c = cell(model, x, y, CELLS[key], eps)
                entry["cells"][key] = c
                print(f"  {key} ({c['attack']}): robust {c['robust_accuracy']:.1f}% "
                      f"in {c['seconds']:.0f}s", flush=True)  # fmt: skip
                compare(entry)
                save(results, out)
            compare(entry)
            save(results, out)
    print(table(results))


if __name__ == "__main__":
    main()
