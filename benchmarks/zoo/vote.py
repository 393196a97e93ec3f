"""An ensemble with a non-differentiable vote, as a user would ship it: three CNNs each name
a class and the model returns the vote counts (integers: no score, no gradient). Load with
`jeat eval --model py:vote.py:make --weights W.pt`."""

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


class Vote(nn.Module):
    def __init__(self, members: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.members = nn.ModuleList(CNN(1, num_classes) for _ in range(members))
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        votes = torch.stack([m(x).argmax(1) for m in self.members], 1)
        return nn.functional.one_hot(votes, self.num_classes).sum(1)  # int64 counts


def make(num_classes: int = 10) -> nn.Module:
    return Vote(3, num_classes)
