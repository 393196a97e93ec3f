"""What robustness evaluation costs, measured side by side in one process.

1. PGD-20 (L-inf, step eps/4, random start) with ``jeat.attacks.PGD`` and with the reference
   library's ``torchattacks.PGD`` on the same model and batch, alternating the two and taking
   the median of ``--repeats`` timings: prints ours / reference (target: <= 1.0 on CPU).
2. The full worst-case table (``clean,fgsm,pgd20,cw,autoattack`` in cascade mode) against
   AutoAttack alone on the same points: prints table / AutoAttack (the cascade's promise is
   "little more than its strongest attack").
3. ``--parts active``: PGD in evaluation mode (``keep_success=True``: each point's first
   fooling iterate; the active set drops fooled points from the batch and restarts attack only
   the points still standing) against torchattacks on trained models, side by side: PGD-20
   against ``torchattacks.PGD``, and PGD-100 with 5 restarts against
   ``torchattacks.MultiAttack`` of five ``torchattacks.PGD`` (torchattacks' PGD has no
   restarts; MultiAttack runs each attack on the points the previous ones left correctly
   classified and keeps each point's first success). Every round runs torchattacks, ours
   (active set) and ours with ``active_set=False`` on the same batch, in rotated order after
   one untimed warm-up round, each with a fresh random start (torchattacks from the global
   seed, ours from a generator); times are medians, accuracies the mean over the timed rounds
   (a point counts as robust when it is classified correctly clean and after the attack).
   Targets: ours / torchattacks <= 0.7 (PGD-20) and <= 0.4 (PGD-100 x 5), with our accuracy
   never above theirs by more than 0.5 points. A forward pre-hook on the model counts the rows
   of every forward pass (on an input that needs a gradient: an attack step; else a success
   test), so each row also reports its work, and the *work bound*: a point the attack leaves
   standing takes every step of every restart in any implementation of the attack, so no
   implementation does fewer than robust points x restarts x steps gradient rows (printed as a
   share of torchattacks').
4. ``--parts default``: the main job's default table (``clean,fgsm,pgd20,autoattack-fast``,
   cascade, cheap attacks first) against ``autoattack-fast`` alone (``clean,autoattack-fast``)
   on the same points, interleaved rounds: prints table / alone with a bootstrap interval
   (target: <= 1.2) and both worst cases.
5. ``--parts batch``: microseconds per row of one attack step (forward, per-point
   cross-entropy, input gradient) at batch sizes 16 to 1024 (interleaved rounds after two
   untimed ones, medians), for the digits model and a CIFAR-shaped one: whether running
   restarts side by side as one larger batch would make a point-step cheaper on this device
   (on a CPU it does not; see eval_active's README).

Models: a PGD-AT ``small_cnn`` trained on the embedded digits (or loaded with ``--run``), and
for the PGD timing also a CIFAR-shaped ``small_cnn`` (3x32x32, untrained: timing only).

Usage (the command that produced ``benchmarks/results/eval_cost/``)::

    python benchmarks/eval_cost.py --out benchmarks/results/eval_cost

and for ``benchmarks/results/eval_active/`` (see its README for the CIFAR-shaped model)::

    python benchmarks/eval_cost.py --parts active --cifar-run runs/benchmarks/cifar-pgdat \
        --out benchmarks/results/eval_active
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from common import (
    LEAN_OVERRIDES,
    Measured,
    interleaved,
    paired_ratio,
    pgd_ratio,
    ratio_text,
    rotated,
    sync,
)
from torch import Tensor, nn

from jeat.attacks import PGD, LinfBall
from jeat.config import load_config
from jeat.data import load_dataset
from jeat.evaluate import evaluate
from jeat.finish import train_and_finish
from jeat.models import create_model
from jeat.runs import load_trained


def active_vs_torchattacks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    restarts: int,
    repeats: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Our evaluation PGD against torchattacks on ``(x, y)``, interleaved; times (median s),
    accuracies (mean %) and the ratios.

    With one restart the rows are ``torchattacks.PGD``, ours (active set) and ours on the full
    batch (``active_set=False``). With restarts: ``torchattacks.MultiAttack`` of ``restarts``
    PGDs (torchattacks' way to restart: each PGD attacks only the points the previous ones left
    correctly classified), ``restarts`` independent full-batch ``torchattacks.PGD`` runs keeping
    each point's first success, and ours (active set)."""
    import torchattacks

    model.eval()
    device = x.device
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    ours = PGD(LinfBall(eps), steps=steps, restarts=restarts, keep_success=True)

    def ta_pgd() -> Any:
        return torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=steps, random_start=True)

    def ours_run(attack: PGD) -> Callable[[Tensor, Tensor, int], Tensor]:
        def run(xb: Tensor, yb: Tensor, r: int) -> Tensor:
            gen = torch.Generator(device=device).manual_seed(seed * 1000 + r)
            return attack(model, xb, yb, generator=gen, check=False)

        return run

    variants: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {}
    if restarts == 1:
        one = ta_pgd()
        variants["torchattacks"] = lambda xb, yb, r: one(xb, yb)
        variants["ours"] = ours_run(ours)
        variants["ours_full_batch"] = ours_run(replace(ours, active_set=False))
    else:
        multi = torchattacks.MultiAttack([ta_pgd() for _ in range(restarts)])
        single = ta_pgd()

        def independent(xb: Tensor, yb: Tensor, r: int) -> Tensor:
            best = xb.clone()
            fooled = torch.zeros(len(xb), dtype=torch.bool, device=device)
            for _ in range(restarts):
                xa = single(xb, yb)
                with torch.no_grad():
                    now = model(xa).argmax(1) != yb
                take = ~fooled
                best[take] = xa[take]
                fooled |= now
            return best

        variants["torchattacks"] = lambda xb, yb, r: multi(xb, yb)
        variants[f"torchattacks_{restarts}_runs"] = independent
        variants["ours"] = ours_run(ours)
    names = list(variants)
    for name in names:  # warm-up on a few points, untimed
        variants[name](x[:16], y[:16], -1)
    times = {n: Measured() for n in names}
    accs: dict[str, list[float]] = {n: [] for n in names}
    # work: the rows every forward pass of the model carries, on inputs that need a gradient
    # (an attack step: forward and backward) and on others (a success test), summed over a call
    tally = {"grad": 0, "nograd": 0}

    def count(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
        step = torch.is_grad_enabled() and inputs[0].requires_grad
        tally["grad" if step else "nograd"] += int(inputs[0].shape[0])

    work: dict[str, list[dict[str, int]]] = {n: [] for n in names}
    robust_n: dict[str, list[int]] = {n: [] for n in names}
    for r in range(repeats):
        for name in rotated(names, r):
            torch.manual_seed(seed * 1000 + r)  # torchattacks' random starts
            tally.update(grad=0, nograd=0)
            hook = model.register_forward_pre_hook(count)
            sync(device)
            start = time.perf_counter()
            x_adv = variants[name](x, y, r)
            sync(device)
            seconds = time.perf_counter() - start
            hook.remove()
            times[name].add(seconds, None)
            work[name].append(dict(tally))
            with torch.no_grad():
                ok = (model(x_adv).argmax(1) == y) & clean_ok
            robust_n[name].append(int(ok.sum()))
            accs[name].append(100.0 * float(ok.float().mean()))
            print(f"    round {r + 1}/{repeats}: {name} {seconds:.3f}s acc {accs[name][-1]:.2f}%",
                  flush=True)  # fmt: skip
    out: dict[str, Any] = {
        "points": len(x),
        "steps": steps,
        "restarts": restarts,
        "clean_acc": 100.0 * float(clean_ok.float().mean()),
        "rounds": repeats,
        "variants": names,
        "seconds": {n: times[n].seconds for n in names},
        "median_s": {n: times[n].median for n in names},
        "accuracies": accs,
        "mean_acc": {n: statistics.mean(accs[n]) for n in names},
    }
    out["gradient_rows"] = {n: statistics.mean(w["grad"] for w in work[n]) for n in names}
    out["forward_only_rows"] = {n: statistics.mean(w["nograd"] for w in work[n]) for n in names}
    ta_work = out["gradient_rows"]["torchattacks"]
    out["work_ratios_to_torchattacks"] = {n: out["gradient_rows"][n] / ta_work for n in names}
    # a point the attack leaves standing must take every step of every restart in any
    # implementation of this attack: robust points x restarts x steps gradient rows at least
    robust = statistics.mean(robust_n["ours"])
    out["robust_points_ours"] = robust
    out["work_bound_to_torchattacks"] = robust * restarts * steps / ta_work
    base = times["torchattacks"]
    out["ratio"] = times["ours"].median / base.median
    out["ratio_paired"] = paired_ratio(times["ours"], base)
    out["ratios_to_torchattacks"] = {n: times[n].median / base.median for n in names}
    out["acc_ours_minus_torchattacks"] = out["mean_acc"]["ours"] - out["mean_acc"]["torchattacks"]
    return out


ACTIVE_CASES = (("pgd20", 20, 1, 0.7), ("pgd100x5", 100, 5, 0.4))


def active_part(
    models: list[tuple[str, nn.Module, Tensor, Tensor, float]], repeats: dict[str, int]
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for model_name, model, x, y, eps in models:
        for case, steps, restarts, target in ACTIVE_CASES:
            key = f"{case} {model_name}"
            print(f"{key}: {len(x)} points, eps {eps:.4g}", flush=True)
            r = active_vs_torchattacks(model, x, y, eps, steps, restarts, repeats[case])
            r.update(target_ratio=target, model=model_name, case=case)
            results[key] = r
            times = ", ".join(f"{n} {t:.3f}s" for n, t in r["median_s"].items())
            accs = ", ".join(f"{n} {a:.2f}%" for n, a in r["mean_acc"].items())
            print(f"{key}: {times}; ours / torchattacks {r['ratio']:.3f} (per round "
                  f"{ratio_text(r['ratio_paired'])}; target <= {target}); accuracy {accs}",
                  flush=True)  # fmt: skip
    return results


def active_table(results: dict[str, Any]) -> str:
    lines = [
        "| model, points | attack | row | median s | time / torchattacks | gradient rows "
        "| work / torchattacks | accuracy % (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        attack = "PGD-20" if r["restarts"] == 1 else f"PGD-{r['steps']}, {r['restarts']} restarts"
        for n in r["variants"]:
            lines.append(
                f"| {r['model']}, {r['points']} | {attack} | {n} | {r['median_s'][n]:.3f} | "
                f"{r['ratios_to_torchattacks'][n]:.2f} | {r['gradient_rows'][n]:.0f} | "
                f"{r['work_ratios_to_torchattacks'][n]:.2f} | {r['mean_acc'][n]:.2f} |"
            )
    lines.append("")
    lines.append(
        "| model | attack | ours / torchattacks, time (target) | work | work bound "
        "| ours - torchattacks accuracy |"
    )
    lines.append("|---|---|---|---|---|---|")
    for r in results.values():
        attack = "PGD-20" if r["restarts"] == 1 else f"PGD-{r['steps']}, {r['restarts']} restarts"
        lines.append(
            f"| {r['model']} | {attack} | {r['ratio']:.2f} (<= {r['target_ratio']}) | "
            f"{r['work_ratios_to_torchattacks']['ours']:.2f} | "
            f"{r['work_bound_to_torchattacks']:.2f} | "
            f"{r['acc_ours_minus_torchattacks']:+.2f} points (<= +0.5) |"
        )
    return "\n".join(lines) + "\n"


def batch_part(models: list[tuple[str, nn.Module, Tensor]], repeats: int) -> dict[str, Any]:
    """Seconds per point of one attack step (forward, per-point cross-entropy, input
    gradient) at growing batch sizes: whether running restarts side by side as one larger batch
    would make a point-step cheaper on this device."""

    def step(model: nn.Module, xb: Tensor, yb: Tensor) -> Callable[[], object]:
        def run() -> object:
            loss = nn.functional.cross_entropy(model(xb), yb, reduction="none").sum()
            return torch.autograd.grad(loss, xb)

        return run

    sizes = (16, 64, 256, 1024)
    out: dict[str, Any] = {}
    for name, model, x in models:
        device = x.device
        steps: dict[str, Callable[[], object]] = {}
        for n in sizes:
            rows = torch.arange(n, device=device)
            steps[str(n)] = step(model, x[rows % len(x)].clone().requires_grad_(True), rows % 10)
        times = interleaved(steps, repeats, device, warmup=2)
        per_row = {n: times[str(n)].median / n for n in sizes}
        for n, seconds in per_row.items():
            print(f"batch {name}: {n} rows, {1e6 * seconds:.1f} us per row-step", flush=True)
        out[name] = {"seconds_per_row_step": per_row, "rounds": repeats}
    return out


def batch_table(results: dict[str, Any]) -> str:
    sizes = list(next(iter(results.values()))["seconds_per_row_step"])
    lines = [
        "| model | " + " | ".join(f"batch {n}, us per row-step" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name, r in results.items():
        per = r["seconds_per_row_step"]
        lines.append(f"| {name} | " + " | ".join(f"{1e6 * per[n]:.1f}" for n in sizes) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="a trained digits run folder (default: train PGD-AT here)")
    p.add_argument("--work", default="runs/benchmarks/eval_cost")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--n", type=int, default=360, help="test points for the table comparison")
    p.add_argument("--n-queries", type=int, default=5000, help="Square's budget in AutoAttack")
    p.add_argument("--out", help="folder for results.json and README-ready table.md")
    p.add_argument(
        "--parts",
        default="pgd,table",
        help="comma list of pgd, table, active, default, batch (see above)",
    )
    p.add_argument(
        "--cifar-run", help="a trained CIFAR-10 run folder (active part; without it: digits only)"
    )
    p.add_argument("--active-digits", type=int, default=360, help="digits points (active)")
    p.add_argument("--active-cifar", type=int, default=256, help="CIFAR test points (active)")
    p.add_argument("--active-repeats", type=int, default=5, help="timed rounds of PGD-20")
    p.add_argument("--active-repeats-restarts", type=int, default=2,
                   help="timed rounds of PGD-100 x 5")  # fmt: skip
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data"))
    p.add_argument("--device", default="cpu", help="device of the active part (e.g. cuda)")
    args = p.parse_args()
    parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    if unknown := parts - {"pgd", "table", "active", "default", "batch"}:
        p.error(
            f"unknown part(s) {sorted(unknown)}; choose from pgd, table, active, default, batch"
        )
    torch.manual_seed(0)

    data = load_dataset("digits")
    if args.run:
        model = load_trained(args.run)[0]
    else:
        run = Path(args.work) / "digits-pgdat"
        if (run / "model.pt").exists():
            model = load_trained(run)[0]
        else:
            cfg = load_config("digits-pgdat", [*LEAN_OVERRIDES, f"device={args.device}"])
            model = train_and_finish(cfg, run, data=data).model
    model = model.cpu().eval()  # the pgd, table and default parts run on the CPU
    eps = data.info.eps_linf
    results: dict = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }

    lines = ["| measurement | jeat | reference | ratio |", "|---|---|---|---|"]
    active_md = ""
    cifar_model = load_trained(args.cifar_run)[0].eval() if args.cifar_run else None
    if "active" in parts:
        n_d, n_c = args.active_digits, args.active_cifar
        dev = torch.device(args.device)
        results["active_device"] = str(dev)
        models = [
            ("digits PGD-AT small_cnn", copy.deepcopy(model).to(dev),
             data.x_test[:n_d].to(dev), data.y_test[:n_d].to(dev), eps),
        ]  # fmt: skip
        if cifar_model is not None:
            cifar_data = load_dataset("cifar10", root=Path(args.data_dir))
            models.append(
                ("CIFAR-10 PGD-AT small_cnn", cifar_model.to(dev),
                 cifar_data.x_test[:n_c].to(dev), cifar_data.y_test[:n_c].to(dev), 8 / 255)
            )  # fmt: skip
        else:
            print("no --cifar-run: the active part runs on the digits model only", flush=True)
        results["active"] = active_part(
            models, {"pgd20": args.active_repeats, "pgd100x5": args.active_repeats_restarts}
        )
        active_md = active_table(results["active"])
        print(active_md)
    if "batch" in parts:
        dev = torch.device(args.device)
        cifar_shaped = cifar_model or create_model("small_cnn", in_channels=3, num_classes=10)
        xc = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        results["batch"] = batch_part(
            [
                ("digits PGD-AT small_cnn", copy.deepcopy(model).to(dev), data.x_test.to(dev)),
                ("CIFAR-shaped small_cnn", cifar_shaped.eval().to(dev), xc.to(dev)),
            ],
            args.repeats,
        )
        batch_md = batch_table(results["batch"])
        active_md += ("\n" if active_md else "") + batch_md
        print(batch_md)
    if "pgd" in parts:
        x, y = data.x_test[:256], data.y_test[:256]
        results["pgd20_digits"] = pgd_ratio(model, x, y, eps, args.repeats)
        cifar = create_model("small_cnn", in_channels=3, num_classes=10).eval()
        xc = torch.rand(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        yc = torch.randint(0, 10, (128,), generator=torch.Generator().manual_seed(1))
        results["pgd20_cifar_shape"] = pgd_ratio(cifar, xc, yc, 8 / 255, max(3, args.repeats // 2))
        for k in ("pgd20_digits", "pgd20_cifar_shape"):
            r = results[k]
            print(f"{k}: jeat {r['ours_s']:.3f}s  torchattacks {r['torchattacks_s']:.3f}s  "
                  f"ratio {r['ratio']:.2f}")  # fmt: skip
            lines.append(
                f"| PGD-20, batch {'x'.join(map(str, r['batch']))} | {r['ours_s']:.3f} s | "
                f"{r['torchattacks_s']:.3f} s (torchattacks) | {r['ratio']:.2f} |"
            )
    if "table" in parts:
        table_part(model, data, eps, args, results, lines)
    if "default" in parts:
        default_part(model, data, eps, args, results, lines)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        other = "\n".join(lines) + "\n" if len(lines) > 2 else ""
        (out / "table.md").write_text("\n".join(t for t in (active_md, other) if t))
        print(f"wrote {out}")


def default_part(
    model: nn.Module, data: Any, eps: float, args: Any, results: dict, lines: list[str]
) -> None:
    """The default table against autoattack-fast alone, ``--repeats`` interleaved rounds."""
    xt, yt = data.x_test[: args.n], data.y_test[: args.n]
    threat = LinfBall(eps)
    variants = {
        "table": ["clean", "fgsm", "pgd20", "autoattack-fast"],
        "alone": ["clean", "autoattack-fast"],
    }
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    tables: dict[str, list[Any]] = {k: [] for k in variants}
    for r in range(args.repeats + 1):  # round 0: warm-up, untimed
        for name in rotated(list(variants), r):
            t0 = time.perf_counter()
            res = evaluate(model, xt, yt, variants[name], threat, seed=r)
            if r:
                seconds[name].append(time.perf_counter() - t0)
                tables[name].append(res)
    stat = paired_ratio(Measured(seconds["table"]), Measured(seconds["alone"]))
    acc = {k: [t.robust_accuracy for t in v] for k, v in tables.items()}
    results["default_vs_autoattack_fast"] = {
        "n": len(xt),
        "rounds": args.repeats,
        "table_s": seconds["table"],
        "alone_s": seconds["alone"],
        "ratio": stat,
        "table_acc": acc["table"],
        "alone_acc": acc["alone"],
        "table": tables["table"][-1].to_dict(),
        "alone": tables["alone"][-1].to_dict(),
    }
    print(tables["table"][-1].table())
    print(tables["alone"][-1].table())
    mean_t, mean_a = statistics.mean(acc["table"]), statistics.mean(acc["alone"])
    print(f"default table / autoattack-fast alone: {ratio_text(stat)} (target <= 1.2); "
          f"worst case {mean_t:.2f}% vs {mean_a:.2f}%")  # fmt: skip
    lines.append(
        f"| default table (clean, fgsm, pgd20, autoattack-fast) vs autoattack-fast alone, "
        f"{len(xt)} digits points, {args.repeats} rounds | "
        f"{statistics.median(seconds['table']):.1f} s | "
        f"{statistics.median(seconds['alone']):.1f} s | {ratio_text(stat)} |"
    )


def table_part(
    model: nn.Module, data: Any, eps: float, args: Any, results: dict, lines: list[str]
) -> None:

    xt, yt = data.x_test[: args.n], data.y_test[: args.n]
    aa = f"autoattack:n_queries={args.n_queries}"
    threat = LinfBall(eps)
    t0 = time.perf_counter()
    alone = evaluate(model, xt, yt, ["clean", aa], threat)
    t_alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = evaluate(model, xt, yt, ["clean", "fgsm", "pgd20", "cw", aa], threat)
    t_table = time.perf_counter() - t0
    print(alone.table())
    print(table.table())
    results["table_vs_autoattack"] = {
        "n": len(xt),
        "autoattack_s": t_alone,
        "table_s": t_table,
        "ratio": t_table / t_alone,
        "autoattack_acc": alone.robust_accuracy,
        "table_acc": table.robust_accuracy,
        "table": table.to_dict(),
        "autoattack": alone.to_dict(),
    }
    print(f"full table {t_table:.1f}s / AutoAttack alone {t_alone:.1f}s = "
          f"{t_table / t_alone:.2f}  (robust accuracy {table.robust_accuracy:.2f}% vs "
          f"{alone.robust_accuracy:.2f}%)")  # fmt: skip
    r = results["table_vs_autoattack"]
    lines.append(
        f"| worst-case table vs AutoAttack, {r['n']} digits points | {r['table_s']:.1f} s | "
        f"{r['autoattack_s']:.1f} s (AutoAttack alone) | {r['ratio']:.2f} |"
    )


if __name__ == "__main__":
    main()
