"""One self-contained HTML page per run (``jeat report RUN``).

The page collects what a run folder holds (see :mod:`jeat.train` for the layout). It opens with
the results: the headline table (clean and worst-case robust accuracy, judge-FID, precision and
recall, training time; the same table ``jeat compare`` puts runs side by side in, see
:mod:`jeat.compare`) with the reference row of real test images under it, then the run's
facts, training curves drawn from ``metrics.jsonl``, the robustness table and curve
(``eval.json``), the sample grids (each image's class, chain seed and judge verdict on hover
when ``samples.json`` records them), the energy-landscape figures and numbers
(``analysis/``), the generation scores (``scores.json`` and any ``*.scores.json``), a WRM
certificate when there is one, the divergence events, the commands that reproduce the run and,
folded away at the end, the resolved config. Every section says which command line (re)produces
it, and a section whose files are missing says so and gives the command that makes them.

Images are embedded as ``data:`` URIs and the style sheet is inline: the page has no external
references and no scripts, so it opens offline in any browser and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jeat.config import EvalConfig
from jeat.errors import JeatError
from jeat.utils import atomic_write, pyplot

__all__ = [
    "HEADLINE",
    "REFERENCE_LABEL",
    "SCORE_KEYS",
    "SECTIONS",
    "flatness_table",
    "grid_record",
    "headline_table",
    "reference_metrics",
    "sample_grid",
    "render_report",
    "run_results",
    "write_report",
]

# (id, title) of every section, in page order; each is present on every page. A new section
# is one entry here and one builder in _BUILDERS.
SECTIONS = (
    ("headline", "Results"),
    ("summary", "Run"),
    ("training", "Training curves"),
    ("robustness", "Robustness"),
    ("diagnosis", "Why attacks failed"),
    ("samples", "Samples"),
    ("energy", "Energy landscape"),
    ("scores", "Generation scores"),
    ("certificate", "WRM certificate"),
    ("events", "Divergence events"),
    ("reproduce", "Reproduce"),
    ("config", "Configuration"),
)

# The headline metrics, in column order: (key, column title, digits). The keys are those of a
# study's summary.json (benchmarks/study.py); a run's own come from run_results. The judge
# scores carry the sampler: fid_descent, recall_sgld, ... The judge-IS is not among them: with
# ten classes and a confident judge it saturates near 10 for nearly every model (docs/scores.md)
HEADLINE = (
    ("clean", "clean %", 2),
    ("worst_case", "worst-case robust %", 2),
    ("fid_descent", "judge-FID (descent)", 2),
    ("precision_descent", "precision (descent)", 3),
    ("recall_descent", "recall (descent)", 3),
    ("fid_sgld", "judge-FID (SGLD)", 2),
    ("precision_sgld", "precision (SGLD)", 3),
    ("recall_sgld", "recall (SGLD)", 3),
    ("train_seconds", "training s", 1),
)
# the judge scores run_results reads: (key prefix, field of a GenerationScores dict)
SCORE_KEYS = (
    ("fid", "frechet_distance"),
    ("is", "inception_score"),
    ("judge_acc", "accuracy"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("density", "density"),
    ("coverage", "coverage"),
    ("diversity", "diversity"),
)
REFERENCE_LABEL = "real test images (reference)"

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;
background:#fafafa;line-height:1.45}
header{background:#1f3b57;color:#fff;padding:18px 32px}
header h1{margin:0 0 4px 0;font-size:24px}
header p{margin:0;opacity:.85}
nav{padding:8px 32px;background:#e9eef3;font-size:14px}
nav a{margin-right:14px;color:#1f3b57;text-decoration:none}
main{padding:8px 32px 40px 32px;max-width:1200px}
section{background:#fff;border:1px solid #dde3e9;border-radius:6px;margin:18px 0;padding:6px 20px
16px 20px}
h2{font-size:19px;border-bottom:1px solid #eee;padding-bottom:4px}
h3{font-size:15px;margin-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #d5dbe1;padding:3px 8px;text-align:right}
th{background:#f0f3f6}
.headline{overflow-x:auto}
.headline td{white-space:nowrap}
.headline table{font-size:12px}
details>summary{cursor:pointer;margin:8px 0}
td:first-child,th:first-child{text-align:left}
pre,code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
pre{background:#f5f7f9;border:1px solid #e2e6ea;padding:8px;overflow-x:auto}
figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #e2e6ea;image-rendering:pixelated}
figcaption{font-size:12px;color:#555}
.missing{color:#8a5a00;background:#fff7e6;border:1px solid #f3d9a4;padding:6px 10px}
.warn{color:#9b1c1c}
.cmd{margin:4px 0}
.tiles{position:relative;display:inline-block;line-height:0}
.tiles img{display:block;width:100%}
.tiles span{position:absolute}
.tiles span:hover{outline:2px solid #d97706}
.verdicts td{font-size:11px}
.verdicts .off{color:#9b1c1c;font-weight:bold}
"""


