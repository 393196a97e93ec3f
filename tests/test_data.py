"""Tests for jeat.data: loaders, validation, downloads (file:// only) and augmentation."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from jeat import data as jdata
from jeat.data import (
    DatasetInfo,
    augment_batch,
    dataset_info,
    default_data_dir,
    download_file,
    list_datasets,
    load_dataset,
    md5sum,
)
from jeat.errors import JeatError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_MNIST = SHARED / "mnist"
SHARED_CIFAR = SHARED / "cifar-10-batches-py"
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _need_mnist() -> Path:
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"shared MNIST test files absent at {SHARED_MNIST}")
    return SHARED_MNIST


def _need_cifar() -> Path:
    if not all((SHARED_CIFAR / f).is_file() for f in CIFAR_FILES):
        pytest.skip(f"shared CIFAR-10 subset absent at {SHARED_CIFAR}")
    return SHARED_CIFAR


def _files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


# --------------------------------------------------------------------------- fakes
def _write_cifar_batch(path: Path, n: int, seed: int, label_key: bytes = b"labels") -> None:
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"fake batch",
        label_key: [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


def _fake_cifar10(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(CIFAR_FILES):
        _write_cifar_batch(folder / name, n, seed=i)
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def _cifar_tarball(tmp_path: Path, n: int = 3) -> Path:
    src = _fake_cifar10(tmp_path / "src" / "cifar-10-batches-py", n)
    archive = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    return archive


def _idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    n, h, w = images.shape
    header = b"".join(int(v).to_bytes(4, "big") for v in (magic, n, h, w))
    return header + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    header = b"".join(int(v).to_bytes(4, "big") for v in (magic, len(labels)))
    return header + labels.astype(np.uint8).tobytes()


def _fake_mnist_bytes(n: int, seed: int) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return _idx_images(images), _idx_labels(labels)


# --------------------------------------------------------------------------- registry
def test_list_datasets_and_info() -> None:
    names = [info.name for info in list_datasets()]
    assert names[0] == "digits"
    assert {"digits", "mnist", "mnist-t10k", "cifar10", "cifar100"} <= set(names)
    for info in list_datasets():
        assert isinstance(info, DatasetInfo)
        assert len(info.class_names) == info.num_classes
        assert len(info.mean) == len(info.std) == info.shape[0]
        assert info.augment in ("none", "shift", "crop-flip")
    assert dataset_info("mnist").eps_linf == pytest.approx(0.3)
    assert dataset_info("cifar10").eps_linf == pytest.approx(8 / 255)
    assert dataset_info("digits").eps_l2 == pytest.approx(1.0)
    assert dataset_info("MNIST_T10K").name == "mnist-t10k"
    assert len(set(dataset_info("cifar100").class_names)) == 100


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(JeatError) as err:
        dataset_info("imagenet")
    msg = str(err.value)
    assert "imagenet" in msg
    for name in ("digits", "mnist", "mnist-t10k", "cifar10", "cifar100"):
        assert name in msg
    with pytest.raises(JeatError, match="digits"):
        load_dataset("nope")


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JEAT_DATA_DIR", str(tmp_path / "d"))
    assert default_data_dir() == tmp_path / "d"
    monkeypatch.delenv("JEAT_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "jeat" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_dir() == Path.home() / ".cache" / "jeat" / "data"


# --------------------------------------------------------------------------- digits
def test_digits() -> None:
    d = load_dataset("digits")
    assert d.info.shape == (1, 8, 8)
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    for x in (d.x_train, d.x_test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(d.y_train.tolist()) == set(range(10)) == set(d.y_test.tolist())
    # stratified: every class has 35..37 test images (20% of 174..183)
    counts = torch.bincount(d.y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    again = load_dataset("digits")
    assert torch.equal(d.x_train, again.x_train) and torch.equal(d.y_test, again.y_test)
    assert torch.equal(d.x_test, again.x_test) and torch.equal(d.y_train, again.y_train)


# --------------------------------------------------------------------------- mnist
def test_mnist_t10k_from_shared() -> None:
    root = _need_mnist()
    d = load_dataset("mnist-t10k", root=root)
    assert d.x_train.shape == (8000, 1, 28, 28) and d.x_test.shape == (2000, 1, 28, 28)
    assert d.x_train.dtype == torch.float32
    assert float(d.x_train.min()) >= 0.0 and float(d.x_train.max()) <= 1.0
    assert float(d.x_train.max()) == 1.0
    assert set(d.y_test.tolist()) == set(range(10))
    # stratified 80/20: per-class test share within one image of 20%
    total = torch.bincount(torch.cat([d.y_train, d.y_test]), minlength=10)
    test = torch.bincount(d.y_test, minlength=10)
    assert torch.all((test - total * 0.2).abs() <= 1)
    # same result through the parent folder (root/mnist) and on a second load
    again = load_dataset("mnist-t10k", root=root.parent)
    assert torch.equal(d.x_test, again.x_test) and torch.equal(d.y_train, again.y_train)
    # the training mean matches the stored normalisation constant
    assert float(d.x_train.mean()) == pytest.approx(d.info.mean[0], abs=0.01)


def test_mnist_from_shared_names_missing_train_files() -> None:
    root = _need_mnist()
    with pytest.raises(JeatError) as err:
        load_dataset("mnist", root=root)
    msg = str(err.value)
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert "t10k" not in msg.split(":", 1)[1].split(";")[0]  # test files were found
    assert "download" in msg


def test_mnist_missing_mentions_download(tmp_path: Path) -> None:
    with pytest.raises(JeatError, match="download") as err:
        load_dataset("mnist-t10k", root=tmp_path)
    assert "t10k-images-idx3-ubyte" in str(err.value)


def test_idx_wrong_magic_is_corrupt(tmp_path: Path) -> None:
    images, labels = _fake_mnist_bytes(20, seed=0)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x02" + images[4:])
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(JeatError, match="corrupt") as err:
        load_dataset("mnist-t10k", root=tmp_path)
    assert "t10k-images-idx3-ubyte" in str(err.value) and "magic" in str(err.value)


def test_idx_truncated_and_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _fake_mnist_bytes(20, seed=0)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(images[:-5])
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(JeatError, match="corrupt"):
        load_dataset("mnist-t10k", root=tmp_path)
    # structurally valid but not the canonical files: md5 check fails
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(images)
    with pytest.raises(JeatError, match="checksum"):
        load_dataset("mnist-t10k", root=tmp_path)
    # a broken gzip file is corrupt too
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(images)[:-20])
    with pytest.raises(JeatError, match="corrupt"):
        load_dataset("mnist-t10k", root=tmp_path)


def test_mnist_download_from_file_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    table: dict[str, tuple[str, str]] = {}
    sizes = {"train": 30, "t10k": 20}
    for prefix, n in sizes.items():
        images, labels = _fake_mnist_bytes(n, seed=n)
        for name, raw in (
            (f"{prefix}-images-idx3-ubyte", images),
            (f"{prefix}-labels-idx1-ubyte", labels),
        ):
            gz = mirror / f"{name}.gz"
            gz.write_bytes(gzip.compress(raw))
            table[name] = (jdata._md5_bytes(raw), md5sum(gz))
    dead = (tmp_path / "no-such-mirror").as_uri() + "/"
    monkeypatch.setattr(jdata, "MNIST_MIRRORS", (dead, mirror.as_uri() + "/"))
    monkeypatch.setattr(jdata, "MNIST_FILES", table)

    cache = tmp_path / "cache"
    with pytest.raises(JeatError, match="download"):
        load_dataset("mnist", root=cache)
    d = load_dataset("mnist", root=cache, download=True)
    assert d.x_train.shape == (30, 1, 28, 28) and d.x_test.shape == (20, 1, 28, 28)
    assert d.y_train.tolist() == [i % 10 for i in range(30)]
    stored = sorted(p.name for p in _files_under(cache))
    assert stored == sorted(f"{n}.gz" for n in table)  # no temp files left over
    assert all(p.parent == cache / "mnist" for p in _files_under(cache))
    # loads again offline
    assert torch.equal(load_dataset("mnist", root=cache).x_train, d.x_train)

    # wrong expected md5 on every mirror: checksum error, nothing written
    bad = {k: (v[0], "0" * 32) for k, v in table.items()}
    monkeypatch.setattr(jdata, "MNIST_FILES", bad)
    cache2 = tmp_path / "cache2"
    with pytest.raises(JeatError, match="checksum"):
        load_dataset("mnist-t10k", root=cache2, download=True)
    assert _files_under(cache2) == []


# --------------------------------------------------------------------------- cifar
def test_cifar10_from_shared() -> None:
    folder = _need_cifar()
    d = load_dataset("cifar10", root=folder)
    assert d.x_train.shape == (5085, 3, 32, 32) and d.x_test.shape == (1017, 3, 32, 32)
    assert d.x_train.dtype == torch.float32 and d.y_test.dtype == torch.int64
    assert float(d.x_train.min()) == 0.0 and float(d.x_train.max()) == 1.0
    assert set(d.y_train.tolist()) == set(range(10))
    assert int(d.y_test.min()) >= 0 and int(d.y_test.max()) <= 9
    assert d.info.class_names[0] == "airplane" and d.info.class_names[-1] == "truck"
    # the parent folder works too
    again = load_dataset("cifar10", root=folder.parent)
    assert torch.equal(d.y_train, again.y_train)
    mean = d.x_train.mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(d.info.mean), atol=0.03)


def test_cifar_fake_folder_and_meta(tmp_path: Path) -> None:
    folder = _fake_cifar10(tmp_path / "cifar-10-batches-py", n=7)
    d = load_dataset("cifar10", root=tmp_path)
    assert d.x_train.shape == (35, 3, 32, 32) and d.x_test.shape == (7, 3, 32, 32)
    assert d.info.class_names[3] == "class3"
    # pixel layout: row-major RGB planes
    raw = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")[b"data"]
    expected = torch.from_numpy(raw[0].reshape(3, 32, 32).astype(np.float32) / 255)
    assert torch.allclose(d.x_test[0], expected)
    # an unreadable meta file falls back to the built-in names
    (folder / "batches.meta").write_bytes(b"junk")
    assert load_dataset("cifar10", root=folder).info.class_names[0] == "airplane"


def test_cifar_corrupt_and_missing(tmp_path: Path) -> None:
    folder = _fake_cifar10(tmp_path / "cifar-10-batches-py")
    good = (folder / "data_batch_2").read_bytes()

    (folder / "data_batch_2").write_bytes(good[: len(good) // 2])
    with pytest.raises(JeatError, match="corrupt") as err:
        load_dataset("cifar10", root=tmp_path)
    assert "data_batch_2" in str(err.value)

    (folder / "data_batch_2").write_bytes(b"\x00garbage not a pickle")
    with pytest.raises(JeatError, match="corrupt"):
        load_dataset("cifar10", root=tmp_path)

    wide = {b"labels": [0, 1], b"data": np.zeros((2, 3000), dtype=np.uint8)}
    (folder / "data_batch_2").write_bytes(pickle.dumps(wide))
    with pytest.raises(JeatError, match="corrupt") as err:
        load_dataset("cifar10", root=tmp_path)
    assert "3072" in str(err.value)

    bad_label = {b"labels": [0, 10], b"data": np.zeros((2, 3072), dtype=np.uint8)}
    (folder / "data_batch_2").write_bytes(pickle.dumps(bad_label))
    with pytest.raises(JeatError, match="corrupt"):
        load_dataset("cifar10", root=tmp_path)

    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(JeatError, match="corrupt.*labels"):
        load_dataset("cifar10", root=tmp_path)

    # a pickle that would run code is refused, not executed
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": Path("x"), b"labels": []}))
    with pytest.raises(JeatError, match="corrupt"):
        load_dataset("cifar10", root=tmp_path)

    (folder / "data_batch_2").unlink()
    with pytest.raises(JeatError, match="download") as err:
        load_dataset("cifar10", root=tmp_path)
    assert "data_batch_2" in str(err.value) and "data_batch_1" not in str(err.value)


def test_cifar10_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _cifar_tarball(tmp_path, n=3)
    monkeypatch.setattr(jdata, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(jdata, "CIFAR10_MD5", md5sum(archive))
    cache = tmp_path / "cache"
    d = load_dataset("cifar10", root=cache, download=True)
    assert d.x_train.shape == (15, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    assert d.info.class_names[0] == "class0"
    names = sorted(p.relative_to(cache).as_posix() for p in _files_under(cache))
    assert names == sorted(f"cifar-10-batches-py/{f}" for f in (*CIFAR_FILES, "batches.meta"))

    # an archive placed by hand next to the folder is verified and extracted, without download
    cache3 = tmp_path / "cache3"
    cache3.mkdir()
    (cache3 / archive.name).write_bytes(archive.read_bytes())
    assert torch.equal(load_dataset("cifar10", root=cache3).x_test, d.x_test)
    assert (cache3 / archive.name).is_file()

    # wrong checksum: JeatError, and nothing left in the destination folder
    monkeypatch.setattr(jdata, "CIFAR10_MD5", "0" * 32)
    cache2 = tmp_path / "cache2"
    with pytest.raises(JeatError, match="checksum"):
        load_dataset("cifar10", root=cache2, download=True)
    assert _files_under(cache2) == []


def test_cifar_download_rejects_unsafe_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        payload = b"owned"
        info = tarfile.TarInfo("cifar-10-batches-py/../../escaped.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    monkeypatch.setattr(jdata, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(jdata, "CIFAR10_MD5", md5sum(archive))
    cache = tmp_path / "a" / "cache"
    with pytest.raises(JeatError, match="unsafe"):
        load_dataset("cifar10", root=cache, download=True)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert _files_under(cache) == []


def test_download_file(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello jeat" * 1000)
    dest = tmp_path / "out" / "copy.bin"
    assert download_file(src.as_uri(), dest, md5sum(src)) == dest
    assert dest.read_bytes() == src.read_bytes()
    bad = tmp_path / "out2" / "copy.bin"
    with pytest.raises(JeatError, match="checksum"):
        download_file(src.as_uri(), bad, "f" * 32)
    assert list(bad.parent.iterdir()) == []
    with pytest.raises(JeatError, match="could not download"):
        download_file((tmp_path / "missing").as_uri(), bad, None)
    assert list(bad.parent.iterdir()) == []


# --------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("kind,shape", [("shift", (16, 1, 8, 8)), ("shift", (8, 1, 28, 28)),
                                        ("crop-flip", (32, 3, 32, 32))])  # fmt: skip
def test_augment_batch_shape_range_reproducible(kind: str, shape: tuple[int, ...]) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    a = augment_batch(x, kind, torch.Generator().manual_seed(1))
    b = augment_batch(x, kind, torch.Generator().manual_seed(1))
    c = augment_batch(x, kind, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    changed = (a != x).flatten(1).any(1)
    assert int(changed.sum()) > 0


def test_augment_shift_is_a_translation() -> None:
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = augment_batch(x, "shift", torch.Generator().manual_seed(3))
    for i in range(len(x)):
        matches = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                shifted = torch.zeros_like(x[i])
                src = x[i][:, max(0, dy) : 8 + min(0, dy), max(0, dx) : 8 + min(0, dx)]
                shifted[:, max(0, -dy) : 8 + min(0, -dy), max(0, -dx) : 8 + min(0, -dx)] = src
                matches.append(torch.equal(out[i], shifted))
        assert any(matches), f"image {i} is not a translation by at most 1 pixel"


def test_augment_crop_flip_flips_some() -> None:
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = augment_batch(x, "crop-flip", torch.Generator().manual_seed(0))
    assert int((out != x).flatten(1).any(1).sum()) > 32
    # a constant-column image reveals flips: the left-to-right ramp reverses for ~half of them
    ramp = torch.linspace(0, 1, 32).expand(64, 3, 32, 32).contiguous()
    flipped = augment_batch(ramp, "crop-flip", torch.Generator().manual_seed(5))
    centre = flipped[:, 0, 16]
    decreasing = (centre[:, 12] > centre[:, 20]).sum()
    assert 10 < int(decreasing) < 54


def test_augment_none_and_unknown() -> None:
    x = torch.rand(4, 1, 8, 8)
    assert augment_batch(x, "none") is x
    with pytest.raises(JeatError, match="crop-flip"):
        augment_batch(x, "rotate")
    with pytest.raises(JeatError):
        augment_batch(torch.rand(8, 8), "shift")
