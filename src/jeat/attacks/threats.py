"""Threat models: the set of inputs an attacker may choose, with the moves PGD needs.

``LinfBall`` and ``L2Ball`` are ``{x' : ||x' - x|| <= eps} ∩ [0, 1]^d``. ``Occlusion`` is a
rectangle per image whose pixels may take any value in [0, 1] (the ROA threat model); it is
placed by :class:`jeat.attacks.ROA` before PGD runs inside it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from jeat.errors import JeatError

__all__ = ["ThreatModel", "LinfBall", "L2Ball", "make_threat", "flat_norm"]


def flat_norm(t: Tensor) -> Tensor:
    """Per-example L2 norm, shaped for broadcasting against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


class ThreatModel(ABC):
    """The set ``{x' : ||x' - x|| <= eps, x' in [0, 1]^d}`` with the moves PGD needs."""

    norm: str
    # True when every move acts on each example alone from ``x`` and ``eps`` (no per-example
    # state in the threat), so that PGD may drop rows from its working batch mid-attack.
    rowwise: bool = True

    def __init__(self, eps: float) -> None:
        eps = float(eps)
        if not math.isfinite(eps) or eps < 0:
            raise JeatError(f"the attack budget eps must be a finite number >= 0, got {eps}")
        self.eps = eps

    @property
    def default_step_size(self) -> float:
        """PGD's default step: eps / 4 (the evaluation protocol's PGD-20 setting)."""
        return self.eps / 4

    @abstractmethod
    def random_init(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """A random point of the threat set around ``x``."""

    @abstractmethod
    def step(self, x_adv: Tensor, grad: Tensor, step_size: float) -> Tensor:
        """One steepest-ascent step of length ``step_size`` in this norm."""

    @abstractmethod
    def project_delta(self, delta: Tensor) -> Tensor:
        """Project a perturbation onto the eps-ball."""

    @abstractmethod
    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per-example distance in this norm."""

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Project onto the eps-ball around ``x`` intersected with the [0, 1] box."""
        return (x + self.project_delta(x_adv - x)).clamp_(0.0, 1.0)

    def bounds(self, x: Tensor) -> object:
        """Whatever :meth:`advance` can precompute once per attack from the clean ``x``."""
        return None

    def advance(
        self, x_adv: Tensor, grad: Tensor, step_size: float, x: Tensor, bounds: object = None
    ) -> Tensor:
        """The PGD update: :meth:`step` then :meth:`project`. It may write into ``x_adv``
        (which the attack loops own) and returns the new iterate; ``bounds`` is what
        :meth:`bounds` gave for ``x``."""
        return self.project(self.step(x_adv, grad, step_size), x)

    def with_eps(self, eps: float) -> ThreatModel:
        """The same kind of threat with another budget."""
        return type(self)(eps)

    def describe(self) -> str:
        return f"{self.norm} {self.eps:.4g}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:g})"


class LinfBall(ThreatModel):
    norm = "linf"

    def random_init(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + (2 * u - 1) * self.eps).clamp_(0.0, 1.0)

    def step(self, x_adv: Tensor, grad: Tensor, step_size: float) -> Tensor:
        return x_adv + step_size * grad.sign()

    def project_delta(self, delta: Tensor) -> Tensor:
        return delta.clamp(-self.eps, self.eps)

    def bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The per-pixel box ``[max(x - eps, 0), min(x + eps, 1)]``: the L-inf ball intersected
        with [0, 1], so a projection is one clamp."""
        return (x - self.eps).clamp_(min=0.0), (x + self.eps).clamp_(max=1.0)

    def advance(
        self, x_adv: Tensor, grad: Tensor, step_size: float, x: Tensor, bounds: object = None
    ) -> Tensor:
        # In place, in three kernels (sign, add, clamp) instead of the seven of step + project.
        lo, hi = bounds if bounds is not None else self.bounds(x)  # type: ignore[misc]
        return x_adv.add_(grad.sign(), alpha=step_size).clamp_(min=lo, max=hi)

    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        return (x_adv - x).flatten(1).abs().amax(dim=1)


class L2Ball(ThreatModel):
    norm = "l2"

    def random_init(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        # Uniform in the ball: Gaussian direction, radius eps * U^(1/d).
        d = x[0].numel()
        g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        u = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
        r = (self.eps * u.pow(1.0 / d)).view(-1, *([1] * (x.dim() - 1)))
        return (x + g / flat_norm(g).clamp_min(1e-12) * r).clamp_(0.0, 1.0)

    def step(self, x_adv: Tensor, grad: Tensor, step_size: float) -> Tensor:
        return x_adv + step_size * grad / flat_norm(grad).clamp_min(1e-12)

    def project_delta(self, delta: Tensor) -> Tensor:
        n = flat_norm(delta)
        return delta * torch.clamp(self.eps / n.clamp_min(1e-12), max=1.0)

    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        return (x_adv - x).flatten(1).norm(dim=1)


_THREATS: dict[str, type[ThreatModel]] = {"linf": LinfBall, "l2": L2Ball}


def make_threat(norm: str, eps: float) -> ThreatModel:
    key = norm.lower().replace("-", "").replace("_", "")
    key = {"inf": "linf", "linfinity": "linf"}.get(key, key)
    if key not in _THREATS:
        raise JeatError(f"unknown threat model '{norm}'; choose one of {', '.join(_THREATS)}")
    return _THREATS[key](eps)
