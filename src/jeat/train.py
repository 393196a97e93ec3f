"""The training loop: one loop for every objective, and nothing else.

:func:`train` trains (or resumes) a run into its folder (layout: :mod:`jeat.runs`): it writes
``config.yaml``, ``run.json``, ``metrics.jsonl``, ``events.jsonl``, ``checkpoints/last.pt`` and,
when the last epoch is done, ``model.pt``. A run's final steps (evaluation, samples, energy
analysis, judge scores, report) are :mod:`jeat.finish`'s; ``jeat train`` runs both
(:func:`jeat.finish.train_and_finish`).

Under ``torchrun`` the run is data-parallel (:mod:`jeat.distributed`): every rank trains, rank
0 alone writes the folder. The training step's precision, memory layout and compilation are the
``perf`` settings (:mod:`jeat.accel`).

Exact resume: all randomness is derived from ``(seed, epoch, step)`` (data order per epoch,
augmentation and attack random starts per step), and the learning rate is a function of the
global step, so a run killed after any checkpoint and resumed ends with the same weights as an
uninterrupted run.

Stability: a step whose loss is not finite, whose mean energies or data-vs-sample energy gap
exceed ``stability.*_bound``, or whose loss spikes above ``stability.spike_factor`` times the
recent median counts as diverged. The loop then rolls back to the last good state (kept in
memory at every checkpoint), restarts the objective's sampler, multiplies the learning rate by
``stability.lr_factor`` and goes on, logging the event; after ``stability.max_recoveries``
roll-backs it stops with a clear error.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from jeat import distributed
from jeat.accel import Accelerator
from jeat.checkpoint import load_checkpoint, load_state_into, save_checkpoint
from jeat.config import TrainConfig, config_to_dict, validate_config
from jeat.data import (
    DatasetInfo,
    ImageDataset,
    augment_batch,
    dataset_info,
    load_dataset,
    split_validation,
)
from jeat.distributed import DistContext, ObjectiveStep
from jeat.errors import JeatError
from jeat.evaluate import EvalResult, evaluate
from jeat.locks import LOCK_NAME, hold_folder
from jeat.objectives import Objective, create_objective
from jeat.runs import RunPaths, build_model, eval_threat, load_trained, run_meta
from jeat.utils import atomic_write, derive_seed, resolve_device, write_json

__all__ = ["TrainResult", "train", "train_view", "make_optimizer", "lr_factor"]

# Config keys that may change when a run is resumed (everything else must match).
_RESUMABLE_CHANGES = {
    "epochs",
    "progress",
    "device",
    "final_eval",
    "final_samples",
    "final_analysis",
    "final_scores",
    "final_report",
    "tensorboard",
    "analysis",
    "perf",
    "stability",
    "generate",
    "eval",
}


@dataclass
class TrainResult:
    """What :func:`train` returns. ``complete``: every epoch is done and ``model.pt`` written
    (false after ``stop_after``). ``data`` is what the run trained on (``data.train_subset``
    applied), ``full_data`` the whole dataset. ``eval`` is the final robustness table once
    :func:`jeat.finish.finish_run` has run."""

    paths: RunPaths
    model: nn.Module
    metrics: list[dict[str, Any]]
    eval: EvalResult | None
    resumed_from_epoch: int | None
    complete: bool = False
    data: ImageDataset | None = None
    full_data: ImageDataset | None = None


def train_view(cfg: TrainConfig, data: ImageDataset) -> ImageDataset:
    """The data a run of ``cfg`` trains on: the first ``data.train_subset`` training images
    (all when it is None) less the validation split ``data.val_split`` held out of them (seeded
    by the run's seed, :func:`jeat.data.split_validation`), and the whole test set."""
    m = cfg.data.train_subset
    if m is not None:
        data = ImageDataset(data.info, data.x_train[:m], data.y_train[:m], data.x_test, data.y_test)
    if cfg.data.val_split > 0:
        data = split_validation(data, cfg.data.val_split, derive_seed(cfg.seed, 17))
    return data


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov and o.momentum > 0,
            weight_decay=o.weight_decay,
        )
    if o.name in ("adam", "adamw"):
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return cls(
            model.parameters(),
            lr=o.lr,
            betas=tuple(o.betas),
            weight_decay=o.weight_decay,
            amsgrad=o.amsgrad,
        )
    raise JeatError(f"unknown optimizer '{o.name}'; choose sgd, adam or adamw")


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning-rate multiplier at global ``step`` of ``total`` (warm-up, then the schedule)."""
    s = cfg.schedule
    warm = s.warmup_steps
    if warm > 0 and step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if s.name == "constant":
        return 1.0
    if s.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if s.name == "multistep":
        return s.gamma ** sum(progress >= m for m in s.milestones)
    raise JeatError(f"unknown schedule '{s.name}'; choose constant, cosine or multistep")


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig, root: Path) -> None:
    now = config_to_dict(cfg)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    bad = [k for k in diff if k not in _RESUMABLE_CHANGES]
    if bad:
        raise JeatError(
            f"{root} was trained with a different config ({', '.join(bad)} differ); resume "
            "without changing those settings, or train into a new --out folder"
        )


def _read_metrics(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("epoch", 0) <= upto_epoch]


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_write(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def _epoch_check(
    cfg: TrainConfig, model: nn.Module, data: ImageDataset, device: torch.device, epoch: int
) -> dict[str, float]:
    """Clean (and PGD-``eval.epoch_steps``) accuracy on the validation split, when the run
    holds one out, and on the first ``eval.epoch_n`` test points (``val_*`` and ``test_*``)."""
    attacks = ["clean"] + ([f"pgd{cfg.eval.epoch_steps}"] if cfg.eval.epoch_steps > 0 else [])
    parts = [("test", data.x_test[: max(0, cfg.eval.epoch_n)], data.y_test[: cfg.eval.epoch_n])]
    if data.x_val is not None and data.y_val is not None:
        parts.insert(0, ("val", data.x_val, data.y_val))
    out: dict[str, float] = {}
    for name, x, y in parts:
        if len(x) == 0:
            continue
        res = evaluate(
            model,
            x,
            y,
            attacks,
            eval_threat(cfg, data.info),
            batch_size=cfg.eval.batch_size,
            seed=derive_seed(cfg.seed, epoch, 7),
            mode="independent",
        )
        out[f"{name}_clean_acc"] = float(res.rows[0].accuracy or 0.0)
        if len(res.rows) > 1:
            out[f"{name}_pgd_acc"] = float(res.rows[1].accuracy or 0.0)
    return out


def selection_metric(row: dict[str, Any]) -> tuple[str, float] | None:
    """What ``keep: best`` selects by in an epoch's metrics row: the validation PGD accuracy,
    or the validation clean accuracy when the per-epoch check runs no attack."""
    for key in ("val_pgd_acc", "val_clean_acc"):
        if key in row:
            return key, float(row[key])
    return None


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging, as Gowal et al.
    2020 use for adversarial training): after optimiser step ``t``,
    ``avg = d * avg + (1 - d) * weights`` with ``d = min(decay, (1 + t) / (10 + t))``, so the
    early average follows the fast-moving weights. Buffers (batch-norm statistics) are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise JeatError(f"weight-average decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        avg = [p for p in self.module.parameters()]
        now = [p.detach() for p in model.parameters()]
        torch._foreach_mul_(avg, d)
        torch._foreach_add_(avg, now, alpha=1.0 - d)
        for b_avg, b_now in zip(self.module.buffers(), model.buffers(), strict=True):
            b_avg.copy_(b_now)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        load_state_into(self.module, state, path, "weight average")


def _warm_start(model: nn.Module, cfg: TrainConfig, info: DatasetInfo) -> None:
    """Copy the weights of run/checkpoint ``cfg.model.init_from`` into ``model``."""
    source = Path(str(cfg.model.init_from))
    if not source.exists():
        raise JeatError(f"model.init_from: {source} does not exist")
    src, meta, _ = load_trained(source)
    want = (cfg.model.name, dict(cfg.model.options), info.num_classes, info.shape[0])
    have = (meta["model"], meta["model_options"], meta["num_classes"], meta["in_channels"])
    if want != have:
        raise JeatError(
            f"model.init_from: {source} holds {have[0]} {have[1]} for {have[2]} classes and "
            f"{have[3]} channel(s); this run builds {want[0]} {want[1]} for {want[2]} classes "
            f"and {want[3]} channel(s)"
        )
    model.load_state_dict(src.state_dict())


def _prepare_run(
    cfg: TrainConfig, out: Path, resume: bool, data: ImageDataset | None
) -> tuple[ImageDataset, ImageDataset, nn.Module, Objective, dict | None]:
    """Validate everything that can fail before any file is written. Returns the training
    data (``data.train_subset`` applied) and the full dataset, the model, the objective and the
    checkpoint to resume from (or None)."""
    validate_config(cfg)
    info = data.info if data is not None else dataset_info(cfg.data.name, cfg.data.image_size)
    torch.manual_seed(derive_seed(cfg.seed, 0, 0, 0))  # the initial weights depend on the seed
    model = build_model(cfg, info)
    objective = create_objective(cfg.objective, info)
    eval_threat(cfg, info)  # the evaluation budget (eval.eps), checked before any file
    make_optimizer(cfg, model)
    lr_factor(cfg, 0, 1)
    paths = RunPaths(out)
    payload = None
    if paths.checkpoint.exists() or paths.model.exists():
        if not resume:
            raise JeatError(
                f"{out} already holds a run; pass --resume to continue it, or choose another --out"
            )
        if not paths.checkpoint.exists():
            raise JeatError(f"{out} holds a finished run with no checkpoint to resume from")
        payload = load_checkpoint(paths.checkpoint)
        _check_resume_config(payload.get("config", {}), cfg, out)
    elif out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()) and not resume:
        raise JeatError(f"{out} exists and is not empty; choose a new --out folder")
    if payload is None and cfg.model.init_from:
        _warm_start(model, cfg, info)
    if data is None:
        data = load_dataset(
            cfg.data.name,
            root=cfg.data.root,
            download=cfg.data.download,
            image_size=cfg.data.image_size,
        )
    return train_view(cfg, data), data, model, objective, payload


def train(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    data: ImageDataset | None = None,
    argv: list[str] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train (or resume) a run into folder ``out``; see the module docstring for its layout.

    If a fresh run fails before its first checkpoint (an error, a NaN loss, Ctrl-C), the files
    it created are removed again, so a corrected re-run can use the same folder.

    This is the loop alone: the final steps that the config's ``final_*`` keys ask for run in
    :func:`jeat.finish.finish_run` (:func:`jeat.finish.train_and_finish` does both).

    ``stop_after=k`` stops once epoch ``k`` of the ``cfg.epochs`` is done and checkpointed,
    without writing ``model.pt``: the learning-rate schedule stays that of the
    whole run, and ``resume=True`` later goes on exactly as if the run had not stopped (for
    time-limited cluster jobs, and for benchmarks that interleave runs epoch by epoch).
    """
    if stop_after is not None and (
        isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1
    ):
        raise JeatError(f"stop_after must be an epoch number >= 1, got {stop_after!r}")
    out = Path(out)
    validate_config(cfg)  # before the folder is touched
    ctx, device = distributed.setup(cfg.device)
    try:
        with _hold_run_folder(out, ctx):
            # the run lives in its own frame, so that its DDP wrapper (which holds the process
            # group) is garbage by the time the group is destroyed
            return _run(cfg, out, resume, data, argv, stop_after, ctx, device)
    finally:
        distributed.teardown(ctx)


