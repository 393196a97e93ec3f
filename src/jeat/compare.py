"""Runs side by side on one self-contained HTML page (``jeat compare RUN [RUN ...]``).

The page opens with the headline table of :mod:`jeat.report` (clean and worst-case robust
accuracy, judge-FID, precision and recall, training time), one row per run and a reference
row of real test images, then, per dataset, the trade-off between robustness and generation
(:func:`tradeoff_png`: worst-case robust accuracy against judge-FID and against recall, one
point per run, the Pareto front marked), the runs' robustness curves on one plot with their
attack tables side by side, their sample grids in a row (each image's judge verdict on hover),
and their energy landscapes together (flatness numbers in one table, the energy distributions
and flatness bars in one figure each), and last the runs' folders and the config keys in which
they differ.

A *study folder* (``summary.json`` with ``"kind": "jeat-study"``, written by
``benchmarks/study.py``) is compared group by group: its headline shows each group's mean and
interval ``mean [low, high]`` over seeds, a table lists its differences with their verdicts,
the trade-off plot shows each group's mean with its interval in both directions, and the
other plots use the groups' own run folders (curves as the mean over seeds with the range
shaded, seed 0's samples, flatness numbers averaged over seeds). A study may span datasets;
each gets its own sections. :func:`write_tradeoff_plots` writes a study's trade-off plots as
PNG files (``benchmarks/study.py`` puts them in the study folder).

The energy figures come from each run's saved ``analysis/analysis.json`` (the histograms as
box plots of its saved quantiles); with ``reanalyze=True`` (``--reanalyze``) the models are
analysed again together by :func:`jeat.finish.final_analysis`, on the same images and random
directions as ``jeat analyze RUN RUN ...``, which gives true histograms.

Runs trained on different datasets are refused unless ``allow_mixed=True``; then each dataset
gets its own sections. Like :mod:`jeat.report`, the page has no scripts and no external
references: images are embedded PNGs.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jeat.errors import JeatError
from jeat.report import (
    REFERENCE_LABEL,
    _cmds,
    _e,
    _energy_setup,
    _figure_png,
    _fmt,
    _img,
    _load_run,
    _missing,
    _page,
    _png_file,
    _read_json,
    _Run,
    _table,
    flatness_table,
    headline_table,
    reference_metrics,
    run_results,
    sample_grid,
)
from jeat.utils import atomic_write, pyplot

__all__ = [
    "SEEDS_LABEL",
    "STUDY_KIND",
    "compare",
    "pareto_front",
    "render_compare",
    "tradeoff_png",
    "write_tradeoff_plots",
]

STUDY_KIND = "jeat-study"
STUDY_VERSION = 1

# every metric of a study's groups, in table order: (key, column title, digits)
STUDY_METRICS = (
    ("clean", "clean %", 2),
    ("pgd20", "PGD-20 %", 2),
    ("autoattack_fast", "AutoAttack-fast %", 2),
    ("worst_case", "worst-case %", 2),
    *(
        (f"{key}_{m}", f"{title} ({name})", digits)
        for m, name in (("descent", "descent"), ("sgld", "SGLD"))
        for key, title, digits in (
            ("fid", "judge-FID", 2),
            ("precision", "precision", 3),
            ("recall", "recall", 3),
            ("density", "density", 3),
            ("coverage", "coverage", 3),
            ("diversity", "diversity", 3),
            ("judge_acc", "judge acc. %", 1),
            ("is", "judge-IS", 3),
        )
    ),
    ("train_seconds", "training s", 1),
)
# the samplers whose scores a run or a study can carry: (key suffix, name)
SAMPLERS = (("descent", "seeded descent"), ("sgld", "SGLD"))
# the trade-off plot's x axes: (key prefix, name, higher is better)
TRADEOFF_AXES = (("fid", "judge-FID", False), ("recall", "recall", True))


@dataclass
class _Entry:
    """One column of the comparison: a run, or a study's group (its seeds' runs)."""

    label: str
    dataset: str
    runs: list[_Run]
    metrics: dict[str, Any]
    objective: str
    seeds: int | None = None  # a study group's n_seeds
    absent: list[str] = field(default_factory=list)  # a study group's runs that are missing

    @property
    def first(self) -> _Run | None:
        return self.runs[0] if self.runs else None


@dataclass
class _Study:
    root: Path
    summary: dict[str, Any]


# ------------------------------------------------------------------------------------ input
def _is_study(path: Path) -> bool:
    return path.is_dir() and (path / "summary.json").exists() and not (path / "run.json").exists()


def _load_study(root: Path) -> tuple[_Study, list[_Entry]]:
    summary = _read_json(root / "summary.json")
    if not isinstance(summary, dict) or summary.get("kind") != STUDY_KIND:
        kind = summary.get("kind") if isinstance(summary, dict) else None
        raise JeatError(
            f"{root / 'summary.json'} is not a jeat study summary (kind {kind!r}, expected "
            f"{STUDY_KIND!r})"
        )
    if summary.get("version") != STUDY_VERSION:
        raise JeatError(
            f"{root / 'summary.json'} is study format version {summary.get('version')!r}; this "
            f"jeat reads version {STUDY_VERSION}"
        )
    groups = summary.get("groups")
    if not isinstance(groups, list) or not groups:
        raise JeatError(f"{root / 'summary.json'} lists no groups")
    entries = []
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or not g.get("dataset") or not g.get("variant"):
            raise JeatError(f"{root / 'summary.json'} group {i} lacks a dataset or a variant")
        runs, absent = [], []
        for rel in g.get("runs") or []:
            folder = root / rel
            if (folder / "run.json").exists() and (folder / "config.yaml").exists():
                runs.append(_load_run(folder))
            else:
                absent.append(str(rel))
        objective = runs[0].info.get("objective", "?") if runs else "?"
        entries.append(
            _Entry(
                label=str(g["variant"]),
                dataset=str(g["dataset"]),
                runs=runs,
                metrics=dict(g.get("metrics") or {}),
                objective=str(objective),
                seeds=g.get("n_seeds"),
                absent=absent,
            )
        )
    return _Study(root, summary), entries


def _run_labels(runs: list[_Run], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        labels = [str(x) for x in labels]
        if len(labels) != len(runs):
            raise JeatError(f"--labels names {len(labels)} runs, but {len(runs)} are compared")
        if len(set(labels)) != len(labels) or not all(labels):
            raise JeatError("--labels must be distinct and non-empty")
        return labels
    out: list[str] = []
    for r in runs:
        name = r.root.name or str(r.root)
        if name in out:
            name = f"{r.root.parent.name}/{name}"
        while name in out:
            name += "'"
        out.append(name)
    return out


def _load(
    paths: Sequence[str | Path], allow_mixed: bool, labels: Sequence[str] | None
) -> tuple[_Study | None, list[_Entry]]:
    if not paths:
        raise JeatError("name at least one run folder (or one study folder) to compare")
    folders = [Path(p) for p in paths]
    for f in folders:
        if not f.exists():
            raise JeatError(f"{f} does not exist")
        if not f.is_dir():
            raise JeatError(f"{f} is not a folder: give run folders or a study folder")
    studies = [f for f in folders if _is_study(f)]
    if studies:
        if len(folders) > 1:
            raise JeatError("compare one study folder on its own, or run folders; not both")
        if labels is not None:
            raise JeatError("--labels names runs; a study's groups keep their variant names")
        return _load_study(studies[0])
    runs = []
    for f in folders:
        if not (f / "config.yaml").exists() or not (f / "run.json").exists():
            raise JeatError(
                f"{f} is not a jeat run folder (no config.yaml and run.json) nor a study "
                "folder (no summary.json)"
            )
        runs.append(_load_run(f))
    entries = [
        _Entry(
            label=label,
            dataset=str(r.info.get("dataset", "?")),
            runs=[r],
            metrics=run_results(r.root),
            objective=str(r.info.get("objective", "?")),
        )
        for r, label in zip(runs, _run_labels(runs, labels), strict=True)
    ]
    datasets = list(dict.fromkeys(e.dataset for e in entries))
    if len(datasets) > 1 and not allow_mixed:
        which = ", ".join(f"{e.label}: {e.dataset}" for e in entries)
        raise JeatError(
            f"the runs were trained on different datasets ({which}); compare runs of one "
            "dataset, or pass --allow-mixed"
        )
    return None, entries


# --------------------------------------------------------------------------------- sections
def _methods(entries: list[_Entry]) -> list[str]:
    return [m for m, _ in SAMPLERS if any(f"fid_{m}" in e.metrics for e in entries)]


def _references(entries: list[_Entry], study: _Study | None) -> dict[str, dict[str, Any]]:
    """Per dataset, the reference's numbers under the samplers' keys (:func:`reference_metrics`):
    a study's recorded ones, else those of the first run of the dataset that has them."""
    out: dict[str, dict[str, Any]] = {}
    for dataset in dict.fromkeys(e.dataset for e in entries):
        group = [e for e in entries if e.dataset == dataset]
        if study is not None:
            ref = (study.summary.get("reference") or {}).get(dataset) or {}
            flat = {f"ref_{k}": v for k, v in ref.items() if isinstance(v, (int, float))}
        else:
            flat = next((e.metrics for e in group if "ref_fid" in e.metrics), {})
        metrics = reference_metrics(flat, _methods(group) or [m for m, _ in SAMPLERS])
        if metrics:
            out[dataset] = metrics
    return out


