"""Typed run configuration: dataclasses shared by the API and the CLI.

Configs are YAML files (a few ship inside the package: ``jeat train --config digits-pgdat``)
with command-line overrides ``--set optim.lr=0.05 --set objective.attack.eps=8/255``. Values
are parsed safely: numbers, booleans, lists, ``null`` and fractions like ``8/255``; nothing is
evaluated. Unknown keys are errors (a typo never silently falls back to a default).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from jeat.errors import JeatError

__all__ = [
    "DataConfig",
    "ModelConfig",
    "AttackConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "ScheduleConfig",
    "EvalConfig",
    "GenerateConfig",
    "StabilityConfig",
    "PerfConfig",
    "TrainConfig",
    "parse_value",
    "load_config",
    "apply_overrides",
    "builtin_configs",
    "config_to_dict",
    "config_from_dict",
]


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None  # folder holding the original files; default: the cache dir
    download: bool = False  # fetch missing files (canonical URLs, checksums)
    augment: bool = True  # training augmentation (never used for evaluation)
    train_subset: int | None = None  # use only the first N training images (smoke runs)
    image_size: int | None = None  # folder:/npz: data: resize the images to N x N
    # hold out this share of the training images (stratified, seeded by the run's seed) as a
    # validation split: the per-epoch check runs on it and ``keep: best`` selects by it; the
    # test set is never used for a training decision
    val_split: float = 0.0


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    options: dict[str, Any] = field(default_factory=dict)
    # warm start: a run folder or checkpoint (same architecture) whose weights start training,
    # e.g. a PGD-AT run before JEAT fine-tuning; the optimiser and schedule start fresh
    init_from: str | None = None


@dataclass
class AttackConfig:
    norm: str = "linf"
    eps: float | None = None  # None: the dataset's default budget
    steps: int = 10
    step_size: float | None = None  # None: 2.5 * eps / steps (Madry et al.)
    random_start: bool = True
    # training only: eps (and the step size) grow linearly from 0 over this many optimiser
    # steps; MNIST at eps = 0.3 from scratch otherwise often stalls at chance accuracy
    eps_warmup_steps: int = 0


@dataclass
class ObjectiveConfig:
    name: str = "pgd-at"
    attack: AttackConfig = field(default_factory=AttackConfig)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    amsgrad: bool = False
    grad_clip: float | None = None


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # constant | cosine | multistep
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of training
    gamma: float = 0.1
    warmup_steps: int = 0  # linear warm-up over this many optimiser steps


@dataclass
class EvalConfig:
    n: int | None = 1000  # test points (None: all)
    attacks: list[str] = field(
        default_factory=lambda: ["clean", "fgsm", "pgd20", "autoattack-fast"]
    )
    # independent: every attack on every point (per-attack accuracy); cascade: the worst-case
    # pass that only re-attacks points still robust (cheaper; `jeat eval`'s default)
    mode: str = "independent"
    norm: str = "linf"
    eps: float | None = None  # None: the dataset's default budget
    epoch_n: int = 500  # test points for the per-epoch check
    epoch_steps: int = 10  # PGD steps for the per-epoch check (0: clean accuracy only)
    batch_size: int = 256
    # the final evaluation's robustness curve: this attack at 0, 1/4, ..., 2 x eps (None: none)
    curve: str | None = "pgd20"


@dataclass
class GenerateConfig:
    method: str = "descent"  # descent (Santurkar seeded descent) | sgld (Langevin on the energy)
    conditional: bool = True  # one row per class; false: unconditional samples of E(x) (sgld)
    n_per_class: int = 8  # images per class (conditional) or n_per_class * 10 (unconditional)
    steps: int = 60
    radius: float | None = None  # L2 ball around the seed; None: 0.2 * sqrt(dim)
    step_size: float | None = None  # None: 2.5 * radius / steps
    seed_resolution: int = 16  # fit Gaussian seeds at most at this side length, then upsample
    seeds: str = "class"  # class: N(mu_y, S_y) per class | pooled: one Gaussian | uniform
    sgld_step_size: float = 0.25  # JEM's step 1 on [-1, 1] inputs
    sgld_noise: float = 0.005  # JEM's 0.01 on [-1, 1] inputs


@dataclass
class AnalysisConfig:
    """The energy analysis and generation scores a finished run writes (``analysis/``)."""

    n: int = 64  # test images for the energy contour, slices and flatness figures
    grid: int = 21  # contour points per axis
    samples_per_class: int = 4  # generated images per class in the energy histograms
    score_per_class: int = 100  # generated images per class for judge-IS / judge-FID
    judge_epochs: int | None = None  # epochs of the judge when none is cached (None: recipe)


@dataclass
class PerfConfig:
    """The training step's fast path (:mod:`jeat.accel`); evaluation always runs in fp32."""

    # auto (bf16 on a CUDA device that supports it) | bf16 | fp32; YAML true/false (on/off)
    # mean bf16/fp32
    amp: str | bool = "auto"
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool = False  # torch.compile the network for the training step
    cudnn_benchmark: bool | None = None  # None: on for CUDA (cuDNN times its algorithms once)


