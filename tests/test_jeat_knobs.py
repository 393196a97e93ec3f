"""The JEAT knobs of the study: lambda warm-up, data-plus-noise chain restarts and JEM++'s
proximal SGLD (gradient clip); defaults unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jeat.config import ObjectiveConfig, load_config
from jeat.data import load_dataset
from jeat.errors import JeatError
from jeat.objectives import create_objective
from jeat.runs import build_model
from jeat.samplers import SGLD, ReplayBuffer


class Linear(nn.Module):
    """E(x) = -logsumexp(w * sum(x), 0): a known, large input gradient."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([scale, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1, keepdim=True) * self.w


def test_defaults_unchanged():
    data = load_dataset("digits")
    # the objective's own defaults (mnist-jeat, cifar10-jeat and digits-jeat-ce run them)
    for config in ("digits-jeat-ce", "mnist-jeat"):
        jeat = create_objective(load_config(config).objective, data.info)
        assert jeat.opts["buffer_init"] == "gaussian" and jeat.opts["sgld_grad_clip"] is None
        assert jeat.opts["energy_weight_warmup_steps"] == 0 and jeat.energy_weight == 0.01
        assert jeat.opts["robust_loss"] == "ce" and jeat.sgld.steps == 3
        assert jeat.sgld.grad_clip is None
    # digits-jeat: the study's best point, JEAT on TRADES with JEM's sampler and lambda 1
    o = create_objective(load_config("digits-jeat").objective, data.info).opts
    assert (o["robust_loss"], o["beta"], o["energy_weight"]) == ("trades", 6.0, 1.0)
    assert (o["buffer_init"], o["sgld_steps"], o["data_term"]) == ("uniform", 20, "both")
    # as published: PGD-AT's loss, not TRADES'
    o = create_objective(load_config("digits-jeat-published").objective, data.info).opts
    assert (o["robust_loss"], o["energy_weight"], o["sgld_steps"]) == ("ce", 1.0, 20)
    jem = create_objective(load_config("digits-jem").objective, data.info)
    assert jem.opts["buffer_init"] == "uniform" and jem.energy_weight == 1.0


def test_energy_weight_warmup_is_a_function_of_the_step():
    data = load_dataset("digits")
    cfg = load_config(
        "digits-jeat-ce",
        [
            "objective.options.energy_weight=1.0",
            "objective.options.energy_weight_warmup_steps=4",
            "objective.attack.eps_warmup_steps=100",
        ],
    )
    obj = create_objective(cfg.objective, data.info)
    seen = []
    for step in [0, 1, 2, 3, 10, 1]:
        obj.begin_step(step)
        seen.append(obj.energy_weight)
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.5])
    # the eps warm-up (the attack's mixin, 100 steps here) still runs beside it
    assert obj.attack.threat.eps == pytest.approx(0.2 * 2 / 100)
    # and the weight reaches the loss: the generative term scales with it
    obj.setup(data, torch.device("cpu"))
    torch.manual_seed(0)
    net = build_model(cfg, data.info)
    x, y = data.x_train[:16], data.y_train[:16]
    obj.begin_step(0)
    torch.manual_seed(1)
    out = obj(net, x, y)
    assert float(out.metrics["energy_weight"]) == pytest.approx(0.25)
    gap = float(out.metrics["energy_gap"])
    assert float(out.loss) == pytest.approx(float(out.metrics["ce"]) + 0.25 * gap, rel=1e-5)


def test_data_restarts_come_from_the_slot_class_plus_noise():
    torch.manual_seed(0)
    x = torch.rand(30, 1, 4, 4)
    y = torch.arange(30) % 3
    buf = ReplayBuffer(9, (1, 4, 4), 3, reinit_freq=1.0, init="data", pool=(x, y), init_noise=0.0)
    # noise 0: every chain is a training image of its slot's class
    for slot in range(9):
        matches = (x - buf.x[slot]).flatten(1).abs().amax(1) == 0
        assert matches.any() and bool((y[matches] == slot % 3).all())
    g = torch.Generator().manual_seed(3)
    drawn, idx = buf.sample(12, torch.tensor([2] * 12), generator=g)  # all restarted
    assert bool((idx % 3 == 2).all())
    for img in drawn:
        matches = (x - img).flatten(1).abs().amax(1) == 0
        assert bool((y[matches] == 2).all()) and matches.any()
    noisy = ReplayBuffer(
        300, (1, 4, 4), 3, init="data", pool=(torch.full((3, 1, 4, 4), 0.5), torch.arange(3)),
        init_noise=0.1,
    )  # fmt: skip
    dev = noisy.x - 0.5
    assert float(dev.std()) == pytest.approx(0.1, rel=0.1) and float(dev.abs().max()) > 0
    assert float(noisy.x.min()) >= 0 and float(noisy.x.max()) <= 1


def test_data_restarts_refuse_bad_pools():
    with pytest.raises(JeatError, match="needs the training images"):
        ReplayBuffer(9, (1, 2, 2), 3, init="data")
    with pytest.raises(JeatError, match="no training images"):
        ReplayBuffer(
            9, (1, 2, 2), 3, init="data", pool=(torch.rand(2, 1, 2, 2), torch.tensor([0, 1]))
        )
    with pytest.raises(JeatError, match="init noise"):
        ReplayBuffer(9, (1, 2, 2), 3, init="data",
                     pool=(torch.rand(3, 1, 2, 2), torch.arange(3)), init_noise=-1)  # fmt: skip
    with pytest.raises(JeatError, match="buffer init must be one of"):
        ReplayBuffer(9, (1, 2, 2), 3, init="zeros")


