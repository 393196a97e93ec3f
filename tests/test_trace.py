"""Loss traces recorded by PGD, EOT and log-output attacks, and the per-point indicator rules
on hand-made curves."""

import math

import pytest
import torch
from torch import nn

from jeat import JeatError
from jeat.attacks import PGD, LinfBall, MultiTargeted
from jeat.attacks.trace import LossTrace, last_finite
from jeat.diagnose import _incomplete, _unstable, parse_names
from jeat.evaluate import evaluate, parse_attack


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def _data(n: int = 48, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_pgd_records_the_loss_it_ascends_at_every_iterate():
    model, (x, y) = _tiny(), _data()
    pgd = PGD(LinfBall(0.1), steps=5, keep_success=True, active_set=False)
    trace = LossTrace(len(x), 1, 5)
    pgd.recorder = trace
    trace.begin_batch(torch.arange(len(x)), "cpu")
    pgd(model, x, y, generator=torch.Generator().manual_seed(0))
    trace.end_batch()
    assert not torch.isnan(trace.loss).any() and not torch.isnan(trace.grad).any()
    # the first recorded loss is the CE at the random start: recompute it
    start = LinfBall(0.1).random_init(x, torch.Generator().manual_seed(0))
    ce = nn.functional.cross_entropy(model(start), y, reduction="none")
    assert torch.allclose(trace.loss[:, 0, 0], ce.detach(), atol=1e-5)
    assert (trace.grad > 0).all()
    fooled_at_start = model(start).argmax(1) != y
    assert ((trace.first_fooled[:, 0] == 0) == fooled_at_start).all()


def test_active_set_and_full_batch_record_the_same_traces_until_a_point_leaves():
    model, (x, y) = _tiny(), _data()
    traces = []
    for active in (True, False):
        pgd = PGD(LinfBall(0.1), steps=8, keep_success=True, active_set=active, restarts=2)
        trace = LossTrace(len(x), 2, 8)
        pgd.recorder = trace
        trace.begin_batch(torch.arange(len(x)), "cpu")
        pgd(model, x, y, generator=torch.Generator().manual_seed(3))
        trace.end_batch()
        traces.append(trace)
    active, full = traces
    seen = ~torch.isnan(active.loss)
    assert seen[:, 0, 0].all()  # every point starts
    assert torch.allclose(active.loss[seen], full.loss[seen], atol=1e-5)
    assert (active.first_fooled[:, 0] == full.first_fooled[:, 0]).all()
    # a point fooled in the first restart is not attacked again in the second
    fooled_first = active.first_fooled[:, 0] >= 0
    assert torch.isnan(active.loss[fooled_first, 1]).all()


def test_multi_targeted_runs_fill_one_slot_per_target():
    model, (x, y) = _tiny(), _data(16)
    pgd = PGD(LinfBall(0.02), steps=3, keep_success=True)
    attack = MultiTargeted(pgd, 3)
    trace = LossTrace(len(x), 3, 3)
    pgd.recorder = trace
    trace.begin_batch(torch.arange(len(x)), "cpu")
    attack(model, x, y, generator=torch.Generator().manual_seed(0))
    trace.end_batch()
    assert not torch.isnan(trace.loss[:, 0, 0]).any()  # every point starts on its first target
    # a point fooled toward target 1 leaves the active set there and never gets target 2
    done = trace.first_fooled[:, 0] >= 0
    assert torch.isnan(trace.loss[done, 1:]).all()


class _Noisy(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + 0.05 * torch.randn_like(x))


def test_eot_averages_the_gradient_of_several_passes():
    model, (x, y) = _Noisy(_tiny()), _data(8)
    target_logit = lambda z, t, _: z.gather(1, t[:, None]).squeeze(1)  # noqa: E731
    pgd = PGD(LinfBall(0.1), steps=1, eot=50)
    torch.manual_seed(0)
    logits, loss, grad = pgd._gradient(model, x.clone(), y, None, target_logit)
    torch.manual_seed(0)  # the same 50 noise draws, by hand
    grads, values = [], []
    for _ in range(50):
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        values.append(target_logit(out, y, None).detach())
        grads.append(torch.autograd.grad(target_logit(out, y, None).sum(), xg)[0])
    assert torch.allclose(grad, torch.stack(grads).mean(0), atol=1e-6)
    assert torch.allclose(loss, torch.stack(values).mean(0), atol=1e-5)
    # one pass is far noisier than the average of 50
    spread_one = (grads[0] - grads[1]).abs().mean()
    torch.manual_seed(1)
    other = pgd._gradient(model, x.clone(), y, None, target_logit)[2]
    assert (grad - other).abs().mean() < 0.5 * spread_one
    with pytest.raises(JeatError, match="EOT samples"):
        PGD(LinfBall(0.1), eot=0)
    with pytest.raises(JeatError, match="eot must be >= 1"):
        evaluate(model, x, y, ["clean", "pgd5:eot=0"], LinfBall(0.1))
    assert parse_attack("pgd20:eot=20").options["eot"] == 20


class _Detached(nn.Module):
    """A preprocessing step with no gradient: the outputs ignore the input's graph."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x.detach() * 4) / 4)


def test_a_detached_model_gives_zero_gradients_not_an_error():
    model, (x, y) = _Detached(_tiny()), _data(8)
    pgd = PGD(LinfBall(0.1), steps=3, keep_success=True)
    trace = LossTrace(len(x), 1, 3)
    pgd.recorder = trace
    trace.begin_batch(torch.arange(len(x)), "cpu")
    pgd(model, x, y, generator=torch.Generator().manual_seed(0))
    trace.end_batch()
    seen = ~torch.isnan(trace.grad)
    assert seen[:, 0, 0].all() and (trace.grad[seen] == 0).all()


def test_log_outputs_attack_a_probability_model_as_its_logits():
    inner, (x, y) = _tiny(), _data(32)
    probs = nn.Sequential(inner, nn.Softmax(1)).eval()
    a = PGD(LinfBall(0.1), steps=5, log_outputs=True, keep_success=True, active_set=False)
    b = PGD(LinfBall(0.1), steps=5, keep_success=True, active_set=False)
    xa = a(probs, x, y, generator=torch.Generator().manual_seed(0))
    xb = b(inner, x, y, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(xa, xb, atol=1e-5)  # log softmax = logits - const: same CE


def test_incomplete_rule_flags_a_rising_curve_and_not_a_plateau():
    rising = torch.linspace(0, 1, 21)
    plateau = torch.cat([torch.linspace(0, 1, 8), torch.ones(13)])
    noisy_plateau = plateau + 0.01 * torch.sin(torch.arange(21.0))
    flat = torch.zeros(21)
    short = torch.tensor([0.0, 1.0])  # FGSM: no path to judge
    curves = torch.stack(
        [rising, plateau, noisy_plateau, flat, torch.cat([short, torch.full((19,), math.nan)])]
    )
    assert _incomplete(curves).tolist() == [True, False, False, False, False]


def test_unstable_rule_flags_a_loss_that_falls_back_more_than_its_range():
    up = torch.linspace(0, 1, 21)
    zigzag = torch.tensor([0.0, 1.0] * 10 + [0.5])
    mild = torch.cat([torch.linspace(0, 1, 11), 1 - 0.02 * (torch.arange(10.0) % 2)])
    assert _unstable(torch.stack([up, zigzag, mild])).tolist() == [False, True, False]


def test_last_finite_and_names():
    rows = torch.tensor([[1.0, 2.0, math.nan], [math.nan, math.nan, math.nan], [3.0, 4.0, 5.0]])
    out = last_finite(rows)
    assert out[0] == 2 and math.isnan(out[1]) and out[2] == 5
    assert parse_names("incomplete,eot", {"incomplete": 1, "eot": 2}, "x") == ["incomplete", "eot"]
    with pytest.raises(JeatError, match="unknown indicator 'nope'"):
        parse_names("nope", {"incomplete": 1}, "indicator")
