"""Robustness evaluation: accuracy under a list of attacks on the same test points.

This module is the runner. Attacks are named in the small language of :mod:`jeat.specs`
(``clean,fgsm,pgd20,autoattack``; ``pgd20:restarts=5``); the tables it fills are
:mod:`jeat.tables`. Both are re-exported here, so ``from jeat.evaluate import parse_attack,
EvalResult`` keeps working.

Two ways to fill the table, on the same points:

* ``cascade`` (the default of ``jeat eval``): the worst-case pass of AutoAttack. Each attack
  only attacks the points that are still robust after the previous ones, so the whole table
  costs little more than its strongest attack. A row reports how many points it attacked, how
  many of those it broke, and the robust accuracy after it. An attack's own accuracy is known
  only when it attacked every clean-correct point (the first attack after ``clean``).
* ``independent``: every attack runs on every clean-correct point; each row has its own
  accuracy, and the worst case is the share of points that survive them all.

Accuracy under attack follows RobustBench: a point counts as robust only if it is classified
correctly when clean *and* after the attack. Composite attacks (AutoAttack) appear as one row
per component. Every attack's output is checked against its threat model (distance and [0, 1]
box), so a broken attack cannot report robustness it did not measure.
"""

from __future__ import annotations

import sys
import time
import types
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from jeat.attacks import (
    BPDA,
    PGD,
    MultiTargeted,
    ThreatModel,
    Unroll,
    check_images,
    logits_of,
    make_threat,
    model_mode,
    model_width,
)
from jeat.attacks.threats import check_budget
from jeat.energy import check_labels
from jeat.errors import JeatError
from jeat.specs import (
    AUTOATTACK_FAST,
    CATEGORIES,
    AttackSpec,
    BuiltAttack,
    EvalContext,
    attack_cost,
    build_attack,
    cascade_order,
    identity_attack,
    list_attacks,
    parse_attack,
    parse_attacks,
)
from jeat.tables import MASKING, AttackResult, EvalResult, pct, table_warnings

if TYPE_CHECKING:
    from jeat.attacks.trace import LossTrace
    from jeat.distributed import DistContext

