"""Helpers shared by the benchmark scripts (not part of the library): train-or-reuse a run,
the judge classifier, judge-based generation scores and the machine line of a results file.

The benchmarks import it as a sibling module (``python benchmarks/<script>.py`` puts this
folder first on ``sys.path``).
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
from pathlib import Path

import torch

from jeat.attacks import LinfBall
from jeat.config import GenerateConfig, TrainConfig
from jeat.data import ImageDataset
from jeat.evaluate import evaluate
from jeat.metrics import judge_scores
from jeat.samplers import generate, sample_seeds
from jeat.train import load_trained, train
from jeat.utils import save_image_grid

ROOT = Path(__file__).resolve().parents[1]


def train_or_reuse(
    cfg: TrainConfig, folder: Path, data: ImageDataset
) -> tuple[torch.nn.Module, float]:
    """Train (or reuse / resume) a run; returns the model and its mean seconds per epoch.

    A folder holding ``model.pt`` is reused; one holding ``checkpoints/last.pt`` resumes; any
    other existing folder is our own run killed before its first checkpoint and is restarted.
    """
    if (folder / "model.pt").exists():
        print(f"  reusing {folder}", flush=True)
    else:
        resume = (folder / "checkpoints" / "last.pt").exists()
        if folder.exists() and not resume:
            shutil.rmtree(folder)
        train(cfg, folder, resume=resume, data=data)
    model, _, _ = load_trained(folder)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return model, statistics.mean(r["epoch_seconds"] for r in rows)


def train_judge(
    cfg: TrainConfig, folder: Path, data: ImageDataset
) -> tuple[torch.nn.Module, float]:
    """The judge: an independently trained standard classifier (its own seed and width) that
    scores generated images; returns it and its clean test accuracy (%)."""
    judge, _ = train_or_reuse(cfg, folder, data)
    acc = evaluate(judge, data.x_test, data.y_test, ["clean"], LinfBall(0.0)).rows[0].accuracy
    assert acc is not None
    return judge, acc


def generation_scores(
    model: torch.nn.Module,
    data: ImageDataset,
    judge: torch.nn.Module,
    *,
    method: str,
    steps: int,
    per_class: int,
    seed: int,
    seed_resolution: int,
    grid: Path | None = None,
) -> dict[str, float]:
    """Judge scores of ``per_class`` class-conditional samples per class drawn from ``model``
    with ``method`` (descent | sgld) against the test images; optionally saves the first 10 of
    each class as a grid."""
    info = data.info
    g = GenerateConfig(method=method, steps=steps, seed_resolution=seed_resolution)
    images, labels = generate(model, data, g, n_per_class=per_class, seed=seed)
    if grid is not None:
        k, show = info.num_classes, min(per_class, 10)
        picked = images.view(k, per_class, *info.shape)[:, :show].reshape(-1, *info.shape)
        save_image_grid(picked, grid, nrow=show)
    return judge_scores(judge, images, data.x_test, labels).to_dict()


def reference_scores(
    data: ImageDataset, judge: torch.nn.Module, per_class: int, seed: int, seed_resolution: int
) -> dict[str, dict[str, float]]:
    """Judge scores of the samplers' starting points (class-Gaussian seeds, no model) and of
    real training images: the two ends every model's samples lie between."""
    k = data.info.num_classes
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(k).repeat_interleave(per_class)
    seeds = sample_seeds("class", data, labels, gen, max_side=seed_resolution)
    pick = torch.randperm(len(data.x_train), generator=gen)[: k * per_class]
    return {
        "class-Gaussian seeds (no model)": judge_scores(
            judge, seeds, data.x_test, labels
        ).to_dict(),
        "real training images": judge_scores(
            judge, data.x_train[pick], data.x_test, data.y_train[pick]
        ).to_dict(),
    }


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}"
    )
