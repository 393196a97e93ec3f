import json

import torch
from PIL import Image
from sklearn.svm import SVC

from jeat.config import GenerateConfig, load_config
from jeat.finish import write_grid_record
from jeat.models import create_model
from jeat.samplers import (
    SeededDescent,
    chain_seeds,
    fit_class_gaussians,
    generate_chains,
    sample_seeds,
)
from jeat.utils import save_image_grid


def test_class_gaussian_seeds_have_the_class_statistics(digits):
    g = fit_class_gaussians(digits.x_train, digits.y_train, 10)
    labels = torch.full((2000,), 3)
    s = g.sample(labels, torch.Generator().manual_seed(0))
    assert s.shape == (2000, 1, 8, 8) and s.min() >= 0 and s.max() <= 1
    real = digits.x_train[digits.y_train == 3].mean(0)
    assert (s.mean(0) - real).abs().max() < 0.05


def test_seeds_for_large_images_are_fitted_at_low_resolution():
    x = torch.rand(200, 3, 32, 32)
    y = torch.arange(200) % 4
    g = fit_class_gaussians(x, y, 4, max_side=8)
    assert g.low_shape == (3, 8, 8) and g.chol.shape == (4, 192, 192)
    assert g.sample(torch.tensor([0, 3])).shape == (2, 3, 32, 32)


def test_robust_model_generates_what_an_independent_classifier_recognises(
    digits, standard_model, pgdat_model, tmp_path
):
    """Descending E(x, y) - E(x) from seeds that carry no class information (one Gaussian fitted
    on all training images): the PGD-AT model's images are recognised as their target class by
    an independently trained classifier (an RBF-SVM on pixels, a different model family, so it
    does not share the CNNs' adversarial directions) clearly more often than the standard
    model's."""
    judge = SVC(gamma="scale").fit(digits.x_train.flatten(1).numpy(), digits.y_train.numpy())
    test_acc = (judge.predict(digits.x_test.flatten(1).numpy()) == digits.y_test.numpy()).mean()
    assert test_acc > 0.95
    labels = torch.arange(10).repeat_interleave(50)
    seeds = sample_seeds("pooled", digits, labels, torch.Generator().manual_seed(0))
    seed_rate = float((judge.predict(seeds.flatten(1).numpy()) == labels.numpy()).mean())
    assert seed_rate < 0.2
    steps = load_config("digits-pgdat").generate.steps
    report = [f"judge: RBF-SVM, test acc {100 * test_acc:.1f}%; seeds {100 * seed_rate:.1f}%"]
    gaps = []
    for radius in (1.6, 3.2):  # the default radius (0.2 * sqrt(64)) and twice it
        rates = {}
        for name, model in (("standard", standard_model), ("pgd-at", pgdat_model)):
            images = SeededDescent(steps=steps, radius=radius)(model, seeds, labels)
            assert images.min() >= 0 and images.max() <= 1
            hits = judge.predict(images.flatten(1).numpy()) == labels.numpy()
            rates[name] = 100 * float(hits.mean())
            save_image_grid(images[::5], tmp_path / f"{name}-{radius}.png", nrow=10)
        report.append(
            f"radius {radius}: standard {rates['standard']:.1f}%, PGD-AT {rates['pgd-at']:.1f}%"
        )
        gaps.append(rates["pgd-at"] - rates["standard"])
    print("\n" + "\n".join(report))
    assert min(gaps) > 3 and sum(gaps) / len(gaps) >= 8


def test_every_image_of_a_grid_comes_from_its_own_chain(digits, tmp_path):
    """No two images share a seed: each has its own (recorded), its class's images differ, and
    an image is the same when generated alone from the same base seed, by descent and by SGLD
    (whose noise is per chain too)."""
    model = create_model("small_cnn", in_channels=1, num_classes=10, width=4)
    for method in ("descent", "sgld"):
        g = GenerateConfig(method=method, steps=4)
        grid = generate_chains(model, digits, g, classes=[3, 5], n_per_class=4, seed=7)
        assert grid.labels.tolist() == [3] * 4 + [5] * 4
        assert len(set(grid.seeds)) == 8 and grid.seeds == chain_seeds(7, grid.labels)
        for c in (3, 5):
            same = grid.images[grid.labels == c].flatten(1)
            gaps = torch.cdist(same, same) + torch.eye(4) * 1e9
            assert gaps.min() > 0.1, (method, c)  # no two images of a class alike
        alone = generate_chains(model, digits, g, classes=[5], n_per_class=3, seed=7)
        assert alone.seeds == grid.seeds[4:7]
        torch.testing.assert_close(alone.images, grid.images[4:7], atol=1e-5, rtol=0)
        # another base seed: other chains
        other = generate_chains(model, digits, g, classes=[3, 5], n_per_class=4, seed=8)
        assert not set(other.seeds) & set(grid.seeds)
    # unconditional SGLD: one chain per image as well
    g = GenerateConfig(method="sgld", conditional=False, steps=2)
    free = generate_chains(model, digits, g, n_per_class=1, seed=7)
    assert free.labels is None and len(set(free.seeds)) == 10
    # the grid's record: every image's place, class, own seed and the judge's verdict
    png = tmp_path / "samples.png"
    save_image_grid(grid.images, png, nrow=4)
    record = json.loads(write_grid_record(png, grid, 4, model, "judge-folder").read_text())
    rows = record["images"]
    assert [(r["row"], r["col"], r["label"]) for r in rows[3:5]] == [(0, 3, 3), (1, 0, 5)]
    assert [r["seed"] for r in rows] == grid.seeds
    assert all(0 <= r["judge_class"] < 10 and 0 < r["judge_confidence"] <= 1 for r in rows)
    layout = record["layout"]
    assert Image.open(png).size == (layout["size"][1], layout["size"][0])  # where tiles land
