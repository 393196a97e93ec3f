"""Training objectives: small objects that turn a model and a batch into a loss.

An objective is built once per run (``create_objective(cfg, info)``) and called per batch::

    out = objective(model, x, y)      # -> ObjectiveOutput(loss, logits, y, metrics)
    out.loss.backward()

It may hold state that must survive a resume (JEM's replay buffer, for instance) through
``state_dict``/``load_state_dict``; the training loop saves it in every checkpoint. New
objectives register with ``@register_objective("name")`` and plug into the same loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from jeat.attacks import PGD, make_threat
from jeat.config import AttackConfig, ObjectiveConfig
from jeat.data import DatasetInfo
from jeat.energy import as_logits, cross_entropy_from_logits, marginal_energy_from_logits
from jeat.errors import JeatError

__all__ = [
    "ObjectiveOutput",
    "Objective",
    "Standard",
    "PGDAT",
    "register_objective",
    "create_objective",
    "list_objectives",
    "build_attack",
]


@dataclass
class ObjectiveOutput:
    loss: Tensor  # scalar to minimise
    logits: Tensor  # logits of the inputs the classification loss was computed on
    y: Tensor  # their labels
    metrics: dict[str, Tensor] = field(default_factory=dict)  # scalars, averaged per epoch


class Objective:
    """Base class; subclasses implement ``__call__`` and declare their ``options``."""

    name: str = ""
    description: str = ""
    options: dict[str, Any] = {}  # accepted objective options and their defaults

    def __init__(self, cfg: ObjectiveConfig, info: DatasetInfo) -> None:
        unknown = set(cfg.options) - set(self.options)
        if unknown:
            accepted = ", ".join(sorted(self.options)) or "none"
            raise JeatError(
                f"objective '{self.name}' does not take option(s) {', '.join(sorted(unknown))}; "
                f"it takes {accepted}"
            )
        self.cfg = cfg
        self.info = info
        self.opts = {**self.options, **cfg.options}

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def _classification(logits: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean cross-entropy ``E(x, y) - E(x)`` and the mean marginal energy, for logging."""
    ce = cross_entropy_from_logits(logits, y, check=False).mean()
    return ce, {"ce": ce.detach(), "energy": marginal_energy_from_logits(logits).mean().detach()}


_OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    def wrap(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        _OBJECTIVES[name] = cls
        return cls

    return wrap


def build_attack(attack: AttackConfig, info: DatasetInfo) -> PGD:
    """The PGD attack a training config describes; the dataset sets the default budget."""
    norm = attack.norm.lower()
    default_eps = info.eps_l2 if norm == "l2" else info.eps_linf
    eps = default_eps if attack.eps is None else attack.eps
    step = attack.step_size if attack.step_size is not None else 2.5 * eps / attack.steps
    return PGD(
        make_threat(norm, eps),
        steps=attack.steps,
        step_size=step,
        random_start=attack.random_start,
    )


@register_objective("standard")
class Standard(Objective):
    description = "cross-entropy on clean inputs, CE = E(x, y) - E(x)"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        logits = as_logits(model(x))
        loss, metrics = _classification(logits, y)
        return ObjectiveOutput(loss, logits.detach(), y, metrics)


@register_objective("pgd-at")
class PGDAT(Objective):
    """Madry et al. (2018): ``min_theta E max_{delta in ball} CE(x + delta, y)``.

    The inner maximisation is PGD with random start (``objective.attack``), run in eval mode by
    default (option ``attack_mode: train`` runs it in train mode, as some batch-norm recipes do).
    """

    description = "Madry PGD adversarial training: CE on PGD adversarial examples"
    options = {"attack_mode": "eval"}

    def __init__(self, cfg: ObjectiveConfig, info: DatasetInfo) -> None:
        super().__init__(cfg, info)
        if self.opts["attack_mode"] not in ("eval", "train"):
            raise JeatError("objective option attack_mode must be 'eval' or 'train'")
        self.attack = build_attack(cfg.attack, info)
        self.attack.eval_mode = self.opts["attack_mode"] == "eval"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        x_adv = self.attack(model, x, y, check=False)
        logits = as_logits(model(x_adv))
        loss, metrics = _classification(logits, y)
        return ObjectiveOutput(loss, logits.detach(), y, metrics)


def list_objectives() -> dict[str, str]:
    return {name: cls.description for name, cls in sorted(_OBJECTIVES.items())}


def create_objective(cfg: ObjectiveConfig, info: DatasetInfo) -> Objective:
    if cfg.name not in _OBJECTIVES:
        raise JeatError(
            f"unknown objective '{cfg.name}'; known objectives: {', '.join(sorted(_OBJECTIVES))}"
        )
    return _OBJECTIVES[cfg.name](cfg, info)
