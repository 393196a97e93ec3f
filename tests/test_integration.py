"""The whole pipeline on real data from ../shared/data (skipped with a reason when absent)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from jeat.config import load_config
from jeat.finish import train_and_finish
from jeat.runs import load_trained

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CASES = {
    "mnist-t10k": (
        SHARED_DATA / "mnist",
        ["model.options.width=8", "objective.attack.eps=0.3", "objective.attack.step_size=0.1",
         "eval.eps=0.3"],
    ),
    "cifar10": (
        SHARED_DATA / "cifar-10-batches-py",
        ["model.name=preact_resnet18", "model.options={width: 8, norm: batch}",
         "objective.attack.eps=8/255", "objective.attack.step_size=2/255", "eval.eps=8/255",
         "generate.seed_resolution=8"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_eval_generate_on_real_data(name, tmp_path):
    folder, extra = CASES[name]
    if not folder.exists():
        pytest.skip(f"{folder} is absent (real data is only on machines with ../shared/data)")
    cfg = load_config(
        "digits-pgdat",
        [
            f"data.name={name}",
            f"data.root={folder}",
            "data.train_subset=256",
            "epochs=1",
            "objective.attack.steps=2",
            "eval.n=64",
            "eval.epoch_n=32",
            "eval.epoch_steps=2",
            "eval.attacks=[clean, fgsm, pgd5]",
            "generate.steps=5",
            "generate.n_per_class=2",
            "eval.curve=pgd5",
            "analysis.n=16",
            "analysis.grid=5",
            "analysis.samples_per_class=1",
            "final_scores=false",  # judge scores on real data: tests/test_scores.py (MNIST)
            "progress=false",
            *extra,
        ],
    )
    result = train_and_finish(cfg, tmp_path / name)
    shape = (1, 28, 28) if name.startswith("mnist") else (3, 32, 32)
    model, meta, _ = load_trained(tmp_path / name)
    assert tuple(meta["image_shape"]) == shape and meta["num_classes"] == 10
    table = json.loads((tmp_path / name / "eval.json").read_text())
    assert table["n"] == 64 and len(table["attacks"]) == 3
    assert result.eval is not None
    grid = Image.open(tmp_path / name / "samples.png")
    assert grid.mode == ("L" if shape[0] == 1 else "RGB")
    assert grid.size[1] > grid.size[0]  # 10 rows of 2 images
    analysis = json.loads((tmp_path / name / "analysis" / "analysis.json").read_text())
    assert analysis["n"] == 16 and (tmp_path / name / "curve-pgd5-linf.png").exists()
    page = (tmp_path / name / "report.html").read_text()
    assert '<section id="energy">' in page and "No generation scores yet" in page
