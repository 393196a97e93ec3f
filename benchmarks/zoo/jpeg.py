"""A JPEG-style input transformation (Guo et al., ICLR 2018; Das et al. 2017), as a user would
ship it: each 8x8 block of the image goes through the DCT, its coefficients are quantised with
JPEG's luminance table at a low quality, and the inverse DCT gives the image the CNN sees.
The rounding has a zero gradient almost everywhere. Load with
`jeat eval --model py:jpeg.py:make --weights W.pt` (module name for BPDA: `pre`)."""

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


_LUMA = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]  # fmt: skip


class JpegLike(nn.Module):
    def __init__(self, quality: int = 25) -> None:
        super().__init__()
        scale = 5000 / quality if quality < 50 else 200 - 2 * quality
        table = torch.tensor(_LUMA, dtype=torch.float32).view(8, 8)
        self.register_buffer("table", ((table * scale + 50) / 100).clamp(min=1) / 255.0)
        k = torch.arange(8, dtype=torch.float32)
        basis = torch.cos((2 * k.view(1, -1) + 1) * k.view(-1, 1) * math.pi / 16)
        basis[0] *= 1 / math.sqrt(2)
        self.register_buffer("dct", basis * 0.5)  # orthonormal 8-point DCT-II

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        ph, pw = (-h) % 8, (-w) % 8
        z = nn.functional.pad(x, (0, pw, 0, ph), mode="replicate") - 0.5
        blocks = z.unfold(2, 8, 8).unfold(3, 8, 8)  # n c H/8 W/8 8 8
        coef = self.dct @ blocks @ self.dct.T
        coef = torch.round(coef / self.table) * self.table
        out = self.dct.T @ coef @ self.dct
        out = out.permute(0, 1, 2, 4, 3, 5).reshape(n, c, h + ph, w + pw)[:, :, :h, :w]
        return (out + 0.5).clamp(0.0, 1.0)


class JpegNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.pre = JpegLike()
        self.net = CNN(1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.pre(x))


def make(num_classes: int = 10) -> nn.Module:
    return JpegNet(num_classes)
