"""Test-time defences as model wrappers (jeat.defences): their forward passes, their input
gradients with and without BPDA, the spec language and ``--defence`` on the command line."""

import json

import pytest
import torch
from conftest import cli_fails, jeat_cli
from torch import nn

from jeat import JeatError
from jeat.attacks import LinfBall
from jeat.defences import (
    GaussianNoise,
    GradientZero,
    MedianFilter,
    Purify,
    Quantize,
    SoftmaxOutput,
    ZeroGrad,
    describe,
    median_filter,
    parse_defences,
    wrap,
)
from jeat.energy import cross_entropy_from_logits, marginal_energy_from_logits
from jeat.evaluate import evaluate
from jeat.models import KWTA, bpda, create_model, has_unrollable, unrolled


@pytest.fixture
def net():
    torch.manual_seed(0)
    return create_model("small_cnn", in_channels=1, num_classes=10, width=8).eval()


def _input_grad(model, x, y, loss=cross_entropy_from_logits):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(model(x), y).sum(), x)
    return grad


# --------------------------------------------------------------------------- forward passes


def test_noise_is_fresh_at_every_call_with_the_asked_std():
    torch.manual_seed(0)
    noisy = GaussianNoise(nn.Identity(), sigma=0.1)
    x = torch.full((64, 1, 8, 8), 0.5)  # mid-grey: the clamp to [0, 1] is 5 sigma away
    a, b = noisy(x), noisy(x)
    assert not torch.equal(a, b)
    assert (a - x).std().item() == pytest.approx(0.1, rel=0.05)
    assert (a - x).mean().abs() < 0.005
    edge = noisy(torch.ones(8, 1, 8, 8))  # near the box edge the output is clamped
    assert edge.max() <= 1 and edge.min() >= 0
    torch.manual_seed(3)
    first = noisy(x)
    torch.manual_seed(3)
    assert torch.equal(first, noisy(x))  # the global RNG: seeding repeats the draw


def test_purification_lowers_the_marginal_energy(digits, standard_model):
    x = digits.x_test[:64]
    pure = Purify(standard_model, steps=10)
    torch.manual_seed(0)
    x_pure = pure.preprocess(x)
    assert x_pure.shape == x.shape and x_pure.min() >= 0 and x_pure.max() <= 1
    assert not torch.equal(x_pure, x)
    with torch.no_grad():
        before = marginal_energy_from_logits(standard_model(x))
        after = marginal_energy_from_logits(standard_model(x_pure))
    assert after.mean() < before.mean() - 1.0
    assert (after < before).float().mean() > 0.9
    torch.manual_seed(0)
    again = pure.preprocess(x)
    assert torch.equal(again, x_pure)  # seeded: the same chain
    assert not torch.equal(pure.preprocess(x), x_pure)  # unseeded: a fresh chain
    with torch.no_grad():
        torch.manual_seed(0)
        logits = pure(x)
    assert torch.allclose(logits, standard_model(x_pure).detach(), atol=1e-5)


def test_quantisation_gives_exactly_levels_values():
    x = torch.linspace(0, 1, 1000).view(10, 1, 10, 10)
    for levels in (2, 4, 7):
        q = Quantize(nn.Identity(), levels=levels)(x)
        values = torch.unique(q)
        assert len(values) == levels
        assert torch.allclose(values, torch.arange(levels) / (levels - 1))
        assert (q - x).abs().max() <= 0.5 / (levels - 1) + 1e-6


def test_median_filter_matches_a_hand_computed_median():
    x = torch.arange(1, 10, dtype=torch.float32).view(1, 1, 3, 3) / 10
    # 3x3 windows with the border replicated, e.g. the corner (0, 0) sees 1,1,2,1,1,2,4,4,5
    expected = torch.tensor([[2.0, 3, 3], [4, 5, 6], [7, 7, 8]]).view(1, 1, 3, 3) / 10
    assert torch.allclose(median_filter(x, 3), expected)
    assert torch.allclose(MedianFilter(nn.Identity(), 3)(x), expected)
    spike = torch.zeros(2, 3, 6, 6)
    spike[1, 2, 3, 3] = 1.0  # an isolated pixel disappears, per channel and example
    assert torch.equal(median_filter(spike, 3), torch.zeros_like(spike))
    assert torch.equal(median_filter(x, 1), x)


