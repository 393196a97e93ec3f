"""Why did an attack fail? Indicators of attack failure, AutoAttack's own checks, and the
remedies that turn a failed evaluation into a sound one.

A robustness table only says how many points survived. :func:`diagnose` also records, for
every gradient attack of the table, each point's loss trace (:class:`jeat.attacks.trace.
LossTrace`) and reads it on the points that survived the whole table (the points whose
robustness the table claims):

* **silent-success** — an iterate fooled the model, yet the returned point does not: the
  model is randomised (its prediction changes between passes);
* **incomplete** — the loss was still rising at the last step (Pintor et al., NeurIPS 2022):
  on the loss curve with both axes scaled to [0, 1] and the loss made monotone (its running
  maximum), the segment after the break point (the iterate farthest above the chord) still
  climbs at more than 30 degrees (:func:`break_point_angle`);
* **unstable** — the loss goes the wrong way along the path: in total it falls back by more
  than its whole range (noisy gradients, a piecewise loss surface);
* **zero-gradients** — most steps had an exactly zero input gradient;
* **bad-init** — random restarts break points that the first start left standing (measured on
  the attack's own restarts, and by a probe: the strongest PGD row rerun with 3 restarts on up
  to ``probe`` surviving points);
* **transfer-failure** — an example crafted on a surrogate (a transfer source) fooled the
  surrogate but not the model.

And AutoAttack's own checks, through the reference implementation's ``checks`` module
(Croce & Hein 2020): **randomised** outputs (identical passes differ), **probabilities**
(outputs in [0, 1] that sum to 1), **zero-gradients-at-start** (zero input gradients at the
clean points), **square-beats-white-box** (the black-box Square attack breaks more than
0.2% of the table's points that every white-box attack left, and at least two: one point
flips with Square's random search) and **dynamic** (the forward pass itself
calls autograd).

Every indicator names its remedies (:data:`REMEDIES`); :func:`fix` runs the table again with
one attack that applies all of them (more steps, a default step size, restarts, EOT, the
unrolled chain of a purifier, BPDA, log outputs), then AutoAttack's ``rand`` version when the
model is randomised, or ``autoattack-fast`` when the table had no AutoAttack row. Remedies that
cannot change a model's evaluation are left out: EOT when AutoAttack's check finds the model
deterministic, ``unroll`` when it has no purifier.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from jeat.attacks import LogitsModel, ThreatModel, logits_of, model_mode
from jeat.attacks.trace import LossTrace
from jeat.energy import cross_entropy_from_logits
from jeat.errors import JeatError
from jeat.evaluate import (
    AttackSpec,
    EvalContext,
    EvalResult,
    build_attack,
    evaluate,
    model_device,
    parse_attacks,
)
from jeat.models import has_unrollable

if TYPE_CHECKING:
    from jeat.distributed import DistContext

__all__ = [
    "INDICATORS",
    "REMEDIES",
    "Indicator",
    "RowDiagnosis",
    "ModelCheck",
    "Diagnosis",
    "parse_names",
    "point_indicators",
    "break_point_angle",
    "model_checks",
    "diagnose",
    "remedy_attacks",
    "remedy_costs",
    "RemedyCost",
    "Probe",
    "smoothing_sigma",
    "fix",
]


@dataclass(frozen=True)
class Indicator:
    name: str
    scope: str  # "point": read from loss traces per point; "model": a check of the model
    description: str
    remedies: tuple[str, ...]


_LIST = [
    Indicator(
        "silent-success",
        "point",
        "an iterate fooled the model but the returned point does not (a randomised model)",
        ("eot",),
    ),
    Indicator(
        "incomplete",
        "point",
        "the loss was still rising at the last step",
        ("more-steps", "larger-step"),
    ),
    Indicator(
        "unstable",
        "point",
        "the loss goes the wrong way along the path (noisy gradients, piecewise loss)",
        ("eot", "unroll", "bpda"),
    ),
    Indicator(
        "zero-gradients",
        "point",
        "most steps had a zero input gradient before any success",
        ("unroll", "bpda"),
    ),
    Indicator(
        "bad-init",
        "point",
        "random restarts break points that the first start left standing",
        ("restarts",),
    ),
    Indicator(
        "transfer-failure",
        "point",
        "examples crafted on a surrogate fooled it but not the model",
        ("bpda",),
    ),
    Indicator(
        "randomised",
        "model",
        "outputs change between identical forward passes (AutoAttack's check)",
        ("eot", "aa-rand"),
    ),
    Indicator(
        "probabilities",
        "model",
        "the outputs are probabilities, not logits (AutoAttack's check)",
        ("log-outputs",),
    ),
    Indicator(
        "zero-gradients-at-start",
        "model",
        "zero input gradients at the clean points (AutoAttack's check)",
        ("unroll", "bpda"),
    ),
    Indicator(
        "square-beats-white-box",
        "model",
        "Square broke > 0.2% of the points every white-box attack left (AutoAttack's check)",
        ("unroll", "bpda", "eot", "square-full"),
    ),
    Indicator(
        "no-score",
        "model",
        "the outputs carry no usable score: identical under small input noise unless the "
        "predicted class changes (hard labels, votes, a saturated softmax)",
        ("decision", "substitute"),
    ),
    Indicator(
        "dynamic",
        "model",
        "the forward pass itself calls autograd: a dynamic defence (AutoAttack's check)",
        ("unroll", "bpda", "eot"),
    ),
]
INDICATORS: dict[str, Indicator] = {i.name: i for i in _LIST}

REMEDIES: dict[str, str] = {
    "more-steps": "5x the steps, at least 100",
    "larger-step": "a step size no smaller than the default (eps/4 for L-inf)",
    "restarts": "5 random restarts",
    "eot": "expectation over transformation: each step averages 20 passes (eot=20)",
    "unroll": "differentiate through every purifier's unrolled chain (unroll=1): its true "
    "gradient, where BPDA's identity is a poor surrogate",
    "bpda": "differentiate non-differentiable layers and preprocessing as identity/ReLU (BPDA)",
    "aa-rand": "AutoAttack's rand version (APGD-CE and APGD-DLR, EOT over 20 passes)",
    "log-outputs": "attack the logarithm of the outputs: logits up to a constant",
    "smooth": "gradient smoothing: the expected gradient under Gaussian input noise of a sigma "
    "read from the loss's scale (smooth=SIGMA, eot=20; a zeroth-order estimate where autograd "
    "gives none), for an opaque model whose masking step jeat cannot see",
    "square-full": "Square at AutoAttack's full budget (5,000 queries; L2 Square for L2) on the "
    "surviving points",
    "substitute": "a surrogate distilled from the model's own outputs on the training and test "
    "inputs (Papernot et al. 2017), attacked white-box, its examples transferred",
    "decision": "HopSkipJump (Chen et al. 2020), decision-based: reads only the predicted class "
    "(1,000 queries per point)",
    "learned-bpda": "BPDA through a learned differentiable approximation of the module named "
    "with --bpda-module",
}
# what replaces BPDA on an opaque model (no layer jeat's BPDA or unrolling can switch)
OPAQUE_REMEDIES = ("smooth", "square-full", "substitute")

# per-point thresholds (see the module notes)
INCOMPLETE_ANGLE = 30.0  # degrees
UNSTABLE_FALLBACK = 1.0
ZERO_GRAD_SHARE = 0.5
EOT_SAMPLES = 20
SQUARE_MARGIN = 0.2  # percent of the table (AutoAttack's alpha), and at least two points
SQUARE_QUERIES = 500  # the Square probe's budget, when the table has no Square row
SQUARE_FULL = 5000  # the black-box escalation: AutoAttack's full Square budget
SQUARE_FIRST = 12  # the Square probe's first stage (points); more only if it breaks two
NO_SCORE_SHARE = 50.0  # percent of points whose outputs ignore small noise: no-score


def parse_names(text: str | list[str] | None, known: dict[str, Any], what: str) -> list[str]:
    """A comma list of indicator or remedy names, checked against ``known``."""
    if text is None:
        return list(known)
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [str(t).strip() for t in items if str(t).strip()]
    for name in names:
        if name not in known:
            raise JeatError(f"unknown {what} '{name}'; choose from {', '.join(known)}")
    if not names:
        raise JeatError(f"give at least one {what} name")
    return names


@dataclass
class RowDiagnosis:
    """The indicators read from one traced row, over the points the row attacked that
    survived the whole table."""

    attack: str
    considered: int
    shares: dict[str, float]  # percent of the considered points
    raised: list[str]


@dataclass
class ModelCheck:
    name: str
    raised: bool
    detail: str


@dataclass
class Diagnosis:
    rows: list[RowDiagnosis]
    checks: list[ModelCheck]
    threshold: float  # percent of points above which a per-point indicator is raised
    points: dict[str, Tensor] = field(default_factory=dict, repr=False)  # name -> bool (n,)
    probe: dict[str, Any] = field(default_factory=dict)
    unrollable: bool = False  # the model has a purifier that ``unroll`` differentiates through
    # no module that jeat's BPDA or unrolling switches: BPDA would change nothing
    opaque: bool = False
    bpda_module: str | None = None  # the user's named module (--bpda-module)
    sigma: float | None = None  # the smoothing scale read from the loss (opaque models)

    def raised(self) -> list[str]:
        names = {n for r in self.rows for n in r.raised} | {c.name for c in self.checks if c.raised}
        return [n for n in INDICATORS if n in names]

    def deterministic(self) -> bool:
        """AutoAttack's randomised check ran and identical passes agreed."""
        return any(c.name == "randomised" and not c.raised for c in self.checks)

    def applicable(self, remedies: tuple[str, ...] | list[str]) -> list[str]:
        """``remedies`` less those that cannot change this model's evaluation: EOT for a
        deterministic model (averaging identical passes only multiplies the cost) and
        ``unroll`` for a model without a purifier."""
        skip = {"eot"} if self.deterministic() else set()
        if not self.unrollable:
            skip.add("unroll")
        out: list[str] = []
        for r in remedies:
            if r in skip:
                continue
            if r == "bpda":
                learned = ["learned-bpda"] if self.bpda_module else []
                expanded = [*learned, *OPAQUE_REMEDIES] if self.opaque else ["bpda", *learned]
            else:
                expanded = [r]
            out += [e for e in expanded if e not in out]
        return out

    def remedies(self) -> list[str]:
        """The applicable remedies of the raised indicators, in the order of the indicators."""
        out: list[str] = []
        for name in self.raised():
            for r in self.applicable(INDICATORS[name].remedies):
                if r not in out:
                    out.append(r)
        return out

    def notes(self, n: int) -> list[str]:
        """Per point, ``indicator;...`` of what it raised (empty when none)."""
        out = [[] for _ in range(n)]
        for name, flags in self.points.items():
            for i in flags.nonzero().squeeze(1).tolist():
                out[i].append(name)
        return [";".join(v) for v in out]

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "rows": [
                {
                    "attack": r.attack,
                    "considered": r.considered,
                    "shares": r.shares,
                    "raised": r.raised,
                }
                for r in self.rows
            ],  # fmt: skip
            "checks": [
                {"name": c.name, "raised": c.raised, "detail": c.detail} for c in self.checks
            ],
            "raised": self.raised(),
            "remedies": self.remedies(),
            "probe": self.probe,
            "unrollable": self.unrollable,
            "opaque": self.opaque,
            "bpda_module": self.bpda_module,
            "sigma": self.sigma,
        }

    def _lines(self) -> list[tuple[str, str, str, str]]:
        lines = []
        for r in self.rows:
            for name, share in r.shares.items():
                up = name in r.raised
                remedy = ", ".join(self.applicable(INDICATORS[name].remedies)) if up else ""
                where = f"{share:.1f}% of {r.considered}"
                lines.append((f"{r.attack}: {name}", where, "RAISED" if up else "ok", remedy))
        for c in self.checks:
            remedy = ", ".join(self.applicable(INDICATORS[c.name].remedies)) if c.raised else ""
            lines.append((c.name, c.detail, "RAISED" if c.raised else "ok", remedy))
        return lines

    def table(self) -> str:
        head = ("indicator", "points / detail", "", "remedy")
        body = self._lines()
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(4)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [f"diagnosis (per-point indicators over the points that survived the table; "
               f"raised above {self.threshold:g}%)"]  # fmt: skip
        out += [fmt.format(*head).rstrip(), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*row).rstrip() for row in body]
        raised = self.raised()
        if raised:
            out.append(f"raised: {', '.join(raised)}")
            out.append("remedies: " + "; ".join(f"{r} ({REMEDIES[r]})" for r in self.remedies()))
        else:
            out.append("raised: none")
        return "\n".join(out)

    def markdown(self) -> str:
        lines = ["| indicator | points / detail | | remedy |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in self._lines()]
        raised = self.raised()
        lines += ["", f"Raised: {', '.join(raised) if raised else 'none'}."]
        if raised:
            lines.append(
                "Remedies: " + "; ".join(f"`{r}` ({REMEDIES[r]})" for r in self.remedies())
            )
        return "\n".join(lines) + "\n"


# -- per-point indicators ------------------------------------------------------------------
def break_point_angle(curve: Tensor) -> float:
    """The break-point angle of one loss curve (an ascended loss), in degrees: scale the
    iterate axis and the curve's running maximum to [0, 1], take the break point (the iterate
    farthest above the chord from the first to the last iterate), and return the angle of
    the segment from the break point to the last iterate. 0: the loss stopped rising;
    45: it still rises as fast as on average over the run. ``nan`` iterates are skipped."""
    c = curve[~torch.isnan(curve)]
    if len(c) < 3:
        return math.nan
    lo, hi = float(c.min()), float(c.max())
    if hi <= lo:
        return 0.0
    c = ((c - lo) / (hi - lo)).cummax(0).values
    t = torch.linspace(0.0, 1.0, len(c))
    chord = c[0] + (c[-1] - c[0]) * t
    k = min(int((c - chord).argmax()), len(c) - 2)
    slope = float(c[-1] - c[k]) / float(1.0 - t[k])
    return math.degrees(math.atan(slope))


def _incomplete(curves: Tensor) -> Tensor:
    """The loss was still rising at the end: a break-point angle above
    ``INCOMPLETE_ANGLE`` (curves of fewer than 3 iterates, FGSM's, are not judged)."""
    angles = torch.tensor([break_point_angle(c) for c in curves])
    return angles > INCOMPLETE_ANGLE


def _unstable(curves: Tensor) -> Tensor:
    """The loss falls back, in total, by more than ``UNSTABLE_FALLBACK`` times its range."""
    out = torch.zeros(len(curves), dtype=torch.bool)
    for i in range(len(curves)):
        row = curves[i][~torch.isnan(curves[i])]
        if len(row) < 3:
            continue
        span = float(row.max() - row.min())
        if span <= 0:
            continue
        fallback = float((row[:-1] - row[1:]).clamp_min(0).sum())
        out[i] = fallback > UNSTABLE_FALLBACK * span
    return out


def point_indicators(
    trace: LossTrace, considered: Tensor, category: str, restarts: int, targeted: bool
) -> dict[str, Tensor]:
    """Per-point indicators of one traced row (bool tensors over all points, True only on
    ``considered`` points)."""
    fooled_any = (trace.first_fooled >= 0).any(1)
    grad = trace.grad
    recorded = ~torch.isnan(grad)
    zero = (grad == 0) & recorded
    zero_share = zero.sum((1, 2)) / recorded.sum((1, 2)).clamp_min(1)
    curves = trace.best_curves()
    out = {
        "silent-success": fooled_any if category != "transfer" else torch.zeros_like(fooled_any),
        "transfer-failure": fooled_any if category == "transfer" else torch.zeros_like(fooled_any),
        "zero-gradients": (zero_share >= ZERO_GRAD_SHARE) & (recorded.sum((1, 2)) > 0),
        "incomplete": _incomplete(curves) if trace.steps >= 2 else torch.zeros_like(fooled_any),
        "unstable": _unstable(curves) if trace.steps >= 2 else torch.zeros_like(fooled_any),
    }
    if category == "transfer":  # a surrogate's trace says nothing about the model's loss
        for name in ("zero-gradients", "incomplete", "unstable"):
            out[name] = torch.zeros_like(fooled_any)
    return {k: v & considered for k, v in out.items()}


# -- AutoAttack's checks -------------------------------------------------------------------
class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _reference_checks():
    try:
        from pyautoattack import checks
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise JeatError("the AutoAttack checks need the 'pyautoattack' package") from exc
    return checks


def _flagged(fn, *args) -> str | None:
    """Run one reference check; its warning (None: it passed)."""
    handler = _Messages()
    logger = logging.Logger("jeat-aa-check")
    logger.addHandler(handler)
    fn(*args, logger=logger)
    return handler.messages[0] if handler.messages else None


def model_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    result: EvalResult,
    threat: ThreatModel,
    threshold: float,
    square_probe: int = 256,
    seed: int = 0,
    batch_size: int = 256,
    probes: list[Probe] | None = None,
    square: bool = True,
) -> list[ModelCheck]:
    """AutoAttack's checks of the model (reference ``pyautoattack.checks``) on up to 250
    clean points, and its Square check on the table (or, when the table has no Square row,
    on a Square probe of ``SQUARE_QUERIES`` queries on up to ``square_probe`` surviving
    points; its points go to ``probes``); then jeat's ``no-score`` check."""
    checks = _reference_checks()
    device = model_device(model)
    xs, ys = x[:250].to(device), y[:250].to(device)
    out: list[ModelCheck] = []
    with model_mode(model, True):
        fn = LogitsModel(model)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            msg = _flagged(checks.check_randomized, fn, xs, ys)
        out.append(ModelCheck("randomised", msg is not None, msg or "5 passes agree"))
        msg = _flagged(checks.check_range_output, fn, xs)
        out.append(
            ModelCheck("probabilities", msg is not None, msg or "outputs are not a distribution")
        )
        xg = xs.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = cross_entropy_from_logits(logits_of(model, xg), ys, check=False)
            grad = None
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss.sum(), xg, allow_unused=True)
        grad = torch.zeros_like(xs) if grad is None else grad.detach()
        zero = int((grad.flatten(1).abs().sum(1) == 0).sum())
        share = 100.0 * zero / max(1, len(xs))
        msg = _flagged(checks.check_zero_gradients, grad)
        out.append(
            ModelCheck(
                "zero-gradients-at-start",
                share > threshold,
                f"{zero} of {len(xs)} clean points have a zero gradient"
                + (" (the reference flags any)" if msg and share <= threshold else ""),
            )
        )
        for k in checks.funcs:  # the reference's call counters are global: start from zero
            checks.funcs[k] = 0
        msg = _flagged(checks.check_dynamic, model, xs[:8], False)
        out.append(ModelCheck("dynamic", msg is not None, msg or "no autograd call in forward"))
        out.append(_no_score(model, xs, ys, threat, seed))
    if square:
        check = _square_check(model, x, y, result, threat, square_probe, seed, batch_size, probes)
        out.append(check)
    return out


