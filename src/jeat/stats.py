"""Statistics over seeds: t-intervals, paired differences and the study summary.

A figure from one seed is an anecdote. A study (``benchmarks/study.py``) trains every variant
with several seeds; this module turns the per-seed numbers into

* a mean with its two-sided Student-t confidence interval (:func:`t_interval`):
  ``mean ± t_{1-(1-level)/2, n-1} · sd / sqrt(n)`` with the sample standard deviation
  (``n - 1`` in the denominator);
* the paired difference ``A - B`` per seed (both trained with the same seed) with its
  t-interval and a verdict (:func:`paired_difference`): ``A higher`` when the whole interval
  lies above zero, ``A lower`` when it lies below, ``no difference shown`` when it contains
  zero;
* the study folder's ``summary.json`` (:func:`summarize_study`, :func:`read_summary`) and its
  Markdown table (:func:`summary_markdown`).

With one seed the interval is undefined: ``low``/``high`` are None and the verdict is
:data:`ANECDOTE`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jeat.errors import JeatError

__all__ = [
    "ANECDOTE",
    "NO_DIFFERENCE",
    "STUDY_KIND",
    "STUDY_VERSION",
    "Interval",
    "Difference",
    "t_interval",
    "paired_difference",
    "summarize_study",
    "summary_markdown",
    "read_summary",
]

ANECDOTE = "one seed: an anecdote"
NO_DIFFERENCE = "no difference shown"
STUDY_KIND = "jeat-study"
STUDY_VERSION = 1


@dataclass
class Interval:
    """A mean over seeds with its t-interval (``low``/``high`` None when ``n < 2``)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    values: list[float] = field(default_factory=list)
    sd: float | None = None  # sample standard deviation (None when n < 2)
    level: float = 0.95

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else self.high - self.mean

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "values": list(self.values),
        }

    def text(self, digits: int = 2) -> str:
        """``95.10 ± 1.10`` (``95.10 (one seed: an anecdote)`` when n = 1)."""
        if self.half_width is None:
            return f"{self.mean:.{digits}f} ({ANECDOTE})"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


@dataclass
class Difference:
    """The paired difference ``a - b`` per seed, its t-interval and a verdict."""

    a: str
    b: str
    interval: Interval
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        i = self.interval
        return {
            "a": self.a,
            "b": self.b,
            "mean": i.mean,
            "low": i.low,
            "high": i.high,
            "n": i.n,
            "values": list(i.values),
            "verdict": self.verdict,
        }


def _check_level(level: float) -> None:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise JeatError(f"confidence level must lie strictly between 0 and 1, got {level!r}")


def _numbers(values: Iterable[Any], what: str) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise JeatError(f"{what} must be finite numbers, got {v!r}")
        out.append(float(v))
    if not out:
        raise JeatError(f"{what}: no values (at least one seed is needed)")
    return out


