import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jeat import JeatError
from jeat.energy import (
    EnergyModel,
    as_logits,
    cross_entropy_from_logits,
    dlr_from_logits,
    joint_energy_from_logits,
    log_p_y_given_x_from_logits,
    margin_from_logits,
    marginal_energy_from_logits,
)


def test_energies_match_their_definitions():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.allclose(joint_energy_from_logits(logits, y), -logits[torch.arange(6), y])
    assert torch.allclose(marginal_energy_from_logits(logits), -torch.logsumexp(logits, 1))
    # log p(y|x) = E(x) - E(x, y) is the log-softmax
    assert torch.allclose(
        log_p_y_given_x_from_logits(logits, y), F.log_softmax(logits, 1)[torch.arange(6), y]
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_energy_and_loss_is_computed_in_float32_from_low_precision_logits(dtype):
    """Under autocast the network's logits are bf16; every energy and attack loss upcasts them,
    so sums over a batch and energy differences are float32."""
    torch.manual_seed(0)
    logits = (8 * torch.randn(64, 10)).to(dtype)
    wide = logits.float()
    y = torch.randint(0, 10, (64,))
    for fn, args in [
        (joint_energy_from_logits, (y,)),
        (marginal_energy_from_logits, ()),
        (log_p_y_given_x_from_logits, (y,)),
        (cross_entropy_from_logits, (y,)),
        (margin_from_logits, (y,)),
        (dlr_from_logits, (y,)),
    ]:
        out = fn(logits, *args)
        assert out.dtype == torch.float32, fn.__name__
        assert torch.allclose(out, fn(wide, *args), atol=1e-6), fn.__name__


def test_cross_entropy_is_the_energy_difference():
    torch.manual_seed(1)
    logits = torch.randn(32, 10, dtype=torch.float64) * 5
    y = torch.randint(0, 10, (32,))
    ce = cross_entropy_from_logits(logits, y)
    assert torch.allclose(ce, F.cross_entropy(logits, y, reduction="none"), atol=1e-12)
    assert torch.allclose(
        ce, joint_energy_from_logits(logits, y) - marginal_energy_from_logits(logits)
    )


def test_margin_is_positive_exactly_when_misclassified():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    y = torch.tensor([0, 1])
    m = margin_from_logits(logits, y)
    assert m.tolist() == [-2.0, 3.0]


def test_energy_model_wraps_tuple_and_dict_outputs_and_checks_width():
    class Tup(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :4], "aux"

    class Dic(nn.Module):
        def forward(self, x):
            return {"logits": x.flatten(1)[:, :4]}

    x = torch.rand(3, 1, 2, 2)
    y = torch.tensor([0, 1, 3])
    for net in (Tup(), Dic()):
        em = EnergyModel(net, num_classes=4)
        assert torch.allclose(em.cross_entropy(x, y), em.joint(x, y) - em.marginal(x))
    with pytest.raises(JeatError, match="returns 4 logits but the data has 10 classes"):
        EnergyModel(Tup(), num_classes=10)(x)
    with pytest.raises(JeatError, match="not logits"):
        as_logits("nope")


def test_label_errors_are_clear():
    logits = torch.zeros(2, 3)
    with pytest.raises(JeatError, match=r"labels must lie in \[0, 2\]"):
        joint_energy_from_logits(logits, torch.tensor([0, 3]))
    with pytest.raises(JeatError, match="integers"):
        joint_energy_from_logits(logits, torch.tensor([0.0, 1.0]))
    with pytest.raises(JeatError, match="one entry per input"):
        joint_energy_from_logits(logits, torch.tensor([0, 1, 2]))


def test_gradients_flow_through_energies():
    x = torch.randn(4, 3, requires_grad=True)
    lin = nn.Linear(3, 5)
    e = marginal_energy_from_logits(lin(x)).sum()
    (g,) = torch.autograd.grad(e, x)
    # dE(x)/dx = -W^T softmax(f(x))
    p = torch.softmax(lin(x), 1)
    assert torch.allclose(g, -(p @ lin.weight), atol=1e-6)