def _headline(entries: list[_Entry], study: _Study | None) -> str:
    refs = _references(entries, study)
    ref_note = (
        f"<p>{_e(REFERENCE_LABEL)}: real test images scored like samples, against the same "
        "training images with the same judge; the floor every generation score is read "
        "against.</p>"
        if refs
        else ""
    )
    if study is None:
        rows = [([e.label, e.objective, e.dataset], e.metrics) for e in entries]
        rows += [([REFERENCE_LABEL, "", d], m) for d, m in refs.items()]
        parts = [headline_table(rows, ["run", "objective", "dataset"])]
        parts.append(
            "<p>Each run's own evaluation (<code>eval.json</code>: worst case over its attack "
            "table) and judge scores (<code>scores.json</code>); training time is the sum of its "
            "epochs. A missing number (-) is a file the run does not have yet.</p>" + ref_note
        )
        return "".join(parts)
    rows = [([e.label, e.dataset, _fmt(e.seeds)], e.metrics) for e in entries]
    rows += [([REFERENCE_LABEL, d, "-"], m) for d, m in refs.items()]
    s = study.summary
    level = f" at level {s['level']}" if isinstance(s.get("level"), (int, float)) else ""
    return (
        f"<p>Study <code>{_e(study.root)}</code>, budget {_e(s.get('budget', '?'))}, commit "
        f"<code>{_e(s.get('commit') or 'unknown')}</code>. Each cell is the mean over seeds "
        f"and its interval [low, high]{_e(level)} (a single number when there is one seed).</p>"
        + headline_table(rows, ["variant", "dataset", "seeds"])
        + ref_note
        + "<h3>Every metric</h3>"
        + headline_table(rows, ["variant", "dataset", "seeds"], STUDY_METRICS)
    )