def test_softmax_output_returns_probabilities(net):
    x = torch.rand(4, 1, 8, 8)
    p = SoftmaxOutput(net)(x)
    assert torch.allclose(p.sum(1), torch.ones(4)) and (p >= 0).all()
    assert torch.allclose(p, torch.softmax(net(x), 1))


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "make",
    [
        lambda m: Quantize(m, levels=4),
        lambda m: MedianFilter(m, size=3),
        lambda m: Purify(m, steps=2),
        lambda m: GradientZero(m),
    ],
    ids=["quantize", "median", "purify", "zero-grad"],
)
def test_hidden_gradients_are_zero_without_bpda_and_the_inner_gradient_with_it(net, make):
    defended = make(net)
    x = torch.rand(6, 1, 8, 8)
    y = torch.arange(6)
    # without BPDA: an exactly zero input gradient, and backward() does not fail
    assert torch.equal(_input_grad(defended, x, y), torch.zeros_like(x))
    xg = x.clone().requires_grad_(True)
    cross_entropy_from_logits(defended(xg), y).sum().backward()
    assert torch.equal(xg.grad, torch.zeros_like(x))
    # under BPDA: the inner model's gradient at the preprocessed point, forward unchanged
    with torch.no_grad():
        torch.manual_seed(1)
        plain = defended(x)
    with bpda(defended):
        torch.manual_seed(1)
        grad = _input_grad(defended, x, y)
        torch.manual_seed(1)
        with torch.no_grad():
            assert torch.allclose(defended(x), plain, atol=1e-6)
    torch.manual_seed(1)
    pre = defended.preprocess(x) if hasattr(defended, "preprocess") else x
    assert torch.allclose(grad, _input_grad(net, pre, y), atol=1e-6)
    assert grad.abs().sum() > 0
    flags = [m.bpda for m in defended.modules() if getattr(m, "bpda_capable", False)]
    assert flags and not any(flags)  # restored after the block


def test_softmax_bpda_passes_the_loss_gradient_to_the_logits(net):
    x, y = torch.rand(5, 1, 8, 8), torch.arange(5)
    defended = SoftmaxOutput(net)
    with bpda(defended):
        grad = _input_grad(defended, x, y)
    xg = x.clone().requires_grad_(True)
    logits = net(xg)
    probs = torch.softmax(logits, 1).detach().requires_grad_(True)
    (upstream,) = torch.autograd.grad(cross_entropy_from_logits(probs, y).sum(), probs)
    (expected,) = torch.autograd.grad(logits, xg, grad_outputs=upstream)
    assert torch.allclose(grad, expected, atol=1e-6)
    without = _input_grad(defended, x, y)
    assert not torch.allclose(without, expected)  # the softmax's own Jacobian without BPDA


def test_noise_and_the_unrolled_purifier_are_differentiable(net):
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    torch.manual_seed(0)
    g_noise = _input_grad(GaussianNoise(net, sigma=0.05), x, y)
    assert g_noise.abs().sum() > 0
    unrolled = Purify(net, steps=3, differentiable=True)
    torch.manual_seed(0)
    g_unrolled = _input_grad(unrolled, x, y)
    assert torch.isfinite(g_unrolled).all() and g_unrolled.abs().sum() > 0
    with bpda(unrolled):  # the unrolled chain is the true gradient: it wins over BPDA
        torch.manual_seed(0)
        assert torch.allclose(_input_grad(unrolled, x, y), g_unrolled)
    detached = Purify(net, steps=3)
    with bpda(detached):  # BPDA: the identity backward through the detached chain
        torch.manual_seed(0)
        g_bpda = _input_grad(detached, x, y)
    torch.manual_seed(0)
    assert torch.allclose(g_bpda, _input_grad(net, detached.preprocess(x), y), atol=1e-6)
    assert not torch.allclose(g_bpda, g_unrolled, atol=1e-6)


def test_unrolled_switches_every_purifier_for_the_block_only(net):
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    stack = wrap(net, "purify:steps=2,noise:sigma=0.05,purify:steps=3")
    purifiers = [m for m in stack.modules() if isinstance(m, Purify)]
    assert len(purifiers) == 2 and has_unrollable(stack) and not has_unrollable(net)
    torch.manual_seed(0)
    assert _input_grad(stack, x, y).abs().sum() == 0  # detached chains: zero gradient
    with unrolled(stack):
        assert all(p.differentiable for p in purifiers)
        torch.manual_seed(0)
        g = _input_grad(stack, x, y)
    assert not any(p.differentiable for p in purifiers)
    # the same gradient as the stack built with unrolled chains, on the same random draws
    torch.manual_seed(0)
    expected = _input_grad(
        wrap(net, "purify:steps=2:differentiable=1,noise:sigma=0.05,"
             "purify:steps=3:differentiable=1"), x, y
    )  # fmt: skip
    assert g.abs().sum() > 0 and torch.allclose(g, expected)


