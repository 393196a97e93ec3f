"""The user's own images: ``folder:PATH`` (an image folder) and ``npz:PATH`` (arrays).

* ``folder:PATH``: one subfolder per class (class names sorted, as torchvision's
  ``ImageFolder`` does), PNG/JPEG/BMP files read with Pillow, searched recursively inside each
  class folder. ``PATH/train/`` and ``PATH/test/`` (each with the class subfolders) are used
  as the split when both exist; otherwise a stratified 80/20 split with seed 0.
* ``npz:PATH``: arrays ``x`` (uint8 ``N x H x W``, ``N x H x W x C`` or ``N x C x H x W``
  with C = 1 or 3, or floats in [0, 1]) and ``y`` (integer labels); optional ``x_test`` and
  ``y_test`` (else the same stratified split) and ``class_names`` (strings).

Grayscale and colour are handled one way for both: a dataset whose images are all grayscale
has one channel; when any image has colour, grayscale images are repeated to three channels
(what Pillow's ``convert("RGB")`` does). ``image_size=N`` resizes every image to N x N
(bilinear with antialiasing, on the [0, 1] floats); images of mixed sizes without it are an
error. This module reads files into arrays; :func:`jeat.data.load_dataset` makes them a
dataset.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from jeat.errors import JeatError

__all__ = [
    "KINDS",
    "WHOLE",
    "IMAGE_SUFFIXES",
    "UserArrays",
    "parse_source",
    "read_user_data",
    "short_name",
    "fingerprint",
]

KINDS = ("folder", "npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TEST_FRACTION = 0.2
SPLIT_SEED = 0
_GRAY_MODES = ("1", "L", "LA")
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


class UserArrays(NamedTuple):
    """Images ``N x C x H x W`` (uint8, or float32 in [0, 1] after a resize or from floats),
    int64 labels, the class names and how the test set was chosen."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    split: str


def parse_source(name: str) -> tuple[str, Path] | None:
    """``("folder" | "npz", absolute path)`` for a user dataset name, else None."""
    kind, sep, rest = str(name).partition(":")
    if not sep or kind.strip().lower() not in KINDS:
        return None
    if not rest.strip():
        raise JeatError(f"dataset {name!r} names no path: write {kind}:PATH")
    return kind.strip().lower(), Path(rest.strip()).expanduser().resolve()


def short_name(kind: str, path: Path) -> str:
    """A file-name-safe name for run folders: ``folder-pets``, ``npz-signs``."""
    stem = path.stem if kind == "npz" else path.name
    return f"{kind}-{re.sub(r'[^A-Za-z0-9._-]+', '_', stem).strip('._') or 'data'}"