def _differences(study: _Study, dataset: str) -> str:
    diffs = [d for d in study.summary.get("differences") or [] if d.get("dataset") == dataset]
    if not diffs:
        return "<p>The study lists no differences for this dataset.</p>"
    rows = []
    for d in diffs:
        low, high = d.get("low"), d.get("high")
        interval = "-" if low is None or high is None else f"[{_fmt(low)}, {_fmt(high)}]"
        rows.append(
            [
                f"{d.get('a')} − {d.get('b')}",
                d.get("metric"),
                _fmt(d.get("mean")),
                interval,
                d.get("n"),
                d.get("verdict", "-"),
            ]
        )
    return "<p>Paired differences a − b over seeds, as the study computed them.</p>" + _table(
        ["a − b", "metric", "mean", "interval", "n", "verdict"], rows
    )


# ------------------------------------------------------------------------- trade-off plot
def pareto_front(points: Sequence[tuple[float, float]], higher_x_better: bool) -> list[int]:
    """Indices of the points ``(x, y)`` on the Pareto front: those no other point matches or
    beats on both axes while beating on one. Higher ``y`` is better; higher ``x`` too when
    ``higher_x_better``, else lower (an FID)."""
    front = []
    for i, (xi, yi) in enumerate(points):
        beaten = False
        for j, (xj, yj) in enumerate(points):
            if j == i:
                continue
            x_ok, x_better = (xj >= xi, xj > xi) if higher_x_better else (xj <= xi, xj < xi)
            if x_ok and yj >= yi and (x_better or yj > yi):
                beaten = True
                break
        if not beaten:
            front.append(i)
    return front


def _estimate(value: Any) -> tuple[float, float | None, float | None] | None:
    """``(mean, low, high)`` of a number (no interval) or of a study's ``{"mean", "low",
    "high"}``; None when there is no value."""
    if value is None:
        return None
    if isinstance(value, dict):
        mean = value.get("mean")
        if mean is None:
            return None
        low, high = value.get("low"), value.get("high")
        if low is None or high is None:
            return float(mean), None, None
        return float(mean), float(low), float(high)
    return float(value), None, None


SEEDS_LABEL = "class-Gaussian seeds alone (no model)"


def log_axis(values: Sequence[float], higher: bool) -> bool:
    """Whether a trade-off panel's x axis is logarithmic: FIDs (lower is better) that span
    more than a factor of 20, as a standard model's next to JEM's do, so that the robust
    models' points do not collapse onto one line."""
    return not higher and min(values) > 0 and max(values) / min(values) > 20


