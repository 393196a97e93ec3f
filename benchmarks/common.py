"""Helpers shared by the benchmark scripts (not part of the library): train-or-reuse a run,
the judge classifier, judge-based generation scores, the machine line of a results file, and
the measuring tools of the cost benchmarks (interleaved timing, peak memory, FLOP counts).

The benchmarks import it as a sibling module (``python benchmarks/<script>.py`` puts this
folder first on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import io
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from jeat.attacks import PGD, LinfBall
from jeat.config import GenerateConfig, TrainConfig
from jeat.data import ImageDataset, load_dataset
from jeat.errors import JeatError
from jeat.evaluate import evaluate
from jeat.finish import train_and_finish
from jeat.metrics import judge_scores
from jeat.runs import load_trained
from jeat.samplers import generate, sample_seeds
from jeat.utils import save_image_grid

ROOT = Path(__file__).resolve().parents[1]


def train_or_reuse(
    cfg: TrainConfig, folder: Path, data: ImageDataset
) -> tuple[torch.nn.Module, float]:
    """Train (or reuse / resume) a run; returns the model and its mean seconds per epoch.

    A folder holding ``model.pt`` is reused; one holding ``checkpoints/last.pt`` resumes; any
    other existing folder is our own run killed before its first checkpoint and is restarted.
    """
    if (folder / "model.pt").exists():
        print(f"  reusing {folder}", flush=True)
    else:
        resume = (folder / "checkpoints" / "last.pt").exists()
        if folder.exists() and not resume:
            shutil.rmtree(folder)
        train_and_finish(cfg, folder, resume=resume, data=data)
    model, _, _ = load_trained(folder)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return model, statistics.mean(r["epoch_seconds"] for r in rows)


def train_judge(
    cfg: TrainConfig, folder: Path, data: ImageDataset
) -> tuple[torch.nn.Module, float]:
    """The judge: an independently trained standard classifier (its own seed and width) that
    scores generated images; returns it and its clean test accuracy (%)."""
    judge, _ = train_or_reuse(cfg, folder, data)
    acc = evaluate(judge, data.x_test, data.y_test, ["clean"], LinfBall(0.0)).rows[0].accuracy
    assert acc is not None
    return judge, acc


def generation_scores(
    model: torch.nn.Module,
    data: ImageDataset,
    judge: torch.nn.Module,
    *,
    method: str,
    steps: int,
    per_class: int,
    seed: int,
    seed_resolution: int,
    grid: Path | None = None,
) -> dict[str, float]:
    """Judge scores of ``per_class`` class-conditional samples per class drawn from ``model``
    with ``method`` (descent | sgld) against the test images; optionally saves the first 10 of
    each class as a grid."""
    info = data.info
    g = GenerateConfig(method=method, steps=steps, seed_resolution=seed_resolution)
    images, labels = generate(model, data, g, n_per_class=per_class, seed=seed)
    if grid is not None:
        k, show = info.num_classes, min(per_class, 10)
        picked = images.view(k, per_class, *info.shape)[:, :show].reshape(-1, *info.shape)
        save_image_grid(picked, grid, nrow=show)
    return judge_scores(judge, images, data.x_test, labels).to_dict()


def reference_scores(
    data: ImageDataset, judge: torch.nn.Module, per_class: int, seed: int, seed_resolution: int
) -> dict[str, dict[str, float]]:
    """Judge scores of the samplers' starting points (class-Gaussian seeds, no model) and of
    real training images: the two ends every model's samples lie between."""
    k = data.info.num_classes
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(k).repeat_interleave(per_class)
    seeds = sample_seeds("class", data, labels, gen, max_side=seed_resolution)
    pick = torch.randperm(len(data.x_train), generator=gen)[: k * per_class]
    return {
        "class-Gaussian seeds (no model)": judge_scores(
            judge, seeds, data.x_test, labels
        ).to_dict(),
        "real training images": judge_scores(
            judge, data.x_train[pick], data.x_test, data.y_train[pick]
        ).to_dict(),
    }


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}"
    )


# ----------------------------------------------------------------- PGD vs torchattacks
def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def pgd_ratio(model: nn.Module, x: Tensor, y: Tensor, eps: float, repeats: int) -> dict[str, Any]:
    """PGD-20 (L-inf, step eps/4, random start) with ``jeat.attacks.PGD`` and with
    ``torchattacks.PGD`` on the same model and batch, alternating the two; the medians of
    ``repeats`` timings each and their ratio ours / torchattacks."""
    import torchattacks

    ours = PGD(LinfBall(eps), steps=20)
    ref = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=20, random_start=True)
    model.eval()
    ours(model, x, y)  # warm-up both
    ref(x, y)
    t_ours, t_ref = [], []
    for i in range(repeats):
        gen = torch.Generator().manual_seed(i)
        pair = [("ours", lambda g=gen: ours(model, x, y, generator=g)), ("ref", lambda: ref(x, y))]
        for name, fn in pair if i % 2 == 0 else pair[::-1]:
            (t_ours if name == "ours" else t_ref).append(_timed(fn))
    a, b = statistics.median(t_ours), statistics.median(t_ref)
    return {"ours_s": a, "torchattacks_s": b, "ratio": a / b, "batch": list(x.shape)}


