import pytest
import torch
from torch import nn

from jeat import JeatError
from jeat.attacks import FGSM, PGD, L2Ball, LinfBall, make_threat
from jeat.evaluate import evaluate, parse_attack
from jeat.models import create_model


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("small_cnn", in_channels=1, num_classes=10, width=8)


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("threat", [LinfBall(0.1), L2Ball(0.7)])
def test_pgd_stays_in_the_ball_and_the_box(threat):
    model = _model()
    x, y = _batch()
    x_adv = PGD(threat, steps=7, restarts=2)(model, x, y)
    assert x_adv.shape == x.shape
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (threat.distance(x_adv, x) <= threat.eps + 1e-5).all()


def test_pgd_raises_the_loss_and_targeted_lowers_target_energy_gap():
    from jeat.energy import cross_entropy_from_logits

    model = _model()
    x, y = _batch(32)
    x_adv = PGD(LinfBall(0.2), steps=10)(model, x, y)
    with torch.no_grad():
        assert (
            cross_entropy_from_logits(model(x_adv), y).mean()
            > cross_entropy_from_logits(model(x), y).mean()
        )
        t = (y + 1) % 10
        x_t = PGD(LinfBall(0.2), steps=10)(model, x, y, target=t)
        assert (
            cross_entropy_from_logits(model(x_t), t).mean()
            < cross_entropy_from_logits(model(x), t).mean()
        )


def test_fgsm_is_one_full_step_of_pgd():
    model = _model()
    x, y = _batch()
    a = FGSM(LinfBall(0.05))(model, x, y)
    b = PGD(LinfBall(0.05), steps=1, step_size=0.05, random_start=False)(model, x, y)
    assert torch.equal(a, b)
    # every unclamped pixel moved by exactly eps
    moved = (a - x).abs()
    inside = (a > 0) & (a < 1)
    assert torch.allclose(moved[inside], torch.full_like(moved[inside], 0.05), atol=1e-6)


def test_attack_leaves_model_mode_and_parameter_grads_as_found():
    model = create_model("small_cnn", in_channels=1, num_classes=10, width=8, norm="batch")
    x, y = _batch()
    model.train()
    model[1].features[1].eval()  # a mixed-mode model
    modes = [m.training for m in model.modules()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    running = model[1].features[4].running_mean.clone()
    PGD(LinfBall(0.1), steps=3)(model, x, y)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.all(p.grad == 7.0) for p in model.parameters())
    # eval mode during the attack: batch-norm statistics untouched
    assert torch.equal(model[1].features[4].running_mean, running)


def test_generator_makes_attacks_repeatable_without_touching_global_rng():
    model = _model()
    x, y = _batch()
    attack = PGD(LinfBall(0.1), steps=3)
    state = torch.get_rng_state()
    a = attack(model, x, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    b = attack(model, x, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_bad_attack_inputs_fail_clearly():
    model = _model()
    x, y = _batch()
    with pytest.raises(JeatError, match="eps must be"):
        LinfBall(-0.1)
    with pytest.raises(JeatError, match="steps must be an integer >= 1"):
        PGD(LinfBall(0.1), steps=0)
    with pytest.raises(JeatError, match=r"pixels in \[0, 1\]"):
        PGD(LinfBall(0.1))(model, x * 255, y)
    with pytest.raises(JeatError, match="N x C x H x W"):
        PGD(LinfBall(0.1))(model, x[0], y)
    with pytest.raises(JeatError, match=r"labels must lie in \[0, 9\]"):
        PGD(LinfBall(0.1))(model, x, y + 10)
    with pytest.raises(JeatError, match="unknown threat model"):
        make_threat("l7", 0.1)
    with pytest.raises(JeatError, match="unknown attack"):
        parse_attack("deepfool", LinfBall(0.1))

    class NotLogits(nn.Module):
        def forward(self, x):
            return x.mean()

    with pytest.raises(JeatError, match="logits"):
        PGD(LinfBall(0.1))(NotLogits(), x, y)


def test_standard_model_is_broken_and_pgdat_resists(digits, standard_model, pgdat_model):
    """The headline property on digits: PGD-AT is at least 30 points more robust under PGD-20
    (L-inf, the dataset's eps 0.15) than a standard model, with clean accuracy within 10 points.
    """
    x, y = digits.x_test, digits.y_test
    assert digits.info.eps_linf == 0.15
    threat = LinfBall(digits.info.eps_linf)
    std = evaluate(standard_model, x, y, ["clean", "pgd20"], threat)
    rob = evaluate(pgdat_model, x, y, ["clean", "pgd20"], threat)
    print(f"\nstandard clean {std.rows[0].accuracy:.1f} pgd20 {std.rows[1].accuracy:.1f}")
    print(f"pgd-at   clean {rob.rows[0].accuracy:.1f} pgd20 {rob.rows[1].accuracy:.1f}")
    assert rob.rows[1].accuracy >= std.rows[1].accuracy + 30
    assert abs(rob.rows[0].accuracy - std.rows[0].accuracy) <= 10


def test_pgd_agrees_with_torchattacks(digits, pgdat_model):
    """Our PGD-20 robust accuracy is within 2 points of torchattacks.PGD on the same points."""
    torchattacks = pytest.importorskip("torchattacks", reason="torchattacks is a dev dependency")
    x, y = digits.x_test, digits.y_test
    eps = digits.info.eps_linf
    ours = evaluate(pgdat_model, x, y, ["pgd20"], LinfBall(eps)).rows[0].accuracy
    torch.manual_seed(0)
    ref_attack = torchattacks.PGD(pgdat_model, eps=eps, alpha=eps / 4, steps=20, random_start=True)
    x_ref = ref_attack(x, y)
    with torch.no_grad():
        ref = 100.0 * float((pgdat_model(x_ref).argmax(1) == y).float().mean())
    print(f"\nPGD-20 accuracy: jeat {ours:.2f}%, torchattacks {ref:.2f}%")
    assert abs(ours - ref) <= 2.0
    # and the CW-margin variant agrees with torchattacks' CW-loss PGD in spirit: below clean
    cw = evaluate(pgdat_model, x, y, ["clean", "cw30"], LinfBall(eps))
    assert cw.rows[1].accuracy < cw.rows[0].accuracy
