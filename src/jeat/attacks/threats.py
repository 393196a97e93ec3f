"""Threat models: the set of inputs an attacker may choose, with the moves PGD needs.

``LinfBall`` and ``L2Ball`` are ``{x' : ||x' - x|| <= eps} ∩ [0, 1]^d``. ``Occlusion`` is a
rectangle per image whose pixels may take any value in [0, 1] (the ROA threat model); it is
placed by :class:`jeat.attacks.ROA` before PGD runs inside it.

Budgets are in [0, 1] pixel units, so some are never meant: an L-inf budget above 1 (the whole
pixel range: ``8`` was meant as ``8/255``), an L2 budget above the diameter ``sqrt(C*H*W)`` of
the image cube. :func:`check_budget` refuses them where a budget is read (the command line,
configs, attack options); :class:`LinfBall` refuses the first itself.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from jeat.errors import JeatError

__all__ = [
    "ThreatModel",
    "LinfBall",
    "L2Ball",
    "make_threat",
    "flat_norm",
    "check_budget",
    "check_step_size",
]


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

    def __init__(self, eps: float) -> None:
        super().__init__(eps)
        check_budget("linf", self.eps, what="the L-inf budget eps")

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


def _norm_key(norm: str) -> str:
    key = str(norm).lower().replace("-", "").replace("_", "")
    return {"inf": "linf", "linfinity": "linf"}.get(key, key)


def make_threat(norm: str, eps: float) -> ThreatModel:
    key = _norm_key(norm)
    if key not in _THREATS:
        raise JeatError(f"unknown threat model '{norm}'; choose one of {', '.join(_THREATS)}")
    return _THREATS[key](eps)


def _meant(value: float, limit: float) -> str:
    """The likely intent of a budget in grey levels (``8`` for ``8/255``)."""
    if value / 255 <= limit:
        return f"; for {value:g} grey levels write {value:g}/255"
    return ""


def _limit(norm: str, shape: Sequence[int] | None) -> tuple[float, str] | None:
    """The largest budget that means something under ``norm``, and what it is."""
    key = _norm_key(norm)
    if key == "linf":
        return 1.0, "an L-inf {what} above 1, the whole [0, 1] pixel range"
    if key == "l2" and shape is not None:
        d = math.sqrt(math.prod(int(s) for s in shape))
        size = "x".join(str(int(s)) for s in shape)
        return d, f"an L2 {{what}} above {d:.4g}, the diameter of {size} images in [0, 1]"
    return None


def check_budget(
    norm: str, eps: float, shape: Sequence[int] | None = None, what: str = "eps"
) -> float:
    """``eps`` as a float when it is a budget someone meant for images in [0, 1] under
    ``norm`` (with images of ``shape``, C x H x W, when known); otherwise a :class:`JeatError`
    naming ``what`` and the likely intent: a negative budget, an L-inf budget above 1, an L2
    budget above the image cube's diameter ``sqrt(C*H*W)``."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise JeatError(f"{what} must be a number, got {eps!r}")
    value = float(eps)
    if not math.isfinite(value) or value < 0:
        raise JeatError(f"{what} must be a finite number >= 0, got {eps}")
    limit = _limit(norm, shape)
    if limit is not None and value > limit[0]:
        raise JeatError(
            f"{what} = {value:g} is {limit[1].format(what='budget')}, never a meant budget: "
            f"budgets are in [0, 1] pixel units{_meant(value, limit[0])}"
        )
    return value


def check_step_size(
    norm: str | None,
    step: float,
    eps: float,
    shape: Sequence[int] | None = None,
    what: str = "step",
) -> float:
    """An attack's step size as a float: > 0 (0 only in a zero budget, where no step moves),
    and, for a step someone wrote under ``norm`` (None: no bound), within the same bounds as a
    budget (an L-inf step above 1 crosses the whole pixel range: ``2`` was meant as
    ``2/255``)."""
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        raise JeatError(f"{what} must be a number, got {step!r}")
    value = float(step)
    if not math.isfinite(value) or value < 0 or (value == 0 and eps > 0):
        raise JeatError(f"{what} must be a number > 0, got {step}")
    limit = None if norm is None else _limit(norm, shape)
    if limit is not None and value > limit[0]:
        raise JeatError(
            f"{what} = {value:g} is {limit[1].format(what='step')}, never a meant step: "
            f"steps are in [0, 1] pixel units{_meant(value, limit[0])}"
        )
    return value