__all__ = [
    "evaluate_model",
    "model_device",
    "AttackSpec",
    "BuiltAttack",
    "EvalContext",
    "AttackResult",
    "EvalResult",
    "parse_attacks",
    "parse_attack",
    "build_attack",
    "list_attacks",
    "evaluate",
    "attack_cost",
    "cascade_order",
    "accuracy",
    "CATEGORIES",
    "table_warnings",
    "MASKING",
    "AUTOATTACK_FAST",
    "traced_core",
]


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return logits_of(model, x).argmax(1)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Clean accuracy in percent (model in eval mode; mode restored)."""
    device = next(model.parameters()).device
    correct = 0
    with model_mode(model, True):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            correct += int((_predict(model, xb) == yb).sum())
    return 100.0 * correct / max(1, len(x))


# Options that change how an attack is computed, not what it computes: a stage's seed ignores
# them, so that ``pgd20`` and ``pgd20:active=0`` draw the same random starts.
_EXECUTION_OPTIONS = ("active",)


def _stage_seed(seed: int, name: str, start: int = 0) -> int:
    """The seed of one batch of one stage: from the table's seed, the stage (less its
    execution options) and the batch's first position, so a batch draws the same random
    numbers whichever process runs it."""
    head, *opts = name.split(":")
    kept = [
        o for o in opts if o.partition("=")[0].strip().replace("-", "_") not in _EXECUTION_OPTIONS
    ]
    key = ":".join([head, *kept])
    return (seed * 1_000_003 + zlib.crc32(key.encode()) + 7_919 * start) % (2**63)


def _check_output(name: str, threat: ThreatModel | None, x_adv: Tensor, x: Tensor) -> None:
    if x_adv.shape != x.shape:
        raise JeatError(f"attack {name} returned shape {tuple(x_adv.shape)} for {tuple(x.shape)}")
    if not torch.isfinite(x_adv).all() or x_adv.min() < -1e-5 or x_adv.max() > 1 + 1e-5:
        raise JeatError(f"attack {name} returned inputs outside the [0, 1] box")
    if threat is not None:
        worst = float(threat.distance(x_adv, x).max()) if len(x) else 0.0
        if worst > threat.eps * (1 + 1e-4) + 1e-5:
            raise JeatError(
                f"attack {name} left its threat model: distance {worst:.5g} > eps {threat.eps:.5g}"
            )


def _run_stage(
    model: nn.Module,
    name: str,
    attack: Callable[..., Tensor],
    threat: ThreatModel | None,
    x: Tensor,
    y: Tensor,
    idx: Tensor,
    batch_size: int,
    seed: int,
    device: torch.device,
    progress: bool,
    shards: DistContext | None = None,
    trace: LossTrace | None = None,
    notes: list[str] | None = None,
) -> Tensor:
    """Attack the points ``idx``; return which of them stay correctly classified. With
    ``shards`` (a torchrun job), each process attacks every ``world_size``-th batch and the
    results are gathered, so every process returns the one-process answer. ``trace`` (set as
    the recorder of the stage's gradient attack) receives each batch's loss traces.

    Each batch runs with the global random generators seeded from its position too (and
    restored afterwards), so a randomised model (noise injection, random purification) gives
    the same table on every run."""
    from tqdm.auto import tqdm

    rank, world = (shards.rank, shards.world_size) if shards is not None else (0, 1)
    generator = torch.Generator(device=device)
    ok = torch.zeros(len(idx), dtype=torch.bool)
    starts = list(range(0, len(idx), batch_size))[rank::world]
    mine = sum(min(batch_size, len(idx) - i) for i in starts)
    bar = tqdm(total=mine, desc=name, unit="pt", leave=False, disable=not progress or rank != 0)
    forked = [device] if torch.device(device).type == "cuda" else []
    with bar:
        for i in starts:
            sel = idx[i : i + batch_size]
            xb, yb = x[sel].to(device), y[sel].to(device)
            stage_seed = _stage_seed(seed, name, i)
            generator.manual_seed(stage_seed)
            if trace is not None:
                trace.begin_batch(sel, device)
            # no autograd graph outside the attacks' own gradient steps (they enable it)
            with (
                torch.random.fork_rng(devices=forked),
                model_mode(model, True),
                torch.no_grad(),
            ):
                torch.manual_seed(stage_seed)
                x_adv = attack(model, xb, yb, generator=generator, check=False)
                invalid = ~torch.isfinite(x_adv.detach()).flatten(1).all(1)
                if bool(invalid.any()):  # e.g. a reference attack dividing by a zero gradient
                    x_adv = torch.where(_rows(invalid, x_adv), xb, x_adv)
                    if notes is not None:
                        notes.append(
                            f"{name} returned non-finite values for {int(invalid.sum())} "
                            "points; they count as not broken by it"
                        )
                _check_output(name, threat, x_adv, xb)
                ok[i : i + batch_size] = (_predict(model, x_adv) == yb).cpu()
            if trace is not None:
                trace.end_batch()
            bar.update(len(sel))
    if world > 1:
        assert shards is not None
        parts = shards.all_gather([(i, ok[i : i + batch_size]) for i in starts])
        for part in parts:
            for i, chunk in part:
                ok[i : i + len(chunk)] = chunk
        if trace is not None:
            rows = idx[[j for i in starts for j in range(i, min(i + batch_size, len(idx)))]]
            mine_trace = (rows, trace.loss[rows], trace.grad[rows], trace.first_fooled[rows])
            for rows, loss, grad, first in shards.all_gather(mine_trace):
                trace.loss[rows], trace.grad[rows], trace.first_fooled[rows] = loss, grad, first
    return ok


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def traced_core(attack: Callable[..., Tensor]) -> tuple[PGD, int] | None:
    """The gradient attack (PGD) inside a stage, and how many runs it makes per point
    (restarts × target classes); None for attacks that record no loss trace."""
    from jeat.attacks.substitute import LearnedBPDA
    from jeat.attacks.transfer import Transfer

    runs = 1
    while isinstance(attack, (BPDA, Unroll, MultiTargeted, Transfer, LearnedBPDA)):
        if isinstance(attack, MultiTargeted):
            runs *= attack.n_targets
        attack = attack.attack
    if isinstance(attack, PGD):
        return attack, runs * attack.restarts
    return None


def _clean_row(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    seed: int,
    device: torch.device,
    shards: DistContext | None,
) -> tuple[Tensor, dict[str, Tensor], list[AttackResult]]:
    """The clean row: which points are classified correctly, their outcomes, the row."""
    n = len(x)
    start = time.perf_counter()
    all_idx = torch.arange(n)
    clean_ok = _run_stage(
        model, "clean", identity_attack, None, x, y, all_idx, batch_size, seed, device, False,
        shards,
    )  # fmt: skip
    ok = clean_ok.sum()
    row = AttackResult(
        "clean", "clean", "-", n, n, int((~clean_ok).sum()), pct(ok, n), pct(ok, n),
        time.perf_counter() - start, "clean",
    )  # fmt: skip
    return clean_ok, {"clean": clean_ok.to(torch.int8)}, [row]


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: str | list[str],
    threat: ThreatModel,
    batch_size: int = 256,
    seed: int = 0,
    mode: str = "cascade",
    num_classes: int | None = None,
    context: EvalContext | None = None,
    progress: bool = False,
    sanity_tolerance: float = 3.0,
    shards: DistContext | None = None,
    order: str = "cost",
    trace: bool = False,
    prior: EvalResult | None = None,
) -> EvalResult:
    """Robust accuracy of ``model`` under each attack on the same points, and the worst case.

    ``mode`` is ``cascade`` (attack only the points still robust) or ``independent`` (every
    attack on every clean-correct point); see the module docstring. ``num_classes`` checks the
    width of the model's logits. The model runs in eval mode (its modes are restored), under
    ``torch.no_grad`` except inside gradient attacks. The result's ``warnings`` hold the sanity
    rules that this table can check (see :mod:`jeat.sanity`) and the reference AutoAttack's
    own warnings.

    In cascade mode ``order="cost"`` (the default) runs the white-box attacks cheapest first
    (:func:`cascade_order`), so that cheap attacks remove the easy points before the expensive
    ones run; ``order="given"`` keeps the list's order.

    ``shards`` (a :class:`jeat.distributed.DistContext` of a torchrun job) splits every stage's
    batches across the processes and gathers the per-point results: each process returns the
    table, per point, that one process computes (batches are seeded by their position).

    ``trace=True`` records the per-point loss trace of every gradient attack (PGD family,
    FGSM, their targeted, BPDA and transfer forms) into ``result.traces``: what
    :mod:`jeat.diagnose` reads.

    ``prior`` (a table of the same points) extends that table instead of starting a new one:
    its rows, outcomes and traces are kept, ``clean`` is not run again, and the attacks run in
    cascade on the points that survived it, each a row of its own with its time (what
    :func:`jeat.diagnose.fix` adds the remedies with). The attacks keep the given order.
    """
    if prior is not None:
        mode, order = "cascade", "given"
        if prior.robust is None or prior.n != len(x) or "clean" not in prior.outcomes:
            raise JeatError("a prior table must be a finished table of the same points")
    if mode not in ("cascade", "independent"):
        raise JeatError(f"unknown evaluation mode '{mode}'; use cascade or independent")
    check_images(x, "test images")
    if int(batch_size) != batch_size or batch_size < 1:
        raise JeatError(f"batch size must be an integer >= 1, got {batch_size}")
    specs = parse_attacks(attacks)
    device = model_device(model)
    with model_mode(model, True):
        width = model_width(model, x[:1].to(device), num_classes) if len(x) else 0
    y = check_labels(y, width or 1, len(x))
    ctx = context or EvalContext()
    ctx.seed, ctx.device = seed, device
    ctx.num_classes = ctx.num_classes or width
    ctx.image_shape = ctx.image_shape or tuple(x.shape[1:])
    built = [build_attack(s, threat, ctx) for s in specs if s.kind != "clean"]
    if order not in ("cost", "given"):
        raise JeatError(f"unknown attack order '{order}'; use cost or given")
    if mode == "cascade" and order == "cost":
        built = cascade_order(built)

    n = len(x)
    notes: list[str] = []
    if prior is not None:
        clean_ok = prior.outcomes["clean"] == 1
        outcomes = dict(prior.outcomes)
        rows = list(prior.rows)
        robust = prior.robust.clone()  # type: ignore[union-attr]
        traces: dict[str, LossTrace] = dict(prior.traces)
    else:
        clean_ok, outcomes, rows = _clean_row(model, x, y, batch_size, seed, device, shards)
        robust = clean_ok.clone()
        traces = {}
    stage_specs: dict[str, AttackSpec] = dict(prior.specs) if prior is not None else {}
    for b in built:
        threat_text = b.threat.describe() if b.threat is not None else _describe_stage(b)
        group_ok = clean_ok.clone()
        # a row's own accuracy is known when its group attacked every clean-correct point
        own_known = mode == "independent" or bool(torch.equal(robust, clean_ok))
        for name, attack, category in b.stages:
            while name in outcomes:  # a row of the prior table has this name
                name = f"{name} (again)"
            stage_specs[name] = b.spec
            base = robust if mode == "cascade" else group_ok
            idx = base.nonzero().squeeze(1)
            core = traced_core(attack) if trace else None
            recorder = None
            if core is not None:
                from jeat.attacks.trace import LossTrace

                recorder = LossTrace(n, core[1], core[0].steps)
                core[0].recorder = recorder
                traces[name] = recorder
            t0 = time.perf_counter()
            try:
                ok = _run_stage(
                    model, name, attack, b.threat, x, y, idx, batch_size, seed, device, progress,
                    shards, recorder, notes,
                )  # fmt: skip
            finally:
                if core is not None:
                    core[0].recorder = None
            secs = time.perf_counter() - t0
            outcome = torch.full((n,), -1, dtype=torch.int8)
            outcome[idx] = ok.to(torch.int8)
            outcomes[name] = outcome
            if mode == "cascade":
                robust[idx[~ok]] = False
            group_ok[idx[~ok]] = False
            if mode == "independent":
                robust &= group_ok
            rows.append(
                AttackResult(
                    name,
                    category,
                    threat_text,
                    n,
                    len(idx),
                    int((~ok).sum()),
                    pct(group_ok.sum(), n) if own_known else None,
                    pct(robust.sum(), n),
                    secs,
                    b.spec.label,
                )
            )
    result = EvalResult(
        threat.norm,
        threat.eps,
        mode,
        rows,
        pct(robust.sum(), n),
        robust=robust,
        outcomes=outcomes,
        labels=y.cpu(),
        traces=traces,
        specs=stage_specs,
    )
    warnings = table_warnings(result, built, sanity_tolerance) + notes
    if prior is not None:
        result.points, result.point_notes = prior.points, list(prior.point_notes)
        warnings = [*prior.warnings, *(w for w in warnings if w not in prior.warnings)]
    result.warnings = warnings
    return result


def _describe_stage(b: BuiltAttack) -> str:
    attack = b.stages[0][1]
    h, w = getattr(attack, "height", None), getattr(attack, "width", None)
    return f"patch {h}x{w}" if h is not None else "-"


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with none."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _collect(data: Any) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors from a pair of tensors or from an iterable of ``(x, y)`` batches (a
    ``DataLoader``), on the host."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
        if not isinstance(y, Tensor):
            y = torch.as_tensor(y)
        return x, y
    if isinstance(data, Tensor):
        raise JeatError("data must be (x, y): images and their labels, not images alone")
    xs, ys = [], []
    try:
        batches = iter(data)
    except TypeError:
        raise JeatError(
            f"data must be (x, y) tensors or a DataLoader of (x, y) batches, got "
            f"{type(data).__name__}"
        ) from None
    for batch in batches:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise JeatError("every batch of the DataLoader must be (images, labels)")
        xs.append(torch.as_tensor(batch[0]).detach().cpu())
        ys.append(torch.as_tensor(batch[1]).detach().cpu())
    if not xs:
        raise JeatError("the DataLoader gave no batches")
    return torch.cat(xs), torch.cat(ys)


def evaluate_model(
    model: nn.Module,
    data: Any,
    attacks: str | list[str] | None = None,
    *,
    eps: float,
    norm: str = "linf",
    mode: str = "cascade",
    batch_size: int = 256,
    seed: int = 0,
    num_classes: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """The notebook API, also reachable as ``jeat.evaluate(model, data, ...)``: the robustness
    table of any classifier that returns logits for images in [0, 1].

    ``data`` is ``(x, y)`` tensors or a ``DataLoader`` of ``(x, y)`` batches; the attacks run on
    the model's device (the data follow it). ``attacks`` default to the main job's table
    (``eval.attacks`` of the default config); ``eps`` is in [0, 1] pixel units under ``norm``
    (``linf`` or ``l2``). Returns the :class:`EvalResult` that ``jeat eval`` prints
    (``.table()``, ``.markdown()``, ``.csv()``, ``.to_dict()``, ``.rows``)."""
    from jeat.config import load_config

    if not isinstance(model, nn.Module):
        raise JeatError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x, y = _collect(data)
    if attacks is None:
        attacks = list(load_config(None).eval.attacks)
    threat = make_threat(str(norm).lower(), check_budget(norm, eps, tuple(x.shape[1:])))
    return evaluate(
        model,
        x,
        y,
        attacks,
        threat,
        batch_size=batch_size,
        seed=seed,
        mode=mode,
        num_classes=num_classes,
        progress=progress,
    )


class _CallableModule(types.ModuleType):
    """``jeat.evaluate(model, data, ...)`` calls :func:`evaluate_model`, while
    ``jeat.evaluate`` stays this module (``from jeat.evaluate import evaluate``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> EvalResult:
        return evaluate_model(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
