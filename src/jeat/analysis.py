"""Energy-landscape analysis: how a classifier's energy looks around real data.

A classifier with logits ``f(x)`` defines the energies ``E(x, y) = -f(x)[y]`` and
``E(x) = -logsumexp_y f(x)[y]`` (:mod:`jeat.energy`). In this view, adversarial training
shapes the energy: it makes ``E(x, y)`` *flat and low* in a neighbourhood of real data, so
that no small perturbation can raise the energy of the true class (which is what an attack
does). A standard classifier has a narrow, steep basin: its energy rises quickly a short
distance away from a real image. :func:`analyze` measures and draws this, for one model or
several side by side:

1. **Contour** (``contour.png``): ``E(x + a*d1 + b*d2, y) - E(x, y)`` over a ``grid x grid``
   grid of ``(a, b)`` in ``[-span, span]^2``, where ``d1, d2`` are random orthonormal
   directions per image (unit L2 norm, seeded). Every model sees the same images and the
   same directions, so the panels are comparable and share one colour scale. A robust model
   shows a wide, shallow basin; a standard model a steep bowl.
2. **Histograms** (``histograms.png``): the marginal energy ``E(x)`` of real images, of
   PGD-20 adversarial examples (L-inf ball of radius ``eps``, crafted on the model itself), of
   generated images (when given) and of uniform noise. A model whose ``E(x)`` is a useful
   density score puts real (and generated) data low and noise high.
3. **Slices** (``slices.png``): ``E(x + t*d, y) - E(x, y)`` for ``t`` in ``[-span, span]``
   along the adversarial direction ``d = (x_adv - x) / ||x_adv - x||_2`` (the model's own)
   and along a random unit direction. The adversarial slice shows how far up the energy
   climbs where the attack goes; the random one how isotropic the basin is.
4. **Flatness** (``flatness.png`` and the key numbers): the mean ``|E(x + δ, y) - E(x, y)|``
   over random ``δ`` uniform in the L-inf ``eps``-ball (clipped to the [0, 1] box: the threat
   set), several draws per image, and the mean per-image L2 norm of the input gradient
   ``∇x E(x, y)``; the same for the marginal ``E(x)``. Smaller is flatter.

Everything runs under ``torch.no_grad`` except the gradients and the attack, in chunks of
``batch_size`` inputs, with each model in eval mode (its train/eval modes are restored
afterwards). Randomness comes from generators seeded with ``seed``; the global RNG is never
touched.

The contour and the slices move along the directions without clipping to [0, 1] (the
landscape ``E(x + a*d1 + b*d2, y)`` exactly as written; ``clamp=True`` clips instead).
``span`` is in L2 units; by default it is ``2 * eps * sqrt(C*H*W)``, twice the L2 length of
a corner of the L-inf ball, so the adversarial slice passes through the adversarial example
(at ``t ≈ ||x_adv - x||_2``) and goes as far again.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from jeat.attacks import PGD, LinfBall, check_images, logits_of, model_mode, model_width
from jeat.energy import check_labels, joint_energy_from_logits, marginal_energy_from_logits
from jeat.errors import JeatError
from jeat.utils import derive_seed, pyplot, save_figure, write_json

__all__ = [
    "AnalysisResult",
    "ContourStats",
    "Flatness",
    "SliceStats",
    "analyze",
    "random_directions",
    "energy_contour",
    "energy_slices",
    "flatness",
    "energy_stats",
    "plot_contour",
    "plot_histograms",
    "plot_slices",
    "plot_flatness",
]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
HIST_KINDS = ("real", "adversarial", "generated", "noise")

# seed streams: one derived seed per use, so adding a use never shifts another's numbers
_DIRECTIONS, _SLICE_DIRECTION, _NOISE, _DELTA, _PGD = range(5)


def _r(v: float) -> float:
    """A float rounded to 6 significant digits for JSON."""
    return float(f"{float(v):.6g}")


def _device_of(model: nn.Module, default: torch.device) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else default


def _check_finite(e: Tensor, name: str, what: str) -> Tensor:
    if not bool(torch.isfinite(e).all()):
        raise JeatError(
            f"NaN or infinite energies from model '{name}' on {what}; the model's logits "
            "must be finite (a diverged checkpoint?)"
        )
    return e


def _energies(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    batch_size: int,
    name: str,
    what: str,
) -> Tensor:
    """``E(x, y)`` (or ``E(x)`` when ``y`` is None) in chunks, on the host, under no_grad."""
    dev = _device_of(model, x.device)
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            logits = logits_of(model, x[i : i + batch_size].to(dev))
            if y is None:
                e = marginal_energy_from_logits(logits)
            else:
                e = joint_energy_from_logits(logits, y[i : i + batch_size].to(dev), check=False)
            out.append(e.float().cpu())
    e = torch.cat(out) if out else torch.empty(0)
    return _check_finite(e, name, what)


def random_directions(
    x: Tensor, seed: int = 0, count: int = 2, generator: torch.Generator | None = None
) -> list[Tensor]:
    """``count`` random directions per image, orthonormal per image in the L2 sense.

    Gaussian draws from a CPU generator seeded with ``seed`` (so the same on every device;
    ``generator`` overrides it), orthogonalised per image by Gram-Schmidt and normalised to
    unit L2 norm; returned on ``x``'s device, each shaped like ``x``.
    """
    d = x[0].numel() if x.shape[0] else 0
    if count > d:
        raise JeatError(f"cannot draw {count} orthogonal directions in {d} dimensions")
    gen = generator or torch.Generator().manual_seed(int(seed))
    flat = torch.randn((count, x.shape[0], d), generator=gen, dtype=torch.float64)
    dirs: list[Tensor] = []
    for k in range(count):
        v = flat[k]
        for u in dirs:
            v = v - (v * u).sum(1, keepdim=True) * u
        dirs.append(v / v.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return [u.to(dtype=x.dtype, device=x.device).view_as(x) for u in dirs]


def energy_contour(
    models: Mapping[str, nn.Module],
    x: Tensor,
    y: Tensor,
    d1: Tensor,
    d2: Tensor,
    offsets: Tensor,
    batch_size: int = 1024,
    clamp: bool = False,
) -> dict[str, Tensor]:
    """``E(x + a*d1 + b*d2, y)`` for every ``a, b`` in ``offsets``: an ``N x G x G`` tensor per
    model (rows index ``a``, columns ``b``; on the host).

    The ``N * G * G`` inputs are built chunk by chunk (``batch_size`` at a time) and every
    model sees the same chunk, so the models are compared on identical inputs.
    """
    n, g = x.shape[0], offsets.numel()
    a, b = torch.meshgrid(offsets, offsets, indexing="ij")
    a, b = a.reshape(-1).to(x), b.reshape(-1).to(x)
    total = n * g * g
    parts: dict[str, list[Tensor]] = {name: [] for name in models}
    view = (-1, *([1] * (x.dim() - 1)))
    with torch.no_grad():
        for start in range(0, total, batch_size):
            idx = torch.arange(start, min(start + batch_size, total), device=x.device)
            img, pt = idx // (g * g), idx % (g * g)
            xs = x[img] + a[pt].view(view) * d1[img] + b[pt].view(view) * d2[img]
            if clamp:
                xs = xs.clamp(0.0, 1.0)
            for name, model in models.items():
                dev = _device_of(model, x.device)
                logits = logits_of(model, xs.to(dev))
                e = joint_energy_from_logits(logits, y[img].to(dev), check=False)
                parts[name].append(e.float().cpu())
    out = {}
    for name, p in parts.items():
        e = torch.cat(p).view(n, g, g)
        out[name] = _check_finite(e, name, "the contour grid")
    return out


def energy_slices(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    direction: Tensor,
    ts: Tensor,
    batch_size: int = 1024,
    clamp: bool = False,
    name: str = "model",
) -> Tensor:
    """``E(x + t*direction, y)`` for every ``t`` in ``ts``: an ``N x T`` tensor on the host."""
    n, t = x.shape[0], ts.numel()
    ts = ts.to(x)
    view = (-1, *([1] * (x.dim() - 1)))
    dev = _device_of(model, x.device)
    out = []
    with torch.no_grad():
        for start in range(0, n * t, batch_size):
            idx = torch.arange(start, min(start + batch_size, n * t), device=x.device)
            img, k = idx // t, idx % t
            xs = x[img] + ts[k].view(view) * direction[img]
            if clamp:
                xs = xs.clamp(0.0, 1.0)
            logits = logits_of(model, xs.to(dev))
            e = joint_energy_from_logits(logits, y[img].to(dev), check=False)
            out.append(e.float().cpu())
    return _check_finite(torch.cat(out).view(n, t), name, "the 1-D slices")


@dataclass
class Flatness:
    """How flat the energy is around real data (smaller = flatter). Means over the images.

    * ``delta_joint``: mean ``|E(x+δ, y) - E(x, y)|``, ``δ`` uniform in the L-inf eps-ball
      (clipped to [0, 1]), ``draws`` per image; ``rise_joint`` the signed mean
      ``E(x+δ, y) - E(x, y)``; ``delta_marginal`` / ``rise_marginal`` the same for ``E(x)``.
    * ``grad_joint``: mean ``||∇x E(x, y)||_2`` per image; ``grad_joint_l1`` the L1 norm
      (``eps * ||∇||_1`` is the first-order rise an L-inf attacker can buy);
      ``grad_marginal``: mean ``||∇x E(x)||_2``.
    * ``adv_rise_joint``: mean ``E(x_adv, y) - E(x, y)`` at the PGD-20 adversarial examples
      (the worst case the random draws estimate the typical case of).
    * ``energy_joint`` / ``energy_marginal``: mean ``E(x, y)`` and ``E(x)`` at the real data
      (how low the basin sits); ``accuracy`` and ``adv_accuracy`` in percent.
    """

    delta_joint: float
    rise_joint: float
    delta_marginal: float
    rise_marginal: float
    grad_joint: float
    grad_joint_l1: float
    grad_marginal: float
    adv_rise_joint: float
    energy_joint: float
    energy_marginal: float
    accuracy: float
    adv_accuracy: float
    draws: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (v if isinstance(v, int) else _r(v)) for k, v in self.__dict__.items()}


def flatness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    draws: int = 8,
    seed: int = 0,
    batch_size: int = 1024,
    x_adv: Tensor | None = None,
    name: str = "model",
) -> Flatness:
    """The flatness figures of ``model`` at ``(x, y)`` (see :class:`Flatness`).

    ``x_adv`` are the model's adversarial examples for ``adv_rise_joint`` (computed with
    PGD-20 in the L-inf ``eps``-ball when not given). Call it with the model in the mode you
    want (``analyze`` puts it in eval mode).
    """
    n = x.shape[0]
    dev = _device_of(model, x.device)
    gen = torch.Generator().manual_seed(derive_seed(seed, _DELTA))
    ej0 = _energies(model, x, y, batch_size, name, "the real images")
    em0 = _energies(model, x, None, batch_size, name, "the real images")
    dj, dm = torch.zeros(n), torch.zeros(n)
    rj, rm = torch.zeros(n), torch.zeros(n)
    for _ in range(draws):
        u = torch.rand(x.shape, generator=gen, dtype=torch.float32).to(x)
        xd = (x + (2 * u - 1) * eps).clamp(0.0, 1.0)
        ej = _energies(model, xd, y, batch_size, name, "inputs in the eps-ball") - ej0
        em = _energies(model, xd, None, batch_size, name, "inputs in the eps-ball") - em0
        dj += ej.abs()
        dm += em.abs()
        rj += ej
        rm += em
    g2, g1, gm = [], [], []
    for i in range(0, n, batch_size):
        xb = x[i : i + batch_size].to(dev).detach().requires_grad_(True)
        yb = y[i : i + batch_size].to(dev)
        with torch.enable_grad():
            logits = logits_of(model, xb)
            ej = joint_energy_from_logits(logits, yb, check=False).sum()
            em = marginal_energy_from_logits(logits).sum()
            (gj,) = torch.autograd.grad(ej, xb, retain_graph=True)
            (gmb,) = torch.autograd.grad(em, xb)
        g2.append(gj.flatten(1).norm(dim=1).float().cpu())
        g1.append(gj.flatten(1).abs().sum(dim=1).float().cpu())
        gm.append(gmb.flatten(1).norm(dim=1).float().cpu())
    grads = [torch.cat(g) for g in (g2, g1, gm)]
    for g in grads:
        _check_finite(g, name, "the energy gradients")
    if x_adv is None:
        x_adv = _pgd(model, x, y, eps, seed, batch_size)
    e_adv = _energies(model, x_adv, y, batch_size, name, "the adversarial examples")
    return Flatness(
        delta_joint=float(dj.mean()) / draws,
        rise_joint=float(rj.mean()) / draws,
        delta_marginal=float(dm.mean()) / draws,
        rise_marginal=float(rm.mean()) / draws,
        grad_joint=float(grads[0].mean()),
        grad_joint_l1=float(grads[1].mean()),
        grad_marginal=float(grads[2].mean()),
        adv_rise_joint=float((e_adv - ej0).mean()),
        energy_joint=float(ej0.mean()),
        energy_marginal=float(em0.mean()),
        accuracy=_accuracy(model, x, y, batch_size),
        adv_accuracy=_accuracy(model, x_adv, y, batch_size),
        draws=draws,
    )


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    dev = _device_of(model, x.device)
    right = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            pred = logits_of(model, x[i : i + batch_size].to(dev)).argmax(1).cpu()
            right += int((pred == y[i : i + batch_size].cpu()).sum())
    return 100.0 * right / max(1, x.shape[0])


def _pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int, batch_size: int) -> Tensor:
    """PGD-20 (CE loss, step eps/4, random start) in the L-inf eps-ball, seeded, in chunks."""
    if eps == 0:
        return x.clone()
    dev = _device_of(model, x.device)
    attack = PGD(LinfBall(eps), steps=20, step_size=eps / 4)
    gen = torch.Generator(device=dev).manual_seed(derive_seed(seed, _PGD))
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size].to(dev), y[i : i + batch_size].to(dev)
        out.append(attack(model, xb, yb, generator=gen, check=False).to(x.device))
    return torch.cat(out)


def energy_stats(e: Tensor) -> dict[str, float]:
    """Summary statistics of a 1-D tensor of energies: n, mean, std, min, quantiles, max."""
    e = e.double().flatten()
    if e.numel() == 0:
        return {"n": 0}
    q = torch.quantile(e, torch.tensor(QUANTILES, dtype=torch.float64))
    out: dict[str, float] = {"n": int(e.numel()), "mean": _r(e.mean())}
    out["std"] = _r(e.std()) if e.numel() > 1 else 0.0
    out["min"] = _r(e.min())
    out.update({f"q{round(p * 100):02d}": _r(v) for p, v in zip(QUANTILES, q, strict=True)})
    out["max"] = _r(e.max())
    return out


@dataclass
class ContourStats:
    """The 2-D landscape of one model: ``mean_relative[i][j]`` is the mean over images of
    ``E(x + a_i*d1 + b_j*d2, y) - E(x, y)`` (``a, b`` = the result's ``offsets``);
    ``rise_mean`` its mean over the grid (the basin's average height), ``rise_max`` its
    maximum, ``centre`` the mean ``E(x, y)`` itself."""

    centre: float
    rise_mean: float
    rise_max: float
    mean_relative: list[list[float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "centre": _r(self.centre),
            "rise_mean": _r(self.rise_mean),
            "rise_max": _r(self.rise_max),
            "mean_relative": [[_r(v) for v in row] for row in self.mean_relative],
        }


@dataclass
class SliceStats:
    """1-D slices of one model: mean over images of ``E(x + t*d, y) - E(x, y)`` at the
    result's ``ts``, along its adversarial direction and along a random direction;
    ``adv_distance`` the mean ``||x_adv - x||_2`` (where the adversarial example lies)."""

    adversarial: list[float]
    random: list[float]
    adv_distance: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "adv_distance": _r(self.adv_distance),
            "adversarial": [_r(v) for v in self.adversarial],
            "random": [_r(v) for v in self.random],
        }


@dataclass
class AnalysisResult:
    """Everything :func:`analyze` measured; ``to_dict()`` is what ``analysis.json`` holds.

    The tensors (not in the JSON) are kept for further analysis: ``directions`` the shared
    ``(d1, d2)``, ``contour_energies[name]`` the ``N x G x G`` absolute energies
    ``E(x + a*d1 + b*d2, y)``, ``centre_energies[name]`` the ``E(x, y)`` they are measured
    from, ``energies[name][kind]`` the marginal energies of each
    histogram.
    """

    models: list[str]
    n: int
    eps: float
    span: float
    grid: int
    seed: int
    clamp: bool
    offsets: list[float]
    ts: list[float]
    flatness: dict[str, Flatness]
    contour: dict[str, ContourStats]
    histograms: dict[str, dict[str, dict[str, float]]]
    slices: dict[str, SliceStats]
    files: dict[str, str] = field(default_factory=dict)
    directions: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    contour_energies: dict[str, Tensor] = field(default_factory=dict, repr=False)
    centre_energies: dict[str, Tensor] = field(default_factory=dict, repr=False)
    energies: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": list(self.models),
            "n": self.n,
            "eps": self.eps,
            "span": _r(self.span),
            "grid": self.grid,
            "seed": self.seed,
            "clamp": self.clamp,
            "flatness": {k: v.to_dict() for k, v in self.flatness.items()},
            "contour": {
                "offsets": [_r(v) for v in self.offsets],
                **{k: v.to_dict() for k, v in self.contour.items()},
            },
            "histograms": self.histograms,
            "slices": {
                "ts": [_r(v) for v in self.ts],
                **{k: v.to_dict() for k, v in self.slices.items()},
            },
            "files": dict(self.files),
        }

    def table(self) -> str:
        """The key numbers, one row per model (plain text)."""
        head = (
            f"{'model':<16}{'E(x,y)':>9}{'|ΔE| ε-ball':>13}{'‖∇E‖₂':>9}{'adv ΔE':>9}"
            f"{'contour rise':>14}{'acc':>7}{'adv acc':>9}"
        )
        lines = [
            f"energy landscape on {self.n} images, eps {self.eps:g} (L-inf), span {self.span:.3g}",
            head,
        ]
        for m in self.models:
            f, c = self.flatness[m], self.contour[m]
            lines.append(
                f"{m:<16}{f.energy_joint:>9.3f}{f.delta_joint:>13.4f}{f.grad_joint:>9.4f}"
                f"{f.adv_rise_joint:>9.3f}{c.rise_mean:>14.3f}{f.accuracy:>7.1f}"
                f"{f.adv_accuracy:>9.1f}"
            )
        return "\n".join(lines)


def _check_int(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise JeatError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


def _check_float(value: Any, what: str, positive: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise JeatError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise JeatError(f"{what} must be a finite number {'> 0' if positive else '>= 0'}, got {v}")
    return v


def analyze(
    models: Mapping[str, nn.Module],
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    out_dir: str | Path | None = None,
    grid: int = 21,
    span: float | None = None,
    slice_points: int = 41,
    draws: int = 8,
    bins: int = 40,
    generated: Tensor | Mapping[str, Tensor] | None = None,
    n_noise: int | None = None,
    contour_image: int | None = None,
    clamp: bool = False,
    seed: int = 0,
    batch_size: int = 1024,
    plots: bool = True,
) -> AnalysisResult:
    """Analyse the energy landscape of one or several models around real data ``(x, y)``.

    * ``models``: name -> classifier returning logits (several are compared side by side, on
      the same images and random directions).
    * ``x``, ``y``: real images in [0, 1] (N x C x H x W) and their labels.
    * ``eps``: the L-inf budget of the PGD-20 attack and of the random flatness draws.
    * ``grid``: contour points per axis (>= 3; odd grids contain the centre), over
      ``[-span, span]^2``; ``span`` (L2 units) defaults to ``2 * eps * sqrt(C*H*W)``.
    * ``slice_points``: points of each 1-D slice over ``[-span, span]``.
    * ``draws``: random ``δ`` per image for the flatness figures; ``bins``: histogram bins.
    * ``generated``: generated images for the histograms (one tensor for every model, or a
      dict name -> tensor, e.g. each model's own samples from :func:`jeat.samplers.generate`);
      the histogram row is left out when not given.
    * ``n_noise``: uniform-noise images for the histograms (default N).
    * ``contour_image``: plot the contour of this image instead of the mean over images.
    * ``clamp``: clip the contour and slice inputs to [0, 1] (default: the raw landscape).
    * ``seed``: seeds every random draw (directions, noise, δ, PGD's random start).
    * ``batch_size``: inputs per forward pass; ``plots=False`` skips the PNGs.

    With ``out_dir`` it writes ``analysis.json`` and (unless ``plots=False``)
    ``contour.png``, ``histograms.png``, ``slices.png`` and ``flatness.png`` there.
    """
    if not isinstance(models, Mapping) or not models:
        raise JeatError("give at least one model to analyse, as a dict name -> model")
    for name, model in models.items():
        if not isinstance(name, str) or not name:
            raise JeatError(f"model names must be non-empty strings, got {name!r}")
        if not isinstance(model, nn.Module):
            raise JeatError(f"model '{name}' must be a torch nn.Module, got {type(model).__name__}")
    check_images(x, "images")
    if x.shape[0] == 0:
        raise JeatError("give at least one image to analyse")
    eps = _check_float(eps, "eps", positive=False)
    grid = _check_int(grid, "grid", 3)
    slice_points = _check_int(slice_points, "slice_points", 3)
    draws = _check_int(draws, "draws", 1)
    bins = _check_int(bins, "bins", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    seed = _check_int(seed, "seed", 0)
    n = x.shape[0]
    if n_noise is not None:
        n_noise = _check_int(n_noise, "n_noise", 1)
    if contour_image is not None:
        contour_image = _check_int(contour_image, "contour_image", 0)
        if contour_image >= n:
            raise JeatError(f"contour_image {contour_image} out of range for {n} images")
    dim = x[0].numel()
    if span is None:
        if eps == 0:
            raise JeatError("eps is 0: pass span (the L2 extent of the landscape) explicitly")
        span = 2.0 * eps * math.sqrt(dim)
    span = _check_float(span, "span", positive=True)
    if not isinstance(generated, Mapping):
        generated = {name: generated for name in models} if generated is not None else {}
    for name, g in generated.items():
        if name not in models:
            raise JeatError(f"generated images given for unknown model '{name}'")
        if g is not None:
            check_images(g, f"generated images for '{name}'")
            if tuple(g.shape[1:]) != tuple(x.shape[1:]):
                raise JeatError(
                    f"generated images for '{name}' have shape {tuple(g.shape[1:])}, "
                    f"the real ones {tuple(x.shape[1:])}"
                )
    x = x.detach()
    y_checked = None
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(model_mode(model, True))
        for name, model in models.items():
            try:
                width = model_width(model, x.to(_device_of(model, x.device)))
            except JeatError as e:
                raise JeatError(f"model '{name}': {e}") from None
            y_checked = check_labels(y, width, n).to(x.device)
        y = y_checked
        result = _analyze(
            models, x, y, eps, grid, span, slice_points, draws, generated, n_noise, clamp,
            seed, batch_size,
        )  # fmt: skip
    if out_dir is not None:
        out = Path(out_dir)
        if plots:
            result.files.update(_plot_all(result, out, bins, contour_image))
        result.files["json"] = str(out / "analysis.json")
        write_json(out / "analysis.json", result.to_dict())
    return result


def _analyze(
    models: Mapping[str, nn.Module],
    x: Tensor,
    y: Tensor,
    eps: float,
    grid: int,
    span: float,
    slice_points: int,
    draws: int,
    generated: Mapping[str, Tensor | None],
    n_noise: int | None,
    clamp: bool,
    seed: int,
    batch_size: int,
) -> AnalysisResult:
    n = x.shape[0]
    d1, d2 = random_directions(x, derive_seed(seed, _DIRECTIONS))
    (dr,) = random_directions(x, derive_seed(seed, _SLICE_DIRECTION), count=1)
    offsets = torch.linspace(-span, span, grid, dtype=torch.float64)
    ts = torch.linspace(-span, span, slice_points, dtype=torch.float64)
    noise_gen = torch.Generator().manual_seed(derive_seed(seed, _NOISE))
    noise = torch.rand((n_noise or n, *x.shape[1:]), generator=noise_gen).to(x)

    centre: dict[str, Tensor] = {}
    adv: dict[str, Tensor] = {}
    flat: dict[str, Flatness] = {}
    hist: dict[str, dict[str, dict[str, float]]] = {}
    energies: dict[str, dict[str, Tensor]] = {}
    slices: dict[str, SliceStats] = {}
    for name, model in models.items():
        # the real images first: a NaN model fails here, before any attack runs
        centre[name] = _energies(model, x, y, batch_size, name, "the real images")
        adv[name] = _pgd(model, x, y, eps, seed, batch_size)
        flat[name] = flatness(model, x, y, eps, draws, seed, batch_size, adv[name], name)
        kinds: dict[str, Tensor] = {
            "real": _energies(model, x, None, batch_size, name, "the real images"),
            "adversarial": _energies(
                model, adv[name], None, batch_size, name, "the adversarial examples"
            ),
        }
        g = generated.get(name)
        if g is not None:
            kinds["generated"] = _energies(model, g, None, batch_size, name, "generated images")
        kinds["noise"] = _energies(model, noise, None, batch_size, name, "uniform noise")
        energies[name] = kinds
        hist[name] = {k: energy_stats(v) for k, v in kinds.items()}

        step = adv[name] - x
        norm = step.flatten(1).norm(dim=1)
        da = step / norm.clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        rel = {
            "adversarial": energy_slices(model, x, y, da, ts, batch_size, clamp, name),
            "random": energy_slices(model, x, y, dr, ts, batch_size, clamp, name),
        }
        rel = {k: (v - centre[name][:, None]).mean(0).tolist() for k, v in rel.items()}
        slices[name] = SliceStats(rel["adversarial"], rel["random"], float(norm.mean()))

    grids = energy_contour(models, x, y, d1, d2, offsets, batch_size, clamp)
    contour = {}
    for name, e in grids.items():
        mean_rel = (e - centre[name][:, None, None]).mean(0)
        contour[name] = ContourStats(
            centre=float(centre[name].mean()),
            rise_mean=float(mean_rel.mean()),
            rise_max=float(mean_rel.max()),
            mean_relative=mean_rel.tolist(),
        )
    return AnalysisResult(
        models=list(models),
        n=n,
        eps=eps,
        span=span,
        grid=grid,
        seed=seed,
        clamp=clamp,
        offsets=offsets.tolist(),
        ts=ts.tolist(),
        flatness=flat,
        contour=contour,
        histograms=hist,
        slices=slices,
        directions=(d1, d2),
        contour_energies=grids,
        centre_energies=centre,
        energies=energies,
    )


# ----------------------------------------------------------------------------------- figures


def _plot_all(
    result: AnalysisResult, out: Path, bins: int, contour_image: int | None
) -> dict[str, str]:
    plotters: dict[str, Callable[[Path], Path]] = {
        "contour": lambda p: plot_contour(result, p, contour_image),
        "histograms": lambda p: plot_histograms(result, p, bins),
        "slices": lambda p: plot_slices(result, p),
        "flatness": lambda p: plot_flatness(result, p),
    }
    return {k: str(f(out / f"{k}.png")) for k, f in plotters.items()}


def plot_contour(result: AnalysisResult, path: str | Path, image: int | None = None) -> Path:
    """One contour panel per model of ``E(x + a*d1 + b*d2, y) - E(x, y)`` (mean over images,
    or of image ``image``), on one shared colour scale. A flat, wide basin (few colour bands
    near the centre) is the robust picture; a steep bowl the standard one."""
    plt = pyplot()
    names = result.models
    if image is None:
        zs = [np.asarray(result.contour[m].mean_relative) for m in names]
        what = f"mean over {result.n} images"
    else:
        zs = [
            (result.contour_energies[m][image] - result.centre_energies[m][image]).numpy()
            for m in names
        ]
        what = f"image {image}"
    lo, hi = min(float(z.min()) for z in zs), max(float(z.max()) for z in zs)
    if hi - lo < 1e-9:
        hi = lo + 1e-9
    levels = np.linspace(lo, hi, 21)
    off = np.asarray(result.offsets)
    fig, axes = plt.subplots(
        1, len(names), figsize=(3.4 * len(names) + 1.2, 3.4), dpi=120, squeeze=False
    )
    cs = None
    for ax, m, z in zip(axes[0], names, zs, strict=True):
        cs = ax.contourf(off, off, z.T, levels=levels, cmap="viridis")
        ax.contour(off, off, z.T, levels=levels[::4], colors="white", linewidths=0.4)
        ax.plot([0], [0], marker="+", color="red", markersize=10)
        ax.set_title(f"{m}", fontsize=10)
        ax.set_xlabel("a (along d1, L2)")
        ax.set_aspect("equal")
    axes[0][0].set_ylabel("b (along d2, L2)")
    fig.suptitle(f"E(x + a·d1 + b·d2, y) − E(x, y), {what}", fontsize=10)
    fig.colorbar(cs, ax=list(axes[0]), shrink=0.9, format="%.3g")
    return save_figure(fig, path)


def plot_histograms(result: AnalysisResult, path: str | Path, bins: int = 40) -> Path:
    """One panel per model: histograms of the marginal energy ``E(x)`` of real, adversarial,
    generated (when given) and uniform-noise inputs. Real data should sit low, noise high."""
    plt = pyplot()
    names = result.models
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.3), dpi=120, squeeze=False)
    colours = {"real": "C0", "adversarial": "C3", "generated": "C2", "noise": "C7"}
    for ax, m in zip(axes[0], names, strict=True):
        kinds = result.energies[m]
        allv = torch.cat(list(kinds.values())).numpy()
        edges = np.histogram_bin_edges(allv, bins=bins)
        for k in HIST_KINDS:
            if k in kinds:
                ax.hist(kinds[k].numpy(), bins=edges, alpha=0.5, density=True,
                        color=colours[k], label=f"{k} ({kinds[k].numel()})")  # fmt: skip
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("E(x) = −logsumexp f(x)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("density")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_slices(result: AnalysisResult, path: str | Path) -> Path:
    """``E(x + t*d, y) - E(x, y)`` (mean over images) along each model's adversarial direction
    and along a random direction; dotted lines mark the mean distance of the adversarial
    examples. A robust model stays low along both."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.3), dpi=120, sharey=True)
    ts = np.asarray(result.ts)
    for i, m in enumerate(result.models):
        s, c = result.slices[m], f"C{i % 10}"
        axes[0].plot(ts, s.adversarial, color=c, label=m)
        axes[0].axvline(s.adv_distance, color=c, linestyle=":", linewidth=1)
        axes[1].plot(ts, s.random, color=c, label=m)
    axes[0].set_title("adversarial direction (x_adv − x)/‖·‖₂", fontsize=9)
    axes[1].set_title("random direction", fontsize=9)
    for ax in axes:
        ax.set_xlabel("t (L2)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("E(x + t·d, y) − E(x, y)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_flatness(result: AnalysisResult, path: str | Path) -> Path:
    """Bars per model: mean ``|E(x+δ, y) − E(x, y)|`` over random ``δ`` in the eps-ball and
    mean ``‖∇x E(x, y)‖₂``. Lower bars mean a flatter energy around real data."""
    plt = pyplot()
    names = result.models
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.6 * len(names) + 4), 3.2), dpi=120)
    pos = np.arange(len(names))
    colours = [f"C{i % 10}" for i in range(len(names))]
    for ax, vals, title in (
        (axes[0], [result.flatness[m].delta_joint for m in names],
         f"mean |E(x+δ,y) − E(x,y)|, δ in L∞ ball {result.eps:g}"),
        (axes[1], [result.flatness[m].grad_joint for m in names], "mean ‖∇x E(x,y)‖₂"),
    ):  # fmt: skip
        ax.bar(pos, vals, color=colours)
        ax.set_xticks(pos, names, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, path)
