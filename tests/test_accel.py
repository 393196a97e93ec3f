"""The training step's fast path: bf16 autocast, channels-last, torch.compile, and attack and
sampler loops that never wait for the device."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from conftest import FAST
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from jeat import JeatError
from jeat.accel import Accelerator, resolve_amp
from jeat.attacks import PGD, L2Ball, LinfBall
from jeat.config import ObjectiveConfig, load_config
from jeat.data import ImageDataset, dataset_info
from jeat.finish import train_and_finish
from jeat.models import create_model
from jeat.objectives import create_objective, wrm_ascent
from jeat.samplers import SGLD, SeededDescent

CPU = torch.device("cpu")

# calls that make the host wait for the device (a result's value or size is needed on the host)
_SYNCS = {
    Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__int__, Tensor.__float__,
    Tensor.nonzero, torch.nonzero, Tensor.cpu, Tensor.numpy, torch.unique, Tensor.unique,
    torch.masked_select, Tensor.masked_select,
}  # fmt: skip


class SyncSpy(TorchFunctionMode):
    """Records every host-device synchronising call made while it is active, including
    indexing with a boolean mask (its result's size is only known after a device read)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNCS:
            self.calls.append(func.__name__)
        elif func in (Tensor.__getitem__, Tensor.__setitem__) and len(args) > 1:
            items = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items):
                self.calls.append(f"{func.__name__} with a boolean mask")
        return func(*args, **(kwargs or {}))


def _net():
    torch.manual_seed(0)
    return create_model("small_cnn", in_channels=1, num_classes=10, mean=[0.5], std=[0.5],
                        width=8).eval()  # fmt: skip


def test_the_spy_sees_the_syncs_it_looks_for():
    x = torch.rand(4, 3)
    with SyncSpy() as spy:
        if (x > 0.5).any():
            x[x > 0.9] = 0
        x.sum().item()
        torch.where(x > 0.5, x, 0 * x)  # not a sync
    assert spy.calls == ["__bool__", "__setitem__ with a boolean mask", "item"]


@pytest.mark.parametrize(
    "name, run",
    [
        ("PGD L-inf, last iterate", lambda m, x, y: PGD(LinfBall(0.2), 5)(m, x, y, check=False)),
        (
            "PGD L2, first success kept",
            lambda m, x, y: PGD(L2Ball(1.0), 5, keep_success=True, active_set=False)(
                m, x, y, check=False
            ),
        ),
        ("SGLD on E(x)", lambda m, x, y: SGLD(5)(m, x)),
        ("SGLD on E(x, y)", lambda m, x, y: SGLD(5)(m, x, y)),
        ("seeded descent", lambda m, x, y: SeededDescent(steps=5)(m, x, y)),
    ],
)
def test_attack_and_sampler_loops_never_wait_for_the_device(name, run):
    model, x, y = _net(), torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    with SyncSpy() as spy:
        out = run(model, x, y)
    assert out.shape == x.shape
    assert spy.calls == [], f"{name} synchronises: {spy.calls}"


def test_the_active_set_waits_only_at_its_compactions():
    """Evaluation PGD's active set reads the host once per compaction (a few reads at most),
    never once per step: 20 steps compacted every 5 are 4 compactions."""
    model, x, y = _net(), torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    attack = PGD(L2Ball(1.0), 20, keep_success=True, compact_every=5)
    assert attack.uses_active_set
    with SyncSpy() as spy:
        out = attack(model, x, y, check=False)
    assert out.shape == x.shape
    assert 0 < len(spy.calls) <= 2 * (20 // 5), spy.calls


class BackwardSpy(TorchDispatchMode):
    """Records which gradients each convolution backward computes (input, weight, bias) and
    how many matrix products run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_masks: list[tuple[bool, ...]] = []
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.conv_masks.append(tuple(args[-1]))
        name = func.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_attack_backward_passes_compute_input_gradients_only():
    """A PGD step is one forward and one backward that computes no weight gradient (the
    convolutions' weight and bias gradients are masked off, linear layers do one product per
    layer): about two forwards' work instead of a training step's three."""
    torch.manual_seed(0)
    model = create_model("small_cnn", in_channels=3, num_classes=10, mean=[0.5] * 3,
                         std=[0.5] * 3, width=8).eval()  # fmt: skip
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with BackwardSpy() as attack:
        PGD(LinfBall(8 / 255), 3)(model, x, y, check=False)
    assert len(attack.conv_masks) == 3 * 3  # three convolutions, three steps
    assert set(attack.conv_masks) == {(True, False, False)}
    assert attack.counts["mm.default"] == attack.counts["addmm.default"]  # input grads only
    assert all(p.grad is None for p in model.parameters())
    with BackwardSpy() as step:  # a training backward, for contrast
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(mask[1] for mask in step.conv_masks)
    assert step.counts["mm.default"] == 2 * step.counts["addmm.default"]


def _recording_backend(masks: list[tuple[bool, ...]]):
    """A torch.compile backend that runs AOTAutograd's graphs as traced and records, for each
    compiled backward, which gradients its convolution backwards compute."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def backward(gm, _):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "convolution_backward" in str(node.target):
                masks.append(tuple(node.args[-1]))
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=backward)


