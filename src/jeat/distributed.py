"""Multi-GPU and multi-node training with ``torch.distributed``: DDP, launched by ``torchrun``.

``jeat train`` started under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``) trains data-parallel with PyTorch's own engine::

    torchrun --standalone --nproc_per_node 8 -m jeat.cli train --config cifar10-jeat-paper ...

What each piece does:

* **Process group**: NCCL on CUDA (each process takes ``cuda:LOCAL_RANK``), gloo on CPU.
* **Sampler**: ``batch_size`` is the *global* batch. Every rank draws the same seeded epoch
  permutation and takes its contiguous shard of each global batch (:func:`shard`), so a run on
  ``N`` processes visits exactly the batches of a one-process run. Each rank's loss is weighted
  by its shard's share of the batch, so DDP's gradient average is the full batch's mean
  gradient even when the last batch does not split evenly.
* **DDP**: the model is wrapped together with the objective (:class:`ObjectiveStep`), so the
  training attack and the SGLD sampler run inside one DDP forward: they take input gradients
  only, and DDP sees exactly one forward per backward.
* **Replay buffers** (JEM, JEAT) are per rank: each rank runs its own chains with its own
  random stream; the checkpoint holds every rank's buffer and a resume gives each rank its own.
* **Metrics**: each step's loss, accuracy and energies are summed across ranks before they are
  logged or checked, so every rank takes the same divergence decision.
* **Files**: rank 0 alone writes the run folder (config, metrics, checkpoints, model, final
  evaluation, report); the folder must be on a file system every rank can read for a resume.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from jeat.errors import JeatError
from jeat.utils import resolve_device

__all__ = ["DistContext", "from_env", "setup", "teardown", "shard", "ObjectiveStep"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module started the process group (and ends it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks, in place (a no-op on one process)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise JeatError(f"environment variable {name}={value!r} is not an integer") from None


def from_env() -> DistContext:
    """The job layout torchrun put in the environment (one process when there is none)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise JeatError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return DistContext(rank, world, local)


def setup(device_name: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the torchrun job (when there is one) and pick this process's device: ``auto`` and
    ``cuda`` mean ``cuda:LOCAL_RANK`` under torchrun."""
    ctx = from_env()
    if not ctx.enabled:
        return ctx, resolve_device(device_name)
    base = resolve_device(device_name)
    if base.type == "cuda":
        if device_name in ("auto", "cuda"):
            base = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(base)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if base.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size)
        except (RuntimeError, ValueError) as exc:
            raise JeatError(
                f"cannot join the torchrun job as rank {ctx.rank} of {ctx.world_size} "
                f"({backend}): {exc}"
            ) from None
        owns = True
    elif dist.get_world_size() != ctx.world_size:
        raise JeatError(
            f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE is "
            f"{ctx.world_size}"
        )
    return DistContext(ctx.rank, ctx.world_size, ctx.local_rank, owns), base


def teardown(ctx: DistContext) -> None:
    """End the process group if :func:`setup` started it.

    The DDP wrapper of the run that just ended holds the group and sits in reference cycles,
    so without a collection it would outlive ``destroy_process_group`` until the interpreter
    shuts down (seen: one wrapper alive at this point before, none now). Collecting it first
    lets the group really end here. (A rare abort at the very end of two-process gloo runs
    was not cured by this alone; :mod:`jeat.cli` leaves torchrun processes without the
    interpreter's shutdown.)"""
    if ctx.owns_group and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def shard(idx: Tensor, ctx: DistContext) -> Tensor:
    """This rank's contiguous part of a global batch's indices (sizes differ by at most 1)."""
    if not ctx.enabled:
        return idx
    return torch.tensor_split(idx, ctx.world_size)[ctx.rank]


class ObjectiveStep(nn.Module):
    """``objective(model, x, y)`` as one module call, the unit that DDP wraps: the attack and
    sampler forwards inside it take input gradients only, and the parameters get their
    gradients from the one backward of the returned loss."""

    def __init__(self, model: nn.Module, objective: Any) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x: Tensor, y: Tensor) -> Any:
        return self.objective(self.model, x, y)


def wrap(step: ObjectiveStep, ctx: DistContext, device: torch.device) -> nn.Module:
    """DDP around ``step`` when distributed, ``step`` itself otherwise."""
    if not ctx.enabled:
        return step
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(step, device_ids=ids)
