"""Generation-quality metrics computed with a *judge* classifier.

The Inception Score and FID need Inception-v3 weights, which a CPU-only, offline machine does
not have. Following the method notes, ``jeat`` computes the same two statistics with a
separately trained, non-robust *judge* classifier of the same dataset and labels them as such:

* **judge score** (Inception-style): ``exp(E_x KL(p_J(y | x) || p_J(y)))`` with ``p_J`` the
  judge's softmax and ``p_J(y)`` its mean over the samples; 1 (worst) to ``num_classes``.
* **judge Fréchet distance**: the Fréchet distance between Gaussians fitted to the judge's
  penultimate features (the input of its last linear layer) of the samples and of real images.
* **judge accuracy**: for class-conditional samples, the share the judge assigns to the class
  they were generated for.

These numbers compare models scored by the *same* judge; they are not Inception Scores or FIDs
and are not comparable with published ones.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn

from jeat.attacks import check_images, model_mode
from jeat.energy import as_logits
from jeat.errors import JeatError

__all__ = [
    "JudgeScores",
    "judge_outputs",
    "inception_style_score",
    "frechet_distance",
    "feature_statistics",
    "judge_scores",
]


@dataclass
class JudgeScores:
    n: int
    judge_score: float  # Inception-style score under the judge (higher is better)
    judge_fd: float  # Fréchet distance of judge features to real images (lower is better)
    judge_accuracy: float | None  # percent of conditional samples judged as their class

    def to_dict(self) -> dict:
        return asdict(self)


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise JeatError("the judge has no linear layer to take penultimate features from")
    return linears[-1]


@torch.no_grad()
def judge_outputs(judge: nn.Module, x: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """The judge's softmax probabilities and penultimate features (float64, on the CPU)."""
    check_images(x)
    head = _last_linear(judge)
    feats: list[Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, inp: feats.append(inp[0].flatten(1)))
    device = next(judge.parameters()).device
    probs = []
    try:
        with model_mode(judge, eval_mode=True):
            for i in range(0, len(x), batch_size):
                logits = as_logits(judge(x[i : i + batch_size].to(device)))
                probs.append(logits.double().softmax(1).cpu())
    finally:
        hook.remove()
    return torch.cat(probs), torch.cat([f.double().cpu() for f in feats])


def inception_style_score(probs: Tensor, splits: int = 1) -> float:
    """``exp(mean KL(p(y|x) || p(y)))``, averaged over ``splits`` equal parts (as in Salimans
    et al. 2016; ``splits=10`` is their protocol)."""
    if probs.ndim != 2 or len(probs) < splits:
        raise JeatError(f"need an (n, classes) probability matrix with n >= {splits}")
    scores = []
    for part in probs.double().chunk(splits):
        marginal = part.mean(0, keepdim=True)
        kl = (part * (part.clamp_min(1e-30).log() - marginal.clamp_min(1e-30).log())).sum(1)
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores))


def feature_statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.double().numpy()
    if len(f) < 2:
        raise JeatError("the Fréchet distance needs at least two feature vectors per side")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Dowson & Landau 1982), with the
    usual safeguard for a singular product: retry with ``eps`` added to the diagonals."""
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is handled below, not just warned of
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise JeatError(
                "the Fréchet distance is ill-conditioned: the matrix square root has a "
                f"large imaginary part ({np.abs(covmean.imag).max():.3g}); use more samples"
            )
        covmean = covmean.real
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def judge_scores(
    judge: nn.Module,
    samples: Tensor,
    real: Tensor,
    labels: Tensor | None = None,
    splits: int = 1,
    batch_size: int = 500,
) -> JudgeScores:
    """Score ``samples`` against ``real`` images with ``judge`` (see the module docstring)."""
    if samples.shape[1:] != real.shape[1:]:
        raise JeatError(
            f"samples {tuple(samples.shape[1:])} and real images {tuple(real.shape[1:])} "
            "differ in shape"
        )
    if labels is not None and len(labels) != len(samples):
        raise JeatError(f"{len(labels)} labels for {len(samples)} samples")
    probs, feats = judge_outputs(judge, samples, batch_size)
    _, real_feats = judge_outputs(judge, real, batch_size)
    fd = frechet_distance(*feature_statistics(feats), *feature_statistics(real_feats))
    acc = None
    if labels is not None:
        acc = 100.0 * float((probs.argmax(1) == labels.cpu()).double().mean())
    return JudgeScores(len(samples), inception_style_score(probs, splits), fd, acc)
