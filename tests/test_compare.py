"""jeat compare: runs (or a study folder) side by side on one page, and the headline the
single-run report opens with."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
from conftest import CHROMIUM, FAST, FULL, NO_CHROMIUM, cli_fails, jeat_cli, render_in_chromium
from PIL import Image

from jeat import JeatError
from jeat.compare import compare, log_axis, pareto_front, render_compare, tradeoff_png
from jeat.config import load_config
from jeat.finish import train_and_finish
from jeat.report import run_results


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits):
    """Two finished digits runs (PGD-AT and standard, every final step on) and a bare one-epoch
    run on an npz: copy of the digits images (another dataset)."""
    root = tmp_path_factory.mktemp("compare")
    out = {}
    for objective in ("pgd-at", "standard"):
        cfg = load_config("digits-pgdat", [*FULL, f"objective.name={objective}"])
        train_and_finish(cfg, root / objective, data=digits)
        out[objective] = root / objective
    npz = root / "digits-copy.npz"
    np.savez(npz, x=digits.x_train[:300].numpy(), y=digits.y_train[:300].numpy())
    source = json.dumps(f"npz:{npz}")
    budgets = ["objective.attack.eps=null", "objective.attack.step_size=null", "eval.eps=null"]
    cfg = load_config(
        "digits-pgdat",
        [*FAST, "epochs=1", "model.options.width=8", f"data.name={source}", *budgets],
    )
    train_and_finish(cfg, root / "other")
    out["other"] = root / "other"
    return out


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def _section(page: str, sid: str) -> str:
    start = page.index(f'<section id="{sid}">')
    return page[start : page.index("</section>", start)]


def test_compare_puts_two_runs_side_by_side(tmp_path, runs):
    a, b = runs["pgd-at"], runs["standard"]
    r = jeat_cli("compare", a, b, "--out", tmp_path / "c.html")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {tmp_path / 'c.html'}"
    page = (tmp_path / "c.html").read_text()
    ids = re.findall(r'<section id="([^"]+)">', page)
    assert ids == ["headline", "tradeoff", "robustness", "samples", "energy", "runs"]
    # self-contained: no script, no external reference; the trade-off, curves, two grids, two
    # energy figures
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:|#)', page)
    images = _images(page)
    assert len(images) == 6 and all(img[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    headline = _section(page, "headline")
    keys = (
        ("clean", 2),
        ("worst_case", 2),
        ("fid_descent", 2),
        ("precision_descent", 3),
        ("recall_descent", 3),
    )
    for run in (a, b):
        res = run_results(run)
        assert {"clean", "worst_case", "fid_descent", "is_descent", "train_seconds"} <= set(res)
        row = re.search(rf"<tr><td>{run.name}</td>.*?</tr>", headline).group(0)
        for key, digits in keys:
            assert f"<td>{res[key]:.{digits}f}</td>" in row, (key, row)
        assert "judge-IS" not in headline.split("</table>")[0]  # saturated: off the headline
        ev = json.loads((run / "eval.json").read_text())
        pgd20 = next(x for x in ev["attacks"] if x["attack"] == "pgd20")["accuracy"]
        assert f"{pgd20:.2f}" in _section(page, "robustness")
        flat = json.loads((run / "analysis" / "analysis.json").read_text())["flatness"]
        assert f"{flat[run.name]['delta_joint']:.4f}" in _section(page, "energy")
    # the reference row: real test images scored like the samples (of the first run)
    ref = run_results(a)
    row = re.search(r"<tr><td>real test images \(reference\)</td>.*?</tr>", headline).group(0)
    assert f"<td>{ref['ref_fid']:.2f}</td>" in row and f"<td>{ref['ref_recall']:.3f}</td>" in row
    # each grid image's verdict on hover: one title per image of both runs' grids
    grid = json.loads((a / "samples.json").read_text())["images"]
    assert _section(page, "samples").count('<span title="class ') == 2 * len(grid)
    # the configs differ in the objective only (and in nothing the runs share)
    assert "objective.name" in _section(page, "runs") and "1 config keys differ" in page


def test_labels_name_the_runs_and_reanalyze_measures_them_together(runs):
    a, b = runs["pgd-at"], runs["standard"]
    page = render_compare([a, b], labels=["robust", "plain"], reanalyze=True)
    assert re.search("<figcaption>robust[;<]", page) and re.search("<figcaption>plain[;<]", page)
    energy = _section(page, "energy")
    assert "Analysed again, together" in energy and "<td>robust</td>" in energy
    # the trade-off, curves, two grids, and analyze's four figures of both models
    assert len(_images(page)) == 8
    with pytest.raises(JeatError, match="--labels names 1 runs, but 2"):
        render_compare([a, b], labels=["one"])


def test_the_single_run_report_opens_with_the_headline_and_folds_the_config_away(runs):
    run = runs["pgd-at"]
    page = (run / "report.html").read_text()
    ids = re.findall(r'<section id="([^"]+)">', page)
    assert ids[0] == "headline" and ids[-1] == "config"
    res = run_results(run)
    headline = _section(page, "headline")
    for key, digits in (("clean", 2), ("worst_case", 2), ("fid_descent", 2),
                        ("precision_descent", 3), ("recall_descent", 3)):  # fmt: skip
        assert f"<td>{res[key]:.{digits}f}</td>" in headline
    # the same headline as jeat compare's row for the run
    compared = _section(render_compare([run]), "headline")
    first_row = re.compile(r"<tbody><tr>(.*?)</tr>")
    cells = re.findall(r"<td>([^<]*)</td>", first_row.search(headline).group(1))[2:]
    assert re.findall(r"<td>([^<]*)</td>", first_row.search(compared).group(1))[3:] == cells
    assert _section(page, "config").count("<details>") == 1


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_compare_renders_in_headless_chromium(tmp_path, runs):
    """Every image of the comparison decodes (naturalWidth > 0), every section is laid out and
    a screenshot is taken."""
    out = compare([runs["pgd-at"], runs["standard"]], tmp_path / "c.html")
    probe = render_in_chromium(out, tmp_path)
    assert probe["images"] == 6 and probe["loaded"] == probe["images"]
    assert "robust accuracy against generation scores" in probe["decoded"]  # the trade-off
    assert probe["sections"] == ["headline", "tradeoff", "robustness", "samples", "energy",
                                 "runs"]  # fmt: skip
    assert probe["shot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fid_axes_turn_logarithmic_when_they_span_a_factor_of_twenty():
    assert log_axis([8.3, 21.8, 273.0, 1172.0], higher=False)  # JEM to a standard model
    assert not log_axis([21.8, 31.0, 105.0], higher=False)
    assert not log_axis([0.01, 0.74], higher=True)  # recall stays linear
    assert not log_axis([0.0, 50.0], higher=False)  # no log of zero


def test_pareto_front_and_the_tradeoff_plot():
    # judge-FID: lower is better; (120, 20) is beaten by (100, 20), (200, 25) by (150, 30)
    points = [(100.0, 20.0), (150.0, 30.0), (120.0, 20.0), (90.0, 10.0), (200.0, 25.0)]
    assert pareto_front(points, higher_x_better=False) == [0, 1, 3]
    assert pareto_front([(0.5, 20.0), (0.6, 20.0), (0.4, 30.0)], higher_x_better=True) == [1, 2]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)], higher_x_better=True) == [0, 1]  # a tie
    assert tradeoff_png([("a", {"clean": 90.0, "fid_descent": 10.0})]) is None  # no robustness
    group = {"worst_case": {"mean": 20.0, "low": 18.0, "high": 22.0, "n": 3},
             "fid_descent": {"mean": 100.0, "low": 90.0, "high": 110.0, "n": 3},
             "recall_sgld": {"mean": 0.4, "low": None, "high": None, "n": 1}}  # fmt: skip
    png = tradeoff_png([("a", group), ("b", {"worst_case": 10.0, "fid_descent": 80.0})],
                       {"fid_descent": 5.0}, "digits")  # fmt: skip
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # two samplers (rows) by two scores (columns)
    with Image.open(io.BytesIO(png)) as img:
        assert 0.9 < img.size[0] / img.size[1] < 1.6


def _stat(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    return {"mean": mean, "low": min(values) if n > 1 else None,
            "high": max(values) if n > 1 else None, "n": n, "values": values}  # fmt: skip


def test_a_study_folder_shows_means_intervals_and_differences(tmp_path, runs, digits):
    study = tmp_path / "study"
    cells = {
        "cells/digits/pgdat/seed0": runs["pgd-at"],
        "cells/digits/standard/seed0": runs["standard"],
        "cells/npz/standard/seed0": runs["other"],
    }
    for rel, run in cells.items():
        shutil.copytree(run, study / rel)
    seed1 = study / "cells/digits/pgdat/seed1"
    train_and_finish(load_config("digits-pgdat", [*FULL, "seed=1"]), seed1, data=digits)

    def group(dataset, variant, rels):
        results = [run_results(study / rel) for rel in rels]
        keys = set.intersection(*(set(r) for r in results))
        metrics = {k: _stat([r[k] for r in results]) for k in keys}
        return {"dataset": dataset, "variant": variant, "n_seeds": len(rels),
                "metrics": metrics, "runs": rels}  # fmt: skip

    pgdat = group("digits", "pgdat", ["cells/digits/pgdat/seed0", "cells/digits/pgdat/seed1"])
    summary = {
        "kind": "jeat-study", "version": 1, "commit": "abc1234", "budget": "smoke",
        "groups": [
            pgdat,
            group("digits", "standard", ["cells/digits/standard/seed0"]),
            group("npz:digits-copy", "standard", ["cells/npz/standard/seed0"]),
        ],
        "differences": [
            {"dataset": "digits", "a": "pgdat", "b": "standard", "metric": "worst_case",
             "mean": 1.5, "low": -0.5, "high": 3.5, "n": 1, "verdict": "no difference shown"},
        ],
    }  # fmt: skip
    (study / "summary.json").write_text(json.dumps(summary))
    # a study's cells write one grid per sampler: every samples*.png of seed 0 is shown
    shutil.copy(study / "cells/digits/standard/seed0/samples.png",
                study / "cells/digits/standard/seed0/samples-sgld.png")  # fmt: skip
    r = jeat_cli("compare", study, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    page = (study / "compare.html").read_text()
    ids = re.findall(r'<section id="([^"]+)">', page)
    assert ids == ["headline", "differences-1", "tradeoff-1", "robustness-1", "samples-1",
                   "energy-1", "differences-2", "tradeoff-2", "robustness-2", "samples-2",
                   "energy-2", "runs"]  # fmt: skip
    assert "<title>jeat study</title>" in page  # the folder is named study: said once
    assert "Robustness — npz:digits-copy" in page and "abc1234" in page
    clean = pgdat["metrics"]["clean"]
    assert f"{clean['mean']:.2f} [{clean['low']:.2f}, {clean['high']:.2f}]" in page
    diffs = _section(page, "differences-1")
    assert "pgdat − standard" in diffs and "no difference shown" in diffs
    assert "[-0.50, 3.50]" in diffs
    # a group's attack table is the mean over its seeds, with how many
    pgd = [
        next(a for a in json.loads((study / rel / "eval.json").read_text())["attacks"]
             if a["attack"] == "pgd20")["accuracy"]
        for rel in pgdat["runs"]
    ]  # fmt: skip
    assert f"{sum(pgd) / 2:.2f} (2)" in _section(page, "robustness-1")
    assert "flatness" in _section(page, "energy-1") and "(mean of 2)" in page
    # the npz group's run has no final steps: its sections say what is missing
    assert "No robustness curve for standard" in _section(page, "robustness-2")
    assert re.search("<figcaption>standard, sgld, seed 0[;<]", _section(page, "samples-1"))
    # the trade-off of digits (the npz group has no scores), curves, three sample grids, two
    # energy figures
    assert len(_images(page)) == 1 + 1 + 3 + 2
    assert "no trade-off to draw" in _section(page, "tradeoff-2")


def test_bad_input_is_one_line_and_exit_2(tmp_path, runs):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (tmp_path / "empty").mkdir()
    a, other = runs["pgd-at"], runs["other"]
    cli_fails(["compare", a, tmp_path / "empty"], cwd, "is not a jeat run folder", "empty")
    cli_fails(["compare", a, tmp_path / "nowhere"], cwd, "nowhere does not exist")
    cli_fails(["compare", a, other], cwd, "different datasets", "--allow-mixed", "digits")
    cli_fails(["compare", a, a, "--labels", "x"], cwd, "--labels")
    fake = tmp_path / "fake-study"
    fake.mkdir()
    (fake / "summary.json").write_text(json.dumps({"kind": "something-else"}))
    cli_fails(["compare", fake], cwd, "not a jeat study summary")
    (fake / "summary.json").write_text(json.dumps({"kind": "jeat-study", "version": 7}))
    cli_fails(["compare", fake], cwd, "version 7")
    cli_fails(["compare", fake, a], cwd, "one study folder")
    # --allow-mixed: one set of sections per dataset
    r = jeat_cli("compare", a, other, "--allow-mixed", cwd=cwd)
    assert r.returncode == 0, r.stderr
    page = (cwd / "compare.html").read_text()
    assert '<section id="robustness-2">' in page and "No sample grid for other" in page
