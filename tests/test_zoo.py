"""The zoo of broken defences on digits: each raises the indicator that fits, and ``fix``
brings its accuracy down to what the strongest attack finds; the honest robust models raise
nothing. (The full-size table is ``benchmarks/diagnose_zoo.py``; docs/evaluation.md.)"""

import pytest
from conftest import train_digits

from jeat.attacks import LinfBall
from jeat.defences import wrap
from jeat.diagnose import diagnose, fix
from jeat.evaluate import evaluate

N = 120
NAIVE = "clean,fgsm,pgd20"
THREAT = LinfBall(0.2)


def _points(digits):
    return digits.x_test[:N], digits.y_test[:N]


def _diagnose_and_fix(model, digits, table=NAIVE, **kw):
    x, y = _points(digits)
    naive, dg = diagnose(model, x, y, table, THREAT, probe=64)
    fixed, extra = fix(model, x, y, table, THREAT, dg, naive, **kw)
    print(naive.table(), dg.table(), fixed.table(), sep="\n")
    return naive, dg, fixed, extra


# margin: how far the naive table must overstate the fixed one. Noise injection hides little
# from PGD-20 (360 points: 13.1% naive, 0.8% fixed; on these 120 points 8-13% naive, varying
# with the float rounding of the thread count), the gradient-hiding layers nearly everything.
@pytest.mark.parametrize(
    "spec, expected, margin",
    [
        ("quantize:levels=4", {"zero-gradients", "zero-gradients-at-start"}, 50),
        ("zero-grad", {"zero-gradients", "zero-gradients-at-start"}, 50),
        ("softmax", {"probabilities"}, None),
        ("noise:sigma=0.1", {"randomised", "silent-success"}, 5),
    ],
)
def test_a_gradient_hiding_wrapper_is_caught_and_fixed(
    digits, standard_model, spec, expected, margin
):
    model = wrap(standard_model, spec)
    naive, dg, fixed, extra = _diagnose_and_fix(model, digits)
    assert expected <= set(dg.raised())
    assert extra, "the remedies ran"
    x, y = _points(digits)
    # what the undefended standard model keeps under the same remedied attack
    standard = evaluate(standard_model, x, y, ["clean", extra[0]], THREAT).robust_accuracy
    assert fixed.robust_accuracy <= standard + 5
    # the probes' points count in the diagnosed table: never above what they showed
    assert naive.robust_accuracy <= min(r.robust_after for r in naive.rows)
    assert fixed.robust_accuracy <= naive.robust_accuracy
    if margin is not None:  # the softmax model hides nothing from signed PGD on these digits
        assert naive.row("pgd20").robust_after >= fixed.robust_accuracy + margin


def test_detached_purification_is_caught_and_unrolling_its_chain_breaks_it(digits, standard_model):
    model = wrap(standard_model, "purify:steps=2")
    x, y = _points(digits)
    naive, dg = diagnose(model, x, y, NAIVE, THREAT, probe=64)
    print(naive.table(), dg.table(), sep="\n")
    assert {"zero-gradients", "dynamic", "randomised"} <= set(dg.raised())
    remedies = dg.remedies()
    assert remedies.index("unroll") < remedies.index("bpda")  # the true gradient first
    naive_pgd20 = naive.row("pgd20").robust_after
    assert naive_pgd20 >= 80
    # BPDA + EOT (the identity backward through the chain) breaks most of it ...
    bpda_fixed, extra = fix(model, x, y, NAIVE, THREAT, dg, naive, remedies=["bpda", "eot"])
    assert "bpda=1" in extra[0] and "eot=20" in extra[0]
    assert bpda_fixed.robust_accuracy <= naive_pgd20 - 30
    # ... and the unrolled chain (the gradient remedies fix picks; not AutoAttack rand or the
    # black-box ones, Square at 5,000 queries through an SGLD chain per query being minutes
    # here) breaks more: within 5 points of the adaptive attack on the defence built with a
    # differentiable chain
    black_box = ("aa-rand", "square-full", "substitute", "decision", "learned-bpda")
    gradient = [r for r in remedies if r not in black_box]
    fixed, extra = fix(model, x, y, NAIVE, THREAT, dg, naive, remedies=gradient)
    print(fixed.table())
    assert "unroll=1" in extra[0]
    adaptive = wrap(standard_model, "purify:steps=2:differentiable=1")
    strongest = evaluate(adaptive, x, y, "clean,pgd20:eot=20", THREAT).robust_accuracy
    assert fixed.robust_accuracy <= strongest + 5
    assert fixed.robust_accuracy <= bpda_fixed.robust_accuracy - 5


def test_kwta_is_caught_and_the_fix_reaches_autoattack(tmp_path, digits):
    model = train_digits(tmp_path, "pgd-at", extra=["model.options.activation=kwta-0.1"])
    naive, dg, fixed, extra = _diagnose_and_fix(model, digits)
    assert dg.raised(), "k-WTA's masked gradients raise an indicator"
    assert "bpda=1" in extra[0] and "autoattack-fast" in extra
    x, y = _points(digits)
    aa = evaluate(model, x, y, "clean,autoattack-fast", THREAT).robust_accuracy
    assert fixed.robust_accuracy <= aa + 5
    assert fixed.robust_accuracy <= naive.row("pgd20").robust_after - 15


@pytest.mark.parametrize("objective", ["pgd-at", "trades", "jeat"])
def test_honest_robust_models_raise_nothing(tmp_path, digits, objective):
    model = train_digits(tmp_path, objective)
    x, y = _points(digits)
    _, dg = diagnose(model, x, y, "clean,fgsm,pgd20,autoattack-fast", THREAT, probe=64)
    print(dg.table())
    assert dg.raised() == []
