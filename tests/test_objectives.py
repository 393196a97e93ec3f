import json

import pytest
import torch
from conftest import FAST

import jeat.train as jt
from jeat import JeatError
from jeat.checkpoint import load_checkpoint
from jeat.config import ObjectiveConfig, load_config
from jeat.data import dataset_info
from jeat.energy import cross_entropy_from_logits, marginal_energy_from_logits
from jeat.models import create_model
from jeat.objectives import create_objective

INFO = dataset_info("digits")


def _setup(name, digits, **options):
    cfg = ObjectiveConfig(name=name, options={"buffer_size": 100, "data_noise": 0.0, **options})
    if name == "jeat":
        cfg.attack.eps = 0.0  # x_adv = x, so the loss has a closed form to compare with
    obj = create_objective(cfg, INFO)
    obj.setup(digits, torch.device("cpu"))
    torch.manual_seed(0)
    model = create_model("small_cnn", in_channels=1, num_classes=10, width=8)
    return obj, model


def _grads(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize(
    ("name", "data_term"), [("jem", None), ("jeat", "adv"), ("jeat", "clean"), ("jeat", "both")]
)
def test_loss_and_gradients_are_ce_plus_lambda_energy_gap(digits, name, data_term):
    opts = {"energy_weight": 0.7}
    if data_term:
        opts["data_term"] = data_term
    obj, model = _setup(name, digits, **opts)
    x, y = digits.x_train[:16], digits.y_train[:16]
    x_hat = torch.rand(16, 1, 8, 8)
    obj.samples = lambda model, y, like=None: (x_hat, None)  # fix the samples: check the formula
    out = obj(model, x, y)
    assert out.loss.item() == pytest.approx(
        (out.metrics["ce"] + 0.7 * out.metrics["energy_gap"]).item(), rel=1e-5
    )
    logits = model(x)
    e_x = marginal_energy_from_logits(logits)
    if data_term == "both":
        e_x = torch.cat([e_x, e_x])
    manual = cross_entropy_from_logits(logits, y).mean() + 0.7 * (
        e_x.mean() - marginal_energy_from_logits(model(x_hat)).mean()
    )
    for a, b in zip(_grads(model, out.loss), _grads(model, manual), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_sampler_writes_back_to_the_buffer_and_moves_samples_downhill(digits):
    obj, model = _setup("jem", digits, sgld_steps=10, reinit_freq=0.0, sgld_noise=0.0)
    before = obj.buffer.x.clone()
    x_hat, _ = obj.samples(model, digits.y_train[:32])
    changed = (obj.buffer.x != before).flatten(1).any(1)
    assert 0 < changed.sum() <= 32
    with torch.no_grad():
        e_before = marginal_energy_from_logits(model(before[changed])).mean()
        e_after = marginal_energy_from_logits(model(obj.buffer.x[changed])).mean()
    assert e_after < e_before


def test_conditional_sampling_uses_class_partitions(digits):
    obj, model = _setup("jem", digits, conditional=True, sgld_steps=1)
    y = digits.y_train[:20]
    _, labels = obj.samples(model, y)
    assert torch.equal(labels, y)


def test_bad_options_fail_clearly():
    with pytest.raises(JeatError, match="does not take option"):
        create_objective(ObjectiveConfig(name="jem", options={"lambda": 1}), INFO)
    with pytest.raises(JeatError, match="data_term"):
        create_objective(ObjectiveConfig(name="jeat", options={"data_term": "x"}), INFO)


def _jem_cfg(extra=()):
    return load_config(
        "digits-pgdat",
        [
            "objective.name=jem",
            "objective.options={buffer_size: 200, sgld_steps: 3}",
            "model.options.width=8",
            "data.train_subset=256",
            "schedule.name=constant",
            "schedule.warmup_steps=0",
            *FAST,
            *extra,
        ],
    )


def test_resume_restores_the_replay_buffer_exactly(tmp_path):
    straight = jt.train(_jem_cfg(["epochs=3"]), tmp_path / "straight")
    jt.train(_jem_cfg(["epochs=1"]), tmp_path / "split")
    resumed = jt.train(_jem_cfg(["epochs=3"]), tmp_path / "split", resume=True)
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    for a, b in zip(sa.values(), sb.values(), strict=True):
        assert torch.equal(a, b)
    buf_a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    buf_b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert torch.equal(
        buf_a["objective_state"]["buffer"]["x"], buf_b["objective_state"]["buffer"]["x"]
    )


def test_forced_divergence_is_detected_and_recovered(tmp_path, monkeypatch):
    """An absurd learning rate injected once at global step 6 blows the weights up; the loop
    detects the divergence at step 7, rolls back to the checkpoint written after step 5 (epoch 2,
    step 1 of 4), restarts the buffer, halves the LR and finishes the run."""
    original = jt.lr_factor
    injected = []

    def absurd_once(cfg, step, total):
        if step == 6 and not injected:
            injected.append(step)
            return 1e7
        return original(cfg, step, total)

    monkeypatch.setattr(jt, "lr_factor", absurd_once)
    cfg = _jem_cfg(["epochs=3", "checkpoint_every_steps=5", "optim.lr=1e-3"])
    result = jt.train(cfg, tmp_path / "run")
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert injected and len(events) == 1
    print("\n", events[0])
    assert events[0]["rolled_back_to_epoch"] == 2 and events[0]["rolled_back_to_step"] == 1
    assert events[0]["lr_scale"] == 0.5
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3]
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["recoveries"] == 1 and state["lr_scale"] == 0.5


def test_eps_warmup_grows_the_training_budget_linearly():
    cfg = load_config("digits-pgdat", ["objective.attack.eps_warmup_steps=4"])
    for name in ("pgd-at", "jeat"):
        cfg.objective.name = name
        obj = create_objective(cfg.objective, INFO)
        seen = []
        for step in range(6):
            obj.begin_step(step)
            seen.append((obj.attack.threat.eps, obj.attack.step_size))
        assert [e for e, _ in seen] == pytest.approx([0.2 * f for f in (0.25, 0.5, 0.75, 1, 1, 1)])
        step = cfg.objective.attack.step_size
        assert seen[0][1] == pytest.approx(step / 4) and seen[-1][1] == pytest.approx(step)
        assert obj.attack.eval_mode  # the warm-up keeps the attack's mode
