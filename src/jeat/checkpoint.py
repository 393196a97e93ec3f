"""Checkpoints: ``state_dict`` tensors plus JSON-like metadata, written atomically.

Loaded with ``torch.load(weights_only=True)`` (no arbitrary unpickling). A file that is not a
jeat checkpoint, is truncated, or holds another architecture fails with a clear error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jeat.errors import JeatError
from jeat.utils import atomic_save

__all__ = ["save_checkpoint", "load_checkpoint", "load_state_into", "FORMAT"]

FORMAT = "jeat-checkpoint-v1"


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` (tensors, state dicts and plain values) to ``path``."""
    payload = {"format": FORMAT, **payload}
    return atomic_save(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, with a clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise JeatError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/garbage files
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        picked = [ln for ln in lines if "error" in ln.lower()] or lines or [type(exc).__name__]
        reason = picked[-1][:200]
        raise JeatError(
            f"checkpoint {path} is corrupt or not a jeat checkpoint ({reason}); "
            "re-run training or point at another file"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise JeatError(
            f"checkpoint {path} is not a jeat checkpoint (no '{FORMAT}' marker); "
            "pass a file written by 'jeat train'"
        )
    return payload


def load_state_into(module: nn.Module, state: dict, path: str | os.PathLike, what: str) -> None:
    """``module.load_state_dict(state)`` with an architecture mismatch turned into a JeatError."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:240]
        raise JeatError(
            f"checkpoint {path} holds a {what} that does not match this architecture ({detail}); "
            "use the model settings the checkpoint was trained with"
        ) from None