def tradeoff_png(
    points: Sequence[tuple[str, dict[str, Any]]],
    reference: dict[str, Any] | None = None,
    title: str = "",
    seeds: dict[str, Any] | None = None,
) -> bytes | None:
    """Worst-case robust accuracy (``worst_case``) against judge-FID and against recall, one
    panel per sampler whose scores any point has: each ``(label, metrics)`` is one point, at a
    study group's mean with its interval in both directions (``{"mean", "low", "high"}``) or
    a run's numbers without bars. The points on the Pareto front (:func:`pareto_front`: more
    robust and lower FID / higher recall are better) are ringed and joined by a dashed line;
    ``reference`` (numbers under the same keys) is drawn as a dotted vertical line, and
    ``seeds`` (the same scores of the samplers' starting points, no model involved) as a
    dash-dotted one. Returns the PNG, or None when no point has both a robust accuracy and a
    generation score."""
    panels = []
    for key, name, higher in TRADEOFF_AXES:
        for m, sampler in SAMPLERS:
            pts = []
            for label, metrics in points:
                x, y = _estimate(metrics.get(f"{key}_{m}")), _estimate(metrics.get("worst_case"))
                if x is not None and y is not None:
                    pts.append((label, x, y))
            if pts:
                panels.append((key, name, higher, m, sampler, pts))
    if not panels:
        return None
    # one row per sampler, one column per generation score
    samplers = [m for m, _ in SAMPLERS if any(p[3] == m for p in panels)]
    axes_keys = [k for k, _, _ in TRADEOFF_AXES if any(p[0] == k for p in panels)]
    plt = pyplot()
    nrows, ncols = len(samplers), len(axes_keys)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 4.2 * nrows), dpi=100,
                             squeeze=False)  # fmt: skip
    for ax in axes.flat:
        ax.set_visible(False)
    # a colour per point, and a marker per ten of them, the same in every panel
    styles = {label: (f"C{i % 10}", "osD^v"[i // 10 % 5]) for i, (label, _) in enumerate(points)}
    for key, name, higher, m, sampler, pts in panels:
        ax = axes[samplers.index(m)][axes_keys.index(key)]
        ax.set_visible(True)
        ys = [y[0] for _, _, y in pts]
        if max(ys) - min(ys) < 1:  # one level of robustness: a readable range around it
            ax.set_ylim(min(ys) - 5, max(ys) + 5)
        xs = [x[0] for _, x, _ in pts]
        log_x = log_axis(xs, higher)
        if log_x:  # an interval's lower end below zero is drawn to the axis' edge
            ax.set_xscale("log")
        for label, (x, xlo, xhi), (y, ylo, yhi) in pts:
            if log_x and xlo is not None:
                xlo = max(xlo, min(xs) / 4)
            xerr = None if xlo is None or xhi is None else [[x - xlo], [xhi - x]]
            yerr = None if ylo is None or yhi is None else [[y - ylo], [yhi - y]]
            colour, marker = styles[label]
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt=marker, ms=5, capsize=2, lw=0.9,
                        color=colour)  # fmt: skip
            ax.annotate(label, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
        front = pareto_front([(x[0], y[0]) for _, x, y in pts], higher)
        fx = [pts[i][1][0] for i in front]
        fy = [pts[i][2][0] for i in front]
        order = sorted(range(len(front)), key=lambda i: fx[i])
        ax.plot([fx[i] for i in order], [fy[i] for i in order], "k--", lw=0.8,
                label="Pareto front")  # fmt: skip
        ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="k", lw=1.2, zorder=3)
        ref = (reference or {}).get(f"{key}_{m}")
        if isinstance(ref, (int, float)):
            ax.axvline(float(ref), color="0.4", ls=":", lw=1.2, label=REFERENCE_LABEL)
        start = (seeds or {}).get(f"{key}_{m}")
        if isinstance(start, (int, float)):
            ax.axvline(float(start), color="tab:red", ls="-.", lw=1.0, label=SEEDS_LABEL)
        better = "higher" if higher else "lower"
        scale = ", log scale" if log_x else ""
        ax.set_xlabel(f"{name}, {sampler} ({better} is better{scale})")
        ax.set_ylabel("worst-case robust accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _figure_png(fig)


_TRADEOFF_TEXT = (
    "<p>Each point is one {what}: worst-case robust accuracy (the per-point worst case over "
    "its attack table{aa}) against the judge-FID and the recall of its generated samples, per "
    "sampler. {bars} Ringed points joined by the dashed line form the Pareto front: no other "
    "{what} is both more robust and better on that generation score. The dotted line is the "
    "same score of real test images (the reference), where there is one; the dash-dotted line "
    "the same score of the samplers' starting points alone (class-Gaussian seeds, no model), "
    "where a study recorded it.</p>"
)


def _tradeoff(
    entries: list[_Entry], study: _Study | None, reference: dict[str, Any] | None, dataset: str
) -> str:
    png = tradeoff_png([(e.label, e.metrics) for e in entries], reference, dataset)
    if png is None:
        return _missing(
            "No run has both a robustness table (eval.json) and generation scores "
            "(scores.json) yet, so there is no trade-off to draw."
        )
    if study is not None:
        level = study.summary.get("level", 0.95)
        bars = (
            f"Points are means over seeds, bars their {100 * float(level):.0f}% t-intervals in "
            "both directions (none for a single seed)."
        )
        text = _TRADEOFF_TEXT.format(what="variant", aa=": PGD-20 and autoattack-fast", bars=bars)
    else:
        text = _TRADEOFF_TEXT.format(what="run", aa="", bars="Single runs: no bars.")
    return _img(png, "robust accuracy against generation scores", dataset) + text


def write_tradeoff_plots(summary: dict[str, Any], folder: str | Path) -> dict[str, Path]:
    """Write the trade-off plot (:func:`tradeoff_png`) of each dataset of a study summary
    (``summary.json``'s groups, and its ``reference`` per dataset when recorded) to
    ``FOLDER/tradeoff-DATASET.png``; returns ``{dataset: path}`` of those written (none for a
    dataset without points)."""
    out = {}
    refs = summary.get("reference") or {}
    starts = summary.get("seeds_reference") or {}
    groups = summary.get("groups") or []
    level = float(summary.get("level", 0.95))
    for dataset in dict.fromkeys(g["dataset"] for g in groups):
        points = [(g["variant"], g.get("metrics") or {}) for g in groups if g["dataset"] == dataset]
        flat = {f"ref_{k}": v for k, v in (refs.get(dataset) or {}).items()}
        ref = reference_metrics(flat, [m for m, _ in SAMPLERS])
        title = f"{dataset}: mean over seeds, {100 * level:.0f}% t-intervals"
        start = starts.get(dataset) or {}
        seeds = {f"{k}_{m}": start.get(k) for k in start for m, _ in SAMPLERS}
        png = tradeoff_png(points, ref, title, seeds or None)
        if png is None:
            continue
        path = Path(folder) / f"tradeoff-{re.sub(r'[^A-Za-z0-9._-]+', '-', dataset)}.png"
        with atomic_write(path, "wb") as fh:
            fh.write(png)
        out[dataset] = path
    return out


def _curves(e: _Entry) -> list[dict[str, Any]]:
    out = []
    for r in e.runs:
        path = r.root / "eval.json"
        if path.exists():
            curve = _read_json(path).get("curve")
            if curve and curve.get("eps") and curve.get("accuracy"):
                out.append(curve)
    return out


def _curve_plot(entries: list[_Entry], curves: dict[str, list[dict[str, Any]]]) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    norms = set()
    for i, e in enumerate(entries):
        cs = curves[e.label]
        if not cs:
            continue
        c0, colour = cs[0], f"C{i % 10}"
        norms.add(c0.get("norm", "?"))
        same = all(c["eps"] == c0["eps"] and c.get("attack") == c0.get("attack") for c in cs)
        label = f"{e.label} ({c0.get('attack')}, {c0.get('n')} points)"
        if same and len(cs) > 1:
            acc = [[float(v) for v in c["accuracy"]] for c in cs]
            mean = [sum(col) / len(col) for col in zip(*acc, strict=True)]
            lo = [min(col) for col in zip(*acc, strict=True)]
            hi = [max(col) for col in zip(*acc, strict=True)]
            ax.plot(c0["eps"], mean, marker="o", ms=3, color=colour,
                    label=f"{label}, mean of {len(cs)} seeds")  # fmt: skip
            ax.fill_between(c0["eps"], lo, hi, color=colour, alpha=0.15)
        else:
            ax.plot(c0["eps"], c0["accuracy"], marker="o", ms=3, color=colour, label=label)
    ax.set_xlabel(f"eps ({', '.join(sorted(norms))})")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("accuracy under attack against the budget", fontsize=10)
    fig.tight_layout()
    return _figure_png(fig)


def _attack_table(entries: list[_Entry]) -> str:
    """Rows: every attack of any run's table; columns: the entries (mean over a group's runs)."""
    values: dict[str, dict[str, list[float]]] = {}
    for e in entries:
        for r in e.runs:
            path = r.root / "eval.json"
            if not path.exists():
                continue
            ev = _read_json(path)
            for a in ev.get("attacks") or []:
                if a.get("accuracy") is not None:
                    name = str(a.get("attack"))
                    values.setdefault(name, {}).setdefault(e.label, []).append(float(a["accuracy"]))
            if ev.get("robust_accuracy") is not None:
                values.setdefault("worst case", {}).setdefault(e.label, []).append(
                    float(ev["robust_accuracy"])
                )
    if not values:
        return ""
    worst = values.pop("worst case", {})
    rows = []
    for name, per in [*values.items(), ("worst case", worst)]:
        cells = []
        for e in entries:
            v = per.get(e.label)
            cells.append(
                "-" if not v else _fmt(sum(v) / len(v)) + (f" ({len(v)})" if len(v) > 1 else "")
            )
        rows.append([name, *cells])
    note = (
        "<p>Accuracy (%) under each attack of the runs' tables; a study group shows the mean "
        "over its seeds and, in parentheses, how many.</p>"
        if any(len(e.runs) > 1 for e in entries)
        else "<p>Accuracy (%) under each attack of the runs' tables.</p>"
    )
    return note + _table(["attack", *(e.label for e in entries)], rows)


def _robustness(entries: list[_Entry]) -> str:
    curves = {e.label: _curves(e) for e in entries}
    parts = []
    if any(curves.values()):
        parts.append(_img(_curve_plot(entries, curves), "robustness curves",
                          "robust accuracy against eps, from each run's eval.json"))  # fmt: skip
    without = [e for e in entries if not curves[e.label]]
    if without:
        parts.append(
            _missing(
                "No robustness curve for " + ", ".join(e.label for e in without) + ".",
                *(f"jeat eval {e.first.q} --curve pgd20" for e in without if e.first),
            )
        )
    table = _attack_table(entries)
    parts.append(table or _missing("No run has a robustness table (eval.json) yet."))
    return "".join(parts)


def _samples(entries: list[_Entry]) -> str:
    parts, missing = [], []
    for e in entries:
        r = e.first
        # samples.png (jeat train, jeat generate), or one grid per sampler (samples-sgld.png)
        grids = sorted(r.root.glob("samples*.png")) if r is not None else []
        if not grids:
            missing.append(e)
        for png in grids:
            what = [png.stem.removeprefix("samples").lstrip("-")]
            if e.seeds:
                what.append(f"seed {r.config.get('seed', '?')}")
            caption = e.label + "".join(f", {w}" for w in what if w)
            parts.append(sample_grid(png, caption, width=240))
    if missing:
        parts.append(
            _missing(
                "No sample grid for " + ", ".join(e.label for e in missing) + ".",
                *(f"jeat generate {e.first.q}" for e in missing if e.first),
            )
        )
    return (
        "<p>One row per class (each run's own <code>generate</code> settings), every image "
        "from its own chain; hover an image for its chain seed and the judge's verdict.</p>"
        + "".join(parts)
    )


def _saved_analyses(e: _Entry) -> list[dict[str, Any]]:
    out = []
    for r in e.runs:
        path = r.root / "analysis" / "analysis.json"
        if path.exists():
            a = _read_json(path)
            if a.get("models"):
                out.append(a)
    return out


def _mean_flatness(analyses: list[dict[str, Any]]) -> tuple[dict[str, Any], float | None]:
    """A run's flatness numbers (its analysis' first model), or their mean over a group's
    seeds."""
    flats = [a["flatness"][a["models"][0]] for a in analyses]
    rises = [a["contour"][a["models"][0]]["rise_mean"] for a in analyses]
    keys = [k for k in flats[0] if all(isinstance(f.get(k), (int, float)) for f in flats)]
    mean = {k: sum(float(f[k]) for f in flats) / len(flats) for k in keys}
    return mean, sum(rises) / len(rises)


def _distribution_plot(entries: list[_Entry], analyses: dict[str, dict[str, Any]]) -> bytes:
    """One panel per entry: box plots of E(x) of real, adversarial, generated and noise inputs
    from the saved quantiles (box q25-q75, line the median, whiskers q05-q95)."""
    from jeat.analysis import HIST_KINDS

    plt = pyplot()
    names = [e.label for e in entries if e.label in analyses]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), dpi=110,
                             squeeze=False)  # fmt: skip
    colours = {"real": "C0", "adversarial": "C3", "generated": "C2", "noise": "C7"}
    for ax, name in zip(axes[0], names, strict=True):
        a = analyses[name]
        hist = a["histograms"][a["models"][0]]
        kinds = [k for k in HIST_KINDS if hist.get(k, {}).get("n")]
        stats = [
            {"label": k, "whislo": hist[k]["q05"], "q1": hist[k]["q25"], "med": hist[k]["q50"],
             "q3": hist[k]["q75"], "whishi": hist[k]["q95"], "fliers": []}
            for k in kinds
        ]  # fmt: skip
        boxes = ax.bxp(stats, showfliers=False, patch_artist=True)
        for patch, k in zip(boxes["boxes"], kinds, strict=True):
            patch.set_facecolor(colours[k])
            patch.set_alpha(0.5)
        ax.set_title(name, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("E(x) = −logsumexp f(x)")
    fig.tight_layout()
    return _figure_png(fig)


def _flatness_plot(entries: list[_Entry], flats: dict[str, list[dict[str, Any]]]) -> bytes:
    """Bars per entry: mean |ΔE| in the eps-ball and mean ‖∇E‖₂ (over seeds, with their range)."""
    plt = pyplot()
    names = [e.label for e in entries if flats.get(e.label)]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.4 * len(names) + 4), 3.2), dpi=110)
    colours = [f"C{i % 10}" for i in range(len(names))]
    for ax, key, title in ((axes[0], "delta_joint", "mean |E(x+δ,y) − E(x,y)|, δ in the ε-ball"),
                           (axes[1], "grad_joint", "mean ‖∇x E(x,y)‖₂")):  # fmt: skip
        vals = [[float(f[key]) for f in flats[n]] for n in names]
        means = [sum(v) / len(v) for v in vals]
        err = [[m - min(v) for m, v in zip(means, vals, strict=True)],
               [max(v) - m for m, v in zip(means, vals, strict=True)]]  # fmt: skip
        several = any(len(v) > 1 for v in vals)  # a range over seeds to show
        ax.bar(range(len(names)), means, color=colours, yerr=err if several else None, capsize=3)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _figure_png(fig)


