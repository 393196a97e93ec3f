"""AutoAttack and the Square black-box attack from the reference implementation.

``pyautoattack`` is Croce & Hein's AutoAttack packaged on PyPI; it is used as is (not a
rewrite) behind a thin adapter that

* takes our models (tuple/dict outputs adapted to logits, float32, eval mode, modes restored),
* runs AutoAttack one component at a time (APGD-CE, APGD-T, FAB-T, Square for the standard
  version), so that the evaluation reports per-component progress, time and the share of
  points each one broke, exactly as the reference cascade does,
* keeps the global RNG untouched (the reference reseeds ``torch``'s global generator; we run it
  under ``torch.random.fork_rng``) and passes a fixed seed, so results are repeatable,
* collects the reference's own warnings (randomised or dynamic defence, zero gradients, Square
  stronger than the gradient attacks) so that the report can show them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from jeat.attacks.base import LogitsModel, check_images, model_mode, model_width
from jeat.attacks.threats import ThreatModel
from jeat.energy import check_labels
from jeat.errors import JeatError

__all__ = ["AutoAttack", "AutoAttackStage", "Square", "AUTOATTACK_VERSIONS"]

AUTOATTACK_VERSIONS = {
    "standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
    "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
    "rand": ["apgd-ce", "apgd-dlr"],
}
_NORMS = {"linf": "Linf", "l2": "L2"}


def _reference():
    try:
        import pyautoattack
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise JeatError(
            "AutoAttack and Square need the 'pyautoattack' package: pip install pyautoattack"
        ) from exc
    return pyautoattack


def _ref_norm(threat: ThreatModel) -> str:
    if threat.norm not in _NORMS:
        raise JeatError(
            f"AutoAttack and Square support L-inf and L2 threat models, not '{threat.norm}'"
        )
    return _NORMS[threat.norm]


class _Collect(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg not in self.sink:
            self.sink.append(msg)


@contextmanager
def _reference_run(x: Tensor, warnings: list[str]) -> Iterator[None]:
    """Isolate a reference call: global RNG restored afterwards, its warnings collected."""
    logger = logging.getLogger("auto-attack")
    handler = _Collect(warnings)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _validate(model: nn.Module, x: Tensor, y: Tensor, check: bool) -> None:
    if check:
        check_images(x)
        with model_mode(model, True):
            check_labels(y, model_width(model, x), x.shape[0])


@dataclass
class AutoAttackStage:
    """One component of AutoAttack (e.g. ``apgd-t``) as an attack of its own."""

    parent: AutoAttack
    component: str

    @property
    def threat(self) -> ThreatModel:
        return self.parent.threat

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        check: bool = True,
    ) -> Tensor:
        return self.parent.run(model, x, y, [self.component], check=check)


@dataclass
class AutoAttack:
    """AutoAttack (Croce & Hein 2020) through the reference ``pyautoattack``.

    ``version``: ``standard`` (APGD-CE, APGD-T, FAB-T, Square with 5000 queries; the
    RobustBench protocol), ``plus`` or ``rand``. ``components`` runs a subset in the given order
    (the reference's ``custom`` version uses its constructor defaults for them).
    ``n_queries`` overrides Square's query budget (5000 in the standard version).
    The attack is deterministic given ``seed``; ``generator`` is accepted for interface
    compatibility and ignored.
    """

    threat: ThreatModel
    version: str = "standard"
    seed: int = 0
    components: list[str] | None = None
    n_queries: int | None = None
    batch_size: int = 500
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _ref_norm(self.threat)
        if self.version not in AUTOATTACK_VERSIONS:
            raise JeatError(
                f"unknown AutoAttack version '{self.version}'; choose one of "
                f"{', '.join(AUTOATTACK_VERSIONS)}"
            )
        known = sorted({c for cs in AUTOATTACK_VERSIONS.values() for c in cs})
        for c in self.components or []:
            if c not in known:
                raise JeatError(
                    f"unknown AutoAttack component '{c}'; choose from {', '.join(known)}"
                )
        if self.n_queries is not None and int(self.n_queries) < 1:
            raise JeatError(f"Square's query budget must be >= 1, got {self.n_queries}")

    @property
    def order(self) -> list[str]:
        return list(self.components or AUTOATTACK_VERSIONS[self.version])

    def stages(self) -> list[tuple[str, AutoAttackStage]]:
        """The components as separate attacks, in the reference's order, for a cascade."""
        return [(c, AutoAttackStage(self, c)) for c in self.order]

    def _adversary(self, model: nn.Module, device: torch.device):
        ref = _reference()
        version = "custom" if self.components else self.version
        aa = ref.AutoAttack(
            LogitsModel(model),
            attacks=self.order if self.components else None,
            device=device,
            eps=self.threat.eps,
            norm=_ref_norm(self.threat),
            seed=self.seed,
            version=version,
        )
        if self.n_queries is not None:
            aa.square.n_queries = int(self.n_queries)
        return aa

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        components: list[str] | None = None,
        check: bool = True,
    ) -> Tensor:
        """Run ``components`` (default: all) as the reference cascade on ``(x, y)``."""
        _validate(model, x, y, check)
        if x.shape[0] == 0:
            return x.detach().clone()
        with model_mode(model, True), _reference_run(x, self.warnings):
            aa = self._adversary(model, x.device)
            aa.attacks_to_run = list(components or self.order)
            x_adv, _ = aa.run_standard_evaluation(
                x.detach(), y, batch_size=min(self.batch_size, x.shape[0])
            )
        return x_adv.detach().clamp_(0.0, 1.0)

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        check: bool = True,
    ) -> Tensor:
        return self.run(model, x, y, check=check)


@dataclass
class Square:
    """Square Attack (Andriushchenko et al. 2020): score-based black-box random search on the
    margin loss, through the reference implementation. It only reads the model's outputs, so it
    is immune to gradient masking; the sanity rules compare it with the white-box attacks."""

    threat: ThreatModel
    n_queries: int = 5000
    p_init: float = 0.8
    restarts: int = 1
    seed: int = 0
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _ref_norm(self.threat)
        if int(self.n_queries) != self.n_queries or self.n_queries < 1:
            raise JeatError(f"Square's query budget must be an integer >= 1, got {self.n_queries}")
        if int(self.restarts) != self.restarts or self.restarts < 1:
            raise JeatError(f"Square's restarts must be an integer >= 1, got {self.restarts}")
        if not 0 < self.p_init <= 1:
            raise JeatError(f"Square's p_init must be in (0, 1], got {self.p_init}")

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        check: bool = True,
    ) -> Tensor:
        _validate(model, x, y, check)
        if x.shape[0] == 0:
            return x.detach().clone()
        ref = _reference()
        from pyautoattack.square import SquareAttack

        del ref
        with model_mode(model, True), _reference_run(x, self.warnings), torch.no_grad():
            attack = SquareAttack(
                LogitsModel(model),
                norm=_ref_norm(self.threat),
                n_queries=int(self.n_queries),
                eps=self.threat.eps,
                p_init=self.p_init,
                n_restarts=int(self.restarts),
                seed=self.seed,
                verbose=False,
                resc_schedule=False,
                device=x.device,
            )
            x_adv = attack.perturb(x.detach(), y)
        return x_adv.detach().clamp_(0.0, 1.0)
