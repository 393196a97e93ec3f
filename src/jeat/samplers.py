"""Samplers: turning a classifier's energy into images.

Class-conditional generation (Santurkar et al. 2019, in energy terms): draw a seed from a
Gaussian ``N(mu_y, Sigma_y)`` fitted on training images of class ``y``, then descend
``E(x, y) - E(x)`` (the class-``y`` cross-entropy) with normalised L2 steps inside a large L2
ball around the seed, clamped to [0, 1]. That descent is the targeted L2 PGD of
:mod:`jeat.attacks` started at the seed without random start: attack and generation are the
same move on the energy, in opposite directions.

For large images the Gaussians are fitted at a lower resolution (``max_side``) and seeds are
upsampled, so the covariance stays small and well conditioned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jeat.attacks import PGD, L2Ball
from jeat.data import ImageDataset
from jeat.errors import JeatError

__all__ = ["ClassGaussians", "fit_class_gaussians", "sample_seeds", "SeededDescent", "SEEDS"]

SEEDS = ("class", "pooled", "uniform")


@dataclass
class ClassGaussians:
    """Per-class Gaussian seeds: means and Cholesky factors at a (possibly) reduced resolution."""

    means: Tensor  # K x D
    chol: Tensor  # K x D x D
    shape: tuple[int, int, int]  # full-resolution (C, H, W)
    low_shape: tuple[int, int, int]  # resolution the Gaussians live at

    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw one seed per label, upsampled to full resolution and clamped to [0, 1]."""
        k = self.means.shape[0]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise JeatError(f"classes must lie in [0, {k - 1}], got {labels.tolist()}")
        z = torch.randn(labels.shape[0], self.means.shape[1], 1, generator=generator)
        x = self.means[labels] + (self.chol[labels] @ z).squeeze(-1)
        x = x.view(-1, *self.low_shape)
        if self.low_shape != self.shape:
            x = F.interpolate(x, size=self.shape[1:], mode="bilinear", align_corners=False)
        return x.clamp_(0.0, 1.0)


def fit_class_gaussians(
    x: Tensor, y: Tensor, num_classes: int, max_side: int = 16, shrinkage: float = 1e-4
) -> ClassGaussians:
    """Fit ``N(mu_k, Sigma_k)`` to the training images of each class (float64, with a small
    ridge so the Cholesky factor exists even for classes with few images)."""
    c, h, w = x.shape[1:]
    side = min(h, max_side)
    low = (c, side, side * w // h)
    xs = x.float()
    if low[1:] != (h, w):
        xs = F.adaptive_avg_pool2d(xs, low[1:])
    flat = xs.flatten(1).double()
    d = flat.shape[1]
    means = torch.zeros(num_classes, d, dtype=torch.float64)
    chols = torch.zeros(num_classes, d, d, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    for k in range(num_classes):
        xk = flat[y == k]
        if xk.shape[0] == 0:
            raise JeatError(f"class {k} has no training images to fit a seed distribution on")
        mu = xk.mean(0)
        cov = (xk - mu).T @ (xk - mu) / max(1, xk.shape[0] - 1)
        ridge = shrinkage * max(float(cov.diagonal().mean()), 1e-6)
        means[k] = mu
        chols[k] = torch.linalg.cholesky(cov + ridge * eye)
    return ClassGaussians(means.float(), chols.float(), (c, h, w), low)


def sample_seeds(
    kind: str,
    data: ImageDataset,
    labels: Tensor,
    generator: torch.Generator | None = None,
    max_side: int = 16,
) -> Tensor:
    """Starting points for generation, one per label.

    ``class``: the class-conditional Gaussian of each label (Santurkar et al.); ``pooled``: one
    Gaussian fitted on all training images (the seed says nothing about the target class, so
    the class must come from the model's energy); ``uniform``: uniform noise in [0, 1].
    """
    if kind == "class":
        gauss = fit_class_gaussians(data.x_train, data.y_train, data.info.num_classes, max_side)
        return gauss.sample(labels, generator)
    if kind == "pooled":
        pooled = fit_class_gaussians(data.x_train, torch.zeros_like(data.y_train), 1, max_side)
        return pooled.sample(torch.zeros_like(labels), generator)
    if kind == "uniform":
        return torch.rand((len(labels), *data.info.shape), generator=generator)
    raise JeatError(f"unknown seed distribution '{kind}'; choose one of {', '.join(SEEDS)}")


@dataclass
class SeededDescent:
    """Descend ``E(x, y) - E(x)`` from seeds with normalised L2 steps in an L2 ball.

    ``radius`` defaults to ``0.2 * sqrt(dim)`` in [0, 1] pixel units (an RMS change of 0.2 per
    pixel; 1.6 on 8x8 digits, 11 on CIFAR) and ``step_size`` to ``2.5 * radius / steps``. On
    digits, larger radii (0.5 * sqrt(dim)) saturate the images and let a standard model's
    targeted perturbations look like digits to other CNNs; smaller ones barely move the seed.
    """

    steps: int = 60
    radius: float | None = None
    step_size: float | None = None

    def __call__(self, model: nn.Module, seeds: Tensor, labels: Tensor) -> Tensor:
        radius = self.radius if self.radius is not None else 0.2 * math.sqrt(seeds[0].numel())
        step = self.step_size if self.step_size is not None else 2.5 * radius / self.steps
        descent = PGD(L2Ball(radius), steps=self.steps, step_size=step, random_start=False)
        return descent(model, seeds, labels, target=labels)
