"""The benchmark scripts run: their smoke modes on the CPU, each writing results.json and
table.md. What they measure is reported by the scripts, not asserted here (speed targets live in
benchmarks/); these tests keep the scripts that a GPU session will run from breaking unseen."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(
    cmd: list[str], tmp_path: Path, timeout: int = 1800, python: str = sys.executable
) -> subprocess.CompletedProcess:
    """Run a script to its end and check it succeeded. ``timeout`` only stops a hung script:
    nothing here depends on how long a script takes (the machine may be loaded)."""
    # scripts that start python (device_check.sh: $PYTHON) use the interpreter of the tests
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHON": python}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _outputs(out: Path) -> dict:
    assert (out / "table.md").read_text().strip()
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("script", ["attack_throughput", "scaling", "train_throughput"])
def test_quick_benchmark_writes_its_results(tmp_path, script):
    out = tmp_path / script
    cmd = [sys.executable, str(BENCH / f"{script}.py"), "--quick", "--device", "cpu"]
    _run([*cmd, "--out", str(out)], tmp_path)
    results = _outputs(out)
    assert results["device"] == "cpu" and results["memory_metric"]
    if script == "train_throughput":
        for row in results["rows"]:
            assert row["images_per_s"] > 0 and row["flops_per_image"] > 0
            assert row["mfu"] is None  # no known peak on a CPU


def test_fast_path_reports_speed_accuracy_and_model_flops(tmp_path):
    out = tmp_path / "fast"
    cmd = [sys.executable, str(BENCH / "fast_path.py"), "--quick", "--device", "cpu",
           "--budget-s", "60", "--train-size", "640", "--out", str(out)]  # fmt: skip
    _run(cmd, tmp_path)
    results = _outputs(out)
    assert results["train_images"] == 640
    assert results["epochs_from_budget"]["second_call_s"].keys() == {"fp32 eager", "fast"}
    assert results["flops_per_image"] > 0 and results["peak_flops"] is None
    for row in results["rows"]:
        assert row["achieved_flops"] > 0 and row["mfu"] is None
        assert 0 <= row["pgd20_acc"] <= row["clean_acc"] <= 100
    assert results["pgd20_gap_points"] >= 0


def test_memory_estimate_measures_and_writes_the_measurement_into_its_table(tmp_path):
    out = tmp_path / "memory"
    cmd = [sys.executable, str(BENCH / "memory_estimate.py"), "--depth", "10", "--widen", "1",
           "--batch", "8", "--buffer-size", "100", "--train-images", "100", "--measure",
           "--device", "cpu", "--out", str(out)]  # fmt: skip
    _run(cmd, tmp_path)
    results = _outputs(out)
    rows = results["by_precision"]
    for amp in ("fp32", "bf16"):
        r = rows[amp]
        assert r["estimated_peak_GB"] - r["without_training_set_GB"] == pytest.approx(
            r["training_set_GB"]
        )
    measured = results["measured"]
    assert [m["amp"] for m in measured] == ["fp32", "bf16"]
    assert all(m["estimated_GB"] > 0 for m in measured)
    assert (out / "table.md").read_text().count("measured on cpu") == 2


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_device_check_writes_a_summary_and_packs_it(tmp_path):
    """The GPU check's plumbing on the CPU: the chosen steps run, the summary names each
    step's exit status, --pack leaves the summary and one tarball. The budget (hours) is far
    beyond what these steps take on any machine, however loaded: what a step's limit does is
    the next test's, with a step that never ends."""
    out = tmp_path / "check"
    cmd = ["bash", str(BENCH / "device_check.sh"), "--device", "cpu", "--only", "env,tests",
           "--budget-s", "100000", "--out", str(out), "--pack"]  # fmt: skip
    _run(cmd, tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["device_check.tar.gz", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "## env: exit 0" in summary and "## tests: exit 0" in summary
    if not torch.cuda.is_available():
        assert "needs a CUDA device" in summary  # the CUDA tests skip here, saying why


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_device_check_stops_a_step_at_its_limit_and_says_so(tmp_path):
    """A step that never ends (its python sleeps) is stopped at its limit, whatever the load,
    the summary says so, and the check still packs what it has."""
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\n[ "$1" = -m ] && exit 0  # pip: nothing to install\nsleep 600\n')
    python.chmod(0o755)
    out = tmp_path / "check"
    cmd = ["bash", str(BENCH / "device_check.sh"), "--device", "cpu", "--only", "env",
           "--budget-s", "2", "--out", str(out), "--pack"]  # fmt: skip
    _run(cmd, tmp_path, python=str(python))
    assert sorted(p.name for p in out.iterdir()) == ["device_check.tar.gz", "summary.md"]
    assert "## env: exit 124 (stopped at its 2s limit)" in (out / "summary.md").read_text()


def test_eval_cost_counts_each_variants_work_and_the_bound_below_it(monkeypatch):
    """eval_cost's work counts: a full-batch run carries points x steps gradient rows per run,
    the active set carries fewer, and the work bound (robust points x restarts x steps) is at
    most what the active set did; the batch part times a row-step at every batch size."""
    pytest.importorskip("torchattacks")
    monkeypatch.syspath_prepend(str(BENCH))
    import eval_cost

    from jeat.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn", in_channels=1, num_classes=10, width=4).eval()
    x = torch.rand(24, 1, 8, 8)
    with torch.no_grad():  # half the points labelled as predicted: some survive a weak attack
        y = model(x).argmax(1)
    y[12:] = (y[12:] + 1) % 10
    one = eval_cost.active_vs_torchattacks(model, x, y, 0.01, steps=4, restarts=1, repeats=1)
    assert one["gradient_rows"]["torchattacks"] == one["gradient_rows"]["ours_full_batch"] == 96
    assert one["gradient_rows"]["ours"] < 96  # the 12 misclassified points leave at step 1
    many = eval_cost.active_vs_torchattacks(model, x, y, 0.01, steps=4, restarts=3, repeats=1)
    assert many["gradient_rows"]["torchattacks_3_runs"] == 3 * 96
    for r in (one, many):
        assert r["robust_points_ours"] > 0
        assert r["work_bound_to_torchattacks"] <= r["work_ratios_to_torchattacks"]["ours"] <= 1
    batch = eval_cost.batch_part([("tiny", model, x)], repeats=1)
    assert set(batch["tiny"]["seconds_per_row_step"]) == {16, 64, 256, 1024}
    assert "| tiny |" in eval_cost.batch_table(batch)


def test_frontier_smoke_trains_the_plain_loop_at_the_recipes_budget(tmp_path):
    out = tmp_path / "frontier"
    cmd = [sys.executable, str(BENCH / "frontier.py"), "--budget", "smoke", "--out", str(out),
           "--work", str(tmp_path / "work"), "--threads", "1"]  # fmt: skip
    r = _run(cmd, tmp_path)
    results = _outputs(out)
    cells = results["cells"]
    # per seed at the full budget: both jeat recipes and the plain loop; seed 0 at half budget
    keys = {(c["recipe"], c["fraction"], c["seed"]) for c in cells}
    for recipe in ("pgd-at", "jeat", "plain"):
        assert {(recipe, 1.0, 0), (recipe, 1.0, 1), (recipe, 0.5, 0)} <= keys
    budget = {c["seed"]: c["train_seconds"] for c in cells if c["recipe"] == "pgd-at"
              and c["fraction"] == 1.0}  # fmt: skip
    for c in cells:
        assert 0 <= c["worst_case"] <= c["pgd20"] <= c["clean"] <= 100
        assert c["worst_case"] <= c["autoattack_fast"] and c["n_test"] == 24
        if c["recipe"] == "plain":
            # the plain loop gets the pgd-at recipe's seconds of the same seed (a fraction of
            # them at the smaller budget) and stops at the first epoch end past it (less half
            # an epoch)
            want = budget[c["seed"]] * c["fraction"]
            assert c["budget_seconds"] == pytest.approx(want)
            assert c["train_seconds"] >= want - c["last_epoch_seconds"] / 2
    diff = results["summary"]["digits"]["best_minus_plain"]
    assert diff["b"] == "plain" and diff["n"] == 2 and diff["low"] <= diff["mean"] <= diff["high"]
    assert "the plain loop, worst case" in r.stdout
    assert (out / "frontier-digits.png").stat().st_size > 0
    # a second run resumes every cell from its cell.json
    again = _run(cmd, tmp_path)
    lines = [ln for ln in again.stdout.splitlines() if ln.startswith("cells/")]
    assert len(lines) == len(cells) and all(ln.endswith("(reused)") for ln in lines)
    assert _outputs(out)["cells"] == cells
