"""Transfer attacks and the Skip Gradient Method (SGM, Wu et al. ICLR 2020)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAST
from torch import Tensor, nn

from jeat import JeatError
from jeat.attacks.pgd import PGD
from jeat.attacks.threats import LinfBall
from jeat.attacks.transfer import SGM, Transfer, residual_branches, skip_gradient
from jeat.config import load_config
from jeat.finish import train_and_finish
from jeat.models import PreActBlock, create_model

EPS = 0.2  # the digits default budget


# ---------------------------------------------------------------- the gradient surgery itself


def _input_grad(model: nn.Module, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Output and gradient of ``<w, model(x)>`` with respect to ``x``."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    return out.detach(), grad


def _block_paths(block: PreActBlock, head: nn.Module, x: Tensor, w: Tensor) -> tuple[Tensor, ...]:
    """Input gradients through the skip path alone and the residual path alone, computed by
    re-running the block by hand with the other path detached (same forward values)."""
    grads = []
    for keep in ("skip", "residual"):
        xr = x.clone().requires_grad_(True)
        out = block.act1(block.bn1(xr))
        skip = block.shortcut(out) if block.shortcut is not None else xr
        res = block.conv2(block.act2(block.bn2(block.conv1(out))))
        # the shortcut conv shares act1(bn1(x)) with the branch; only the sum's inputs differ
        z = (skip + res.detach()) if keep == "skip" else (skip.detach() + res)
        (g,) = torch.autograd.grad((head(z) * w).sum(), xr)
        grads.append(g)
    return tuple(grads)


@pytest.mark.parametrize("cin,cout,stride", [(3, 3, 1), (2, 4, 2)])
@pytest.mark.parametrize("gamma", [0.2, 0.5])
def test_skip_gradient_is_skip_path_plus_gamma_residual_path(cin, cout, stride, gamma):
    torch.manual_seed(0)
    block = PreActBlock(cin, cout, stride, norm="none", activation="elu").double()
    side = 6 // stride
    head = nn.Sequential(nn.Flatten(), nn.Linear(cout * side * side, 5)).double()
    model = nn.Sequential(block, head)
    x = torch.rand(4, cin, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 5, dtype=torch.float64)

    out_plain, g_plain = _input_grad(model, x, w)
    with skip_gradient(model, gamma) as hooked:
        out_sgm, g_sgm = _input_grad(model, x, w)
    assert hooked == [block.conv2]
    g_skip, g_res = _block_paths(block, head, x, w)

    assert torch.equal(out_sgm, out_plain)  # forward bit-identical
    torch.testing.assert_close(g_plain, g_skip + g_res)  # the decomposition is right ...
    torch.testing.assert_close(g_sgm, g_skip + gamma * g_res)  # ... and SGM reweights it
    assert (g_sgm - g_plain).abs().max() > 1e-3 * g_plain.abs().max()


def _detach_trick_grad(model: nn.Module, gamma: float, x: Tensor, w: Tensor) -> Tensor:
    """Reference SGM gradient built independently: every PreActBlock's residual output r is
    replaced by ``gamma * r + (1 - gamma) * r.detach()`` (same value, gradient times gamma)."""

    def forward(block: PreActBlock, z: Tensor) -> Tensor:
        out = block.act1(block.bn1(z))
        skip = block.shortcut(out) if block.shortcut is not None else z
        res = block.conv2(block.act2(block.bn2(block.conv1(out))))
        return gamma * res + (1 - gamma) * res.detach() + skip

    blocks = [m for m in model.modules() if isinstance(m, PreActBlock)]
    for b in blocks:
        b.forward = forward.__get__(b)  # instance attribute shadows the class method
    try:
        return _input_grad(model, x, w)[1]
    finally:
        for b in blocks:
            del b.forward


def test_skip_gradient_on_a_resnet18_matches_an_independent_construction():
    torch.manual_seed(1)
    model = create_model("preact_resnet18", in_channels=1, num_classes=10, width=4).double()
    model.eval()  # batch norm in eval mode, as attacks run it
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    w = torch.randn(3, 10, dtype=torch.float64)
    assert len(residual_branches(model)) == 8

    out_plain, g_plain = _input_grad(model, x, w)
    with skip_gradient(model, 1.0):
        out_one, g_one = _input_grad(model, x, w)
    assert torch.equal(out_one, out_plain) and torch.equal(g_one, g_plain)

    for gamma in (0.5, 0.2):
        with skip_gradient(model, gamma):
            out_sgm, g_sgm = _input_grad(model, x, w)
        assert torch.equal(out_sgm, out_plain)
        reference = _detach_trick_grad(model, gamma, x, w)
        torch.testing.assert_close(g_sgm, reference, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(g_sgm, g_plain, rtol=1e-3, atol=0)


def test_hooks_are_removed_on_exit_and_on_exceptions():
    torch.manual_seed(2)
    model = create_model("preact_resnet18", in_channels=1, num_classes=10, width=4).eval()
    x = torch.rand(2, 1, 8, 8)
    w = torch.randn(2, 10)
    _, g_plain = _input_grad(model, x, w)

    def no_hooks() -> bool:
        return all(not m._forward_hooks for m in model.modules())

    with skip_gradient(model, 0.3):
        assert not no_hooks()
        _, g_in = _input_grad(model, x, w)
    assert no_hooks() and not torch.allclose(g_in, g_plain)
    torch.testing.assert_close(_input_grad(model, x, w)[1], g_plain, rtol=0, atol=0)

    with pytest.raises(RuntimeError, match="boom"), skip_gradient(model, 0.3):
        _input_grad(model, x, w)
        raise RuntimeError("boom")
    assert no_hooks()
    torch.testing.assert_close(_input_grad(model, x, w)[1], g_plain, rtol=0, atol=0)


class _InPlaceBlock(nn.Module):
    """A torchvision-style basic block: ``out = bn2(conv2(...)); out += x`` (in place)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(torch.tanh(self.conv1(x))))
        out += x
        return torch.tanh(out)


