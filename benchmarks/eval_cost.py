"""What robustness evaluation costs, measured side by side in one process.

1. PGD-20 (L-inf, step eps/4, random start) with ``jeat.attacks.PGD`` and with the reference
   library's ``torchattacks.PGD`` on the same model and batch, alternating the two and taking
   the median of ``--repeats`` timings: prints ours / reference (target: <= 1.0 on CPU).
2. The full worst-case table (``clean,fgsm,pgd20,cw,autoattack`` in cascade mode) against
   AutoAttack alone on the same points: prints table / AutoAttack (the cascade's promise is
   "little more than its strongest attack").

Models: a PGD-AT ``small_cnn`` trained on the embedded digits (or loaded with ``--run``), and
for the PGD timing also a CIFAR-shaped ``small_cnn`` (3x32x32, untrained: timing only).

Usage (the command that produced ``benchmarks/results/eval_cost/``)::

    python benchmarks/eval_cost.py --out benchmarks/results/eval_cost
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from common import pgd_ratio

from jeat.attacks import LinfBall
from jeat.config import load_config
from jeat.data import load_dataset
from jeat.evaluate import evaluate
from jeat.finish import train_and_finish
from jeat.models import create_model
from jeat.runs import load_trained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="a trained digits run folder (default: train PGD-AT here)")
    p.add_argument("--work", default="runs/benchmarks/eval_cost")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--n", type=int, default=360, help="test points for the table comparison")
    p.add_argument("--n-queries", type=int, default=5000, help="Square's budget in AutoAttack")
    p.add_argument("--out", help="folder for results.json and README-ready table.md")
    args = p.parse_args()
    torch.manual_seed(0)

    data = load_dataset("digits")
    if args.run:
        model = load_trained(args.run)[0]
    else:
        run = Path(args.work) / "digits-pgdat"
        if (run / "model.pt").exists():
            model = load_trained(run)[0]
        else:
            cfg = load_config("digits-pgdat", ["progress=false", "final_samples=false"])
            model = train_and_finish(cfg, run, data=data).model
    model.eval()
    eps = data.info.eps_linf
    results: dict = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }

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
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        lines = [
            "| measurement | jeat | reference | ratio |",
            "|---|---|---|---|",
        ]
        for k in ("pgd20_digits", "pgd20_cifar_shape"):
            r = results[k]
            lines.append(
                f"| PGD-20, batch {'x'.join(map(str, r['batch']))} | {r['ours_s']:.3f} s | "
                f"{r['torchattacks_s']:.3f} s (torchattacks) | {r['ratio']:.2f} |"
            )
        r = results["table_vs_autoattack"]
        lines.append(
            f"| worst-case table vs AutoAttack, {r['n']} digits points | {r['table_s']:.1f} s | "
            f"{r['autoattack_s']:.1f} s (AutoAttack alone) | {r['ratio']:.2f} |"
        )
        (out / "table.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
