"""Models jeat cannot see into (issue 31): a table for every model a user can load, never a
traceback; the fix of an opaque model ends below what its probes showed and close to a
transfer attack; BPDA through a learned approximation of a named module; HopSkipJump; a
user's test set evaluated in full."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import cli_fails, jeat_cli
from torch import nn

from jeat.attacks import PGD, LinfBall
from jeat.attacks.decision import HopSkipJump
from jeat.diagnose import diagnose, fix, remedy_costs
from jeat.evaluate import evaluate

THREAT = LinfBall(0.2)


class Detached(nn.Module):
    """Logits computed outside the graph (as a NumPy step would)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.detach())


class NoGrad(nn.Module):
    """A forward pass under torch.no_grad."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        with torch.no_grad():
            return self.net(x)


class Integers(nn.Module):
    """Integer outputs: one-hot votes of the network's class."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return nn.functional.one_hot(self.net(x).argmax(1), 10)


class Shattered(nn.Module):
    """A shattering preprocessing of this test's own: a 6-level staircase plus a fast ripple
    whose gradient (large, its sign changing every few hundredths of a pixel) says nothing
    about the function. Differentiable; jeat's BPDA knows nothing of it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        stairs = torch.round(x * 5) / 5
        return self.net((stairs + 0.02 * torch.sin(300 * x)).clamp(0, 1))


def test_a_model_with_no_usable_gradient_gets_a_table_not_a_traceback(digits, standard_model):
    """Detached logits, a forward pass under no_grad, integer outputs: every attack row runs
    (the reference AutoAttack's gradient components included), the indicators say why."""
    x, y = digits.x_test[:16], digits.y_test[:16]
    table = "clean,fgsm,pgd5,autoattack:components=apgd-ce+fab-t,hopskipjump:n_queries=300"
    wanted = "zero-gradients,zero-gradients-at-start,no-score"
    for wrapper in (Detached, NoGrad, Integers):
        model = wrapper(standard_model).eval()
        result, dg = diagnose(model, x, y, table, THREAT, indicators=wanted)
        print(result.table(), dg.table(), sep="\n")
        assert "autoattack:components=apgd-ce+fab-t/fab-t" in [r.attack for r in result.rows]
        raised = set(dg.raised())
        assert {"zero-gradients", "zero-gradients-at-start"} <= raised, wrapper
        assert dg.opaque and "bpda" not in dg.remedies()
        if wrapper is Integers:
            assert "no-score" in raised and "decision" in dg.remedies()
        # the decision-based attack needs no gradient: it breaks what PGD could not
        assert result.row("pgd5").broken == 0
        assert result.row("hopskipjump:n_queries=300").broken > 0


def test_the_fix_of_a_shattering_preprocessing_closes_the_gap_to_transfer(digits, standard_model):
    model = Shattered(standard_model).eval()
    x, y = digits.x_test[:48], digits.y_test[:48]
    naive, dg = diagnose(model, x, y, "clean,pgd20", THREAT, probe=24)
    naive_pgd20 = naive.row("pgd20").robust_after
    probe_rows = [r for r in naive.rows if r.attack.endswith("(probe)")]
    assert probe_rows and naive.robust_accuracy <= min(r.robust_after for r in naive.rows)
    assert {"smooth", "substitute", "square-full"} <= set(dg.remedies())
    assert dg.sigma is not None and 0.2 / 8 <= dg.sigma <= 0.2 / 2
    fixed, extra = fix(model, x, y, "clean,pgd20", THREAT, dg, naive)
    print(naive.table(), dg.table(), fixed.table(), sep="\n")
    assert extra[0].startswith("pgd50:") and "smooth=" in extra[0]
    assert "substitute" in extra and "square:n_queries=5000" in extra
    # never above a number printed earlier: every row of the naive table, probes included
    assert fixed.robust_accuracy <= min(r.robust_after for r in naive.rows)
    # the attack that broke each point is named in the per-point file
    broken_by = set(fixed.broken_by())
    assert any(b.endswith("(probe)") for b in broken_by)
    costs = remedy_costs(fixed, extra)
    assert [c.attack for c in costs] == extra and all(c.seconds >= 0 for c in costs)
    # a transfer from the inner network, which the preprocessing does not shatter
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    x_adv = PGD(THREAT, steps=20)(standard_model, x, y, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        transfer = 100.0 * float(((model(x_adv).argmax(1) == y) & clean_ok).float().mean())
    gap = naive_pgd20 - transfer
    assert gap > 30, (naive_pgd20, transfer)  # the shattering fooled PGD-20
    assert fixed.robust_accuracy <= naive_pgd20 - 0.75 * gap, (fixed.robust_accuracy, transfer)


class Thermo(nn.Module):
    """A named non-differentiable module (``pre``) in front of the network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.pre = Staircase()

    def forward(self, x):
        return self.net(self.pre(x))


class Staircase(nn.Module):
    def forward(self, x):
        return torch.round(x * 4) / 4


def test_bpda_through_a_learned_approximation_of_a_named_module(digits, standard_model):
    from jeat.attacks.substitute import find_module
    from jeat.errors import JeatError

    model = Thermo(standard_model).eval()
    x, y = digits.x_test[:60], digits.y_test[:60]
    plain = evaluate(model, x, y, "clean,pgd20", THREAT).robust_accuracy
    learned = evaluate(model, x, y, "clean,pgd20:bpda_module=pre", THREAT).robust_accuracy
    print(plain, learned)
    assert plain >= 80 and learned <= plain - 50
    with pytest.raises(JeatError, match="no module named 'nope'"):
        find_module(model, "nope")
    _, dg = diagnose(model, x, y, "clean,pgd20", THREAT, probe=16, bpda_module="pre")
    assert dg.remedies()[0] == "learned-bpda"


def test_hopskipjump_reads_only_the_decision(digits, standard_model):
    model = Integers(standard_model).eval()
    x, y = digits.x_test[:40], digits.y_test[:40]
    gen = torch.Generator().manual_seed(0)
    x_adv = HopSkipJump(THREAT, n_queries=1000)(model, x, y, generator=gen)
    assert float(THREAT.distance(x_adv, x).max()) <= 0.2 + 1e-6
    with torch.no_grad():
        acc = float((standard_model(x_adv).argmax(1) == y).float().mean())
    assert acc <= 0.25  # PGD-20 with the gradients leaves none of these 40


NET_PY = """
import torch
from torch import nn


def make(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
"""


def test_a_users_test_set_is_evaluated_in_full(tmp_path, digits):
    (tmp_path / "net.py").write_text(NET_PY)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    images = (digits.x_test[:, 0].numpy() * 255).round().astype(np.uint8)
    np.savez(tmp_path / "test.npz", x=images, y=digits.y_test.numpy())
    common = ["eval", "--model", "py:net.py:make", "--weights", "w.pt", "--dataset",
              "npz:test.npz", "--attacks", "clean", "--quiet"]  # fmt: skip
    r = jeat_cli(*common, "--out", "all.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert "360 of 360 images" in first and "no train/test split of its own" in first
    assert json.loads((tmp_path / "all.json").read_text())["n"] == 360
    r = jeat_cli(*common, "--split", "--out", "split.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert "72 of 360 images" in first and "the test share of a stratified 288/72 split" in first
    cli_fails([*common, "--bpda-module", "pre"], tmp_path, "--bpda-module", "--diagnose")