def _energy_saved(entries: list[_Entry]) -> str:
    per = {e.label: _saved_analyses(e) for e in entries}
    have = [e for e in entries if per[e.label]]
    parts = []
    if have:
        setups = {(a.get("n"), a.get("eps"), a.get("grid")) for e in have for a in per[e.label]}
        parts.append(_energy_setup(per[have[0].label][0]))
        if len(setups) > 1:
            parts.append(
                '<p class="warn">The runs were analysed with different settings (test images, '
                "ε or grid), so their numbers are not measured alike; "
                "<code>--reanalyze</code> measures them together.</p>"
            )
        rows = []
        for e in have:
            mean, rise = _mean_flatness(per[e.label])
            k = len(per[e.label])
            rows.append((e.label + (f" (mean of {k})" if k > 1 else ""), mean, rise))
        parts.append(flatness_table(rows))
        parts.append(
            _img(_distribution_plot(have, {e.label: per[e.label][0] for e in have}),
                 "energy distributions",
                 "E(x) of real, adversarial, generated and noise inputs, from each run's saved "
                 "quantiles (box: q25-q75, whiskers: q05-q95)")
        )  # fmt: skip
        flats = {e.label: [a["flatness"][a["models"][0]] for a in per[e.label]] for e in have}
        parts.append(_img(_flatness_plot(have, flats), "flatness", "flatness, lower is flatter"))
    without = [e for e in entries if not per[e.label]]
    if without:
        parts.append(
            _missing(
                "No energy analysis (analysis/analysis.json) for "
                + ", ".join(e.label for e in without)
                + "; analyse them, or recompute every run's together with --reanalyze.",
                *(f"jeat analyze {e.first.q}" for e in without if e.first),
            )
        )
    return "".join(parts)


