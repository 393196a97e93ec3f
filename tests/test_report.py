"""The run report (jeat report), the analyze command and TensorBoard logging, end to end."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import CHROMIUM, FAST, FULL, NO_CHROMIUM, render_in_chromium

from jeat import JeatError
from jeat.config import load_config
from jeat.finish import train_and_finish
from jeat.report import SECTIONS, render_report, write_report

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def jeat(*args):
    return subprocess.run(
        [sys.executable, "-m", "jeat.cli", *map(str, args)], capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, digits):
    run = tmp_path_factory.mktemp("report") / "run"
    train_and_finish(load_config("digits-pgdat", FULL), run, data=digits)
    return run


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_a_finished_run_writes_every_piece_of_its_report(full_run):
    for name in ("eval.json", "eval.md", "curve-pgd5-linf.png", "samples.png", "scores.json",
                 "analysis/analysis.json", "analysis/contour.png", "report.html"):  # fmt: skip
        assert (full_run / name).exists(), name
    page = (full_run / "report.html").read_text()
    for sid, title in SECTIONS:
        assert f'<section id="{sid}"><h2>{title}</h2>' in page
    images = _images(page)
    # training curves, robustness curve, samples, four analysis figures
    assert len(images) >= 7 and all(img[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    # self-contained: no script, no external reference of any kind
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:|#)', page)
    ev = json.loads((full_run / "eval.json").read_text())
    assert f"{ev['attacks'][2]['accuracy']:.2f}" in page  # the table's PGD-20 number
    scores = json.loads((full_run / "scores.json").read_text())["judge"]
    assert scores["is_label"] == "judge-IS" and f"{scores['frechet_distance']:.3f}" in page
    # fidelity and diversity apart, and the reference of real test images scored alike
    for key in ("precision", "recall", "density", "coverage", "diversity"):
        assert scores[key] is not None and scores[key] >= 0, key
        assert f"{scores[key]:.3f}" in page, key
    assert scores["n_knn"] == scores["n_samples"] == 50 and scores["k_precision_recall"] == 3
    ref = scores["reference"]
    assert ref["n_samples"] == 50 and ref["n_real"] == scores["n_real"]
    assert ref["frechet_distance"] < scores["frechet_distance"] and ref["accuracy"] > 50
    headline = page[page.index('<section id="headline">') : page.index('<section id="summary">')]
    assert "<td>real test images (reference)</td>" in headline
    assert f"<td>{ref['frechet_distance']:.2f}</td>" in headline
    # the grid's record: every image's own chain seed and the judge's verdict, on hover
    grid = json.loads((full_run / "samples.json").read_text())
    images = grid["images"]
    assert len(images) == 30 and len({im["seed"] for im in images}) == 30
    assert all(0 <= im["judge_class"] < 10 for im in images)
    titles = re.findall(r'<span title="(class \d, chain seed \d+; judge: \d \(\d+%\))"', page)
    assert len(titles) == 30 and "judge agrees with the class asked for on" in page
    assert "jeat analyze" in page and "jeat eval" in page and "--out" in page  # commands
    assert "mean |ΔE| in ε-ball" in page


def test_a_report_of_a_bare_run_says_what_is_missing_and_how_to_make_it(tmp_path, digits):
    run = tmp_path / "bare"
    cfg = load_config("digits-pgdat", [*FAST, "epochs=1", "model.options.width=8",
                                       "data.train_subset=200"])  # fmt: skip
    train_and_finish(cfg, run, data=digits)
    page = render_report(run)
    for sid, _ in SECTIONS:
        assert f'<section id="{sid}">' in page
    assert "No robustness table yet" in page and f"jeat eval {run}" in page
    assert "No energy analysis yet" in page and f"jeat analyze {run}" in page
    assert "No generation scores yet" in page and "jeat judge train --dataset digits" in page
    assert "No sample grids yet" in page
    out = write_report(run, tmp_path / "elsewhere" / "r.html")
    assert out.read_text() == page and not (run / "report.html").exists()


def test_report_errors_are_clear(tmp_path, full_run):
    with pytest.raises(JeatError, match="is not a run folder"):
        render_report(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(JeatError, match="not a jeat run folder"):
        render_report(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(full_run, broken)
    (broken / "eval.json").write_text("{ not json")
    with pytest.raises(JeatError, match="cannot read .*eval.json"):
        render_report(broken)
    r = jeat("report", broken)
    assert r.returncode == 2 and r.stderr.startswith("jeat: error: cannot read")
    r = jeat("report", full_run, "--out", tmp_path / "copy.html")
    assert r.returncode == 0 and (tmp_path / "copy.html").read_text().startswith("<!DOCTYPE html>")


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_the_report_renders_in_headless_chromium(tmp_path, full_run):
    """Open the page in headless Chromium: every image decodes (naturalWidth > 0) and every
    section is laid out with a non-zero height; a screenshot is taken."""
    probe = render_in_chromium(full_run / "report.html", tmp_path)
    assert probe["images"] >= 7
    assert probe["loaded"] == probe["images"]
    assert probe["sections"] == [sid for sid, _ in SECTIONS]
    assert probe["shot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_cli_compares_runs_side_by_side(tmp_path, standard_run, pgdat_run):
    out = tmp_path / "landscape"
    r = jeat("analyze", standard_run, pgdat_run, "--n", "32", "--grid", "7",
             "--samples-per-class", "1", "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "analysis.json").read_text())
    std, rob = data["flatness"]["standard-s0-w"], data["flatness"]["pgd-at-s0-w"]
    assert data["models"] == ["standard-s0-w", "pgd-at-s0-w"] and data["n"] == 32
    assert rob["delta_joint"] < std["delta_joint"] and rob["grad_joint"] < std["grad_joint"]
    for name in ("contour", "histograms", "slices", "flatness"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "standard-s0-w" in r.stdout and "pgd-at-s0-w" in r.stdout
    r = jeat("analyze", standard_run, "--grid", "2", "--out", tmp_path / "bad")
    assert r.returncode == 2 and "grid" in r.stderr and not (tmp_path / "bad").exists()


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (optional)")
def test_tensorboard_logs_every_epoch_and_a_resume_continues_the_curve(tmp_path, digits):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    small = [*FAST, "model.options.width=8", "data.train_subset=200", "eval.epoch_n=50"]
    train_and_finish(load_config("digits-pgdat", [*small, "epochs=2"]), run, data=digits)
    train_and_finish(
        load_config("digits-pgdat", [*small, "epochs=3"]), run, resume=True, data=digits
    )
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/acc", "test/clean_acc", "run/lr"} <= set(tags)
    steps = [e.step for e in acc.Scalars("test/clean_acc")]
    assert steps == sorted(set(steps)) and len(steps) == 3
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [m["step"] for m in metrics]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(
        [m["train_loss"] for m in metrics], rel=1e-6
    )
    with pytest.raises(JeatError, match="tensorboard"):
        load_config("digits-pgdat", ["tensorboard=maybe"])


def test_tensorboard_true_without_the_package_is_a_clear_error(tmp_path, digits, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    cfg = load_config("digits-pgdat", [*FAST, "epochs=1", "tensorboard=true"])
    with pytest.raises(JeatError, match=r"pip install 'jeat\[tensorboard\]'"):
        train_and_finish(cfg, tmp_path / "tb", data=digits)
    assert not (tmp_path / "tb").exists()
