"""Model sources: the one path from what a user names to an ``nn.Module`` that returns logits for
images in [0, 1].

Every command and the Python API load models through :func:`load_model`. A source is

* a jeat run folder or checkpoint file (:func:`jeat.runs.load_trained`);
* a Python factory, ``py:path/to/net.py:make_model`` or ``package.module:make_model``, called
  with no arguments (or ``num_classes=`` when the factory takes it and ``num_classes`` is
  given), with ``weights``: a ``state_dict`` in a ``.pt`` file (read with
  ``torch.load(weights_only=True)``; a dict holding it under ``state_dict``, ``model_state`` or
  ``model`` is unwrapped, and DDP's ``module.`` prefix is removed) or a ``.safetensors`` file;
* a code-free file: TorchScript (``torch.jit.save``) or a ``torch.export`` program (``.pt2``).

A fully pickled model (``torch.save(model)``) runs arbitrary code when loaded: it is refused
unless ``trust_pickle=True``, with a message that says how to export a state_dict or
TorchScript instead.

Input conventions are model layers, so every ε stays in [0, 1] pixel units:
``normalize=(mean, std)`` puts ``(x - mean) / std`` in front; ``input_range="-1,1"`` puts
``z = 2x - 1`` in front of a model trained on [-1, 1] inputs (as JEM-family code is). An ε
applied in [-1, 1] space would be twice the pixel budget it claims: ε = 8/255 there is 4/255 in
pixels.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from jeat.config import TrainConfig
from jeat.energy import as_logits
from jeat.errors import JeatError
from jeat.models import Normalize
from jeat.utils import resolve_device

__all__ = [
    "LoadedModel",
    "load_model",
    "parse_normalize",
    "InputRange",
    "Logits",
    "Exported",
    "check_width",
    "INPUT_RANGES",
]

INPUT_RANGES = ("0,1", "-1,1")
_MODULE_SOURCE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_]\w*$")


@dataclass
class LoadedModel:
    """A loaded model (eval mode, on its device), what is known about it, and the training
    config when it is a jeat run (None otherwise)."""

    model: nn.Module
    meta: dict[str, Any] = field(default_factory=dict)
    config: TrainConfig | None = None

    @property
    def is_run(self) -> bool:
        return self.config is not None


class InputRange(nn.Module):
    """``z = 2x - 1``: the adapter in front of a model that takes inputs in [-1, 1]."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 2.0 - 1.0


class Logits(nn.Module):
    """Returns the logits of a model whose output is a tuple (first element) or a dict
    (``"logits"``), so every caller of ``model(x)`` gets a tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return as_logits(self.model(x))


class Exported(nn.Module):
    """A ``torch.export`` program's module. Its graph is fixed at export time (the mode the user
    exported it in; export it with a dynamic batch dimension), and it refuses
    ``train()``/``eval()``: this wrapper takes the mode switch
    for it, so the attacks' mode guard works unchanged."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.program = module

    def forward(self, x: Tensor) -> Tensor:
        try:
            return self.program(x)
        except AssertionError as exc:  # a shape guard of the exported graph
            raise JeatError(
                f"the torch.export program rejects inputs of shape {tuple(x.shape)} ({exc}); "
                "export it with a dynamic batch size: torch.export.export(model, (x,), "
                "dynamic_shapes=({0: torch.export.Dim('batch')},))"
            ) from None

    def train(self, mode: bool = True) -> Exported:
        self.training = mode
        return self


