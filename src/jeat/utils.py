"""Small shared helpers: atomic file writes, deterministic seeding, devices, image grids."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from jeat.errors import WRITE_ERRNOS, JeatError, environment_failure

__all__ = [
    "atomic_write",
    "write_json",
    "derive_seed",
    "resolve_device",
    "save_image_grid",
    "pyplot",
    "save_figure",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write ``path`` through a temporary file in the same folder, then rename it into place.

    A crash or error mid-write leaves the previous file (if any) untouched and no partial file:
    the temporary file is removed on any failure. The file gets the permissions a plain
    ``open`` would give it (``0o666`` less the umask), not the temporary file's private
    ``0o600``.

    This is where jeat writes every file, so this is where the machine's refusals become
    one-line errors: a read-only, full or over-quota disk, a folder without write permission
    (also when they surface inside the caller's writer, as ``torch.save``'s ``RuntimeError``
    over the ``OSError`` of a full disk) raise :class:`jeat.errors.EnvironmentFailure` naming
    ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        failure = environment_failure(exc, path)
        if failure is None:
            raise
        raise failure from None
    committing = False
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as fh:
            yield fh
            committing = True
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        failure = environment_failure(exc, path, None if committing else WRITE_ERRNOS)
        if failure is None or isinstance(exc, JeatError) or not isinstance(exc, Exception):
            raise
        raise failure from None


def atomic_save(path: str | os.PathLike, writer: Callable[[IO[bytes]], None]) -> Path:
    """Call ``writer(fh)`` on a binary file that appears at ``path`` only when complete."""
    with atomic_write(path, "wb") as fh:
        writer(fh)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    with atomic_write(path, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
    return Path(path)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (run seed, epoch, step, ...), stable across runs."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise JeatError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise JeatError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    return dev


def image_grid(images: Tensor, nrow: int, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile N x C x H x W images in [0, 1] into an HxWx3 (or HxW) uint8 array, ``nrow`` per row."""
    if images.dim() != 4:
        raise JeatError(f"images must be N x C x H x W, got {tuple(images.shape)}")
    x = images.detach().float().clamp(0, 1).cpu()
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, c, h, w = x.shape
    ncol = max(1, nrow)
    rows = (n + ncol - 1) // ncol
    grid = torch.ones(c, rows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, k = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, top : top + h, left : left + w] = x[i]
    arr = (grid.numpy() * 255).round().astype(np.uint8)
    return arr[0] if c == 1 else np.transpose(arr, (1, 2, 0))


def grid_layout(n: int, height: int, width: int, nrow: int, min_side: int = 32) -> dict[str, Any]:
    """Where :func:`save_image_grid` puts each of ``n`` images of ``height`` x ``width``
    pixels, ``nrow`` per row: the upscaling ``scale``, the padding ``pad`` (pixels of the PNG),
    the ``columns`` and ``rows``, the ``tile`` side (height, width) and the PNG's ``size``
    (height, width). Image ``i`` starts at row ``pad + r * (tile[0] + pad)``, column
    ``pad + c * (tile[1] + pad)`` with ``r, c = divmod(i, columns)``."""
    scale = max(1, -(-min_side // width))
    pad = max(1, scale // 2)
    columns = max(1, nrow)
    rows = (n + columns - 1) // columns
    tile = (height * scale, width * scale)
    size = (rows * (tile[0] + pad) + pad, columns * (tile[1] + pad) + pad)
    return {"scale": scale, "pad": pad, "columns": columns, "rows": rows, "tile": list(tile),
            "size": list(size)}  # fmt: skip


def save_image_grid(images: Tensor, path: str | os.PathLike, nrow: int, min_side: int = 32) -> Path:
    """Save images as a PNG grid (``nrow`` images per row), upscaling tiny images for viewing
    (:func:`grid_layout` says where each image lands)."""
    from PIL import Image

    layout = grid_layout(len(images), images.shape[-2], images.shape[-1], nrow, min_side)
    arr = image_grid(images, nrow=nrow, scale=layout["scale"], pad=layout["pad"])
    img = Image.fromarray(arr)
    return atomic_save(path, lambda fh: img.save(fh, format="PNG"))


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure to ``path`` atomically, then close it (even on error).

    The format follows the suffix (``.png``, ``.pdf``, ``.svg``; PNG when there is none).
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        with atomic_write(path, "wb") as fh:
            fig.savefig(fh, format=fmt)
    finally:
        pyplot().close(fig)
    return path
