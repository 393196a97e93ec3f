"""Transfer (black-box) attacks: craft on a source model, evaluate on another, with SGM.

A transfer attack never touches the target's gradients: adversarial examples are crafted by a
white-box attack on a *source* model the attacker owns and then fed to the *target*::

    source, _, _ = load_trained("runs/digits-source")     # jeat train --config digits-source
    attack = SGM(source, LinfBall(0.15))            # or Transfer(source, PGD(...), gamma=1.0)
    x_adv = attack(target, x, y)                    # target only checked, never differentiated
    acc = (target(x_adv).argmax(1) == y).float().mean()

The Skip Gradient Method (SGM) of Wu, Wang, Xia, Bailey & Ma, "Skip connections matter: on the
transferability of adversarial examples generated with ResNets" (ICLR 2020,
https://openreview.net/forum?id=BJlRs34Fvr) makes the examples transfer better by crafting them
with gradients that favour the skip connections of a ResNet-like source: in a block
``z_{i+1} = z_i + f_i(z_i)`` the backward pass uses ``1 + gamma * df_i/dz_i`` instead of
``1 + df_i/dz_i`` (``0 < gamma <= 1``), so the input gradient weights the path through ``k``
residual branches by ``gamma^k``. The forward pass is untouched. :func:`skip_gradient` does
this for any model with a gradient hook on the output of each residual branch.

The reference implementation scales the gradient at the ReLU inside each torchvision residual
module (with the square root of gamma for two-ReLU bottlenecks) and divides block-output
gradients by their standard deviation for numerical range; here the gradient is scaled once at
the end of each branch, which is the same per-block factor, and no rescaling is needed because
the L-inf (sign) and L2 (normalised) steps ignore a positive scale of the whole gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from jeat.attacks.base import check_images, model_mode, model_width
from jeat.attacks.pgd import PGD
from jeat.attacks.threats import ThreatModel
from jeat.energy import check_labels
from jeat.errors import JeatError

__all__ = ["skip_gradient", "residual_branches", "Transfer", "SGM"]


def _check_gamma(gamma: object) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise JeatError(f"SGM gamma must be a number in (0, 1], got {gamma!r}")
    value = float(gamma)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise JeatError(
            f"SGM gamma must be in (0, 1] (1 = plain gradient, 0.2-0.5 typical), got {gamma}"
        )
    return value


def residual_branches(model: nn.Module) -> list[nn.Module]:
    """The last module of the residual branch of every :class:`jeat.models.PreActBlock` in
    ``model`` (its ``conv2``), in forward order."""
    from jeat.models import PreActBlock  # models imports nothing from attacks; kept local

    return [m.conv2 for m in model.modules() if isinstance(m, PreActBlock)]


def _resolve_branches(model: nn.Module, branches: Iterable[nn.Module] | None) -> list[nn.Module]:
    if branches is None:
        found = residual_branches(model)
    else:
        found = list(branches)
        members = {id(m) for m in model.modules()}
        for b in found:
            if not isinstance(b, nn.Module):
                raise JeatError(
                    f"SGM branches must be modules of the source model, got {type(b).__name__}"
                )
            if id(b) not in members:
                raise JeatError(
                    f"SGM branch {type(b).__name__} is not a submodule of the source model; pass "
                    "the last module of each residual branch of the model being attacked"
                )
        if len({id(b) for b in found}) != len(found):
            raise JeatError("SGM branches list the same module twice")
    if not found:
        raise JeatError(
            f"SGM needs a ResNet-like source model with residual blocks, but none were found in "
            f"{type(model).__name__} (no jeat PreActBlock); for another architecture pass "
            "branches=[the last module of each residual branch]"
        )
    return found


@contextmanager
def skip_gradient(
    model: nn.Module, gamma: float, branches: Iterable[nn.Module] | None = None
) -> Iterator[list[nn.Module]]:
    """While active, multiply the gradient flowing back through every residual branch of
    ``model`` by ``gamma`` (the Skip Gradient Method); forward outputs are bit-identical.

    ``branches`` are the modules whose outputs end a residual branch (default: the ``conv2``
    of every :class:`jeat.models.PreActBlock`, whose block returns ``conv2(...) + skip``). For
    another ResNet pass, e.g., each torchvision BasicBlock's ``bn2``; in-place additions after
    the branch (``out += identity``) are fine. Each branch module must be called once per block
    and only inside the residual branch (a module shared with the skip path, such as
    torchvision's single ``relu``, is the wrong choice). The gradient scaling is attached to
    graphs built inside the block; the hooks are removed on exit, also after an exception.
    Yields the list of hooked modules.
    """
    gamma = _check_gamma(gamma)
    found = _resolve_branches(model, branches)
    handles: list[RemovableHandle] = []

    def scale(grad: Tensor) -> Tensor:
        return grad * gamma

    def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        if not isinstance(output, Tensor):
            raise JeatError(
                f"SGM branch {type(module).__name__} must return a tensor, got "
                f"{type(output).__name__}; hook the module that ends the residual branch"
            )
        # A tensor hook leaves the forward value alone (no new tensor), and one registered
        # before an in-place op still sees the gradient of the pre-op value.
        if output.requires_grad and gamma != 1.0:
            output.register_hook(scale)

    try:
        for module in found:
            handles.append(module.register_forward_hook(hook))
        yield found
    finally:
        for handle in handles:
            handle.remove()


def _check_device(model: nn.Module, x: Tensor, what: str) -> None:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    if tensor is not None and tensor.device != x.device:
        raise JeatError(
            f"the {what} model is on {tensor.device} but the inputs are on {x.device}; move one "
            "of them (transfer attacks never move models)"
        )


@dataclass
class Transfer:
    """Craft adversarial examples on ``source`` with ``attack`` and hand them to the target.

    ``gamma = 1`` is a plain transfer attack; ``gamma < 1`` crafts with the Skip Gradient
    Method (:func:`skip_gradient`) and needs a ResNet-like source (``branches`` names its
    residual-branch ends when it is not built from :class:`jeat.models.PreActBlock`).
    ``__call__`` follows the attack protocol, ``attack(model, x, y, generator, check)``, where
    ``model`` is the *target*: it is only checked (same number of classes as the source, same
    device as the inputs), never differentiated. Both models are left as found (modes
    restored, no parameter ``.grad`` written); neither is moved.
    """

    source: nn.Module
    attack: PGD
    gamma: float = 1.0
    branches: list[nn.Module] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.source, nn.Module):
            raise JeatError(
                f"the transfer source must be a torch.nn.Module, got {type(self.source).__name__}"
            )
        if not callable(self.attack):
            raise JeatError(f"the transfer attack must be callable, got {self.attack!r}")
        self.gamma = _check_gamma(self.gamma)
        if self.branches is not None:
            self.branches = list(self.branches)
        if self.gamma < 1.0:
            _resolve_branches(self.source, self.branches)  # fail now, not at the first batch

    @property
    def threat(self) -> ThreatModel:
        return self.attack.threat

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        check: bool = True,
    ) -> Tensor:
        """Adversarial examples crafted on the source for ``(x, y)``, detached, shaped like x."""
        if check:
            check_images(x)
            _check_device(self.source, x, "source")
            _check_device(model, x, "target")
            with torch.no_grad(), model_mode(self.source, True), model_mode(model, True):
                n_source = model_width(self.source, x)
                n_target = model_width(model, x)
            if n_source != n_target:
                raise JeatError(
                    f"the transfer source returns {n_source} logits but the target "
                    f"{n_target}: both must classify the same classes"
                )
            check_labels(y, n_source, x.shape[0])
        if self.gamma < 1.0:
            with skip_gradient(self.source, self.gamma, self.branches):
                return self.attack(self.source, x, y, generator=generator, check=False)
        return self.attack(self.source, x, y, generator=generator, check=False)


def SGM(  # noqa: N802
    source: nn.Module,
    threat: ThreatModel,
    gamma: float = 0.5,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = False,
    branches: list[nn.Module] | None = None,
) -> Transfer:
    """Skip Gradient Method transfer attack (Wu et al., ICLR 2020) from a ResNet-like source.

    Defaults follow the paper's L-inf setting, scaled to ``threat.eps``: it crafted with
    I-FGSM / PGD for 10 iterations of step 2/255 at eps = 16/255, i.e. ``step = eps / 8`` (a
    total travel of 1.25 eps), with no random start (``rand_init=False`` in the authors'
    script) and the CE loss. So ``step_size=None`` means ``threat.eps / 8`` here, not the
    ``eps / 4`` of the white-box PGD-20 protocol. Measured on the digits (source digits-source,
    targets the small CNNs, eps 0.15): a random start made transfer ~4 points weaker; 20 steps
    of eps/4 were ~3 points stronger than the paper's 10 of eps/8 (within the noise of 360
    images, so the paper's setting is kept).

    ``gamma``: the paper used 0.2 for ResNet and 0.5 for DenseNet sources (per block, for
    ResNets of 8 to 50 blocks). The default 0.5 is the milder of the two. On 8x8 digits
    with an 8-block PreAct-ResNet-18 source, SGM did not beat plain transfer: 0.5 matched
    gamma = 1 and 0.2 was a few points weaker. Use ``gamma=1.0`` for a plain transfer
    attack. ``branches``: see :func:`skip_gradient`.
    """
    if step_size is None:
        step_size = threat.eps / 8
    attack = PGD(threat, steps=steps, step_size=step_size, loss="ce", random_start=random_start)
    return Transfer(source, attack, gamma=gamma, branches=branches)
