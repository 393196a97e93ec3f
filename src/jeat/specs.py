"""Attack specs and their registry: the small language that names attacks in ``jeat eval``
and the Python API, and the factory that turns a name into runnable stages.

Attacks are named as::

    clean, fgsm, pgd20, pgd100, cw (= cw30), dlr100, pgd20-t (targeted, 9 targets),
    square, autoattack, autoattack-fast, transfer, sgm, roa

with options after colons: ``pgd20:restarts=5``, ``autoattack:norm=l2:eps=0.5``,
``sgm:source=runs/src:gamma=0.2``, ``roa:size=3:search=exhaustive``. Every attack takes
``eps`` and ``norm`` to override the table's threat model; :func:`list_attacks` lists the rest.
:func:`parse_attack` reads a name into an :class:`AttackSpec`, :func:`build_attack` turns it
into a :class:`BuiltAttack` (one or more stages, each with a category), :func:`attack_cost`
and :func:`cascade_order` order a cascade. The runner is :mod:`jeat.evaluate`, the tables
:mod:`jeat.tables`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from jeat.attacks import BPDA, FGSM, PGD, MultiTargeted, ThreatModel, Unroll, make_threat
from jeat.attacks.threats import check_budget, check_step_size
from jeat.errors import JeatError

__all__ = [
    "AUTOATTACK_FAST",
    "CATEGORIES",
    "AttackSpec",
    "BuiltAttack",
    "EvalContext",
    "list_attacks",
    "parse_attack",
    "parse_attacks",
    "build_attack",
    "attack_cost",
    "cascade_order",
    "identity_attack",
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
    # unlabelled images to fit surrogates on (``substitute``, ``bpda_module``): the training
    # inputs and the table's points; None: the batch being attacked
    inputs: Tensor | None = field(default=None, repr=False)

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
    r"^(clean|fgsm|pgd|cw|dlr|square|autoattack-fast|autoattack|transfer|sgm|roa|substitute"
    r"|hopskipjump)(\d*)(-t)?$"
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
    # smooth=S: the expected gradient under N(0, S^2) input noise over `eot` copies (opaque
    # models); bpda_module=NAME: that module differentiated through a learned approximation
    "fgsm": {"loss": "ce", "bpda": 0, "unroll": 0, "eot": 1, "log_outputs": 0, "smooth": 0},
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
        "smooth": 0,
        "bpda_module": None,
    },
    "square": {"n_queries": 5000, "p_init": 0.8, "restarts": 1},
    "autoattack": {"version": "standard", "n_queries": None, "components": None},
    "autoattack-fast": {},
    # distilled from the model's outputs, attacked white-box, query-verified transfer
    "substitute": {
        "steps": 50,
        "step_size": None,
        "restarts": 3,
        "epochs": 15,
        "copies": 2,
        "arch": "small_cnn",
        "gamma": 1.0,
    },
    # decision-based: reads only the predicted class
    "hopskipjump": {"n_queries": 1000, "init_evals": 100},
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
    "substitute": "a surrogate distilled from the model's outputs (Papernot et al. 2017), its "
    "PGD examples transferred, each iterate checked on the model",
    "hopskipjump": "HopSkipJump (Chen et al. 2020): decision-based, reads only the predicted "
    "class; n_queries per point",
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
            "targeted), square, autoattack, autoattack-fast, transfer, sgm, roa, substitute, "
            "hopskipjump"
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
        text_keys = ("source", "components", "arch", "bpda_module")
        options[key] = value.strip() if key in text_keys else parse_value(value)
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
    attack: Callable[..., Tensor],
    family: str,
    o: dict[str, Any],
    label: str,
    context: EvalContext | None = None,
) -> tuple[Callable[..., Tensor], str]:
    """``attack`` with the adaptive switches its options ask for (``unroll``, then ``bpda``:
    purifiers unroll, every other masked layer gets BPDA's backward; ``bpda_module``: that
    module differentiated through a learned approximation), and its loss family."""
    if _switch(o, "unroll", label):
        attack, family = Unroll(attack), f"{family}-unroll"
    if _switch(o, "bpda", label):
        attack, family = BPDA(attack), f"{family}-bpda"
    module = o.get("bpda_module")
    if module:
        from jeat.attacks.substitute import LearnedBPDA

        seed = context.seed if context is not None else 0
        inputs = context.inputs if context is not None else None
        attack = LearnedBPDA(attack, str(module), inputs=inputs, seed=seed)
        family = f"{family}-learned"
    if float(o.get("smooth") or 0) > 0:
        family = f"{family}-smooth"
    return attack, family


def build_attack(spec: AttackSpec, threat: ThreatModel, context: EvalContext) -> BuiltAttack:
    """Turn a parsed spec into runnable stages (validating every option)."""
    o = {**_COMMON, **_OPTIONS[spec.kind], **spec.options}
    label = spec.label
    if spec.kind == "clean":
        return BuiltAttack(spec, None, [("clean", identity_attack, "clean")])
    th = _threat(spec, threat, context)
    if spec.kind == "fgsm":
        fgsm = FGSM(th, loss=str(o["loss"]))
        fgsm.eot = _number(o, "eot", label, 1, integer=True)
        fgsm.log_outputs = _switch(o, "log_outputs", label)
        fgsm.smooth = _number(o, "smooth", label, 0) or 0.0
        stage, family = _adaptive(fgsm, fgsm.loss, o, label, context)
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
            smooth=_number(o, "smooth", label, 0) or 0.0,
        )
        attack: Callable[..., Tensor] = pgd
        if spec.targeted:
            attack = MultiTargeted(pgd, _number(o, "targets", label, 1, integer=True))
        family = f"{loss}-targeted" if spec.targeted else loss
        attack, family = _adaptive(attack, family, o, label, context)
        return BuiltAttack(spec, th, [(label, attack, "white-box")], steps=spec.steps, loss=family)
    if spec.kind == "substitute":
        from jeat.attacks.substitute import ARCHS, Substitute

        if str(o["arch"]) not in ARCHS:
            raise JeatError(f"{label}: option arch must be one of {', '.join(ARCHS)}")
        step_size = _step_size(o, label, th, context)
        sub = Substitute(
            th,
            steps=_number(o, "steps", label, 1, integer=True),
            step_size=step_size,
            restarts=_number(o, "restarts", label, 1, integer=True),
            epochs=_number(o, "epochs", label, 1, integer=True),
            copies=_number(o, "copies", label, 0, integer=True),
            arch=str(o["arch"]),
            gamma=_number(o, "gamma", label),
            seed=context.seed,
            inputs=context.inputs,
        )
        return BuiltAttack(spec, th, [(label, sub, "transfer")])
    if spec.kind == "hopskipjump":
        from jeat.attacks.decision import HopSkipJump

        hsj = HopSkipJump(
            th,
            n_queries=_number(o, "n_queries", label, 1, integer=True),
            init_evals=_number(o, "init_evals", label, 1, integer=True),
        )
        return BuiltAttack(spec, th, [(label, hsj, "black-box")])
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


def identity_attack(model: nn.Module, x: Tensor, y: Tensor, **_: Any) -> Tensor:
    return x


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
    if spec.kind == "substitute":
        return 200.0 + float(o.get("steps") or 50) * int(o.get("restarts") or 3) / 3
    if spec.kind == "hopskipjump":
        return int(o.get("n_queries") or 1000) / 3
    return float(o.get("steps") or 20)


def cascade_order(built: list[BuiltAttack]) -> list[BuiltAttack]:
    """The white-box attacks cheapest first (stable: equal costs keep their order), then every
    other attack (black-box, transfer, occlusion) in the given order. Those stay last so that the
    cascade's masking rule can still see them break points the white-box attacks left."""
    white = [b for b in built if b.stages and b.stages[0][2] == "white-box"]
    rest = [b for b in built if not (b.stages and b.stages[0][2] == "white-box")]
    return sorted(white, key=lambda b: attack_cost(b.spec)) + rest
