"""Generation scores: IS and FID formulas against direct computations, the judge backend (its
cache and CLI), the Inception-v3 backend's plumbing and its errors when unavailable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from jeat import JeatError
from jeat.data import load_dataset
from jeat.metrics import (
    GenerationScores,
    InceptionBackend,
    JudgeBackend,
    inception_score,
    load_judge,
    score_samples,
    train_judge,
)

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def _reference_fd(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance by a different route than ours: the trace of the square root of
    ``S1 S2`` as the sum of square roots of the eigenvalues of ``S1^(1/2) S2 S1^(1/2)``
    (symmetric, so eigh), all in float64."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_sqrt = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def _reference_is(probs: np.ndarray, splits: int) -> float:
    parts = np.array_split(probs, splits)
    scores = []
    for p in parts:
        py = p.mean(0)
        kl = (p * (np.log(p + 1e-30) - np.log(py + 1e-30))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def test_judge_fid_and_is_equal_direct_numpy_scipy_computations(standard_model, digits):
    backend = JudgeBackend(standard_model)
    samples = (digits.x_test[:200] + 0.1 * torch.rand(200, 1, 8, 8)).clamp(0, 1)
    real = digits.x_train[:400]
    s = score_samples(backend, samples, real, digits.y_test[:200], splits=4)
    probs, f_samples = backend.outputs(samples)
    _, f_real = backend.outputs(real)
    ref = _reference_fd(f_samples.numpy(), f_real.numpy())
    assert s.frechet_distance == pytest.approx(ref, rel=1e-3)
    # and against SciPy's sqrtm on the same statistics
    s1, s2 = np.cov(f_samples.numpy(), rowvar=False), np.cov(f_real.numpy(), rowvar=False)
    d = f_samples.numpy().mean(0) - f_real.numpy().mean(0)
    scipy_fd = d @ d + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert s.frechet_distance == pytest.approx(scipy_fd, rel=1e-3)
    # the IS: same seeded shuffle, then the textbook formula per split
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    assert s.inception_score == pytest.approx(_reference_is(probs[perm].numpy(), 4), rel=1e-9)
    assert (s.is_label, s.fd_label, s.backend) == ("judge-IS", "judge-FID", "judge")
    assert s.accuracy is not None and s.accuracy > 80
    assert "judge-IS" in s.line() and "judge-FID" in s.line()


def test_a_collapsed_generator_scores_below_the_reference_of_real_test_images(
    standard_model, digits
):
    """Samples that are one training image per class, repeated: real-looking (the images are
    real) but no diversity at all. Precision stays high, recall and within-class diversity
    fall to about 0; real test images, the reference scored alongside, keep both."""
    backend = JudgeBackend(standard_model)
    first = torch.tensor([int((digits.y_train == c).nonzero()[0]) for c in range(10)])
    labels = torch.arange(10).repeat_interleave(20)
    samples = digits.x_train[first[labels]]
    s = score_samples(backend, samples, digits.x_train, labels, splits=5,
                      real_labels=digits.y_train, held_out=digits.x_test,
                      held_out_labels=digits.y_test)  # fmt: skip
    ref = s.reference
    assert ref is not None and ref.n_samples == 200 and s.n_knn == ref.n_knn == 200
    assert s.diversity == 0.0 and sorted(s.diversity_per_class) == list(range(10))
    assert s.recall < 0.1 and s.precision > 0.5
    assert ref.recall > 0.6 and ref.precision > 0.6
    # ten points cover only the real balls around them
    assert s.coverage < 0.5 and ref.coverage > 0.8
    assert 0.8 < ref.diversity < 1.25
    assert ref.frechet_distance < s.frechet_distance and ref.accuracy > 90
    # the scores survive their JSON file
    back = GenerationScores.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and back.reference == ref
    assert "precision" in s.line() and "recall" in s.line()
    assert s.reference_line().startswith("reference, 200 real held-out images: judge-FID")
    # without labels on either side, the judge's verdicts group the images
    unlabelled = score_samples(backend, samples, digits.x_train, splits=5)
    assert unlabelled.diversity == 0.0 and unlabelled.reference is None


def test_score_samples_errors(standard_model, digits):
    backend = JudgeBackend(standard_model)
    with pytest.raises(JeatError, match="differ in shape"):
        score_samples(backend, digits.x_test[:20], torch.rand(20, 1, 9, 9))
    with pytest.raises(JeatError, match="labels for"):
        score_samples(backend, digits.x_test[:20], digits.x_test, digits.y_test[:5])
    with pytest.raises(JeatError, match=r"\[0, 1\]|range"):
        score_samples(backend, digits.x_test[:20] * 3, digits.x_test)
    with pytest.raises(JeatError, match="splits"):
        inception_score(torch.full((4, 10), 0.1), splits=10)
    with pytest.raises(JeatError, match="3 labels for 360 real images"):
        score_samples(backend, digits.x_test[:20], digits.x_test, real_labels=digits.y_test[:3])
    with pytest.raises(JeatError, match="held-out images"):
        score_samples(backend, digits.x_test[:20], digits.x_test, held_out=torch.rand(5, 1, 9, 9))


def test_inception_backend_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails
    with pytest.raises(JeatError, match="torch-fidelity.*judge backend"):
        InceptionBackend()
    fake = types.ModuleType("torch_fidelity")
    sub = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    seen: dict = {}

    class FakeInception(torch.nn.Module):
        """Stands in for torch-fidelity's extractor: records what it is given."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            seen.update(name=name, features=features_list, path=feature_extractor_weights_path)
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            seen["dtype"], seen["shape"] = x.dtype, tuple(x.shape)
            flat = x.float().flatten(1)
            pool = torch.cat([flat.mean(1, keepdim=True), flat.std(1, keepdim=True)], 1)
            return pool * self.scale, flat[:, :10]

    sub.FeatureExtractorInceptionV3 = FakeInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", fake)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", sub)
    monkeypatch.setenv("JEAT_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(JeatError, match="weights not found at .*missing.pth"):
        InceptionBackend()
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"stand-in")
    monkeypatch.setenv("JEAT_INCEPTION_WEIGHTS", str(weights))
    backend = InceptionBackend(batch_size=7)
    assert seen["features"] == ["2048", "logits_unbiased"] and seen["path"] == str(weights)
    grey = torch.rand(20, 1, 8, 8)
    s = score_samples(backend, grey, torch.rand(30, 1, 8, 8), torch.zeros(20).long(), splits=2)
    assert seen["dtype"] == torch.uint8 and seen["shape"][1] == 3  # uint8 RGB, as the net wants
    assert (s.is_label, s.fd_label, s.accuracy) == ("IS", "FID", None)


