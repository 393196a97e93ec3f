"""The command line end to end, as a user runs it."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

QUICK = [
    "--set", "model.options.width=8", "--set", "objective.attack.steps=3", "--epochs", "2",
    "--set", "data.train_subset=300", "--set", "eval.n=100", "--set", "eval.epoch_n=50",
    "--set", "generate.steps=10", "--set", "generate.n_per_class=3", "--quiet",
    "--set", "analysis.n=16", "--set", "analysis.grid=5", "--set", "analysis.score_per_class=5",
    "--set", "analysis.judge_epochs=2", "--set", "eval.curve=pgd5",
]  # fmt: skip


def jeat(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "jeat.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_train_eval_generate_pipeline(tmp_path):
    run = tmp_path / "run"
    r = jeat("train", "--out", run, *QUICK)
    assert r.returncode == 0, r.stderr
    for name in (
        "config.yaml",
        "run.json",
        "metrics.jsonl",
        "model.pt",
        "eval.json",
        "samples.png",
        "curve-pgd5-linf.png",
        "analysis/analysis.json",
        "scores.json",
        "report.html",
    ):
        assert (run / name).exists(), name
        quiet = ("config.yaml", "run.json", "metrics.jsonl", "analysis/analysis.json")
        assert str(run / name) in r.stdout or name in quiet
    table = json.loads((run / "eval.json").read_text())
    assert [a["attack"] for a in table["attacks"]] == [
        "clean", "fgsm", "pgd20", "autoattack-fast/apgd-ce", "autoattack-fast/apgd-t"
    ]  # fmt: skip
    assert table["eps"] == pytest.approx(0.2) and table["n"] == 100
    assert table["robust_accuracy"] <= min(a["accuracy"] for a in table["attacks"])
    grid = Image.open(run / "samples.png")
    assert grid.size[1] > grid.size[0] * 2  # 10 rows (classes) of 3 images

    r = jeat("eval", run, "--attacks", "clean,pgd5,cw10,roa:steps=3,pgd5-t:targets=2",
             "--eps", "8/255", "--n", "50", "--quiet", "--out", tmp_path / "e.json",
             "--curve", "pgd5", "--curve-eps", "0,4/255,8/255")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "worst case" in r.stdout and f"wrote {tmp_path / 'e.json'}" in r.stdout
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["eps"] == pytest.approx(8 / 255) and e["mode"] == "cascade"
    assert [a["attack"] for a in e["attacks"]] == [
        "clean",
        "pgd5",
        "cw10",
        "pgd5-t:targets=2",
        "roa:steps=3",
    ]  # fmt: skip  (cascade: white-box attacks cheapest first, occlusion after them)
    assert e["attacks"][4]["threat"] == "patch 2x2"
    assert (tmp_path / "e.md").read_text().count("| pgd5 ") == 1
    assert (tmp_path / "e.csv").read_text().splitlines()[0].startswith("attack,category")
    assert e["curve"]["eps"] == pytest.approx([0, 4 / 255, 8 / 255])
    assert (tmp_path / "e-curve-pgd5-linf.png").exists()
    assert (tmp_path / "e-curve-pgd5-linf.csv").read_text().startswith("eps,accuracy")

    r = jeat("attack", run, "--attack", "fgsm", "--n", "12", "--out", tmp_path / "adv.npz")
    assert r.returncode == 0, r.stderr
    adv = np.load(tmp_path / "adv.npz")
    assert adv["x_adv"].shape == (12, 1, 8, 8) and str(adv["attack"]) == "fgsm"
    assert np.abs(adv["x_adv"] - adv["x"]).max() <= 0.2 + 1e-6
    assert Image.open(tmp_path / "adv.png").size[0] > 0

    r = jeat("generate", run, "--classes", "1,7", "--n", "4", "--steps", "5", "--out",
             tmp_path / "g.png")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "g.png").size[0] > Image.open(tmp_path / "g.png").size[1]
    # beside the grid, each image's class and its own chain's seed
    record = json.loads((tmp_path / "g.json").read_text())
    cells = record["images"]
    assert [c["label"] for c in cells] == [1] * 4 + [7] * 4
    assert len({c["seed"] for c in cells}) == 8

    # SGLD, conditional, with the samples saved for scoring
    r = jeat("generate", run, "--method", "sgld", "--classes", "2,5", "--n", "3", "--steps",
             "4", "--out", tmp_path / "s.png", "--npz", tmp_path / "s.npz")  # fmt: skip
    assert r.returncode == 0, r.stderr
    saved = np.load(tmp_path / "s.npz")
    assert saved["images"].shape == (6, 1, 8, 8)
    assert saved["labels"].tolist() == [2, 2, 2, 5, 5, 5] and str(saved["method"]) == "sgld"
    assert saved["images"].min() >= 0.0 and saved["images"].max() <= 1.0
    # unconditional SGLD on E(x): n * classes images in a square grid, labels -1
    r = jeat("generate", run, "--method", "sgld", "--unconditional", "--n", "2", "--steps", "4",
             "--out", tmp_path / "u.png", "--npz", tmp_path / "u.npz")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (np.load(tmp_path / "u.npz")["labels"] == -1).sum() == 20
    w, h = Image.open(tmp_path / "u.png").size
    assert abs(w - h) <= w // 4
    # descent is class-conditional only: a clear error, no file written
    r = jeat("generate", run, "--unconditional", "--out", tmp_path / "bad.png")
    assert r.returncode == 2 and "class-conditional" in r.stderr
    assert not (tmp_path / "bad.png").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny") / "run"
    r = jeat("train", "--out", run, *QUICK, "--epochs", "1", "--set", "final_eval=false",
             "--set", "final_samples=false", "--set", "final_analysis=false",
             "--set", "final_scores=false", "--set", "final_report=false")  # fmt: skip
    assert r.returncode == 0, r.stderr
    return run


def test_listings():
    r = jeat("datasets")
    assert r.returncode == 0 and all(
        n in r.stdout for n in ("digits", "mnist", "cifar10", "cifar100")
    )
    r = jeat("models")
    assert r.returncode == 0 and all(n in r.stdout for n in ("small_cnn", "preact_resnet18", "wrn"))
    r = jeat("objectives")
    assert r.returncode == 0 and "pgd-at" in r.stdout and "standard" in r.stdout
    r = jeat("attacks")
    assert r.returncode == 0 and all(
        n in r.stdout for n in ("autoattack", "square", "sgm", "roa", "dlrN", "n_queries")
    )
    r = jeat("config", "cifar10-pgdat-paper")
    assert r.returncode == 0 and "widen: 10" in r.stdout


def test_every_budget_option_takes_fractions():
    from jeat.cli import build_parser

    parse = build_parser().parse_args
    for cmd in ("eval", "attack", "analyze"):
        assert parse([cmd, "RUN", "--eps", "8/255"]).eps == pytest.approx(8 / 255)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--dataset", "imagenet-9"], "unknown dataset 'imagenet-9'"),
        (["train", "--model", "vit"], "unknown model 'vit'"),
        (["train", "--objective", "magic"], "unknown objective 'magic'"),
        (["train", "--set", "optim.lrr=1"], "unknown config key"),
        (["train", "--dataset", "cifar10", "--data-dir", "EMPTY"], "download"),
        (["eval", "NOWHERE"], "no model.pt"),
        (["eval", "BADCKPT"], "corrupt"),
        (["eval", "RUN", "--attacks", "clean,deepfool"], "unknown attack 'deepfool'"),
        (["eval", "RUN", "--attacks", "pgd0"], "at least 1 step"),
        (["eval", "RUN", "--eps", "-0.1"], "--eps must be >= 0"),
        (["eval", "RUN", "--eps", "8"], "write 8/255"),  # an L-inf budget above 1: never meant
        (["eval", "RUN", "--attacks", "pgd5:eps=-1"], "eps must be"),
        (["eval", "RUN", "--attacks", "sgm"], "needs a source model"),
        (["attack", "RUN", "--attack", "clean"], "not an attack"),
        (["certify", "RUN"], "name a certificate"),
        (["certify", "RUN", "--wrm"], "was not trained with wrm"),
        (["certify", "RUN", "--wrm", "--gamma", "2", "--rho", "0"], "rho must be numbers > 0"),
    ],
)
def test_errors_are_one_line_exit_2_and_leave_no_files(tmp_path, tiny_run, args, message):
    uses_run = "RUN" in args
    args = [str(tiny_run) if a == "RUN" else a for a in args]
    before_run = sorted(p.name for p in tiny_run.rglob("*"))
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "NOWHERE").mkdir()
    (tmp_path / "BADCKPT").write_bytes(b"not a checkpoint")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    args = [str(tmp_path / a) if a in ("EMPTY", "NOWHERE", "BADCKPT") else a for a in args]
    if args[0] == "train":
        args += ["--out", str(tmp_path / "out")]
    r = jeat(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jeat: error: "), r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    if uses_run:  # a failed eval writes nothing into the run folder
        assert sorted(p.name for p in tiny_run.rglob("*")) == before_run


def test_diverged_fresh_run_exits_2_and_leaves_no_files(tmp_path):
    out = tmp_path / "nan-run"
    r = jeat("train", "--out", out, "--quiet", "--lr", "1e12", "--set", "optim.name=sgd",
             "--set", "optim.momentum=0", "--set", "schedule.warmup_steps=0")  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("jeat: error: training diverged at")
    assert not out.exists()


def test_certify_writes_the_bound_and_the_attacks(tmp_path, tiny_run):
    out = tmp_path / "c.json"
    r = jeat("certify", tiny_run, "--wrm", "--gamma", "2", "--n", "20", "--rho", "0.5,1",
             "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["rho"] == [0.5, 1.0] and data["gamma"] == 2.0 and data["n"] == 20
    assert len(data["attacks"]) == 2 + 5 and "violations" in data
    assert (tmp_path / "c.png").exists()