@dataclass
class Probe:
    """Points a probe of the diagnosis attacked and broke (bool masks over the table's
    points): they count as broken in the table (:meth:`jeat.tables.EvalResult.add_found`)."""

    attack: str
    category: str
    attacked: Tensor
    broken: Tensor
    seconds: float


def _no_score(
    model: nn.Module, xs: Tensor, ys: Tensor, threat: ThreatModel, seed: int
) -> ModelCheck:
    """Whether the outputs carry a score: on two random points of the ball of radius eps/4
    around each clean point, are the outputs identical wherever the predicted class stays?
    Raised when more than ``NO_SCORE_SHARE`` percent of the points answer so (hard labels,
    votes, a softmax saturated to one-hot): score-based attacks then see a flat loss."""
    gen = torch.Generator(device=xs.device).manual_seed(seed + 17)
    small = threat.with_eps(threat.eps / 4)
    with torch.no_grad():
        base = logits_of(model, xs).float()
        flat = torch.ones(len(xs), dtype=torch.bool, device=xs.device)
        for _ in range(2):
            out = logits_of(model, small.random_init(xs, gen)).float()
            same_class = out.argmax(1) == base.argmax(1)
            flat &= ~same_class | (out == base).all(1)
    share = 100.0 * float(flat.float().mean()) if len(xs) else 0.0
    return ModelCheck(
        "no-score",
        share > NO_SCORE_SHARE,
        f"{share:.0f}% of {len(xs)} clean points keep identical outputs under noise of eps/4",
    )


