"""Active-set PGD in evaluation: points leave the working batch once fooled, and the table's
accuracy is the full-batch attack's (within half a point), for every loss, threat, targeted
attacks and restarts. Training (keep_success=False) keeps the whole batch."""

import pytest
import torch
from torch import nn

from jeat import JeatError
from jeat.attacks import PGD, L2Ball, LinfBall
from jeat.evaluate import evaluate

EPS = 0.2  # the digits default budget


class RowCounter(nn.Module):
    """Counts the rows every forward pass sees (the attack's work)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.model(x)


@pytest.mark.parametrize(
    "attack",
    ["pgd20", "pgd20:norm=l2:eps=1.0", "cw20", "dlr20", "pgd20-t:targets=3", "pgd20:restarts=3"],
)
def test_active_set_and_full_batch_give_the_same_accuracy(digits, pgdat_model, attack):
    x, y = digits.x_test[:200], digits.y_test[:200]
    full = attack + ":active=0"
    res = evaluate(pgdat_model, x, y, ["clean", attack, full], LinfBall(EPS), mode="independent")
    print("\n" + res.table())
    active, batch = res.row(attack).accuracy, res.row(full).accuracy
    assert abs(active - batch) <= 0.5
    # a real attack: it breaks points that are clean-correct
    assert active < res.row("clean").accuracy


@pytest.mark.parametrize(
    ("threat", "loss", "targeted", "restarts", "every"),
    [
        (LinfBall(EPS), "ce", False, 1, None),
        (L2Ball(1.0), "ce", False, 1, None),
        (LinfBall(EPS), "cw", False, 1, None),
        (LinfBall(EPS), "dlr", True, 1, None),
        (LinfBall(EPS), "ce", False, 3, None),
        (L2Ball(1.0), "cw", True, 3, 5),  # compaction every 5 steps, as on a GPU
    ],
)
def test_active_set_points_are_in_the_ball_fool_the_model_and_cost_less(
    digits, pgdat_model, threat, loss, targeted, restarts, every
):
    x, y = digits.x_test[:200], digits.y_test[:200]
    target = (y + 1) % 10 if targeted else None
    counted = RowCounter(pgdat_model).eval()
    out = {}
    rows = {}
    for active in (True, False):
        attack = PGD(threat, steps=20, loss=loss, restarts=restarts, keep_success=True,
                     active_set=active, compact_every=every)  # fmt: skip
        counted.rows = 0
        gen = torch.Generator().manual_seed(3)
        out[active] = attack(counted, x, y, target=target, generator=gen, check=False)
        rows[active] = counted.rows
    with torch.no_grad():
        pred = {a: pgdat_model(v).argmax(1) for a, v in out.items()}
    won = {a: (p == target) if targeted else (p != y) for a, p in pred.items()}
    xa = out[True]
    assert xa.shape == x.shape and xa.min() >= 0 and xa.max() <= 1
    assert (threat.distance(xa, x) <= threat.eps + 1e-5).all()
    # the attack won (and the point left the batch) exactly where the output fools the model:
    # the points that never won are still attacked to the last restart, so only a point whose
    # output fools the model may be missing from the last restart's working batch
    assert int(won[True].sum()) > 0
    assert abs(int(won[True].sum()) - int(won[False].sum())) <= 0.005 * len(x)
    # points that were not fooled are the same ones in both runs, with the same outputs
    # (the random starts are drawn for the whole batch, so their trajectories coincide)
    same = (~won[True]) & (~won[False])
    assert torch.allclose(out[True][same], out[False][same], atol=1e-6)
    # the active set did less work: fooled points left the batch; how much less depends on
    # how many were fooled (a targeted attack on a robust model fools few), so the saving is
    # held to a share of the points it fooled
    assert rows[True] < rows[False]
    fooled = float(won[True].float().mean())
    if fooled >= 0.3:
        assert rows[True] < 0.9 * rows[False]
    full_rows = len(x) * (restarts * 21 + (restarts > 1) * restarts)  # 20 steps + last iterate
    assert rows[False] == full_rows


def test_training_keeps_the_full_batch(digits, pgdat_model):
    x, y = digits.x_test[:64], digits.y_test[:64]
    counted = RowCounter(pgdat_model).eval()
    attack = PGD(LinfBall(EPS), steps=10)  # keep_success=False: Madry's last iterate
    assert not attack.uses_active_set
    attack(counted, x, y, check=False)
    assert counted.rows == 64 * 10
    # eval_mode=False (batch statistics may couple examples) also keeps the full batch
    assert not PGD(LinfBall(EPS), keep_success=True, eval_mode=False).uses_active_set
    assert PGD(LinfBall(EPS), keep_success=True).uses_active_set


def test_active_set_options_fail_clearly():
    with pytest.raises(JeatError, match="active_set must be True or False"):
        PGD(LinfBall(0.1), active_set=2)
    with pytest.raises(JeatError, match="compact_every must be an integer >= 1"):
        PGD(LinfBall(0.1), compact_every=0)
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(JeatError, match="option active must be 0 or 1, got 2"):
        evaluate(model, x, y, ["clean", "pgd20:active=2"], LinfBall(0.1))


def test_autoattack_fast_is_never_weaker_than_pgd20(digits, pgdat_model):
    x, y = digits.x_test[:100], digits.y_test[:100]
    res = evaluate(pgdat_model, x, y, ["clean", "pgd20", "autoattack-fast"], LinfBall(EPS),
                   mode="independent")  # fmt: skip
    print("\n" + res.table())
    assert [r.attack for r in res.rows[2:]] == ["autoattack-fast/apgd-ce", "autoattack-fast/apgd-t"]
    # APGD-T runs only on the points APGD-CE left robust (the reference cascade)
    ce, t = res.rows[2], res.rows[3]
    assert t.attacked == ce.attacked - ce.broken
    fast = t.accuracy
    assert fast <= res.row("pgd20").accuracy
    assert fast < res.row("clean").accuracy  # a real run: it breaks clean-correct points
