"""Image datasets in their original file formats, downloads with checksums, batch augmentation.

Every dataset is a registered loader function (``@register_dataset(info)``) that returns the
raw arrays; :func:`load_dataset` turns them into float32 tensors in ``[0, 1]``. Supported:

* ``digits``: scikit-learn's embedded 8x8 digits (no files needed), stratified 80/20 split.
* ``mnist``: the four original idx files (plain or ``.gz``), md5-checked.
* ``mnist-t10k``: only the two MNIST test files, split 8,000 / 2,000 (stratified, seed 0).
* ``cifar10`` / ``cifar100``: the original python-pickle batches (any batch length).
* ``folder:PATH`` / ``npz:PATH``: the user's own images (an image folder, or arrays), read by
  :mod:`jeat.userdata`; ``image_size`` resizes them.

Downloads go to a temporary file next to the destination, are verified, then renamed into
place, so an interrupted or corrupt download never leaves a partial file behind.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from jeat.errors import WRITE_ERRNOS, JeatError, environment_failure
from jeat.userdata import WHOLE, fingerprint, parse_source, read_user_data, short_name

__all__ = [
    "DatasetInfo",
    "ImageDataset",
    "register_dataset",
    "list_datasets",
    "dataset_info",
    "load_dataset",
    "dataset_slug",
    "default_data_dir",
    "augment_batch",
    "split_validation",
    "download_file",
    "md5sum",
    "MNIST_MIRRORS",
    "MNIST_FILES",
    "CIFAR10_URL",
    "CIFAR10_MD5",
    "CIFAR100_URL",
    "CIFAR100_MD5",
]

# --------------------------------------------------------------------------- sources
# Mirrors tried in order; each is a URL prefix ending in "/" (tests point this at file://).
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# name -> (md5 of the uncompressed file, md5 of the published .gz file).
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train-images-idx3-ubyte": (
        "6bbc9ace898e44ae57da46a324031adb",
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    ),
    "train-labels-idx1-ubyte": (
        "a25bea736e30d166cdddb491f175f624",
        "d53e105ee54ea40749a09fcbcd1e9432",
    ),
    "t10k-images-idx3-ubyte": (
        "2646ac647ad5339dbf082846283269ea",
        "9fb629c4189551a2d022fa330f9573f3",
    ),
    "t10k-labels-idx1-ubyte": (
        "27ae3e4e09519cfbb04c329615203637",
        "ec29112dd5afa0611ce80d1b7f02629c",
    ),
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"

_DOWNLOAD_HINT = "pass download=True (CLI: --download) or point --data-dir at"

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# fmt: off
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar",
    "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile",
    "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster",
    "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman",
    "worm",
)
# fmt: on
_DIGIT_NAMES = tuple(str(i) for i in range(10))


# --------------------------------------------------------------------------- types
@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset: shape, classes, normalisation and default budgets."""

    name: str
    shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    mean: tuple[float, ...]  # per-channel mean of training images in [0, 1]
    std: tuple[float, ...]
    eps_linf: float  # default L-inf budget on [0, 1] pixels
    eps_l2: float  # default L2 budget
    augment: str  # "none" | "shift" | "crop-flip"
    description: str
    class_names: tuple[str, ...]


@dataclass
class ImageDataset:
    """Train and test tensors: x float32 N x C x H x W in [0, 1], y int64 in [0, num_classes)."""

    info: DatasetInfo
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    # a validation split held out from the training images (:func:`split_validation`)
    x_val: torch.Tensor | None = field(default=None, repr=False)
    y_val: torch.Tensor | None = field(default=None, repr=False)
    # how a user's folder:/npz: data gave its test images (jeat.userdata: its own split, a
    # seeded stratified split, or all of them); "" for the built-in datasets
    split: str = ""

    def __repr__(self) -> str:
        val = f", val={len(self.x_val)}" if self.x_val is not None else ""
        return (
            f"ImageDataset({self.info.name!r}, train={len(self.x_train)}{val}, "
            f"test={len(self.x_test)}, shape={tuple(self.info.shape)})"
        )