@dataclass
class _Run:
    root: Path
    info: dict[str, Any]
    config_text: str
    config: dict[str, Any]

    @property
    def q(self) -> str:
        """The run folder, quoted for a shell."""
        return shlex.quote(str(self.root))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise JeatError(f"cannot read {path}: {exc}") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.exists():
        return rows
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise JeatError(f"{path} line {number} is not JSON") from None
    return rows


def _load_run(root: Path) -> _Run:
    import yaml

    if not root.is_dir():
        raise JeatError(f"{root} is not a run folder")
    if not (root / "config.yaml").exists() or not (root / "run.json").exists():
        raise JeatError(f"{root} is not a jeat run folder (no config.yaml and run.json)")
    text = (root / "config.yaml").read_text()
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise JeatError(f"cannot read {root / 'config.yaml'}: {exc}") from None
    return _Run(root, _read_json(root / "run.json"), text, config)


def _e(value: Any) -> str:
    return html.escape(str(value))


def _img(data: bytes, alt: str, caption: str | None = None, width: int | None = None) -> str:
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    style = f' style="width:{width}px"' if width else ""
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{src}" alt="{_e(alt)}"{style}>{cap}</figure>'


def _png_file(path: Path, caption: str | None = None, width: int | None = None) -> str:
    return _img(path.read_bytes(), path.name, caption or path.name, width)


