"""Data-parallel training under torchrun (two gloo processes on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from jeat import JeatError
from jeat.config import load_config
from jeat.distributed import DistContext, from_env, shard
from jeat.runs import load_trained
from jeat.train import _check_shards

QUIET = [
    "--quiet", "--set", "final_eval=false", "--set", "final_samples=false",
    "--set", "final_analysis=false", "--set", "final_scores=false",
    "--set", "final_report=false", "--set", "model.options.width=8",
    "--set", "objective.attack.steps=3", "--set", "data.train_subset=400",
]  # fmt: skip


def _train(out, *args, procs: int = 1, resume: bool = False):
    cmd = [sys.executable, "-m", "jeat.cli", "train", *QUIET, *map(str, args), "--out", str(out)]
    if resume:
        cmd.append("--resume")
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*launcher, f"--nproc_per_node={procs}", *cmd[1:]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _max_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def compare_one_and_two_processes(
    tmp_path, device: str = "cpu", tol: float = 1e-5, points: float = 0.0, extra: tuple = ()
) -> None:
    """PGD-AT without random start and without augmentation is deterministic, so two ranks that
    each take half of every global batch must reach the one-process weights up to float
    summation order (``tol``, relative to the largest weight and to the loss), with accuracies
    within ``points``. 400 images in batches of 64 end with a batch of 16 (8 per rank). gloo on
    the CPU, NCCL on CUDA; ``extra`` adds command-line arguments."""
    args = ["--epochs", "2", "--set", "objective.attack.random_start=false",
            "--set", "data.augment=false", "--set", "eval.epoch_n=50",
            "--device", device, *extra]  # fmt: skip
    _train(tmp_path / "one", *args)
    r = _train(tmp_path / "two", *args, procs=2)
    assert r.stdout.count("run folder:") == 1  # rank 0 alone reports and writes
    one, _, _ = load_trained(tmp_path / "one")
    two, _, _ = load_trained(tmp_path / "two")
    scale = max(float(p.abs().max()) for p in one.parameters())
    assert _max_diff(one, two) <= tol * scale
    m1, m2 = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["step"] for m in m2] == [m["step"] for m in m1] == [7, 14]
    for a, b in zip(m1, m2, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=tol)  # reduced over ranks
        assert b["train_acc"] == pytest.approx(a["train_acc"], abs=max(points, 1e-6))
        assert abs(b["test_clean_acc"] - a["test_clean_acc"]) <= points
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["world_size"] == 2


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    compare_one_and_two_processes(tmp_path)


def test_per_rank_replay_buffers_are_checkpointed_and_resume_exactly(tmp_path):
    """JEAT on two ranks: each rank runs its own SGLD chains; the checkpoint holds both buffers,
    a resume gives each rank its own back (so resumed = uninterrupted, bit for bit), and a
    resume with another process count is refused."""
    args = ["--config", "digits-jeat-ce", "--set", "eval.epoch_n=0",
            "--set", "objective.options.buffer_size=200"]  # fmt: skip
    _train(tmp_path / "full", *args, "--epochs", "2", procs=2)
    _train(tmp_path / "cut", *args, "--epochs", "1", procs=2)
    state = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["objective_states"]) == 2
    b0, b1 = (s["buffer"]["x"] for s in state["objective_states"])
    assert b0.shape == b1.shape == (200, 1, 8, 8) and not torch.equal(b0, b1)

    cmd = [sys.executable, "-m", "jeat.cli", "train", *QUIET, *args, "--epochs", "2",
           "--out", str(tmp_path / "cut"), "--resume"]  # fmt: skip
    single = subprocess.run(cmd, capture_output=True, text=True)
    assert single.returncode == 2
    assert "replay buffers of 2 process(es); resume with 2" in single.stderr

    r = _train(tmp_path / "cut", *args, "--epochs", "2", procs=2, resume=True)
    assert r.stdout.count("resuming") == 1
    full, _, _ = load_trained(tmp_path / "full")
    cut, _, _ = load_trained(tmp_path / "cut")
    assert _max_diff(full, cut) == 0.0
    assert [m["epoch"] for m in _metrics(tmp_path / "cut")] == [1, 2]


def test_shards_split_every_global_batch_and_small_batches_are_refused():
    idx = torch.arange(10)
    parts = [shard(idx, DistContext(r, 3)).tolist() for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert shard(idx, DistContext()).tolist() == idx.tolist()
    cfg = load_config("digits-pgdat", ["batch_size=64"])
    _check_shards(cfg, 1437, DistContext(0, 8))  # last batch: 29 images for 8 ranks
    with pytest.raises(JeatError, match="leaves a batch of 5 for 8 processes"):
        _check_shards(cfg, 64 * 3 + 5, DistContext(0, 8))


def test_the_job_layout_comes_from_torchrun_variables(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert from_env() == DistContext()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = from_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (3, 4, 1, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(JeatError, match=r"RANK=4 is not in \[0, WORLD_SIZE=4\)"):
        from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(JeatError, match="RANK='x' is not an integer"):
        from_env()


_LEAVE = """
import atexit, sys
from jeat.cli import main
atexit.register(lambda: print("interpreter shutdown ran"))
main(sys.argv[1:])
print("main returned")
"""


@pytest.mark.parametrize(
    "world, args, code", [("2", ["datasets"], 0), ("2", ["eval", "no-such-run"], 2)]
)
def test_a_torchrun_process_leaves_with_its_code_and_without_the_shutdown(world, args, code):
    """Under torchrun (WORLD_SIZE > 1) the command's output is flushed and the process ends
    with the command's exit code, skipping the interpreter's shutdown (where rare C++ aborts
    came from); a plain process returns from main() as usual."""
    env = {**os.environ, "WORLD_SIZE": world, "RANK": "1", "LOCAL_RANK": "1"}
    r = subprocess.run([sys.executable, "-c", _LEAVE, *args], env=env, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == code, r.stderr[-2000:]
    assert "main returned" not in r.stdout and "interpreter shutdown ran" not in r.stdout
    if code == 0:
        assert "digits" in r.stdout  # flushed before leaving
    else:
        assert "jeat: error:" in r.stderr
    env["WORLD_SIZE"], env["RANK"], env["LOCAL_RANK"] = "1", "0", "0"
    r = subprocess.run([sys.executable, "-c", _LEAVE, *args], env=env, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert "main returned" in r.stdout and "interpreter shutdown ran" in r.stdout


@pytest.mark.parametrize("mode", ["cascade", "independent"])
def test_two_processes_evaluate_the_same_points_as_one(tmp_path, pgdat_run, mode):
    """torchrun ... -m jeat.cli eval shards the test points (every other batch) and gathers
    the per-point outcomes: the same per-point file and table as one process."""
    args = ["eval", str(pgdat_run), "--attacks", "clean,fgsm,pgd10,cw10", "--points", "100",
            "--batch-size", "16", "--seed", "5", "--mode", mode, "--quiet"]  # fmt: skip
    one = [sys.executable, "-m", "jeat.cli", *args]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "jeat.cli", *args]  # fmt: skip
    for name, cmd in (("one", one), ("two", two)):
        out = [
            "--out",
            str(tmp_path / f"{name}.json"),
            "--per-point",
            str(tmp_path / f"{name}.csv"),
        ]
        r = subprocess.run([*cmd, *out], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    a, b = (tmp_path / "one.csv").read_text(), (tmp_path / "two.csv").read_text()
    assert a == b and len(a.splitlines()) == 101
    rows = [json.loads((tmp_path / f"{n}.json").read_text())["attacks"] for n in ("one", "two")]
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in rs] for rs in rows]
    assert strip[0] == strip[1]
    assert any(r["broken"] > 0 for r in rows[0][1:])  # the attacks broke points
