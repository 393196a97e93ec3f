"""Model registry: classifiers that take images in [0, 1] and return logits.

Normalisation is the first layer of every model (:class:`Normalize`), so threat models stay in
pixel units. Batch norm is optional (``norm="none"``) because energy-based training (JEM, JEAT)
is often run without it; ``activation`` picks ReLU or a smooth alternative (ELU, softplus),
which WRM-style objectives want.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from jeat.errors import JeatError

__all__ = [
    "Normalize",
    "KWTA",
    "LeanCNN",
    "bpda",
    "unrolled",
    "has_unrollable",
    "ModelInfo",
    "register_model",
    "create_model",
    "list_models",
    "model_info",
]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as a model layer (buffers move with the model)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise JeatError(f"normalisation mean and std differ in length: {mean} vs {std}")
        if any(s <= 0 for s in std):
            raise JeatError(f"normalisation std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(),
    "elu": lambda: nn.ELU(),
    "softplus": lambda: nn.Softplus(beta=10.0),
    "lrelu": lambda: nn.LeakyReLU(0.2),
    "swish": lambda: nn.SiLU(),
}


class KWTA(nn.Module):
    """k-winners-take-all (Xiao et al., ICLR 2020): per example, keep the ``ratio`` fraction of
    the layer's largest activations (over channels and positions) and zero the rest.

    Proposed as a defence, it mostly *masks* gradients: the active set jumps under small input
    changes, so the loss surface is piecewise and gradient attacks stall (Tramèr et al. 2020).
    Under :func:`bpda` its backward pass is replaced by ReLU's (BPDA, Athalye et al. 2018) while
    the forward pass stays k-WTA: the adaptive attack that breaks it.
    """

    bpda_capable: ClassVar[bool] = True

    def __init__(self, ratio: float = 0.1) -> None:
        super().__init__()
        if not 0 < ratio <= 1:
            raise JeatError(f"k-WTA ratio must be in (0, 1], got {ratio}")
        self.ratio = float(ratio)
        self.bpda = False

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        k = max(1, int(round(self.ratio * flat.shape[1])))
        threshold = flat.topk(k, dim=1).values[:, -1:]
        out = (flat * (flat >= threshold)).view_as(x)
        if self.bpda:  # forward: k-WTA; backward: ReLU's gradient
            relu = torch.relu(x)
            return relu + (out - relu).detach()
        return out

    def extra_repr(self) -> str:
        return f"ratio={self.ratio:g}"


@contextmanager
def _switched(model: nn.Module, capable: str, switch: str) -> Iterator[None]:
    """Set the boolean ``switch`` of every module of ``model`` whose class sets ``capable`` for
    the length of the block; restore each module's own value afterwards."""
    layers = [m for m in model.modules() if getattr(m, capable, False)]
    old = [getattr(m, switch) for m in layers]
    for m in layers:
        setattr(m, switch, True)
    try:
        yield
    finally:
        for m, flag in zip(layers, old, strict=True):
            setattr(m, switch, flag)


def bpda(model: nn.Module) -> AbstractContextManager[None]:
    """Switch every BPDA-capable module of ``model`` to its backward pass approximation inside
    the block (the forward pass is unchanged); restores the modules afterwards.

    A module is BPDA-capable when its class sets ``bpda_capable = True`` and it has a boolean
    ``bpda`` attribute that its forward pass reads: :class:`KWTA` (differentiated as a ReLU) and
    the test-time defences of :mod:`jeat.defences` (non-differentiable or gradient-hiding steps
    differentiated as the identity).
    """
    return _switched(model, "bpda_capable", "bpda")


def unrolled(model: nn.Module) -> AbstractContextManager[None]:
    """Differentiate through every iterative test-time step of ``model`` inside the block:
    each module whose class sets ``unrollable = True`` (:class:`jeat.defences.Purify`) has its
    ``differentiable`` switch turned on, so an attack's gradient flows through the unrolled
    chain (its true gradient) instead of the zero one of the detached chain or BPDA's identity
    surrogate. The forward pass computes the same function; restores the modules afterwards.
    """
    return _switched(model, "unrollable", "differentiable")