def t_critical(level: float, dof: int) -> float:
    """The two-sided Student-t critical value ``t_{1-(1-level)/2, dof}``."""
    _check_level(level)
    if dof < 1:
        raise JeatError(f"a t-interval needs at least 1 degree of freedom, got {dof}")
    from scipy import stats

    return float(stats.t.ppf(1.0 - (1.0 - level) / 2.0, dof))


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and two-sided t confidence interval of ``values`` (one per seed).

    ``[1, 2, 3]``: mean 2, sd 1, ``t_{0.975, 2} = 4.3027``, half-width
    ``4.3027 / sqrt(3) = 2.484``: ``[-0.484, 4.484]``. With one value the interval is
    undefined (``low``/``high`` None).
    """
    _check_level(level)
    xs = _numbers(values, "values of a t-interval")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return Interval(mean, None, None, n, xs, None, level)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_critical(level, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, xs, sd, level)


def verdict(interval: Interval) -> str:
    """``A higher`` / ``A lower`` when the interval of ``A - B`` excludes zero,
    :data:`NO_DIFFERENCE` when it contains zero, :data:`ANECDOTE` with one seed."""
    if interval.low is None or interval.high is None:
        return ANECDOTE
    if interval.low > 0:
        return "A higher"
    if interval.high < 0:
        return "A lower"
    return NO_DIFFERENCE


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    level: float = 0.95,
    names: tuple[str, str] = ("A", "B"),
) -> Difference:
    """``a[i] - b[i]`` per seed ``i`` (paired: both trained with seed ``i``), its t-interval
    and :func:`verdict`."""
    xa = _numbers(a, f"values of {names[0]}")
    xb = _numbers(b, f"values of {names[1]}")
    if len(xa) != len(xb):
        raise JeatError(
            f"a paired difference needs one value per seed on both sides; {names[0]} has "
            f"{len(xa)}, {names[1]} {len(xb)}"
        )
    interval = t_interval([x - y for x, y in zip(xa, xb, strict=True)], level)
    return Difference(names[0], names[1], interval, verdict(interval))


# ----------------------------------------------------------------- the study summary
def summarize_study(
    cells: Iterable[dict[str, Any]],
    metrics: Sequence[str],
    pairs: Sequence[tuple[str, str]] = (),
    difference_metrics: Sequence[str] = (),
    level: float = 0.95,
    commit: str | None = None,
    budget: str = "full",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``summary.json`` of a study folder from its finished cells.

    Each cell is a dict with ``dataset``, ``variant``, ``seed``, ``run`` (the run folder,
    relative to the study folder) and ``metrics`` (name -> number). Groups are (dataset,
    variant) in the order first seen, their cells sorted by seed; a metric missing or None in
    some cell is summarised over the cells that have it. ``pairs`` ``(a, b)`` give the paired
    differences ``a - b`` of ``difference_metrics`` per dataset, over the seeds both have.
    """
    if budget not in ("full", "smoke"):
        raise JeatError(f"study budget must be 'full' or 'smoke', got {budget!r}")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for cell in cells:
        for key in ("dataset", "variant", "seed", "run", "metrics"):
            if key not in cell:
                raise JeatError(f"study cell {cell.get('run', '?')} lacks '{key}'")
        groups.setdefault((cell["dataset"], cell["variant"]), []).append(cell)
    out_groups = []
    for (dataset, variant), members in groups.items():
        members = sorted(members, key=lambda c: c["seed"])
        seeds = [c["seed"] for c in members]
        if len(set(seeds)) != len(seeds):
            raise JeatError(f"study group {dataset}/{variant} has a seed twice: {seeds}")
        summary: dict[str, Any] = {}
        for m in metrics:
            vals = [c["metrics"].get(m) for c in members]
            vals = [v for v in vals if v is not None]
            summary[m] = t_interval(vals, level).to_dict() if vals else None
        out_groups.append(
            {
                "dataset": dataset,
                "variant": variant,
                "n_seeds": len(members),
                "seeds": seeds,
                # cells without numbers (e.g. a run that diverged): status other than "ok"
                "n_failed": sum(c.get("status", "ok") != "ok" for c in members),
                "metrics": summary,
                "runs": [c["run"] for c in members],
            }
        )
    differences = []
    datasets = list(dict.fromkeys(d for d, _ in groups))
    for dataset in datasets:
        for a, b in pairs:
            if (dataset, a) not in groups or (dataset, b) not in groups:
                continue
            by_a = {c["seed"]: c["metrics"] for c in groups[(dataset, a)]}
            by_b = {c["seed"]: c["metrics"] for c in groups[(dataset, b)]}
            for m in difference_metrics:
                seeds = sorted(
                    s
                    for s in set(by_a) & set(by_b)
                    if by_a[s].get(m) is not None and by_b[s].get(m) is not None
                )
                if not seeds:
                    continue
                d = paired_difference(
                    [by_a[s][m] for s in seeds], [by_b[s][m] for s in seeds], level, (a, b)
                )
                differences.append({"dataset": dataset, "metric": m, "seeds": seeds, **d.to_dict()})
    return {
        "kind": STUDY_KIND,
        "version": STUDY_VERSION,
        "commit": commit,
        "budget": budget,
        "level": level,
        **(extra or {}),
        "groups": out_groups,
        "differences": differences,
    }


