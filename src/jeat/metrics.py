"""Generation-quality metrics: Inception Score and FID, with Inception-v3 or a *judge*.

The two formulas are ours (NumPy/SciPy, float64): the Inception Score
``exp(E_x KL(p(y | x) || p(y)))`` over ``splits`` parts (Salimans et al. 2016) and the Fréchet
distance between Gaussians fitted to features (Heusel et al. 2017). The features come from a
*backend*:

* :class:`InceptionBackend`: the standard Inception-v3 FID network (the TF 2015-12-05 weights)
  through torch-fidelity's feature extractor, when torch-fidelity (which needs torchvision) is
  installed and its weights file is on disk; this gives the literature's IS and FID. When
  either is missing, building it raises an error saying what is missing and where the weights
  must be, and naming the judge backend; it never falls back silently.
* :class:`JudgeBackend`: an independently trained standard classifier of the same dataset
  (``jeat judge train --dataset D`` trains and caches one, :func:`load_judge` loads it), whose
  softmax and penultimate features give a **judge-IS** and **judge-FID**, always labelled as
  such: they compare models scored by the same judge and are not comparable with published
  Inception Scores or FIDs.

The judge statistics, as computed by :func:`judge_scores`:

* **judge score** (Inception-style): ``exp(E_x KL(p_J(y | x) || p_J(y)))`` with ``p_J`` the
  judge's softmax and ``p_J(y)`` its mean over the samples; 1 (worst) to ``num_classes``.
* **judge Fréchet distance**: the Fréchet distance between Gaussians fitted to the judge's
  penultimate features (the input of its last linear layer) of the samples and of real images.
* **judge accuracy**: for class-conditional samples, the share the judge assigns to the class
  they were generated for.

These numbers compare models scored by the *same* judge; they are not Inception Scores or FIDs
and are not comparable with published ones.

Beyond IS and FID, :func:`score_samples` measures fidelity and diversity apart, in the same
backend's feature space (the judge's penultimate features, or Inception-v3's pool features):

* **precision** and **recall** (Kynkäänniemi et al. 2019, ``k = 3``): the share of generated
  samples inside the real manifold (the union of balls around real features, each of radius
  its distance to its ``k``-th nearest real neighbour), and the share of real images inside
  the generated manifold;
* **density** and **coverage** (Naeem et al. 2020, ``k = 5``): how many real balls hold each
  sample, over ``k`` (1 in expectation for identical distributions, above 1 when samples crowd
  where the real images are dense), and the share of real balls that hold at least one sample;
* **within-class diversity**: per class, the mean pairwise feature distance among the samples
  of that class over the same among real images of that class, averaged over the classes
  (1: as varied as the data; 0: one image repeated).

The four k-NN scores use equally many real and generated features (a seeded subset of the
larger side), since their values depend on the two counts. Given held-out real images, the
same scores of those images against the same real ones are the *reference*: the floor every
model's numbers are read against (:attr:`GenerationScores.reference`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn

from jeat.attacks import check_images, model_mode
from jeat.energy import as_logits
from jeat.errors import JeatError
from jeat.utils import write_json

__all__ = [
    "JudgeScores",
    "GenerationScores",
    "FeatureBackend",
    "JudgeBackend",
    "InceptionBackend",
    "inception_score",
    "score_samples",
    "judge_dir",
    "train_judge",
    "load_judge",
    "judge_outputs",
    "inception_style_score",
    "frechet_distance",
    "feature_statistics",
    "judge_scores",
    "judge_verdicts",
    "knn_radii",
    "manifold_scores",
    "ManifoldScores",
    "within_class_diversity",
    "K_PRECISION_RECALL",
    "K_DENSITY_COVERAGE",
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
    """The mean of :func:`inception_score` (one split by default), as the benchmarks report
    it under a judge."""
    return inception_score(probs, splits)[0]


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


# -- the Inception Score over splits, and the two backends ---------------------------------


def inception_score(
    probs: Tensor, splits: int = 10, shuffle_seed: int | None = 0
) -> tuple[float, float]:
    """Mean and standard deviation over ``splits`` equal parts of ``exp(mean KL(p(y|x) ||
    p(y)))``, ``p(y)`` the mean of ``p(y|x)`` within the part: Salimans et al.'s protocol
    (10 splits of 50,000 samples), in float64.

    The rows are shuffled (seeded) before splitting, because generated samples often come
    sorted by class and a split holding two classes would score at most 2; ``shuffle_seed=None``
    splits in the given order."""
    if not isinstance(splits, int) or splits < 1:
        raise JeatError(f"the Inception Score needs splits >= 1, got {splits!r}")
    if probs.ndim != 2 or len(probs) < splits:
        raise JeatError(
            f"need an (n, classes) probability matrix with n >= splits ({splits}), got shape "
            f"{tuple(probs.shape)}"
        )
    probs = probs.double()
    if shuffle_seed is not None:
        gen = torch.Generator().manual_seed(shuffle_seed)
        probs = probs[torch.randperm(len(probs), generator=gen)]
    scores = []
    for part in probs.chunk(splits):
        marginal = part.mean(0, keepdim=True)
        kl = (part * (part.clamp_min(1e-30).log() - marginal.clamp_min(1e-30).log())).sum(1)
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


class FeatureBackend(Protocol):
    """What scoring needs from a network: class probabilities and features (float64, CPU)."""

    name: str  # "judge" | "inception-v3"
    is_label: str  # "judge-IS" | "IS"
    fd_label: str  # "judge-FID" | "FID"

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor]: ...


class JudgeBackend:
    """A judge classifier as a feature backend: its softmax and its penultimate features."""

    name = "judge"
    is_label = "judge-IS"
    fd_label = "judge-FID"

    def __init__(self, judge: nn.Module, batch_size: int = 500) -> None:
        self.judge = judge
        self.batch_size = batch_size

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return judge_outputs(self.judge, x, self.batch_size)


INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)


def inception_weights_path() -> Path:
    """Where the Inception-v3 weights must be: ``$JEAT_INCEPTION_WEIGHTS`` if set, else
    torch-fidelity's own cache, ``$TORCH_HOME/hub/checkpoints/`` (``~/.cache/torch`` when
    ``TORCH_HOME`` is unset)."""
    env = os.environ.get("JEAT_INCEPTION_WEIGHTS")
    if env:
        return Path(env).expanduser()
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home:
        base = Path(torch_home).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "torch"
    return base / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE


class InceptionBackend:
    """The standard Inception-v3 FID network (TF 2015-12-05 weights) via torch-fidelity:
    2048-d pool features for the FID, the unbiased logits' softmax for the IS. Images are
    converted to uint8 RGB as the reference implementation expects (grey images are
    replicated to three channels); torch-fidelity resizes them to 299x299 itself.

    Raises :class:`JeatError` naming what is missing when torch-fidelity (or torchvision, which
    it imports) is not installed or the weights file is not on disk (``download=True`` lets
    torch-fidelity fetch it from :data:`INCEPTION_WEIGHTS_URL`).
    """

    name = "inception-v3"
    is_label = "IS"
    fd_label = "FID"

    def __init__(
        self, device: str | torch.device = "cpu", batch_size: int = 100, download: bool = False
    ) -> None:
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import (
                FeatureExtractorInceptionV3,
            )
        except Exception as exc:  # ImportError, or torchvision failing to import inside it
            raise JeatError(
                "Inception-v3 scores need torch-fidelity with a working torchvision "
                f"(pip install torch-fidelity torchvision matching your torch); import failed: "
                f"{type(exc).__name__}: {exc}. Use the judge backend instead (--backend judge, "
                "after `jeat judge train --dataset D`)"
            ) from None
        weights = inception_weights_path()
        if not weights.is_file() and not download:
            raise JeatError(
                f"Inception-v3 weights not found at {weights}; download {INCEPTION_WEIGHTS_URL} "
                "there (or set JEAT_INCEPTION_WEIGHTS to the file), or allow the download; "
                "offline, use the judge backend (--backend judge)"
            )
        path = str(weights) if weights.is_file() else None
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat",
                ["2048", "logits_unbiased"],
                feature_extractor_weights_path=path,
            )
        except Exception as exc:
            raise JeatError(
                f"could not build the Inception-v3 feature extractor: {type(exc).__name__}: "
                f"{exc}; offline, use the judge backend (--backend judge)"
            ) from None
        self.device = torch.device(device)
        self.net.to(self.device).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_images(x)
        if x.shape[1] not in (1, 3):
            raise JeatError(f"Inception-v3 scores need 1- or 3-channel images, got {x.shape[1]}")
        probs, feats = [], []
        for i in range(0, len(x), self.batch_size):
            batch = x[i : i + self.batch_size]
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            uint8 = (batch * 255).round().clamp(0, 255).to(torch.uint8).to(self.device)
            pool, logits = self.net(uint8)
            feats.append(pool.double().cpu())
            probs.append(logits.double().softmax(1).cpu())
        return torch.cat(probs), torch.cat(feats)


# -- fidelity and diversity: k-NN manifolds (precision, recall, density, coverage) ----------

K_PRECISION_RECALL = 3  # Kynkäänniemi et al. 2019
K_DENSITY_COVERAGE = 5  # Naeem et al. 2020
MAX_KNN_POINTS = 10_000  # per side: the distance matrix is computed in row blocks
MAX_PER_CLASS = 1_000  # per class and side for the within-class diversity
_BLOCK = 1024  # rows of a distance block


def _features(f: Tensor, what: str) -> Tensor:
    if f.ndim != 2 or not torch.isfinite(f).all():
        raise JeatError(f"{what} must be a finite (n, dim) feature matrix, got {tuple(f.shape)}")
    return f.double().cpu()


def knn_radii(features: Tensor, k: int) -> Tensor:
    """Each row's distance to its ``k``-th nearest *other* row (Euclidean, float64): the radius
    of its ball in the k-NN estimate of the manifold the rows lie on. A duplicate row counts as
    a neighbour at distance 0."""
    f = _features(features, "features")
    n = len(f)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise JeatError(f"k-NN radii need 1 <= k < number of points ({n}), got k={k!r}")
    out = []
    for i in range(0, n, _BLOCK):
        d = torch.cdist(f[i : i + _BLOCK], f)
        rows = torch.arange(len(d))
        d[rows, rows + i] = float("inf")  # a point is not its own neighbour
        out.append(d.kthvalue(k, dim=1).values)
    return torch.cat(out)


@dataclass
class ManifoldScores:
    precision: float  # share of generated points inside the real manifold (k_pr)
    recall: float  # share of real points inside the generated manifold (k_pr)
    density: float  # mean count of real balls (k_dc) holding a generated point, over k_dc
    coverage: float  # share of real balls (k_dc) that hold at least one generated point
    n_real: int
    n_fake: int
    k_pr: int
    k_dc: int


def manifold_scores(
    real: Tensor,
    fake: Tensor,
    k_pr: int = K_PRECISION_RECALL,
    k_dc: int = K_DENSITY_COVERAGE,
) -> ManifoldScores:
    """Precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et al.
    2020) of ``fake`` features against ``real`` ones (see the module docstring). A point
    belongs to a ball when its distance to the centre is at most the radius."""
    r, g = _features(real, "real features"), _features(fake, "generated features")
    if r.shape[1] != g.shape[1]:
        raise JeatError(f"real features are {r.shape[1]}-d, generated ones {g.shape[1]}-d")
    need = max(k_pr, k_dc) + 1
    if len(r) < need or len(g) < need:
        raise JeatError(
            f"precision/recall/density/coverage need at least {need} real and generated "
            f"points, got {len(r)} and {len(g)}"
        )
    r_pr, r_dc = knn_radii(r, k_pr), knn_radii(r, k_dc)
    g_pr = knn_radii(g, k_pr)
    inside_real = torch.zeros(len(g), dtype=torch.bool)  # precision, per generated point
    balls_held = torch.zeros(len(g), dtype=torch.float64)  # density, per generated point
    inside_fake = torch.zeros(len(r), dtype=torch.bool)  # recall, per real point
    nearest_fake = torch.full((len(r),), float("inf"), dtype=torch.float64)  # coverage
    for i in range(0, len(g), _BLOCK):
        d = torch.cdist(g[i : i + _BLOCK], r)  # generated block x real
        inside_real[i : i + _BLOCK] = (d <= r_pr).any(1)
        balls_held[i : i + _BLOCK] = (d <= r_dc).double().sum(1)
        inside_fake |= (d <= g_pr[i : i + _BLOCK, None]).any(0)
        nearest_fake = torch.minimum(nearest_fake, d.min(0).values)
    return ManifoldScores(
        precision=float(inside_real.double().mean()),
        recall=float(inside_fake.double().mean()),
        density=float(balls_held.mean()) / k_dc,
        coverage=float((nearest_fake <= r_dc).double().mean()),
        n_real=len(r),
        n_fake=len(g),
        k_pr=k_pr,
        k_dc=k_dc,
    )


def _mean_pairwise_distance(f: Tensor) -> float:
    return float(torch.pdist(f).mean())


def _subset(n: int, most: int, seed: int) -> Tensor | None:
    """A seeded choice of ``most`` of ``n`` rows, or None when all of them fit."""
    if n <= most:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:most]


def within_class_diversity(
    features: Tensor,
    groups: Tensor,
    real_features: Tensor,
    real_groups: Tensor,
    max_per_class: int = MAX_PER_CLASS,
    seed: int = 0,
) -> tuple[float | None, dict[int, float]]:
    """Per class ``c``: the mean pairwise distance among the generated features of class ``c``
    divided by the same among the real features of class ``c``; returns the mean of the ratios
    over the classes with at least two points on both sides (None when there is none) and the
    ratio per class. Groups < 0 are left out; at most ``max_per_class`` points per class and
    side (a seeded subset). The mean pairwise distance is an unbiased U-statistic, so the ratio
    does not drift with the number of samples: 1 means as varied as the data, 0 one image
    repeated."""
    f, rf = _features(features, "generated features"), _features(real_features, "real features")
    groups, real_groups = groups.cpu().long(), real_groups.cpu().long()
    if len(groups) != len(f) or len(real_groups) != len(rf):
        raise JeatError("within-class diversity needs one group per feature vector")
    ratios: dict[int, float] = {}
    for c in sorted(set(groups[groups >= 0].tolist()) & set(real_groups.tolist())):
        mine, theirs = f[groups == c], rf[real_groups == c]
        if len(mine) < 2 or len(theirs) < 2:
            continue
        pick = _subset(len(mine), max_per_class, seed + c)
        mine = mine if pick is None else mine[pick]
        pick = _subset(len(theirs), max_per_class, seed + c)
        theirs = theirs if pick is None else theirs[pick]
        spread = _mean_pairwise_distance(theirs)
        if spread > 0:
            ratios[c] = _mean_pairwise_distance(mine) / spread
    if not ratios:
        return None, ratios
    return float(np.mean(list(ratios.values()))), ratios


@dataclass
class GenerationScores:
    backend: str  # "judge" | "inception-v3"
    is_label: str  # "judge-IS" | "IS"
    fd_label: str  # "judge-FID" | "FID"
    n_samples: int
    n_real: int
    splits: int
    inception_score: float
    inception_score_std: float
    frechet_distance: float
    accuracy: float | None  # judge only: percent of conditional samples judged as their class
    # k-NN fidelity and diversity on n_knn points per side (None: too few points)
    precision: float | None = None
    recall: float | None = None
    density: float | None = None
    coverage: float | None = None
    n_knn: int | None = None
    k_precision_recall: int = K_PRECISION_RECALL
    k_density_coverage: int = K_DENSITY_COVERAGE
    # mean over classes of (mean pairwise distance of samples / of real images), per class
    diversity: float | None = None
    diversity_per_class: dict[int, float] | None = None
    # the same scores of real held-out images against the same real images: the floor
    reference: GenerationScores | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GenerationScores:
        """The inverse of :meth:`to_dict` (keys it does not know are ignored)."""
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in d.items() if k in names}
        if isinstance(kept.get("reference"), dict):
            kept["reference"] = cls.from_dict(kept["reference"])
        if isinstance(kept.get("diversity_per_class"), dict):
            kept["diversity_per_class"] = {
                int(c): float(v) for c, v in kept["diversity_per_class"].items()
            }
        return cls(**kept)

    def _knn_text(self) -> str:
        parts = [
            f"{name} {value:.3f}"
            for name, value in (
                ("precision", self.precision),
                ("recall", self.recall),
                ("density", self.density),
                ("coverage", self.coverage),
                ("diversity", self.diversity),
            )
            if value is not None
        ]
        return ("  " + "  ".join(parts)) if parts else ""

    def line(self) -> str:
        text = (
            f"{self.is_label} {self.inception_score:.3f} ± {self.inception_score_std:.3f} "
            f"({self.splits} splits)  {self.fd_label} {self.frechet_distance:.3f}"
        )
        text += self._knn_text()
        if self.accuracy is not None:
            text += f"  judge accuracy {self.accuracy:.1f}%"
        return text + f"  [{self.n_samples} samples vs {self.n_real} real]"

    def reference_line(self) -> str | None:
        """The reference (real held-out images against the same real images) in one line, or
        None when there is none."""
        ref = self.reference
        if ref is None:
            return None
        return (
            f"reference, {ref.n_samples} real held-out images: {ref.fd_label} "
            f"{ref.frechet_distance:.3f}{ref._knn_text()}"
        )


def _scores(
    backend: FeatureBackend,
    probs: Tensor,
    feats: Tensor,
    labels: Tensor | None,
    real_probs: Tensor,
    real_feats: Tensor,
    real_labels: Tensor | None,
    splits: int,
    seed: int,
) -> GenerationScores:
    """Every score from the two sides' outputs (see :func:`score_samples`)."""
    mean, std = inception_score(probs, splits)
    fd = frechet_distance(*feature_statistics(feats), *feature_statistics(real_feats))
    is_judge = backend.name == "judge"
    acc = None
    if labels is not None:
        labels = labels.cpu().long()
    if is_judge and labels is not None:
        known = labels >= 0
        if known.any():
            hits = probs.argmax(1)[known] == labels[known]
            acc = 100.0 * float(hits.double().mean())
    out = GenerationScores(
        backend.name,
        backend.is_label,
        backend.fd_label,
        len(feats),
        len(real_feats),
        splits,
        mean,
        std,
        fd,
        acc,
    )
    n = min(len(feats), len(real_feats), MAX_KNN_POINTS)
    if n > K_DENSITY_COVERAGE:
        mine, theirs = _subset(len(feats), n, seed), _subset(len(real_feats), n, seed + 1)
        m = manifold_scores(
            real_feats if theirs is None else real_feats[theirs],
            feats if mine is None else feats[mine],
        )
        out.precision, out.recall, out.density, out.coverage = (
            m.precision,
            m.recall,
            m.density,
            m.coverage,
        )
        out.n_knn = n
    # classes: the labels the samples were made for (else the judge's verdict); the real
    # images' labels (else the judge's verdict); no diversity without a way to group both
    groups = labels if labels is not None and bool((labels >= 0).any()) else None
    if groups is None and is_judge:
        groups = probs.argmax(1)
    real_groups = real_labels.cpu().long() if real_labels is not None else None
    if real_groups is None and is_judge:
        real_groups = real_probs.argmax(1)
    if groups is not None and real_groups is not None:
        out.diversity, out.diversity_per_class = within_class_diversity(
            feats, groups, real_feats, real_groups, seed=seed
        )
    return out