def test_user_branches_work_on_a_foreign_resnet_with_in_place_addition():
    torch.manual_seed(3)
    block = _InPlaceBlock(2).double().eval()
    model = nn.Sequential(block, nn.Flatten(), nn.Linear(2 * 5 * 5, 4)).double()
    x = torch.rand(3, 2, 5, 5, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    no_default = pytest.raises(JeatError, match="ResNet-like source model with residual blocks")
    with no_default, skip_gradient(model, 0.5):
        pass
    out_plain, g_plain = _input_grad(model, x, w)
    with skip_gradient(model, 0.25, branches=[block.bn2]):
        out_sgm, g_sgm = _input_grad(model, x, w)
    assert torch.equal(out_sgm, out_plain)

    # reference: the residual branch's value with its gradient scaled by the detach trick
    xr = x.clone().requires_grad_(True)
    res = block.bn2(block.conv2(torch.tanh(block.conv1(xr))))
    z = torch.tanh(0.25 * res + 0.75 * res.detach() + xr)
    (g_ref,) = torch.autograd.grad((model[2](model[1](z)) * w).sum(), xr)
    torch.testing.assert_close(g_sgm, g_ref)
    assert not torch.allclose(g_sgm, g_plain)


# ------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("gamma", [0, 0.0, -0.5, 1.5, math.nan, math.inf, True, "0.5"])
def test_gamma_outside_zero_one_is_refused(gamma):
    model = create_model("preact_resnet18", in_channels=1, num_classes=10, width=4)
    with pytest.raises(JeatError, match="gamma"), skip_gradient(model, gamma):
        pass
    with pytest.raises(JeatError, match="gamma"):
        SGM(model, LinfBall(EPS), gamma=gamma)
    with pytest.raises(JeatError, match="gamma"):
        Transfer(model, PGD(LinfBall(EPS)), gamma=gamma)


def test_sources_without_residual_blocks_and_foreign_branches_are_refused():
    cnn = create_model("small_cnn", in_channels=1, num_classes=10, width=4)
    resnet = create_model("preact_resnet18", in_channels=1, num_classes=10, width=4)
    with pytest.raises(JeatError, match="ResNet-like source model with residual blocks"):
        SGM(cnn, LinfBall(EPS), gamma=0.5)
    Transfer(cnn, PGD(LinfBall(EPS)))  # a plain transfer from any architecture is fine
    foreign = [resnet[1].body[0].conv2]
    with pytest.raises(JeatError, match="not a submodule"), skip_gradient(cnn, 0.5, foreign):
        pass
    with pytest.raises(JeatError, match="ResNet-like"), skip_gradient(resnet, 0.5, branches=[]):
        pass


def test_source_and_target_must_agree_on_classes_and_device(digits):
    x, y = digits.x_test[:8], digits.y_test[:8]
    source = create_model("preact_resnet18", in_channels=1, num_classes=10, width=4)
    five = create_model("small_cnn", in_channels=1, num_classes=5, width=4)
    attack = SGM(source, LinfBall(EPS), steps=1)
    with pytest.raises(JeatError, match="10 logits but the target 5"):
        attack(five, x, y)
    ten = create_model("small_cnn", in_channels=1, num_classes=10, width=4)
    with pytest.raises(JeatError, match="source model is on meta"):
        SGM(create_model("preact_resnet18", in_channels=1, num_classes=10, width=4).to("meta"),
            LinfBall(EPS))(ten, x, y)  # fmt: skip
    with pytest.raises(JeatError, match="target model is on meta"):
        attack(ten.to("meta"), x, y)
    with pytest.raises(JeatError, match=r"\[0, 1\]"):
        attack(ten, x * 2, y)


def test_transfer_leaves_both_models_as_found(digits):
    torch.manual_seed(4)
    x, y = digits.x_test[:16], digits.y_test[:16]
    source = create_model("preact_resnet18", in_channels=1, num_classes=10, width=4)  # has BN
    target = create_model("preact_resnet18", in_channels=1, num_classes=10, width=4)
    source.train()
    target.train()
    target[1].fc.eval()  # a mixed mode to restore
    modes = [[m.training for m in net.modules()] for net in (source, target)]
    states = [{k: v.clone() for k, v in net.state_dict().items()} for net in (source, target)]
    x_adv = SGM(source, LinfBall(EPS), gamma=0.5, steps=3)(target, x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    for net, mode, state in zip((source, target), modes, states, strict=True):
        assert [m.training for m in net.modules()] == mode
        assert all(p.grad is None for p in net.parameters())
        for k, v in net.state_dict().items():  # batch-norm running stats untouched too
            assert torch.equal(v, state[k]), k
        assert all(not m._forward_hooks for m in net.modules())


# ------------------------------------------------------------ transfer on the digits models


@pytest.fixture(scope="module")
def source_model(tmp_path_factory, digits):
    cfg = load_config("digits-source", FAST)
    return train_and_finish(
        cfg, tmp_path_factory.mktemp("runs") / "source", data=digits
    ).model.eval()


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return 100 * (model(x).argmax(1) == y).float().mean().item()


def test_transfer_attack_hurts_a_standard_target_less_than_white_box(
    digits, source_model, standard_model, pgdat_model
):
    x, y = digits.x_test, digits.y_test
    threat = LinfBall(EPS)
    clean = _accuracy(standard_model, x, y)
    white = PGD(threat, steps=20)(standard_model, x, y, generator=torch.Generator().manual_seed(0))
    plain = SGM(source_model, threat, gamma=1.0)
    x_adv = plain(standard_model, x, y)
    source_acc = _accuracy(source_model, x_adv, y)
    acc_white, acc_transfer = (
        _accuracy(standard_model, white, y),
        _accuracy(standard_model, x_adv, y),
    )
    print(
        f"\nstandard target: clean {clean:.1f}, white-box PGD-20 {acc_white:.1f}, "
        f"transfer {acc_transfer:.1f} (source on its own examples {source_acc:.1f})"
    )
    assert threat.distance(x_adv, x).max() <= EPS + 1e-6
    assert source_acc < 10  # crafted on the source: a white-box attack there
    assert acc_transfer < clean - 15  # the examples transfer (measured: ~99 -> ~65)
    assert acc_transfer >= acc_white - 2  # but white-box is at least as strong (~14)
    # the target is only checked, never differentiated: another target, the same examples
    assert torch.equal(plain(pgdat_model, x, y), x_adv)


def test_sgm_gammas_on_standard_and_robust_targets(
    digits, source_model, standard_model, pgdat_model
):
    x, y = digits.x_test, digits.y_test
    threat = LinfBall(EPS)
    table: dict[str, dict[str, float]] = {}
    crafted = {g: SGM(source_model, threat, gamma=g)(standard_model, x, y) for g in (1, 0.5, 0.2)}
    for name, target in [("standard", standard_model), ("pgd-at", pgdat_model)]:
        gen = torch.Generator().manual_seed(0)
        row = {
            "clean": _accuracy(target, x, y),
            "pgd20": _accuracy(target, PGD(threat, steps=20)(target, x, y, generator=gen), y),
        }
        for g, x_adv in crafted.items():
            row[f"sgm{g}"] = _accuracy(target, x_adv, y)
        table[name] = row
        print(f"\n{name:8s} " + "  ".join(f"{k} {v:5.1f}" for k, v in row.items()))
    for g, x_adv in crafted.items():
        print(f"source on its own gamma={g} examples: {_accuracy(source_model, x_adv, y):.1f}")

    for g in (0.5, 0.2):
        assert not torch.equal(crafted[g], crafted[1])  # gamma changes the examples
        assert _accuracy(source_model, crafted[g], y) < 25  # still an ascent direction
    std, rob = table["standard"], table["pgd-at"]
    for key in ("sgm1", "sgm0.5", "sgm0.2"):
        assert std[key] < std["clean"] - 10  # every gamma still transfers to the standard CNN
        assert std[key] >= std["pgd20"] - 2 and rob[key] >= rob["pgd20"] - 2
        assert rob[key] > std[key] + 5  # adversarial training resists transferred examples
