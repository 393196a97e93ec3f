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


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.6])
def test_linf_fused_update_is_step_then_projection(eps):
    # LinfBall.advance (in place: sign, add, one clamp to the precomputed box) must equal the
    # textbook step-then-project update, including pixels pushed past 0, 1 and the ball.
    threat = LinfBall(eps)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 5, 5, generator=g)
    x[:, :, 0] = 0.0
    x[:, :, 1] = 1.0
    x_adv = threat.random_init(x, g)
    grad = torch.randn(x.shape, generator=g)
    grad[:, 0, 2] = 0.0  # sign 0: the pixel stays
    textbook = threat.project(threat.step(x_adv, grad, 0.07), x)
    fused = threat.advance(x_adv.clone(), grad, 0.07, x, threat.bounds(x))
    assert torch.allclose(fused, textbook, atol=1e-7, rtol=0)
    assert fused.min() >= 0 and fused.max() <= 1
    assert (threat.distance(fused, x) <= eps + 1e-6).all()
    # without precomputed bounds it computes them, and the gradient is left as it was
    kept = grad.clone()
    assert torch.equal(threat.advance(x_adv.clone(), grad, 0.07, x), fused)
    assert torch.equal(grad, kept)


def test_l2_update_is_step_then_projection():
    threat = L2Ball(0.5)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(8, 1, 8, 8, generator=g)
    x_adv, grad = threat.random_init(x, g), torch.randn(x.shape, generator=g)
    expect = threat.project(threat.step(x_adv, grad, 0.3), x)
    assert torch.equal(threat.advance(x_adv, grad, 0.3, x, threat.bounds(x)), expect)


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
        parse_attack("deepfool")

    class NotLogits(nn.Module):
        def forward(self, x):
            return x.mean()

    with pytest.raises(JeatError, match="logits"):
        PGD(LinfBall(0.1))(NotLogits(), x, y)


def test_standard_model_is_broken_and_pgdat_resists(digits, standard_model, pgdat_model):
    """The headline property on digits at the dataset's default budget (L-inf 0.2): PGD-20
    leaves a standard model below 5%, PGD-AT at least 30 points more, with clean accuracy within
    10 points."""
    x, y = digits.x_test, digits.y_test
    assert digits.info.eps_linf == 0.2
    threat = LinfBall(digits.info.eps_linf)
    std = evaluate(standard_model, x, y, ["clean", "pgd20"], threat)
    rob = evaluate(pgdat_model, x, y, ["clean", "pgd20"], threat)
    print(f"\nstandard clean {std.rows[0].accuracy:.1f} pgd20 {std.rows[1].accuracy:.1f}")
    print(f"pgd-at   clean {rob.rows[0].accuracy:.1f} pgd20 {rob.rows[1].accuracy:.1f}")
    assert std.rows[1].accuracy < 5
    assert rob.rows[1].accuracy >= std.rows[1].accuracy + 30
    assert abs(rob.rows[0].accuracy - std.rows[0].accuracy) <= 10


def test_dlr_loss_is_scale_and_shift_invariant_and_targeted_forms_move_toward_the_target():
    from jeat.attacks import attack_loss

    logits = torch.randn(32, 10, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(1))
    t = (y + 1) % 10
    dlr = attack_loss("dlr")
    for target in (None, t):
        a, b = dlr(logits, y, target), dlr(3.0 * logits + 5.0, y, target)
        assert torch.allclose(a, b, atol=1e-5)
    # untargeted DLR is positive exactly when the input is misclassified
    wrong = logits.argmax(1) != y
    assert torch.equal(dlr(logits, y, None) > 0, wrong)
    with pytest.raises(JeatError, match="at least 4 classes"):
        dlr(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long))
    # the targeted attack raises the target's logit relative to the others for every loss
    model = _model()
    x, y = _batch(32)
    tgt = (y + 3) % 10
    for loss in ("ce", "cw", "dlr"):
        x_t = PGD(LinfBall(0.3), steps=10, loss=loss)(model, x, y, target=tgt)
        with torch.no_grad():
            before = model(x).gather(1, tgt[:, None]) - model(x).logsumexp(1, keepdim=True)
            after = model(x_t).gather(1, tgt[:, None]) - model(x_t).logsumexp(1, keepdim=True)
        assert after.mean() > before.mean(), loss


def test_multi_targeted_breaks_at_least_what_its_first_target_breaks(digits, standard_model):
    from jeat.attacks import MultiTargeted

    x, y = digits.x_test[:100], digits.y_test[:100]
    pgd = PGD(LinfBall(0.1), steps=10)
    gen = torch.Generator().manual_seed(0)
    one = MultiTargeted(pgd, 1)(standard_model, x, y, generator=gen)
    gen = torch.Generator().manual_seed(0)
    many = MultiTargeted(pgd, 9)(standard_model, x, y, generator=gen)
    with torch.no_grad():
        ok_one = (standard_model(one).argmax(1) == y).sum()
        ok_many = (standard_model(many).argmax(1) == y).sum()
    assert ok_many <= ok_one
    assert (many - x).abs().max() <= 0.1 + 1e-6
