"""Peak training memory of a JEAT step, estimated from measured activation memory.

Where no GPU is at hand, the question "does WRN-28-10 JEAT at batch 128 fit in 40 GB?" is
answered from measurements on the CPU:

1. **Activation memory per image**: one forward pass in train mode at a small batch, counting
   the bytes of every tensor autograd saves for the backward pass (``saved_tensors_hooks``,
   each storage counted once), in fp32 and under bf16 autocast (what ``perf.amp=auto`` does
   on a GPU). Saved activations grow linearly with the batch (checked at two batch sizes).
2. **What a JEAT step holds at once** (``jeat.objectives.JEAT`` with its defaults): the PGD
   steps each hold one graph of the data batch and free it before the next; then the graph of
   ``model(x_adv)`` is kept for the loss while the SGLD steps each hold one more graph of the
   sample batch, and finally the graph of ``model(x_hat)``. The peak is therefore two
   batch-sized graphs (data + samples), plus the largest activation gradient alive during the
   backward pass, plus weights, gradients and Adam's two moments (the ``cifar10-jeat-paper``
   optimiser), the replay buffer and the training set (held on the device when it fits).
   Not counted: cuDNN workspaces and the caching allocator's fragmentation, which the CUDA
   measurement (``--measure``) includes.

The estimate is printed per term, and written as JSON with ``--out``. ``--measure`` also runs
real JEAT steps: on a CUDA device it reports ``torch.cuda.max_memory_allocated`` (after one
warm-up step) against the estimated peak without the training set (the measurement keeps its
random stand-in images on the host); on the CPU, the host peak RSS above the model, buffer and
data against the estimate's ``above_setup`` term (a check of the method on a model small enough
for a CPU). The measured lines are printed under the table and written into ``table.md``.

Usage (the command behind ``benchmarks/results/memory_estimate/``)::

    python benchmarks/memory_estimate.py --out benchmarks/results/memory_estimate
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from jeat.accel import Accelerator
from jeat.energy import as_logits
from jeat.models import create_model
from jeat.utils import resolve_device

GB = 1024**3


def saved_bytes(model: nn.Module, x: torch.Tensor, amp: bool) -> tuple[int, int]:
    """Bytes autograd saves for one train-mode forward at ``x`` (each storage once, parameters
    left out; autocast's bf16 weight copies are counted), and the largest saved activation (the
    size of one activation gradient in the backward pass)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:  # weights are counted once, below
            seen[storage.data_ptr()] = storage.nbytes()
            if t.dim() > 1 and t.shape[0] == x.shape[0]:  # an activation, not a weight copy
                largest = max(largest, t.numel() * t.element_size())
        return t

    model.train()
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        out = as_logits(model(x.requires_grad_(True)))
    del out
    return sum(seen.values()), largest


def estimate(
    depth: int, widen: int, batch: int, probe: int, buffer_size: int, train_images: int
) -> dict:
    torch.manual_seed(0)
    model = create_model("wrn", in_channels=3, num_classes=10, depth=depth, widen=widen,
                         norm="none")  # fmt: skip  # JEM / JEAT's WRN has no batch norm
    params = sum(p.numel() for p in model.parameters())
    rows = {}
    for amp in (False, True):
        per = []
        for b in (probe, 2 * probe):
            x = torch.rand(b, 3, 32, 32)
            total, largest = saved_bytes(model, x, amp)
            per.append((b, total, largest))
        (b1, t1, l1), (b2, t2, l2) = per
        per_image = (t2 - t1) / (b2 - b1)
        fixed = t1 - per_image * b1
        graph = fixed + per_image * batch  # one graph of a batch-sized forward
        grad_act = 2 * (l2 / b2) * batch  # the largest activation gradient (and its input)
        weights = 4 * params  # fp32 master weights (autocast keeps them fp32)
        grads = 4 * params
        moments = 8 * params  # Adam's two moments (the paper recipe; SGD momentum is half)
        buffer = 4 * buffer_size * 3 * 32 * 32
        data = 4 * train_images * 3 * 32 * 32
        step = 2 * graph + grad_act  # what one step allocates and frees again
        peak = weights + grads + moments + buffer + data + step
        rows["bf16" if amp else "fp32"] = {
            "saved_bytes_per_image": per_image,
            "linearity_check": {"batch": [b1, b2], "saved_bytes": [t1, t2]},
            "graph_at_batch_GB": graph / GB,
            "activation_gradient_GB": grad_act / GB,
            "weights_grads_adam_GB": (weights + grads + moments) / GB,
            "replay_buffer_GB": buffer / GB,
            "training_set_GB": data / GB,
            "estimated_peak_GB": peak / GB,
            # what --measure sees: on CUDA everything but the training set (random stand-in
            # images on the host), on a CPU the peak above the model, buffer and data
            "without_training_set_GB": (peak - data) / GB,
            "above_setup_GB": (grads + moments + step) / GB,
        }
    return {
        "model": f"WRN-{depth}-{widen} (norm=none)",
        "parameters": params,
        "batch": batch,
        "sample_batch": batch,
        "buffer_size": buffer_size,
        "train_images": train_images,
        "probe_batches": [probe, 2 * probe],
        "by_precision": rows,
    }


