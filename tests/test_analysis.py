"""Energy-landscape analysis: the PGD-AT basin is flatter than the standard one, and the
machinery (shared directions, chunking, files, validation, seeding) behaves."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from jeat.analysis import analyze, energy_contour, random_directions
from jeat.attacks import model_mode
from jeat.energy import joint_energy_from_logits
from jeat.errors import JeatError
from jeat.utils import pyplot, save_figure

N, GRID = 64, 9


@pytest.fixture(scope="module")
def both(digits, standard_model, pgdat_model, tmp_path_factory):
    """One analysis of both models on the same 64 test images (a few seconds)."""
    out = tmp_path_factory.mktemp("analysis")
    x, y = digits.x_test[:N], digits.y_test[:N]
    models = {"standard": standard_model, "pgd-at": pgdat_model}
    result = analyze(
        models, x, y, eps=digits.info.eps_linf, out_dir=out, grid=GRID, slice_points=9, draws=4
    )
    print("\n" + result.table())
    return result, models, x, y, out


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # the tests' own models; analyze never touches the global RNG
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def tiny_data(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10


def test_pgdat_energy_basin_is_flatter_than_standard(both):
    """The issue's claim, in numbers. Measured on 64 digits test images (eps 0.2, grid 9,
    4 draws; the session's models trained with seed 0):

    ================================  ========  =======  =====
    figure                            standard  PGD-AT   ratio
    ================================  ========  =======  =====
    mean |E(x+δ,y) - E(x,y)|, ε-ball     1.043    0.211    4.9
    mean ||∇x E(x,y)||_2                  8.31     1.82     4.6
    contour rise, mean E - E_centre       2.74     0.73     3.8
    PGD-20 rise E(x_adv,y) - E(x,y)       8.38     1.89     4.4
    mean |E(x+δ) - E(x)|, marginal        1.015    0.160    6.3
    ================================  ========  =======  =====

    The assertions ask for a factor 2, half of the smallest measured ratio.
    """
    result, *_ = both
    std, adv = result.flatness["standard"], result.flatness["pgd-at"]
    print({k: (getattr(std, k), getattr(adv, k)) for k in std.to_dict()})
    assert adv.delta_joint < std.delta_joint / 2
    assert adv.grad_joint < std.grad_joint / 2
    assert adv.delta_marginal < std.delta_marginal / 2
    assert adv.adv_rise_joint < std.adv_rise_joint / 2
    rise = {m: c.rise_mean for m, c in result.contour.items()}
    assert 0 < rise["pgd-at"] < rise["standard"] / 2
    # the adversarial slice climbs less for PGD-AT at its far end too
    assert result.slices["pgd-at"].adversarial[-1] < result.slices["standard"].adversarial[-1]
    # and PGD-AT is the robust one
    assert adv.adv_accuracy > std.adv_accuracy + 20


def test_contour_centre_is_the_energy_at_the_data(both):
    result, models, x, y, _ = both
    c = GRID // 2
    assert result.offsets[c] == 0.0
    for name, model in models.items():
        with model_mode(model, True), torch.no_grad():
            direct = joint_energy_from_logits(model(x), y)
        grid = result.contour_energies[name]
        assert grid.shape == (N, GRID, GRID)
        torch.testing.assert_close(grid[:, c, c], direct, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.centre_energies[name], direct, atol=1e-5, rtol=1e-5)
        assert result.contour[name].mean_relative[c][c] == pytest.approx(0.0, abs=1e-5)
        assert result.contour[name].centre == pytest.approx(float(direct.mean()), abs=1e-4)


def test_every_model_sees_the_same_directions(both):
    result, models, x, y, _ = both
    d1, d2 = result.directions
    flat1, flat2 = d1.flatten(1), d2.flatten(1)
    torch.testing.assert_close(flat1.norm(dim=1), torch.ones(N))
    torch.testing.assert_close(flat2.norm(dim=1), torch.ones(N))
    assert (flat1 * flat2).sum(1).abs().max() < 1e-5
    # the directions depend on the seed and the images' shape only, not on the models
    offsets = torch.tensor(result.offsets, dtype=torch.float64)
    again = energy_contour({"pgd-at": models["pgd-at"]}, x, y, d1, d2, offsets, batch_size=37)
    torch.testing.assert_close(again["pgd-at"], result.contour_energies["pgd-at"])
    dirs = random_directions(x, seed=123)
    torch.testing.assert_close(dirs[0], random_directions(x, seed=123)[0])
    assert not torch.equal(dirs[0], random_directions(x, seed=124)[0])
    # the same model under two names gives two identical panels
    m = tiny_model()
    xs, ys = tiny_data()
    twice = analyze({"a": m, "b": m}, xs, ys, eps=0.1, grid=3, slice_points=3, draws=1)
    torch.testing.assert_close(twice.contour_energies["a"], twice.contour_energies["b"])
    assert twice.to_dict()["flatness"]["a"] == twice.to_dict()["flatness"]["b"]


def test_json_and_figures_are_written(both):
    result, _, _, _, out = both
    data = json.loads((out / "analysis.json").read_text())
    assert data == json.loads(json.dumps(result.to_dict()))
    assert data["models"] == ["standard", "pgd-at"] and data["n"] == N
    assert data["span"] == pytest.approx(2 * 0.2 * 8)  # 2 eps sqrt(64)
    assert len(data["contour"]["offsets"]) == GRID
    assert len(data["contour"]["standard"]["mean_relative"]) == GRID
    assert all(len(row) == GRID for row in data["contour"]["pgd-at"]["mean_relative"])
    assert len(data["slices"]["ts"]) == 9 == len(data["slices"]["pgd-at"]["adversarial"])
    hist = data["histograms"]["standard"]
    assert set(hist) == {"real", "adversarial", "noise"}  # no generated images given
    assert {"mean", "std", "q05", "q50", "q95"} <= set(hist["real"])
    assert hist["real"]["n"] == N
    assert set(data["flatness"]["pgd-at"]) >= {"delta_joint", "grad_joint", "grad_marginal"}
    for name in ("contour", "histograms", "slices", "flatness"):
        path = out / f"{name}.png"
        assert path.read_bytes()[:4] == b"\x89PNG"
        assert data["files"][name] == str(path)
    assert "pgd-at" in result.table()


def test_generated_images_join_the_histograms(tmp_path):
    m, x, y = tiny_model(), *tiny_data()
    gen = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    r = analyze({"m": m}, x, y, eps=0.1, grid=3, draws=1, generated=gen, out_dir=tmp_path,
                contour_image=1)  # fmt: skip
    assert r.histograms["m"]["generated"]["n"] == 5
    assert (tmp_path / "contour.png").exists()
    r = analyze({"m": m, "k": m}, x, y, eps=0.1, grid=3, draws=1, generated={"k": gen})
    assert "generated" not in r.histograms["m"] and r.histograms["k"]["generated"]["n"] == 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"models": {}}, "at least one model"),
        ({"models": {"m": "not a model"}}, "nn.Module"),
        ({"x": torch.full((6, 1, 8, 8), 2.0)}, r"\[0, 1\]"),
        ({"x": torch.rand(6, 64)}, "N x C x H x W"),
        ({"y": torch.full((6,), 10)}, "labels must lie"),
        ({"y": torch.zeros(5, dtype=torch.long)}, "one entry per input"),
        ({"grid": 2}, "grid must be an integer >= 3"),
        ({"span": 0.0}, "span must be a finite number > 0"),
        ({"eps": -0.1}, "eps must be a finite number >= 0"),
        ({"eps": 0.0}, "pass span"),
        ({"batch_size": 0}, "batch_size"),
        ({"generated": torch.rand(3, 1, 4, 4)}, "generated images for 'm' have shape"),
        ({"generated": {"other": torch.rand(3, 1, 8, 8)}}, "unknown model 'other'"),
        ({"contour_image": 6}, "contour_image 6 out of range"),
    ],
)
def test_bad_inputs_are_clear_errors(change, message):
    x, y = tiny_data()
    kwargs = {"models": {"m": tiny_model()}, "x": x, "y": y, "eps": 0.1, "grid": 3, **change}
    with pytest.raises(JeatError, match=message):
        analyze(kwargs.pop("models"), kwargs.pop("x"), kwargs.pop("y"), **kwargs)


class Broken(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10)
        self.value = value

    def forward(self, x):
        return self.lin(x.flatten(1)) * 0 + self.value


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nan_model_is_a_clear_error(value):
    x, y = tiny_data()
    with pytest.raises(JeatError, match="NaN or infinite energies from model 'broken'"):
        analyze({"ok": tiny_model(), "broken": Broken(value)}, x, y, eps=0.1, grid=3)


def test_seeded_and_the_global_rng_and_modes_are_untouched():
    m, x, y = tiny_model(), *tiny_data()
    m.insert(2, nn.Dropout(0.5))
    m.train()
    state = torch.get_rng_state()
    a = analyze({"m": m}, x, y, eps=0.1, grid=3, slice_points=5, draws=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert m.training and all(mod.training for mod in m.modules())  # modes restored
    assert all(p.grad is None for p in m.parameters())  # no parameter gradients left
    b = analyze({"m": m}, x, y, eps=0.1, grid=3, slice_points=5, draws=2, seed=3)
    assert a.to_dict() == b.to_dict()
    c = analyze({"m": m}, x, y, eps=0.1, grid=3, slice_points=5, draws=2, seed=4)
    assert c.to_dict()["contour"] != a.to_dict()["contour"]


def test_save_figure_writes_atomically_and_closes(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    num = fig.number
    assert save_figure(fig, tmp_path / "sub" / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert num not in plt.get_fignums()
    fig, _ = plt.subplots()
    assert save_figure(fig, tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