def _energy_recomputed(entries: list[_Entry], device: str) -> str:
    from jeat.data import load_dataset
    from jeat.finish import final_analysis
    from jeat.runs import load_trained

    have = [e for e in entries if e.first is not None]
    if not have:
        return _missing("No run folders to analyse.")
    runs = {}
    for e in have:
        model, _, cfg = load_trained(e.first.root, device=device)
        runs[e.label] = (model, cfg)
    cfg = runs[have[0].label][1]
    data = load_dataset(cfg.data.name, root=cfg.data.root, image_size=cfg.data.image_size)
    with tempfile.TemporaryDirectory(prefix="jeat-compare-") as tmp:
        result = final_analysis(runs, data, tmp)
        a = result.to_dict()
        figures = [
            _png_file(Path(tmp) / f"{name}.png", caption, width=720)
            for name, caption in (
                ("histograms", "E(x) of real, adversarial, generated and noise inputs"),
                ("flatness", "flatness, lower is flatter"),
                ("contour", "E(x + a·d1 + b·d2, y) − E(x, y), mean over images"),
                ("slices", "1-D slices along the adversarial and a random direction"),
            )
        ]
    rows = [(m, a["flatness"][m], a["contour"][m]["rise_mean"]) for m in a["models"]]
    seeds = " (a study group: its first run)" if any(e.seeds for e in have) else ""
    first = " ".join(e.first.q for e in have)
    return (
        f"<p>Analysed again, together{_e(seeds)}: every model on the same images and random "
        "directions, as <code>jeat analyze</code> does with several runs.</p>"
        + _energy_setup(a)
        + flatness_table(rows)
        + "".join(figures)
        + _cmds(f"jeat analyze {first} --out FOLDER")
    )


