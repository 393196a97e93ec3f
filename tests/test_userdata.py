"""The user's own images: folder:PATH and npz:PATH datasets (jeat.userdata via jeat.data), end
to end through the CLI, and every bad input as one clear line with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import cli_fails, jeat_cli, write_image_folder
from PIL import Image

from jeat.data import load_dataset
from jeat.errors import JeatError


def _uint8(x: torch.Tensor) -> np.ndarray:
    return (x.numpy() * 255).round().astype(np.uint8)


def _folder_order(x, y):
    """The order an image folder reads: by class, then by file name (the write order)."""
    order = np.argsort(y.numpy(), kind="stable")
    return x[order], y[order]


def test_folder_and_npz_give_identical_tensors(tmp_path, digits):
    x, y = digits.x_train[:200], digits.y_train[:200]
    xt, yt = digits.x_test[:60], digits.y_test[:60]
    # with a given split: train/ and test/ folders, x_test / y_test arrays
    write_image_folder(tmp_path / "split" / "train", x, y)
    write_image_folder(tmp_path / "split" / "test", xt, yt)
    (xs, ys), (xts, yts) = _folder_order(x, y), _folder_order(xt, yt)
    np.savez(tmp_path / "split.npz", x=_uint8(xs)[:, 0], y=ys.numpy(), x_test=_uint8(xts)[:, 0],
             y_test=yts.numpy())  # fmt: skip
    a = load_dataset(f"folder:{tmp_path / 'split'}")
    b = load_dataset(f"npz:{tmp_path / 'split.npz'}")
    for f in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.info.shape == b.info.shape == (1, 8, 8) and a.info.num_classes == 10
    assert a.info.class_names[:2] == ("c00", "c01")  # sorted folder names
    assert torch.equal(a.x_test[0], torch.from_numpy(_uint8(xts[:1])[0]).float() / 255)
    # with no split given: the same seeded stratified split of the same images (NHWC uint8)
    write_image_folder(tmp_path / "flat", x, y)
    np.savez(tmp_path / "flat.npz", x=_uint8(xs).transpose(0, 2, 3, 1), y=ys.numpy())
    c = load_dataset(f"folder:{tmp_path / 'flat'}")
    d = load_dataset(f"npz:{tmp_path / 'flat.npz'}")
    assert len(c.x_test) == 40 and len(c.x_train) == 160
    per_class = torch.bincount(y, minlength=10).double()
    assert (torch.bincount(c.y_test, minlength=10) - 0.2 * per_class).abs().max() <= 1  # stratified
    for f in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(c, f), getattr(d, f)), f
    # resized the same way (float N x C x H x W in [0, 1] for the npz)
    e = load_dataset(f"folder:{tmp_path / 'flat'}", image_size=12)
    np.savez(tmp_path / "flatf.npz", x=(_uint8(xs) / 255.0).astype(np.float32), y=ys.numpy())
    f_ = load_dataset(f"npz:{tmp_path / 'flatf.npz'}", image_size=12)
    assert e.info.shape == (1, 12, 12)
    assert torch.allclose(e.x_train, f_.x_train, atol=1e-6)


def test_grayscale_and_colour_are_handled_one_way(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 10, 10, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (6, 10, 10), dtype=np.uint8)
    for i in range(6):
        (tmp_path / "mix" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "mix" / "b").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb[i]).save(tmp_path / "mix" / "a" / f"{i}.png")
        Image.fromarray(gray[i]).save(tmp_path / "mix" / "b" / f"{i}.bmp")
    data = load_dataset(f"folder:{tmp_path / 'mix'}")
    assert data.info.shape == (3, 10, 10)
    every = torch.cat([data.x_train, data.x_test])
    labels = torch.cat([data.y_train, data.y_test])
    g = every[labels == 1]  # the grayscale class: its three channels are equal
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    # all grayscale: one channel
    (tmp_path / "gray" / "a").mkdir(parents=True)
    (tmp_path / "gray" / "b").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(gray[i]).save(tmp_path / "gray" / "a" / f"{i}.png")
        Image.fromarray(gray[i + 2]).convert("1").save(tmp_path / "gray" / "b" / f"{i}.png")
    assert load_dataset(f"folder:{tmp_path / 'gray'}").info.shape == (1, 10, 10)


def test_mixed_sizes_need_image_size(tmp_path):
    for i, size in enumerate((8, 8, 12, 12, 8, 12)):
        d = tmp_path / "imgs" / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size, size), 40 * i, np.uint8)).save(d / f"{i}.png")
    with pytest.raises(JeatError, match="differ in size.*--image-size"):
        load_dataset(f"folder:{tmp_path / 'imgs'}")
    data = load_dataset(f"folder:{tmp_path / 'imgs'}", image_size=10)
    assert data.x_train.shape[1:] == (1, 10, 10)
    # a constant image stays constant when resized
    assert torch.allclose(data.x_train[0], data.x_train[0].mean().expand(1, 10, 10), atol=1e-5)


@pytest.mark.parametrize("kind", ["folder", "npz"])
def test_a_model_trains_and_evaluates_on_user_images(tmp_path, digits, kind):
    x, y = _folder_order(digits.x_train[:400], digits.y_train[:400])
    if kind == "folder":
        source = f"folder:{write_image_folder(tmp_path / 'imgs', x, y)}"
    else:
        np.savez(tmp_path / "imgs.npz", x=_uint8(x), y=y.numpy())  # N x C x H x W uint8
        source = f"npz:{tmp_path / 'imgs.npz'}"
    r = jeat_cli("train", "--dataset", source, "--objective", "standard", "--epochs", "8",
                 "--quiet", "--set", "final_eval=false", "--set", "final_samples=false",
                 "--set", "final_analysis=false",
                 "--set", "final_scores=false", "--set", "final_report=false",
                 cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / f"{kind}-imgs-standard-s0"
    meta = json.loads((run / "run.json").read_text())
    assert meta["dataset"] == source.split(":")[0] + ":" + str((tmp_path / "imgs").resolve()) + (
        ".npz" if kind == "npz" else ""
    )
    r = jeat_cli("eval", run, "--attacks", "clean,fgsm", "--eps", "0.2", "--out", "e.json",
                 cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    table = json.loads((tmp_path / "e.json").read_text())
    assert table["n"] == 80 and table["dataset"] == meta["dataset"]
    clean, fgsm = (a["accuracy"] for a in table["attacks"])
    assert clean > 60 and fgsm < clean  # it learned, and the attack is real


def test_bad_user_data_fails_cleanly(tmp_path):
    def img(path, size=8, mode="L"):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, (size, size), 128).save(path)

    train = ["train", "--epochs", "1", "--quiet", "--out", "run", "--dataset"]
    cli_fails([*train, "folder:nowhere"], tmp_path, "nowhere", "does not exist")
    (tmp_path / "empty").mkdir()
    cli_fails([*train, "folder:empty"], tmp_path, "no class subfolders")
    img(tmp_path / "one" / "cat" / "0.png")
    cli_fails([*train, "folder:one"], tmp_path, "only one class (cat)")
    for i in range(3):
        img(tmp_path / "bad" / "a" / f"{i}.png")
        img(tmp_path / "bad" / "b" / f"{i}.png")
    (tmp_path / "bad" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cli_fails([*train, "folder:bad"], tmp_path, "broken.png", "cannot read image")
    for i in range(3):
        img(tmp_path / "mixed" / "a" / f"{i}.png", 8)
        img(tmp_path / "mixed" / "b" / f"{i}.png", 9)
    cli_fails([*train, "folder:mixed"], tmp_path, "differ in size", "--image-size")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 8, 8), dtype=np.uint8)
    y = np.arange(20) % 2
    np.savez(tmp_path / "nokey.npz", images=x, y=y)
    cli_fails([*train, "npz:nokey.npz"], tmp_path, "no x array")
    np.savez(tmp_path / "range.npz", x=x, y=y, x_test=x[:4], y_test=np.array([0, 1, 2, 5]))
    cli_fails([*train, "npz:range.npz"], tmp_path, "y_test", "label 5", "out of range")
    np.savez(tmp_path / "neg.npz", x=x, y=y - 1)
    cli_fails([*train, "npz:neg.npz"], tmp_path, "label -1", "out of range")
    xf = x.astype(np.float32) / 255
    xf[3, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=xf, y=y)
    cli_fails([*train, "npz:nan.npz"], tmp_path, "NaN")
    np.savez(tmp_path / "big.npz", x=x.astype(np.float32), y=y)
    cli_fails([*train, "npz:big.npz"], tmp_path, "outside [0, 1]", "max 255")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    cli_fails([*train, "npz:junk.npz"], tmp_path, "junk.npz", "cannot read")
    cli_fails([*train, "digits", "--image-size", "16"], tmp_path, "--image-size", "digits")