def measure(device: torch.device, depth: int, widen: int, batch: int, amp: str,
            buffer_size: int, steps: int = 2) -> dict:  # fmt: skip
    """Peak memory of real JEAT steps (the ``cifar10-jeat-paper`` objective, Adam) on
    ``device``, after the model, replay buffer and data exist. On CUDA: everything allocated at
    the peak. On the CPU: the host peak RSS above that baseline, i.e. gradients, Adam moments
    and the step's activations, to compare with the estimate's ``above_setup_GB``."""
    from common import PeakMemory

    from jeat.config import load_config
    from jeat.data import ImageDataset, dataset_info
    from jeat.objectives import create_objective

    cfg = load_config("cifar10-jeat-paper", [f"objective.options.buffer_size={buffer_size}"])
    info = dataset_info("cifar10")  # shapes and budgets only; the images here are random
    torch.manual_seed(0)
    model = create_model("wrn", in_channels=3, num_classes=10, depth=depth, widen=widen,
                         norm="none")  # fmt: skip
    acc = Accelerator.create(device, amp)
    net = acc.prepare(model)
    objective = create_objective(cfg.objective, info)
    x = torch.rand(max(2 * batch, 100), 3, 32, 32)
    y = torch.arange(len(x)) % 10
    objective.setup(ImageDataset(info, x, y, x[:10], y[:10]), device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    xb, yb = acc.batch(x[:batch].to(device)), y[:batch].to(device)

    def step() -> None:
        with acc.autocast():
            out = objective(net, xb, yb)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    if device.type == "cuda":
        # one step first: cuDNN's algorithm search (perf.cudnn_benchmark) allocates trial
        # workspaces at the first call of each shape, which is set-up, not the step's memory
        step()
    with PeakMemory(device) as peak:
        for _ in range(steps):
            step()
    what = "max_memory_allocated" if device.type == "cuda" else "host peak RSS above setup"
    return {"device": str(device), "amp": amp, "what": what,
            "GB": None if peak.peak is None else peak.peak / GB}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=28)
    ap.add_argument("--widen", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--probe", type=int, default=2, help="probe batch (and twice it)")
    ap.add_argument("--buffer-size", type=int, default=10000)
    ap.add_argument("--train-images", type=int, default=50000, help="held on the device")
    ap.add_argument("--measure", action="store_true", help="also run real JEAT steps")
    ap.add_argument("--device", default="auto", help="where --measure runs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_grad_enabled(True)
    result = estimate(
        args.depth, args.widen, args.batch, args.probe, args.buffer_size, args.train_images
    )
    if args.measure:
        device = resolve_device(args.device)
        result["measured"] = [
            measure(device, args.depth, args.widen, args.batch, amp, args.buffer_size)
            for amp in ("fp32", "bf16")
        ]
    head = f"{result['model']}, {result['parameters'] / 1e6:.1f} M parameters, batch {args.batch}"
    print(f"{head} (+{args.batch} SGLD samples), replay buffer {args.buffer_size}")
    lines = ["| term | fp32 | bf16 autocast |", "|---|---|---|"]
    terms = [
        ("saved activations per image (MB)", "saved_bytes_per_image", 1 / 1024**2),
        ("one graph at the batch (GB)", "graph_at_batch_GB", 1),
        ("largest activation gradient (GB)", "activation_gradient_GB", 1),
        ("weights + grads + Adam moments (GB)", "weights_grads_adam_GB", 1),
        ("replay buffer (GB)", "replay_buffer_GB", 1),
        ("training set on the device (GB)", "training_set_GB", 1),
        ("**estimated peak (GB)**", "estimated_peak_GB", 1),
        ("peak without the training set (GB)", "without_training_set_GB", 1),
        ("above model, buffer and data (GB)", "above_setup_GB", 1),
    ]
    rows = result["by_precision"]
    for label, key, scale in terms:
        lines.append(
            f"| {label} | {rows['fp32'][key] * scale:.2f} | {rows['bf16'][key] * scale:.2f} |"
        )
    for m in result.get("measured", []):
        cpu = m["device"] == "cpu"
        predicted = rows[m["amp"]]["above_setup_GB" if cpu else "without_training_set_GB"]
        m["estimated_GB"] = predicted
        got = "n/a" if m["GB"] is None else f"{m['GB']:.3f} GB"
        lines.append(f"\nmeasured on {m['device']} ({m['amp']}, {m['what']}): {got}; estimated "
                     f"{predicted:.3f} GB ({'above' if cpu else 'peak without'} the "
                     f"{'model, buffer and data' if cpu else 'training set'})")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