def has_unrollable(model: nn.Module) -> bool:
    """Whether :func:`unrolled` changes anything in ``model``."""
    return any(getattr(m, "unrollable", False) for m in model.modules())


def _activation(name: str) -> nn.Module:
    if name == "kwta" or name.startswith("kwta-"):
        ratio = name[5:] or "0.1"
        try:
            return KWTA(float(ratio))
        except ValueError:
            raise JeatError(f"k-WTA activation needs a ratio like kwta-0.1, got '{name}'") from None
    if name not in _ACTIVATIONS:
        known = ", ".join([*_ACTIVATIONS, "kwta-RATIO"])
        raise JeatError(f"unknown activation '{name}'; choose one of {known}")
    return _ACTIVATIONS[name]()


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    raise JeatError(f"unknown norm '{kind}'; choose batch, group or none")


class GridPool(nn.Module):
    """Average-pool to ``grid`` x ``grid`` (``nn.AdaptiveAvgPool2d``'s result): a plain
    average pooling when the input size is a multiple of the grid (the CPU's adaptive pooling
    is several times slower there, its backward pass most of all), the identity when it
    already is the grid, the adaptive pooling otherwise."""

    def __init__(self, grid: int) -> None:
        super().__init__()
        self.grid = int(grid)

    def forward(self, x: Tensor) -> Tensor:
        (h, w), g = x.shape[-2:], self.grid
        if (h, w) == (g, g):
            return x
        if h % g == 0 and w % g == 0:
            return nn.functional.avg_pool2d(x, (h // g, w // g))
        return nn.functional.adaptive_avg_pool2d(x, g)

    def extra_repr(self) -> str:
        return f"grid={self.grid}"


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head; for 8x8 (digits) and 28x28 (MNIST) inputs.

    Works for any input size (global average pooling before the head).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 32,
        norm: str = "none",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            _norm2d(norm, w),
            _activation(activation),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            _norm2d(norm, 2 * w),
            _activation(activation),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            _norm2d(norm, 4 * w),
            _activation(activation),
            GridPool(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(16 * w, 4 * w), _activation(activation), nn.Linear(4 * w, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class LeanCNN(nn.Module):
    """Two 3x3 convolutions (``width`` and ``2 * width`` channels), then a hidden linear layer
    and the head: the cheap network of a plain PGD-AT script, and the frontier recipes' model
    on digits and MNIST (``benchmarks/frontier.py``).

    ``pool`` max-pools by that factor after the first convolution (2 on 28x28 MNIST, so the
    second convolution runs at 14x14); the features are then average-pooled to ``grid`` x
    ``grid`` (an identity on 8x8 digits with the default 8) before the hidden layer, so the
    network takes any input size. At the frontier budget a network this size, trained for more
    epochs, is more robust than a deeper one trained for fewer (``docs/objectives.md``).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 16,
        hidden: int = 100,
        pool: int = 1,
        grid: int = 8,
        norm: str = "none",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        for key, value in (("width", width), ("hidden", hidden), ("pool", pool), ("grid", grid)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise JeatError(f"lean_cnn option {key} must be an integer >= 1, got {value!r}")
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            _norm2d(norm, w),
            _activation(activation),
            nn.MaxPool2d(pool) if pool > 1 else nn.Identity(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            _norm2d(norm, 2 * w),
            _activation(activation),
            GridPool(grid),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(2 * w * grid * grid, hidden),
            _activation(activation),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, activation: str) -> None:
        super().__init__()
        self.bn1 = _norm2d(norm, cin)
        self.act1 = _activation(activation)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=norm == "none")
        self.bn2 = _norm2d(norm, cout)
        self.act2 = _activation(activation)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=norm == "none")
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + skip


class _PreActNet(nn.Module):
    """A 3x3 stem, a stack of pre-activation blocks, then norm, activation, pooling and a
    linear head: the shape shared by PreAct-ResNet and WideResNet."""

    def __init__(
        self,
        stem: nn.Module,
        body: list[nn.Module],
        channels: int,
        num_classes: int,
        norm: str,
        activation: str,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.body = nn.Sequential(*body)
        self.bn = _norm2d(norm, channels)
        self.act = _activation(activation)
        self.pool = GridPool(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn(self.body(self.stem(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


class PreActResNet18(_PreActNet):
    """PreAct-ResNet-18 for 32x32 inputs (3x3 stem, four stages of two blocks)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 64,
        norm: str = "batch",
        activation: str = "relu",
    ) -> None:
        stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        cin = width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers += [
                PreActBlock(cin, cout, stride, norm, activation),
                PreActBlock(cout, cout, 1, norm, activation),
            ]
            cin = cout
        super().__init__(stem, layers, cin, num_classes, norm, activation)


class WideResNet(_PreActNet):
    """WideResNet-depth-widen (Zagoruyko & Komodakis 2016) with pre-activation blocks.

    ``depth=28, widen=10`` is the WRN-28-10 used by JEM and JEAT (run without batch norm there:
    ``norm="none"``).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        depth: int = 28,
        widen: int = 10,
        norm: str = "batch",
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        if (depth - 4) % 6 != 0:
            raise JeatError(f"WideResNet depth must be 6n+4 (e.g. 10, 16, 28, 34), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for stage, stride in enumerate((1, 2, 2)):
            cout = widths[stage + 1]
            for i in range(n):
                blocks.append(PreActBlock(cin, cout, stride if i == 0 else 1, norm, activation))
                if dropout > 0:
                    blocks.append(nn.Dropout(dropout))
                cin = cout
        super().__init__(stem, blocks, cin, num_classes, norm, activation)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    input_sizes: str
    defaults: dict = field(default_factory=dict)


_BUILDERS: dict[str, tuple[ModelInfo, Callable[..., nn.Module]]] = {}


def register_model(
    name: str, description: str, input_sizes: str, **defaults: object
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``builder(in_channels, num_classes, **kwargs) -> nn.Module`` under ``name``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _BUILDERS[name] = (ModelInfo(name, description, input_sizes, dict(defaults)), builder)
        return builder

    return wrap


register_model(
    "small_cnn",
    "3-conv CNN with a 2-layer head (fast on CPU)",
    "any (made for 8x8 digits and 28x28 MNIST)",
    width=32,
    norm="none",
    activation="relu",
)(SmallCNN)
register_model(
    "lean_cnn",
    "2-conv CNN with a hidden layer (cheapest per step; the digits and MNIST frontier recipes)",
    "any (pool=2 for 28x28 MNIST)",
    width=16,
    hidden=100,
    pool=1,
    grid=8,
    norm="none",
    activation="relu",
)(LeanCNN)
register_model(
    "preact_resnet18",
    "PreAct-ResNet-18, 3x3 stem",
    "32x32",
    width=64,
    norm="batch",
    activation="relu",
)(PreActResNet18)
register_model(
    "wrn",
    "WideResNet-depth-widen (WRN-28-10 by default; JEM/JEAT use norm=none)",
    "32x32",
    depth=28,
    widen=10,
    norm="batch",
    activation="relu",
    dropout=0.0,
)(WideResNet)


def list_models() -> list[ModelInfo]:
    return [info for info, _ in _BUILDERS.values()]


def model_info(name: str) -> ModelInfo:
    if name not in _BUILDERS:
        raise JeatError(f"unknown model '{name}'; known models: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name][0]


def create_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: object,
) -> nn.Sequential:
    """Build model ``name`` for the given data, with a :class:`Normalize` first layer.

    The result is ``nn.Sequential(Normalize, net)``: it takes images in [0, 1] and returns
    logits. Unknown keyword arguments raise a :class:`JeatError` naming the accepted ones.
    """
    info = model_info(name)
    builder = _BUILDERS[name][1]
    unknown = set(kwargs) - set(info.defaults)
    if unknown:
        raise JeatError(
            f"model '{name}' does not take option(s) {', '.join(sorted(unknown))}; "
            f"it takes {', '.join(sorted(info.defaults)) or 'none'}"
        )
    options = {**info.defaults, **kwargs}
    net = builder(in_channels, num_classes, **options)
    mean = tuple(mean) if mean is not None else (0.0,) * in_channels
    std = tuple(std) if std is not None else (1.0,) * in_channels
    if len(mean) != in_channels:
        raise JeatError(f"normalisation has {len(mean)} channels but the model {in_channels}")
    return nn.Sequential(Normalize(mean, std), net)
