"""Sanity rules that catch gradient masking, and robustness curves.

A defence that hides its gradients (non-differentiable or randomised layers, saturated
softmax, k-WTA) makes gradient attacks fail without making the model robust. Four rules from
the evaluation literature (Athalye et al. 2018; Carlini et al. 2019; Croce & Hein 2020) expose
it; each violated rule is reported as a likely sign of masking:

1. accuracy is non-increasing in the budget eps (checked over a sweep: the robustness curve);
2. more attack steps never raise accuracy (FGSM, PGD-5, PGD-20, PGD-100);
3. white-box attacks beat black-box (Square) and transfer attacks;
4. an unbounded attack (the whole [0, 1] box) reaches (near) 0% accuracy.

:func:`jeat.evaluate.table_warnings` (re-exported here) applies rules 2-3 to whatever a
robustness table already holds (run by every :func:`jeat.evaluate.evaluate`);
:func:`sanity_checks` runs all four on purpose
(``jeat eval --sanity``). A tolerance (percentage points, default 3) absorbs the noise of
random starts on a few hundred points.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from jeat.attacks import ThreatModel
from jeat.attacks.threats import check_budget
from jeat.errors import JeatError
from jeat.tables import table_warnings

if TYPE_CHECKING:
    from jeat.evaluate import EvalContext

__all__ = [
    "Check",
    "SanityReport",
    "Curve",
    "table_warnings",
    "sanity_checks",
    "robustness_curve",
    "write_curve",
    "CURVE_FACTORS",
    "curve_budgets",
]

# the default budgets of a robustness curve, as multiples of the threat model's eps
CURVE_FACTORS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def curve_budgets(threat: ThreatModel, shape: tuple[int, ...]) -> list[float]:
    """The default curve's budgets: :data:`CURVE_FACTORS` times the threat's, without those
    past the largest budget that means anything (1 for L-inf, the images' diameter for L2)."""
    values = [f * threat.eps for f in CURVE_FACTORS]
    limit = 1.0 if threat.norm == "linf" else math.sqrt(math.prod(shape))
    return [v for v in values if v <= limit]


@dataclass
class Curve:
    """Robust accuracy (percent) against the budget eps for one attack."""

    attack: str
    norm: str
    eps: list[float]
    accuracy: list[float]
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["eps", "accuracy"])
        for e, a in zip(self.eps, self.accuracy, strict=True):
            w.writerow([f"{e:.6g}", f"{a:.4f}"])
        return buf.getvalue()

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Write the curve as a PNG (atomically)."""
        from jeat.utils import pyplot, save_figure

        fig, ax = pyplot().subplots(figsize=(4.5, 3.2), dpi=120)
        ax.plot(self.eps, self.accuracy, marker="o")
        ax.set_xlabel(f"eps ({self.norm})")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.set_title(title or f"{self.attack} on {self.n} points", fontsize=10)
        fig.tight_layout()
        return save_figure(fig, path)


def robustness_curve(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: str,
    threat: ThreatModel,
    eps_values: list[float],
    batch_size: int = 256,
    seed: int = 0,
    context: EvalContext | None = None,
    progress: bool = False,
) -> Curve:
    """Accuracy under ``attack`` (a name such as ``pgd20``) at each budget in ``eps_values``,
    in the threat model's norm, on the same points."""
    from jeat.evaluate import evaluate, parse_attack

    spec = parse_attack(attack)
    if spec.kind in ("clean", "roa"):
        raise JeatError(f"a robustness curve needs an attack with a budget eps, not '{attack}'")
    if not eps_values:
        raise JeatError("a robustness curve needs at least one budget")
    shape = tuple(x.shape[1:])
    values = sorted(check_budget(threat.norm, e, shape, "a curve budget") for e in eps_values)
    acc = []
    for eps in values:
        if eps == 0:
            res = evaluate(model, x, y, ["clean"], threat, batch_size, seed, context=context)
        else:
            res = evaluate(
                model,
                x,
                y,
                [attack],
                threat.with_eps(eps),
                batch_size,
                seed,
                mode="independent",
                context=context,
                progress=progress,
            )
        acc.append(res.robust_accuracy)
    return Curve(spec.label, threat.norm, values, acc, len(x))


@dataclass
class Check:
    rule: str
    passed: bool | None  # None: skipped
    detail: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class SanityReport:
    checks: list[Check]
    curve: Curve | None = None
    tolerance: float = 3.0

    @property
    def warnings(self) -> list[str]:
        return [f"{c.rule}: {c.detail}" for c in self.checks if c.passed is False]

    def to_dict(self) -> dict:
        return {
            "tolerance": self.tolerance,
            "checks": [asdict(c) for c in self.checks],
            "warnings": self.warnings,
            "curve": self.curve.to_dict() if self.curve else None,
        }

    def table(self) -> str:
        mark = {True: "ok  ", False: "WARN", None: "skip"}
        lines = ["sanity checks (gradient masking):"]
        lines += [f"  [{mark[c.passed]}] {c.rule}: {c.detail}" for c in self.checks]
        return "\n".join(lines)


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}%" for k, v in values.items())