@dataclass
class StabilityConfig:
    """Divergence detection and automatic recovery (energy-based training is known to diverge)."""

    max_recoveries: int = 3  # roll-backs before giving up
    lr_factor: float = 0.5  # the learning rate is multiplied by this at each recovery
    energy_bound: float = 1.0e4  # |mean energy| of data or samples beyond this: diverged
    gap_bound: float = 1.0e3  # |E(x_data) - E(x_hat)| beyond this: diverged
    spike_factor: float = 20.0  # loss above this x max(1, median of the recent losses): diverged
    window: int = 50  # recent losses the spike test looks at


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    epochs: int = 20
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint_every_steps: int = 0  # 0: checkpoint at the end of each epoch only
    final_eval: bool = True  # evaluate the final model (eval.json)
    final_samples: bool = True  # write a class-conditional sample grid (samples.png)
    final_analysis: bool = True  # energy landscape figures and numbers (analysis/)
    final_scores: bool = True  # judge-IS / judge-FID of generated samples (scores.json)
    final_report: bool = True  # one self-contained HTML page (report.html)
    # RUN/tensorboard event files: None (auto) when tensorboard is installed, true: required
    tensorboard: bool | None = None
    progress: bool = True
    # exponential moving average of the weights (Gowal et al. 2020): the decay per optimiser
    # step (0: off); the averaged weights are the ones evaluated, selected and saved
    ema: float = 0.0
    # which weights model.pt holds: ``last`` (the last epoch's) or ``best`` (the epoch with the
    # best validation robust accuracy, Rice et al. 2020; needs data.val_split > 0)
    keep: str = "last"


_FRACTION = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?)\s*/\s*(\d+(?:\.\d*)?)\s*$", re.I)


def parse_value(text: str) -> Any:
    """Parse a command-line value: ``8/255`` -> 0.0313..., else YAML scalars/lists (safe)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    m = _FRACTION.match(text)
    if m:
        den = float(m.group(2))
        if den == 0:
            raise JeatError(f"division by zero in value '{text}'")
        return float(m.group(1)) / den
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise JeatError(f"cannot parse value '{text}': {exc}") from None


def _base_type(hint: Any) -> Any:
    """``float | None`` -> float, ``list[str]`` -> list, ``tuple[float, float]`` -> tuple."""
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) in (Union, UnionType) and len(args) == 1:
        hint = args[0]
    return get_origin(hint) or hint


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Coerce a YAML value to a field's type (ints to floats, fractions, tuples) or fail."""
    if isinstance(value, str) and _base_type(hint) in (float, int):
        value = parse_value(value)  # YAML 1.1 reads 1e-4 as a string; fractions like 8/255
    if value is None:
        return None
    base = _base_type(hint)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is float and number:
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if base is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    expected = {
        float: "a number",
        int: "an integer",
        bool: "true or false",
        str: "a string",
        list: "a list",
        tuple: "a list",
        dict: "a mapping",
    }
    if base in expected and not (
        isinstance(value, base) and (base is bool or not isinstance(value, bool))
    ):
        raise JeatError(f"config key '{path}' must be {expected[base]}, got {value!r}")
    return value