@pytest.mark.parametrize(
    "name, run",
    [
        ("PGD", lambda m, x, y: PGD(LinfBall(8 / 255), 2)(m, x, y, check=False)),
        ("SGLD", lambda m, x, y: SGLD(steps=2)(m, x, y)),
        ("WRM ascent", lambda m, x, y: wrm_ascent(m, x, y, gamma=1.0, steps=2)),
    ],
)
def test_compiled_attack_and_sampler_backwards_compute_no_weight_gradient(name, run):
    """torch.compile's backward computes the gradient of every input that requires one,
    whatever autograd.grad asks for, so the loops freeze the parameters: the compiled attack
    backward computes the input gradient alone, and the training backward is unchanged."""
    torch._dynamo.reset()
    masks: list[tuple[bool, ...]] = []
    model = create_model("small_cnn", in_channels=3, num_classes=10, mean=[0.5] * 3,
                         std=[0.5] * 3, width=8)  # fmt: skip
    net = torch.compile(model, backend=_recording_backend(masks))
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    out = run(net, x, y)
    assert out.shape == x.shape
    assert masks and set(masks) == {(True, False, False)}, f"{name}: {sorted(set(masks))}"
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    masks.clear()
    torch.nn.functional.cross_entropy(net(x), y).backward()  # the training step's backward
    assert masks and all(m[1] for m in masks)
    assert all(p.grad is not None for p in model.parameters())
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["jem", "jeat"])
def test_energy_objectives_feed_the_network_one_memory_layout(name):
    """With a channels-last batch, every input of a JEM/JEAT step (data, attack iterates, SGLD
    chains from the replay buffer) reaches the network channels-last: no layout conversion in
    the convolutions, and one set of graphs for a compiled network."""
    info = dataset_info("cifar10")
    x, y = torch.rand(20, 3, 32, 32), torch.arange(20) % 10
    cfg = ObjectiveConfig(name=name, options={"buffer_size": 20, "sgld_steps": 2})
    objective = create_objective(cfg, info)
    objective.setup(ImageDataset(info, x, y, x, y), CPU)
    model = create_model("small_cnn", in_channels=3, num_classes=10, width=4)
    model.to(memory_format=torch.channels_last)
    layouts: list[bool] = []
    model.register_forward_pre_hook(
        lambda _, inp: layouts.append(inp[0].is_contiguous(memory_format=torch.channels_last))
    )
    xb = x[:8].contiguous(memory_format=torch.channels_last)
    objective(model, xb, y[:8]).loss.backward()
    assert len(layouts) >= 3 and all(layouts), layouts


def test_amp_choices():
    assert resolve_amp("auto", CPU) is None  # bf16 only by default on a CUDA device
    assert resolve_amp("fp32", CPU) is None and resolve_amp(False, CPU) is None  # YAML "off"
    assert resolve_amp("bf16", CPU) is torch.bfloat16 and resolve_amp(True, CPU) is torch.bfloat16
    assert load_config("digits-pgdat", ["perf.amp=off"]).perf.amp is False
    with pytest.raises(JeatError, match="fp16 is not supported"):
        resolve_amp("fp16", CPU)
    with pytest.raises(JeatError, match="perf.amp must be one of auto, bf16, fp32"):
        resolve_amp("fast", CPU)
    with pytest.raises(JeatError, match="fp16 is not supported"):
        load_config("digits-pgdat", ["perf.amp=fp16"])
    acc = Accelerator.create(CPU, "bf16", channels_last=True)
    assert acc.describe() == "bf16, channels-last"
    assert Accelerator.create(CPU).describe() == "fp32, contiguous"
    cuda = Accelerator.create(torch.device("cuda"), "fp32")  # resolving needs no GPU
    assert cuda.channels_last and cuda.cudnn_benchmark and not cuda.compile
    assert cuda.describe() == "fp32, channels-last, cuDNN autotuned"
    assert not Accelerator.create(CPU).cudnn_benchmark
    over = ["perf.cudnn_benchmark=false", "perf.compile=true", "perf.amp=fp32"]
    off = Accelerator.from_perf(torch.device("cuda"), load_config("digits-pgdat", over).perf)
    assert off.compile and not off.cudnn_benchmark and off.amp_dtype is None


