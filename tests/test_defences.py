"""Defences from the same literature, trained with the shared loop: TRADES; k-WTA and the
adaptive (BPDA) attacks that expose it."""

import pytest
import torch
from conftest import train_digits
from torch.nn import functional as F

from jeat import JeatError
from jeat.attacks import LinfBall
from jeat.config import load_config
from jeat.data import dataset_info, load_dataset
from jeat.evaluate import evaluate
from jeat.models import create_model
from jeat.objectives import create_objective, kl_divergence_from_logits


def test_kl_matches_torch_and_is_zero_only_for_equal_predictions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    kl = kl_divergence_from_logits(a, b)
    ref = F.kl_div(F.log_softmax(b, 1), F.log_softmax(a, 1), log_target=True, reduction="none")
    assert torch.allclose(kl, ref.sum(1), atol=1e-6)
    assert (kl > 0).all()
    assert torch.allclose(kl_divergence_from_logits(a, a + 3.0), torch.zeros(16), atol=1e-6)


def test_trades_inner_maximisation_stays_in_the_ball_and_raises_the_kl():
    cfg = load_config("digits-trades", ["objective.attack.steps=5"])
    info = load_dataset("digits").info
    obj = create_objective(cfg.objective, info)
    torch.manual_seed(0)
    model = create_model("small_cnn", in_channels=1, num_classes=10, width=8)
    x = torch.rand(32, 1, 8, 8)
    y = torch.randint(0, 10, (32,))
    x_adv = obj.adversarial(model, x)
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        near = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        kl_adv = kl_divergence_from_logits(model(x), model(x_adv)).mean()
        kl_near = kl_divergence_from_logits(model(x), model(near)).mean()
    assert kl_adv > 10 * kl_near
    out = obj(model, x, y)
    assert set(out.metrics) >= {"ce", "kl"}
    assert out.loss.item() == pytest.approx(
        (out.metrics["ce"] + 6.0 * out.metrics["kl"]).item(), rel=1e-5
    )
    cfg.objective.options["beta"] = -1
    with pytest.raises(JeatError, match="beta must be a number >= 0"):
        create_objective(cfg.objective, info)


def test_trades_is_far_more_robust_than_standard(tmp_path, digits, standard_model):
    trades = train_digits(tmp_path, "trades")
    x, y = digits.x_test, digits.y_test
    threat = LinfBall(digits.info.eps_linf)
    attacks = ["clean", "pgd20", "cw"]
    std = evaluate(standard_model, x, y, attacks, threat, mode="independent")
    rob = evaluate(trades, x, y, attacks, threat, mode="independent")
    acc = {n: [r.accuracy for r in t.rows] for n, t in (("standard", std), ("trades", rob))}
    print("\nclean / PGD-20 / CW-30:", acc)
    assert acc["trades"][1] >= acc["standard"][1] + 30
    assert acc["trades"][2] >= acc["standard"][2] + 20
    assert acc["trades"][0] >= acc["standard"][0] - 10


def test_kwta_keeps_the_k_largest_and_bpda_only_changes_the_backward_pass():
    from jeat.models import KWTA, bpda

    layer = KWTA(0.25)
    x = torch.randn(4, 2, 4, 4, requires_grad=True)  # 32 units, k = 8
    out = layer(x)
    assert ((out != 0).flatten(1).sum(1) == 8).all()
    kept = out.flatten(1).abs().min(1).values
    dropped = torch.where(out.flatten(1) == 0, x.flatten(1), torch.full_like(kept[:, None], -9))
    assert (dropped.max(1).values <= x.flatten(1).topk(8, 1).values[:, -1]).all()
    model = torch.nn.Sequential(layer)
    with bpda(model):
        out_bpda = model(x)
        (g,) = torch.autograd.grad(out_bpda.sum(), x)
    assert torch.equal(out_bpda, out)
    assert torch.equal(g, (x > 0).float())  # ReLU's gradient
    assert not layer.bpda
    with pytest.raises(JeatError, match="ratio must be in"):
        KWTA(0.0)
    with pytest.raises(JeatError, match="kwta-0.1"):
        create_model("small_cnn", in_channels=1, num_classes=10, activation="kwta-x")


def test_kwta_fools_naive_pgd_but_not_adaptive_attacks_or_the_sanity_rules(tmp_path, digits):
    """k-WTA (Xiao et al. 2020) on a PGD-AT digits CNN: naive PGD-20 overestimates its
    robustness; BPDA attacks (k-WTA differentiated as ReLU) bring it down by 20+ points, and the
    table's sanity rule (white-box must beat black-box) flags the naive evaluation."""
    model = train_digits(tmp_path, "pgd-at", extra=["model.options.activation=kwta-0.1"])
    x, y = digits.x_test, digits.y_test
    threat = LinfBall(digits.info.eps_linf)
    adaptive = ["pgd20:bpda=1:restarts=5", "cw30-t:bpda=1"]
    res = evaluate(model, x, y, ["clean", "pgd20", *adaptive], threat, mode="independent")
    print("\n" + res.table())
    naive = res.row("pgd20").accuracy
    best = min(res.row(a).accuracy for a in adaptive)
    assert best <= naive - 20
    naive_table = evaluate(model, x, y, ["clean", "pgd20", "square:n_queries=500"], threat)
    print(naive_table.table())
    assert any("square" in w and "gradient masking" in w for w in naive_table.warnings)


