"""What recording loss traces and computing the indicators adds to a PGD-20 evaluation.

Side by side, interleaved over ``--repeats`` rounds on the same points: the cascade table
``clean,pgd20`` of the digits PGD-AT model with ``trace=False`` (the plain evaluation) and with
``trace=True`` followed by the per-point indicators of :mod:`jeat.diagnose` (the loss-trace
part of ``--diagnose``; the model checks and probes are separate attacks and not counted). The
target is a ratio of at most 1.10.

    python benchmarks/trace_overhead.py --out benchmarks/results/trace_overhead
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import (
    LEAN_OVERRIDES,
    interleaved,
    machine,
    paired_ratio,
    ratio_text,
    train_or_reuse,
    write_outputs,
)

from jeat.attacks import LinfBall
from jeat.config import load_config
from jeat.data import load_dataset
from jeat.diagnose import point_indicators
from jeat.evaluate import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", help="folder of the trained PGD-AT run (reused; default: temporary)")
    p.add_argument("--out", help="write results.json and table.md here")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--n", type=int, default=360)
    args = p.parse_args()
    data = load_dataset("digits")
    x, y = data.x_test[: args.n], data.y_test[: args.n]
    threat = LinfBall(0.2)
    folder = Path(args.work or tempfile.mkdtemp(prefix="jeat-trace-")) / "pgdat"
    model = train_or_reuse(load_config("digits-pgdat", LEAN_OVERRIDES), folder, data)[0].eval()
    device = torch.device("cpu")

    def plain() -> None:
        evaluate(model, x, y, "clean,pgd20", threat)

    def traced() -> None:
        res = evaluate(model, x, y, "clean,pgd20", threat, trace=True)
        assert res.robust is not None
        for name, tr in res.traces.items():
            point_indicators(tr, res.robust & (res.outcomes[name] >= 0), "white-box", 1, False)

    times = interleaved({"plain": plain, "traced": traced}, args.repeats, device, log=print)
    stat = paired_ratio(times["traced"], times["plain"])
    table = (
        f"PGD-20 table of the digits PGD-AT model on {args.n} points; {machine()}; "
        f"{args.repeats} interleaved rounds.\n\n"
        f"| variant | median s |\n|---|---|\n"
        f"| plain evaluation | {times['plain'].median:.2f} |\n"
        f"| with loss traces and per-point indicators | {times['traced'].median:.2f} |\n\n"
        f"Ratio traced / plain: **{ratio_text(stat)}** (median of per-round ratios, 95% "
        f"bootstrap interval); target <= 1.10: {'met' if stat['median'] <= 1.10 else 'NOT met'}.\n"
    )
    results = {
        "n": args.n,
        "repeats": args.repeats,
        "machine": machine(),
        "plain_seconds": times["plain"].seconds,
        "traced_seconds": times["traced"].seconds,
        "ratio": stat,
    }
    print(table)
    if args.out:
        write_outputs(args.out, results, table)


if __name__ == "__main__":
    main()