def split_validation(data: ImageDataset, share: float, seed: int) -> ImageDataset:
    """Hold out ``share`` of the training images as a validation split, stratified by class
    and drawn with ``seed``; the test images are never touched.

    Every class with at least two training images gives ``round(share * n)`` of them (at least
    one, and never all). Returns a new :class:`ImageDataset` whose ``x_train`` lacks the held
    out images (in their original order) and whose ``x_val`` holds them.
    """
    if isinstance(share, bool) or not 0.0 < float(share) < 1.0:
        raise JeatError(f"validation share must be in (0, 1), got {share!r}")
    g = torch.Generator().manual_seed(int(seed))
    y = data.y_train.cpu()
    held = torch.zeros(len(y), dtype=torch.bool)
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        if len(idx) < 2:
            continue
        k = min(len(idx) - 1, max(1, round(float(share) * len(idx))))
        held[idx[torch.randperm(len(idx), generator=g)[:k]]] = True
    if not held.any():
        raise JeatError(
            f"{len(y)} training images are too few to hold out a validation split of {share:g}"
        )
    keep = (~held).to(data.x_train.device)
    val = held.to(data.x_train.device)
    return ImageDataset(
        data.info,
        data.x_train[keep],
        data.y_train[keep],
        data.x_test,
        data.y_test,
        data.x_train[val],
        data.y_train[val],
    )


class RawSplit(NamedTuple):
    """What a loader returns: N x C x H x W images (uint8 0..255 or float in [0, 1]), labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...] | None = None  # overrides info.class_names when given


Loader = Callable[[Path | None, bool], RawSplit]
_REGISTRY: dict[str, tuple[DatasetInfo, Loader]] = {}


def register_dataset(info: DatasetInfo) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(root, download) -> RawSplit`` under ``info.name``."""

    def wrap(loader: Loader) -> Loader:
        if info.name in _REGISTRY:
            raise ValueError(f"dataset {info.name!r} registered twice")
        if len(info.class_names) != info.num_classes:
            raise ValueError(f"dataset {info.name!r}: class_names does not match num_classes")
        _REGISTRY[info.name] = (info, loader)
        return loader

    return wrap