def smoothing_sigma(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, seed: int = 0
) -> float:
    """The noise scale of gradient smoothing, read from the loss curve's scale: along 4
    random directions per point (signs for L-inf, unit Gaussians for L2), the cross-entropy's
    median change at radii eps/16 ... eps; sigma is the smallest radius whose change reaches a
    quarter of the change at eps (the distance over which the loss moves, flat shattered
    steps included), kept in [eps/8, eps/2], per pixel (an L2 radius divided by sqrt(d))."""
    eps = threat.eps
    if eps <= 0 or len(x) == 0:
        return 0.0
    gen = torch.Generator(device=x.device).manual_seed(seed + 29)
    radii = [eps * f for f in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)]
    xr, yr = x.repeat(4, 1, 1, 1), y.repeat(4)
    if threat.norm == "linf":
        u = torch.randint(0, 2, xr.shape, generator=gen, device=x.device).to(x.dtype) * 2 - 1
    else:
        u = torch.randn(xr.shape, generator=gen, device=x.device, dtype=x.dtype)
        u = u / u.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    with torch.no_grad():
        base = cross_entropy_from_logits(logits_of(model, xr).float(), yr, check=False)
        change = []
        for r in radii:
            moved = logits_of(model, (xr + r * u).clamp(0.0, 1.0)).float()
            loss = cross_entropy_from_logits(moved, yr, check=False)
            change.append(float((loss - base).abs().median()))
    target = 0.25 * change[-1]
    radius = next((r for r, c in zip(radii, change, strict=True) if c >= target and c > 0), eps)
    radius = min(max(radius, eps / 8), eps / 2)
    if threat.norm == "l2":
        radius /= math.sqrt(x[0].numel())
    return float(radius)


