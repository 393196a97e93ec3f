import pytest

from jeat import JeatError
from jeat.config import (
    TrainConfig,
    builtin_configs,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_value,
)


def test_parse_value_is_safe_and_understands_fractions():
    assert parse_value("8/255") == pytest.approx(8 / 255)
    assert parse_value("1e-3") == pytest.approx(1e-3)
    assert parse_value("[0.5, 0.75]") == [0.5, 0.75]
    assert parse_value("true") is True
    assert parse_value("__import__('os')") == "__import__('os')"  # a string, never evaluated


def test_builtin_configs_load_and_round_trip():
    names = builtin_configs()
    for required in ("digits-pgdat", "digits-standard", "cifar10-pgdat-paper"):
        assert required in names
    for name in names:
        cfg = load_config(name)
        assert config_from_dict(TrainConfig, config_to_dict(cfg)) == cfg
    paper = load_config("cifar10-pgdat-paper")
    assert paper.model.name == "wrn" and paper.model.options["widen"] == 10
    assert paper.objective.attack.eps == pytest.approx(8 / 255)
    assert paper.objective.attack.step_size == pytest.approx(2 / 255)


def test_overrides_apply_and_typos_fail():
    cfg = load_config("digits-pgdat", ["optim.lr=0.2", "objective.attack.eps=8/255", "epochs=3"])
    assert cfg.optim.lr == 0.2 and cfg.epochs == 3
    assert cfg.objective.attack.eps == pytest.approx(8 / 255)
    with pytest.raises(JeatError, match="unknown config key.*lrr"):
        load_config("digits-pgdat", ["optim.lrr=0.2"])
    with pytest.raises(JeatError, match="must be an integer"):
        load_config("digits-pgdat", ["epochs=many"])
    with pytest.raises(JeatError, match="neither a file nor a built-in"):
        load_config("no-such-config")
    with pytest.raises(JeatError, match="key.sub=value"):
        load_config("digits-pgdat", ["epochs"])