def config_from_dict(cls: type, data: dict[str, Any] | None, path: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise JeatError(f"config section '{path or 'root'}' must be a mapping")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in section '{path}'" if path else ""
        raise JeatError(
            f"unknown config key(s) {', '.join(unknown)}{where}; known: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        sub = f"{path}.{f.name}" if path else f.name
        hint = hints[f.name]
        if is_dataclass(hint):
            kwargs[f.name] = config_from_dict(hint, data[f.name], sub)
        else:
            kwargs[f.name] = _coerce(data[f.name], hint, sub)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a config dataclass."""

    def clean(v: Any) -> Any:
        if isinstance(v, tuple):
            return [clean(i) for i in v]
        if isinstance(v, list):
            return [clean(i) for i in v]
        if isinstance(v, dict):
            return {k: clean(i) for k, i in v.items()}
        return v

    return clean(asdict(cfg))


def builtin_configs() -> dict[str, Path]:
    """Configs shipped with the package, by name (file stem)."""
    root = resources.files("jeat") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def _read_yaml(path_or_name: str) -> dict[str, Any]:
    path = Path(path_or_name)
    if not path.exists():
        builtin = builtin_configs()
        if path_or_name in builtin:
            path = builtin[path_or_name]
        else:
            raise JeatError(
                f"config '{path_or_name}' is neither a file nor a built-in config; built-in: "
                f"{', '.join(sorted(builtin))}"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise JeatError(f"cannot read config {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JeatError(f"config {path} must be a YAML mapping at the top level")
    return data


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``child`` into a copy of ``base`` (sections merge, values replace)."""
    out = dict(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# Sections whose ``options`` belong to the ``name`` beside them: a config (or override) that
# names another model or objective starts that section's options afresh.
_NAMED_SECTIONS = ("model", "objective")


def _fresh_options(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``base`` without the options of a model or objective that ``child`` replaces by name."""
    out = dict(base)
    for sec in _NAMED_SECTIONS:
        old, new = base.get(sec), child.get(sec)
        if not isinstance(old, dict) or not isinstance(new, dict) or "name" not in new:
            continue
        if new["name"] != old.get("name") and "options" in old:
            out[sec] = {k: v for k, v in old.items() if k != "options"}
    return out


def _resolve_bases(path_or_name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a config and, if it names a ``base:`` (a built-in name or a path relative to the
    file), merge it over that base, recursively. Sections merge key by key, except that a
    config naming another ``model.name`` or ``objective.name`` than its base does not inherit
    the base's ``options`` for it (they were written for the other model or objective)."""
    if path_or_name in seen:
        raise JeatError(f"config bases form a cycle: {' -> '.join((*seen, path_or_name))}")
    data = _read_yaml(path_or_name)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise JeatError(f"config {path_or_name}: 'base' must name a config, got {base!r}")
    path = Path(path_or_name)
    if path.exists() and (path.parent / base).exists():
        base = str(path.parent / base)
    return _merge(_fresh_options(_resolve_bases(base, (*seen, path_or_name)), data), data)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise JeatError(f"cannot set '{dotted}': '{k}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise JeatError(f"override '{item}' must look like key.sub=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise JeatError(f"override '{item}' has an empty key")
        _set_path(data, key, parse_value(text))
    return data


def load_config(path_or_name: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a config file (or built-in name; default ``digits-pgdat``) with overrides applied.

    A config may start from another with ``base: <name or relative path>`` and list only what
    differs; sections are merged key by key. A config or override that names another model or
    objective than its base starts that one's ``options`` afresh.
    """
    data = _resolve_bases(path_or_name or "digits-pgdat")
    # an override naming another model or objective drops the options written for the old one
    # (``--model preact_resnet18`` on a config of another network); options set by overrides
    # are applied after
    named: dict[str, Any] = {}
    for item in overrides or []:
        key, _, text = item.partition("=")
        if key.strip() in (f"{sec}.name" for sec in _NAMED_SECTIONS):
            named[key.strip().split(".")[0]] = {"name": parse_value(text)}
    data = _fresh_options(data, named)
    apply_overrides(data, overrides or [])
    cfg = config_from_dict(TrainConfig, data)
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """Range checks that do not need the data or the model."""
    checks = [
        (cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}"),
        (cfg.objective.attack.steps >= 1, "objective.attack.steps must be >= 1"),
        (cfg.objective.attack.eps_warmup_steps >= 0, "objective.attack.eps_warmup_steps >= 0"),
        (
            cfg.objective.attack.eps is None or cfg.objective.attack.eps >= 0,
            "objective.attack.eps must be >= 0",
        ),
        (cfg.checkpoint_every_steps >= 0, "checkpoint_every_steps must be >= 0"),
        (cfg.generate.n_per_class >= 1, "generate.n_per_class must be >= 1"),
        (
            cfg.eval.mode in ("independent", "cascade"),
            f"eval.mode must be independent or cascade, got '{cfg.eval.mode}'",
        ),
        (cfg.eval.eps is None or cfg.eval.eps >= 0, "eval.eps must be >= 0"),
        (
            isinstance(cfg.perf.amp, bool) or cfg.perf.amp.lower() in ("auto", "bf16", "fp32"),
            f"perf.amp must be auto, bf16 or fp32, got '{cfg.perf.amp}' (fp16 is not supported: "
            "it needs loss scaling and small attack input gradients can underflow in it)",
        ),
        (
            0.0 <= cfg.data.val_split < 1.0,
            f"data.val_split must be in [0, 1), got {cfg.data.val_split}",
        ),
        (0.0 <= cfg.ema < 1.0, f"ema must be a decay in [0, 1) (0: off), got {cfg.ema}"),
        (cfg.keep in ("last", "best"), f"keep must be last or best, got '{cfg.keep}'"),
        (
            cfg.keep != "best" or cfg.data.val_split > 0,
            "keep: best selects by validation accuracy: set data.val_split (e.g. 0.1) too",
        ),
        (cfg.analysis.n >= 1, "analysis.n must be >= 1"),
        (cfg.analysis.grid >= 3, "analysis.grid must be >= 3"),
        (cfg.analysis.samples_per_class >= 0, "analysis.samples_per_class must be >= 0"),
        (cfg.analysis.score_per_class >= 2, "analysis.score_per_class must be >= 2"),
    ]
    for ok, msg in checks:
        if not ok:
            raise JeatError(msg)


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