def _normalise_name(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def list_datasets() -> list[DatasetInfo]:
    """All registered datasets, in registration order (``digits`` first)."""
    return [info for info, _ in _REGISTRY.values()]


def dataset_info(name: str, image_size: int | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; :class:`JeatError` listing known names if unknown.
    A ``folder:`` or ``npz:`` dataset is read (once per process and file state) to find it."""
    if parse_source(name) is not None:
        return load_dataset(name, image_size=image_size).info
    _check_no_resize(name, image_size)
    key = _normalise_name(name)
    if key not in _REGISTRY:
        known = ", ".join(_REGISTRY)
        raise JeatError(
            f"unknown dataset {name!r}; choose one of: {known}, or your own images as "
            "folder:PATH or npz:PATH"
        )
    return _REGISTRY[key][0]


def dataset_slug(name: str, image_size: int | None = None, unique: bool = False) -> str:
    """A file-name-safe name of a dataset: the registered name itself, or ``folder-NAME`` /
    ``npz-NAME`` for a user's data; ``unique=True`` adds a hash of the path and the image size
    (for caches, where two folders of one name must not meet)."""
    user = parse_source(name)
    if user is None:
        return dataset_info(name).name
    slug = short_name(*user)
    if not unique:
        return slug
    key = f"{user[0]}:{user[1]}|{image_size}"
    return f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _check_no_resize(name: str, image_size: int | None) -> None:
    if image_size is not None:
        raise JeatError(
            f"--image-size applies to folder: and npz: datasets; {name} has a fixed image size"
        )


def default_data_dir() -> Path:
    """Data folder: $JEAT_DATA_DIR, else $XDG_CACHE_HOME/jeat/data, else ~/.cache/jeat/data.

    The result is not created; loaders create it when they download.
    """
    env = os.environ.get("JEAT_DATA_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "jeat" / "data"


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    split: bool = True,
) -> ImageDataset:
    """Load dataset ``name`` from ``root`` (default: :func:`default_data_dir`) as tensors.

    With ``download=True`` missing files are fetched from the canonical sources and verified.
    ``folder:PATH`` and ``npz:PATH`` read the user's images (``root`` and ``download`` do not
    apply); ``image_size=N`` resizes them to N x N. ``split=False`` keeps such data whole
    when it has no train/test split of its own: every image is a test image (see
    :func:`jeat.userdata.read_user_data`); the built-in datasets ignore it.
    """
    user = parse_source(name)
    if user is not None:
        return _load_user(*user, image_size, split)
    info = dataset_info(name, image_size)
    loader = _REGISTRY[info.name][1]
    root_path = Path(root).expanduser() if root is not None else None
    raw = loader(root_path, bool(download))
    if raw.class_names is not None and len(raw.class_names) == info.num_classes:
        info = replace(info, class_names=tuple(raw.class_names))
    return ImageDataset(
        info,
        _to_images(raw.x_train, info),
        _to_labels(raw.y_train, info),
        _to_images(raw.x_test, info),
        _to_labels(raw.y_test, info),
    )


_USER_CACHE: dict[tuple, ImageDataset] = {}


def _load_user(kind: str, path: Path, image_size: int | None, split: bool = True) -> ImageDataset:
    """A ``folder:`` / ``npz:`` dataset, read once per process while its files are unchanged.
    Budgets: ε = 8/255 (L∞) and 0.5 (L2), the CIFAR-10 convention, and no augmentation (a flip
    or shift is not label-preserving for every dataset); override them in the config."""
    key = (kind, str(path), image_size, split, fingerprint(kind, path))
    if key in _USER_CACHE:
        return _USER_CACHE[key]
    raw = read_user_data(kind, path, image_size, split)
    x_tr = torch.from_numpy(raw.x_train)
    x_tr = x_tr.float().div_(255.0) if x_tr.dtype == torch.uint8 else x_tr.float()
    dims = [0, 2, 3]
    info = DatasetInfo(
        name=f"{kind}:{path}",
        shape=tuple(int(d) for d in raw.x_train.shape[1:]),  # type: ignore[arg-type]
        num_classes=len(raw.class_names),
        mean=tuple(float(v) for v in x_tr.mean(dim=dims)),
        std=tuple(max(float(v), 1e-3) for v in x_tr.std(dim=dims)),
        eps_linf=8 / 255,
        eps_l2=0.5,
        augment="none",
        description=(
            f"{'image folder' if kind == 'folder' else 'arrays'} {path} "
            f"({len(raw.y_test)} images, {raw.split})"
            if raw.split == WHOLE
            else f"({len(raw.y_train)} train / {len(raw.y_test)} test: {raw.split})"
        ),
        class_names=raw.class_names,
    )
    data = ImageDataset(
        info,
        _to_images(raw.x_train, info),
        _to_labels(raw.y_train, info),
        _to_images(raw.x_test, info),
        _to_labels(raw.y_test, info),
        split=raw.split,
    )
    if len(_USER_CACHE) >= 4:
        _USER_CACHE.pop(next(iter(_USER_CACHE)))
    _USER_CACHE[key] = data
    return data


def _to_images(x: np.ndarray, info: DatasetInfo) -> torch.Tensor:
    if tuple(x.shape[1:]) != tuple(info.shape):
        raise JeatError(
            f"{info.name}: images have shape {tuple(x.shape[1:])}, expected {info.shape}; "
            "the files are corrupt or not the original dataset"
        )
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255.0)
    return t.to(torch.float32).clamp_(0.0, 1.0)


def _to_labels(y: np.ndarray, info: DatasetInfo) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(y).astype(np.int64, copy=False))
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= info.num_classes):
        raise JeatError(
            f"{info.name}: labels outside 0..{info.num_classes - 1}; the files are corrupt"
        )
    return t


# --------------------------------------------------------------------------- downloads
def md5sum(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB blocks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _progress(total: int | None, desc: str) -> Any:
    """A tqdm bar on an interactive stderr, else None."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)


def download_file(url: str, dest: Path, md5: str | None) -> Path:
    """Download ``url`` to ``dest`` atomically (temp file, md5 check, rename); return ``dest``.

    Works with ``http(s)://`` and ``file://`` URLs. On any failure no file is left behind and a
    :class:`JeatError` is raised (its message mentions "checksum" on an md5 mismatch).
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise JeatError(
            f"cannot write to download folder {dest.parent}: {e.strerror or e}; choose a "
            "writable folder (--data-dir or $JEAT_DATA_DIR)"
        ) from e
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(url, timeout=60) as response,
            ):
                length = response.headers.get("Content-Length") if response.headers else None
                bar = _progress(int(length) if length and length.isdigit() else None, dest.name)
                try:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        out.write(block)
                        digest.update(block)
                        if bar is not None:
                            bar.update(len(block))
                finally:
                    if bar is not None:
                        bar.close()
                out.flush()
                os.fsync(out.fileno())
        except (urllib.error.URLError, OSError, ValueError) as e:
            failure = environment_failure(e, dest, WRITE_ERRNOS)  # a full disk, not the network
            if failure is not None:
                raise failure from None
            reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
            raise JeatError(
                f"could not download {url}: {reason}; check the network connection or place "
                f"the file at {dest} yourself"
            ) from e
        got = digest.hexdigest()
        if md5 is not None and got != md5.lower():
            raise JeatError(
                f"checksum mismatch for {url} (md5 {got}, expected {md5}); the download is "
                "corrupt or the server changed it: retry later or place a verified copy at "
                f"{dest}"
            )
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return dest


def _safe_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """Members of ``tar``; JeatError if any is absolute, climbs with '..', or is not file/dir."""
    members = tar.getmembers()
    for m in members:
        parts = PurePosixPath(m.name).parts
        if m.name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise JeatError(
                f"refusing to extract {archive}: unsafe member path {m.name!r}; delete the "
                "archive and download the original"
            )
        if not (m.isfile() or m.isdir()):
            raise JeatError(
                f"refusing to extract {archive}: member {m.name!r} is a link or special file; "
                "delete the archive and download the original"
            )
    return members


def _extract_folder(archive: Path, folder_name: str, target: Path) -> None:
    """Extract ``folder_name/*`` from a tar.gz into ``target`` via a temp dir (no partial files)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(
            tempfile.mkdtemp(prefix=f".{folder_name}.", suffix=".tmp", dir=target.parent)
        )
    except OSError as e:
        raise JeatError(
            f"cannot write to {target.parent}: {e.strerror or e}; choose a writable folder "
            "(--data-dir or $JEAT_DATA_DIR)"
        ) from e
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = _safe_members(tar, archive)
                kwargs: dict[str, Any] = {}
                if hasattr(tarfile, "data_filter"):
                    kwargs["filter"] = "data"
                tar.extractall(tmp_dir, members=members, **kwargs)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            failure = environment_failure(e, target, WRITE_ERRNOS)  # a full disk: not corrupt
            if failure is not None:
                raise failure from None
            raise JeatError(
                f"archive {archive} is corrupt ({e}); delete it and download it again"
            ) from e
        src = tmp_dir / folder_name
        if not src.is_dir():
            raise JeatError(
                f"archive {archive} does not contain {folder_name}/; it is not the original "
                "dataset archive"
            )
        target.mkdir(parents=True, exist_ok=True)
        for item in sorted(src.iterdir()):
            if item.is_file():
                os.replace(item, target / item.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


# --------------------------------------------------------------------------- digits
@register_dataset(
    DatasetInfo(
        name="digits",
        shape=(1, 8, 8),
        num_classes=10,
        mean=(0.3054,),
        std=(0.3761,),
        eps_linf=0.2,  # see README: below ~0.2 a standard CNN keeps >5% under PGD-20
        eps_l2=1.0,
        augment="shift",
        description="scikit-learn 8x8 handwritten digits (1,797 images, embedded; 80/20 split)",
        class_names=_DIGIT_NAMES,
    )
)
def _load_digits(root: Path | None, download: bool) -> RawSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return RawSplit(x_tr, y_tr, x_te, y_te)


# --------------------------------------------------------------------------- mnist (idx files)
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_MNIST_TRAIN = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
_MNIST_TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_MNIST_INFO = {
    "shape": (1, 28, 28),
    "num_classes": 10,
    "mean": (0.1307,),
    "std": (0.3081,),
    "eps_linf": 0.3,
    "eps_l2": 2.0,
    "augment": "shift",
    "class_names": _DIGIT_NAMES,
}


def _mnist_bases(root: Path | None) -> list[Path]:
    base = root if root is not None else default_data_dir()
    return [base, base / "mnist"]


def _find_idx(name: str, folders: Iterable[Path]) -> Path | None:
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_idx_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, PermissionError):
            raise JeatError(f"cannot read {path}: permission denied; fix its permissions") from e
        raise JeatError(
            f"MNIST file {path} is corrupt ({e}); delete it and re-run with download=True"
        ) from e


def _parse_idx(path: Path, magic: int, md5: str | None) -> np.ndarray:
    """Parse an idx file (uint8, big-endian dims) after checking magic, size and md5."""
    data = _read_idx_bytes(path)
    ndim = 3 if magic == _IDX_IMAGES_MAGIC else 1
    header = 4 + 4 * ndim

    def corrupt(why: str) -> JeatError:
        return JeatError(
            f"MNIST file {path} is corrupt ({why}); delete it and re-run with download=True "
            "or replace it with the original file"
        )

    if len(data) < header:
        raise corrupt(f"only {len(data)} bytes")
    got_magic = int.from_bytes(data[:4], "big")
    if got_magic != magic:
        raise corrupt(f"magic number {got_magic}, expected {magic}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_len = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected_len:
        raise corrupt(f"{len(data)} bytes, header {dims} implies {expected_len}")
    if ndim == 3 and dims[1:] != (28, 28):
        raise corrupt(f"images are {dims[1]}x{dims[2]}, expected 28x28")
    if md5 is not None:
        got = _md5_bytes(data)
        if got != md5:
            raise corrupt(f"checksum mismatch: md5 {got}, expected {md5}")
    arr = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()
    if ndim == 1 and arr.size and int(arr.max()) > 9:
        raise corrupt(f"label {int(arr.max())} outside 0..9")
    return arr


def _download_mnist(names: Iterable[str], dest: Path) -> None:
    for name in names:
        gz_md5 = MNIST_FILES[name][1] if name in MNIST_FILES else None
        errors: list[str] = []
        for mirror in MNIST_MIRRORS:
            url = mirror.rstrip("/") + "/" + name + ".gz"
            try:
                download_file(url, dest / f"{name}.gz", gz_md5)
                break
            except JeatError as e:
                errors.append(str(e))
        else:
            raise JeatError(
                f"could not download {name}.gz from any MNIST mirror ({'; '.join(errors)})"
            )


def _load_mnist_files(
    root: Path | None, download: bool, names: tuple[str, ...]
) -> dict[str, np.ndarray]:
    folders = _mnist_bases(root)
    found = {n: _find_idx(n, folders) for n in names}
    missing = [n for n, p in found.items() if p is None]
    if missing and download:
        # Complete a folder that already holds some MNIST files, else use <base>/mnist.
        present = [p.parent for p in found.values() if p is not None]
        dest = present[0] if present else folders[1]
        _download_mnist(missing, dest)
        found = {n: _find_idx(n, folders) for n in names}
        missing = [n for n, p in found.items() if p is None]
    if missing:
        listed = ", ".join(f"{n}(.gz)" for n in missing)
        raise JeatError(
            f"MNIST files missing in {folders[0]} (or its mnist/ subfolder): {listed}; "
            f"{_DOWNLOAD_HINT} a folder holding the original idx files"
        )
    out: dict[str, np.ndarray] = {}
    for n, path in found.items():
        assert path is not None
        magic = _IDX_IMAGES_MAGIC if "images" in n else _IDX_LABELS_MAGIC
        md5 = MNIST_FILES[n][0] if n in MNIST_FILES else None
        out[n] = _parse_idx(path, magic, md5)
    for images, labels in zip(names[::2], names[1::2], strict=True):
        if len(out[images]) != len(out[labels]):
            raise JeatError(
                f"MNIST files are corrupt: {found[images]} holds {len(out[images])} images but "
                f"{found[labels]} holds {len(out[labels])} labels; replace them with the originals"
            )
    return out


@register_dataset(
    DatasetInfo(
        name="mnist",
        description="MNIST handwritten digits 28x28 (60,000 train / 10,000 test, idx files)",
        **_MNIST_INFO,
    )
)
def _load_mnist(root: Path | None, download: bool) -> RawSplit:
    arrays = _load_mnist_files(root, download, _MNIST_TRAIN + _MNIST_TEST)
    return RawSplit(
        arrays[_MNIST_TRAIN[0]][:, None],
        arrays[_MNIST_TRAIN[1]],
        arrays[_MNIST_TEST[0]][:, None],
        arrays[_MNIST_TEST[1]],
    )


@register_dataset(
    DatasetInfo(
        name="mnist-t10k",
        description="MNIST test set only (t10k files) split 8,000 train / 2,000 test, stratified",
        **_MNIST_INFO,
    )
)
def _load_mnist_t10k(root: Path | None, download: bool) -> RawSplit:
    from sklearn.model_selection import train_test_split

    arrays = _load_mnist_files(root, download, _MNIST_TEST)
    x = arrays[_MNIST_TEST[0]][:, None]
    y = arrays[_MNIST_TEST[1]].astype(np.int64)
    n_test = max(1, round(len(y) * 0.2))
    try:
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=n_test, random_state=0, stratify=y
        )
    except ValueError as e:  # too few images per class to stratify
        raise JeatError(
            f"MNIST test files hold too few images to split ({len(y)}): {e}; use the original "
            "t10k files"
        ) from e
    return RawSplit(x_tr, y_tr, x_te, y_te)


# --------------------------------------------------------------------------- cifar (pickles)
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (CIFAR batches), never arbitrary objects."""

    _numpy = {
        "_reconstruct": np.zeros(1).__reduce__()[0],
        "_frombuffer": np.zeros(1).__reduce_ex__(5)[0],
        "ndarray": np.ndarray,
        "dtype": np.dtype,
        "scalar": np.float64(0).__reduce__()[0],
    }
    _other = {("_codecs", "encode"): codecs.encode, ("builtins", "bytearray"): bytearray}

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "numpy" and name in self._numpy:
            return self._numpy[name]
        if (module, name) in self._other:
            return self._other[(module, name)]
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _ArrayUnpickler(fh, encoding="bytes").load()
    except PermissionError as e:
        raise JeatError(f"cannot read {path}: permission denied; fix its permissions") from e
    except Exception as e:  # any unpickling failure means a corrupt file
        raise JeatError(
            f"CIFAR file {path} is corrupt (cannot unpickle: {type(e).__name__}); delete it and "
            "re-run with download=True"
        ) from e
    if not isinstance(obj, dict):
        raise JeatError(f"CIFAR file {path} is corrupt (not a dict); replace it with the original")
    return obj


def _cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)

    def corrupt(why: str) -> JeatError:
        return JeatError(
            f"CIFAR file {path} is corrupt ({why}); delete it and re-run with download=True"
        )

    if b"data" not in d or label_key not in d:
        missing = [k.decode() for k in (b"data", label_key) if k not in d]
        raise corrupt(f"missing key(s) {', '.join(missing)}")
    try:
        data = np.asarray(d[b"data"])
        labels = np.asarray(d[label_key])
    except Exception as e:
        raise corrupt(f"unreadable arrays: {e}") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise corrupt(f"data has shape {data.shape}, expected N x 3072")
    if data.dtype != np.uint8:
        if data.dtype.kind not in "iu" or (data.size and (data.min() < 0 or data.max() > 255)):
            raise corrupt(f"data has dtype {data.dtype}, expected uint8")
        data = data.astype(np.uint8)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise corrupt(f"{len(labels)} labels for {len(data)} images")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise corrupt(f"label out of range 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_class_names(path: Path, key: bytes, num_classes: int) -> tuple[str, ...] | None:
    if not path.is_file():
        return None
    try:
        names = _unpickle(path).get(key)
        out = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    except Exception:
        return None
    return out if len(out) == num_classes else None


def _load_cifar(
    root: Path | None,
    download: bool,
    *,
    title: str,
    folder_name: str,
    train_files: tuple[str, ...],
    test_file: str,
    meta_file: str,
    label_key: bytes,
    names_key: bytes,
    num_classes: int,
    url: str,
    md5: str,
) -> RawSplit:
    base = root if root is not None else default_data_dir()
    required = (*train_files, test_file)
    is_folder = base.name == folder_name or (base / required[0]).is_file()
    folder = base if is_folder else base / folder_name
    missing = [f for f in required if not (folder / f).is_file()]
    if missing:
        archive = folder.parent / url.rsplit("/", 1)[-1]
        if archive.is_file():  # a user-placed archive: verify and extract, keep it
            got = md5sum(archive)
            if got != md5:
                raise JeatError(
                    f"checksum mismatch for {archive} (md5 {got}, expected {md5}); delete it and "
                    "download it again"
                )
            _extract_folder(archive, folder_name, folder)
        elif download:
            download_file(url, archive, md5)
            try:
                _extract_folder(archive, folder_name, folder)
            finally:
                with contextlib.suppress(OSError):
                    archive.unlink()
        missing = [f for f in required if not (folder / f).is_file()]
    if missing:
        raise JeatError(
            f"{title} files missing in {folder}: {', '.join(missing)}; {_DOWNLOAD_HINT} the folder "
            f"holding {folder_name}/"
        )
    xs, ys = zip(
        *(_cifar_batch(folder / f, label_key, num_classes) for f in train_files), strict=True
    )
    x_te, y_te = _cifar_batch(folder / test_file, label_key, num_classes)
    names = _cifar_class_names(folder / meta_file, names_key, num_classes)
    return RawSplit(np.concatenate(xs), np.concatenate(ys), x_te, y_te, names)


_CIFAR_COMMON = {"shape": (3, 32, 32), "eps_linf": 8 / 255, "eps_l2": 0.5, "augment": "crop-flip"}


@register_dataset(
    DatasetInfo(
        name="cifar10",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        description="CIFAR-10 32x32 colour images, 10 classes (python-pickle batches)",
        class_names=CIFAR10_CLASSES,
        **_CIFAR_COMMON,
    )
)
def _load_cifar10(root: Path | None, download: bool) -> RawSplit:
    return _load_cifar(
        root,
        download,
        title="CIFAR-10",
        folder_name="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
        url=CIFAR10_URL,
        md5=CIFAR10_MD5,
    )


@register_dataset(
    DatasetInfo(
        name="cifar100",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        description="CIFAR-100 32x32 colour images, 100 fine classes (python-pickle files)",
        class_names=CIFAR100_CLASSES,
        **_CIFAR_COMMON,
    )
)
def _load_cifar100(root: Path | None, download: bool) -> RawSplit:
    return _load_cifar(
        root,
        download,
        title="CIFAR-100",
        folder_name="cifar-100-python",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
        url=CIFAR100_URL,
        md5=CIFAR100_MD5,
    )


# --------------------------------------------------------------------------- augmentation
AUGMENTATIONS = ("none", "shift", "crop-flip")


def _rand_int(high: int, n: int, generator: torch.Generator | None, device: torch.device):
    """n integers in [0, high) drawn with ``generator`` (on its own device), moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (n,), generator=generator, device=gen_device).to(device)


def _random_translate(x: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
    """Per-image random translation by up to ``pad`` pixels each way, zero-filled (= pad + crop)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = _rand_int(2 * pad + 1, n, generator, x.device)
    dx = _rand_int(2 * pad + 1, n, generator, x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # N x H
    cols = dx[:, None] + torch.arange(w, device=x.device)  # N x W
    idx_r = rows[:, None, :, None].expand(n, c, h, w + 2 * pad)
    out = torch.gather(padded, 2, idx_r)
    idx_c = cols[:, None, None, :].expand(n, c, h, w)
    return torch.gather(out, 3, idx_c)


def augment_batch(
    x: torch.Tensor, kind: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random training augmentation of an N x C x H x W batch on its own device.

    ``"none"`` returns ``x`` itself; ``"shift"`` translates each image by up to
    ``max(1, H // 14)`` pixels (1 for 8x8 digits, 2 for MNIST) with zero fill; ``"crop-flip"`` is a
    random crop with 4-pixel zero padding plus a horizontal flip with probability 0.5. All
    randomness comes from ``generator`` (CPU or on x's device), so results are reproducible.
    """
    if kind not in AUGMENTATIONS:
        raise JeatError(f"unknown augmentation {kind!r}; choose one of: {', '.join(AUGMENTATIONS)}")
    if kind == "none":
        return x
    if x.dim() != 4:
        raise JeatError(f"augment_batch expects an N x C x H x W batch, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        return x
    if kind == "shift":
        return _random_translate(x, max(1, x.shape[2] // 14), generator)
    out = _random_translate(x, 4, generator)
    flip = _rand_int(2, x.shape[0], generator, x.device).bool()
    return torch.where(flip[:, None, None, None], out.flip(3), out)
