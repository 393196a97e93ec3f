"""Run folders: their layout, the model a run builds, and loading a trained run.

A run lives in one folder::

    RUN/config.yaml          resolved config (what was run)
    RUN/run.json             versions, command line, dataset and model facts; ``kept``: which
                         epoch's weights model.pt holds and why
    RUN/metrics.jsonl        one JSON line per epoch
    RUN/events.jsonl         divergences detected and recovered from (if any)
    RUN/checkpoints/last.pt  latest checkpoint (atomic; model, optimiser, objective state)
RUN/checkpoints/best.pt  the best validation epoch's weights (``keep: best``)
    RUN/model.pt             final weights + metadata (what eval/generate load)
    RUN/eval.json            final robustness table (+ eval.md, curve-pgd20-linf.{csv,png})
    RUN/samples.png          class-conditional samples, one row per class
    RUN/analysis/            energy landscape: analysis.json and four PNGs (jeat.analysis)
    RUN/scores.json          judge-IS / judge-FID of generated samples (jeat.metrics)
    RUN/report.html          everything above on one self-contained page (jeat.report)
    RUN/tensorboard/         TensorBoard event files, when tensorboard is installed
    RUN/.lock                while a process writes the folder (jeat.locks): who it is

:mod:`jeat.train` writes the first six (the loop), :mod:`jeat.finish` the rest (a run's final
steps). Every command that writes into a run folder holds it (:func:`jeat.locks.hold_folder`
on the folder :func:`run_folder_of` finds), so that one process at a time writes there. Models
from anywhere else (a user's code, TorchScript, ``torch.export``) load through
:func:`jeat.sources.load_model`, which calls :func:`load_trained` for run folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jeat.attacks import ThreatModel, make_threat
from jeat.attacks.threats import check_budget
from jeat.checkpoint import load_checkpoint, load_state_into
from jeat.config import TrainConfig, config_from_dict
from jeat.data import DatasetInfo
from jeat.errors import JeatError
from jeat.locks import LOCK_NAME
from jeat.models import create_model
from jeat.utils import resolve_device
from jeat.version import __version__

__all__ = [
    "RunPaths",
    "build_model",
    "run_meta",
    "load_trained",
    "eval_threat",
    "run_folder_of",
]


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def run_info(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "checkpoints" / "best.pt"

    @property
    def model(self) -> Path:
        return self.root / "model.pt"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def scores(self) -> Path:
        return self.root / "scores.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def samples(self) -> Path:
        return self.root / "samples.png"

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder that a file (or folder) at ``path`` lies in: the nearest of ``path`` (a
    folder) or its parents that holds ``run.json`` or a lock file; None when there is none."""
    p = Path(path).absolute()
    start = p if p.is_dir() else p.parent
    for d in (start, *start.parents):
        if (d / "run.json").is_file() or (d / LOCK_NAME).is_file():
            return d
    return None


def build_model(cfg: TrainConfig, info: DatasetInfo) -> nn.Sequential:
    return create_model(
        cfg.model.name,
        in_channels=info.shape[0],
        num_classes=info.num_classes,
        mean=info.mean,
        std=info.std,
        **cfg.model.options,
    )


def run_meta(cfg: TrainConfig, info: DatasetInfo) -> dict[str, Any]:
    """The metadata saved with a run's weights: what :func:`load_trained` rebuilds the model
    from."""
    return {
        "model": cfg.model.name,
        "model_options": dict(cfg.model.options),
        "dataset": info.name,
        "in_channels": info.shape[0],
        "image_shape": list(info.shape),
        "num_classes": info.num_classes,
        "mean": list(info.mean),
        "std": list(info.std),
        "objective": cfg.objective.name,
        "jeat_version": __version__,
        "torch_version": str(torch.__version__),
    }


def load_trained(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict, TrainConfig]:
    """Load a trained model from a run folder (``model.pt``, else the last checkpoint) or a
    checkpoint file. Returns the model in eval mode, its metadata and its training config."""
    path = Path(path)
    if path.is_dir():
        paths = RunPaths(path)
        path = paths.model if paths.model.exists() else paths.checkpoint
        if not path.exists():
            raise JeatError(f"{paths.root} holds no model.pt or checkpoints/last.pt; train first")
    payload = load_checkpoint(path, map_location="cpu")
    try:
        meta, cfg = payload["meta"], config_from_dict(TrainConfig, payload["config"])
        state = payload["model_state"]
    except (KeyError, TypeError, JeatError):
        raise JeatError(f"checkpoint {path} lacks model metadata; it is not a jeat model") from None
    model = create_model(
        meta["model"],
        in_channels=meta["in_channels"],
        num_classes=meta["num_classes"],
        mean=meta["mean"],
        std=meta["std"],
        **meta["model_options"],
    )
    load_state_into(model, state, path, "model")
    model.to(resolve_device(device)).eval()
    return model, meta, cfg


def eval_threat(cfg: TrainConfig, info: DatasetInfo) -> ThreatModel:
    """The run's evaluation threat model: ``eval.norm`` at ``eval.eps`` (default: the
    dataset's budget for that norm)."""
    norm = cfg.eval.norm.lower()
    eps = cfg.eval.eps
    if eps is None:
        eps = info.eps_l2 if norm == "l2" else info.eps_linf
    return make_threat(norm, check_budget(norm, eps, info.shape, "eval.eps"))
