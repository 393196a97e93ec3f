"""Models from anywhere (jeat.sources): a user's factory plus a state_dict or safetensors file,
TorchScript and torch.export files, input adapters, and the notebook API jeat.evaluate."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import cli_fails, jeat_cli, write_image_folder
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import jeat
from jeat.errors import JeatError
from jeat.sources import load_model

# A user's own network: the same layers as jeat's small_cnn (so a jeat run's weights fit), its
# own normalisation layer, any number of classes.
NET_PY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Norm(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.register_buffer("mean", torch.full((1, channels, 1, 1), 0.5))
            self.register_buffer("std", torch.full((1, channels, 1, 1), 0.25))

        def forward(self, x):
            return (x - self.mean) / self.std


    class CNN(nn.Module):
        def __init__(self, channels, num_classes, w=32):
            super().__init__()
            act = nn.ReLU
            self.features = nn.Sequential(
                nn.Conv2d(channels, w, 3, padding=1), nn.Identity(), act(),
                nn.Conv2d(w, 2 * w, 3, padding=1), nn.Identity(), act(), nn.MaxPool2d(2),
                nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.Identity(), act(),
                nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            )
            self.head = nn.Sequential(nn.Linear(16 * w, 128), act(), nn.Linear(128, num_classes))

        def forward(self, x):
            return self.head(self.features(x))


    def make(num_classes=10):
        return nn.Sequential(Norm(1), CNN(1, num_classes))


    def make_tuple():
        class Twice(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = make()

            def forward(self, x):
                return self.net(x), {"aux": 0}

        return Twice()


    NOT_CALLABLE = 3


    def not_a_module():
        return "a string"
    """
)