def _square_check(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    result: EvalResult,
    threat: ThreatModel,
    probe: int,
    seed: int,
    batch_size: int,
    probes: list[Probe] | None = None,
) -> ModelCheck:
    n = max(1, result.n)
    rows = [r for r in result.rows if r.category == "black-box" and "square" in r.attack]
    white = [r for r in result.rows if r.category == "white-box"]
    if rows and white and result.mode == "cascade":
        broken = sum(r.broken for r in rows)
        pct = 100.0 * broken / n
        return ModelCheck(
            "square-beats-white-box",
            pct > SQUARE_MARGIN and broken >= 2,
            f"the table's Square broke {broken} points ({pct:.2f}%) the white-box attacks left",
        )
    if result.robust is None or not white:
        return ModelCheck("square-beats-white-box", False, "no white-box row to compare with")
    probe_attack = f"square:n_queries={SQUARE_QUERIES}"
    t0 = time.perf_counter()
    # two stages: SQUARE_FIRST survivors, and the rest (up to ``probe``) only when Square
    # broke at least two of them; an honest model pays for the first stage alone
    first = min(SQUARE_FIRST, probe)
    idx, hit = _probe(model, x, y, result.robust, probe_attack, threat, first, seed, batch_size)
    if int(hit.sum()) >= 2 and probe > first:
        rest = result.robust.clone()
        rest[idx] = False
        idx2, hit2 = _probe(
            model, x, y, rest, probe_attack, threat, probe - first, seed + 3, batch_size
        )
        idx, hit = torch.cat([idx, idx2]), torch.cat([hit, hit2])
    if len(idx) == 0:
        return ModelCheck("square-beats-white-box", False, "no point survived the table")
    if probes is not None:
        probes.append(_as_probe(f"{probe_attack} (probe)", "black-box", idx, hit, result.n, t0))
    broken = int(hit.sum())
    pct = 100.0 * broken / n
    return ModelCheck(
        "square-beats-white-box",
        pct > SQUARE_MARGIN and broken >= 2,
        f"a Square probe ({SQUARE_QUERIES} queries) broke {broken} of the {len(idx)} "
        f"surviving points ({pct:.2f}% of the table)",
    )