def score_samples(
    backend: FeatureBackend,
    samples: Tensor,
    real: Tensor,
    labels: Tensor | None = None,
    splits: int = 10,
    *,
    real_labels: Tensor | None = None,
    held_out: Tensor | None = None,
    held_out_labels: Tensor | None = None,
    seed: int = 0,
) -> GenerationScores:
    """Every score of ``samples`` against ``real`` images in ``backend``'s network: the IS, the
    Fréchet distance, precision, recall, density, coverage and within-class diversity (module
    docstring); for the judge backend, also the share of conditional samples (``labels`` >= 0)
    it assigns to their class.

    Within-class diversity groups the samples by ``labels`` and the real images by
    ``real_labels``; either missing, by the judge's verdict (no diversity with Inception-v3
    then). ``held_out``: real images the samples were not scored against (the test split,
    with ``held_out_labels``); a seeded subset of as many of them as there are samples (at
    most all) gets the same scores against ``real`` as :attr:`GenerationScores.reference`.
    ``seed`` fixes every subset drawn."""
    check_images(samples, "samples")
    check_images(real, "real images")
    if samples.shape[1:] != real.shape[1:]:
        raise JeatError(
            f"samples {tuple(samples.shape[1:])} and real images {tuple(real.shape[1:])} "
            "differ in shape: score samples against the dataset they were generated for"
        )
    if labels is not None and len(labels) != len(samples):
        raise JeatError(f"{len(labels)} labels for {len(samples)} samples")
    if real_labels is not None and len(real_labels) != len(real):
        raise JeatError(f"{len(real_labels)} labels for {len(real)} real images")
    if held_out is not None:
        check_images(held_out, "held-out images")
        if held_out.shape[1:] != real.shape[1:]:
            raise JeatError(
                f"held-out images {tuple(held_out.shape[1:])} and real images "
                f"{tuple(real.shape[1:])} differ in shape"
            )
        if held_out_labels is not None and len(held_out_labels) != len(held_out):
            raise JeatError(f"{len(held_out_labels)} labels for {len(held_out)} held-out images")
    probs, feats = backend.outputs(samples)
    real_probs, real_feats = backend.outputs(real)
    out = _scores(backend, probs, feats, labels, real_probs, real_feats, real_labels, splits, seed)
    if held_out is not None:
        pick = _subset(len(held_out), len(samples), seed + 2)
        if pick is not None:
            held_out = held_out[pick]
            held_out_labels = None if held_out_labels is None else held_out_labels[pick]
        h_probs, h_feats = backend.outputs(held_out)
        out.reference = _scores(
            backend,
            h_probs,
            h_feats,
            held_out_labels,
            real_probs,
            real_feats,
            real_labels,
            min(splits, len(held_out)),
            seed,
        )
    return out


