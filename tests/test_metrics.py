"""Judge-based generation metrics: the Fréchet distance and the Inception-style score."""

import numpy as np
import pytest
import torch
from torch import nn

from jeat import JeatError
from jeat.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    inception_style_score,
    judge_scores,
)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, size=5), rng.uniform(0.5, 2, size=5)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-8)
    # a full (rotated) covariance: FD is invariant to rotating both sides
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0, abs=1e-8)


def test_fd_of_samples_grows_with_the_shift():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=gen)
    b = torch.randn(4000, 3, generator=gen)
    same = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    shifted = frechet_distance(*feature_statistics(a), *feature_statistics(b + 1.0))
    assert same < 0.02 and shifted == pytest.approx(3.0, abs=0.1)


def test_inception_style_score_bounds():
    k = 10
    confident_diverse = torch.eye(k).repeat(5, 1)  # every class, fully confident
    assert inception_style_score(confident_diverse) == pytest.approx(k)
    one_class = torch.zeros(50, k)
    one_class[:, 3] = 1
    assert inception_style_score(one_class) == pytest.approx(1.0)
    assert inception_style_score(torch.full((50, k), 1 / k)) == pytest.approx(1.0)
    assert (
        inception_style_score(
            confident_diverse,
            splits=5,
        )
        <= k
    )


def test_inception_score_shuffles_class_sorted_samples_before_splitting():
    k = 10
    sorted_by_class = torch.eye(k).repeat_interleave(50, dim=0)  # 50 of class 0, then 1, ...
    mean, std = inception_score(sorted_by_class, splits=5)
    assert mean > 9.0 and std < 0.5  # each split of 100 holds nearly every class
    ordered, _ = inception_score(sorted_by_class, splits=5, shuffle_seed=None)
    assert ordered == pytest.approx(2.0)  # a split of two classes scores 2
    assert inception_score(sorted_by_class, splits=1) == pytest.approx((k, 0.0))
    with pytest.raises(JeatError, match="splits"):
        inception_score(sorted_by_class[:3], splits=5)


class _Linear(nn.Module):
    """A fixed 'judge': class = which quarter of the image is brightest."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Flatten()
        self.head = nn.Linear(16, 4, bias=False)
        with torch.no_grad():
            w = torch.zeros(4, 4, 4)
            w[0, :2, :2] = w[1, :2, 2:] = w[2, 2:, :2] = w[3, 2:, 2:] = 20.0
            self.head.weight.copy_(w.view(4, 16))

    def forward(self, x):
        return self.head(self.feat(x))


def test_judge_scores_on_a_known_judge():
    judge = _Linear()
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(50)
    x = torch.rand(200, 1, 4, 4, generator=gen) * 0.2
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c, 2)
        x[i, 0, 2 * r : 2 * r + 2, 2 * q : 2 * q + 2] += 0.8
    s = judge_scores(judge, x, x, labels)
    assert s.judge_accuracy == 100.0 and s.judge_fd == pytest.approx(0, abs=1e-6)
    assert s.judge_score > 3.5 and s.n == 200
    noise = torch.rand(200, 1, 4, 4, generator=gen)
    worse = judge_scores(judge, noise, x, labels)
    assert worse.judge_fd > 1.0 and worse.judge_accuracy < 50
    with pytest.raises(JeatError, match="differ in shape"):
        judge_scores(judge, x, torch.rand(10, 1, 5, 5))
    with pytest.raises(JeatError, match="labels"):
        judge_scores(judge, x, x, labels[:10])