TRAIN_HINT = "wait for it to end, or train into another --out folder"


@contextlib.contextmanager
def _hold_run_folder(out: Path, ctx: DistContext):
    """One writer per run folder (:mod:`jeat.locks`): rank 0 holds ``out`` for the whole run;
    under torchrun every rank learns at once whether it could, so that all stop with its
    error."""
    with contextlib.ExitStack() as stack:
        error = None
        if ctx.is_main:
            try:
                stack.enter_context(hold_folder(out, hint=TRAIN_HINT))
            except JeatError as exc:
                error = exc
        if ctx.enabled:
            told = ctx.all_gather(None if error is None else str(error))[0]
            if error is None and told is not None:
                error = JeatError(told)
        if error is not None:
            raise error
        yield


def _run(
    cfg: TrainConfig,
    out: Path,
    resume: bool,
    data: ImageDataset | None,
    argv: list[str] | None,
    stop_after: int | None,
    ctx: DistContext,
    device: torch.device,
) -> TrainResult:
    """The body of :func:`train`, inside the process group."""
    data, full, model, objective, payload = _prepare_run(cfg, out, resume, data)
    if ctx.enabled:
        _check_shards(cfg, len(data.x_train), ctx)
        ctx.barrier()  # every rank has checked the folder before rank 0 writes to it
    existed = out.exists()
    loop = _Loop(cfg, RunPaths(out), data, model, objective, ctx, device)
    loop.full_data = full  # the judge and the scores' real images: never a smoke-run subset
    try:
        if payload is not None:
            loop.restore(payload)
        else:
            loop.start(argv)
        loop.open_tensorboard(payload is not None)
        loop.fit(cfg.epochs if stop_after is None else min(stop_after, cfg.epochs))
    except BaseException:
        loop.close_tensorboard()
        if ctx.is_main and payload is None and not loop.paths.checkpoint.exists():
            loop.remove_new_files(existed)
        raise
    loop.close_tensorboard()
    if stop_after is not None and stop_after < cfg.epochs:
        resumed_from = loop.start_epoch if payload is not None else None
        if ctx.is_main:
            print(f"stopped after epoch {stop_after} of {cfg.epochs}; continue with resume")
        return TrainResult(
            loop.paths, loop.model, loop.metrics, None, resumed_from, False, data, full
        )
    return loop.finish(resumed=payload is not None)