# -- the diagnosis -------------------------------------------------------------------------
def _strongest_pgd(result: EvalResult) -> str | None:
    """The traced white-box PGD row with the most passes per point (untargeted preferred)."""
    best, cost = None, -1.0
    for name, spec in result.specs.items():
        if name not in result.traces or spec.kind not in ("pgd", "cw", "dlr"):
            continue
        passes = float(spec.steps or 1) * float(spec.options.get("restarts") or 1)
        passes -= 0.5 if spec.targeted else 0.0
        if passes > cost:
            best, cost = name, passes
    return best


def _bad_init_probe(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    result: EvalResult,
    threat: ThreatModel,
    probe: int,
    seed: int,
    batch_size: int,
    probes: list[Probe] | None = None,
) -> tuple[str | None, Tensor, int]:
    """Rerun the strongest PGD row with 3 restarts on up to ``probe`` surviving points: which
    of them break (bool over all points) and how many were probed."""
    n = result.n
    broken = torch.zeros(n, dtype=torch.bool)
    name = _strongest_pgd(result)
    if name is None or result.robust is None or probe <= 0:
        return None, broken, 0
    spec = result.specs[name]
    if not spec.options.get("random_start", True):
        return None, broken, 0
    head, *opts = spec.label.split(":")
    opts = [o for o in opts if o.partition("=")[0].strip() != "restarts"]
    label = ":".join([head, *opts, "restarts=3"])
    t0 = time.perf_counter()
    idx, hit = _probe(model, x, y, result.robust, label, threat, probe, seed + 1, batch_size)
    broken[idx] = hit
    if probes is not None and len(idx):
        probes.append(_as_probe(f"{label} (probe)", "white-box", idx, hit, n, t0))
    return name, broken, len(idx)