def parse_normalize(text: str | tuple | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``"0.49,0.48,0.45;0.25,0.24,0.26"`` (mean;std) -> ((mean...), (std...))."""
    if text is None or isinstance(text, tuple):
        return text
    parts = text.split(";")
    try:
        if len(parts) != 2:
            raise ValueError
        mean = tuple(float(v) for v in parts[0].split(",") if v.strip())
        std = tuple(float(v) for v in parts[1].split(",") if v.strip())
    except ValueError:
        raise JeatError(
            f"--normalize takes 'MEAN;STD' with comma-separated numbers per channel, e.g. "
            f"'0.4914,0.4822,0.4465;0.2470,0.2435,0.2616', got '{text}'"
        ) from None
    if not mean or len(mean) != len(std):
        raise JeatError(f"--normalize: mean and std need the same number of channels, got '{text}'")
    if any(s <= 0 for s in std):
        raise JeatError(f"--normalize: every std must be positive, got {std}")
    return mean, std


def load_model(
    source: str | Path,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    normalize: str | tuple | None = None,
    input_range: str = "0,1",
    trust_pickle: bool = False,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load the model that ``source`` names (see the module docstring), with the input
    adapters asked for, in eval mode on ``device``. ``num_classes``, when given, is checked
    against the width of the model's logits by the caller that knows the input shape
    (:func:`check_width`)."""
    src = str(source)
    norm = parse_normalize(normalize)
    if input_range not in INPUT_RANGES:
        raise JeatError(
            f"--input-range must be one of {', '.join(INPUT_RANGES)}, got '{input_range}'"
        )
    if norm is not None and input_range != "0,1":
        raise JeatError(
            "--normalize and --input-range -1,1 both describe the model's input transform; give "
            "one (--input-range -1,1 is --normalize '0.5;0.5')"
        )
    if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 2):
        raise JeatError(f"--num-classes must be an integer >= 2, got {num_classes}")
    meta: dict[str, Any] = {"source": src}
    config = None
    if src.startswith("py:") or (_MODULE_SOURCE.match(src) and not Path(src).exists()):
        model = _from_factory(src, num_classes)
        meta["kind"] = "factory"
        if weights is not None:
            _load_weights(model, Path(weights))
            meta["weights"] = str(weights)
    else:
        if weights is not None:
            raise JeatError(
                f"--weights goes with a Python factory (--model py:net.py:make_model); {src} "
                "already holds its weights"
            )
        path = Path(src)
        if not path.exists():
            raise JeatError(
                f"model source {src} does not exist (give a jeat run folder or checkpoint, "
                "py:FILE.py:FACTORY, package.module:FACTORY, a TorchScript file or a .pt2 export)"
            )
        model, meta, config = _from_file(path, trust_pickle, meta)
    if config is None:  # a user's network: tuple and dict outputs become a logits tensor
        model = Logits(model)
    if norm is not None:
        model = nn.Sequential(Normalize(*norm), model)
        meta["normalize"] = {"mean": list(norm[0]), "std": list(norm[1])}
    if input_range != "0,1":
        model = nn.Sequential(InputRange(), model)
        meta["input_range"] = input_range
    if num_classes is not None:
        meta["num_classes"] = num_classes
    model.to(device if isinstance(device, torch.device) else resolve_device(str(device)))
    return LoadedModel(model.eval(), meta, config)


def check_width(loaded: LoadedModel, x: Tensor, num_classes: int, where: str) -> None:
    """Fail clearly when the model's logits are not ``num_classes`` wide for inputs like ``x``
    (``where`` names the class count's origin: the dataset, --num-classes)."""
    from jeat.attacks import model_width

    try:
        width = model_width(loaded.model, x[:1].to(_device_of(loaded.model)))
    except JeatError:
        raise
    except Exception as exc:  # a user's network failing on these inputs
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise JeatError(
            f"the model {loaded.meta.get('source')} fails on inputs of shape "
            f"{tuple(x.shape[1:])}: {reason}"
        ) from None
    source = loaded.meta.get("source")
    flag = loaded.meta.get("num_classes")
    if flag is not None and width != flag:
        raise JeatError(f"the model {source} returns {width} logits but --num-classes is {flag}")
    if width != num_classes:
        raise JeatError(
            f"the model {source} returns {width} logits but {where} has {num_classes} classes"
        )


