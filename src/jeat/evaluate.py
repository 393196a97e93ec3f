"""Robustness evaluation: accuracy under a list of attacks on the same test points.

Attacks are named in a small language shared by the API and the CLI::

    clean, fgsm, pgd20, pgd100, cw (= cw30), dlr100, pgd20-t (targeted, 9 targets),
    square, autoattack, autoattack-fast, transfer, sgm, roa

with options after colons: ``pgd20:restarts=5``, ``autoattack:norm=l2:eps=0.5``,
``sgm:source=runs/src:gamma=0.2``, ``roa:size=3:search=exhaustive``. Every attack takes
``eps`` and ``norm`` to override the table's threat model; :func:`list_attacks` lists the rest.

Two ways to fill the table, on the same points:

* ``cascade`` (the default of ``jeat eval``): the worst-case pass of AutoAttack. Each attack
  only attacks the points that are still robust after the previous ones, so the whole table
  costs little more than its strongest attack. A row reports how many points it attacked, how
  many of those it broke, and the robust accuracy after it. An attack's own accuracy is known
  only when it attacked every clean-correct point (the first attack after ``clean``).
* ``independent``: every attack runs on every clean-correct point; each row has its own
  accuracy, and the worst case is the share of points that survive them all.

Accuracy under attack follows RobustBench: a point counts as robust only if it is classified
correctly when clean *and* after the attack. Composite attacks (AutoAttack) appear as one row
per component. Every attack's output is checked against its threat model (distance and [0, 1]
box), so a broken attack cannot report robustness it did not measure.
"""

from __future__ import annotations

import csv
import io
import math
import re
import sys
import time
import types
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from jeat.attacks import (
    BPDA,
    FGSM,
    PGD,
    MultiTargeted,
    ThreatModel,
    Unroll,
    check_images,
    logits_of,
    make_threat,
    model_mode,
    model_width,
)
from jeat.attacks.threats import check_budget, check_step_size
from jeat.energy import check_labels
from jeat.errors import JeatError

if TYPE_CHECKING:
    from jeat.attacks.trace import LossTrace
    from jeat.distributed import DistContext

__all__ = [
    "evaluate_model",
    "model_device",
    "AttackSpec",
    "BuiltAttack",
    "EvalContext",
    "AttackResult",
    "EvalResult",
    "parse_attacks",
    "parse_attack",
    "build_attack",
    "list_attacks",
    "evaluate",
    "attack_cost",
    "cascade_order",
    "accuracy",
    "CATEGORIES",
    "table_warnings",
    "MASKING",
]

# The components of ``autoattack-fast``: AutoAttack standard without FAB-T and Square.
AUTOATTACK_FAST = ("apgd-ce", "apgd-t")

# What kind of evidence each attack gives; the sanity rules compare categories.
CATEGORIES = ("clean", "white-box", "black-box", "transfer", "occlusion")


@dataclass
class AttackSpec:
    """A parsed attack name: ``label`` as written, its ``kind``, step count and options."""

    label: str
    kind: str
    steps: int | None = None
    targeted: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuiltAttack:
    """An attack ready to run: one or more stages (AutoAttack has four), each with a category."""

    spec: AttackSpec
    threat: ThreatModel | None
    stages: list[tuple[str, Callable[..., Tensor], str]]
    warnings: list[str] = field(default_factory=list)
    steps: int | None = None  # gradient steps (white-box PGD family), for the sanity rules
    loss: str | None = None  # attack family for the steps rule: ce, cw, dlr, ce-targeted, ...


@dataclass
class EvalContext:
    """What some attacks need beyond the threat model: a seed, and a loader for source models
    of transfer attacks (``source=PATH``; default: :func:`jeat.runs.load_trained`)."""

    seed: int = 0
    device: torch.device | str = "cpu"
    num_classes: int | None = None
    image_shape: tuple[int, ...] | None = None
    load_model: Callable[[str], nn.Module] | None = None
    sources: dict[str, nn.Module] = field(default_factory=dict)

    def source(self, path: str) -> nn.Module:
        if path not in self.sources:
            if self.load_model is None:
                from jeat.runs import load_trained

                model = load_trained(path, device="cpu")[0]
            else:
                model = self.load_model(path)
            self.sources[path] = model.to(self.device).eval()
        return self.sources[path]


