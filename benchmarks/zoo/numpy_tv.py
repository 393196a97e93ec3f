"""Total-variation denoising computed in NumPy (the input transformation of Guo et al., ICLR
2018, in the form a user often writes it: outside the autograd graph), then a CNN. The logits
are detached from the input: no gradient reaches it at all. Load with
`jeat eval --model py:numpy_tv.py:make --weights W.pt`."""

import numpy as np
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


def tv_denoise(img: np.ndarray, weight: float = 0.08, steps: int = 30) -> np.ndarray:
    """Gradient descent on 0.5 ||u - img||^2 + weight * TV_eps(u), per image and channel."""
    u = img.copy()
    for _ in range(steps):
        gx = np.diff(u, axis=-1, append=u[..., -1:])
        gy = np.diff(u, axis=-2, append=u[..., -1:, :])
        norm = np.sqrt(gx**2 + gy**2 + 1e-3)
        px, py = gx / norm, gy / norm
        div = (px - np.roll(px, 1, axis=-1)) + (py - np.roll(py, 1, axis=-2))
        u = u - 0.2 * ((u - img) - weight * div)
    return np.clip(u, 0.0, 1.0)


class NumpyTV(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = CNN(1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clean = tv_denoise(x.detach().cpu().numpy().astype(np.float64))
        return self.net(torch.from_numpy(clean).to(x.device, x.dtype))


def make(num_classes: int = 10) -> nn.Module:
    return NumpyTV(num_classes)