def read_summary(folder: str | Path) -> dict[str, Any]:
    """The ``summary.json`` of a study folder, checked for its kind and version."""
    path = Path(folder)
    if path.is_dir():
        path = path / "summary.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise JeatError(f"{path} does not exist; is this a study folder?") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise JeatError(f"cannot read study summary {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("kind") != STUDY_KIND:
        raise JeatError(f"{path} is not a jeat study summary (kind != '{STUDY_KIND}')")
    if data.get("version") != STUDY_VERSION:
        raise JeatError(
            f"{path} is a version {data.get('version')!r} study summary; this jeat reads "
            f"version {STUDY_VERSION}"
        )
    for key in ("groups", "differences"):
        if not isinstance(data.get(key), list):
            raise JeatError(f"{path}: '{key}' must be a list")
    return data


def _cell_text(m: dict[str, Any] | None, digits: int) -> str:
    if m is None:
        return "–"
    if m["low"] is None:
        return f"{m['mean']:.{digits}f} (n=1)"
    return f"{m['mean']:.{digits}f} ± {m['high'] - m['mean']:.{digits}f}"


def summary_markdown(
    summary: dict[str, Any],
    columns: Sequence[tuple[str, str, int]],
    heading: str = "{dataset}",
    extra_rows: dict[str, list[tuple[str, dict[str, float | None]]]] | None = None,
) -> str:
    """Tables of means ± half-widths of the t-intervals per dataset (``columns``: metric key,
    heading, decimals; ``heading``: each table's title, ``{dataset}`` filled in), then the
    paired differences with their verdicts. ``extra_rows`` adds rows of plain numbers (no
    seeds, no interval) under a dataset's table: ``{dataset: [(name, {metric: value})]}``."""
    level = summary.get("level", 0.95)
    lines = []
    datasets = list(dict.fromkeys(g["dataset"] for g in summary["groups"]))
    for dataset in datasets:
        lines += [
            f"### {heading.format(dataset=dataset)}",
            "",
            "| variant | seeds | " + " | ".join(h for _, h, _ in columns) + " |",
            "|---|---|" + "---|" * len(columns),
        ]
        for g in summary["groups"]:
            if g["dataset"] != dataset:
                continue
            cells = [_cell_text(g["metrics"].get(k), d) for k, _, d in columns]
            failed = g.get("n_failed", 0)
            seeds = f"{g['n_seeds'] - failed} ({failed} failed)" if failed else g["n_seeds"]
            lines.append(f"| {g['variant']} | {seeds} | " + " | ".join(cells) + " |")
        for name, values in (extra_rows or {}).get(dataset, []):
            cells = [
                "–" if values.get(k) is None else f"{float(values[k]):.{d}f}" for k, _, d in columns
            ]
            lines.append(f"| {name} | – | " + " | ".join(cells) + " |")
        lines.append("")
    diffs = summary["differences"]
    if diffs:
        lines += [
            f"### Paired differences A − B per seed ({100 * level:.0f}% t-interval)",
            "",
            "| dataset | A | B | metric | seeds | mean | interval | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for d in diffs:
            interval = "–" if d["low"] is None else f"[{d['low']:.2f}, {d['high']:.2f}]"
            lines.append(
                f"| {d['dataset']} | {d['a']} | {d['b']} | {d['metric']} | {d['n']} | "
                f"{d['mean']:.2f} | {interval} | {d['verdict']} |"
            )
        lines.append("")
    return "\n".join(lines)