_NAME = re.compile(
    r"^(clean|fgsm|pgd|cw|dlr|square|autoattack-fast|autoattack|transfer|sgm|roa)(\d*)(-t)?$"
)
_STEPPED = {"pgd": 20, "cw": 30, "dlr": 100}
_COMMON = {"eps": None, "norm": None}
_OPTIONS: dict[str, dict[str, Any]] = {
    "clean": {},
    # bpda=1: differentiate k-WTA layers as ReLUs and non-differentiable defences as the
    # identity (BPDA: the adaptive attack on masked gradients)
    # eot=K: average K forward-backward passes per step (randomised models);
    # log_outputs=1: attack the log of the outputs (a model that returns probabilities);
    # unroll=1: differentiate through every purifier's unrolled chain (its true gradient)
    "fgsm": {"loss": "ce", "bpda": 0, "unroll": 0, "eot": 1, "log_outputs": 0},
    # active=0: every step and restart on the whole batch (default 1: drop fooled points)
    "pgd": {
        "step_size": None,
        "restarts": 1,
        "random_start": True,
        "targets": 9,
        "bpda": 0,
        "unroll": 0,
        "active": 1,
        "eot": 1,
        "log_outputs": 0,
    },
    "square": {"n_queries": 5000, "p_init": 0.8, "restarts": 1},
    "autoattack": {"version": "standard", "n_queries": None, "components": None},
    "autoattack-fast": {},
    # the SGM paper's attack: 10 sign steps of eps/8 from the clean image, on the source
    "transfer": {"source": None, "gamma": 1.0, "steps": 10, "step_size": None, "random_start": 0},
    "roa": {
        "size": None,
        "height": None,
        "width": None,
        "search": "auto",
        "stride": 1,
        "candidates": 30,
        "steps": 20,
        "step_size": None,
    },
}
_OPTIONS["cw"] = _OPTIONS["dlr"] = _OPTIONS["pgd"]
_OPTIONS["sgm"] = {**_OPTIONS["transfer"], "gamma": 0.5}

_DESCRIPTIONS = {
    "clean": "no attack (clean accuracy)",
    "fgsm": "fast gradient sign method, one step of size eps",
    "pgdN": "N-step PGD on the cross-entropy E(x,y)-E(x), step eps/4, random start (N=20); "
    "eot=K averages K passes per step (randomised models)",
    "cwN": "N-step PGD on the Carlini-Wagner margin (N=30)",
    "dlrN": "N-step PGD on the difference-of-logits-ratio loss (N=100)",
    "pgdN-t / cwN-t / dlrN-t": "targeted versions, run toward the `targets` likeliest classes",
    "square": "Square Attack, score-based black-box (reference implementation)",
    "autoattack": "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) via pyautoattack",
    "autoattack-fast": "AutoAttack standard's APGD-CE then APGD-T (no FAB-T, no Square)",
    "transfer": "PGD crafted on a source model (source=RUN), evaluated on this one",
    "sgm": "transfer with the Skip Gradient Method (residual gradients x gamma) on a ResNet source",
    "roa": "rectangular occlusion attack: position search then PGD inside the rectangle",
}


def list_attacks() -> dict[str, tuple[str, dict[str, Any]]]:
    """Attack name -> (description, options with defaults)."""
    kinds = {
        "pgdN": "pgd",
        "cwN": "cw",
        "dlrN": "dlr",
        "pgdN-t / cwN-t / dlrN-t": "pgd",
    }
    out = {}
    for name, desc in _DESCRIPTIONS.items():
        kind = kinds.get(name, name)
        options = {**_COMMON, **_OPTIONS[kind]}
        if kind in _STEPPED and not name.endswith("-t"):
            options.pop("targets")
        out[name] = (desc, options)
    return out


def parse_attack(text: str) -> AttackSpec:
    """Parse one attack, e.g. ``pgd20``, ``cw``, ``pgd20-t:targets=3``, ``roa:size=3``."""
    from jeat.config import parse_value

    if not isinstance(text, str) or not text.strip():
        raise JeatError("empty attack name; use e.g. clean,fgsm,pgd20")
    head, *opts = text.strip().split(":")
    m = _NAME.match(head.strip().lower())
    if not m:
        raise JeatError(
            f"unknown attack '{head}'; known: clean, fgsm, pgdN, cwN, dlrN (add -t for "
            "targeted), square, autoattack, autoattack-fast, transfer, sgm, roa"
        )
    kind, digits, targeted = m.group(1), m.group(2), bool(m.group(3))
    if (digits or targeted) and kind not in _STEPPED:
        raise JeatError(f"attack '{head}' takes no step count or -t suffix")
    steps = None
    if kind in _STEPPED:
        steps = int(digits) if digits else _STEPPED[kind]
        if steps < 1:
            raise JeatError(f"attack '{head}' needs at least 1 step")
    allowed = {**_COMMON, **_OPTIONS[kind]}
    options: dict[str, Any] = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise JeatError(f"attack option '{opt}' in '{text}' is not KEY=VALUE")
        if key == "targets" and not targeted:
            allowed = {k: v for k, v in allowed.items() if k != "targets"}
        if key not in allowed:
            accepted = ", ".join(sorted(allowed)) or "none"
            raise JeatError(f"attack '{head}' has no option '{key}'; it takes {accepted}")
        options[key] = value.strip() if key in ("source", "components") else parse_value(value)
    return AttackSpec(text.strip(), kind, steps, targeted, options)


def parse_attacks(attacks: str | list[str]) -> list[AttackSpec]:
    """Parse a comma-separated string or a list of attack names."""
    items = attacks.split(",") if isinstance(attacks, str) else list(attacks)
    specs = [parse_attack(a) for a in items if str(a).strip()]
    if not specs:
        raise JeatError("give at least one attack (e.g. clean,fgsm,pgd20)")
    return specs


