"""What every attack shares: input checks, the model-mode guard (eval mode, frozen parameters)
and the logits adapter.

An attack is any callable ``attack(model, x, y, generator=None, check=True) -> x_adv`` that
returns a detached batch of the same shape in [0, 1] and leaves the model as it found it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor, nn

from jeat.energy import as_logits, check_labels
from jeat.errors import JeatError

__all__ = ["Attack", "check_images", "model_mode", "logits_of", "model_width", "LogitsModel"]


class Attack(Protocol):
    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        check: bool = True,
    ) -> Tensor: ...


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


@contextmanager
def model_mode(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Run a block with ``model`` in eval mode (if asked) and its parameters frozen, restoring
    every submodule's mode and every parameter's ``requires_grad`` afterwards.

    Attacks, samplers and evaluations run inside it: they differentiate with respect to their
    inputs only. Frozen parameters make that hold under ``torch.compile`` too, whose compiled
    backward (AOTAutograd) computes the gradient of every input that requires one, whatever
    ``torch.autograd.grad`` asks for: without this, each attack step of a compiled model would
    also compute, and throw away, every weight gradient. It also keeps a ``.backward()`` inside a
    reference attack from accumulating into the parameters' ``.grad``.
    """
    modes = [m.training for m in model.modules()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if eval_mode:
        model.eval()
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode
        for p in trainable:
            p.requires_grad_(True)


def checked_inputs(model: nn.Module, x: Tensor, y: Tensor, check: bool = True) -> Tensor:
    """An attack's inputs, detached, after the checks every attack runs when ``check`` is on:
    images in [0, 1], labels within the model's classes (one eval-mode forward to read them)."""
    if check:
        check_images(x)
    x = x.detach()
    if check and len(x):
        with model_mode(model, True), torch.no_grad():
            check_labels(y, model_width(model, x), len(x))
    return x


def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    """The model's logits for ``x`` (tuple and dict outputs are adapted by ``as_logits``)."""
    return as_logits(model(x))


def model_width(model: nn.Module, x: Tensor, num_classes: int | None = None) -> int:
    """Number of logits the model returns, checking that it returns a logits matrix (and, when
    ``num_classes`` is given, that it has exactly that many columns)."""
    with torch.no_grad():
        out = logits_of(model, x[:1])
    if out.dim() != 2 or out.shape[0] != 1:
        raise JeatError(
            f"the model must return logits of shape (batch, num_classes), got {tuple(out.shape)}"
        )
    width = int(out.shape[1])
    if num_classes is not None and width != num_classes:
        raise JeatError(f"the model returns {width} logits but the data has {num_classes} classes")
    return width


class LogitsModel(nn.Module):
    """Adapter for libraries that call ``model(x)`` and expect a logits tensor in float32.

    Outputs with no graph to an input that requires a gradient (a model that detaches its
    logits, computes them under ``no_grad`` or returns integers) are tied to the input with an
    exactly zero gradient, so a reference attack that differentiates them sees zeros, as
    jeat's own attacks do, instead of failing inside autograd."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = logits_of(self.model, x).float()
        if torch.is_grad_enabled() and x.requires_grad and not out.requires_grad:
            out = out + 0.0 * x.flatten(1).sum(1, keepdim=True)
        return out