def _runs(entries: list[_Entry]) -> str:
    rows = []
    for e in entries:
        r = e.first
        folders = ", ".join(str(x.root) for x in e.runs) or "-"
        if e.absent:
            folders += " (missing: " + ", ".join(e.absent) + ")"
        model = r.info.get("model", "?") if r else "?"
        rows.append([e.label, e.objective, e.dataset, model, folders])
    parts = [_table(["run", "objective", "dataset", "model", "folder"], rows)]
    firsts = [(e.label, e.first) for e in entries if e.first is not None]
    flat = {label: _flatten(r.config) for label, r in firsts}
    keys = sorted({k for f in flat.values() for k in f})
    differ = [k for k in keys if len({repr(f.get(k)) for f in flat.values()}) > 1]
    if len(firsts) > 1:
        if differ:
            table = _table(
                ["config key", *(label for label, _ in firsts)],
                [[k, *(_fmt(flat[label].get(k)) for label, _ in firsts)] for k in differ],
            )
            parts.append(
                f"<details><summary>{len(differ)} config keys differ between the runs "
                f"(click to open)</summary>{table}</details>"
            )
        else:
            parts.append("<p>The runs' configs are identical.</p>")
    return "".join(parts)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# ------------------------------------------------------------------------------------- page
def render_compare(
    paths: Sequence[str | Path],
    allow_mixed: bool = False,
    labels: Sequence[str] | None = None,
    reanalyze: bool = False,
    device: str = "cpu",
) -> str:
    """The comparison page of run folders ``paths`` (or of one study folder), as a string.

    ``labels`` name the runs (default: their folder names); runs of different datasets need
    ``allow_mixed``; ``reanalyze`` recomputes the energy analysis of every run together on
    ``device`` instead of reading the runs' saved ones."""
    study, entries = _load(paths, allow_mixed, labels)
    datasets = list(dict.fromkeys(e.dataset for e in entries))
    refs = _references(entries, study)
    sections = [("headline", "Results", _headline(entries, study))]
    for i, dataset in enumerate(datasets):
        group = [e for e in entries if e.dataset == dataset]
        suffix, title = ("", "") if len(datasets) == 1 else (f"-{i + 1}", f" — {dataset}")
        if study is not None:
            sections.append((f"differences{suffix}", f"Differences{title}",
                             _differences(study, dataset)))  # fmt: skip
        energy = _energy_recomputed(group, device) if reanalyze else _energy_saved(group)
        tradeoff = _tradeoff(group, study, refs.get(dataset), dataset)
        sections += [
            (f"tradeoff{suffix}", f"Robustness against generation{title}", tradeoff),
            (f"robustness{suffix}", f"Robustness{title}", _robustness(group)),
            (f"samples{suffix}", f"Samples{title}", _samples(group)),
            (f"energy{suffix}", f"Energy landscape{title}", energy),
        ]
    sections.append(("runs", "Runs", _runs(entries)))
    if study is not None:
        name = study.root.resolve().name or str(study.root)
        title = f"jeat {name}" if "study" in name.lower() else f"jeat study {name}"
    else:
        title = "jeat compare: " + ", ".join(e.label for e in entries)
    sub = f"{len(entries)} {'groups' if study else 'runs'} · {', '.join(datasets)}"
    if study is not None:
        sub += f" · {study.root}"
    return _page(title, sub, sections)


def compare(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    allow_mixed: bool = False,
    labels: Sequence[str] | None = None,
    reanalyze: bool = False,
    device: str = "cpu",
) -> Path:
    """Write the comparison page of ``paths`` (see :func:`render_compare`) to ``out``
    (default: ``compare.html`` in the working directory, or ``STUDY/compare.html`` for a study
    folder), atomically; returns the path. Nothing is written when the input is refused."""
    page = render_compare(paths, allow_mixed, labels, reanalyze, device)
    if out is None:
        first = Path(paths[0])
        out = first / "compare.html" if _is_study(first) else Path("compare.html")
    path = Path(out)
    with atomic_write(path, "w") as fh:
        fh.write(page)
    return path
