"""benchmarks/study.py at its smoke budget: the whole pipeline (train, AutoAttack, judge
scores, statistics) in seconds, the study folder's contract, and resuming after a kill."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from jeat.stats import NO_DIFFERENCE, read_summary

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCH))
    try:
        import study as module
    finally:
        sys.path.remove(str(BENCH))
    return module


ARGS = ["--budget", "smoke", "--datasets", "digits", "--seeds", "2", "--variants", "pgdat,jem,jeat"]


def test_study_smoke_writes_the_contract_and_resumes(tmp_path, study, capsys):
    out = tmp_path / "study"
    assert study.main(["--out", str(out), *ARGS]) == 0
    summary = read_summary(out)
    assert summary["budget"] == "smoke" and summary["kind"] == "jeat-study"
    assert [(g["dataset"], g["variant"], g["n_seeds"]) for g in summary["groups"]] == [
        ("digits", "pgdat", 2),
        ("digits", "jem", 2),
        ("digits", "jeat", 2),
    ]
    for g in summary["groups"]:
        assert set(g["metrics"]) == set(study.METRICS)
        for name, m in g["metrics"].items():
            assert m is not None and m["n"] == 2 and len(m["values"]) == 2, name
            assert m["low"] <= m["mean"] <= m["high"], name
        for run in g["runs"]:
            folder = out / run
            cell = json.loads((folder / "cell.json").read_text())
            assert (folder / "model.pt").exists() and (folder / "config.yaml").exists()
            assert (folder / "eval.json").exists()
            assert cell["run"] == run and cell["metrics"]["clean"] == pytest.approx(
                cell["eval"]["attacks"][0]["accuracy"]
            )
            assert g["metrics"]["worst_case"]["values"][cell["seed"]] == pytest.approx(
                cell["metrics"]["worst_case"]
            )
            assert cell["metrics"]["worst_case"] <= cell["metrics"]["autoattack_fast"]
            assert cell["metrics"]["train_seconds"] > 0
    diffs = {(d["a"], d["b"], d["metric"]): d for d in summary["differences"]}
    for metric in ("worst_case", "fid_descent", "autoattack_fast"):
        d = diffs[("jeat", "pgdat", metric)]
        assert d["dataset"] == "digits" and d["n"] == 2
        assert d["verdict"] in (NO_DIFFERENCE, "A higher", "A lower")
        a = next(g for g in summary["groups"] if g["variant"] == "jeat")["metrics"][metric]
        b = next(g for g in summary["groups"] if g["variant"] == "pgdat")["metrics"][metric]
        assert d["mean"] == pytest.approx(a["mean"] - b["mean"])
    # issue 30's goal: worst case and clean against PGD-AT, FID and recall by SGLD against JEM
    (goal,) = summary["goal"]
    assert goal["dataset"] == "digits" and goal["variant"] == "jeat"
    worst = diffs[("jeat", "pgdat", "worst_case")]
    assert goal["differences"]["worst_case"] == {k: worst[k] for k in ("mean", "low", "high", "n")}
    fid = diffs[("jeat", "jem", "fid_sgld")]
    jem_fid = next(g for g in summary["groups"] if g["variant"] == "jem")["metrics"]["fid_sgld"]
    assert goal["jem"]["fid_sgld"] == pytest.approx(jem_fid["mean"])
    assert goal["checks"]["fid_sgld"] == (fid["high"] < 0.1 * jem_fid["mean"])
    assert goal["checks"]["worst_case"] == (worst["low"] > -2)
    assert goal["met"] == all(v is True for v in goal["checks"].values())
    readme = (out / "README.md").read_text()
    assert "| jeat | 2 |" in readme and "jeat | pgdat | worst_case" in readme
    # the reference: real test images scored once per dataset and judge, like the samples
    ref = summary["reference"]["digits"]
    assert ref["n_samples"] == 60 and 0 <= ref["recall"] <= 1 and ref["fid"] >= 0
    # the samplers' starting points alone, scored alike (no model): the seeds' row
    start = summary["seeds_reference"]["digits"]
    assert start["n_samples"] == 60 and start["images"] == "class seeds"
    assert 0 <= start["judge_acc"] <= 100 and start["fid"] >= 0
    assert "class-Gaussian seeds alone (no model)" in readme
    cached = json.loads((out / "judges" / "digits" / "reference.json").read_text())
    assert ref == {k: v for k, v in cached.items() if k != "scores"}
    assert "### digits: generation by seeded descent" in readme
    assert readme.count("| real test images (reference) | – | ") == 2  # under both samplers
    # the trade-off plot, embedded in the README
    assert (out / "tradeoff-digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(tradeoff-digits.png)" in readme
    # each grid image from its own chain, with the judge's verdict beside it
    cell = out / summary["groups"][1]["runs"][0]
    metrics = json.loads((cell / "cell.json").read_text())["metrics"]
    for key in ("precision", "recall", "density", "coverage", "diversity"):
        assert metrics[f"{key}_descent"] is not None and metrics[f"{key}_sgld"] is not None
    grid = json.loads((cell / "samples-sgld.json").read_text())["images"]
    assert len(grid) == 60 and len({im["seed"] for im in grid}) == 60
    assert all("judge_class" in im for im in grid)

    # a second call trains nothing: every cell is finished
    cells = [out / r for g in summary["groups"] for r in g["runs"]]
    stamps = {c: (c / "model.pt").stat().st_mtime_ns for c in cells}
    capsys.readouterr()
    assert study.main(["--out", str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done, skipped") == 6
    assert {c: (c / "model.pt").stat().st_mtime_ns for c in cells} == stamps
    assert read_summary(out)["groups"] == summary["groups"]

    # killed while measuring (no cell.json): measured again from the trained model
    (cells[0] / "cell.json").unlink()
    # killed before the first checkpoint: the folder is restarted
    shutil.rmtree(cells[1])
    cells[1].mkdir(parents=True)
    (cells[1] / "config.yaml").write_text("half-written\n")
    capsys.readouterr()
    assert study.main(["--out", str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done, skipped") == 4
    assert (cells[0] / "model.pt").stat().st_mtime_ns == stamps[cells[0]]
    assert (cells[1] / "model.pt").exists() and (cells[1] / "cell.json").exists()
    again = read_summary(out)
    # the same seeds give the same model and the same numbers
    before = {g["variant"]: g["metrics"]["clean"]["values"] for g in summary["groups"]}
    assert {g["variant"]: g["metrics"]["clean"]["values"] for g in again["groups"]} == before

    # an invocation that plans fewer cells still summarises every finished cell of the folder
    subset = [*ARGS[:-1], "pgdat"]
    assert study.main(["--out", str(out), *subset]) == 0
    assert [g["variant"] for g in read_summary(out)["groups"]] == ["pgdat", "jem", "jeat"]


def test_study_plans_the_issue_cells(study):
    args = study.parse_args(["--out", "x"])
    cells = study.plan(args)
    count = {}
    for c in cells:
        count[(c.dataset, c.variant)] = count.get((c.dataset, c.variant), 0) + 1
    assert count[("digits", "jeat")] == 5 and count[("mnist", "jeat")] == 3
    assert count[("digits", "jeat-lambda0.3-u20")] == 3
    assert ("mnist", "jeat-lambda0.3-u20") not in count
    published = next(c for c in cells if c.variant == "jeat-published")
    cfg = study.cell_config(published, study.FULL[published.dataset])
    o = cfg.objective.options
    assert cfg.objective.name == "jeat" and o["energy_weight"] == 1.0
    assert o["buffer_init"] == "uniform" and o["sgld_steps"] == 20 and o["data_term"] == "adv"
    u20 = next(c for c in cells if c.variant == "jeat-lambda0.3-u20")
    o = study.cell_config(u20, study.FULL["digits"]).objective.options
    assert (o["energy_weight"], o["buffer_init"], o["sgld_steps"]) == (0.3, "uniform", 20)
    # a knob's top-level entries are config entries (epochs), the rest objective options
    matched = next(c for c in cells if c.variant == "jeat-published-e20")
    cfg = study.cell_config(matched, study.FULL["digits"])
    assert cfg.epochs == 20 and cfg.objective.options["sgld_steps"] == 20
    shipped = next(c for c in cells if c.variant == "jeat" and c.dataset == "digits")
    o = study.cell_config(shipped, study.FULL["digits"]).objective.options
    assert (o["robust_loss"], o["data_term"], o["energy_weight"]) == ("trades", "both", 1.0)
    adv = next(c for c in cells if c.variant == "jeat-trades-adv")
    o = study.cell_config(adv, study.FULL["digits"]).objective.options
    assert (o["robust_loss"], o["data_term"]) == ("trades", "adv")
    # the knobs on the former default name its config, so the new default does not move them
    lam = next(c for c in cells if c.variant == "jeat-lambda0.1")
    o = study.cell_config(lam, study.FULL["digits"]).objective.options
    assert lam.config == "digits-jeat-ce" and o.get("robust_loss", "ce") == "ce"
    # as published: PGD-AT's loss on either dataset's base
    for c in (c for c in cells if c.variant == "jeat-published"):
        assert study.cell_config(c, study.FULL[c.dataset]).objective.options["robust_loss"] == "ce"
    # at the smoke budget its sizes win over a variant's
    smoke = study.cell_config(matched, study.SMOKE["digits"])
    assert smoke.epochs == 1 and smoke.objective.options["sgld_steps"] == 2
    knobs = study.plan(study.parse_args(["--out", "x", "--part", "knobs"]))
    assert {c.dataset for c in knobs} == {"digits", "mnist"}
    by = {(c.dataset, c.variant) for c in knobs}
    assert {("digits", v) for v in ("pgdat", "jeat", "jem", "jeat-lambda0.1-u20")} <= by
    # MNIST's knobs: digits' best point on MNIST's base (its attack, eps 0.3), 3 seeds each,
    # beside MNIST's PGD-AT, JEM and JEAT; no digits knob on MNIST
    assert {("mnist", v) for v in ("pgdat", "jeat", "jem", "jeat-trades", "jeat-trades-e8")} <= by
    assert ("mnist", "jeat-lambda0.1-u20") not in by and ("digits", "jeat-trades") not in by
    trades = [c for c in knobs if c.variant == "jeat-trades"]
    assert [c.seed for c in trades] == [0, 1, 2]
    cfg = study.cell_config(trades[0], study.FULL["mnist"])
    o = cfg.objective.options
    assert trades[0].config == "mnist-jeat" and cfg.objective.attack.eps == pytest.approx(0.3)
    assert (o["robust_loss"], o["data_term"], o["energy_weight"]) == ("trades", "both", 1.0)
    assert (o["buffer_init"], o["sgld_steps"], cfg.epochs) == ("uniform", 20, 15)
    e8 = next(c for c in knobs if c.variant == "jeat-trades-e8")
    assert study.cell_config(e8, study.FULL["mnist"]).epochs == 8


def test_study_adopts_finished_runs_of_the_same_training_config(tmp_path, study, capsys):
    """``--adopt``: a cell whose training config (seed included) equals a finished run's is
    measured on a copy of that run, not trained again, and says where its weights came from;
    the same model measured again gives the same numbers."""
    args = ["--budget", "smoke", "--datasets", "digits", "--seeds", "1", "--variants", "pgdat,jeat"]
    first = tmp_path / "first"
    assert study.main(["--out", str(first), *args]) == 0
    second = tmp_path / "second"
    capsys.readouterr()
    assert study.main(["--out", str(second), *args, "--adopt", str(first / "cells")]) == 0
    assert "2 finished runs to adopt from" in capsys.readouterr().out
    for variant in ("pgdat", "jeat"):
        run = f"cells/digits/{variant}/seed0"
        a = json.loads((first / run / "cell.json").read_text())
        b = json.loads((second / run / "cell.json").read_text())
        assert "trained_by" not in a and Path(b["trained_by"]) == (first / run).resolve()
        assert not (second / run / "checkpoints").exists()  # copied, not trained
        assert (second / run / "model.pt").read_bytes() == (first / run / "model.pt").read_bytes()
        for key in ("clean", "pgd20", "autoattack_fast", "worst_case", "fid_descent"):
            assert b["metrics"][key] == pytest.approx(a["metrics"][key]), (variant, key)
    # a finished cell whose run no longer has its variant's training config is trained again
    run = second / "cells/digits/pgdat/seed0"
    (run / "config.yaml").write_text(
        (run / "config.yaml").read_text().replace("epochs: 1\n", "epochs: 3\n")
    )
    capsys.readouterr()
    assert study.main(["--out", str(second), *args]) == 0
    printed = capsys.readouterr().out
    assert "pgdat/seed0: trained again (its variant's training config changed)" in printed
    assert "jeat/seed0: done, skipped" in printed
    assert "epochs: 1\n" in (run / "config.yaml").read_text()
    assert "trained_by" not in json.loads((run / "cell.json").read_text())
    # another seed's config is not adopted: that cell trains
    third = tmp_path / "third"
    more = [*args[:-3], "2", "--variants", "pgdat", "--adopt", str(first / "cells")]
    assert study.main(["--out", str(third), *more]) == 0
    cells = [json.loads((third / f"cells/digits/pgdat/seed{k}/cell.json").read_text())
             for k in (0, 1)]  # fmt: skip
    assert "trained_by" in cells[0] and "trained_by" not in cells[1]


def test_training_part_keeps_what_decides_the_weights(study):
    from jeat.config import config_to_dict, load_config

    def part(*sets):
        return study.training_part(config_to_dict(load_config("digits-pgdat", list(sets))))

    base = part()
    # what is measured after training, and how, does not count
    assert part("eval.n=17", "generate.steps=3", "final_eval=false", "progress=false") == base
    # the per-epoch check counts only when it selects the kept epoch
    assert part("eval.epoch_n=0") == base
    best = ("keep=best", "data.val_split=0.1")
    assert part(*best, "eval.epoch_steps=3") != part(*best)
    for change in ("seed=9", "epochs=3", "objective.attack.steps=2", "data.augment=true"):
        assert part(change) != base, change


def test_parallel_studies_share_cells_one_process_per_cell(tmp_path, study, capsys):
    """A cell another process holds (``jeat.locks``) is left to it: this invocation does the
    others, and the folder the other process works in is not touched."""
    import subprocess
    import textwrap

    out = tmp_path / "study"
    busy = out / "cells" / "digits" / "pgdat" / "seed1"
    busy.mkdir(parents=True)
    (busy / "half-trained.txt").write_text("the other process's file\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from jeat.locks import hold_folder
            with hold_folder({str(busy)!r}):
                print("held", flush=True)
                sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        args = ["--budget", "smoke", "--datasets", "digits", "--seeds", "2", "--variants", "pgdat"]
        assert study.main(["--out", str(out), *args]) == 0
        printed = capsys.readouterr().out
        assert "cells/digits/pgdat/seed1: another process is on it, skipped" in printed
        assert (out / "cells/digits/pgdat/seed0/cell.json").exists()
        assert not (busy / "cell.json").exists()
        assert (busy / "half-trained.txt").read_text() == "the other process's file\n"
    finally:
        holder.communicate("", timeout=30)
    # once the other process is gone the cell is this one's: what it left is cleared, then run
    assert study.main(["--out", str(out), *args]) == 0
    assert (busy / "cell.json").exists() and not (busy / "half-trained.txt").exists()