def _as_probe(name: str, category: str, idx: Tensor, hit: Tensor, n: int, started: float) -> Probe:
    attacked = torch.zeros(n, dtype=torch.bool)
    broken = torch.zeros(n, dtype=torch.bool)
    attacked[idx] = True
    broken[idx[hit]] = True
    return Probe(name, category, attacked, broken, time.perf_counter() - started)


def _probe(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    robust: Tensor,
    attack: str,
    threat: ThreatModel,
    probe: int,
    seed: int,
    batch_size: int,
) -> tuple[Tensor, Tensor]:
    """Run ``attack`` alone on up to ``probe`` of the points that survived the table; their
    indices and which of them it broke."""
    idx = robust.nonzero().squeeze(1)[:probe]
    if len(idx) == 0:
        return idx, torch.zeros(0, dtype=torch.bool)
    res = evaluate(
        model, x[idx], y[idx], [attack], threat, batch_size=batch_size, seed=seed,
        mode="cascade", order="given",
    )  # fmt: skip
    return idx, res.outcomes[res.rows[-1].attack] == 0


def diagnose(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: str | list[str],
    threat: ThreatModel,
    *,
    indicators: str | list[str] | None = None,
    threshold: float = 20.0,
    probe: int = 64,
    batch_size: int = 256,
    seed: int = 0,
    mode: str = "cascade",
    num_classes: int | None = None,
    context: EvalContext | None = None,
    progress: bool = False,
    sanity_tolerance: float = 3.0,
    shards: DistContext | None = None,
    order: str = "cost",
    result: EvalResult | None = None,
    bpda_module: str | None = None,
) -> tuple[EvalResult, Diagnosis]:
    """Evaluate with loss traces, then read the indicators of attack failure and run
    AutoAttack's checks. ``indicators`` limits what is computed (default: all); a per-point
    indicator is raised when more than ``threshold`` percent of the points it is read on
    show it. ``probe`` caps the surviving points of the bad-initialisation and Square probes.
    ``bpda_module`` names a module of the model for the remedy ``learned-bpda``.

    Returns the table and the :class:`Diagnosis`. Every point a probe broke counts as broken
    in the table: each probe is a row of it (``... (probe)``), so its worst case is never
    above what a probe showed; ``point_notes`` holds each point's indicators."""
    wanted = parse_names(indicators, INDICATORS, "indicator")
    if not math.isfinite(threshold) or not 0 <= threshold <= 100:
        raise JeatError(f"the indicator threshold is a percentage in [0, 100], got {threshold}")
    if result is None:
        result = evaluate(
            model, x, y, attacks, threat, batch_size=batch_size, seed=seed, mode=mode,
            num_classes=num_classes, context=context, progress=progress,
            sanity_tolerance=sanity_tolerance, shards=shards, order=order, trace=True,
        )  # fmt: skip
    n = result.n
    robust = result.robust if result.robust is not None else torch.zeros(n, dtype=torch.bool)
    rows: list[RowDiagnosis] = []
    points: dict[str, Tensor] = {}
    categories = {r.attack: r.category for r in result.rows}
    for name, trace in result.traces.items():
        spec = result.specs.get(name)
        considered = robust & (result.outcomes[name] >= 0)
        flags = point_indicators(
            trace,
            considered,
            categories.get(name, "white-box"),
            int((spec.options.get("restarts") if spec else None) or 1),
            bool(spec and spec.targeted),
        )
        # bad initialisation from the row's own restarts: broken only after the first run
        if spec is not None and int(spec.options.get("restarts") or 1) > 1 and not spec.targeted:
            first = trace.first_fooled
            late = (first[:, 0] < 0) & (first[:, 1:] >= 0).any(1) & (result.outcomes[name] >= 0)
            flags["bad-init"] = late
        shares: dict[str, float] = {}
        raised: list[str] = []
        for ind, f in flags.items():
            if ind not in wanted:
                continue
            denom = (
                int((result.outcomes[name] >= 0).sum())
                if ind == "bad-init"
                else int(considered.sum())
            )
            share = 100.0 * int(f.sum()) / max(1, denom)
            shares[ind] = share
            if share > threshold:
                raised.append(ind)
            points[ind] = points.get(ind, torch.zeros(n, dtype=torch.bool)) | f
        rows.append(RowDiagnosis(name, int(considered.sum()), shares, raised))
    probe_info: dict[str, Any] = {}
    probes: list[Probe] = []
    if "bad-init" in wanted:
        pname, broken, probed = _bad_init_probe(
            model, x, y, result, threat, probe, seed, batch_size, probes
        )
        if pname is not None and probed:
            share = 100.0 * int(broken.sum()) / probed
            probe_info = {"attack": pname, "probed": probed, "broken": int(broken.sum())}
            row = RowDiagnosis(
                f"{pname} + 3 restarts (probe)", probed, {"bad-init": share},
                ["bad-init"] if share > threshold else [],
            )  # fmt: skip
            rows.append(row)
            points["bad-init"] = points.get("bad-init", torch.zeros(n, dtype=torch.bool)) | broken
    model_level = [i for i in wanted if INDICATORS[i].scope == "model"]
    checks: list[ModelCheck] = []
    if model_level:
        checks = [
            c
            for c in model_checks(
                model,
                x,
                y,
                result,
                threat,
                threshold,
                square_probe=2 * probe,
                seed=seed,
                batch_size=batch_size,
                probes=probes,
                square="square-beats-white-box" in model_level,
            )  # fmt: skip
            if c.name in model_level
        ]
    opaque = not any(
        getattr(m, "bpda_capable", False) or getattr(m, "unrollable", False)
        for m in model.modules()
    )
    diagnosis = Diagnosis(
        rows, checks, float(threshold), points, probe_info, unrollable=has_unrollable(model),
        opaque=opaque, bpda_module=bpda_module,
    )  # fmt: skip
    for pr in probes:  # what a probe broke is broken: the table's worst case includes it
        describe = threat.describe()
        result.add_found(pr.attack, pr.category, describe, pr.attacked, pr.broken, pr.seconds)
    if opaque and "smooth" in diagnosis.remedies():
        survivors = result.robust.nonzero().squeeze(1)[:probe] if result.robust is not None else []
        device = model_device(model)
        if len(survivors):
            with model_mode(model, True):
                diagnosis.sigma = smoothing_sigma(
                    model, x[survivors].to(device), y[survivors].to(device), threat, seed
                )
    result.point_notes = diagnosis.notes(n)
    return result, diagnosis


