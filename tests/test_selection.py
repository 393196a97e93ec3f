"""The frontier levers of the training loop: a validation split held out of the training
images, an exponential moving average of the weights, and keeping the best validation epoch."""

import json

import pytest
import torch
from conftest import FAST
from torch import nn

from jeat import JeatError
from jeat.checkpoint import load_checkpoint
from jeat.config import load_config
from jeat.data import load_dataset, split_validation
from jeat.finish import train_and_finish
from jeat.runs import RunPaths
from jeat.train import WeightAverage, train_view


def _tiny(extra=()):
    """A few seconds: narrow network, PGD-3, 4 epochs of 400 images, a 25% validation split."""
    return load_config(
        "digits-pgdat",
        [
            "model.options.width=8",
            "objective.attack.steps=3",
            "epochs=4",
            "data.train_subset=400",
            "data.val_split=0.25",
            "eval.epoch_steps=3",
            *FAST,
            *extra,
        ],
    )


def test_validation_split_is_stratified_seeded_and_disjoint_from_test():
    data = load_dataset("digits")
    a = split_validation(data, 0.1, seed=3)
    b = split_validation(data, 0.1, seed=3)
    c = split_validation(data, 0.1, seed=4)
    assert torch.equal(a.x_val, b.x_val) and not torch.equal(a.x_val, c.x_val)
    assert len(a.x_train) + len(a.x_val) == len(data.x_train)
    # every class gives about a tenth of its training images
    for k in range(10):
        n_k = int((data.y_train == k).sum())
        assert abs(int((a.y_val == k).sum()) - 0.1 * n_k) <= 1
    # the held-out images are training images, none of them kept for training; the test set
    # is untouched
    flat = lambda x: {tuple(row.tolist()) for row in x.flatten(1)}  # noqa: E731
    assert flat(a.x_val) <= flat(data.x_train)
    assert not flat(a.x_val) & flat(a.x_train) - flat(data.x_test)
    assert torch.equal(a.x_test, data.x_test) and torch.equal(a.y_test, data.y_test)
    # the run's view: the subset first, then the split, seeded by the run's seed
    view = train_view(_tiny(), data)
    assert len(view.x_train) + len(view.x_val) == 400 and len(view.x_val) == 100
    with pytest.raises(JeatError, match="validation share"):
        split_validation(data, 1.0, seed=0)


def test_keep_best_needs_a_validation_split_and_bad_values_are_refused():
    with pytest.raises(JeatError, match="data.val_split"):
        load_config("digits-pgdat", ["keep=best"])
    with pytest.raises(JeatError, match="keep must be last or best"):
        load_config("digits-pgdat", ["keep=first"])
    with pytest.raises(JeatError, match="ema must be a decay"):
        load_config("digits-pgdat", ["ema=1.5"])
    with pytest.raises(JeatError, match="val_split"):
        load_config("digits-pgdat", ["data.val_split=1"])


def test_weight_average_follows_its_formula():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    avg = WeightAverage(net, decay=0.9)
    start = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    avg.update(net, step=100)  # d = min(0.9, 101 / 110) = 0.9
    for a, s, p in zip(avg.module.parameters(), start, net.parameters(), strict=True):
        assert torch.allclose(a, 0.9 * s + 0.1 * p)
    avg.update(net, step=0)  # early steps follow the weights: d = 1 / 10
    for a, p in zip(avg.module.parameters(), net.parameters(), strict=True):
        assert not a.requires_grad
        assert torch.allclose(a, 0.1 * (0.9 * (p - 1) + 0.1 * p) + 0.9 * p)


def test_keep_best_saves_the_best_validation_epoch_and_says_why(tmp_path):
    run = train_and_finish(_tiny(["keep=best", "ema=0.9"]), tmp_path / "r")
    paths = RunPaths(tmp_path / "r")
    rows = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    assert all("val_pgd_acc" in r and "val_clean_acc" in r for r in rows)
    assert not any("test_pgd_acc" in r for r in rows)  # eval.epoch_n=0: no test check
    values = [r["val_pgd_acc"] for r in rows]
    best_epoch = max(range(len(values)), key=lambda i: (values[i], i)) + 1  # ties: the later
    kept = json.loads(paths.run_info.read_text())["kept"]
    assert kept["keep"] == "best" and kept["epoch"] == best_epoch
    assert kept["value"] == pytest.approx(max(values)) and kept["val_size"] == 100
    assert f"epoch {best_epoch} of 4" in kept["why"] and "weight average" in kept["why"]
    model = load_checkpoint(paths.model)
    best = load_checkpoint(paths.best)
    assert model["kept"] == kept and best["epoch"] == best_epoch
    for k, v in model["model_state"].items():
        assert torch.equal(v, best["model_state"][k])
        assert torch.equal(run.model.state_dict()[k], v)
    # the report says so, and draws the validation curves
    from jeat.report import write_report

    page = write_report(paths.root).read_text()
    assert f"epoch {best_epoch} of 4: the best validation PGD-3 accuracy" in page
    # the checkpoint holds the raw weights and the average apart
    last = load_checkpoint(paths.checkpoint)
    assert any(
        not torch.equal(last["model_state"][k], last["ema_state"][k]) for k in last["ema_state"]
    )


def test_ema_and_keep_best_resume_exactly(tmp_path):
    cfg = _tiny(["keep=best", "ema=0.9"])
    whole = train_and_finish(cfg, tmp_path / "whole")
    train_and_finish(cfg, tmp_path / "part", stop_after=2)
    part = train_and_finish(cfg, tmp_path / "part", resume=True)
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, part.model.state_dict()[k])
    kept = [json.loads((tmp_path / r / "run.json").read_text())["kept"] for r in ("whole", "part")]
    assert kept[0] == kept[1]


def test_keep_last_with_ema_saves_the_average(tmp_path):
    train_and_finish(_tiny(["ema=0.9", "data.val_split=0"]), tmp_path / "r")
    paths = RunPaths(tmp_path / "r")
    model, last = load_checkpoint(paths.model), load_checkpoint(paths.checkpoint)
    assert model["kept"]["keep"] == "last" and model["kept"]["epoch"] == 4
    assert not paths.best.exists()
    for k, v in model["model_state"].items():
        assert torch.equal(v, last["ema_state"][k])
