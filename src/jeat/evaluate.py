"""Robustness evaluation: accuracy under a list of attacks on the same test points.

Attack names: ``clean``, ``fgsm``, ``pgdN`` (N-step PGD on the CE energy difference, step
eps/4, random start) and ``cwN`` (N-step PGD on the Carlini-Wagner margin). Every attack runs
on the same points; the ``worst-case`` row counts a point as robust only if it survives every
attack in the list.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from jeat.attacks import FGSM, PGD, ThreatModel, check_images, model_mode
from jeat.energy import as_logits, check_labels
from jeat.errors import JeatError

__all__ = ["AttackResult", "EvalResult", "parse_attack", "evaluate", "accuracy"]


@dataclass
class AttackResult:
    attack: str
    accuracy: float  # percent
    correct: int
    n: int
    seconds: float


@dataclass
class EvalResult:
    threat: str
    eps: float
    rows: list[AttackResult]
    robust_accuracy: float  # worst case over all attacks, percent

    def to_dict(self) -> dict:
        return {
            "n": self.rows[0].n if self.rows else 0,
            "threat": self.threat,
            "eps": self.eps,
            "robust_accuracy": self.robust_accuracy,
            "attacks": [asdict(r) for r in self.rows],
        }

    def table(self) -> str:
        lines = [f"threat {self.threat}, eps {self.eps:.4g}", f"{'attack':<12}{'acc %':>8}{'s':>8}"]
        for r in self.rows:
            lines.append(f"{r.attack:<12}{r.accuracy:>8.2f}{r.seconds:>8.2f}")
        lines.append(f"{'worst-case':<12}{self.robust_accuracy:>8.2f}")
        return "\n".join(lines)


_PATTERN = re.compile(r"^(clean|fgsm|pgd|cw)(\d*)$")


def parse_attack(name: str, threat: ThreatModel) -> PGD | None:
    """An attack object from its name (``None`` for ``clean``)."""
    m = _PATTERN.match(name.strip().lower())
    if not m:
        raise JeatError(f"unknown attack '{name}'; use clean, fgsm, pgdN (e.g. pgd20) or cwN")
    kind, steps = m.group(1), m.group(2)
    if kind in ("clean", "fgsm") and steps:
        raise JeatError(f"attack '{name}' takes no step count")
    if kind == "clean":
        return None
    if kind == "fgsm":
        return FGSM(threat)
    n = int(steps) if steps else (20 if kind == "pgd" else 30)
    if n < 1:
        raise JeatError(f"attack '{name}' needs at least 1 step")
    return PGD(threat, steps=n, step_size=threat.eps / 4, loss="ce" if kind == "pgd" else "cw")


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return as_logits(model(x)).argmax(1)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Clean accuracy in percent (model in eval mode; mode restored)."""
    device = next(model.parameters()).device
    correct = 0
    with model_mode(model, True):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            correct += int((_predict(model, xb) == yb).sum())
    return 100.0 * correct / max(1, len(x))


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: list[str],
    threat: ThreatModel,
    batch_size: int = 256,
    seed: int = 0,
) -> EvalResult:
    """Accuracy of ``model`` under each named attack on the same points, and the worst case."""
    check_images(x, "test images")
    if not attacks:
        raise JeatError("give at least one attack (e.g. clean,fgsm,pgd20)")
    parsed = [(name, parse_attack(name, threat)) for name in attacks]
    device = next(model.parameters()).device
    with torch.no_grad(), model_mode(model, True):
        width = as_logits(model(x[:1].to(device))).shape[1]
    check_labels(y, int(width), len(x))
    generator = torch.Generator(device=device).manual_seed(seed)
    robust = torch.ones(len(x), dtype=torch.bool)
    rows = []
    for name, attack in parsed:
        start = time.perf_counter()
        ok = torch.zeros(len(x), dtype=torch.bool)
        with model_mode(model, True):
            for i in range(0, len(x), batch_size):
                xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
                if attack is not None:
                    xb = attack(model, xb, yb, generator=generator, check=False)
                ok[i : i + batch_size] = (_predict(model, xb) == yb).cpu()
        robust &= ok
        rows.append(
            AttackResult(
                name,
                100.0 * float(ok.float().mean()),
                int(ok.sum()),
                len(x),
                time.perf_counter() - start,
            )
        )
    return EvalResult(threat.norm, threat.eps, rows, 100.0 * float(robust.float().mean()))
