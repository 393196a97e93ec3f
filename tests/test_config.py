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


def test_every_dataset_has_all_four_objectives_and_bases_merge(tmp_path):
    names = builtin_configs()
    for ds in ("digits", "mnist", "cifar10"):
        for obj, suffix in [("standard", "standard"), ("pgd-at", "pgdat"), ("jem", "jem"),
                            ("jeat", "jeat")]:  # fmt: skip
            cfg = load_config(f"{ds}-{suffix}")
            assert cfg.objective.name == obj and cfg.data.name == ds
    for paper in ("cifar10-jem-paper", "cifar10-jeat-paper"):
        cfg = load_config(paper)
        assert cfg.model.name == "wrn" and cfg.model.options["depth"] == 28
        assert cfg.model.options["norm"] == "none" and paper in names
    # a child overrides one key of a section and keeps its siblings
    jeat = load_config("mnist-jeat")
    steps = load_config("mnist-pgdat").objective.attack.steps
    assert jeat.objective.attack.eps == pytest.approx(0.3) and jeat.objective.attack.steps == steps
    (tmp_path / "base.yaml").write_text("epochs: 7\noptim: {name: adam, lr: 0.01}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim: {lr: 0.5}\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert cfg.epochs == 7 and cfg.optim.name == "adam" and cfg.optim.lr == 0.5
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(JeatError, match="cycle"):
        load_config(str(tmp_path / "loop.yaml"))


def test_every_dataset_has_each_defence_config_and_it_builds():
    from jeat.data import dataset_info
    from jeat.objectives import create_objective
    from jeat.runs import build_model

    for ds in ("digits", "mnist", "cifar10"):
        info = dataset_info(ds)
        base = load_config(f"{ds}-pgdat")
        for suffix, objective in [("trades", "trades"), ("wrm", "wrm"), ("kwta", "pgd-at"),
                                  ("doa", "doa")]:  # fmt: skip
            cfg = load_config(f"{ds}-{suffix}")
            assert cfg.objective.name == objective and cfg.data.name == ds
            # one budget: the defence changes only what defines it; TRADES, whose step costs
            # more, trains fewer epochs where its config fits PGD-AT's CPU budget, and digits'
            # WRM keeps the pre-frontier recipe its certificate was measured on
            assert (cfg.batch_size, cfg.optim) == (base.batch_size, base.optim)
            if suffix == "trades" or (ds, suffix) == ("digits", "wrm"):
                assert cfg.epochs <= base.epochs
            else:
                assert cfg.epochs == base.epochs
            create_objective(cfg.objective, info)
            model = build_model(cfg, info)
            acts = {type(m).__name__ for m in model.modules()}
            expected = {"wrm": "ELU", "kwta": "KWTA"}.get(suffix, "ReLU")
            assert expected in acts, (ds, suffix, acts)


def test_every_builtin_config_builds_its_model_and_objective():
    from jeat.data import dataset_info
    from jeat.objectives import create_objective
    from jeat.runs import build_model

    for name in sorted(builtin_configs()):
        cfg = load_config(name)
        info = dataset_info(cfg.data.name)
        build_model(cfg, info)
        create_objective(cfg.objective, info)


def test_naming_another_model_or_objective_starts_its_options_afresh(tmp_path):
    base = load_config("digits-pgdat")
    assert base.model.name == "lean_cnn" and "hidden" in base.model.options
    # an override: the lean network's options do not follow to a ResNet; explicit ones do
    cfg = load_config(None, ["model.name=preact_resnet18", "model.options.width=8"])
    assert cfg.model.options == {"width": 8}
    assert load_config("digits-jeat", ["objective.name=trades"]).objective.options == {}
    # the same model keeps its base's options
    assert load_config(None, ["model.name=lean_cnn"]).model.options == base.model.options
    # a config file on a base: same rule
    child = tmp_path / "child.yaml"
    child.write_text("base: digits-pgdat\nmodel:\n  name: small_cnn\n  options: {width: 4}\n")
    assert load_config(str(child)).model.options == {"width": 4}
    child.write_text("base: digits-pgdat\nmodel:\n  options: {width: 4}\n")
    assert load_config(str(child)).model.options == {**base.model.options, "width": 4}