def sanity_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    attack: str = "pgd20",
    eps_factors: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0),
    steps: tuple[int, ...] = (1, 5, 20, 100),
    black_box: str | None = "square:n_queries=1000",
    transfer: str | None = None,
    tolerance: float = 3.0,
    unbounded_max: float = 2.0,
    batch_size: int = 256,
    seed: int = 0,
    context: EvalContext | None = None,
    progress: bool = False,
) -> SanityReport:
    """Run the four masking rules on purpose; see the module docstring.

    ``attack`` is the white-box attack of the eps sweep and the comparison (its loss family
    is also used for the steps sweep, FGSM standing for one step). ``black_box`` and
    ``transfer`` are attack names (``transfer`` needs a source, e.g.
    ``sgm:source=runs/source``); ``None`` skips that comparison.
    """
    from jeat.evaluate import evaluate, parse_attack

    spec = parse_attack(attack)
    if spec.kind not in ("pgd", "cw", "dlr") or spec.targeted:
        raise JeatError(f"the sanity checks need an untargeted PGD-family attack, not '{attack}'")
    if tolerance < 0:
        raise JeatError(f"sanity tolerance must be >= 0, got {tolerance}")
    tolerance = max(tolerance, 200.0 / max(1, len(x)))  # at least two points' worth

    def acc(names: list[str], th: ThreatModel = threat) -> list[float]:
        res = evaluate(
            model,
            x,
            y,
            names,
            th,
            batch_size,
            seed,
            mode="independent",
            context=context,
            progress=progress,
        )
        return [r.accuracy for r in res.rows[1:]]  # type: ignore[misc]

    checks: list[Check] = []
    factors = sorted(set(eps_factors) | {1.0})
    curve = robustness_curve(
        model,
        x,
        y,
        attack,
        threat,
        [f * threat.eps for f in factors],
        batch_size,
        seed,
        context,
        progress,
    )
    bumps = [
        (curve.eps[i], curve.eps[i + 1], curve.accuracy[i + 1] - curve.accuracy[i])
        for i in range(len(curve.eps) - 1)
        if curve.accuracy[i + 1] > curve.accuracy[i] + tolerance
    ]
    sweep = {f"eps {e:.4g}": a for e, a in zip(curve.eps, curve.accuracy, strict=True)}
    checks.append(
        Check(
            "accuracy falls as eps grows",
            not bumps,
            _fmt(sweep)
            + "".join(f"; rises by {d:.1f} from eps {a:.4g} to {b:.4g}" for a, b, d in bumps),
            sweep,
        )
    )

    names = ["fgsm" if s == 1 and spec.kind == "pgd" else f"{spec.kind}{s}" for s in steps]
    step_acc = dict(zip(names, acc(names), strict=True))
    vals = list(step_acc.values())
    rises = [
        (names[i], names[i + 1])
        for i in range(len(vals) - 1)
        if vals[i + 1] > min(vals[: i + 1]) + tolerance
    ]
    checks.append(
        Check(
            "more steps never help the defender",
            not rises,
            _fmt(step_acc) + "".join(f"; {b} above {a}" for a, b in rises),
            step_acc,
        )
    )

    white = curve.accuracy[curve.eps.index(threat.eps)]
    white = min([white, *step_acc.values()])
    for label, other in (("black-box", black_box), ("transfer", transfer)):
        if not other:
            checks.append(Check(f"white-box beats {label}", None, "not run"))
            continue
        (value,) = acc([other])
        checks.append(
            Check(
                f"white-box beats {label}",
                value >= white - tolerance,
                f"best white-box {white:.1f}%, {other} {value:.1f}%",
                {"white_box": white, label: value},
            )
        )

    big = threat.with_eps(1.0 if threat.norm == "linf" else math.sqrt(x[0].numel()))
    unbounded = f"{spec.kind}100:random_start=0:step_size={big.eps / 20:.6g}"
    (value,) = acc([unbounded], big)
    checks.append(
        Check(
            "an unbounded attack reaches ~0%",
            value <= unbounded_max,
            f"{spec.kind}-100 with eps {big.eps:.4g} ({big.norm}, the whole box) leaves "
            f"{value:.1f}% (should be <= {unbounded_max:g}%)",
            {"unbounded": value},
        )
    )
    return SanityReport(checks, curve, tolerance)


def write_curve(curve: Curve, out: str | Path, kind: str = "curve") -> list[Path]:
    """``curve-pgd20-linf.{csv,png}`` next to the table ``out`` (``eval.json``), or
    ``NAME-curve-...`` next to a table named ``NAME.json``; returns the two paths."""
    from jeat.utils import atomic_write

    out = Path(out)
    prefix = "" if out.name == "eval.json" else f"{out.stem}-"
    stem = out.parent / f"{prefix}{kind}-{curve.attack.split(':')[0]}-{curve.norm}"
    with atomic_write(stem.with_suffix(".csv"), "w") as fh:
        fh.write(curve.csv())
    png = curve.plot(stem.with_suffix(".png"))
    return [stem.with_suffix(".csv"), png]