@pytest.fixture(scope="module")
def wrm_model(tmp_path_factory, digits):
    from conftest import FAST

    from jeat.finish import train_and_finish

    cfg = load_config("digits-wrm", FAST)
    return train_and_finish(cfg, tmp_path_factory.mktemp("wrm") / "run", data=digits).model


def test_wrm_is_more_robust_than_standard(digits, standard_model, wrm_model):
    """WRM defends a Wasserstein (L2 transport) ball: under L2 PGD-20 it keeps far more than
    the standard model, and under the digits L-inf budget it is still above it."""
    x, y = digits.x_test, digits.y_test
    attacks = ["clean", "pgd20:norm=l2:eps=0.5", "pgd20"]
    res = {
        name: evaluate(m, x, y, attacks, LinfBall(digits.info.eps_linf), mode="independent")
        for name, m in (("standard", standard_model), ("wrm", wrm_model))
    }
    acc = {n: [r.accuracy for r in t.rows] for n, t in res.items()}
    print("\nclean / PGD-20 L2 0.5 / PGD-20 Linf 0.2:", acc)
    assert acc["wrm"][1] >= acc["standard"][1] + 15
    assert acc["wrm"][2] > acc["standard"][2]
    assert acc["wrm"][0] >= acc["standard"][0] - 5


def test_wrm_certificate_bounds_every_attack(tmp_path, digits, wrm_model):
    from jeat.certify import wrm_certificate

    x, y = digits.x_test[:120], digits.y_test[:120]
    cert = wrm_certificate(wrm_model, x, y, 2.0, [0.1, 0.5, 1.0, 2.0], steps=60, attack_steps=30)
    print("\n" + cert.table())
    assert cert.violations == []
    assert len(cert.attacks) == 4 + 5
    assert all(a.loss > cert.clean_loss for a in cert.attacks if a.transport > 0.05)
    # the Lagrangian attack at the certificate's own gamma is its maximiser: the bound is tight
    (own,) = [a for a in cert.attacks if a.attack == "lagrangian γ'=2"]
    assert own.loss == pytest.approx(own.bound, rel=1e-4)
    assert cert.plot(tmp_path / "cert.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(JeatError, match="rho must be numbers > 0"):
        wrm_certificate(wrm_model, x, y, 2.0, [0.0])


def test_wrm_warns_about_relu_models_and_checks_its_options():
    info = load_dataset("digits").info
    cfg = load_config("digits-wrm", ["objective.options.steps=2"])
    obj = create_objective(cfg.objective, info)
    relu = create_model("small_cnn", in_channels=1, num_classes=10, width=4)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
    with pytest.warns(UserWarning, match="smooth model"):
        obj(relu, x, y)
    cfg.objective.options["gamma"] = 0
    with pytest.raises(JeatError, match="gamma must be a number > 0"):
        create_objective(cfg.objective, info)


def test_doa_options_and_its_attack_stays_inside_one_rectangle():
    from jeat.attacks.occlusion import Occlusion

    cfg = load_config("digits-doa", ["objective.options.steps=3"])
    info = load_dataset("digits").info
    obj = create_objective(cfg.objective, info)
    assert (obj.attack.height, obj.attack.width, obj.attack.search) == (2, 2, "exhaustive")
    torch.manual_seed(0)
    model = create_model("small_cnn", in_channels=1, num_classes=10, width=8)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    x_adv = obj.attack(model, x, y)
    rows, cols = obj.attack.locate(model, x, y)
    threat = Occlusion(2, 2).placed(rows, cols, x.shape)
    assert (threat.distance(x_adv, x) <= 1.0).all()  # changed only inside one 2x2 rectangle
    assert ((x_adv != x).flatten(1).sum(1) <= 4).all()
    out = obj(model, x, y)
    assert out.loss.requires_grad and set(out.metrics) >= {"ce", "energy"}
    big = load_config("cifar10-doa").objective
    cifar = create_objective(big, dataset_info("cifar10"))
    assert (cifar.attack.height, cifar.attack.search) == (5, "gradient")
    for bad, match in (
        ({"size": 9}, "larger than the 8x8 images"),
        ({"size": 0}, "size must be an integer >= 1"),
        ({"search": "random"}, "unknown occlusion search"),
        ({"attack_mode": "both"}, "attack_mode"),
        ({"rectangle": 2}, "does not take option"),
    ):
        cfg = load_config("digits-doa")
        cfg.objective.options.update(bad)
        with pytest.raises(JeatError, match=match):
            create_objective(cfg.objective, info)


def test_doa_resists_occlusion_better_than_pgd_at(tmp_path, digits, pgdat_model):
    fast = ["objective.options.steps=5", "objective.options.step_size=0.2"]
    doa = train_digits(tmp_path, "doa", epochs=8, extra=fast)
    x, y = digits.x_test, digits.y_test
    attacks = ["clean", "roa", "pgd20"]
    threat = LinfBall(digits.info.eps_linf)
    res = {
        name: [r.accuracy for r in evaluate(m, x, y, attacks, threat, mode="independent").rows]
        for name, m in (("doa", doa), ("pgd-at", pgdat_model))
    }
    print("\nclean / ROA 2x2 / PGD-20:", res)
    assert res["doa"][1] >= res["pgd-at"][1] + 20  # measured: 48.6 vs 9.4, 39 points
    assert res["doa"][0] >= 80
