import json
import signal
import subprocess
import sys

import pytest
import torch
from conftest import FAST

from jeat import JeatError
from jeat.checkpoint import load_checkpoint
from jeat.config import load_config
from jeat.finish import train_and_finish
from jeat.runs import RunPaths, load_trained
from jeat.train import lr_factor


def _tiny(extra=()):
    """A run of a few seconds: narrow CNN, PGD-3, 4 epochs of 400 images."""
    return load_config(
        "digits-pgdat",
        [
            "model.options.width=8",
            "objective.attack.steps=3",
            "epochs=4",
            "data.train_subset=400",
            *FAST,
            *extra,
        ],
    )


def _states_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_same_seed_same_weights_and_metrics_are_written(tmp_path):
    a = train_and_finish(_tiny(), tmp_path / "a")
    b = train_and_finish(_tiny(), tmp_path / "b")
    assert _states_equal(a.model.state_dict(), b.model.state_dict())
    rows = [
        json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert {"train_loss", "train_acc", "lr", "epoch_seconds"} <= set(rows[0])
    c = train_and_finish(_tiny(["seed=1"]), tmp_path / "c")
    assert not _states_equal(a.model.state_dict(), c.model.state_dict())


KILL_ARGS = [
    "--set", "model.options.width=8", "--set", "objective.attack.steps=3",
    "--set", "data.train_subset=200", "--epochs", "3", "--quiet",
    "--set", "checkpoint_every_steps=3", "--set", "final_eval=false",
    "--set", "final_samples=false", "--set", "eval.epoch_n=0",
    "--set", "final_analysis=false", "--set", "final_scores=false",
    "--set", "final_report=false", "--set", "tensorboard=false",
]  # fmt: skip

# `jeat train` that sends itself SIGNAL in the middle of writing its second checkpoint (half of
# it is in the temporary file): at the same point of the run whatever the machine's load
_KILLED_MID_WRITE = """
import os, signal, sys
# a shell without job control starts background jobs with SIGINT ignored, and Python then
# installs no KeyboardInterrupt handler: restore the terminal's Ctrl-C whatever started us
signal.signal(signal.SIGINT, signal.default_int_handler)
import jeat.train
from jeat.checkpoint import save_checkpoint
from jeat.utils import atomic_save

sig, calls = int(sys.argv[1]), []

def save(path, payload):
    if os.path.basename(path) == "last.pt":
        calls.append(path)
        if len(calls) == 2:
            def half(fh):
                fh.write(b"half a checkpoint")
                fh.flush()
                os.kill(os.getpid(), sig)
            atomic_save(path, half)
    return save_checkpoint(path, payload)

jeat.train.save_checkpoint = save
from jeat.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from jeat.cli import main

    ref = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(["train", *KILL_ARGS, "--out", str(ref)]) == 0
    return ref


@pytest.mark.parametrize(
    "sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"]
)
def test_killed_run_resumes_to_identical_weights(tmp_path, capsys, uninterrupted, sig):
    """A real signal mid-training (SIGKILL, SIGTERM, Ctrl-C's SIGINT), sent by the run itself
    halfway through writing its second checkpoint, then --resume: the same final weights as an
    uninterrupted run. 4 steps an epoch and a checkpoint every 3 steps and at each epoch's end,
    so the first checkpoint is mid-epoch 1 and the run resumes from there. A kill leaves the
    temporary file and the run folder's lock file behind: neither blocks the resume. Ctrl-C
    removes both and says how to go on (exit 130)."""
    from jeat.cli import main

    run = tmp_path / "killed"
    r = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_WRITE, str(int(sig)), "train", *KILL_ARGS,
         "--out", str(run)],
        capture_output=True, text=True,
    )  # fmt: skip
    left = sorted(p.name for p in run.rglob("*"))
    if sig == signal.SIGINT:
        assert r.returncode == 130, r.stderr
        assert r.stderr.strip().splitlines()[-1] == (
            "jeat: interrupted; a training run continues with --resume"
        )
        assert not [f for f in left if f.endswith(".tmp") or f == ".lock"]
    else:
        assert r.returncode == -sig, r.stderr
        assert [f for f in left if f.endswith(".tmp")] and ".lock" in left
    assert not RunPaths(run).model.exists()
    state = load_checkpoint(RunPaths(run).checkpoint)  # the atomic write left a whole file
    assert (state["epoch"], state["step"]) == (0, 3)

    capsys.readouterr()
    assert main(["train", *KILL_ARGS, "--out", str(run)]) == 2  # refuses to overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(["train", *KILL_ARGS, "--out", str(run), "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    a, _, _ = load_trained(uninterrupted)
    b, _, _ = load_trained(run)
    assert _states_equal(a.state_dict(), b.state_dict())
    assert not list(run.rglob("*.tmp")) and not (run / ".lock").exists()
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3]


def test_stop_after_then_resume_equals_an_uninterrupted_run(tmp_path):
    """``stop_after`` keeps the whole run's schedule: epoch by epoch it ends where one call
    does, and a stopped run has a checkpoint but no model.pt (the final steps did not run)."""
    whole = train_and_finish(_tiny(), tmp_path / "whole")
    part = train_and_finish(_tiny(), tmp_path / "part", stop_after=1)
    assert [r["epoch"] for r in part.metrics] == [1] and part.eval is None
    paths = RunPaths(tmp_path / "part")
    assert paths.checkpoint.exists() and not paths.model.exists()
    assert load_checkpoint(paths.checkpoint)["epoch"] == 1
    part = train_and_finish(_tiny(), tmp_path / "part", resume=True, stop_after=3)
    assert part.resumed_from_epoch == 1 and [r["epoch"] for r in part.metrics] == [1, 2, 3]
    assert not paths.model.exists()
    done = train_and_finish(
        _tiny(), tmp_path / "part", resume=True, stop_after=9
    )  # past the end: finish
    assert paths.model.exists() and [r["epoch"] for r in done.metrics] == [1, 2, 3, 4]
    assert _states_equal(whole.model.state_dict(), done.model.state_dict())
    rows = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    lr = [json.loads(x)["lr"] for x in rows]
    assert [r["lr"] for r in done.metrics] == lr
    for bad in (0, -1, 1.5, True):
        with pytest.raises(JeatError, match="stop_after must be an epoch number"):
            train_and_finish(_tiny(), tmp_path / "bad", stop_after=bad)
    assert not (tmp_path / "bad").exists()


def test_resume_with_changed_settings_is_refused(tmp_path):
    train_and_finish(_tiny(["epochs=1"]), tmp_path / "r")
    with pytest.raises(JeatError, match="different config.*optim"):
        train_and_finish(_tiny(["epochs=2", "optim.lr=0.5"]), tmp_path / "r", resume=True)
    # extending the number of epochs is allowed
    res = train_and_finish(_tiny(["epochs=2"]), tmp_path / "r2")
    assert res.resumed_from_epoch is None


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    cfg = _tiny(["optim.name=sgd", "optim.lr=1e12", "optim.momentum=0", "schedule.warmup_steps=0"])
    with pytest.raises(
        JeatError,
        match="training diverged.*the loss is (nan|inf).*did not recover.*lower optim.lr",
    ):
        train_and_finish(cfg, tmp_path / "nan")


def test_errors_before_any_file_is_written(tmp_path):
    out = tmp_path / "never"
    for overrides, message in (
        (["data.name=imagenet-9"], "unknown dataset"),
        (["model.name=vit"], "unknown model"),
        (["objective.name=magic"], "unknown objective"),
        (["model.options.depth=3"], "does not take option"),
        (["optim.name=lbfgs"], "unknown optimizer"),
        (["data.name=mnist", f"data.root={tmp_path / 'empty'}"], "download"),
    ):
        with pytest.raises(JeatError, match=message):
            train_and_finish(_tiny(overrides), out)
        assert not out.exists()


def test_corrupt_or_mismatched_checkpoints_fail_clearly(tmp_path):
    res = train_and_finish(_tiny(["epochs=1"]), tmp_path / "ok")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(RunPaths(res.paths.root).model.read_bytes()[:500])
    with pytest.raises(JeatError, match="corrupt"):
        load_trained(bad)
    junk = tmp_path / "junk.pt"
    torch.save({"hello": torch.zeros(1)}, junk)
    with pytest.raises(JeatError, match="not a jeat checkpoint"):
        load_trained(junk)
    # a checkpoint whose metadata names another architecture than its weights
    payload = load_checkpoint(res.paths.model)
    payload["meta"]["model_options"]["width"] = 16
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(JeatError, match="does not match this architecture"):
        load_trained(tmp_path / "other.pt")


def test_lr_schedules():
    cfg = load_config("digits-pgdat", ["schedule.name=cosine", "schedule.warmup_steps=10"])
    assert lr_factor(cfg, 0, 100) == pytest.approx(0.1)
    assert lr_factor(cfg, 10, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 99, 100) < 0.01
    ms = load_config("digits-pgdat", ["schedule.name=multistep", "schedule.warmup_steps=0"])
    assert [lr_factor(ms, s, 100) for s in (0, 50, 80)] == pytest.approx([1, 0.1, 0.01])


def test_amsgrad_and_sgd_options_build(tmp_path):
    res = train_and_finish(_tiny(["epochs=1", "optim.amsgrad=true"]), tmp_path / "ams")
    state = load_checkpoint(res.paths.checkpoint)["optimizer_state"]
    assert state["param_groups"][0]["amsgrad"] is True


def test_warm_start_copies_weights_and_checks_the_architecture(tmp_path):
    source = train_and_finish(_tiny(["epochs=1"]), tmp_path / "src")
    warm = train_and_finish(
        _tiny(["epochs=1", "optim.lr=1e-12", f"model.init_from={tmp_path / 'src'}"]),
        tmp_path / "warm",
    )
    cold = train_and_finish(_tiny(["epochs=1", "optim.lr=1e-12", "seed=1"]), tmp_path / "cold")
    a, b = source.model.state_dict(), warm.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    c = cold.model.state_dict()
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    with pytest.raises(JeatError, match="init_from.*width"):
        train_and_finish(
            _tiny(["model.options.width=16", f"model.init_from={tmp_path / 'src'}"]),
            tmp_path / "bad",
        )
    assert not (tmp_path / "bad").exists()
    with pytest.raises(JeatError, match="does not exist"):
        train_and_finish(_tiny(["model.init_from=/no/such/run"]), tmp_path / "bad2")
