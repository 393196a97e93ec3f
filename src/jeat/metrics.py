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
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import asdict, dataclass
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

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        text = (
            f"{self.is_label} {self.inception_score:.3f} ± {self.inception_score_std:.3f} "
            f"({self.splits} splits)  {self.fd_label} {self.frechet_distance:.3f}"
        )
        if self.accuracy is not None:
            text += f"  judge accuracy {self.accuracy:.1f}%"
        return text + f"  [{self.n_samples} samples vs {self.n_real} real]"


def score_samples(
    backend: FeatureBackend,
    samples: Tensor,
    real: Tensor,
    labels: Tensor | None = None,
    splits: int = 10,
) -> GenerationScores:
    """IS of ``samples`` and the Fréchet distance between their features and those of
    ``real``, with ``backend``'s network; for the judge backend, also the share of
    conditional samples (``labels`` >= 0) it assigns to their class."""
    check_images(samples, "samples")
    check_images(real, "real images")
    if samples.shape[1:] != real.shape[1:]:
        raise JeatError(
            f"samples {tuple(samples.shape[1:])} and real images {tuple(real.shape[1:])} "
            "differ in shape: score samples against the dataset they were generated for"
        )
    if labels is not None and len(labels) != len(samples):
        raise JeatError(f"{len(labels)} labels for {len(samples)} samples")
    probs, feats = backend.outputs(samples)
    _, real_feats = backend.outputs(real)
    mean, std = inception_score(probs, splits)
    fd = frechet_distance(*feature_statistics(feats), *feature_statistics(real_feats))
    acc = None
    if backend.name == "judge" and labels is not None:
        labels = labels.cpu().long()
        known = labels >= 0
        if known.any():
            hits = probs.argmax(1)[known] == labels[known]
            acc = 100.0 * float(hits.double().mean())
    return GenerationScores(
        backend.name,
        backend.is_label,
        backend.fd_label,
        len(samples),
        len(real),
        splits,
        mean,
        std,
        fd,
        acc,
    )


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