# ----------------------------------------------------------------- peak memory
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
_LIBC: Any = None


def _status_kib(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (VmRSS, VmHWM), or None where unreadable."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _trim_host_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so that a row's RSS
    baseline does not hold buffers an earlier row freed; a no-op where there is no glibc."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC else None
    if trim is not None:
        trim(0)


def memory_label(device: torch.device) -> str:
    """What :class:`PeakMemory` reports on ``device`` (the memory column's heading)."""
    if device.type == "cuda":
        return "peak CUDA memory allocated"
    return "host peak RSS above baseline"


class PeakMemory:
    """Peak memory of the enclosed block in bytes (``.peak``; None where it cannot be measured).

    * CUDA: ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats``
      (all memory allocated at the peak, tensors alive before the block included).
    * CPU: the host peak RSS above baseline: freed heap is returned to the OS, writing ``5`` to
      ``/proc/self/clear_refs`` resets the peak (``VmHWM``) to the current RSS, and the result
      is ``VmHWM`` after the block minus ``VmRSS`` before it. Memory that an earlier block left
      allocated counts in the baseline, not in the peak.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: int | None = None
        self._base_kib: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        gc.collect()
        _trim_host_heap()
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return self  # no /proc (or not writable): the peak stays None
        self._base_kib = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self._base_kib is not None:
            hwm = _status_kib("VmHWM")
            self.peak = None if hwm is None else max(0, hwm - self._base_kib) * 1024


def mib(n_bytes: int | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:.0f}"


def num(value: float) -> str:
    """A rate for a table: whole numbers from 100 up, three significant digits below."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


# ----------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    """Wait for the device (CUDA work is asynchronous; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measured:
    """The timings of one compared variant and its peak memory over the timed calls."""

    seconds: list[float] = field(default_factory=list)
    peaks: list[int | None] = field(default_factory=list)  # per call, None: not measured

    def add(self, seconds: float, peak: int | None) -> None:
        self.seconds.append(seconds)
        self.peaks.append(peak)

    def peak_after(self, skip: int = 0) -> int | None:
        """The largest peak over the calls after the first ``skip`` (None if none measured)."""
        known = [p for p in self.peaks[skip:] if p is not None]
        return max(known) if known else None

    @property
    def peak_bytes(self) -> int | None:
        return self.peak_after(0)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def paired_ratio(
    num: Measured, den: Measured, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> dict[str, float | int]:
    """The time ratio ``num / den`` from interleaved rounds: the median of the per-round ratios
    (round ``r`` of both ran back to back, so a slow spell of the machine hits both alike),
    with a percentile-bootstrap confidence interval for that median over the rounds."""
    ratios = [a / b for a, b in zip(num.seconds, den.seconds, strict=True)]
    if not ratios:
        raise JeatError("paired_ratio needs at least one timed round")
    gen = torch.Generator().manual_seed(seed)
    r = torch.tensor(ratios, dtype=torch.float64)
    idx = torch.randint(0, len(ratios), (resamples, len(ratios)), generator=gen)
    medians = r[idx].median(dim=1).values  # torch's lower median; fine for an interval
    tail = (1 - level) / 2
    lo, hi = torch.quantile(medians, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return {
        "median": statistics.median(ratios),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "level": level,
        "rounds": len(ratios),
        "rounds_below_1": sum(x < 1 for x in ratios),
    }


def ratio_text(stat: dict[str, float | int]) -> str:
    """``0.99 [0.97, 1.02]`` (median of per-round ratios and its confidence interval)."""
    return f"{stat['median']:.3f} [{stat['ci_low']:.3f}, {stat['ci_high']:.3f}]"


def measure(fn: Callable[[], object], device: torch.device) -> tuple[float, int | None]:
    """Seconds of one call of ``fn`` (device synchronised before and after) and its peak memory."""
    with PeakMemory(device) as mem:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        seconds = time.perf_counter() - start
    return seconds, mem.peak


def rotated(names: list[str], r: int) -> list[str]:
    """``names`` starting at position ``r`` (mod its length): round ``r``'s order, so that every
    variant runs early and late in a round as often as the others."""
    k = r % len(names)
    return names[k:] + names[:k]


def interleaved(
    variants: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    warmup: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict[str, Measured]:
    """Time every variant ``repeats`` times, interleaved: ``warmup`` untimed rounds, then round
    ``r`` runs all variants in the order :func:`rotated` gives. Drift in the machine's load then
    hits every variant alike, and the medians compare like with like."""
    names = list(variants)
    for w in range(warmup):
        for name in names:
            start = time.perf_counter()
            variants[name]()
            sync(device)
            if log:
                log(f"  warm-up {w + 1}: {name} {time.perf_counter() - start:.2f}s")
    out = {name: Measured() for name in names}
    for r in range(repeats):
        for name in rotated(names, r):
            seconds, peak = measure(variants[name], device)
            out[name].add(seconds, peak)
            if log:
                log(f"  round {r + 1}/{repeats}: {name} {seconds:.2f}s")
    return out


# ----------------------------------------------------------------- FLOPs
class _GlobalOnly:
    """Stands in for :class:`FlopCounterMode`'s module tracker, whose backward hooks break
    ``torch.autograd.grad`` (every attack and sampler step); only the global total is needed."""

    parents = {"Global"}

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything ``fn`` executes (forward and backward), as PyTorch's
    ``FlopCounterMode`` counts them: matrix products and convolutions (2 FLOPs per
    multiply-add), not element-wise operations."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
    with counter:
        fn()
    return int(counter.get_total_flops())


def objective_step_flops(
    cfg: TrainConfig, data: ImageDataset, device: torch.device
) -> tuple[int, int]:
    """FLOPs of one training step of ``cfg``'s objective (forward and backward of everything
    it runs: attack steps, SGLD steps, the loss) on the first ``batch_size`` training images,
    counted in fp32 eager mode: the model FLOPs of model-FLOPs utilisation, whatever precision
    or compilation the timed run used; and that batch's size."""
    from jeat.objectives import create_objective
    from jeat.runs import build_model

    n = min(cfg.batch_size, len(data.x_train))
    x, y = data.x_train[:n].to(device), data.y_train[:n].to(device)
    torch.manual_seed(0)
    model = build_model(cfg, data.info).to(device).train()
    obj = create_objective(cfg.objective, data.info)
    obj.setup(data, device)
    return count_flops(lambda: obj(model, x, y).loss.backward()), n


# Peak dense bf16 tensor FLOP/s by device name (no sparsity), for model-FLOPs utilisation;
# the first entry whose words all occur in the device's name applies.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835e12),
    ("H200", 989.4e12),  # SXM
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # SXM
    ("A100", 312e12),
)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """The device's peak dense bf16 FLOP/s (``override_tflops`` x 1e12 when given); None on
    the CPU or an unlisted GPU."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, peak in PEAK_BF16_FLOPS:
        if all(part.lower() in name for part in key.split()):
            return peak
    return None


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


# ----------------------------------------------------------------- training runs and outputs
# The overrides that keep a timing run lean: no progress bar, no final steps, no per-epoch check.
LEAN_OVERRIDES = [
    "progress=false",
    "final_eval=false",
    "final_samples=false",
    "final_analysis=false",
    "final_scores=false",
    "final_report=false",
    "eval.epoch_n=0",
    "tensorboard=false",
]


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Swallow what the library prints on stdout (``wrote model.pt`` and the like)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def cifar_or_digits(data_dir: str | Path) -> ImageDataset:
    """The CIFAR-10 subset under ``data_dir`` (``cifar-10-batches-py``), else the embedded
    digits, saying so."""
    try:
        return load_dataset("cifar10", root=Path(data_dir))
    except (JeatError, OSError) as exc:
        print(
            f"no CIFAR-10 data under {data_dir} ({exc}); falling back to the embedded digits "
            "(pass --data-dir to the folder holding cifar-10-batches-py)"
        )
        return load_dataset("digits")


def first_train_images(data: ImageDataset, n: int | None) -> ImageDataset:
    """``data`` with only its first ``n`` training images (all of them when ``n`` is None)."""
    if not n:
        return data
    m = min(n, len(data.x_train))
    return ImageDataset(data.info, data.x_train[:m], data.y_train[:m], data.x_test, data.y_test)


def emit(results: dict[str, Any], table: str, out: str | Path | None) -> None:
    """Print a benchmark's table and, with ``--out``, write its results there."""
    print(table)
    if out:
        write_outputs(out, results, table)


@contextlib.contextmanager
def work_folder(work: str | Path | None, prefix: str) -> Iterator[Path]:
    """The folder a benchmark trains its runs in: ``work`` (which must not exist yet, and is
    kept), or a temporary folder removed afterwards."""
    if work:
        folder = Path(work)
        if folder.exists():
            raise SystemExit(f"--work {folder} exists; give a new folder")
        yield folder
        return
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_outputs(out: str | Path, results: dict[str, Any], table: str) -> Path:
    """Write ``results.json`` and ``table.md`` into folder ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (folder / "table.md").write_text(table)
    print(f"wrote {folder}/results.json and table.md")
    return folder


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