def _check_shards(cfg: TrainConfig, n_train: int, ctx: DistContext) -> None:
    """Every global batch, the last one included, must give each rank at least one image."""
    last = n_train % cfg.batch_size or cfg.batch_size
    if min(cfg.batch_size, last) < ctx.world_size:
        raise JeatError(
            f"batch_size {cfg.batch_size} over {n_train} training images leaves a batch of "
            f"{min(cfg.batch_size, last)} for {ctx.world_size} processes; every process needs "
            "at least one image: change batch_size or data.train_subset"
        )


class _Loop:
    """The state of one training run and the steps that move it forward."""

    def __init__(
        self,
        cfg: TrainConfig,
        paths: RunPaths,
        data: ImageDataset,
        model: nn.Module,
        objective: Objective,
        ctx: DistContext | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.cfg, self.paths, self.data, self.objective = cfg, paths, data, objective
        self.ctx = ctx or DistContext()
        self.main = self.ctx.is_main  # this process writes the run folder
        self.device = device if device is not None else resolve_device(cfg.device)
        self.accel = Accelerator.from_perf(self.device, cfg.perf)
        self.model = model  # the module whose weights are saved
        net = self.accel.prepare(model)  # on the device; compiled when asked
        self.ema = WeightAverage(model, cfg.ema) if cfg.ema > 0 else None
        # the best validation epoch so far (keep: best): {"epoch", "metric", "value"}
        self.best: dict[str, Any] | None = None
        self.optimizer = make_optimizer(cfg, self.model)
        self.meta = run_meta(cfg, data.info)
        self.start_epoch, self.start_step = 0, 0
        self.sums: dict[str, float] = {}
        self.metrics: list[dict[str, Any]] = []
        self.lr_scale = 1.0  # lowered by each recovery from a divergence
        self.recoveries = 0
        self.recent_losses: list[float] = []
        self.good: dict[str, Any] | None = None  # in-memory copy of the last good state
        self.tb: Any = None  # TensorBoard SummaryWriter, when logging
        self.full_data = data  # the whole dataset when data.train_subset trims ``data``
        if self.ctx.enabled:  # each rank's replay buffer starts from its own random draw
            torch.manual_seed(self._seed(0, 0, 3))
        objective.setup(data, self.device)
        # the objective (attack, sampler, loss) as one module call; DDP-wrapped under torchrun
        self.runner = distributed.wrap(ObjectiveStep(net, objective), self.ctx, self.device)
        self.batches = _Batches(data, self.device)
        self.steps_per_epoch = (len(data.x_train) + cfg.batch_size - 1) // cfg.batch_size
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.augment = data.info.augment if cfg.data.augment else "none"

    # ----------------------------------------------------------------- run folder
    def _seed(self, *parts: int) -> int:
        """A seed from the run's seed and ``parts`` (and this process's rank under torchrun)."""
        rank = (self.ctx.rank,) if self.ctx.enabled else ()
        return derive_seed(self.cfg.seed, *parts, *rank)

    def start(self, argv: list[str] | None) -> None:
        if not self.main:
            return
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self._write_config()
        write_json(
            self.paths.run_info,
            {
                **self.meta,
                "argv": argv if argv is not None else sys.argv,
                "python": platform.python_version(),
                "platform": platform.platform(),
                "device": str(self.device),
                "perf": self.accel.describe(),
                "world_size": self.ctx.world_size,
                "train_size": len(self.data.x_train),
                "test_size": len(self.data.x_test),
            },
        )

    def restore(self, payload: dict[str, Any]) -> None:
        ckpt = self.paths.checkpoint
        load_state_into(self.model, payload["model_state"], ckpt, "model")
        if self.ema is not None:
            if "ema_state" not in payload:
                raise JeatError(f"checkpoint {ckpt} holds no weight average to resume ema from")
            self.ema.load_state_dict(payload["ema_state"], ckpt)
        self.best = payload.get("best")
        try:
            self.optimizer.load_state_dict(payload["optimizer_state"])
        except (ValueError, KeyError) as exc:
            raise JeatError(f"checkpoint {ckpt}: optimiser state does not match ({exc})") from None
        self._restore_objective(payload)
        self.start_epoch, self.start_step = int(payload["epoch"]), int(payload["step"])
        self.sums = {k: float(v) for k, v in payload.get("sums", {}).items()}
        self.lr_scale = float(payload.get("lr_scale", 1.0))
        self.recoveries = int(payload.get("recoveries", 0))
        self.metrics = _read_metrics(self.paths.metrics, self.start_epoch)
        if not self.main:
            return
        for stale in [*self.paths.root.glob(".*.tmp"), *ckpt.parent.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)  # a temp file left by a kill during an (atomic) write
        if config_to_dict(self.cfg) != payload.get("config"):
            self._write_config()  # e.g. more epochs
        print(f"resuming {self.paths.root} at epoch {self.start_epoch + 1}, step {self.start_step}")

    def _restore_objective(self, payload: dict[str, Any]) -> None:
        """Each rank takes its own objective state (replay buffer) from the checkpoint."""
        saved = int(payload.get("world_size", 1))
        states = payload.get("objective_states") or [payload.get("objective_state", {})]
        if any(states) and saved != self.ctx.world_size:
            raise JeatError(
                f"checkpoint {self.paths.checkpoint} holds the replay buffers of {saved} "
                f"process(es); resume with {saved} process(es), not {self.ctx.world_size}"
            )
        self.objective.load_state_dict(states[self.ctx.rank] if any(states) else {})

    def open_tensorboard(self, resumed: bool) -> None:
        """Start TensorBoard logging (``tensorboard``: None logs when the package is installed,
        True requires it). A resumed run drops events logged after its checkpoint."""
        self.tb = None
        if self.cfg.tensorboard is False or not self.main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            if self.cfg.tensorboard:
                raise JeatError(
                    f"tensorboard: true needs the tensorboard package "
                    f"(pip install 'jeat[tensorboard]'): {exc}"
                ) from None
            return
        # an epoch's row is logged at the global step that ends it, so the checkpoint's own
        # step is kept and everything after it (logged by the killed process) is dropped
        done = self.start_epoch * self.steps_per_epoch + self.start_step
        purge = done + 1 if resumed else None
        self.tb = SummaryWriter(str(self.paths.tensorboard), purge_step=purge)

    def close_tensorboard(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def log_tensorboard(self, row: dict[str, Any]) -> None:
        if self.tb is None:
            return
        for key, value in row.items():
            if key in ("epoch", "step") or not isinstance(value, (int, float)):
                continue
            group, _, name = key.partition("_")
            tag = f"{group}/{name}" if group in ("train", "val", "test") and name else f"run/{key}"
            self.tb.add_scalar(tag, value, row["step"])
        self.tb.flush()

    def remove_new_files(self, folder_existed: bool) -> None:
        p = self.paths
        for f in (p.config, p.run_info, p.metrics, p.events, p.best):
            f.unlink(missing_ok=True)
        if p.tensorboard.exists():
            import shutil

            shutil.rmtree(p.tensorboard)
        for d in (p.checkpoint.parent, p.root):
            if d.exists() and not any(d.iterdir()) and (d != p.root or not folder_existed):
                d.rmdir()

    def _write_config(self) -> None:
        with atomic_write(self.paths.config, "w") as fh:
            yaml.safe_dump(config_to_dict(self.cfg), fh, sort_keys=False)

    def state(self, epoch: int, step: int) -> dict[str, Any]:
        state = {
            "meta": self.meta,
            "config": config_to_dict(self.cfg),
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "objective_state": self.objective.state_dict(),
            "epoch": epoch,
            "step": step,
            "sums": self.sums,
            "lr_scale": self.lr_scale,
            "recoveries": self.recoveries,
            "best": self.best,
        }
        if self.ema is not None:
            state["ema_state"] = self.ema.state_dict()
        return state

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are checked, selected and saved: the average when ``ema`` is on."""
        return self.ema.module if self.ema is not None else self.model

    def select(self, row: dict[str, Any]) -> None:
        """``keep: best``: write ``checkpoints/best.pt`` when this epoch's validation accuracy
        is at least the best so far (ties go to the later, longer-trained epoch)."""
        picked = selection_metric(row) if self.cfg.keep == "best" else None
        if picked is None:
            return
        metric, value = picked
        if self.best is not None and value < float(self.best["value"]):
            return
        save_checkpoint(
            self.paths.best,
            {
                "meta": self.meta,
                "config": config_to_dict(self.cfg),
                "model_state": self.evaluated.state_dict(),
                "epoch": int(row["epoch"]),
            },
        )
        self.best = {"epoch": int(row["epoch"]), "metric": metric, "value": value}

    def checkpoint(self, epoch: int, step: int) -> None:
        """Write the checkpoint (rank 0, with every rank's objective state) and keep an
        in-memory copy of this rank's state as the last good state."""
        state = self.state(epoch, step)
        if self.ctx.enabled:
            states = self.ctx.all_gather(state["objective_state"])
            if self.main:
                save_checkpoint(
                    self.paths.checkpoint,
                    {**state, "objective_states": states, "world_size": self.ctx.world_size},
                )
        else:
            save_checkpoint(self.paths.checkpoint, state)
        self.good = copy.deepcopy(state)

    # ----------------------------------------------------------------- training
    def fit(self, end: int) -> None:
        """Run the epochs up to ``end``, rolling back to the last good state on a divergence."""
        self.good = copy.deepcopy(self.state(self.start_epoch, self.start_step))
        epoch, step = self.start_epoch, self.start_step
        while epoch < end:
            try:
                for e in range(epoch, end):
                    self.epoch(e, step if e == epoch else 0)
                return
            except _Divergence as div:
                epoch, step = self.recover(div)

    def recover(self, div: _Divergence) -> tuple[int, int]:
        """Restore the last good state, restart the sampler, lower the LR; or give up."""
        st, cfg = self.cfg.stability, self.cfg
        where = f"epoch {div.epoch + 1}, step {div.step + 1}"
        if self.recoveries >= st.max_recoveries:
            raise JeatError(
                f"training diverged at {where} ({div.reason}) and did not recover after "
                f"{self.recoveries} roll-backs; lower optim.lr (now {cfg.optim.lr:g} x "
                f"{self.lr_scale:g}) and train again"
            )
        assert self.good is not None
        good = self.good
        self.model.load_state_dict(good["model_state"])
        if self.ema is not None:
            self.ema.load_state_dict(good["ema_state"], self.paths.checkpoint)
        self.best = good.get("best")
        self.optimizer.load_state_dict(good["optimizer_state"])
        self.objective.load_state_dict(good["objective_state"])
        self.objective.reset_state()
        self.sums = dict(good["sums"])
        self.recoveries += 1
        self.lr_scale *= st.lr_factor
        self.recent_losses = []
        event = {
            "event": "recovered",
            "at_epoch": div.epoch + 1,
            "at_step": div.step + 1,
            "reason": div.reason,
            "rolled_back_to_epoch": good["epoch"] + 1,
            "rolled_back_to_step": good["step"],
            "lr_scale": self.lr_scale,
            "recoveries": self.recoveries,
        }
        if not self.main:
            return int(good["epoch"]), int(good["step"])
        with open(self.paths.events, "a") as fh:
            fh.write(json.dumps(event) + "\n")
        print(
            f"jeat: training diverged at {where} ({div.reason}); rolled back to epoch "
            f"{good['epoch'] + 1} step {good['step']}, restarted the sampler, "
            f"LR x{self.lr_scale:g}",
            file=sys.stderr,
        )
        return int(good["epoch"]), int(good["step"])

    def epoch(self, epoch: int, first: int) -> None:
        cfg, spe = self.cfg, self.steps_per_epoch
        self.model.train()
        t0 = time.perf_counter()
        order = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch))  # same on every rank
        # moved once to where the training set lives, so that taking a batch copies nothing
        # from the host (a copy from pageable host memory makes the host wait for the device)
        perm = torch.randperm(len(self.data.x_train), generator=order).to(self.batches.x.device)
        bar = _progress(cfg, spe, first, f"epoch {epoch + 1}/{cfg.epochs}", self.main)
        for step in range(first, spe):
            self.step(epoch, step, perm[step * cfg.batch_size : (step + 1) * cfg.batch_size])
            n = self.sums["n"]
            bar.update(1)
            bar.set_postfix(loss=f"{self.sums['loss'] / n:.3f}", acc=f"{self.sums['acc'] / n:.1f}")
            every = cfg.checkpoint_every_steps
            if every and (epoch * spe + step + 1) % every == 0 and step + 1 < spe:
                self.checkpoint(epoch, step + 1)
        bar.close()
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": (epoch + 1) * spe,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        count = max(1.0, self.sums.get("n", 0.0))
        row.update({f"train_{k}": v / count for k, v in self.sums.items() if k != "n"})
        row["epoch_seconds"] = time.perf_counter() - t0
        self.sums = {}
        if self.main:
            row.update(_epoch_check(cfg, self.evaluated, self.data, self.device, epoch))
            self.select(row)
            self.metrics.append(row)
            _write_metrics(self.paths.metrics, self.metrics)
            self.log_tensorboard(row)
        self.checkpoint(epoch + 1, 0)
        if cfg.progress and self.main:
            shown = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}
            print(json.dumps(shown), file=sys.stderr, flush=True)

    def step(self, epoch: int, step: int, idx: torch.Tensor) -> None:
        """One optimiser step on the global batch ``idx`` (this rank's shard of it)."""
        cfg, dev, ctx = self.cfg, self.device, self.ctx
        torch.manual_seed(self._seed(epoch, step, 1))
        local = distributed.shard(idx, ctx)
        xb, yb = self.batches.get(local)
        if self.augment != "none":
            g = torch.Generator(device=dev).manual_seed(self._seed(epoch, step, 2))
            xb = augment_batch(xb, self.augment, g)
        xb = self.accel.batch(xb)
        factor = lr_factor(cfg, epoch * self.steps_per_epoch + step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.optim.lr * self.lr_scale * factor
        self.objective.begin_step(epoch * self.steps_per_epoch + step)
        with self.accel.autocast():
            result = self.runner(xb, yb)
        loss = result.loss
        # the step's sums [images, loss, correct, metrics...] in one vector, added over ranks:
        # one host sync per step, and every rank sees the same numbers (and so decides alike)
        b, keys = len(local), sorted(result.metrics)
        parts = [
            loss.detach().float().new_full((), float(b)),  # a fill, not a host-to-device copy
            loss.detach().float() * b,
            (result.logits.argmax(1) == result.y).float().sum(),
            *(result.metrics[k].detach().float() * b for k in keys),
        ]
        values = ctx.all_reduce_sum(torch.stack(parts)).tolist()
        n = values[0]
        means = {k: values[3 + i] / n for i, k in enumerate(keys)}
        reason = self.diverged(values[1] / n, means)
        if reason:
            raise _Divergence(reason, epoch, step)
        self.optimizer.zero_grad(set_to_none=True)
        if ctx.enabled:  # DDP averages over ranks: weight each shard by its share of the batch
            loss = loss * (b * ctx.world_size / len(idx))
        loss.backward()
        if cfg.optim.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, epoch * self.steps_per_epoch + step)
        batch = {"loss": values[1], "acc": values[2] * 100, "n": n}
        batch.update({k: values[3 + i] for i, k in enumerate(keys)})
        for k, v in batch.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def diverged(self, loss: float, metrics: dict[str, float]) -> str | None:
        """Why this step counts as diverged (None if it does not)."""
        st = self.cfg.stability
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        for key in ("energy", "energy_data", "energy_sample"):
            if key in metrics:
                value = float(metrics[key])
                if not math.isfinite(value) or abs(value) > st.energy_bound:
                    return f"mean {key.replace('_', ' ')} {value:.4g} beyond {st.energy_bound:g}"
        if "energy_gap" in metrics and abs(float(metrics["energy_gap"])) > st.gap_bound:
            gap = float(metrics["energy_gap"])
            return f"data-vs-sample energy gap {gap:.4g} beyond {st.gap_bound:g}"
        recent = self.recent_losses
        if len(recent) >= st.window:
            median = sorted(abs(v) for v in recent)[len(recent) // 2]
            if abs(loss) > st.spike_factor * max(1.0, median):
                return f"loss spike {loss:.4g} (recent median {median:.4g})"
            recent.pop(0)
        recent.append(loss)
        return None

    # ----------------------------------------------------------------- outputs
    def finish(self, resumed: bool) -> TrainResult:
        """Save ``model.pt`` (rank 0) with the weights ``keep`` and ``ema`` pick, record which
        epoch was kept and why (``run.json``'s ``kept``), and return the finished run."""
        cfg, paths, model = self.cfg, self.paths, self.model
        if self.main:
            kept = self.kept()
            state = self.evaluated.state_dict()
            if kept["keep"] == "best":
                state = load_checkpoint(paths.best)["model_state"]
            load_state_into(model, state, paths.best, "model")
            save_checkpoint(
                paths.model,
                {
                    "meta": self.meta,
                    "config": config_to_dict(cfg),
                    "model_state": model.state_dict(),
                    "kept": kept,
                },
            )
            info = json.loads(paths.run_info.read_text()) if paths.run_info.exists() else {}
            write_json(paths.run_info, {**info, "kept": kept})
            print(f"kept {kept['why']}")
            print(f"wrote {paths.model}")
        elif self.ema is not None:
            model.load_state_dict(self.ema.state_dict())
        model.eval()
        resumed_from = self.start_epoch if resumed else None
        return TrainResult(
            paths, model, self.metrics, None, resumed_from, True, self.data, self.full_data
        )

    def kept(self) -> dict[str, Any]:
        """Which weights ``model.pt`` holds and why (written into ``run.json`` as ``kept``)."""
        cfg = self.cfg
        averaged = f"the weight average (decay {cfg.ema:g})" if self.ema is not None else ""
        what = averaged or "the weights"
        last = self.metrics[-1] if self.metrics else {}
        if cfg.keep == "best" and self.best is not None:
            metric, value = self.best["metric"], float(self.best["value"])
            final = last.get(metric)
            attack = f"PGD-{cfg.eval.epoch_steps}" if metric == "val_pgd_acc" else "clean"
            n_val = 0 if self.data.x_val is None else len(self.data.x_val)
            why = (
                f"{what} of epoch {self.best['epoch']} of {cfg.epochs}: the best validation "
                f"{attack} accuracy, {value:.1f}% on {n_val} held-out training images"
                + (f" (last epoch: {float(final):.1f}%)" if final is not None else "")
            )
            return {
                "keep": "best",
                "epoch": int(self.best["epoch"]),
                "epochs": cfg.epochs,
                "metric": metric,
                "value": value,
                "last_value": None if final is None else float(final),
                "val_size": n_val,
                "ema": cfg.ema,
                "why": why,
            }
        reason = "keep: last" if cfg.keep == "last" else "keep: best, but no epoch was checked"
        return {
            "keep": "last",
            "epoch": cfg.epochs,
            "epochs": cfg.epochs,
            "ema": cfg.ema,
            "why": f"{what} of the last epoch, {cfg.epochs} ({reason})",
        }


class _Divergence(Exception):
    """Raised inside the loop when a step diverged; handled by :meth:`_Loop.recover`."""

    def __init__(self, reason: str, epoch: int, step: int) -> None:
        super().__init__(reason)
        self.reason, self.epoch, self.step = reason, epoch, step


def _progress(cfg: TrainConfig, total: int, initial: int, desc: str, show: bool = True):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not (cfg.progress and show),
        leave=False,
        dynamic_ncols=True,
        file=sys.stderr,
    )


class _Batches:
    """Training batches on the device. On CUDA the whole training set is copied to the device
    once when it takes at most a quarter of the free device memory (CIFAR-10: 0.6 GB), so a
    batch is an on-device gather; otherwise each batch is gathered on the host into pinned
    memory and copied asynchronously. The data are in-memory tensors and augmentation runs on
    the device, so there is no per-batch host work that loader worker processes could hide."""

    def __init__(self, data: ImageDataset, device: torch.device) -> None:
        self.device = device
        x, y = data.x_train, data.y_train
        self.pinned = False
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if x.element_size() * x.numel() <= free // 4:
                x, y = x.to(device), y.to(device)
            else:
                self.pinned = True
        self.x, self.y = x, y

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.x.device)
        xb, yb = self.x[idx], self.y[idx]
        if self.pinned:
            xb, yb = xb.pin_memory(), yb.pin_memory()
        return xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