def _rows(path):
    rows = json.loads(path.read_text())["attacks"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture()
def user(tmp_path, standard_run):
    """net.py, and the standard digits run's weights as a state_dict and a safetensors file."""
    from jeat.runs import load_trained

    (tmp_path / "net.py").write_text(NET_PY)
    model, _, _ = load_trained(standard_run)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    save_file(state, str(tmp_path / "w.safetensors"))
    return tmp_path


def test_factory_with_weights_gives_the_runs_table(user, standard_run, digits_folder):
    data = f"folder:{digits_folder}"
    # the budget is named: the run's config says 0.2, a user's folder defaults to 8/255
    common = ["--dataset", data, "--attacks", "clean,fgsm,pgd20", "--n", "80", "--seed", "3",
              "--eps", "0.2", "--quiet"]  # fmt: skip
    r = jeat_cli("eval", standard_run, *common, "--out", user / "run.json")
    assert r.returncode == 0, r.stderr
    for weights in ("w.pt", "w.safetensors"):
        out = user / f"{weights}.json"
        r = jeat_cli("eval", "--model", "py:net.py:make", "--weights", weights, *common,
                     "--out", out, cwd=user)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert _rows(out) == _rows(user / "run.json")
    assert json.loads((user / "run.json").read_text())["robust_accuracy"] < 95  # attacks worked


def test_forty_three_class_factory_gives_the_runs_table(tmp_path):
    """A 43-class jeat run on a user's image folder, and the same weights in the user's own
    network definition (its own normalisation layer): the same table on the same folder."""
    rng = np.random.default_rng(1)
    protos = rng.random((43, 1, 8, 8))
    names = [f"sign{k:02d}" for k in range(43)]
    for split, n in (("train", 8), ("test", 3)):
        labels = np.repeat(np.arange(43), n)
        imgs = np.clip(protos[labels] + 0.15 * rng.standard_normal((len(labels), 1, 8, 8)), 0, 1)
        write_image_folder(tmp_path / "signs" / split, torch.from_numpy(imgs), labels, names)
    data = f"folder:{tmp_path / 'signs'}"
    # --model small_cnn: the network net.py mirrors (its defaults: the lean network's options
    # do not follow it)
    r = jeat_cli("train", "--dataset", data, "--objective", "standard", "--epochs", "4",
                 "--model", "small_cnn", "--quiet", "--out", "run", "--set", "final_eval=false",
                 "--set", "final_samples=false", "--set", "final_analysis=false",
                 "--set", "final_scores=false", "--set", "final_report=false",
                 cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    from jeat.runs import load_trained

    model, meta, _ = load_trained(tmp_path / "run")
    assert meta["num_classes"] == 43
    torch.save(model.state_dict(), tmp_path / "w43.pt")
    (tmp_path / "net.py").write_text(NET_PY)
    common = ["--attacks", "clean,pgd10", "--eps", "0.1", "--seed", "2", "--quiet"]
    r1 = jeat_cli("eval", "run", "--out", "a.json", *common, cwd=tmp_path)
    r2 = jeat_cli("eval", "--model", "py:net.py:make", "--weights", "w43.pt", "--num-classes",
                  "43", "--dataset", data, "--out", "b.json", *common, cwd=tmp_path)  # fmt: skip
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    a, b = _rows(tmp_path / "a.json"), _rows(tmp_path / "b.json")
    assert a == b
    # chance is 2.3%: the run learned, and the attack is real
    assert a[0]["n"] == 129 and a[0]["accuracy"] > 10 and a[1]["accuracy"] < a[0]["accuracy"]


def test_torchscript_and_export_files_load_without_code(user, digits):
    sys.path.insert(0, str(user))
    try:
        import net  # the user's module, for exporting only
    finally:
        sys.path.remove(str(user))
    model = net.make()
    model.load_state_dict(torch.load(user / "w.pt", weights_only=True))
    model.eval()
    x = digits.x_test[:32]
    torch.jit.script(model).save(str(user / "model.ts"))
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(user / "model.pt2"))
    ref = model(x)
    for name in ("model.ts", "model.pt2"):
        loaded = load_model(user / name)
        assert loaded.meta["kind"] == ("torchscript" if name == "model.ts" else "export")
        assert torch.equal(loaded.model(x), ref)
        table = jeat.evaluate(loaded.model, (x, digits.y_test[:32]), ["clean", "pgd5"], eps=0.2)
        assert table.rows[-1].accuracy is not None
    # the export's fixed graph still works under the attacks' eval/train mode switches
    assert not load_model(user / "model.pt2").model.training


def test_forty_three_classes_and_tuple_outputs(user):
    loaded = load_model(f"py:{user / 'net.py'}:make", num_classes=43)
    x = torch.rand(5, 1, 8, 8)
    assert loaded.model(x).shape == (5, 43)
    y = torch.randint(0, 43, (5,))
    table = jeat.evaluate(loaded.model, (x, y), ["clean", "pgd5"], eps=0.1, num_classes=43)
    assert table.n == 5
    wrapped = load_model(f"py:{user / 'net.py'}:make_tuple")
    assert wrapped.model(x).shape == (5, 10)  # the tuple's first element


def test_minus_one_one_inputs_keep_eps_in_pixels(pgdat_model, digits):
    """A model that takes [-1, 1] inputs, loaded with input_range '-1,1', is attacked at the same
    pixel budget as the [0, 1] model it computes."""

    class MinusOneOne(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            return self.inner((z + 1) / 2)

    x, y = digits.x_test[:150], digits.y_test[:150]
    shifted = MinusOneOne(pgdat_model)
    from jeat.sources import InputRange

    model = nn.Sequential(InputRange(), shifted).eval()
    a = jeat.evaluate(pgdat_model, (x, y), ["clean", "pgd20"], eps=0.2, mode="independent")
    b = jeat.evaluate(model, (x, y), ["clean", "pgd20"], eps=0.2, mode="independent")
    assert [r.accuracy for r in a.rows] == pytest.approx([r.accuracy for r in b.rows], abs=0.7)
    assert a.rows[1].accuracy < a.rows[0].accuracy - 10  # the attack is real
    # without the adapter the same model sees shifted inputs and is a different classifier
    c = jeat.evaluate(shifted, (x, y), ["clean"], eps=0.2)
    assert c.rows[0].accuracy != a.rows[0].accuracy


def test_input_range_option_through_the_cli(user, tmp_path):
    (user / "shifted.py").write_text(
        "from net import make\nimport torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.m = make()\n"
        "    def forward(self, z):\n        return self.m((z + 1) / 2)\n"
        "def build():\n    return M()\n"
    )
    torch.save(
        {f"m.{k}": v for k, v in torch.load(user / "w.pt", weights_only=True).items()},
        user / "ws.pt",
    )
    common = ["--dataset", "digits", "--attacks", "clean,pgd20", "--n", "60", "--seed", "1",
              "--quiet", "--mode", "independent"]  # fmt: skip
    r1 = jeat_cli("eval", "--model", "py:net.py:make", "--weights", "w.pt", *common, "--out",
                  "a.json", cwd=user)  # fmt: skip
    r2 = jeat_cli("eval", "--model", "py:shifted.py:build", "--weights", "ws.pt",
                  "--input-range", "-1,1", *common, "--out", "b.json", cwd=user)  # fmt: skip
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    a, b = _rows(user / "a.json"), _rows(user / "b.json")
    assert [r["accuracy"] for r in a] == pytest.approx([r["accuracy"] for r in b], abs=2.0)


def test_notebook_api_takes_tensors_or_a_dataloader(pgdat_model, digits):
    x, y = digits.x_test[:64], digits.y_test[:64]
    a = jeat.evaluate(pgdat_model, (x, y), ["clean", "fgsm"], eps=0.2)
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    b = jeat.evaluate(pgdat_model, loader, ["clean", "fgsm"], eps=0.2)
    assert [r.accuracy for r in a.rows] == [r.accuracy for r in b.rows]
    assert "worst case" in a.table()
    with pytest.raises(JeatError, match=r"\(x, y\)"):
        jeat.evaluate(pgdat_model, x, eps=0.2)


def test_bad_model_sources_fail_cleanly(user, standard_run):
    torch.save(torch.nn.Linear(2, 2), user / "pickled.pt")
    torch.save({"junk.weight": torch.zeros(3)}, user / "wrong.pt")
    big = {k: v for k, v in torch.load(user / "w.pt", weights_only=True).items()}
    big["1.head.2.weight"] = torch.zeros(43, 128)
    torch.save(big, user / "shape.pt")
    ev = ["eval", "--dataset", "digits", "--n", "5", "--attacks", "clean"]
    cli_fails([*ev, "--model", "py:missing.py:make"], user, "missing.py", "does not exist")
    cli_fails([*ev, "--model", "py:net.py:nope"], user, "nope is not defined")
    cli_fails([*ev, "--model", "py:net.py:NOT_CALLABLE"], user, "not callable")
    cli_fails([*ev, "--model", "py:net.py:not_a_module"], user, "not a torch.nn.Module")
    cli_fails([*ev, "--model", "py:net.py:make", "--weights", "wrong.pt"], user, "junk.weight",
           "missing in the file")  # fmt: skip
    cli_fails([*ev, "--model", "py:net.py:make", "--weights", "shape.pt"], user,
           "1.head.2.weight", "(43, 128)")  # fmt: skip
    cli_fails([*ev, "--model", "pickled.pt"], user, "pickled model", "--trust-pickle")
    cli_fails([*ev, "--model", "w.pt"], user, "state_dict")
    # the factory takes num_classes: a 12-class network, which the 10-class weights do not fit
    cli_fails([*ev, "--model", "py:net.py:make", "--weights", "w.pt", "--num-classes", "12"], user,
           "1.head.2.weight", "(10, 128) vs (12, 128)")  # fmt: skip
    cli_fails(["eval", "--model", "py:net.py:make", "--weights", "w.pt"], user, "--dataset")
    cli_fails([*ev, "--model", "py:net.py:make", "--normalize", "0.5;"], user, "--normalize")
    # a 43-class network on 10-class digits
    (user / "net43.py").write_text("from net import make as m\ndef make():\n    return m(43)\n")
    cli_fails([*ev, "--model", "py:net43.py:make"], user, "43 logits", "10 classes")
    cli_fails([*ev, "--model", "py:net43.py:make", "--num-classes", "12"], user, "43 logits",
           "--num-classes is 12")  # fmt: skip
    # trusted, the pickled model loads (then fails the width check for its 2 outputs on digits)
    cli_fails([*ev, "--model", "pickled.pt", "--trust-pickle"], user, "fails on inputs")