def judge_verdicts(judge: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """The judge's predicted class of each image and its confidence (softmax probability of
    that class, in [0, 1])."""
    probs, _ = judge_outputs(judge, images)
    conf, pred = probs.max(1)
    return pred, conf


# -- the judge: trained once per dataset and cached ----------------------------------------

JUDGE_SEED = 1000  # independent of every model's seed (the defaults use 0)


def judge_dir(dataset: str, image_size: int | None = None) -> Path:
    """Cache folder of the judge of ``dataset``: ``$JEAT_JUDGE_DIR/<dataset>``, else
    ``$XDG_CACHE_HOME/jeat/judges/<dataset>`` or ``~/.cache/jeat/judges/<dataset>``. A user's
    ``folder:``/``npz:`` data is ``folder-NAME-HASH``, the hash of its path and image size."""
    from jeat.data import dataset_slug

    name = dataset_slug(dataset, image_size, unique=True)
    env = os.environ.get("JEAT_JUDGE_DIR")
    if env:
        return Path(env).expanduser() / name
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "jeat" / "judges" / name


def judge_config(
    dataset: str,
    epochs: int | None = None,
    overrides: tuple[str, ...] = (),
    image_size: int | None = None,
):
    """The judge's recipe: the dataset family's ``standard`` config with twice the width and
    batch norm, its own seed (:data:`JUDGE_SEED`), none of a run's final steps (evaluation,
    samples, analysis, scores, report). A user's ``folder:``/``npz:`` data takes the recipe of
    the built-in family its images are closest to: digits up to 16 pixels a side, MNIST for
    other grayscale images, CIFAR-10 for colour."""
    import json

    from jeat.config import load_config
    from jeat.data import dataset_info

    info = dataset_info(dataset, image_size)
    name = info.name
    if name == "digits" or name.startswith("mnist"):
        family = name.split("-")[0]
    elif name.startswith("cifar"):
        family = "cifar10"
    else:
        c, h, w = info.shape
        family = "digits" if max(h, w) <= 16 else "mnist" if c == 1 else "cifar10"
    base = load_config(f"{family}-standard")
    width = 2 * int(base.model.options.get("width", 32))
    sets = [
        f"data.name={json.dumps(name)}",
        f"data.image_size={'null' if image_size is None else image_size}",
        f"seed={JUDGE_SEED}",
        f"model.options.width={width}",
        "model.options.norm=batch",  # a judge need not be attackable: batch norm trains fast
        "final_eval=false",
        "final_samples=false",
        "final_analysis=false",
        "final_scores=false",
        "final_report=false",
    ]
    if epochs is not None:
        sets.append(f"epochs={epochs}")
    return load_config(f"{family}-standard", [*sets, *overrides])


def train_judge(
    dataset: str,
    data=None,
    folder: str | Path | None = None,
    epochs: int | None = None,
    force: bool = False,
    progress: bool = True,
    overrides: tuple[str, ...] = (),
    image_size: int | None = None,
) -> tuple[nn.Module, float, Path]:
    """Train (or resume, or reuse) the judge of ``dataset`` in ``folder`` (default:
    :func:`judge_dir`); returns it, its clean test accuracy (%) and the folder. ``data`` is the
    loaded :class:`jeat.data.ImageDataset` (loaded from the cache dir when None); ``overrides``
    are ``key=value`` config changes to the recipe of :func:`judge_config`."""
    import shutil

    from jeat.attacks import LinfBall
    from jeat.data import load_dataset
    from jeat.evaluate import evaluate
    from jeat.locks import LOCK_NAME, hold_folder
    from jeat.runs import load_trained
    from jeat.train import train

    cfg = judge_config(
        dataset, epochs, (*overrides, *(() if progress else ("progress=false",))), image_size
    )
    folder = Path(folder) if folder is not None else judge_dir(dataset, image_size)
    data = data if data is not None else load_dataset(cfg.data.name, image_size=image_size)
    run_files = (folder / "run.json").exists() or (folder / "model.pt").exists()
    if force and folder.exists() and not run_files:
        raise JeatError(f"{folder} exists and is not a jeat run; not removing it")
    # one process trains a judge; another that needs it meanwhile waits, then reuses it
    with hold_folder(folder, wait=True):
        if force:
            for item in folder.iterdir():  # all but the lock this process holds
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item)
                elif item.name != LOCK_NAME:
                    item.unlink()
        if not (folder / "model.pt").exists():
            resume = (folder / "checkpoints" / "last.pt").exists()
            train(cfg, folder, resume=resume, data=data)
        judge, _, _ = load_trained(folder)
        table = evaluate(judge, data.x_test, data.y_test, ["clean"], LinfBall(0.0))
        acc = table.rows[0].accuracy
        assert acc is not None
        write_json(folder / "judge.json", {"dataset": cfg.data.name, "test_accuracy": acc})
    return judge, acc, folder


def load_judge(
    dataset: str, path: str | Path | None = None, image_size: int | None = None
) -> nn.Module:
    """The cached judge of ``dataset`` (or the run at ``path``); a clear error when there is
    none yet."""
    from jeat.data import dataset_info
    from jeat.runs import load_trained

    folder = Path(path) if path is not None else judge_dir(dataset, image_size)
    if not (folder / "model.pt").exists() and not folder.is_file():
        raise JeatError(
            f"no judge for {dataset} at {folder}; train one with "
            f"`jeat judge train --dataset {dataset}"
            f"{'' if image_size is None else f' --image-size {image_size}'}` (or pass --judge RUN)"
        )
    judge, meta, _ = load_trained(folder)
    trained_on = meta.get("dataset")
    theirs = meta.get("image_shape")
    if theirs is None and trained_on is not None:  # runs written before image_shape was kept
        with contextlib.suppress(JeatError):
            theirs = list(dataset_info(trained_on).shape)
    ours = list(dataset_info(dataset, image_size).shape)
    if trained_on is not None and theirs is not None and list(theirs) != ours:
        raise JeatError(
            f"the judge at {folder} was trained on {trained_on}, whose images differ in shape "
            f"from {dataset}'s"
        )
    return judge