def _number(options: dict, key: str, label: str, low: float = 0.0, integer: bool = False):
    value = options[key]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JeatError(f"{label}: option {key} must be a number, got {value!r}")
    if integer and int(value) != value:
        raise JeatError(f"{label}: option {key} must be an integer, got {value}")
    if value < low:
        raise JeatError(f"{label}: option {key} must be >= {low:g}, got {value}")
    return int(value) if integer else float(value)


def _switch(options: dict, key: str, label: str) -> bool:
    value = options[key]
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise JeatError(f"{label}: option {key} must be 0 or 1, got {value!r}")


def _threat(spec: AttackSpec, default: ThreatModel, context: EvalContext) -> ThreatModel:
    norm, eps = spec.options.get("norm"), spec.options.get("eps")
    if norm is None and eps is None:
        return default
    norm = str(norm or default.norm)
    if eps is not None:
        eps = check_budget(norm, eps, context.image_shape, f"{spec.label}: option eps")
    return make_threat(norm, default.eps if eps is None else eps)


def _step_size(o: dict, label: str, th: ThreatModel, context: EvalContext) -> float | None:
    """The ``step_size`` option: None (the attack's default), or a step > 0 that means
    something in the threat's norm (:func:`jeat.attacks.threats.check_step_size`)."""
    value = o["step_size"]
    if value is None:
        return None
    what = f"{label}: option step_size"
    return check_step_size(th.norm, value, th.eps, context.image_shape, what)


def _adaptive(
    attack: Callable[..., Tensor], family: str, o: dict[str, Any], label: str
) -> tuple[Callable[..., Tensor], str]:
    """``attack`` with the adaptive switches its options ask for (``unroll``, then ``bpda``:
    purifiers unroll, every other masked layer gets BPDA's backward), and its loss family."""
    if _switch(o, "unroll", label):
        attack, family = Unroll(attack), f"{family}-unroll"
    if _switch(o, "bpda", label):
        attack, family = BPDA(attack), f"{family}-bpda"
    return attack, family


def build_attack(spec: AttackSpec, threat: ThreatModel, context: EvalContext) -> BuiltAttack:
    """Turn a parsed spec into runnable stages (validating every option)."""
    o = {**_COMMON, **_OPTIONS[spec.kind], **spec.options}
    label = spec.label
    if spec.kind == "clean":
        return BuiltAttack(spec, None, [("clean", _identity, "clean")])
    th = _threat(spec, threat, context)
    if spec.kind == "fgsm":
        fgsm = FGSM(th, loss=str(o["loss"]))
        fgsm.eot = _number(o, "eot", label, 1, integer=True)
        fgsm.log_outputs = _switch(o, "log_outputs", label)
        stage, family = _adaptive(fgsm, fgsm.loss, o, label)
        return BuiltAttack(spec, th, [(label, stage, "white-box")], steps=1, loss=family)
    if spec.kind in _STEPPED:
        loss = "ce" if spec.kind == "pgd" else spec.kind
        pgd = PGD(
            th,
            steps=spec.steps or 1,
            step_size=_step_size(o, label, th, context),
            loss=loss,
            random_start=bool(o["random_start"]),
            restarts=_number(o, "restarts", label, 1, integer=True),
            keep_success=True,
            active_set=_switch(o, "active", label),
            eot=_number(o, "eot", label, 1, integer=True),
            log_outputs=_switch(o, "log_outputs", label),
        )
        attack: Callable[..., Tensor] = pgd
        if spec.targeted:
            attack = MultiTargeted(pgd, _number(o, "targets", label, 1, integer=True))
        family = f"{loss}-targeted" if spec.targeted else loss
        attack, family = _adaptive(attack, family, o, label)
        return BuiltAttack(spec, th, [(label, attack, "white-box")], steps=spec.steps, loss=family)
    if spec.kind == "square":
        from jeat.attacks.external import Square

        sq = Square(
            th,
            n_queries=_number(o, "n_queries", label, 1, integer=True),
            p_init=_number(o, "p_init", label),
            restarts=_number(o, "restarts", label, 1, integer=True),
            seed=context.seed,
        )
        return BuiltAttack(spec, th, [(label, sq, "black-box")], warnings=sq.warnings)
    if spec.kind == "autoattack":
        from jeat.attacks.external import AutoAttack

        comps = o["components"]
        aa = AutoAttack(
            th,
            version=str(o["version"]),
            seed=context.seed,
            components=[c.strip() for c in comps.split("+")] if comps else None,
            n_queries=_number(o, "n_queries", label, 1, integer=True),
        )
        stages = [
            (f"{label}/{name}", stage, "black-box" if name == "square" else "white-box")
            for name, stage in aa.stages()
        ]
        return BuiltAttack(spec, th, stages, warnings=aa.warnings)
    if spec.kind == "autoattack-fast":
        from jeat.attacks.external import AutoAttack

        # the standard version's settings (APGD-T on 9 target classes, one restart each),
        # only its two gradient components; the table's cascade gives them the points still
        # robust, as the reference's own cascade does
        aa = AutoAttack(th, version="standard", seed=context.seed)
        stages = [
            (f"{label}/{name}", stage, "white-box")
            for name, stage in aa.stages()
            if name in AUTOATTACK_FAST
        ]
        return BuiltAttack(spec, th, stages, warnings=aa.warnings)
    if spec.kind in ("transfer", "sgm"):
        from jeat.attacks.transfer import Transfer

        if not o["source"]:
            raise JeatError(
                f"{label} needs a source model: train one (e.g. jeat train --config "
                f"digits-source --out runs/source) and pass {spec.kind}:source=runs/source"
            )
        gamma = _number(o, "gamma", label)
        step_size = _step_size(o, label, th, context)
        source = context.source(str(o["source"]))
        crafted = PGD(
            th,
            steps=_number(o, "steps", label, 1, integer=True),
            step_size=th.eps / 8 if step_size is None else step_size,
            random_start=bool(o["random_start"]),
        )
        return BuiltAttack(spec, th, [(label, Transfer(source, crafted, gamma=gamma), "transfer")])
    if spec.kind == "roa":
        from jeat.attacks.occlusion import ROA, auto_search, default_side

        shape = context.image_shape or (32, 32)
        side = _number(o, "size", label, 1, integer=True) or default_side(shape)
        height = _number(o, "height", label, 1, integer=True) or side
        width = _number(o, "width", label, 1, integer=True) or side
        stride = _number(o, "stride", label, 1, integer=True)
        search = str(o["search"])
        if search == "auto":  # exhaustive when affordable, else gradient-guided
            search = auto_search(shape, height, width, stride)
        roa = ROA(
            height,
            width,
            search=search,
            stride=stride,
            candidates=_number(o, "candidates", label, 1, integer=True),
            steps=_number(o, "steps", label, 1, integer=True),
            step_size=_number(o, "step_size", label),
        )
        return BuiltAttack(spec, None, [(label, roa, "occlusion")], steps=roa.steps)
    raise JeatError(f"unknown attack kind '{spec.kind}'")  # pragma: no cover


