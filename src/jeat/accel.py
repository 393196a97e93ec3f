"""The fast path of training: mixed precision, channels-last memory and ``torch.compile``.

Three independent switches (``perf.*`` in a run's config), each with an ``auto`` default that
is on where it pays and off where it does not:

* ``perf.amp``: ``auto`` (bf16 autocast on a CUDA device that supports it, fp32 elsewhere),
  ``bf16`` or ``fp32`` (YAML's ``on``/``off`` mean the same two). Autocast covers the
  training step only: the training attack, the SGLD sampler and the loss. Every energy and
  attack loss upcasts the logits to fp32 before the log-sum-exp and the batch sum
  (:mod:`jeat.energy`), and the adversarial iterate itself stays an fp32 tensor, so only the
  network's matrix products run in bf16 while the attack's gradient is reduced and applied in
  fp32. Evaluation, generation and analysis always run in fp32, so reported numbers never
  depend on the training precision. fp16 is refused: it needs loss scaling, and small input
  gradients can underflow in it, silently weakening the attack (the design notes cite
  half-precision overflow reports from AutoAttack users).
* ``perf.channels_last``: ``auto`` (on for CUDA), ``true`` or ``false``: the model and each
  batch use the NHWC layout that tensor-core convolutions want.
* ``perf.compile``: ``torch.compile`` the network for the training step (off by default: the
  first steps pay the compile time). The saved weights are always those of the plain module.
* ``perf.cudnn_benchmark``: ``auto`` (on for CUDA), ``true`` or ``false``: cuDNN times its
  convolution algorithms at the first call of each input shape and keeps the fastest (training
  batches have fixed shapes, so this is paid once per shape). It sets the process-wide
  ``torch.backends.cudnn.benchmark``; the algorithms it picks may sum in another order, so
  turn it off where bit-identical GPU reruns matter more than speed.

And one process-wide setting for CPU work, :func:`tune_host_allocator`: glibc hands large freed
blocks back to the OS and every later allocation of the same size faults its pages in again,
which cost a third of the time of a CIFAR-shaped PGD-AT epoch on the 2-core test machine. The
``jeat`` command turns this off at start-up (opt out with ``JEAT_MALLOC=system``); Python users
call it themselves.

:class:`Accelerator` holds the resolved choice and applies it; the training loop and the
benchmarks use the same object.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from jeat.errors import JeatError

__all__ = ["Accelerator", "resolve_amp", "AMP_CHOICES", "same_layout", "tune_host_allocator"]

AMP_CHOICES = ("auto", "bf16", "fp32")


def resolve_amp(name: str | bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``perf.amp = name`` on ``device`` (None: fp32). YAML's booleans
    (``true``/``on``, ``false``/``off``) mean bf16 and fp32."""
    if isinstance(name, bool):
        name = "bf16" if name else "fp32"
    name = str(name).lower()
    if name in ("fp16", "float16", "half"):
        raise JeatError(
            "perf.amp: fp16 is not supported (it needs loss scaling, and small attack input "
            "gradients can underflow in it); use bf16 or fp32"
        )
    if name not in AMP_CHOICES:
        raise JeatError(f"perf.amp must be one of {', '.join(AMP_CHOICES)}, got '{name}'")
    if name == "fp32":
        return None
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise JeatError(f"perf.amp: bf16 is not supported on {device}; use fp32")
    return torch.bfloat16


def _auto_flag(value: bool | None, device: torch.device) -> bool:
    return device.type == "cuda" if value is None else bool(value)


@dataclass(frozen=True)
class Accelerator:
    """Resolved fast-path settings for one device."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False

    @classmethod
    def create(
        cls,
        device: torch.device,
        amp: str | bool = "auto",
        channels_last: bool | None = None,
        compile: bool = False,
        cudnn_benchmark: bool | None = None,
    ) -> Accelerator:
        return cls(
            device,
            resolve_amp(amp, device),
            _auto_flag(channels_last, device),
            compile,
            _auto_flag(cudnn_benchmark, device),
        )

    @classmethod
    def from_perf(cls, device: torch.device, perf: Any) -> Accelerator:
        """The settings of a run's ``perf`` section (:class:`jeat.config.PerfConfig`)."""
        return cls.create(device, perf.amp, perf.channels_last, perf.compile, perf.cudnn_benchmark)

    def describe(self) -> str:
        amp = "bf16" if self.amp_dtype is torch.bfloat16 else "fp32"
        parts = [amp, "channels-last" if self.channels_last else "contiguous"]
        if self.compile:
            parts.append("compiled")
        if self.cudnn_benchmark and self.device.type == "cuda":
            parts.append("cuDNN autotuned")
        return ", ".join(parts)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Put ``model`` on the device (in place, channels-last when asked) and return the
        module the training step should call: ``model`` itself or its compiled wrapper, which
        shares the parameters (save ``model``, never the wrapper)."""
        model.to(self.device)
        if self.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if not self.compile:
            return model
        return torch.compile(model)  # type: ignore[return-value]  # compiles at the first call

    def batch(self, x: Tensor) -> Tensor:
        """A batch in the layout the model expects."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Mixed precision for the enclosed training step (a no-op in fp32)."""
        if self.amp_dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.amp_dtype):
            yield


def same_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in the memory layout of ``like``: channels-last when ``like`` is a channels-last
    image batch (and not also plainly contiguous, as one-channel batches are), else unchanged."""
    cl = torch.channels_last
    if (
        t.dim() == like.dim() == 4
        and like.is_contiguous(memory_format=cl)
        and not like.is_contiguous()
    ):
        return t.contiguous(memory_format=cl)
    return t


# glibc's mallopt parameters (malloc.h) and its ceiling for M_MMAP_THRESHOLD on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 2**31 - 1
_tuned: bool | None = None


def tune_host_allocator(force: bool = False) -> bool:
    """Keep freed host memory in the process for reuse instead of returning it to the OS.

    PyTorch's CPU tensors come from glibc's ``malloc``. By default glibc serves blocks above a
    (dynamic) threshold with ``mmap`` and unmaps them when freed, and trims the heap top, so a
    loop that allocates and frees the same activation-sized buffers at every step (an attack,
    SGLD, a training step) faults every page of them in again each time: on the 2-core test
    machine, 0.65-1.3 million minor page faults and 2.4-4 s of kernel time per PGD-20 call on
    a CIFAR-shaped batch of 128 (a 6-8 s call). This sets ``M_MMAP_THRESHOLD`` to glibc's
    32 MiB ceiling and ``M_TRIM_THRESHOLD`` to 2 GiB, after which those buffers are reused
    without faults; the cost is that the process keeps its peak heap (blocks above 32 MiB are
    still returned).
    ``benchmarks/host_allocator.py`` measures the effect.

    Process-wide, so the ``jeat`` command calls it and the library never does on its own.
    Returns whether it is in effect: False off Linux/glibc, or when the environment variable
    ``JEAT_MALLOC=system`` asks to keep the system's behaviour (``force`` ignores that).
    Calling it again does nothing more.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    if not force and os.environ.get("JEAT_MALLOC", "").lower() == "system":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        _tuned = False
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _tuned = False
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: a fixed trim threshold alone would also freeze glibc's dynamic
    # mmap threshold at 128 KiB, which is worse than the default
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    ok = ok and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    _tuned = ok
    return ok