def test_jeat_trains_with_data_restarts():
    data = load_dataset("digits")
    cfg = load_config("digits-jeat-ce", ["objective.options.buffer_init=data"])
    obj = create_objective(cfg.objective, data.info)
    obj.setup(data, torch.device("cpu"))
    buf = obj.buffer
    assert buf is not None and buf.init == "data"
    # at start every chain is a (noisy) training image: much closer to the data than noise
    nearest = torch.cdist(buf.x[:50].flatten(1), data.x_train.flatten(1)).min(1).values
    rms = nearest / (buf.x[0].numel() ** 0.5)
    assert float(rms.max()) < 0.15  # noise std 0.1 per pixel (less after clamping)


def test_proximal_sgld_bounds_each_step():
    model = Linear(1000.0)  # grad of E(x) w.r.t. every pixel is about -1000
    x0 = torch.full((2, 1, 2, 2), 0.5)
    plain = SGLD(steps=1, step_size=0.01, noise=0.0)(model, x0)
    clipped = SGLD(steps=1, step_size=0.01, noise=0.0, grad_clip=2.0)(model, x0)
    assert torch.allclose(plain, torch.ones_like(plain))  # 0.5 + 10 clamped to 1
    assert torch.allclose(clipped, torch.full_like(x0, 0.52))  # 0.5 + 0.01 * 2
    with pytest.raises(JeatError, match="gradient clip"):
        SGLD(steps=1, grad_clip=0.0)(model, x0)


def test_objective_validates_the_new_options():
    info = load_dataset("digits").info
    for key, value, match in [
        ("buffer_init", "zeros", "buffer_init must be one of"),
        ("buffer_init_noise", -0.1, "buffer_init_noise"),
        ("sgld_grad_clip", 0, "sgld_grad_clip"),
        ("energy_weight_warmup_steps", 1.5, "energy_weight_warmup_steps"),
    ]:
        with pytest.raises(JeatError, match=match):
            create_objective(ObjectiveConfig(name="jeat", options={key: value}), info)
    obj = create_objective(ObjectiveConfig(name="jeat", options={"sgld_grad_clip": 0.5}), info)
    assert obj.sgld.grad_clip == 0.5


def test_jeat_on_trades_is_trades_plus_the_energy_term():
    """``robust_loss: trades``: the classification part is exactly TRADES' loss (same inner
    maximisation, same beta), and the energy term is added on the KL-adversarial inputs."""
    data = load_dataset("digits")
    sets = ["objective.options.robust_loss=trades", "objective.options.beta=3.0",
            "objective.options.energy_weight=0.5", "objective.options.data_term=adv"]  # fmt: skip
    cfg = load_config("digits-jeat", sets)
    obj = create_objective(cfg.objective, data.info)
    obj.setup(data, torch.device("cpu"))
    trades = create_objective(
        load_config("digits-trades", ["objective.options.beta=3.0"]).objective, data.info
    )
    torch.manual_seed(0)
    net = build_model(cfg, data.info)
    x, y = data.x_train[:16], data.y_train[:16]
    torch.manual_seed(1)
    out = obj(net, x, y)
    torch.manual_seed(1)
    ref = trades(net, x, y)
    gap = float(out.metrics["energy_gap"])
    assert float(out.metrics["kl"]) == pytest.approx(float(ref.metrics["kl"]), rel=1e-5)
    assert float(out.loss) == pytest.approx(float(ref.loss) + 0.5 * gap, rel=1e-5)
    assert torch.allclose(out.logits, ref.logits)  # the clean logits, as TRADES reports
    # the energy term sees the KL-adversarial inputs: its data energy is theirs, not x's
    torch.manual_seed(1)
    x_adv = trades.adversarial(net, x)
    e_adv = -torch.logsumexp(net(x_adv), dim=1).mean()
    assert float(out.metrics["energy_data"]) == pytest.approx(float(e_adv), rel=1e-5)
    # and the gradient reaches the weights through both parts
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    # data_term both (digits-jeat's): the data energy is the mean over x and x'
    obj.opts["data_term"] = "both"
    torch.manual_seed(1)
    out = obj(net, x, y)
    e_clean = -torch.logsumexp(net(x), dim=1).mean()
    both = float(out.metrics["energy_data"])
    assert both == pytest.approx(float((e_adv + e_clean) / 2), rel=1e-5)
    assert float(out.loss) == pytest.approx(
        float(ref.loss) + 0.5 * float(out.metrics["energy_gap"]), rel=1e-5
    )


def test_jeat_robust_loss_is_validated():
    info = load_dataset("digits").info
    for key, value, match in [("robust_loss", "mart", "robust_loss must be 'ce' or 'trades'"),
                              ("beta", -1.0, "beta must be a number >= 0")]:  # fmt: skip
        with pytest.raises(JeatError, match=match):
            create_objective(ObjectiveConfig(name="jeat", options={key: value}), info)