@pytest.mark.skipif(not SHARED_MNIST.exists(), reason=f"MNIST test files absent at {SHARED_MNIST}")
def test_mnist_judge_scores_separate_real_images_from_noise(tmp_path):
    data = load_dataset("mnist-t10k", root=SHARED_MNIST)
    fast = ("schedule.warmup_steps=10", "model.options.width=16", "optim.lr=3e-3")
    judge, acc, folder = train_judge(
        "mnist-t10k",
        data=data,
        folder=tmp_path / "judge",
        epochs=8,  # measured: 98.5% test accuracy, judge-IS 8.84 (3 epochs: 96.1%, IS 7.3)
        progress=False,
        overrides=fast,
    )
    assert acc > 80 and (folder / "judge.json").exists()
    backend = JudgeBackend(load_judge("mnist-t10k", folder))
    real = score_samples(backend, data.x_test, data.x_train, data.y_test, splits=10)
    noise = score_samples(backend, torch.rand(2000, 1, 28, 28), data.x_train, splits=10)
    print(f"\nreal: {real.line()}\nnoise: {noise.line()}")
    assert real.frechet_distance * 20 < noise.frechet_distance
    assert real.inception_score > 8.5  # close to the 10 classes
    assert noise.inception_score < real.inception_score


def test_judge_and_score_cli(tmp_path, digits):
    env = {**os.environ, "JEAT_JUDGE_DIR": str(tmp_path / "judges")}

    def jeat(*args):
        return subprocess.run(
            [sys.executable, "-m", "jeat.cli", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
        )

    npz = tmp_path / "real.npz"
    np.savez(npz, images=digits.x_test.numpy(), labels=digits.y_test.numpy(), dataset="digits")
    r = jeat("score", npz, "--against", "digits")
    assert r.returncode == 2 and "jeat judge train --dataset digits" in r.stderr
    r = jeat("judge", "train", "--dataset", "digits", "--epochs", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "judges" / "digits" / "model.pt").exists()
    r = jeat("score", npz, "--against", "digits", "--splits", "5")
    assert r.returncode == 0, r.stderr
    assert "judge-IS" in r.stdout and "judge-FID" in r.stdout
    assert "Inception-v3 IS/FID skipped" in r.stdout or "inception-v3" in r.stdout
    scores = tmp_path / "real.scores.json"
    data = json.loads(scores.read_text())
    assert data["judge"]["inception_score"] > 8 and data["judge"]["accuracy"] > 90
    # the reference: the held-out (test) images against the training images; the "samples"
    # here are those very test images, so both score the same
    assert "reference, 360 real held-out images" in r.stdout
    ref = data["judge"]["reference"]
    assert ref["frechet_distance"] == pytest.approx(data["judge"]["frechet_distance"])
    assert ref["recall"] == pytest.approx(data["judge"]["recall"])
    r = jeat(
        "score", npz, "--against", "digits", "--reference", "none", "--out", tmp_path / "n.json"
    )
    assert (
        r.returncode == 0
        and json.loads((tmp_path / "n.json").read_text())["judge"]["reference"] is None
    )
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((3, 8, 8)))
    r = jeat("score", bad, "--against", "digits")
    assert r.returncode == 2 and "no 'images' array" in r.stderr
    assert 0 <= data["judge"]["precision"] <= 1 and 0 <= data["judge"]["recall"] <= 1
    assert data["judge"]["diversity"] > 0  # the test images: grouped by their labels
    bad.write_bytes(b"not a zip")
    r = jeat("score", bad, "--against", "digits")
    assert r.returncode == 2 and "cannot read samples" in r.stderr
