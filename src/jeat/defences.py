"""Test-time defences as model wrappers, and the evaluation zoo's deliberately broken models.

Each wrapper takes a classifier (images in [0, 1] -> logits) and is one again, so every attack,
the robustness table and ``jeat eval --defence SPEC`` run on it unchanged:

* :class:`GaussianNoise` ``noise:sigma=S``: fresh ``N(0, S^2)`` noise on the input at every
  forward pass, clamped to [0, 1] (blind, randomised). Differentiable; its randomness calls
  for EOT (average the gradient over draws).
* :class:`Purify` ``purify:steps=K:step_size=A:noise=B``: JEM-style purification, ``K`` SGLD
  steps descending the marginal energy ``E(x) = -logsumexp f(x)`` from the input (clamped to
  [0, 1]), then classify. As deployed, the chain has no graph to the input: gradient attacks
  see zero input gradients and must use BPDA (identity backward through the purifier) plus
  EOT (the chain is random). ``differentiable=1`` unrolls the chain instead (second-order
  gradients through all ``K`` steps).
* :class:`Quantize` ``quantize:levels=L``: rounds every pixel to ``L`` grey levels
  (``torch.round``: zero gradient almost everywhere); BPDA = identity backward.
* :class:`MedianFilter` ``median:size=S``: per-channel ``S x S`` median smoothing computed
  without a graph to the input (a non-differentiable preprocessing step); BPDA = identity.

The zoo of broken defences, for testing evaluation tools (they *hide* gradients rather than
add robustness; a correct evaluation must see through them):

* :class:`SoftmaxOutput` ``softmax``: returns probabilities instead of logits, so the attack
  losses that expect logits saturate (BPDA: the softmax is differentiated as the identity);
* :class:`GradientZero` ``zero-grad`` (a :class:`ZeroGrad` layer in front of the model):
  identity forward, zero backward (BPDA: identity backward);
* ``purify`` (detached chain), ``quantize`` and ``noise`` above double as the zoo's
  purification, quantisation and noise-injection models.

**Gradients without BPDA.** A step with no graph to the input still returns outputs that depend
on the input, with an exactly zero gradient: the preprocessed value enters as
``pre.detach() + 0 * x``. So ``torch.autograd.grad(loss, x)`` returns zeros (no error about an
unused input or an output that does not require grad) and ``loss.backward()`` works: a
gradient attack runs and stalls, as it does against the published defence.

**BPDA.** Every wrapper with a non-differentiable or gradient-hiding step sets the class
attribute ``bpda_capable = True`` and has a boolean ``bpda`` attribute;
:func:`jeat.models.bpda` switches all of them (and k-WTA layers) for the length of a block, so
the attack option ``pgd20:bpda=1`` works on them. Under BPDA the forward pass is unchanged and
the backward pass is the identity: the step enters as ``x + (pre - x).detach()``, so the input
gradient is the inner model's gradient at the preprocessed point.

Randomness (noise, SGLD) comes from the global torch RNG on the input's device, so repeated
forward passes differ; seed it (``torch.manual_seed``) for a repeatable draw.

:func:`wrap` builds wrappers from the spec language (comma list, applied innermost first);
:func:`describe` lists the defences of a wrapped model in the same language.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from jeat.energy import as_logits, marginal_energy_from_logits
from jeat.errors import JeatError
from jeat.samplers import SGLD

__all__ = [
    "Defence",
    "GaussianNoise",
    "Purify",
    "Quantize",
    "MedianFilter",
    "SoftmaxOutput",
    "ZeroGrad",
    "GradientZero",
    "DefenceSpec",
    "DEFENCES",
    "parse_defence",
    "parse_defences",
    "wrap",
    "describe",
    "list_defences",
    "median_filter",
]


def _hidden(x: Tensor, value: Tensor) -> Tensor:
    """``value`` (no graph of its own) as a function of ``x`` with an exactly zero gradient."""
    return value.detach() + 0.0 * x


def _straight_through(x: Tensor, value: Tensor) -> Tensor:
    """BPDA: the forward value is ``value``, the backward pass the identity."""
    return x + (value - x).detach()


class Defence(nn.Module):
    """A classifier wrapper: ``forward(x)`` classifies ``x`` through the wrapped ``model`` with a
    test-time step in front (or behind). ``kind`` is its name in the spec language and
    :meth:`options` its settings; ``randomised`` says whether repeated forward passes differ
    (attack with EOT); ``bpda_capable`` whether it has a BPDA switch (``bpda``)."""

    kind: ClassVar[str] = ""
    randomised: ClassVar[bool] = False
    bpda_capable: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise JeatError(f"a defence wraps a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.training = model.training  # a wrapper starts in the mode of what it wraps
        if self.bpda_capable:
            self.bpda = False

    def options(self) -> dict[str, Any]:
        return {}

    @property
    def spec(self) -> str:
        """This wrapper in the spec language, e.g. ``quantize:levels=4``."""
        parts = [self.kind] + [f"{k}={_fmt(v)}" for k, v in self.options().items()]
        return ":".join(parts)

    def extra_repr(self) -> str:
        return self.spec


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)  # floats round-trip


def _number(value: Any, what: str, low: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JeatError(f"{what} must be a number, got {value!r}")
    if value < low or (strict and value == low):
        raise JeatError(f"{what} must be {'>' if strict else '>='} {low:g}, got {value}")
    return float(value)


def _integer(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise JeatError(f"{what} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise JeatError(f"{what} must be an integer >= {low}, got {value}")
    return int(value)


def _switch(value: Any, what: str) -> bool:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise JeatError(f"{what} must be 0 or 1, got {value!r}")


class GaussianNoise(Defence):
    """Blind noise: ``model(clamp(x + sigma * N(0, I), 0, 1))`` with a fresh draw at every
    forward pass. Differentiable; attack it with EOT (the gradient averaged over draws)."""

    kind = "noise"
    randomised = True

    def __init__(self, model: nn.Module, sigma: float = 0.1) -> None:
        super().__init__(model)
        self.sigma = _number(sigma, "noise: sigma", 0.0)

    def options(self) -> dict[str, Any]:
        return {"sigma": self.sigma}

    def preprocess(self, x: Tensor) -> Tensor:
        return (x + self.sigma * torch.randn_like(x)).clamp(0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.preprocess(x))


class Purify(Defence):
    """JEM-style purification: ``steps`` SGLD steps on ``E(x) = -logsumexp f(x)`` of the wrapped
    model, started at the input and clamped to [0, 1] (:class:`jeat.samplers.SGLD`; defaults are
    its JEM settings in pixel units), then classify the purified input.

    ``differentiable=False`` (the default, and how purification defences are deployed): the
    chain has no graph to the input; the input gradient is exactly zero (see the module notes),
    so evaluate it with BPDA (``bpda``: identity backward through the purifier) and EOT.
    ``differentiable=True`` unrolls the chain: the gradient flows through every SGLD step
    (second-order, ``create_graph``), at about ``steps`` times the memory. The unrolled chain
    is the true gradient, so it takes precedence over ``bpda``; :func:`jeat.models.unrolled`
    (the attack option ``unroll=1``) switches it on for the length of an attack.
    """

    kind = "purify"
    randomised = True
    bpda_capable = True
    unrollable: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        steps: int = 10,
        step_size: float = SGLD.step_size,
        noise: float = SGLD.noise,
        differentiable: bool = False,
    ) -> None:
        super().__init__(model)
        self.steps = _integer(steps, "purify: steps", 1)
        self.step_size = _number(step_size, "purify: step_size", 0.0)
        self.noise = _number(noise, "purify: noise", 0.0)
        self.differentiable = _switch(differentiable, "purify: differentiable")

    def options(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "step_size": self.step_size,
            "noise": self.noise,
            "differentiable": self.differentiable,
        }

    def preprocess(self, x: Tensor) -> Tensor:
        """The purified input, with no graph to ``x``."""
        sampler = SGLD(steps=self.steps, step_size=self.step_size, noise=self.noise)
        return sampler(self.model, x.detach())

    def _unrolled(self, x: Tensor) -> Tensor:
        """The chain with its graph to ``x`` (every step's gradient taken with create_graph)."""
        with torch.enable_grad():
            for _ in range(self.steps):
                energy = marginal_energy_from_logits(as_logits(self.model(x))).sum()
                (grad,) = torch.autograd.grad(energy, x, create_graph=True)
                noise = torch.randn_like(x)
                x = (x - self.step_size * grad + self.noise * noise).clamp(0.0, 1.0)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if self.differentiable and x.requires_grad and torch.is_grad_enabled():
            return self.model(self._unrolled(x))
        pure = self.preprocess(x)
        return self.model(_straight_through(x, pure) if self.bpda else _hidden(x, pure))


class Quantize(Defence):
    """Input quantisation: every pixel rounded to the nearest of ``levels`` evenly spaced grey
    levels ``0, 1/(L-1), ..., 1``. ``torch.round`` has a zero gradient almost everywhere; under
    BPDA the rounding is differentiated as the identity."""

    kind = "quantize"
    bpda_capable = True

    def __init__(self, model: nn.Module, levels: int = 4) -> None:
        super().__init__(model)
        self.levels = _integer(levels, "quantize: levels", 2)

    def options(self) -> dict[str, Any]:
        return {"levels": self.levels}

    def preprocess(self, x: Tensor) -> Tensor:
        steps = self.levels - 1
        return torch.round(x.clamp(0.0, 1.0) * steps) / steps

    def forward(self, x: Tensor) -> Tensor:
        pre = self.preprocess(x)
        return self.model(_straight_through(x, pre) if self.bpda else pre)


def median_filter(x: Tensor, size: int) -> Tensor:
    """Per-channel ``size x size`` median of an N x C x H x W batch (``size`` odd), with the
    border replicated (``replicate`` padding), same shape as ``x``."""
    pad = size // 2
    n, c, h, w = x.shape
    padded = nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    patches = padded.unfold(2, size, 1).unfold(3, size, 1)  # N x C x H x W x size x size
    return patches.reshape(n, c, h, w, size * size).median(dim=-1).values


class MedianFilter(Defence):
    """Median smoothing (``size x size``, per channel, border replicated), computed without a
    graph to the input: a non-differentiable preprocessing step whose input gradient is zero;
    under BPDA it is differentiated as the identity."""

    kind = "median"
    bpda_capable = True

    def __init__(self, model: nn.Module, size: int = 3) -> None:
        super().__init__(model)
        self.size = _integer(size, "median: size", 1)
        if self.size % 2 == 0:
            raise JeatError(f"median: size must be odd (3, 5, ...), got {self.size}")

    def options(self) -> dict[str, Any]:
        return {"size": self.size}

    def preprocess(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return median_filter(x.detach(), self.size)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.preprocess(x)
        return self.model(_straight_through(x, pre) if self.bpda else _hidden(x, pre))


class SoftmaxOutput(Defence):
    """Zoo (broken on purpose): returns the wrapped model's probabilities instead of its logits.
    Attack losses that expect logits see a saturated softmax (vanishing gradients on confident
    points). Under BPDA the softmax is differentiated as the identity, so the loss's gradient
    reaches the logits unchanged."""

    kind = "softmax"
    bpda_capable = True

    def forward(self, x: Tensor) -> Tensor:
        logits = as_logits(self.model(x))
        probs = torch.softmax(logits, dim=1)
        return _straight_through(logits, probs) if self.bpda else probs


class ZeroGrad(nn.Module):
    """Zoo layer (broken on purpose): identity forward, exactly zero backward; under BPDA the
    backward pass is the identity too."""

    bpda_capable: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.bpda = False

    def forward(self, x: Tensor) -> Tensor:
        return x if self.bpda else _hidden(x, x)


class GradientZero(Defence):
    """Zoo (broken on purpose): a :class:`ZeroGrad` layer in front of the model, so every input
    gradient is zero while the predictions are the model's own. ``bpda`` switches the layer."""

    kind = "zero-grad"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.zero = ZeroGrad().train(model.training)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.zero(x))


@dataclass(frozen=True)
class _Entry:
    build: Callable[..., Defence]
    options: dict[str, Any]
    description: str


DEFENCES: dict[str, _Entry] = {
    "noise": _Entry(
        GaussianNoise, {"sigma": 0.1}, "Gaussian input noise, fresh at every forward (EOT)"
    ),
    "purify": _Entry(
        Purify,
        {"steps": 10, "step_size": SGLD.step_size, "noise": SGLD.noise, "differentiable": 0},
        "JEM-style SGLD purification on E(x), detached chain (BPDA + EOT)",
    ),
    "quantize": _Entry(Quantize, {"levels": 4}, "round pixels to `levels` grey levels (BPDA)"),
    "median": _Entry(MedianFilter, {"size": 3}, "size x size median filter, no gradient (BPDA)"),
    "softmax": _Entry(SoftmaxOutput, {}, "zoo: probabilities instead of logits (BPDA)"),
    "zero-grad": _Entry(GradientZero, {}, "zoo: identity forward, zero input gradient (BPDA)"),
}


def list_defences() -> dict[str, tuple[str, dict[str, Any]]]:
    """Defence name -> (description, options with defaults)."""
    return {k: (e.description, dict(e.options)) for k, e in DEFENCES.items()}


@dataclass
class DefenceSpec:
    """A parsed defence: ``kind`` and the options given (the rest take their defaults)."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, model: nn.Module) -> Defence:
        return DEFENCES[self.kind].build(model, **self.options)


def parse_defence(text: str) -> DefenceSpec:
    """Parse one defence, e.g. ``noise:sigma=0.1``, ``purify:steps=10``, ``softmax``."""
    from jeat.config import parse_value

    if not isinstance(text, str) or not text.strip():
        raise JeatError("empty defence; use e.g. quantize:levels=4 (see jeat.defences)")
    head, *opts = text.strip().split(":")
    kind = head.strip().lower().replace("_", "-")
    if kind not in DEFENCES:
        raise JeatError(f"unknown defence '{head}'; known: {', '.join(DEFENCES)}")
    allowed = DEFENCES[kind].options
    options: dict[str, Any] = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip():
            raise JeatError(f"defence option '{opt}' in '{text}' is not KEY=VALUE")
        if key not in allowed:
            accepted = ", ".join(sorted(allowed)) or "none"
            raise JeatError(f"defence '{kind}' has no option '{key}'; it takes {accepted}")
        options[key] = parse_value(value.strip())
    spec = DefenceSpec(kind, options)
    spec.build(nn.Identity())  # validate the values now, before any model is loaded
    return spec


def parse_defences(specs: str | Sequence[str] | None) -> list[DefenceSpec]:
    """Parse a comma list (or a list of comma lists, e.g. a repeated ``--defence``)."""
    if specs is None:
        return []
    items = [specs] if isinstance(specs, str) else list(specs)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise JeatError(f"a defence spec is text like quantize:levels=4, got {item!r}")
        out += [parse_defence(part) for part in item.split(",") if part.strip()]
    if items and not out:
        raise JeatError("empty defence; use e.g. quantize:levels=4 (see jeat.defences)")
    return out


def wrap(model: nn.Module, specs: str | Sequence[str] | Sequence[DefenceSpec] | None) -> nn.Module:
    """``model`` wrapped in the defences ``specs`` names, the first innermost (next to the
    model): ``wrap(m, "median:size=3,noise:sigma=0.1")`` adds noise, then median-filters, then
    classifies. Each wrapper starts in the train/eval mode of the model it wraps."""
    if not isinstance(model, nn.Module):
        raise JeatError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if specs is None or isinstance(specs, str):
        parsed = parse_defences(specs)
    else:
        items = list(specs)
        if items and all(isinstance(s, DefenceSpec) for s in items):
            parsed = items  # type: ignore[assignment]
        else:
            parsed = parse_defences(items)  # type: ignore[arg-type]
    for spec in parsed:
        model = spec.build(model)
    return model


def describe(model: nn.Module) -> list[str]:
    """The defences wrapped around ``model`` (outermost wrappers only, stopping at the first
    module that is not a :class:`Defence`), innermost first, in the spec language."""
    out = []
    while isinstance(model, Defence):
        out.append(model.spec)
        model = model.model
    return out[::-1]
