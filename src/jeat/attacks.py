"""Threat models and the attack core.

An attack is a threat model (the set of allowed inputs: an L-inf or L2 ball intersected with the
[0, 1] box) plus a loss written through :mod:`jeat.energy` plus a number of steps::

    attack = PGD(LinfBall(8 / 255), steps=20)
    x_adv = attack(model, x, y)               # untargeted: ascend E(x', y) - E(x')
    x_tgt = attack(model, x, y, target=t)     # targeted: descend E(x', t) - E(x')

Attacks leave the model as they found it: the train/eval mode of every submodule is restored
(by default the attack itself runs in eval mode), and parameter ``.grad`` fields are untouched
(only input gradients are taken). Randomness comes from ``generator`` when one is given.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from jeat.energy import as_logits, check_labels, cross_entropy_from_logits, margin_from_logits
from jeat.errors import JeatError

__all__ = [
    "ThreatModel",
    "LinfBall",
    "L2Ball",
    "make_threat",
    "PGD",
    "FGSM",
    "LOSSES",
    "check_images",
    "model_mode",
]


def check_images(x: Tensor, what: str = "inputs") -> None:
    """Raise a clear error unless ``x`` is a float N x C x H x W batch with values in [0, 1]."""
    if not isinstance(x, Tensor):
        raise JeatError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise JeatError(
            f"{what} must be a batch of images N x C x H x W, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise JeatError(f"{what} must be floating point in [0, 1], got dtype {x.dtype}")
    if x.numel():
        lo, hi = torch.aminmax(x.detach())
        lo_v, hi_v = float(lo), float(hi)
        if not (math.isfinite(lo_v) and math.isfinite(hi_v)):
            raise JeatError(f"{what} contain NaN or inf values")
        if lo_v < -1e-6 or hi_v > 1 + 1e-6:
            raise JeatError(
                f"{what} must be pixels in [0, 1] (normalisation belongs inside the model), "
                f"got values in [{lo_v:.3g}, {hi_v:.3g}]"
            )


def _flat_norm(t: Tensor) -> Tensor:
    """Per-example L2 norm, shaped for broadcasting against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


class ThreatModel(ABC):
    """The set ``{x' : ||x' - x|| <= eps, x' in [0, 1]^d}`` with the moves PGD needs."""

    norm: str

    def __init__(self, eps: float) -> None:
        eps = float(eps)
        if not math.isfinite(eps) or eps < 0:
            raise JeatError(f"the attack budget eps must be a finite number >= 0, got {eps}")
        self.eps = eps

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
        return (x + g / _flat_norm(g).clamp_min(1e-12) * r).clamp_(0.0, 1.0)

    def step(self, x_adv: Tensor, grad: Tensor, step_size: float) -> Tensor:
        return x_adv + step_size * grad / _flat_norm(grad).clamp_min(1e-12)

    def project_delta(self, delta: Tensor) -> Tensor:
        n = _flat_norm(delta)
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


# Losses to *ascend* for an untargeted attack, per example, from logits and labels.
LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    # E(x', y) - E(x'): the cross-entropy of the true class.
    "ce": lambda logits, y: cross_entropy_from_logits(logits, y, check=False),
    # Carlini-Wagner margin max_{k != y} f_k - f_y.
    "cw": lambda logits, y: margin_from_logits(logits, y, check=False),
}


@contextmanager
def model_mode(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Run a block with ``model`` in eval mode (if asked), restoring every submodule's mode."""
    modes = [m.training for m in model.modules()]
    if eval_mode:
        model.eval()
    try:
        yield
    finally:
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode


@dataclass
class PGD:
    """Projected gradient descent with random start (Madry et al. 2018).

    ``step_size`` defaults to ``eps / 4`` (the evaluation protocol's PGD-20 setting); training
    configs usually pass ``2.5 * eps / steps``. ``restarts > 1`` keeps, per example, the first
    restart that fools the model (or the last one). With ``target`` given, the attack descends
    the loss of the target class instead of ascending that of the true class.
    """

    threat: ThreatModel
    steps: int = 20
    step_size: float | None = None
    loss: str = "ce"
    random_start: bool = True
    restarts: int = 1
    eval_mode: bool = True

    def __post_init__(self) -> None:
        if int(self.steps) != self.steps or self.steps < 1:
            raise JeatError(f"attack steps must be an integer >= 1, got {self.steps}")
        if int(self.restarts) != self.restarts or self.restarts < 1:
            raise JeatError(f"attack restarts must be an integer >= 1, got {self.restarts}")
        if self.loss not in LOSSES:
            raise JeatError(f"unknown attack loss '{self.loss}'; choose one of {', '.join(LOSSES)}")
        if self.step_size is None:
            self.step_size = self.threat.eps / 4
        if not math.isfinite(self.step_size) or self.step_size < 0:
            raise JeatError(f"attack step size must be >= 0, got {self.step_size}")

    @property
    def eps(self) -> float:
        return self.threat.eps

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None = None,
        generator: torch.Generator | None = None,
        check: bool = True,
    ) -> Tensor:
        """Return adversarial inputs for ``model`` at ``(x, y)`` (detached, same shape as x).

        ``check=False`` skips the input validation (range and label checks read values on the
        host); training loops that feed already-validated data pass it.
        """
        if check:
            check_images(x)
        labels = target if target is not None else y
        sign = -1.0 if target is not None else 1.0
        loss_fn = LOSSES[self.loss]
        x = x.detach()
        with model_mode(model, self.eval_mode), torch.enable_grad():
            if check:
                with torch.no_grad():
                    check_labels(labels, _width(model, x), x.shape[0])
            best = x.clone()
            fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            for _ in range(self.restarts):
                x_adv = self._run(model, x, labels, sign, loss_fn, generator)
                if self.restarts == 1:
                    return x_adv
                with torch.no_grad():
                    pred = _logits(model, x_adv).argmax(1)
                    now = pred == labels if target is not None else pred != labels
                    take = ~fooled
                    best[take] = x_adv[take]
                    fooled |= now
        return best

    def _run(
        self,
        model: nn.Module,
        x: Tensor,
        labels: Tensor,
        sign: float,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        generator: torch.Generator | None,
    ) -> Tensor:
        threat = self.threat
        x_adv = threat.random_init(x, generator) if self.random_start else x.clone()
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            loss = sign * loss_fn(_logits(model, x_adv), labels).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                x_adv = threat.project(threat.step(x_adv, grad, self.step_size), x)
        return x_adv.detach()


def FGSM(threat: ThreatModel, loss: str = "ce", eval_mode: bool = True) -> PGD:  # noqa: N802
    """Fast gradient sign method (Goodfellow et al. 2015): one full-size step, no random start."""
    return PGD(
        threat, steps=1, step_size=threat.eps, loss=loss, random_start=False, eval_mode=eval_mode
    )


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    return as_logits(model(x))


def _width(model: nn.Module, x: Tensor) -> int:
    """Number of logits the model returns, checking that it returns a logits matrix."""
    out = _logits(model, x[:1])
    if out.dim() != 2 or out.shape[0] != 1:
        raise JeatError(
            f"the model must return logits of shape (batch, num_classes), got {tuple(out.shape)}"
        )
    return int(out.shape[1])
