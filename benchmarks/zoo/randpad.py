"""Random resizing and padding (Xie et al., ICLR 2018), as a user would ship it: at every
forward pass the image is resized to a random size between its own and 1.25 times it, then
padded with zeros at a random offset to 1.25 times its size, and a CNN classifies it. A
randomised defence: every pass differs. Load with
`jeat eval --model py:randpad.py:make --weights W.pt`."""

import math

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


class RandomResizePad(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        final = math.ceil(1.25 * h), math.ceil(1.25 * w)
        size = int(torch.randint(h, final[0] + 1, (1,)))
        side = max(1, round(size * w / h))
        z = nn.functional.interpolate(x, size=(size, min(side, final[1])), mode="nearest")
        top = int(torch.randint(0, final[0] - z.shape[-2] + 1, (1,)))
        left = int(torch.randint(0, final[1] - z.shape[-1] + 1, (1,)))
        pad = (left, final[1] - z.shape[-1] - left, top, final[0] - z.shape[-2] - top)
        return nn.functional.pad(z, pad)


class RandPadNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.pre = RandomResizePad()
        self.net = CNN(1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.pre(x))


def make(num_classes: int = 10) -> nn.Module:
    return RandPadNet(num_classes)