def test_bpda_switches_every_wrapper_of_a_stack_and_kwta_layers():
    kwta_net = create_model("small_cnn", in_channels=1, num_classes=10, width=8, activation="kwta")
    stack = wrap(kwta_net, "zero-grad,median,quantize:levels=3")
    capable = [m for m in stack.modules() if getattr(m, "bpda_capable", False)]
    assert {type(m) for m in capable} == {ZeroGrad, MedianFilter, Quantize, KWTA}
    with bpda(stack):
        assert all(m.bpda for m in capable)
    assert not any(m.bpda for m in capable)


def test_bpda_attack_breaks_quantisation_that_plain_pgd_cannot(digits, standard_model):
    x, y = digits.x_test[:100], digits.y_test[:100]
    defended = Quantize(standard_model, levels=4)
    table = evaluate(defended, x, y, "clean,pgd20,pgd20:bpda=1", LinfBall(0.2), mode="independent")
    acc = {r.attack: r.accuracy for r in table.rows}
    assert acc["clean"] > 90
    assert acc["pgd20"] > 80  # zero gradients: PGD stalls at its random start
    assert acc["pgd20:bpda=1"] < 20  # the identity backward finds the plain CNN underneath


# --------------------------------------------------------------------------- spec language


def test_specs_build_the_wrappers_innermost_first(net):
    stack = wrap(net, ["median:size=3,noise:sigma=0.05", "purify:steps=2:step_size=0.1"])
    assert isinstance(stack, Purify) and stack.steps == 2 and stack.step_size == 0.1
    assert isinstance(stack.model, GaussianNoise) and stack.model.sigma == 0.05
    assert isinstance(stack.model.model, MedianFilter) and stack.model.model.model is net
    assert describe(stack) == [
        "median:size=3",
        "noise:sigma=0.05",
        "purify:steps=2:step_size=0.1:noise=0.005:differentiable=0",
    ]
    assert describe(wrap(net, describe(stack))) == describe(stack)  # the spec round-trips
    assert describe(wrap(net, "softmax,zero-grad,quantize")) == [
        "softmax",
        "zero-grad",
        "quantize:levels=4",
    ]
    assert wrap(net, None) is net and not stack.training
    assert describe(net) == []
    fine = wrap(net, "purify:step_size=1/255")  # values round-trip exactly
    assert wrap(net, describe(fine)).step_size == fine.step_size == 1 / 255
    net.train()
    net[0].eval()  # a mixed-mode model keeps its modes; the wrapper takes the model's own
    noisy = wrap(net, "zero-grad")
    assert noisy.training and noisy.zero.training and not net[0].training


@pytest.mark.parametrize(
    "spec, message",
    [
        ("blur:size=3", "unknown defence 'blur'"),
        ("quantize:bits=4", "defence 'quantize' has no option 'bits'; it takes levels"),
        ("quantize:levels", "is not KEY=VALUE"),
        ("quantize:levels=1", "quantize: levels must be an integer >= 2"),
        ("quantize:levels=2.5", "quantize: levels must be an integer"),
        ("noise:sigma=-0.1", "noise: sigma must be >= 0"),
        ("noise:sigma=abc", "noise: sigma must be a number"),
        ("median:size=2", "median: size must be odd"),
        ("purify:steps=0", "purify: steps must be an integer >= 1"),
        ("purify:differentiable=2", "purify: differentiable must be 0 or 1"),
        ("softmax:t=2", "defence 'softmax' has no option 't'; it takes none"),
        (" , ", "empty defence"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(JeatError, match=message.replace("(", r"\(")) as info:
        parse_defences(spec)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- command line


def test_cli_defence_wraps_the_model_and_says_so(tmp_path, standard_run):
    own = standard_run / "eval.json"  # the run's own table (the report's) is never replaced
    before = own.stat().st_mtime_ns if own.exists() else None
    r = jeat_cli("eval", standard_run, "--attacks", "clean,pgd20,pgd20:bpda=1", "--n", "40",
                 "--mode", "independent", "--defence", "quantize:levels=4", "--quiet",
                 cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = standard_run / "eval-quantize-levels4.json"
    assert f"wrote {out}" in r.stdout
    assert (own.stat().st_mtime_ns if own.exists() else None) == before
    assert "test-time defences (innermost first): quantize:levels=4" in r.stdout
    table = json.loads(out.read_text())
    assert table["defences"] == ["quantize:levels=4"]
    acc = {row["attack"]: row["accuracy"] for row in table["attacks"]}
    assert acc["pgd20"] > 75 and acc["pgd20:bpda=1"] < 25
    assert "quantize:levels=4" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("command", ["eval", "attack"])
def test_cli_bad_defence_exits_2(tmp_path, standard_run, command):
    cli_fails([command, standard_run, "--defence", "quantize:levels=1", "--n", "4"], tmp_path,
              "quantize: levels must be an integer >= 2")  # fmt: skip
