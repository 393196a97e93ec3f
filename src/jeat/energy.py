"""The energy view of a classifier: the one module every attack, objective and sampler calls.

A classifier with logits ``f(x)`` in R^K defines

* the joint energy     ``E(x, y) = -f(x)[y]``
* the marginal energy  ``E(x)    = -logsumexp_y f(x)[y]``

so that ``log p(y | x) = E(x) - E(x, y)`` and cross-entropy is the energy difference
``CE(x, y) = E(x, y) - E(x)``.

The functions come in two layers: ``*_from_logits`` work on a logits tensor (so one forward
pass serves several energies), and :class:`EnergyModel` wraps any ``nn.Module`` that returns
logits (or a tuple/dict holding them) and checks what it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from jeat.errors import JeatError

__all__ = [
    "EnergyModel",
    "joint_energy_from_logits",
    "marginal_energy_from_logits",
    "log_p_y_given_x_from_logits",
    "cross_entropy_from_logits",
    "margin_from_logits",
    "dlr_from_logits",
    "as_logits",
    "check_labels",
    "energy_model",
]


def check_labels(y: Tensor, num_classes: int, n: int | None = None) -> Tensor:
    """Validate integer labels in ``[0, num_classes)`` (and ``n`` of them); return them as int64."""
    if not isinstance(y, Tensor) or y.dim() != 1 or (n is not None and y.shape[0] != n):
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise JeatError(
            f"labels must be a 1-D integer tensor with one entry per input ({n}), got {shape}"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise JeatError(f"labels must be integers, got dtype {y.dtype}")
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise JeatError(
                f"labels must lie in [0, {num_classes - 1}] for a model with {num_classes} "
                f"outputs, got range [{lo}, {hi}]"
            )
    return y.long()


def joint_energy_from_logits(logits: Tensor, y: Tensor, check: bool = True) -> Tensor:
    """``E(x, y) = -f(x)[y]``, one value per row.

    ``check=False`` skips label validation (it reads the labels on the host); inner loops that
    validated their labels once pass it.
    """
    if check:
        y = check_labels(y, logits.shape[1], logits.shape[0])
    return -_wide(logits).gather(1, y[:, None]).squeeze(1)


def _wide(logits: Tensor) -> Tensor:
    """``logits`` in float32 or wider: every energy and loss is computed and summed there, also
    when the network ran under bf16 autocast."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


def marginal_energy_from_logits(logits: Tensor) -> Tensor:
    """``E(x) = -logsumexp_y f(x)[y]``, one value per row (computed in float32 or wider)."""
    return -torch.logsumexp(_wide(logits), dim=1)


def log_p_y_given_x_from_logits(logits: Tensor, y: Tensor, check: bool = True) -> Tensor:
    """``log p(y | x) = E(x) - E(x, y)``."""
    return marginal_energy_from_logits(logits) - joint_energy_from_logits(logits, y, check)


def cross_entropy_from_logits(logits: Tensor, y: Tensor, check: bool = True) -> Tensor:
    """Per-example cross-entropy, the energy difference ``E(x, y) - E(x)``.

    Computed with PyTorch's fused log-softmax + NLL kernel (in float32 or wider), which equals
    ``joint_energy_from_logits(logits, y) - marginal_energy_from_logits(logits)`` (a test checks
    the identity) and costs fewer kernels in the attack loops that call it at every step.
    """
    if check:
        y = check_labels(y, logits.shape[1], logits.shape[0])
    return nn.functional.cross_entropy(_wide(logits), y, reduction="none")


def margin_from_logits(logits: Tensor, y: Tensor, check: bool = True) -> Tensor:
    """CW margin ``max_{k != y} f(x)[k] - f(x)[y] = E(x, y) - min_{k != y} E(x, k)``.

    Positive exactly when the input is misclassified.
    """
    if check:
        y = check_labels(y, logits.shape[1], logits.shape[0])
    logits = _wide(logits)
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.max(dim=1).values - true


def dlr_from_logits(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Difference-of-logits-ratio loss (Croce & Hein 2020), one value per row, to *ascend*.

    Untargeted: ``-(z_y - max_{k != y} z_k) / (z_(1) - z_(3))`` with ``z_(i)`` the i-th largest
    logit; targeted toward ``t``: ``-(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2)``. The ratio is
    invariant to shifting and scaling the logits, which is what makes it robust to models that
    saturate the cross-entropy. Needs 3 classes (4 for the targeted form).
    """
    k = logits.shape[1]
    need = 3 if target is None else 4
    if k < need:
        raise JeatError(
            f"the DLR loss needs at least {need} classes"
            f"{' for a targeted attack' if target is not None else ''}, the model has {k}"
        )
    z = _wide(logits)
    srt = z.sort(dim=1, descending=True).values
    true = z.gather(1, y[:, None]).squeeze(1)
    if target is None:
        others = z.masked_fill(nn.functional.one_hot(y, k).bool(), float("-inf"))
        return -(true - others.max(dim=1).values) / (srt[:, 0] - srt[:, 2] + 1e-12)
    tgt = z.gather(1, target[:, None]).squeeze(1)
    return -(true - tgt) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)


def as_logits(output: Any) -> Tensor:
    """Extract a logits tensor from a model output: a tensor, a tuple/list (first element) or a
    dict (key ``"logits"``). Integer or boolean outputs (votes, one-hot labels) become float32:
    scores with no gradient, which every loss and attack reads as such."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        output = output[0]
    elif isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        output = output["logits"]
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else output.float()
    raise JeatError(
        f"the model returned {type(output).__name__}, not logits; return a tensor of shape "
        "(batch, num_classes), or wrap the model with EnergyModel(model, output_fn=...)"
    )


class EnergyModel(nn.Module):
    """Wraps a classifier so that its energies are one call away.

    ``num_classes`` (optional) is checked against the width of the logits, so a model of the
    wrong width fails with a clear message instead of a shape error deep inside an attack.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int | None = None,
        output_fn: Callable[[Any], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.output_fn = output_fn or as_logits

    def forward(self, x: Tensor) -> Tensor:
        logits = self.output_fn(self.model(x))
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise JeatError(
                f"the model must return logits of shape (batch, num_classes); for a batch of "
                f"{x.shape[0]} it returned shape {tuple(logits.shape)}"
            )
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise JeatError(
                f"the model returns {logits.shape[1]} logits but the data has "
                f"{self.num_classes} classes; use a model built for this dataset"
            )
        return logits

    def joint(self, x: Tensor, y: Tensor) -> Tensor:
        """``E(x, y)``."""
        return joint_energy_from_logits(self(x), y)

    def marginal(self, x: Tensor) -> Tensor:
        """``E(x)``."""
        return marginal_energy_from_logits(self(x))

    def log_p_y_given_x(self, x: Tensor, y: Tensor) -> Tensor:
        """``log p(y | x)``."""
        return log_p_y_given_x_from_logits(self(x), y)

    def cross_entropy(self, x: Tensor, y: Tensor) -> Tensor:
        """``CE(x, y) = E(x, y) - E(x)`` per example."""
        return cross_entropy_from_logits(self(x), y)


def energy_model(model: nn.Module, num_classes: int | None = None) -> EnergyModel:
    """Return ``model`` as an :class:`EnergyModel` (unchanged if it already is one)."""
    if isinstance(model, EnergyModel):
        if num_classes is not None and model.num_classes is None:
            model.num_classes = num_classes
        return model
    return EnergyModel(model, num_classes=num_classes)
