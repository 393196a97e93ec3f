"""ROA (rectangular occlusion attack) and the Occlusion threat model."""

import pytest
import torch
from torch import nn

from jeat import JeatError
from jeat.attacks.occlusion import ROA, Occlusion
from jeat.attacks.pgd import PGD, attack_loss
from jeat.models import create_model

SEARCHES = ["gradient", "exhaustive"]


def _model(seed=0, channels=1, norm="none"):
    torch.manual_seed(seed)
    return create_model("small_cnn", in_channels=channels, num_classes=10, width=8, norm=norm)


def _batch(n=16, channels=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=g)
    return x, torch.randint(0, 10, (n,), generator=g)


def _box(diff):
    """Bounding box (r0, r1, c0, c1), inclusive, of the nonzero pixels of one H x W map."""
    idx = diff.nonzero()
    return int(idx[:, 0].min()), int(idx[:, 0].max()), int(idx[:, 1].min()), int(idx[:, 1].max())


def _grey_losses(model, x, y, h, w, rows, cols, fill=0.5):
    """CE loss of every image with a grey rectangle at each (row, col): N x len(rows)."""
    out = []
    with torch.no_grad():
        for r, c in zip(rows, cols, strict=True):
            xo = x.clone()
            xo[:, :, r : r + h, c : c + w] = fill
            out.append(attack_loss("ce")(model(xo), y, None))
    return torch.stack(out, dim=1)


# -- 1. the output lies in the threat set -------------------------------------------------------


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("hw", [(3, 3), (2, 4)])
def test_output_differs_only_inside_one_rectangle(search, hw):
    h, w = hw
    model = _model(channels=3)
    x, y = _batch(12, channels=3)
    attack = ROA(h, w, search=search, steps=5)
    x_adv = attack(model, x, y)
    rows, cols = attack.locate(model, x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    for i in range(x.shape[0]):
        changed = (x_adv[i] != x[i]).any(dim=0)
        assert changed.any(), "the rectangle must change the image"
        r0, r1, c0, c1 = _box(changed)
        assert r1 - r0 < h and c1 - c0 < w, f"change spans more than {h}x{w} in image {i}"
        # ... and lies inside the rectangle the search located
        r, c = int(rows[i]), int(cols[i])
        assert r <= r0 and r1 < r + h and c <= c0 and c1 < c + w
    placed = Occlusion(h, w).placed(rows, cols, x.shape)
    assert (placed.distance(x_adv, x) <= placed.eps).all()


def test_occlusion_threat_drives_pgd_inside_the_mask():
    model = _model()
    x, y = _batch(8)
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    cols = torch.tensor([6, 5, 4, 3, 2, 1, 0, 0])
    threat = Occlusion(2, 2).placed(rows, cols, x.shape)
    assert threat.describe() == "patch 2x2"
    assert threat.mask.shape == (8, 1, 8, 8) and threat.mask.sum((1, 2, 3)).eq(4).all()
    assert threat.mask[0, 0, 0:2, 6:8].eq(1).all() and threat.mask[6, 0, 6:8, 0:2].eq(1).all()
    x_adv = PGD(threat, steps=5, random_start=True)(
        model, x, y, generator=torch.Generator().manual_seed(1)
    )
    outside = threat.mask.expand_as(x) == 0
    assert torch.equal(x_adv[outside], x[outside])
    # the moves one by one: projection, random start, step
    anywhere = 2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) - 0.5
    proj = threat.project(anywhere, x)
    assert torch.equal(proj[outside], x[outside])
    assert torch.equal(proj[~outside], anywhere[~outside].clamp(0, 1))
    init = threat.random_init(x, torch.Generator().manual_seed(3))
    assert torch.equal(init[outside], x[outside]) and not torch.equal(init, x)
    assert torch.equal(init, threat.random_init(x, torch.Generator().manual_seed(3)))
    stepped = threat.step(x, torch.randn(x.shape), 0.25)
    assert torch.equal(stepped[outside], x[outside])
    assert torch.allclose((stepped - x)[~outside].abs(), torch.tensor(0.25))
    assert (x_adv[~outside] != x[~outside]).float().mean() > 0.9
    assert (threat.distance(x_adv, x) <= threat.eps).all()
    # a change outside the rectangle is outside the threat set
    bad = x_adv.clone()
    bad[0, 0, 7, 0] = 1 - bad[0, 0, 7, 0]
    assert torch.isinf(threat.distance(bad, x)[0])


