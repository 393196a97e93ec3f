"""The CUDA paths: checks that need a GPU, skipped (with the reason) where there is none.

CI has no GPU, so on CI every test here reports a skip; ``benchmarks/device_check.sh`` runs
this file on a GPU machine. The CPU-side checks of the same code (the sync spy, bf16 autocast,
channels-last, compile) are in ``tests/test_accel.py``; these add what only a device shows:
that CUDA's own sync detector stays silent in the attack and sampler loops, that a training
step of every objective waits for the device once, that the training set lives on the device
(or travels through pinned memory), that the fast path trains on the device as well as fp32
does, that evaluation on the device agrees with the CPU, and (two GPUs) NCCL training.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import FAST

from jeat.accel import resolve_amp
from jeat.attacks import PGD, L2Ball, LinfBall
from jeat.config import load_config
from jeat.energy import (
    cross_entropy_from_logits,
    joint_energy_from_logits,
    margin_from_logits,
    marginal_energy_from_logits,
)
from jeat.evaluate import evaluate
from jeat.finish import train_and_finish
from jeat.models import create_model
from jeat.samplers import SGLD, SeededDescent
from jeat.train import _Batches

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)"
)

CUDA = torch.device("cuda")


def _net(channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(
        "small_cnn", in_channels=channels, num_classes=10, mean=[0.5] * channels,
        std=[0.5] * channels, width=8,
    ).to(CUDA).eval()  # fmt: skip


LOOPS = {
    "PGD L-inf": lambda m, x, y: PGD(LinfBall(0.2), 5)(m, x, y, check=False),
    # the full-batch path; the active set (compactions read a count) is checked below
    "PGD L2, first success kept": lambda m, x, y: PGD(
        L2Ball(1.0), 5, keep_success=True, active_set=False
    )(m, x, y, check=False),
    "SGLD on E(x)": lambda m, x, y: SGLD(5)(m, x),
    "SGLD on E(x, y)": lambda m, x, y: SGLD(5)(m, x, y),
    "seeded descent": lambda m, x, y: SeededDescent(steps=5)(m, x, y),
}


@pytest.mark.parametrize("amp", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(LOOPS))
def test_cuda_sync_detector_stays_silent_in_attack_and_sampler_loops(name, amp):
    """``torch.cuda.set_sync_debug_mode('error')`` raises at any call that makes the host wait
    for the device (a read of a value, a size known only after a device read). Nothing in the
    loops may do so, in fp32 or under the training step's bf16 autocast."""
    model = _net()
    x = torch.rand(32, 1, 8, 8, device=CUDA)
    y = torch.randint(0, 10, (32,), device=CUDA)
    dtype = resolve_amp(amp, CUDA)
    run = LOOPS[name]

    def call():
        if dtype is None:
            return run(model, x, y)
        with torch.autocast("cuda", dtype=dtype):
            return run(model, x, y)

    call()  # warm-up: library handles and allocator pools are set up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == x.shape and out.device.type == "cuda"
    assert out.dtype == torch.float32  # the iterate stays fp32 under autocast
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_cuda_energies_are_fp32_under_bf16_autocast():
    model = _net()
    x, y = torch.rand(16, 1, 8, 8, device=CUDA), torch.randint(0, 10, (16,), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
        assert logits.dtype == torch.bfloat16  # the network itself runs in bf16
        for energy in (
            marginal_energy_from_logits(logits),
            joint_energy_from_logits(logits, y),
            cross_entropy_from_logits(logits, y),
            margin_from_logits(logits, y),
        ):
            assert energy.dtype == torch.float32


def test_cuda_training_set_lives_on_the_device_or_travels_pinned(digits, monkeypatch):
    on_device = _Batches(digits, CUDA)
    assert not on_device.pinned and on_device.x.device.type == "cuda"
    # too little free memory: batches are gathered on the host, pinned and copied
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 1))
    pinned = _Batches(digits, CUDA)
    assert pinned.pinned and pinned.x.device.type == "cpu"
    idx = torch.randperm(len(digits.x_train))[:64]
    xa, ya = on_device.get(idx)
    xb, yb = pinned.get(idx)
    torch.cuda.synchronize()
    assert xa.device.type == xb.device.type == "cuda"
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _syncs(fn) -> int:
    """How many times ``fn`` makes the host wait for the device (CUDA's sync detector)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(w.message) for w in seen)


@pytest.mark.parametrize("threat", [LinfBall(0.2), L2Ball(1.0)])
def test_cuda_active_set_waits_for_the_device_only_at_compactions(threat):
    """The evaluation PGD's active set compacts every 5 steps on CUDA: 20 steps are 4
    compactions, each with one host read (a few at most), never one per step; and it returns
    what the full-batch attack returns."""
    model = _net()
    x = torch.rand(64, 1, 8, 8, device=CUDA)
    y = torch.randint(0, 10, (64,), device=CUDA)
    attack = PGD(threat, 20, keep_success=True)
    assert attack.uses_active_set

    def run(a):
        return a(model, x, y, generator=torch.Generator(CUDA).manual_seed(0), check=False)

    run(attack)  # warm-up
    assert _syncs(lambda: run(attack)) <= 2 * (20 // 5)
    full = run(PGD(threat, 20, keep_success=True, active_set=False))
    with torch.no_grad():
        fooled_active = (model(run(attack)).argmax(1) != y).sum()
        fooled_full = (model(full).argmax(1) != y).sum()
    assert abs(int(fooled_active) - int(fooled_full)) <= 1


@pytest.mark.parametrize("config", ["standard", "pgdat", "trades", "jem", "jeat"])
def test_cuda_training_step_waits_for_the_device_once(tmp_path, digits, config):
    """A training step reads its loss, accuracy and energies back in one small tensor (for the
    log and the divergence check) and waits for the device nowhere else, JEM's and JEAT's
    replay-buffer draws and write-backs included: the syncs of a run of 4 steps and one of 2
    steps differ by 2 x 1. (The epoch's checkpoint and metrics add their own, equal in both
    runs.)"""

    def run(name, images):
        cfg = load_config(
            f"digits-{config}",
            [*FAST, "device=cuda", "epochs=1", f"data.train_subset={images}", "batch_size=64"],
        )  # fmt: skip
        train_and_finish(cfg, tmp_path / name, data=digits)

    run("warm-up", 128)  # one-time set-up (library handles, allocator pools) outside the count
    two, four = _syncs(lambda: run("two", 128)), _syncs(lambda: run("four", 256))
    assert (four - two) / 2 == 1, (two, four)


def _train(tmp_path, name, digits, perf):
    cfg = load_config(
        "digits-pgdat",
        [*FAST, "device=cuda", "epochs=8", "eval.epoch_n=360", "eval.epoch_steps=0", *perf],
    )
    return train_and_finish(cfg, tmp_path / name, data=digits)


def test_cuda_fast_path_trains_as_well_as_fp32_and_saves_plain_fp32_weights(tmp_path, digits):
    """PGD-AT on the digits on the device: fp32 eager against the fast path (bf16 autocast,
    channels-last, torch.compile). Both must learn; the fast one to within 3 points of fp32."""
    eager = _train(
        tmp_path, "eager", digits,
        ["perf.amp=fp32", "perf.channels_last=false", "perf.compile=false"],
    )  # fmt: skip
    fast = _train(
        tmp_path, "fast", digits,
        ["perf.amp=bf16", "perf.channels_last=true", "perf.compile=true"],
    )  # fmt: skip
    a, b = eager.model.state_dict(), fast.model.state_dict()
    assert a.keys() == b.keys()  # no "_orig_mod." prefixes
    assert all(v.dtype == torch.float32 for v in b.values())
    acc32, acc16 = eager.metrics[-1]["test_clean_acc"], fast.metrics[-1]["test_clean_acc"]
    assert acc32 > 80 and acc16 >= acc32 - 3, (acc32, acc16)


def test_cuda_evaluation_agrees_with_the_cpu(pgdat_model, digits):
    """The same trained model and attack seed on the CPU and on the device: clean accuracy
    within two images (cuDNN convolutions run in TF32 by default), PGD-20 within 2 points (the
    random starts come from each device's own generator)."""
    x, y = digits.x_test[:360], digits.y_test[:360]
    cpu = evaluate(pgdat_model.cpu(), x, y, ["clean", "pgd20"], LinfBall(0.2), mode="independent")
    gpu_model = pgdat_model.to(CUDA)
    try:
        gpu = evaluate(gpu_model, x, y, ["clean", "pgd20"], LinfBall(0.2), mode="independent")
    finally:
        pgdat_model.cpu()  # the fixture is shared with CPU tests
    acc_cpu = {r.attack: r.accuracy for r in cpu.rows}
    acc_gpu = {r.attack: r.accuracy for r in gpu.rows}
    assert abs(acc_cpu["clean"] - acc_gpu["clean"]) <= 0.6  # TF32 convolutions: two images
    assert abs(acc_cpu["pgd20"] - acc_gpu["pgd20"]) <= 2.0, (acc_cpu, acc_gpu)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices for NCCL")
def test_cuda_two_nccl_processes_match_one_process(tmp_path, monkeypatch):
    """The gloo test of tests/test_distributed.py with NCCL on two GPUs, in fp32 (no bf16
    autocast, no TF32, no cuDNN autotuning: per-rank batches of half the size would round
    differently); cuDNN may still sum in another order for another batch size, hence the
    looser tolerance."""
    from test_distributed import compare_one_and_two_processes

    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")  # read by cuBLAS and cuDNN in the children
    fp32 = ("--set", "perf.amp=fp32", "--set", "perf.cudnn_benchmark=false")
    compare_one_and_two_processes(tmp_path, device="cuda", tol=1e-3, points=2.0, extra=fp32)