def _device_of(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def _from_factory(src: str, num_classes: int | None) -> nn.Module:
    if src.startswith("py:"):
        spec_text = src[3:]
        file_part, sep, name = spec_text.rpartition(":")
        if not sep or not file_part or not name:
            raise JeatError(f"a file factory is py:PATH.py:NAME, got '{src}'")
        path = Path(file_part)
        if not path.is_file():
            raise JeatError(f"model source {src}: file {path} does not exist")
        mod_name = f"jeat_user_model_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise JeatError(f"model source {src}: {path} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise JeatError(f"model source {src}: running {path} failed: {exc!r}"[:400]) from None
    else:
        mod_path, _, name = src.rpartition(":")
        try:
            module = importlib.import_module(mod_path)
        except ImportError as exc:
            raise JeatError(f"model source {src}: cannot import {mod_path} ({exc})") from None
    factory = getattr(module, name, None)
    if factory is None:
        where = getattr(module, "__file__", None) or module.__name__
        raise JeatError(f"model source {src}: {name} is not defined in {where}")
    if not callable(factory):
        raise JeatError(f"model source {src}: {name} is not callable")
    kwargs: dict[str, Any] = {}
    if num_classes is not None and _accepts(factory, "num_classes"):
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise JeatError(f"model source {src}: {name}() failed: {exc!r}"[:400]) from None
    if not isinstance(model, nn.Module):
        raise JeatError(
            f"model source {src}: {name}() returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _read_state(path: Path) -> Mapping[str, Tensor]:
    if not path.is_file():
        raise JeatError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover - a declared dependency
            raise JeatError("reading .safetensors needs the safetensors package") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise JeatError(
                f"weights file {path} is not a readable safetensors file ({exc})"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if _is_pickled_object(exc):
            raise JeatError(
                f"weights file {path} holds pickled Python objects, not a state_dict; save "
                "torch.save(model.state_dict(), FILE) (or a .safetensors file) instead"
            ) from None
        raise JeatError(
            f"weights file {path} is corrupt or not a torch file ({_reason(exc)})"
        ) from None
    if isinstance(state, Mapping):
        for key in ("state_dict", "model_state", "model"):
            inner = state.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, Tensor) for v in inner.values())
            ):
                state = inner
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise JeatError(
            f"weights file {path} does not hold a state_dict (a name -> tensor mapping)"
        )
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _load_weights(model: nn.Module, path: Path) -> None:
    state = _read_state(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing in the file: {_some(missing)}")
    if unexpected:
        problems.append(f"not in the network: {_some(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch (file vs network): {_some(shapes)}")
    if problems:
        raise JeatError(f"weights {path} do not match the network: {'; '.join(problems)}")
    model.load_state_dict(state)


def _some(items: list[str], k: int = 4) -> str:
    return ", ".join(items[:k]) + (f" and {len(items) - k} more" if len(items) > k else "")


def _reason(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def _is_pickled_object(exc: Exception) -> bool:
    text = str(exc)
    # a pickled object names a class the weights-only unpickler refuses; a corrupt file fails
    # earlier ("Unsupported operand", truncated data)
    return "Unsupported global" in text or "GLOBAL " in text


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def _from_file(
    path: Path, trust_pickle: bool, meta: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any], TrainConfig | None]:
    from jeat.runs import load_trained

    if path.is_dir():
        model, run_meta, cfg = load_trained(path)
        return model, {**meta, **run_meta, "kind": "run"}, cfg
    names = _zip_names(path)
    if path.suffix == ".pt2" or any(n.endswith(".json") and "models/" in n for n in names):
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise JeatError(
                f"{path} is not a readable torch.export program ({_reason(exc)})"
            ) from None
        return Exported(program.module()), {**meta, "kind": "export"}, None
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise JeatError(f"{path} is not a readable TorchScript file ({_reason(exc)})") from None
        return module, {**meta, "kind": "torchscript"}, None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not _is_pickled_object(exc):
            raise JeatError(
                f"model file {path} is corrupt or not a model file ({_reason(exc)})"
            ) from None
        if not trust_pickle:
            raise JeatError(
                f"{path} is a pickled model (torch.save(model)): loading it runs arbitrary code. "
                "Export it instead: torch.save(model.state_dict(), 'w.pt') and load with "
                "--model py:net.py:make_model --weights w.pt, or torch.jit.script(model).save("
                "'m.pt'); or pass --trust-pickle if you trust the file"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise JeatError(f"cannot unpickle {path} ({_reason(exc2)})") from None
        if not isinstance(obj, nn.Module):
            raise JeatError(
                f"{path} unpickles to {type(obj).__name__}, not a torch.nn.Module"
            ) from None
        return obj, {**meta, "kind": "pickle"}, None
    if isinstance(payload, dict) and "format" in payload:
        model, run_meta, cfg = load_trained(path)
        return model, {**meta, **run_meta, "kind": "run"}, cfg
    if (
        isinstance(payload, Mapping)
        and payload
        and all(isinstance(v, Tensor) for v in payload.values())
    ):
        raise JeatError(
            f"{path} holds only weights (a state_dict); give the network's code too: "
            f"--model py:net.py:make_model --weights {path}"
        )
    raise JeatError(
        f"{path} is not a jeat run, TorchScript file, torch.export program or pickled model"
    )