# -- 2. the search finds where the loss lives ---------------------------------------------------


def _corner_model(h, w, r0, c0, size=8):
    """2-class linear model whose class-1 logit reads only the h x w block at (r0, c0)."""
    lin = nn.Linear(size * size, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[1].view(size, size)[r0 : r0 + h, c0 : c0 + w] = 1.0
    return nn.Sequential(nn.Flatten(), lin)


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("geom", [(3, 3, 5, 4), (2, 3, 1, 5), (3, 1, 0, 7), (1, 2, 7, 6)])
def test_search_places_the_rectangle_where_the_loss_lives(search, geom):
    h, w, r0, c0 = geom
    model = _corner_model(h, w, r0, c0)
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.rand(10, 1, 8, 8, generator=g)  # grey 0.5 raises the class-1 logit
    y = torch.zeros(10, dtype=torch.long)
    # one candidate: the gradient score alone must find the block
    attack = ROA(h, w, search=search, candidates=1, steps=10)
    rows, cols = attack.locate(model, x, y)
    assert rows.dtype == torch.long and cols.dtype == torch.long
    assert rows.tolist() == [r0] * 10 and cols.tolist() == [c0] * 10
    # PGD then pushes the block to white (the direction that raises the class-1 logit)
    x_adv = attack(model, x, y)
    assert torch.equal(x_adv[:, :, r0 : r0 + h, c0 : c0 + w], torch.ones(10, 1, h, w))
    assert (model(x_adv).argmax(1) == 1).all()


# -- 3. exhaustive search is the brute-force maximiser -----------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
def test_exhaustive_search_maximises_the_occluded_loss(stride):
    model = _model(seed=3)
    x, y = _batch(20, seed=3)
    h, w = 2, 3
    grid = [(r, c) for r in range(0, 8 - h + 1, stride) for c in range(0, 8 - w + 1, stride)]
    brute = _grey_losses(model, x, y, h, w, *zip(*grid, strict=True))
    attack = ROA(h, w, search="exhaustive", stride=stride, max_batch=7)  # odd chunks
    rows, cols = attack.locate(model, x, y)
    assert (rows % stride == 0).all() and (cols % stride == 0).all()
    picked = _grey_losses(model, x, y, h, w, rows.tolist(), cols.tolist()).diagonal()
    torch.testing.assert_close(picked, brute.max(dim=1).values)
    # the last position that fits is searched too (stride 1: row 6, col 5)
    assert (8 - h, 8 - w) in grid or stride > 1
    # gradient search with every position as a candidate is the exhaustive search
    all_cand = ROA(h, w, search="gradient", stride=stride, candidates=len(grid))
    r2, c2 = all_cand.locate(model, x, y)
    assert torch.equal(r2, rows) and torch.equal(c2, cols)
    # ... and with fewer candidates it can only find a lower (or equal) occluded loss
    few = ROA(h, w, search="gradient", stride=stride, candidates=3)
    r3, c3 = few.locate(model, x, y)
    lost = _grey_losses(model, x, y, h, w, r3.tolist(), c3.tolist()).diagonal()
    assert (lost <= picked + 1e-6).all()


# -- 4. it breaks a trained model, more with a bigger rectangle --------------------------------


def test_roa_breaks_the_digits_model(digits, standard_model):
    x, y = digits.x_test[:200], digits.y_test[:200]
    with torch.no_grad():
        clean = 100 * (standard_model(x).argmax(1) == y).float().mean().item()
    acc = {}
    for size in (1, 2, 3):
        x_adv = ROA(size, size)(standard_model, x, y)
        with torch.no_grad():
            acc[size] = 100 * (standard_model(x_adv).argmax(1) == y).float().mean().item()
    print(
        f"clean {clean:.1f}; ROA accuracy by rectangle size",
        {k: round(v, 1) for k, v in acc.items()},
    )
    # measured: clean 99, 1x1 ~60, 2x2 ~4, 3x3 ~0
    assert clean > 95
    assert acc[1] < clean - 15
    assert acc[2] < 30
    assert acc[3] < 5
    assert acc[2] <= acc[1] + 1 and acc[3] <= acc[2] + 1


# -- 5. repeatable, and the model is left as found ---------------------------------------------


def test_repeatable_with_a_generator_and_global_rng_untouched():
    model = _model()
    x, y = _batch()
    attack = ROA(3, 3, random_start=True, steps=3)
    state = torch.get_rng_state()
    a = attack(model, x, y, generator=torch.Generator().manual_seed(5))
    b = attack(model, x, y, generator=torch.Generator().manual_seed(5))
    c = attack(model, x, y, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # without random start the attack is deterministic
    d = ROA(3, 3, steps=3)(model, x, y)
    assert torch.equal(d, ROA(3, 3, steps=3)(model, x, y))


@pytest.mark.parametrize("search", SEARCHES)
def test_model_modes_grads_and_buffers_untouched(search):
    model = _model(norm="batch")
    model.train()
    model[0].eval()  # a submodule in another mode
    modes = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 7.0)
    x, y = _batch()
    ROA(2, 2, search=search, steps=2)(model, x, y)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in params[1:])
    assert torch.equal(params[0].grad, torch.full_like(params[0], 7.0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), f"{k} changed"


def test_empty_batch():
    model = _model()
    x = torch.zeros(0, 1, 8, 8)
    y = torch.zeros(0, dtype=torch.long)
    assert ROA(2, 2)(model, x, y).shape == x.shape
    rows, cols = ROA(2, 2).locate(model, x, y)
    assert rows.numel() == 0 and cols.numel() == 0


# -- 6. bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 0, "width": 3}, "height must be an integer >= 1"),
        ({"height": 3, "width": 2.5}, "width must be an integer >= 1"),
        ({"height": 3, "width": 3, "search": "random"}, "unknown occlusion search 'random'"),
        ({"height": 3, "width": 3, "steps": 0}, "attack steps must be an integer >= 1"),
        ({"height": 3, "width": 3, "stride": 0}, "stride must be an integer >= 1"),
        ({"height": 3, "width": 3, "candidates": 0}, "candidate positions must be an integer"),
        ({"height": 3, "width": 3, "fill": 2.0}, "fill must be a pixel value in [0, 1]"),
        ({"height": 3, "width": 3, "loss": "mse"}, "unknown attack loss 'mse'"),
        ({"height": 3, "width": 3, "step_size": -1.0}, "step size must be >= 0"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, message):
    with pytest.raises(JeatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ROA(**kwargs)


def test_bad_inputs_raise_clear_errors():
    model = _model()
    x, y = _batch(4)
    with pytest.raises(JeatError, match="9x3 occlusion rectangle does not fit in 8x8"):
        ROA(9, 3)(model, x, y)
    with pytest.raises(JeatError, match="does not fit"):
        ROA(2, 9, search="exhaustive").locate(model, x, y)
    with pytest.raises(JeatError, match=r"pixels in \[0, 1\]"):
        ROA(2, 2)(model, x * 255, y)
    with pytest.raises(JeatError, match="labels must lie in"):
        ROA(2, 2)(model, x, y + 10)
    with pytest.raises(JeatError, match="no rectangles yet"):
        Occlusion(2, 2).random_init(x, None)
    with pytest.raises(JeatError, match="top-left corner in rows"):
        Occlusion(2, 2).placed(torch.tensor([0, 0, 0, 7]), torch.zeros(4, dtype=int), x.shape)
    with pytest.raises(JeatError, match="one rectangle per image"):
        Occlusion(2, 2).placed(torch.tensor([0, 0]), torch.tensor([0, 0]), x.shape)
    with pytest.raises(JeatError, match="placed for 4 images"):
        Occlusion(2, 2).placed([0] * 4, [0] * 4, x.shape).step(x[:2], x[:2], 0.1)
    with pytest.raises(JeatError, match="rectangle size, not eps"):
        Occlusion(2, 2).with_eps(0.1)