# -- remedies ------------------------------------------------------------------------------
def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def remedy_attacks(
    result: EvalResult,
    remedies: list[str],
    threat: ThreatModel,
    diagnosis: Diagnosis | None = None,
) -> list[str]:
    """The attacks that apply ``remedies``, cheapest first: the table's strongest traced PGD
    row (else ``pgd20``) with every gradient remedy applied (more steps, a default step,
    restarts, EOT, unrolling, BPDA, log outputs, gradient smoothing); the same PGD through the
    learned approximation of the named module (``learned-bpda``); the distilled substitute;
    AutoAttack's rand version for ``aa-rand``, or else ``autoattack-fast`` when the table has
    no AutoAttack row (a fixed table always ends with the strongest attack we have); Square at
    its full budget; HopSkipJump (``decision``)."""
    base = _strongest_pgd(result)
    spec: AttackSpec = result.specs[base] if base is not None else parse_attacks("pgd20")[0]
    steps = spec.steps or 20
    options = {k: v for k, v in spec.options.items() if k != "active"}
    if "more-steps" in remedies:
        steps = max(5 * steps, 100)
    if "larger-step" in remedies:
        step = options.get("step_size")
        if step is not None and float(step) < threat.default_step_size:
            options.pop("step_size")
    if "restarts" in remedies:
        options["restarts"] = max(int(options.get("restarts") or 1), 5)
    if "eot" in remedies:
        options["eot"] = max(int(options.get("eot") or 1), EOT_SAMPLES)
    if "unroll" in remedies:
        options["unroll"] = 1
    if "bpda" in remedies:
        options["bpda"] = 1
    if "log-outputs" in remedies:
        options["log_outputs"] = 1
    learned = dict(options)
    sigma = diagnosis.sigma if diagnosis is not None else None
    if "smooth" in remedies:
        options["smooth"] = sigma if sigma else threat.eps / 4
        options["eot"] = max(int(options.get("eot") or 1), EOT_SAMPLES)
        steps = max(steps, 50)
    head = f"{spec.kind}{steps}{'-t' if spec.targeted else ''}"
    out = [":".join([head, *(f"{k}={_option_text(v)}" for k, v in options.items())])]
    if "learned-bpda" in remedies and diagnosis is not None and diagnosis.bpda_module:
        learned.pop("bpda", None)
        learned["bpda_module"] = diagnosis.bpda_module
        head = f"{spec.kind}{max(steps, 50)}{'-t' if spec.targeted else ''}"
        out.append(":".join([head, *(f"{k}={_option_text(v)}" for k, v in learned.items())]))
    if "substitute" in remedies:
        out.append("substitute")
    if "aa-rand" in remedies:
        out.append("autoattack:version=rand")
    elif not any(s.kind in ("autoattack", "autoattack-fast") for s in result.specs.values()):
        out.append("autoattack-fast")  # the fix always ends with the strongest attack we have
    if "square-full" in remedies:
        out.append(f"square:n_queries={SQUARE_FULL}")
    if "decision" in remedies:
        out.append("hopskipjump")
    return out