def fingerprint(kind: str, path: Path) -> str:
    """Changes when any file of the dataset is added, removed, resized or touched."""
    h = hashlib.sha1(f"{kind}:{path}".encode())
    if kind == "npz":
        files = [path] if path.is_file() else []
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    for p in files:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def read_user_data(
    kind: str, path: Path, image_size: int | None = None, split: bool = True
) -> UserArrays:
    """Read ``folder:`` or ``npz:`` data (see the module docstring); every problem is a
    :class:`JeatError` naming the file and what is wrong. ``split=False``: data with no
    train/test split of its own is not split; every image is a test image (and a training
    image: both arrays hold them all, in the files' order), as for evaluating a model trained
    elsewhere on all of a user's test set. Data with its own split keeps it either way."""
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise JeatError(f"--image-size must be a positive integer, got {image_size!r}")
    if kind == "folder":
        raw = _read_folder(path, image_size, split)
    elif kind == "npz":
        raw = _read_npz(path, split)
    else:
        raise JeatError(f"unknown user dataset kind {kind!r}; choose folder: or npz:")
    if image_size is not None:
        raw = raw._replace(
            x_train=resize(raw.x_train, image_size), x_test=resize(raw.x_test, image_size)
        )
    return raw


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """``N x C x H x W`` images (uint8 or [0, 1] floats) to float32 ``N x C x size x size``."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.to(torch.float32).div_(255.0) if t.dtype == torch.uint8 else t.to(torch.float32)
    if tuple(t.shape[2:]) == (size, size):
        return t.numpy()
    out = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp_(0.0, 1.0).numpy()


WHOLE = "all of them (the data has no train/test split of its own)"


def _split(
    x: np.ndarray, y: np.ndarray, class_names: tuple[str, ...], where: str, split: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    if not split:
        return x, y, x, y, WHOLE
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y, minlength=len(class_names))
    few = [class_names[i] for i in np.flatnonzero((counts > 0) & (counts < 2))]
    if few:
        raise JeatError(
            f"{where}: class {few[0]!r} has only one image; a train/test split needs at least "
            "two per class (or give the test set: test/ folders, or x_test and y_test)"
        )
    n_test = max(int(round(len(y) * TEST_FRACTION)), int((counts > 0).sum()))
    if n_test >= len(y):
        raise JeatError(f"{where}: {len(y)} images are too few to split into train and test")
    idx_tr, idx_te = train_test_split(
        np.arange(len(y)), test_size=n_test, random_state=SPLIT_SEED, stratify=y
    )
    split = f"stratified {len(idx_tr)}/{len(idx_te)} split, seed {SPLIT_SEED}"
    return x[idx_tr], y[idx_tr], x[idx_te], y[idx_te], split


# --------------------------------------------------------------------------- image folders
def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_dirs(folder: Path) -> list[Path]:
    dirs = _subfolders(folder)
    if not dirs:
        raise JeatError(
            f"image folder {folder} has no class subfolders; put each class's images in a "
            "subfolder named after the class"
        )
    if len(dirs) == 1:
        raise JeatError(
            f"image folder {folder} has only one class ({dirs[0].name}); a classifier needs "
            "at least two class subfolders"
        )
    return dirs


def _image_files(class_dir: Path) -> list[Path]:
    files = sorted(
        p
        for p in class_dir.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
    )
    if not files:
        raise JeatError(
            f"class folder {class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)} files)"
        )
    return files


def _read_image(path: Path) -> np.ndarray:
    """One image as uint8 ``H x W`` (grayscale) or ``H x W x 3``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in _GRAY_MODES:
                return np.array(im.convert("L"), dtype=np.uint8)
            if mode in _COLOUR_MODES:
                return np.array(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # Pillow raises many kinds for a corrupt or truncated file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise JeatError(f"cannot read image {path}: {reason}") from None
    raise JeatError(
        f"image {path} has Pillow mode {mode} (16-bit or float pixels); save it as an 8-bit "
        "grayscale or RGB PNG/JPEG/BMP"
    )


def _stack(images: list[np.ndarray], files: list[Path], image_size: int | None) -> np.ndarray:
    """uint8 ``N x C x H x W``: C = 1 when every image is grayscale, else 3; mixed sizes are
    resized (float32) when ``image_size`` is given, else an error naming two of them."""
    colour = any(a.ndim == 3 for a in images)
    chw = [
        np.repeat(a[None], 3, axis=0) if (colour and a.ndim == 2) else
        (a.transpose(2, 0, 1) if a.ndim == 3 else a[None])
        for a in images
    ]  # fmt: skip
    sizes = {a.shape[1:] for a in chw}
    if len(sizes) == 1:
        return np.stack(chw)
    if image_size is None:
        first = chw[0].shape[1:]
        j = next(i for i, a in enumerate(chw) if a.shape[1:] != first)
        raise JeatError(
            f"images differ in size ({files[0].name} is {first[0]}x{first[1]}, {files[j]} is "
            f"{chw[j].shape[1]}x{chw[j].shape[2]}); pass --image-size N to resize all to NxN"
        )
    return np.concatenate([resize(a[None], image_size) for a in chw])


def _read_tree(folder: Path, classes: list[str]) -> tuple[list[np.ndarray], list[Path], np.ndarray]:
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        d = folder / name
        if not d.is_dir():
            continue
        found = _image_files(d)
        files += found
        labels += [label] * len(found)
    images = [_read_image(p) for p in files]
    return images, files, np.asarray(labels, dtype=np.int64)


def _read_folder(root: Path, image_size: int | None, split: bool = True) -> UserArrays:
    if not root.exists():
        raise JeatError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise JeatError(f"{root} is not a folder (folder:PATH wants one subfolder per class)")
    train, test = root / "train", root / "test"
    if train.is_dir() != test.is_dir():
        have, miss = ("train", "test") if train.is_dir() else ("test", "train")
        raise JeatError(
            f"image folder {root} has a {have}/ subfolder but no {miss}/; give both (each with "
            "one subfolder per class), or put the class subfolders at the top"
        )
    if train.is_dir():
        classes = [d.name for d in _class_dirs(train)]
        extra = sorted(d.name for d in _subfolders(test) if d.name not in classes)
        if extra:
            raise JeatError(f"{test} has class folders that {train} lacks: {', '.join(extra)}")
        im_tr, f_tr, y_tr = _read_tree(train, classes)
        im_te, f_te, y_te = _read_tree(test, classes)
        if not f_te:
            raise JeatError(f"{test} holds no images")
        x_all = _stack(im_tr + im_te, f_tr + f_te, image_size)
        n = len(f_tr)
        return UserArrays(x_all[:n], y_tr, x_all[n:], y_te, tuple(classes), "train/ and test/")
    classes = [d.name for d in _class_dirs(root)]
    images, files, y = _read_tree(root, classes)
    x = _stack(images, files, image_size)
    x_tr, y_tr, x_te, y_te, how = _split(x, y, tuple(classes), f"image folder {root}", split)
    return UserArrays(x_tr, y_tr, x_te, y_te, tuple(classes), how)


# --------------------------------------------------------------------------- .npz arrays
def _npz_images(a: np.ndarray, key: str, path: Path) -> np.ndarray:
    """``x`` or ``x_test`` as ``N x C x H x W`` (uint8, or float32 in [0, 1])."""
    where = f"{path}: {key}"
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        if a.shape[3] in (1, 3):
            a = a.transpose(0, 3, 1, 2)
        elif a.shape[1] not in (1, 3):
            raise JeatError(
                f"{where} has shape {a.shape}: expected N x H x W, N x H x W x C or "
                "N x C x H x W with C = 1 or 3"
            )
    else:
        raise JeatError(
            f"{where} has shape {a.shape}: expected N x H x W, N x H x W x C or N x C x H x W"
        )
    if a.shape[0] == 0:
        raise JeatError(f"{where} holds no images")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise JeatError(
            f"{where} has dtype {a.dtype}: images must be uint8 (0..255) or floats in [0, 1]"
        )
    if not np.isfinite(a).all():
        raise JeatError(f"{where} holds NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        raise JeatError(
            f"{where} holds values outside [0, 1] (min {lo:.4g}, max {hi:.4g}): float images "
            "must be in [0, 1] (or store uint8 0..255)"
        )
    return np.ascontiguousarray(a, dtype=np.float32)


def _npz_labels(a: np.ndarray, key: str, n: int, path: Path) -> np.ndarray:
    where = f"{path}: {key}"
    if a.ndim != 1:
        raise JeatError(f"{where} has shape {a.shape}: labels must be a 1-D array")
    if not np.issubdtype(a.dtype, np.integer):
        raise JeatError(f"{where} has dtype {a.dtype}: labels must be integers")
    if len(a) != n:
        raise JeatError(f"{where} has {len(a)} labels for {n} images")
    if len(a) and int(a.min()) < 0:
        raise JeatError(f"{where} holds label {int(a.min())}: labels out of range (must be >= 0)")
    return a.astype(np.int64)


def _read_npz(path: Path, split: bool = True) -> UserArrays:
    if not path.exists():
        raise JeatError(f"npz file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise JeatError(f"cannot read {path} as an .npz file of arrays: {reason}") from None
    expected = "an .npz dataset holds x and y (optional: x_test, y_test, class_names)"
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise JeatError(f"{path} has no {' or '.join(missing)} array; {expected}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        have = "x_test" if "x_test" in arrays else "y_test"
        other = "y_test" if have == "x_test" else "x_test"
        raise JeatError(f"{path} has {have} but no {other}; {expected}")
    x = _npz_images(arrays["x"], "x", path)
    y = _npz_labels(arrays["y"], "y", len(x), path)
    if "x_test" in arrays:
        x_te = _npz_images(arrays["x_test"], "x_test", path)
        y_te = _npz_labels(arrays["y_test"], "y_test", len(x_te), path)
        if x_te.shape[1:] != x.shape[1:]:
            raise JeatError(
                f"{path}: x_test images are {x_te.shape[1:]} (C x H x W), x images "
                f"{x.shape[1:]}; both must have one shape"
            )
        if x_te.dtype != x.dtype:
            x, x_te = _as_float(x), _as_float(x_te)
    else:
        x_te = y_te = None
    if "class_names" in arrays:
        names = tuple(str(s) for s in np.asarray(arrays["class_names"]).reshape(-1))
        k = len(names)
        source = f"class_names has {k}"
    else:
        k = int(max(y.max(), -1 if y_te is None else y_te.max())) + 1
        names = tuple(str(i) for i in range(k))
        source = None
    for key, labels in (("y", y), ("y_test", y_te)):
        if labels is not None and source is not None and int(labels.max()) >= k:
            raise JeatError(
                f"{path}: {key} holds label {int(labels.max())}, but {source} classes "
                f"(labels 0..{k - 1}): labels out of range"
            )
    if y_te is not None and int(y_te.max()) > int(y.max()) and source is None:
        raise JeatError(
            f"{path}: y_test holds label {int(y_te.max())}, but y has only labels 0.."
            f"{int(y.max())}: labels out of range (or give class_names)"
        )
    if k < 2:
        raise JeatError(f"{path}: the labels name only one class; a classifier needs two or more")
    if x_te is None:
        x, y, x_te, y_te, how = _split(x, y, names, f"{path}", split)
    else:
        how = "x_test and y_test"
    return UserArrays(x, y, x_te, y_te, names, how)


def _as_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x