def _table(head: list[str] | None, rows: list[list[Any]]) -> str:
    out = ["<table>"]
    if head:
        out += ["<thead><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr></thead>"]
    out.append("<tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _cmds(*lines: str) -> str:
    return "".join(f'<pre class="cmd">{_e(line)}</pre>' for line in lines)


def _missing(what: str, *commands: str) -> str:
    return f'<p class="missing">{_e(what)}</p>' + _cmds(*commands)


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """A whole self-contained page: ``sections`` are ``(id, heading, html)`` in page order."""
    nav = "".join(f'<a href="#{sid}">{_e(t)}</a>' for sid, t, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{_e(heading)}</h2>{content}</section>'
        for sid, heading, content in sections
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p>{_e(subtitle)}</p></header><nav>{nav}</nav>"
        f"<main>{body}</main></body></html>\n"
    )


def _figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    plt = pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------- headline
def run_results(root: str | Path) -> dict[str, float]:
    """The headline numbers of run folder ``root`` that its files hold, keyed as in
    :data:`HEADLINE` (plus ``pgd20``, ``autoattack_fast`` and more judge scores): ``clean``,
    ``pgd20``, ``autoattack_fast`` (the last row of its group) and ``worst_case`` (the
    table's robust accuracy) from ``eval.json``; ``fid_METHOD``, ``is_METHOD``,
    ``judge_acc_METHOD``, ``precision_METHOD``, ``recall_METHOD``, ``density_METHOD``,
    ``coverage_METHOD`` and ``diversity_METHOD`` from ``scores.json`` (METHOD: its sampler),
    with the reference's as ``ref_fid``, ``ref_precision``, ...; ``train_seconds`` the sum of
    the epochs' ``epoch_seconds`` in ``metrics.jsonl``. A number whose file is missing is left
    out."""
    root = Path(root)
    out: dict[str, float] = {}
    if (root / "eval.json").exists():
        ev = _read_json(root / "eval.json")
        for a in ev.get("attacks") or []:
            if a.get("accuracy") is None:
                continue
            if a.get("attack") in ("clean", "pgd20"):
                out[str(a["attack"])] = float(a["accuracy"])
            elif str(a.get("attack", "")).startswith("autoattack-fast"):
                out["autoattack_fast"] = float(a["accuracy"])  # the group's last row
        if ev.get("robust_accuracy") is not None:
            out["worst_case"] = float(ev["robust_accuracy"])
    if (root / "scores.json").exists():
        sc = _read_json(root / "scores.json")
        judge, method = sc.get("judge") or {}, sc.get("method") or "descent"
        ref = judge.get("reference") or {}
        for key, field in SCORE_KEYS:
            if judge.get(field) is not None:
                out[f"{key}_{method}"] = float(judge[field])
            if ref.get(field) is not None:
                out[f"ref_{key}"] = float(ref[field])
    rows = _read_jsonl(root / "metrics.jsonl")
    if rows and all("epoch_seconds" in r for r in rows):
        out["train_seconds"] = float(sum(r["epoch_seconds"] for r in rows))
    return out


def _cell(value: Any, digits: int) -> str:
    """A number, or a study's ``{"mean", "low", "high"}`` as ``mean [low, high]``."""
    if isinstance(value, dict):
        mean, low, high = value.get("mean"), value.get("low"), value.get("high")
        if mean is None:
            return "-"
        if low is None or high is None:
            return _fmt(float(mean), digits)
        return (
            f"{_fmt(float(mean), digits)} [{_fmt(float(low), digits)}, {_fmt(float(high), digits)}]"
        )
    return _fmt(None if value is None else float(value), digits)


def headline_table(
    rows: list[tuple[list[Any], dict[str, Any]]],
    lead: list[str],
    metrics: tuple[tuple[str, str, int], ...] = HEADLINE,
) -> str:
    """The headline table: one row per ``(lead values, metrics)``, where ``metrics`` maps a key
    of :data:`HEADLINE` to a number (a run, :func:`run_results`) or to a study's
    ``{"mean", "low", "high", "n"}`` (shown as ``mean [low, high]``). Columns no row has are
    left out; a row lacking a number shows ``-``."""
    keys = [(k, title, d) for k, title, d in metrics if any(k in m for _, m in rows)]
    head = [*lead, *(title for _, title, _ in keys)]
    body = [[*values, *(_cell(m.get(k), d) for k, _, d in keys)] for values, m in rows]
    return f'<div class="headline">{_table(head, body)}</div>'


def reference_metrics(results: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """The reference's numbers (``ref_fid``, ``ref_precision``, ... of :func:`run_results`, or
    a study's reference) under each sampler's headline key (``fid_descent``, ...): the row
    every model's numbers are read against."""
    return {
        f"{key}_{m}": results[f"ref_{key}"]
        for m in methods
        for key, _ in SCORE_KEYS
        if f"ref_{key}" in results
    }


def _headline(run: _Run) -> str:
    results = run_results(run.root)
    i = run.info
    rows = [([i.get("objective", "?"), i.get("dataset", "?")], results)]
    methods = [k.removeprefix("fid_") for k in results if k.startswith("fid_")]
    ref = reference_metrics(results, methods)
    if ref:
        rows.append(([REFERENCE_LABEL, i.get("dataset", "?")], ref))
    table = headline_table(rows, ["objective", "dataset"])
    notes = []
    if "worst_case" not in results:
        notes.append(_missing("No robustness table yet (eval.json).", f"jeat eval {run.q}"))
    else:
        ev = _read_json(run.root / "eval.json")
        attacks = sum(a.get("attack") != "clean" for a in ev.get("attacks") or [])
        notes.append(
            f"<p>Worst case over {_e(attacks)} attacks on "
            f"{_e(ev.get('n'))} test points ({_e(ev.get('threat'))}, ε = "
            f"{_e(_fmt(ev.get('eps'), 4))}); details under "
            '<a href="#robustness">Robustness</a>.</p>'
        )
    if not any(k.startswith("fid_") for k in results):
        notes.append(
            '<p>No generation scores yet: see <a href="#scores">Generation scores</a>.</p>'
        )
    elif ref:
        notes.append(
            f"<p>The {_e(REFERENCE_LABEL)} row scores as many real test images as there are "
            "samples (at most all of them), against the same training images with the same "
            "judge: what a generator whose images the judge cannot tell from real ones would "
            "score. Precision is the share of samples "
            "that look like real images, recall the share of real images the samples reach "
            '(<a href="#scores">Generation scores</a>).</p>'
        )
    return table + "".join(notes)


# ---------------------------------------------------------------------------- sections
def _summary(run: _Run) -> str:
    i = run.info
    model = i.get("model", "?")
    opts = ", ".join(f"{k}={v}" for k, v in (i.get("model_options") or {}).items())
    rows = [
        ["objective", i.get("objective", "?")],
        [
            "dataset",
            f"{i.get('dataset', '?')} ({i.get('train_size', '?')} train / "
            f"{i.get('test_size', '?')} test images)",
        ],
        ["model", f"{model} ({opts})" if opts else model],
        ["epochs", run.config.get("epochs", "?")],
        ["seed", run.config.get("seed", "?")],
        ["device", i.get("device", "?")],
        [
            "versions",
            f"jeat {i.get('jeat_version', '?')}, torch {i.get('torch_version', '?')}, "
            f"Python {i.get('python', '?')}",
        ],
        ["platform", i.get("platform", "?")],
        ["folder", str(run.root)],
    ]
    return _table(None, rows)


def _reproduce(run: _Run) -> str:
    argv = run.info.get("argv") or []
    train = shlex.join(str(a) for a in argv) if argv else "(not recorded)"
    eval_cfg = run.config.get("eval") or {}
    attacks = ",".join(eval_cfg.get("attacks") or EvalConfig().attacks)
    return (
        "<p>The training command as it was run, then the commands that rebuild each section "
        "from the trained model (the final steps of <code>jeat train</code> ran them "
        "already):</p>"
        + _cmds(
            train,
            f"jeat train --config {run.q}/config.yaml --out NEW_FOLDER   # the same run again",
            f"jeat eval {run.q} --attacks {attacks} --mode independent --curve "
            f"{eval_cfg.get('curve') or 'pgd20'}",
            f"jeat generate {run.q}",
            f"jeat analyze {run.q}",
            f"jeat score SAMPLES.npz --against {run.info.get('dataset', 'DATASET')}",
            f"jeat report {run.q}",
        )
    )


def _config(run: _Run) -> str:
    return (
        f"<details><summary><code>{_e(run.root / 'config.yaml')}</code> (resolved; click to "
        "open)</summary><pre>" + _e(run.config_text) + "</pre></details>"
    )


def _training_plot(rows: list[dict[str, Any]]) -> bytes:
    plt = pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), dpi=110)
    loss_keys = [k for k in ("train_loss", "train_ce") if any(k in r for r in rows)]
    for k in loss_keys:
        axes[0].plot(epochs, [r.get(k) for r in rows], marker="o", ms=3, label=k)
    axes[0].set_title("training loss")
    for k, label in (
        ("train_acc", "train (on the objective's inputs)"),
        ("val_clean_acc", "validation clean"),
        ("val_pgd_acc", "validation PGD (per-epoch check)"),
        ("test_clean_acc", "test clean"),
        ("test_pgd_acc", "test PGD (per-epoch check)"),
    ):
        if any(k in r for r in rows):
            axes[1].plot(epochs, [r.get(k) for r in rows], marker="o", ms=3, label=label)
    axes[1].set_title("accuracy (%)")
    axes[2].plot(epochs, [r.get("lr") for r in rows], marker="o", ms=3, label="learning rate")
    energy = [k for k in ("train_energy_data", "train_energy_sample") if any(k in r for r in rows)]
    if energy:
        twin = axes[2].twinx()
        for k in energy:
            twin.plot(epochs, [r.get(k) for r in rows], ls="--", label=k)
        twin.set_ylabel("energy")
        twin.legend(fontsize=7, loc="lower right")
    axes[2].set_title("learning rate (and energies)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _figure_png(fig)


def _training(run: _Run) -> str:
    rows = _read_jsonl(run.root / "metrics.jsonl")
    if not rows:
        return _missing("No epochs logged yet (metrics.jsonl is empty or missing).")
    keys = [k for k in rows[-1] if k not in ("step",)]
    last = rows[-1]
    table = _table(keys, [[_fmt(last.get(k), 4) for k in keys]])
    tb = run.root / "tensorboard"
    tb_line = (
        f"<p>TensorBoard: <code>tensorboard --logdir {_e(tb)}</code></p>" if tb.is_dir() else ""
    )
    kept = run.info.get("kept")
    kept_line = (
        f"<p><code>model.pt</code> holds {_e(kept['why'])}.</p>"
        if isinstance(kept, dict) and kept.get("why")
        else ""
    )
    return (
        _img(_training_plot(rows), "training curves", f"{len(rows)} epochs, from metrics.jsonl")
        + kept_line
        + "<h3>Last epoch</h3>"
        + table
        + tb_line
    )


def _robustness(run: _Run) -> str:
    path = run.root / "eval.json"
    if not path.exists():
        return _missing(
            "No robustness table yet (eval.json).", f"jeat eval {run.q} --mode independent"
        )
    ev = _read_json(path)
    head = ["attack", "category", "threat", "attacked", "broken", "accuracy %", "seconds"]
    rows = [
        [
            a.get("attack"),
            a.get("category", ""),
            a.get("threat"),
            a.get("attacked"),
            a.get("broken"),
            _fmt(a.get("accuracy")),
            _fmt(a.get("seconds"), 1),
        ]
        for a in ev.get("attacks", [])
    ]
    rows.append(["worst case", "", "", "", "", _fmt(ev.get("robust_accuracy")), ""])
    parts = [
        f"<p>{_e(ev.get('n'))} test points, {_e(ev.get('threat'))}, {_e(ev.get('mode'))} mode.</p>",
        _table(head, rows),
    ]
    warnings = list(ev.get("warnings") or [])
    if warnings:
        parts.append("<h3>Sanity warnings</h3><ul>")
        parts += [f'<li class="warn">{_e(w)}</li>' for w in warnings]
        parts.append("</ul>")
    else:
        parts.append("<p>No sanity rule fired on this table.</p>")
    curves = sorted(run.root.glob("curve-*.png")) + sorted(run.root.glob("sanity-*.png"))
    if curves:
        parts.append("<h3>Robustness curve</h3>")
        parts += [_png_file(p, width=460) for p in curves]
    else:
        parts.append(_missing("No robustness curve yet.", f"jeat eval {run.q} --curve pgd20"))
    return "".join(parts)


def _diagnosis(run: _Run) -> str:
    """The indicators of attack failure and AutoAttack's checks of ``jeat eval --diagnose``
    (saved in eval.json), with the table after ``--fix``."""
    path = run.root / "eval.json"
    ev = _read_json(path) if path.exists() else {}
    dg = ev.get("diagnosis")
    if not dg:
        return _missing(
            "No diagnosis yet: it says why each attack failed and which remedy fixes it.",
            f"jeat eval {run.q} --diagnose --fix",
        )
    rows = []
    for r in dg.get("rows", []):
        for name, share in (r.get("shares") or {}).items():
            up = name in (r.get("raised") or [])
            where = f"{_fmt(share, 1)}% of {r.get('considered')}"
            rows.append([f"{r.get('attack')}: {name}", where, "RAISED" if up else "ok"])
    for c in dg.get("checks", []):
        rows.append([c.get("name"), c.get("detail"), "RAISED" if c.get("raised") else "ok"])
    raised = dg.get("raised") or []
    parts = [
        f"<p>Per-point indicators are read from each point's loss trace, over the points that "
        f"survived the table, and raised above {_fmt(dg.get('threshold'), 0)}% of them; the "
        "model checks are AutoAttack's own.</p>",
        _table(["indicator", "points / detail", ""], rows),
        f"<p>Raised: <b>{_e(', '.join(raised) or 'none')}</b>."
        + (f" Remedies: {_e(', '.join(dg.get('remedies') or []))}.</p>" if raised else "</p>"),
    ]
    fix = ev.get("fix")
    if fix and fix.get("attacks"):
        table = fix.get("table") or {}
        body = [
            [a.get("attack"), a.get("attacked"), a.get("broken"), _fmt(a.get("robust_after"))]
            for a in table.get("attacks", [])
        ]
        parts += [
            f"<h3>After the remedies</h3><p>Added: <code>{_e(', '.join(fix['attacks']))}</code>; "
            f"worst case <b>{_fmt(fix.get('robust_accuracy'))}%</b> (before: "
            f"{_fmt(ev.get('robust_accuracy'))}%).</p>",
            _table(["attack", "attacked", "broken", "robust after %"], body),
        ]
    return "".join(parts)


def _samples(run: _Run) -> str:
    grids = [
        p
        for p in sorted(run.root.glob("*.png"))
        if not p.name.startswith(("curve-", "sanity-", "certify"))
    ]
    if not grids:
        return _missing("No sample grids yet.", f"jeat generate {run.q}")
    g = run.config.get("generate") or {}
    text = (
        f"<p>Generated with <code>{_e(g.get('method', 'descent'))}</code>, "
        f"{_e(g.get('steps', '?'))} steps, seeds <code>{_e(g.get('seeds', 'class'))}</code>; "
        "one row per class for conditional samples, every image from its own chain (its own "
        "seed). Hover an image for its class, chain seed and the judge's verdict.</p>"
    )
    return text + "".join(sample_grid(p, width=420) for p in grids)


def grid_record(png: Path) -> dict[str, Any] | None:
    """The record :func:`jeat.finish.write_grid_record` wrote beside the grid ``png``, or None
    when there is none (or it does not describe this grid)."""
    path = png.with_suffix(".json")
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(rec, dict) and isinstance(rec.get("images"), list)
    return rec if ok and isinstance(rec.get("layout"), dict) else None


def _verdict_text(im: dict[str, Any]) -> str:
    label = int(im.get("label", -1))
    what = f"class {label}" if label >= 0 else "unconditional"
    text = f"{what}, chain seed {im.get('seed', '?')}"
    if im.get("judge_class") is not None:
        conf = 100 * float(im.get("judge_confidence") or 0.0)
        text += f"; judge: {im['judge_class']} ({conf:.0f}%)"
    return text


def sample_grid(png: Path, caption: str | None = None, width: int = 420) -> str:
    """The sample grid ``png``; when its record (:func:`grid_record`) is there, each image
    carries its class, chain seed and judge verdict as a hover title (transparent boxes laid
    over the grid, positioned in percent so they follow any display size), and a folded table
    gives every verdict."""
    rec = grid_record(png)
    if rec is None:
        return _png_file(png, caption, width)
    lay = rec["layout"]
    try:
        (hgt, wid), (th, tw), pad = lay["size"], lay["tile"], int(lay["pad"])
    except (KeyError, TypeError, ValueError):
        return _png_file(png, caption, width)
    src = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
    boxes = []
    for im in rec["images"]:
        r, c = int(im.get("row", 0)), int(im.get("col", 0))
        top, left = pad + r * (th + pad), pad + c * (tw + pad)
        boxes.append(
            f'<span title="{_e(_verdict_text(im))}" style="left:{100 * left / wid:.4f}%;'
            f"top:{100 * top / hgt:.4f}%;width:{100 * tw / wid:.4f}%;"
            f'height:{100 * th / hgt:.4f}%"></span>'
        )
    judged = [im for im in rec["images"] if im.get("judge_class") is not None]
    cap = caption or png.name
    if judged:
        asked = [im for im in judged if int(im.get("label", -1)) >= 0]
        agree = sum(int(im["judge_class"]) == int(im["label"]) for im in asked)
        conf = 100 * sum(float(im["judge_confidence"]) for im in judged) / len(judged)
        cap += (
            f"; the judge agrees with the class asked for on {agree} of {len(asked)}"
            if asked
            else ""
        ) + f" (mean confidence {conf:.0f}%)"
    table = _verdict_table(rec["images"]) if judged else ""
    return (
        f'<figure><div class="tiles" style="width:{width}px"><img src="{src}" '
        f'alt="{_e(png.name)}">{"".join(boxes)}</div><figcaption>{_e(cap)}</figcaption>'
        f"{table}</figure>"
    )


def _verdict_table(images: list[dict[str, Any]]) -> str:
    """Every image's judge verdict, one row per grid row: ``predicted class · confidence``,
    in bold red where it is not the class the image was made for."""
    rows: dict[int, list[dict[str, Any]]] = {}
    for im in images:
        rows.setdefault(int(im.get("row", 0)), []).append(im)
    body = []
    for r in sorted(rows):
        ims = sorted(rows[r], key=lambda im: int(im.get("col", 0)))
        labels = {int(im.get("label", -1)) for im in ims}
        only = next(iter(labels)) if len(labels) == 1 else -1
        head = f"class {only}" if only >= 0 else f"row {r}"
        cells = []
        for im in ims:
            if im.get("judge_class") is None:
                cells.append("<td>-</td>")
                continue
            text = f"{im['judge_class']} · {100 * float(im['judge_confidence']):.0f}%"
            off = int(im.get("label", -1)) >= 0 and int(im["judge_class"]) != int(im["label"])
            cells.append(f'<td class="off">{_e(text)}</td>' if off else f"<td>{_e(text)}</td>")
        body.append(f"<tr><td>{_e(head)}</td>{''.join(cells)}</tr>")
    return (
        '<details class="verdicts"><summary>The judge\'s verdict on every image (class · '
        "confidence)</summary><table><tbody>" + "".join(body) + "</tbody></table></details>"
    )


def _energy(run: _Run) -> str:
    folder = run.root / "analysis"
    path = folder / "analysis.json"
    if not path.exists():
        return _missing("No energy analysis yet (analysis/analysis.json).", f"jeat analyze {run.q}")
    a = _read_json(path)
    rows = [(m, a["flatness"][m], a["contour"][m]["rise_mean"]) for m in a.get("models", [])]
    parts = [_energy_setup(a), flatness_table(rows)]
    captions = {
        "contour": "E(x + a·d1 + b·d2, y) − E(x, y), mean over images",
        "histograms": "E(x) of real, adversarial, generated and noise inputs",
        "slices": "1-D slices along the adversarial and a random direction",
        "flatness": "flatness figures",
    }
    for name, caption in captions.items():
        png = folder / f"{name}.png"
        if png.exists():
            parts.append(_png_file(png, caption, width=560))
    return "".join(parts)


def _energy_setup(a: dict[str, Any]) -> str:
    """One line on how an ``analysis.json`` was measured."""
    return (
        f"<p>{_e(a.get('n'))} test images, L-inf ε = {_e(a.get('eps'))}, contour over "
        f"[−{_fmt(a.get('span'), 3)}, {_fmt(a.get('span'), 3)}]² (L2 units) on a "
        f"{_e(a.get('grid'))}×{_e(a.get('grid'))} grid. Smaller |ΔE|, ‖∇E‖ and rise = a flatter "
        "basin (docs/analysis.md says how each is measured).</p>"
    )


def flatness_table(rows: list[tuple[str, dict[str, Any], float | None]]) -> str:
    """The energy-landscape numbers, one row per ``(name, flatness dict, contour rise)`` (the
    ``flatness`` and ``contour[...]["rise_mean"]`` entries of an ``analysis.json``)."""
    head = [
        "model",
        "E(x,y)",
        "E(x)",
        "mean |ΔE| in ε-ball",
        "mean ‖∇E‖₂",
        "PGD ΔE",
        "contour rise",
        "acc %",
        "PGD acc %",
    ]
    body = [
        [
            name,
            _fmt(f.get("energy_joint"), 3),
            _fmt(f.get("energy_marginal"), 3),
            _fmt(f.get("delta_joint"), 4),
            _fmt(f.get("grad_joint"), 4),
            _fmt(f.get("adv_rise_joint"), 3),
            _fmt(rise, 3),
            _fmt(f.get("accuracy"), 1),
            _fmt(f.get("adv_accuracy"), 1),
        ]
        for name, f, rise in rows
    ]
    return _table(head, body)


def _scores(run: _Run) -> str:
    files = [run.root / "scores.json"] if (run.root / "scores.json").exists() else []
    files += sorted(p for p in run.root.glob("*.scores.json"))
    dataset = run.info.get("dataset", "DATASET")
    if not files:
        return _missing(
            "No generation scores yet.",
            f"jeat judge train --dataset {dataset}",
            f"jeat generate {run.q} --n 100 --npz {run.q}/samples.npz",
            f"jeat score {run.q}/samples.npz --against {dataset}",
        )
    head = [
        "file",
        "images",
        "backend",
        "FID",
        "precision",
        "recall",
        "density",
        "coverage",
        "diversity",
        "judge accuracy %",
        "IS",
        "± std",
        "splits",
        "samples",
        "real",
    ]

    def row(name: str, what: str, s: dict[str, Any]) -> list[Any]:
        return [
            name,
            what,
            f"{s.get('is_label')} / {s.get('fd_label')}",
            _fmt(s.get("frechet_distance"), 3),
            _fmt(s.get("precision"), 3),
            _fmt(s.get("recall"), 3),
            _fmt(s.get("density"), 3),
            _fmt(s.get("coverage"), 3),
            _fmt(s.get("diversity"), 3),
            _fmt(s.get("accuracy"), 1),
            _fmt(s.get("inception_score"), 3),
            _fmt(s.get("inception_score_std"), 3),
            s.get("splits"),
            s.get("n_samples"),
            s.get("n_real"),
        ]

    rows = []
    for f in files:
        data = _read_json(f)
        for key in ("judge", "inception-v3"):
            s = data.get(key)
            if not s:
                continue
            rows.append(row(f.name, "generated", s))
            if isinstance(s.get("reference"), dict):
                rows.append(row(f.name, "real test (reference)", s["reference"]))
    return (
        "<p>Every score compares images with the real training images in the feature space of "
        "an independently trained standard classifier of the same dataset (the judge), or of "
        "Inception-v3; judge scores compare models scored by the same judge and are "
        "<b>not</b> Inception Scores or FIDs. Precision and recall (k = 3): the share of "
        "samples inside the real images' k-NN manifold, and of real images inside the "
        "samples'; density and coverage (k = 5) likewise, robust to outliers; diversity: "
        "within-class mean pairwise distance over the real images' (1: as varied as the data). "
        "The reference rows score real test images the same way: the floor. The judge-IS "
        "saturates near the class count and tells models apart on little "
        "(docs/scores.md).</p>" + _table(head, rows)
    )


def _certificate(run: _Run) -> str:
    path = run.root / "certify-wrm.json"
    if not path.exists():
        return "<p>No WRM certificate for this run (only meaningful for WRM models).</p>" + _cmds(
            f"jeat certify {run.q} --wrm"
        )
    c = _read_json(path)
    rows = [
        [_fmt(r, 3), _fmt(b, 4)] for r, b in zip(c.get("rho", []), c.get("bound", []), strict=False)
    ]
    parts = [
        f"<p>γ = {_e(c.get('gamma'))}; certified worst-case loss over the Wasserstein ball of "
        "radius ρ:</p>",
        _table(["ρ", "bound"], rows),
    ]
    png = path.with_suffix(".png")
    if png.exists():
        parts.append(_png_file(png, width=460))
    return "".join(parts)


def _events(run: _Run) -> str:
    events = _read_jsonl(run.root / "events.jsonl")
    if not events:
        return "<p>None: training never diverged.</p>"
    keys = sorted({k for e in events for k in e})
    return _table(keys, [[_fmt(e.get(k), 4) for k in keys] for e in events])


_BUILDERS = {
    "headline": _headline,
    "summary": _summary,
    "reproduce": _reproduce,
    "config": _config,
    "training": _training,
    "robustness": _robustness,
    "diagnosis": _diagnosis,
    "samples": _samples,
    "energy": _energy,
    "scores": _scores,
    "certificate": _certificate,
    "events": _events,
}


def render_report(run: str | Path) -> str:
    """The HTML page of the run folder ``run``, as a string."""
    r = _load_run(Path(run))
    title = f"jeat run {r.root.name}"
    sub = (
        f"{r.info.get('objective', '?')} · {r.info.get('model', '?')} · "
        f"{r.info.get('dataset', '?')}"
    )
    return _page(title, sub, [(sid, heading, _BUILDERS[sid](r)) for sid, heading in SECTIONS])


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of run folder ``run`` to ``out`` (default ``RUN/report.html``),
    atomically; returns the path."""
    page = render_report(run)
    path = Path(out) if out is not None else Path(run) / "report.html"
    with atomic_write(path, "w") as fh:
        fh.write(page)
    return path
