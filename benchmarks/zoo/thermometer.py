"""Thermometer encoding (Buckman et al., ICLR 2018), as a user would ship it: each pixel
becomes `levels` binary channels, channel i on when the pixel reaches i / levels, and a CNN
trained on the encoding classifies it. The encoding is a step function: its gradient is zero
almost everywhere (shattered gradients, Athalye et al. 2018). Load with
`jeat eval --model py:thermometer.py:make --weights W.pt` (module name for BPDA: `pre`)."""

import torch
from torch import nn


class CNN(nn.Module):
    """A plain CNN for small grey images (any size: adaptive pooling at the end)."""

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Linear(16 * w, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Thermometer(nn.Module):
    def __init__(self, levels: int = 16) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(self.levels, device=x.device, dtype=x.dtype) / self.levels
        return (x.unsqueeze(2) >= steps.view(1, 1, -1, 1, 1)).to(x.dtype).flatten(1, 2)


class ThermometerNet(nn.Module):
    def __init__(self, channels: int = 1, num_classes: int = 10, levels: int = 16) -> None:
        super().__init__()
        self.pre = Thermometer(levels)
        self.net = CNN(channels * levels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.pre(x))


def make(num_classes: int = 10) -> nn.Module:
    return ThermometerNet(1, num_classes)
