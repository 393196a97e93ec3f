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
    knn_radii,
    manifold_scores,
    within_class_diversity,
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


# -- precision, recall, density, coverage and within-class diversity --------------------------


def test_knn_radii_exclude_the_point_itself_and_count_duplicates():
    line = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(line, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(line, 2).tolist() == [3.0, 2.0, 3.0, 6.0]
    assert knn_radii(torch.tensor([[0.0], [0.0], [5.0]]), 1).tolist() == [0.0, 0.0, 5.0]
    with pytest.raises(JeatError, match="1 <= k < number of points"):
        knn_radii(line, 4)
    with pytest.raises(JeatError, match="at least 6 real and generated"):
        manifold_scores(torch.randn(5, 2), torch.randn(30, 2))
    with pytest.raises(JeatError, match="-d"):
        manifold_scores(torch.randn(30, 2), torch.randn(30, 3))


def _brute_force(real: np.ndarray, fake: np.ndarray, k_pr: int, k_dc: int) -> tuple:
    """The four scores straight from their papers' definitions, by another route: SciPy's
    full distance matrices, NumPy sorting and explicit loops."""
    from scipy.spatial.distance import cdist

    rr, ff, fr = cdist(real, real), cdist(fake, fake), cdist(fake, real)
    np.fill_diagonal(rr, np.inf)
    np.fill_diagonal(ff, np.inf)
    r_pr, r_dc = np.sort(rr, 1)[:, k_pr - 1], np.sort(rr, 1)[:, k_dc - 1]
    f_pr = np.sort(ff, 1)[:, k_pr - 1]
    precision = np.mean(
        [any(fr[j, i] <= r_pr[i] for i in range(len(real))) for j in range(len(fake))]
    )
    recall = np.mean([any(fr[j, i] <= f_pr[j] for j in range(len(fake))) for i in range(len(real))])
    density = sum((fr[j] <= r_dc).sum() for j in range(len(fake))) / (k_dc * len(fake))
    coverage = np.mean([fr[:, i].min() <= r_dc[i] for i in range(len(real))])
    return precision, recall, density, coverage


def test_manifold_scores_equal_their_definitions_computed_directly():
    gen = torch.Generator().manual_seed(3)
    real, fake = torch.randn(70, 5, generator=gen), 0.7 * torch.randn(50, 5, generator=gen) + 0.3
    m = manifold_scores(real, fake)
    expected = _brute_force(real.double().numpy(), fake.double().numpy(), 3, 5)
    assert (m.precision, m.recall, m.density, m.coverage) == pytest.approx(expected, abs=1e-12)
    assert (m.n_real, m.n_fake, m.k_pr, m.k_dc) == (70, 50, 3, 5)
    assert 0 < m.recall < 1 and 0 < m.precision < 1  # neither end: the test can tell them apart


def test_precision_recall_density_coverage_give_the_known_answers():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(600, 4, generator=gen)
    same = manifold_scores(real, torch.randn(600, 4, generator=gen))
    assert same.precision > 0.9 and same.recall > 0.9
    assert 0.9 < same.density < 1.1  # 1 in expectation for identical distributions
    # Naeem et al.: coverage of an identical distribution, equal counts, is 1 - 1/2^k
    assert same.coverage == pytest.approx(1 - 0.5**5, abs=0.03)
    # ten separate modes, and a generator that found one of them: real-looking, not diverse
    centres = 8 * torch.randn(10, 4, generator=gen)
    modes = centres[torch.arange(600) % 10] + torch.randn(600, 4, generator=gen)
    collapsed = manifold_scores(modes, centres[0] + torch.randn(600, 4, generator=gen))
    # (a tenth of the real images are in that mode: its k-NN balls are smaller than the
    # identical distribution's, and some of the samples' tails fall outside them)
    assert collapsed.precision > 0.7 and collapsed.recall < 0.15 and collapsed.coverage < 0.15
    # every sample four standard deviations off in each coordinate: nothing looks real
    shifted = manifold_scores(real, torch.randn(600, 4, generator=gen) + 4)
    assert shifted.precision < 0.05 and shifted.density < 0.05 and shifted.recall < 0.05


def test_within_class_diversity_is_one_for_the_data_and_zero_for_a_repeated_image():
    gen = torch.Generator().manual_seed(1)
    groups = torch.arange(300) % 3
    real = 3 * groups[:, None].float() + torch.randn(300, 6, generator=gen)
    value, per = within_class_diversity(real, groups, real, groups)
    assert value == pytest.approx(1.0) and sorted(per) == [0, 1, 2]
    # each class shrunk by half towards its mean: every pairwise distance halves
    means = torch.stack([real[groups == c].mean(0) for c in range(3)])
    half = means[groups] + 0.5 * (real - means[groups])
    assert within_class_diversity(half, groups, real, groups)[0] == pytest.approx(0.5)
    # one image repeated per class, and other samples unlabelled (-1): left out
    first = torch.stack([real[groups == c][0] for c in range(3)])
    repeated = torch.cat([first[groups], torch.randn(10, 6, generator=gen)])
    marks = torch.cat([groups, torch.full((10,), -1)])
    value, per = within_class_diversity(repeated, marks, real, groups)
    assert value == 0.0 and sorted(per) == [0, 1, 2]
    # a class with one sample has no pairs: left out; no class at all: None
    assert within_class_diversity(real[:4], torch.tensor([0, 0, 1, 2]), real, groups)[1].keys() == {
        0
    }
    assert within_class_diversity(real[:2], torch.tensor([5, 5]), real, groups) == (None, {})
    with pytest.raises(JeatError, match="one group per feature"):
        within_class_diversity(real, groups[:10], real, groups)