def _run(tmp_path, name, extra, digits, epochs=8):
    cfg = load_config(
        "digits-standard",
        [
            *FAST,
            f"epochs={epochs}",
            "model.options.width=8",
            "optim.lr=0.01",
            "eval.epoch_n=360",
            "eval.epoch_steps=0",
            *extra,
        ],  # fmt: skip
    )
    return train_and_finish(cfg, tmp_path / name, data=digits)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, digits):
    """8 epochs of fp32 contiguous training: the reference of the bf16 and layout tests.
    (After 3 epochs the digits models were still at 73-83% and two runs that differ only in
    rounding ended up to 5 points apart; after 8 they are at 93-96%.)"""
    return _run(tmp_path_factory.mktemp("fp32"), "fp32", [], digits)


def test_bf16_training_runs_in_bf16_and_learns_as_well_as_fp32(tmp_path, digits, fp32_run):
    bf16 = _run(tmp_path, "bf16", ["perf.amp=bf16"], digits)
    a, b = fp32_run.model.state_dict(), bf16.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # autocast really changed the maths
    assert all(v.dtype == torch.float32 for v in b.values())  # weights stay fp32
    acc32, acc16 = fp32_run.metrics[-1]["test_clean_acc"], bf16.metrics[-1]["test_clean_acc"]
    # seeds 0-7 on a CPU with native bf16: 92.8-96.1% in fp32, bf16 within 1.1 points
    assert acc16 >= acc32 - 3 and acc32 > 90, (acc32, acc16)


def test_channels_last_trains_the_same_model(tmp_path, digits, fp32_run):
    """One optimiser step from the same weights agrees to float rounding (the layout changes
    only the order of the sums). Adam turns such rounding differences into lr-sized steps for
    weights whose gradient is near zero, so whole runs are compared by what they learn."""
    one = ["data.train_subset=64"]  # one batch: one step
    plain = _run(tmp_path, "plain-1", one, digits, epochs=1)
    nhwc = _run(tmp_path, "nhwc-1", [*one, "perf.channels_last=true"], digits, epochs=1)
    convs = [p for p in nhwc.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    a, b = plain.model.state_dict(), nhwc.model.state_dict()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4  # 1.5e-6
    full = _run(tmp_path, "nhwc", ["perf.channels_last=true"], digits)
    acc, acc_cl = fp32_run.metrics[-1]["test_clean_acc"], full.metrics[-1]["test_clean_acc"]
    assert abs(acc_cl - acc) <= 1.5, (acc, acc_cl)  # seeds 0-7: within 0.3 points


def test_compiled_training_matches_eager_and_saves_plain_weights(tmp_path, digits):
    """torch.compile'd training step (CPU inductor: compiles in ~40 s here) against eager."""
    extra = ["data.train_subset=256", "data.augment=false"]
    eager = _run(tmp_path, "eager", extra, digits, epochs=1)
    compiled = _run(tmp_path, "compiled", [*extra, "perf.compile=true"], digits, epochs=1)
    a, b = eager.model.state_dict(), compiled.model.state_dict()
    assert a.keys() == b.keys()  # no "_orig_mod." prefixes in what is saved
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4


_FAULTS = """
import ctypes, ctypes.util, resource
from jeat.accel import tune_host_allocator
tuned = tune_host_allocator()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 16 * 2**20
def step():  # four activation-sized buffers written, then freed: one step's pattern
    ptrs = [libc.malloc(SIZE) for _ in range(4)]
    for p in ptrs:
        ctypes.memset(p, 1, SIZE)
    for p in ptrs:
        libc.free(p)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the host-allocator setting is for Linux with glibc",
)
def test_tuned_host_allocator_stops_refaulting_freed_buffers():
    """A step's pattern straight on glibc's malloc in a fresh process: four 16 MiB buffers
    written, then freed. With glibc's defaults the freed top of the heap is trimmed and every
    later step faults all its pages in again (163,520 faults over ten steps, every run); tuned,
    the pages are kept and reused (0). Calling malloc directly keeps the heap's layout free of
    the small allocations that make a torch-level count vary from run to run; what the setting
    does for real attacks and epochs is measured in benchmarks/host_allocator.py."""

    def run(malloc):
        env = {**os.environ, "JEAT_MALLOC": malloc}
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0] == "True", int(out[1])

    applied, tuned = run("tuned")
    skipped, system = run("system")
    assert applied and not skipped
    pages = 10 * 4 * 16 * 2**20 // 4096  # every page of every buffer of the ten steps
    print(f"\nminor page faults over ten steps: system {system}, tuned {tuned} (of {pages} pages)")
    assert system > pages // 2
    assert tuned < pages // 100
