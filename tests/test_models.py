import pytest
import torch

from jeat import JeatError
from jeat.models import Normalize, create_model, list_models


@pytest.mark.parametrize(
    ("name", "shape", "kwargs"),
    [
        ("small_cnn", (1, 8, 8), {}),
        ("small_cnn", (1, 28, 28), {"norm": "batch", "activation": "elu"}),
        ("preact_resnet18", (3, 32, 32), {"width": 8}),
        ("preact_resnet18", (3, 32, 32), {"width": 8, "norm": "none"}),
        ("wrn", (3, 32, 32), {"depth": 10, "widen": 1, "norm": "none"}),
    ],
)
def test_models_return_logits_and_backprop_to_inputs(name, shape, kwargs):
    model = create_model(name, in_channels=shape[0], num_classes=7, **kwargs)
    x = torch.rand(2, *shape, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.shape == x.shape and torch.isfinite(g).all()


def test_wrn_28_10_has_the_published_size():
    model = create_model("wrn", in_channels=3, num_classes=10)
    n = sum(p.numel() for p in model.parameters())
    assert 36.4e6 < n < 36.6e6  # WRN-28-10: 36.5M parameters
    no_bn = create_model("wrn", in_channels=3, num_classes=10, norm="none")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in no_bn.modules())


def test_preact_resnet18_size():
    model = create_model("preact_resnet18", in_channels=3, num_classes=10)
    n = sum(p.numel() for p in model.parameters())
    assert 11.1e6 < n < 11.2e6


def test_normalisation_is_the_first_layer():
    model = create_model(
        "small_cnn", in_channels=3, num_classes=10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2)
    )
    assert isinstance(model[0], Normalize)
    x = torch.full((1, 3, 4, 4), 0.5)
    assert torch.allclose(model[0](x)[0, :, 0, 0], torch.tensor([0.0, 0.5, 1.0]))


def test_registry_errors():
    assert {m.name for m in list_models()} >= {"small_cnn", "preact_resnet18", "wrn"}
    with pytest.raises(JeatError, match="unknown model 'resnet9000'"):
        create_model("resnet9000", in_channels=1, num_classes=10)
    with pytest.raises(JeatError, match="does not take option"):
        create_model("small_cnn", in_channels=1, num_classes=10, depth=3)
    with pytest.raises(JeatError, match="6n\\+4"):
        create_model("wrn", in_channels=3, num_classes=10, depth=27)
    with pytest.raises(JeatError, match="unknown activation"):
        create_model("small_cnn", in_channels=1, num_classes=10, activation="gelu2")
