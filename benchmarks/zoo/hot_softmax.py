"""An output that saturates the softmax (a distillation-style temperature, as in defensive
distillation, Papernot et al. 2016), as a user would ship it: the model returns
softmax(T * logits) with T = 1000, which in float32 is one-hot on almost every input: no
usable score and no gradient. Load with
`jeat eval --model py:hot_softmax.py:make --weights W.pt`."""

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


class HotSoftmax(nn.Module):
    def __init__(self, num_classes: int = 10, temperature: float = 1000.0) -> None:
        super().__init__()
        self.net = CNN(1, num_classes)
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.temperature * self.net(x), dim=1)


def make(num_classes: int = 10) -> nn.Module:
    return HotSoftmax(num_classes)