@dataclass
class RemedyCost:
    """What one remedy attack cost: its rows' seconds (a surrogate's or an approximation's
    fitting included) and the points it attacked and broke."""

    attack: str
    seconds: float
    attacked: int
    broken: int


def fix(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: str | list[str],
    threat: ThreatModel,
    diagnosis: Diagnosis,
    result: EvalResult,
    *,
    remedies: str | list[str] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    mode: str = "cascade",
    num_classes: int | None = None,
    context: EvalContext | None = None,
    progress: bool = False,
    sanity_tolerance: float = 3.0,
    shards: DistContext | None = None,
    inputs: Tensor | None = None,
) -> tuple[EvalResult, list[str]]:
    """Extend the diagnosed table (``result``, probe rows included) with the attacks that
    apply the remedies of the raised indicators (or ``remedies``), each a row run on the
    points every earlier row left, with its own time; returns the new table and the attacks
    added (none when nothing was raised). ``inputs``: unlabelled images (the training
    inputs) that surrogates are fitted on besides the table's points. The per-remedy costs
    are in ``fixed.remedy_costs`` (:func:`remedy_costs`). ``attacks`` and ``mode`` are the
    table's, kept for callers; the remedies always run in cascade after it."""
    del attacks, mode
    chosen = diagnosis.remedies()
    if remedies is not None:
        chosen = parse_names(remedies, REMEDIES, "remedy")
    if not chosen:
        return result, []
    extra = remedy_attacks(result, chosen, threat, diagnosis)
    ctx = context or EvalContext()
    pool = x if inputs is None else torch.cat([inputs.to(x.dtype), x])
    ctx.inputs = pool
    for label in extra:  # fail on a bad combination before running anything
        build_attack(parse_attacks(label)[0], threat, ctx)
    fixed = evaluate(
        model, x, y, extra, threat, batch_size=batch_size, seed=seed,
        num_classes=num_classes, context=ctx, progress=progress,
        sanity_tolerance=sanity_tolerance, shards=shards, trace=True, prior=result,
    )  # fmt: skip
    return fixed, extra


def remedy_costs(fixed: EvalResult, extra: list[str]) -> list[RemedyCost]:
    """Per remedy attack of a fixed table: its seconds (all its rows) and the points it
    attacked and broke."""
    out = []
    for label in extra:
        rows = [r for r in fixed.rows if r.group == label]
        out.append(
            RemedyCost(
                label,
                sum(r.seconds for r in rows),
                rows[0].attacked if rows else 0,
                sum(r.broken for r in rows),
            )
        )
    return out