def _identity(model: nn.Module, x: Tensor, y: Tensor, **_: Any) -> Tensor:
    return x


@dataclass
class AttackResult:
    attack: str
    category: str
    threat: str
    n: int  # points in the table
    attacked: int  # points this attack ran on
    broken: int  # of those, how many it misclassified
    accuracy: float | None  # percent of all n robust under this attack alone (None: unknown)
    robust_after: float  # percent of all n robust under every row so far (the worst case)
    seconds: float
    group: str = ""  # the attack as written (AutoAttack's components share one)


@dataclass
class EvalResult:
    threat: str
    eps: float
    mode: str
    rows: list[AttackResult]
    robust_accuracy: float  # worst case over all attacks, percent
    warnings: list[str] = field(default_factory=list)
    robust: Tensor | None = field(default=None, repr=False)  # per point: survived everything
    # per point and stage: 1 survived, 0 broken, -1 not attacked (cascade: broken earlier)
    outcomes: dict[str, Tensor] = field(default_factory=dict, repr=False)
    labels: Tensor | None = field(default=None, repr=False)
    # per traced stage: the loss traces of its gradient attack (``evaluate(trace=True)``)
    traces: dict[str, LossTrace] = field(default_factory=dict, repr=False)
    specs: dict[str, AttackSpec] = field(default_factory=dict, repr=False)  # per stage
    point_notes: list[str] = field(default_factory=list, repr=False)  # per point (diagnosis)

    def broken_by(self) -> list[str]:
        """Per point, the first row (table order) that misclassified it; "" when robust."""
        n = self.n
        out = [""] * n
        for name, o in self.outcomes.items():
            for i in (o == 0).nonzero().squeeze(1).tolist():
                if not out[i]:
                    out[i] = name
        return out

    def per_point_csv(self) -> str:
        """One row per point: index, label, the first row that broke it, whether it survived
        everything, then each row's outcome (1 survived, 0 broken, empty: not attacked).

        With loss traces (``evaluate(trace=True)``), each traced row adds its loss trace
        summary: the loss at the first and last iterate and its maximum (of the run that
        reached the highest final loss), and the first step at which an iterate fooled the
        model (empty: none did). With a diagnosis, ``indicators`` lists what each point
        raised (``row=indicator;...``)."""
        buf = io.StringIO()
        names = list(self.outcomes)
        traced = [k for k in names if k in self.traces]
        summaries = {k: [t.tolist() for t in self.traces[k].summary()] for k in traced}
        parts = ("loss_first", "loss_last", "loss_max", "fooled_at")
        trace_head = [f"{k}:{part}" for k in traced for part in parts]
        writer = csv.writer(buf, lineterminator="\n")
        extra = ["indicators"] if self.point_notes else []
        writer.writerow(["index", "label", "broken_by", "robust", *names, *trace_head, *extra])
        broken = self.broken_by()
        labels = self.labels.tolist() if self.labels is not None else [""] * self.n
        robust = self.robust.tolist() if self.robust is not None else [""] * self.n
        cols = [self.outcomes[k].tolist() for k in names]
        for i in range(self.n):
            cells = ["" if c[i] < 0 else str(c[i]) for c in cols]
            for k in traced:
                attacked = self.outcomes[k][i] >= 0
                first, last, top, at = (v[i] for v in summaries[k])
                cells += (
                    [_num(first), _num(last), _num(top), "" if at < 0 else str(at)]
                    if attacked
                    else ["", "", "", ""]
                )
            notes = [self.point_notes[i]] if self.point_notes else []
            writer.writerow([i, labels[i], broken[i], int(robust[i]), *cells, *notes])
        return buf.getvalue()

    @property
    def n(self) -> int:
        return self.rows[0].n if self.rows else 0

    def row(self, name: str) -> AttackResult:
        for r in self.rows:
            if r.attack == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "threat": self.threat,
            "eps": self.eps,
            "mode": self.mode,
            "robust_accuracy": self.robust_accuracy,
            "attacks": [asdict(r) for r in self.rows],
            "warnings": list(self.warnings),
        }

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        head = ["attack", "threat", "attacked", "broken", "accuracy %", "robust after %", "s"]
        body = []
        for r in self.rows:
            acc = "-" if r.accuracy is None else f"{r.accuracy:.2f}"
            body.append(
                [
                    r.attack,
                    r.threat,
                    str(r.attacked),
                    str(r.broken),
                    acc,
                    f"{r.robust_after:.2f}",
                    f"{r.seconds:.1f}",
                ]
            )
        body.append(["worst case", "", "", "", f"{self.robust_accuracy:.2f}", "", ""])
        return head, body

    def table(self) -> str:
        head, body = self._cells()
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

        def fmt(row: list[str]) -> str:
            cells = enumerate(zip(row, widths, strict=True))
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in cells)

        lines = [f"{self.mode} evaluation on {self.n} points, threat {self.threat} {self.eps:.4g}"]
        lines += [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def markdown(self) -> str:
        head, body = self._cells()
        lines = [
            f"{self.mode.capitalize()} evaluation on {self.n} points, threat "
            f"{self.threat} ε = {self.eps:.4g}.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(row) + " |" for row in body),
        ]
        if self.warnings:
            lines += ["", "**Sanity warnings** (possible gradient masking):", ""]
            lines += [f"- {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        fields = list(AttackResult.__dataclass_fields__)
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow(asdict(r))
        return buf.getvalue()


def _num(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.4g}"


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return logits_of(model, x).argmax(1)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Clean accuracy in percent (model in eval mode; mode restored)."""
    device = next(model.parameters()).device
    correct = 0
    with model_mode(model, True):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            correct += int((_predict(model, xb) == yb).sum())
    return 100.0 * correct / max(1, len(x))


# Options that change how an attack is computed, not what it computes: a stage's seed ignores
# them, so that ``pgd20`` and ``pgd20:active=0`` draw the same random starts.
_EXECUTION_OPTIONS = ("active",)


def _stage_seed(seed: int, name: str, start: int = 0) -> int:
    """The seed of one batch of one stage: from the table's seed, the stage (less its
    execution options) and the batch's first position, so a batch draws the same random
    numbers whichever process runs it."""
    head, *opts = name.split(":")
    kept = [
        o for o in opts if o.partition("=")[0].strip().replace("-", "_") not in _EXECUTION_OPTIONS
    ]
    key = ":".join([head, *kept])
    return (seed * 1_000_003 + zlib.crc32(key.encode()) + 7_919 * start) % (2**63)


def _check_output(name: str, threat: ThreatModel | None, x_adv: Tensor, x: Tensor) -> None:
    if x_adv.shape != x.shape:
        raise JeatError(f"attack {name} returned shape {tuple(x_adv.shape)} for {tuple(x.shape)}")
    if not torch.isfinite(x_adv).all() or x_adv.min() < -1e-5 or x_adv.max() > 1 + 1e-5:
        raise JeatError(f"attack {name} returned inputs outside the [0, 1] box")
    if threat is not None:
        worst = float(threat.distance(x_adv, x).max()) if len(x) else 0.0
        if worst > threat.eps * (1 + 1e-4) + 1e-5:
            raise JeatError(
                f"attack {name} left its threat model: distance {worst:.5g} > eps {threat.eps:.5g}"
            )


def _run_stage(
    model: nn.Module,
    name: str,
    attack: Callable[..., Tensor],
    threat: ThreatModel | None,
    x: Tensor,
    y: Tensor,
    idx: Tensor,
    batch_size: int,
    seed: int,
    device: torch.device,
    progress: bool,
    shards: DistContext | None = None,
    trace: LossTrace | None = None,
) -> Tensor:
    """Attack the points ``idx``; return which of them stay correctly classified. With
    ``shards`` (a torchrun job), each process attacks every ``world_size``-th batch and the
    results are gathered, so every process returns the one-process answer. ``trace`` (set as
    the recorder of the stage's gradient attack) receives each batch's loss traces.

    Each batch runs with the global random generators seeded from its position too (and
    restored afterwards), so a randomised model (noise injection, random purification) gives
    the same table on every run."""
    from tqdm.auto import tqdm

    rank, world = (shards.rank, shards.world_size) if shards is not None else (0, 1)
    generator = torch.Generator(device=device)
    ok = torch.zeros(len(idx), dtype=torch.bool)
    starts = list(range(0, len(idx), batch_size))[rank::world]
    mine = sum(min(batch_size, len(idx) - i) for i in starts)
    bar = tqdm(total=mine, desc=name, unit="pt", leave=False, disable=not progress or rank != 0)
    forked = [device] if torch.device(device).type == "cuda" else []
    with bar:
        for i in starts:
            sel = idx[i : i + batch_size]
            xb, yb = x[sel].to(device), y[sel].to(device)
            stage_seed = _stage_seed(seed, name, i)
            generator.manual_seed(stage_seed)
            if trace is not None:
                trace.begin_batch(sel, device)
            # no autograd graph outside the attacks' own gradient steps (they enable it)
            with (
                torch.random.fork_rng(devices=forked),
                model_mode(model, True),
                torch.no_grad(),
            ):
                torch.manual_seed(stage_seed)
                x_adv = attack(model, xb, yb, generator=generator, check=False)
                _check_output(name, threat, x_adv, xb)
                ok[i : i + batch_size] = (_predict(model, x_adv) == yb).cpu()
            if trace is not None:
                trace.end_batch()
            bar.update(len(sel))
    if world > 1:
        assert shards is not None
        parts = shards.all_gather([(i, ok[i : i + batch_size]) for i in starts])
        for part in parts:
            for i, chunk in part:
                ok[i : i + len(chunk)] = chunk
        if trace is not None:
            rows = idx[[j for i in starts for j in range(i, min(i + batch_size, len(idx)))]]
            mine_trace = (rows, trace.loss[rows], trace.grad[rows], trace.first_fooled[rows])
            for rows, loss, grad, first in shards.all_gather(mine_trace):
                trace.loss[rows], trace.grad[rows], trace.first_fooled[rows] = loss, grad, first
    return ok


def traced_core(attack: Callable[..., Tensor]) -> tuple[PGD, int] | None:
    """The gradient attack (PGD) inside a stage, and how many runs it makes per point
    (restarts × target classes); None for attacks that record no loss trace."""
    from jeat.attacks.transfer import Transfer

    runs = 1
    while isinstance(attack, (BPDA, Unroll, MultiTargeted, Transfer)):
        if isinstance(attack, MultiTargeted):
            runs *= attack.n_targets
        attack = attack.attack
    if isinstance(attack, PGD):
        return attack, runs * attack.restarts
    return None


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: str | list[str],
    threat: ThreatModel,
    batch_size: int = 256,
    seed: int = 0,
    mode: str = "cascade",
    num_classes: int | None = None,
    context: EvalContext | None = None,
    progress: bool = False,
    sanity_tolerance: float = 3.0,
    shards: DistContext | None = None,
    order: str = "cost",
    trace: bool = False,
) -> EvalResult:
    """Robust accuracy of ``model`` under each attack on the same points, and the worst case.

    ``mode`` is ``cascade`` (attack only the points still robust) or ``independent`` (every
    attack on every clean-correct point); see the module docstring. ``num_classes`` checks the
    width of the model's logits. The model runs in eval mode (its modes are restored), under
    ``torch.no_grad`` except inside gradient attacks. The result's ``warnings`` hold the sanity
    rules that this table can check (see :mod:`jeat.sanity`) and the reference AutoAttack's
    own warnings.

    In cascade mode ``order="cost"`` (the default) runs the white-box attacks cheapest first
    (:func:`cascade_order`), so that cheap attacks remove the easy points before the expensive
    ones run; ``order="given"`` keeps the list's order.

    ``shards`` (a :class:`jeat.distributed.DistContext` of a torchrun job) splits every stage's
    batches across the processes and gathers the per-point results: each process returns the
    table, per point, that one process computes (batches are seeded by their position).

    ``trace=True`` records the per-point loss trace of every gradient attack (PGD family,
    FGSM, their targeted, BPDA and transfer forms) into ``result.traces``: what
    :mod:`jeat.diagnose` reads.
    """
    if mode not in ("cascade", "independent"):
        raise JeatError(f"unknown evaluation mode '{mode}'; use cascade or independent")
    check_images(x, "test images")
    if int(batch_size) != batch_size or batch_size < 1:
        raise JeatError(f"batch size must be an integer >= 1, got {batch_size}")
    specs = parse_attacks(attacks)
    device = model_device(model)
    with model_mode(model, True):
        width = model_width(model, x[:1].to(device), num_classes) if len(x) else 0
    y = check_labels(y, width or 1, len(x))
    ctx = context or EvalContext()
    ctx.seed, ctx.device = seed, device
    ctx.num_classes = ctx.num_classes or width
    ctx.image_shape = ctx.image_shape or tuple(x.shape[1:])
    built = [build_attack(s, threat, ctx) for s in specs if s.kind != "clean"]
    if order not in ("cost", "given"):
        raise JeatError(f"unknown attack order '{order}'; use cost or given")
    if mode == "cascade" and order == "cost":
        built = cascade_order(built)

    n = len(x)
    start = time.perf_counter()
    all_idx = torch.arange(n)
    clean_ok = _run_stage(
        model, "clean", _identity, None, x, y, all_idx, batch_size, seed, device, False, shards
    )
    outcomes = {"clean": clean_ok.to(torch.int8)}
    rows = [
        AttackResult(
            "clean",
            "clean",
            "-",
            n,
            n,
            int((~clean_ok).sum()),
            _pct(clean_ok.sum(), n),
            _pct(clean_ok.sum(), n),
            time.perf_counter() - start,
            "clean",
        )
    ]
    robust = clean_ok.clone()
    traces: dict[str, LossTrace] = {}
    for b in built:
        threat_text = b.threat.describe() if b.threat is not None else _describe_stage(b)
        group_ok = clean_ok.clone()
        # a row's own accuracy is known when its group attacked every clean-correct point
        own_known = mode == "independent" or bool(torch.equal(robust, clean_ok))
        for name, attack, category in b.stages:
            base = robust if mode == "cascade" else group_ok
            idx = base.nonzero().squeeze(1)
            core = traced_core(attack) if trace else None
            recorder = None
            if core is not None:
                from jeat.attacks.trace import LossTrace

                recorder = LossTrace(n, core[1], core[0].steps)
                core[0].recorder = recorder
                traces[name] = recorder
            t0 = time.perf_counter()
            try:
                ok = _run_stage(
                    model, name, attack, b.threat, x, y, idx, batch_size, seed, device, progress,
                    shards, recorder,
                )  # fmt: skip
            finally:
                if core is not None:
                    core[0].recorder = None
            secs = time.perf_counter() - t0
            outcome = torch.full((n,), -1, dtype=torch.int8)
            outcome[idx] = ok.to(torch.int8)
            outcomes[name] = outcome
            if mode == "cascade":
                robust[idx[~ok]] = False
            group_ok[idx[~ok]] = False
            if mode == "independent":
                robust &= group_ok
            rows.append(
                AttackResult(
                    name,
                    category,
                    threat_text,
                    n,
                    len(idx),
                    int((~ok).sum()),
                    _pct(group_ok.sum(), n) if own_known else None,
                    _pct(robust.sum(), n),
                    secs,
                    b.spec.label,
                )
            )
    result = EvalResult(
        threat.norm,
        threat.eps,
        mode,
        rows,
        _pct(robust.sum(), n),
        robust=robust,
        outcomes=outcomes,
        labels=y.cpu(),
        traces=traces,
        specs={name: b.spec for b in built for name, _, _ in b.stages},
    )
    result.warnings = table_warnings(result, built, sanity_tolerance)
    return result


def attack_cost(spec: AttackSpec) -> float:
    """Rough cost of an attack per point, in forward-backward passes of the model (a forward
    alone counts 1/3): what :func:`cascade_order` sorts by."""
    o = spec.options
    if spec.kind == "clean":
        return 0.0
    if spec.kind == "fgsm":
        return 1.0
    if spec.kind in _STEPPED:
        targets = int(o.get("targets") or 9) if spec.targeted else 1
        return float(spec.steps or 1) * int(o.get("restarts") or 1) * targets
    if spec.kind == "square":
        return int(o.get("n_queries") or 5000) * int(o.get("restarts") or 1) / 3
    if spec.kind == "autoattack-fast":
        return 100.0 + 9 * 100.0  # APGD-CE, then APGD-T on 9 targets
    if spec.kind == "autoattack":
        comps = o.get("components")
        names = comps.split("+") if comps else ["apgd-ce", "apgd-t", "fab-t", "square"]
        per = {"apgd-ce": 100.0, "apgd-t": 900.0, "fab-t": 900.0, "square": 5000 / 3}
        return sum(per.get(c.strip(), 100.0) for c in names)
    return float(o.get("steps") or 20)


def cascade_order(built: list[BuiltAttack]) -> list[BuiltAttack]:
    """The white-box attacks cheapest first (stable: equal costs keep their order), then every
    other attack (black-box, transfer, occlusion) in the given order. Those stay last so that the
    cascade's masking rule can still see them break points the white-box attacks left."""
    white = [b for b in built if b.stages and b.stages[0][2] == "white-box"]
    rest = [b for b in built if not (b.stages and b.stages[0][2] == "white-box")]
    return sorted(white, key=lambda b: attack_cost(b.spec)) + rest


def _describe_stage(b: BuiltAttack) -> str:
    attack = b.stages[0][1]
    h, w = getattr(attack, "height", None), getattr(attack, "width", None)
    return f"patch {h}x{w}" if h is not None else "-"


def _pct(count: Tensor | int, n: int) -> float:
    return 100.0 * float(count) / max(1, n)


MASKING = "a likely sign of gradient masking"


def table_warnings(
    result: EvalResult, built: list[BuiltAttack], tolerance: float = 3.0
) -> list[str]:
    """The masking rules a finished table can check (rules 2 and 3 of :mod:`jeat.sanity`: more
    steps never help the defender; white-box attacks beat black-box and transfer ones), plus the
    reference AutoAttack's own warnings. Only rows under the same threat model are compared."""
    out: list[str] = []
    meta = {}
    for b in built:
        for name, _, _ in b.stages:
            meta[name] = b
    rows = [r for r in result.rows if r.category != "clean"]
    n = max(1, result.n)
    # at least two points of slack: one point flips with the random start on small tables
    tolerance = max(tolerance, 200.0 / n)
    for i, r in enumerate(rows):
        b = meta.get(r.attack)
        earlier = [p for p in rows[:i] if p.threat == r.threat]
        if result.mode == "cascade":
            extra = 100.0 * r.broken / n
            if extra <= tolerance:
                continue
            white = [p for p in earlier if p.category == "white-box"]
            if r.category in ("black-box", "transfer") and white:
                out.append(
                    f"{r.attack} ({r.category}) broke {r.broken} points ({extra:.1f}% of all) "
                    f"that survived the white-box attacks before it "
                    f"({', '.join(p.attack for p in white)}): white-box attacks should be "
                    f"stronger; {MASKING}"
                )
            stronger = [
                p
                for p in white
                if b is not None
                and b.steps is not None
                and (pb := meta.get(p.attack)) is not None
                and pb.loss == b.loss
                and (pb.steps or 0) > b.steps
            ]
            if r.category == "white-box" and stronger:
                out.append(
                    f"{r.attack} ({b.steps} steps) broke {r.broken} points ({extra:.1f}%) that "
                    f"survived {stronger[0].attack} ({meta[stronger[0].attack].steps} steps): "
                    f"more steps should never help the defender; {MASKING}"
                )
        else:
            if r.accuracy is None:
                continue
            white = [p for p in earlier + rows[i + 1 :] if p.threat == r.threat]
            white = [p for p in white if p.category == "white-box" and p.accuracy is not None]
            if r.category in ("black-box", "transfer") and white:
                best = min(white, key=lambda p: p.accuracy)
                if r.accuracy < best.accuracy - tolerance:
                    out.append(
                        f"{r.attack} ({r.category}) reaches {r.accuracy:.1f}% but the best "
                        f"white-box attack only {best.attack} {best.accuracy:.1f}%: white-box "
                        f"attacks should be stronger; {MASKING}"
                    )
            if r.category == "white-box" and b is not None and b.steps is not None:
                for p in white:
                    pb = meta.get(p.attack)
                    if (
                        pb is not None
                        and pb.loss == b.loss
                        and pb.steps is not None
                        and b.steps > pb.steps
                        and r.accuracy > p.accuracy + tolerance
                    ):
                        out.append(
                            f"{r.attack} ({b.steps} steps) leaves {r.accuracy:.1f}% but "
                            f"{p.attack} ({pb.steps} steps) {p.accuracy:.1f}%: more steps "
                            f"should never help the defender; {MASKING}"
                        )
    for b in built:
        for w in b.warnings:
            out.append(f"{b.spec.label} (reference implementation): {w}")
    return out


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with none."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _collect(data: Any) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors from a pair of tensors or from an iterable of ``(x, y)`` batches (a
    ``DataLoader``), on the host."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
        if not isinstance(y, Tensor):
            y = torch.as_tensor(y)
        return x, y
    if isinstance(data, Tensor):
        raise JeatError("data must be (x, y): images and their labels, not images alone")
    xs, ys = [], []
    try:
        batches = iter(data)
    except TypeError:
        raise JeatError(
            f"data must be (x, y) tensors or a DataLoader of (x, y) batches, got "
            f"{type(data).__name__}"
        ) from None
    for batch in batches:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise JeatError("every batch of the DataLoader must be (images, labels)")
        xs.append(torch.as_tensor(batch[0]).detach().cpu())
        ys.append(torch.as_tensor(batch[1]).detach().cpu())
    if not xs:
        raise JeatError("the DataLoader gave no batches")
    return torch.cat(xs), torch.cat(ys)


def evaluate_model(
    model: nn.Module,
    data: Any,
    attacks: str | list[str] | None = None,
    *,
    eps: float,
    norm: str = "linf",
    mode: str = "cascade",
    batch_size: int = 256,
    seed: int = 0,
    num_classes: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """The notebook API, also reachable as ``jeat.evaluate(model, data, ...)``: the robustness
    table of any classifier that returns logits for images in [0, 1].

    ``data`` is ``(x, y)`` tensors or a ``DataLoader`` of ``(x, y)`` batches; the attacks run on
    the model's device (the data follow it). ``attacks`` default to the main job's table
    (``eval.attacks`` of the default config); ``eps`` is in [0, 1] pixel units under ``norm``
    (``linf`` or ``l2``). Returns the :class:`EvalResult` that ``jeat eval`` prints
    (``.table()``, ``.markdown()``, ``.csv()``, ``.to_dict()``, ``.rows``)."""
    from jeat.config import load_config

    if not isinstance(model, nn.Module):
        raise JeatError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x, y = _collect(data)
    if attacks is None:
        attacks = list(load_config(None).eval.attacks)
    threat = make_threat(str(norm).lower(), check_budget(norm, eps, tuple(x.shape[1:])))
    return evaluate(
        model,
        x,
        y,
        attacks,
        threat,
        batch_size=batch_size,
        seed=seed,
        mode=mode,
        num_classes=num_classes,
        progress=progress,
    )


class _CallableModule(types.ModuleType):
    """``jeat.evaluate(model, data, ...)`` calls :func:`evaluate_model`, while
    ``jeat.evaluate`` stays this module (``from jeat.evaluate import evaluate``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> EvalResult:
        return evaluate_model(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
