"""Samplers: turning a classifier's energy into images.

Every sampler here runs one loop, :func:`descend`: take the input gradient of an energy (from
:mod:`jeat.energy`) with the model in eval mode, then apply an update rule. Two rules:

* **SGLD** (JEM-style): ``x <- clamp(x - eta * grad E + sigma * N(0, I), 0, 1)`` on ``E(x)``
  (unconditional) or ``E(x, y)`` (conditional), started from a persistent
  :class:`ReplayBuffer`.
* **Seeded descent** (Santurkar-style), below.

Class-conditional generation (Santurkar et al. 2019, in energy terms): draw a seed from a
Gaussian ``N(mu_y, Sigma_y)`` fitted on training images of class ``y``, then descend
``E(x, y) - E(x)`` (the class-``y`` cross-entropy) with normalised L2 steps inside a large L2
ball around the seed, clamped to [0, 1]. That descent is the targeted L2 PGD of
:mod:`jeat.attacks` started at the seed without random start: attack and generation are the
same move on the energy, in opposite directions.

For large images the Gaussians are fitted at a lower resolution (``max_side``) and seeds are
upsampled, so the covariance stays small and well conditioned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jeat.attacks import L2Ball, model_mode
from jeat.data import ImageDataset
from jeat.energy import (
    as_logits,
    cross_entropy_from_logits,
    joint_energy_from_logits,
    marginal_energy_from_logits,
)
from jeat.errors import JeatError
from jeat.utils import derive_seed

__all__ = [
    "ClassGaussians",
    "fit_class_gaussians",
    "sample_seeds",
    "descend",
    "SeededDescent",
    "SGLD",
    "ReplayBuffer",
    "BUFFER_INITS",
    "generate",
    "generate_chains",
    "chain_seeds",
    "Samples",
    "Generators",
    "SEEDS",
]

# An energy to descend: per-example values from logits and (optional) labels.
EnergyFn = Callable[[Tensor, Tensor | None], Tensor]

# Randomness of a batch of chains: one generator for the whole batch (None: the global
# stream), or one per chain, so that a chain's draws do not depend on the others in its batch.
Generators = torch.Generator | Sequence[torch.Generator] | None


def _draw(
    fn: Callable[..., Tensor], shape: tuple[int, ...], n: int, generator: Generators
) -> Tensor:
    """``n`` draws of ``shape`` from ``fn`` (``torch.randn`` or ``torch.rand``), on the host:
    from one generator, or row ``i`` from ``generator[i]``."""
    if generator is None or isinstance(generator, torch.Generator):
        return fn((n, *shape), generator=generator)
    if len(generator) != n:
        raise JeatError(f"{len(generator)} generators for {n} chains; give one per chain")
    if n == 0:
        return fn((0, *shape))
    return torch.stack([fn(shape, generator=g) for g in generator])


SEEDS = ("class", "pooled", "uniform")


@dataclass
class ClassGaussians:
    """Per-class Gaussian seeds: means and Cholesky factors at a (possibly) reduced resolution."""

    means: Tensor  # K x D
    chol: Tensor  # K x D x D
    shape: tuple[int, int, int]  # full-resolution (C, H, W)
    low_shape: tuple[int, int, int]  # resolution the Gaussians live at

    def sample(self, labels: Tensor, generator: Generators = None) -> Tensor:
        """Draw one seed per label, upsampled to full resolution and clamped to [0, 1]
        (``generator``: one for all, or one per label: see :data:`Generators`)."""
        k = self.means.shape[0]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise JeatError(f"classes must lie in [0, {k - 1}], got {labels.tolist()}")
        z = _draw(torch.randn, (self.means.shape[1],), labels.shape[0], generator)
        # one product per class: indexing ``chol[labels]`` would copy a D x D factor per seed
        # (10,000 buffer seeds of CIFAR's 768-dim Gaussians: 23.6 GB)
        x = self.means[labels].clone()
        for c in torch.unique(labels).tolist():
            rows = labels == c
            x[rows] += z[rows] @ self.chol[c].T
        x = x.view(-1, *self.low_shape)
        if self.low_shape != self.shape:
            x = F.interpolate(x, size=self.shape[1:], mode="bilinear", align_corners=False)
        return x.clamp_(0.0, 1.0)


def fit_class_gaussians(
    x: Tensor, y: Tensor, num_classes: int, max_side: int = 16, shrinkage: float = 1e-4
) -> ClassGaussians:
    """Fit ``N(mu_k, Sigma_k)`` to the training images of each class (float64, with a small
    ridge so the Cholesky factor exists even for classes with few images)."""
    c, h, w = x.shape[1:]
    side = min(h, max_side)
    low = (c, side, side * w // h)
    xs = x.float()
    if low[1:] != (h, w):
        xs = F.adaptive_avg_pool2d(xs, low[1:])
    flat = xs.flatten(1).double()
    d = flat.shape[1]
    means = torch.zeros(num_classes, d, dtype=torch.float64)
    chols = torch.zeros(num_classes, d, d, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    for k in range(num_classes):
        xk = flat[y == k]
        if xk.shape[0] == 0:
            raise JeatError(f"class {k} has no training images to fit a seed distribution on")
        mu = xk.mean(0)
        cov = (xk - mu).T @ (xk - mu) / max(1, xk.shape[0] - 1)
        ridge = shrinkage * max(float(cov.diagonal().mean()), 1e-6)
        means[k] = mu
        chols[k] = torch.linalg.cholesky(cov + ridge * eye)
    return ClassGaussians(means.float(), chols.float(), (c, h, w), low)


def sample_seeds(
    kind: str,
    data: ImageDataset,
    labels: Tensor,
    generator: Generators = None,
    max_side: int = 16,
) -> Tensor:
    """Starting points for generation, one per label (``generator``: one for all, or one per
    label).

    ``class``: the class-conditional Gaussian of each label (Santurkar et al.); ``pooled``: one
    Gaussian fitted on all training images (the seed says nothing about the target class, so
    the class must come from the model's energy); ``uniform``: uniform noise in [0, 1].
    """
    if kind == "class":
        gauss = fit_class_gaussians(data.x_train, data.y_train, data.info.num_classes, max_side)
        return gauss.sample(labels, generator)
    if kind == "pooled":
        pooled = fit_class_gaussians(data.x_train, torch.zeros_like(data.y_train), 1, max_side)
        return pooled.sample(torch.zeros_like(labels), generator)
    if kind == "uniform":
        return _draw(torch.rand, tuple(data.info.shape), len(labels), generator)
    raise JeatError(f"unknown seed distribution '{kind}'; choose one of {', '.join(SEEDS)}")


def descend(
    model: nn.Module,
    x0: Tensor,
    energy: EnergyFn,
    update: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    labels: Tensor | None = None,
) -> Tensor:
    """Run ``x <- update(x, grad_x sum(energy(f(x), labels)))`` for ``steps`` steps.

    The model runs in eval mode (every submodule's mode is restored afterwards) and only input
    gradients are taken, so parameter ``.grad`` fields are untouched.
    """
    if steps < 0:
        raise JeatError(f"sampler steps must be >= 0, got {steps}")
    x = x0.detach()
    with model_mode(model, True), torch.enable_grad():
        for _ in range(steps):
            x.requires_grad_(True)
            e = energy(as_logits(model(x)), labels).sum()
            (grad,) = torch.autograd.grad(e, x)
            with torch.no_grad():
                x = update(x, grad)
    return x.detach()


def _class_gap(logits: Tensor, labels: Tensor | None) -> Tensor:
    assert labels is not None
    return cross_entropy_from_logits(logits, labels, check=False)


def _marginal(logits: Tensor, labels: Tensor | None) -> Tensor:
    return marginal_energy_from_logits(logits)


def _joint(logits: Tensor, labels: Tensor | None) -> Tensor:
    assert labels is not None
    return joint_energy_from_logits(logits, labels, check=False)


@dataclass
class SGLD:
    """Stochastic gradient Langevin dynamics on ``E(x)`` (or ``E(x, y)`` when ``labels`` are
    given), clamped to [0, 1].

    Defaults are JEM's (step 1, noise 0.01, 20 steps on inputs in [-1, 1]) converted to [0, 1]
    pixels: a step of ``eta`` on [-1, 1] inputs is ``eta / 4`` here and noise ``sigma`` is
    ``sigma / 2``.
    """

    steps: int = 20
    step_size: float = 0.25
    noise: float = 0.005
    # JEM++'s proximal SGLD (Yang & Ji 2021): clamp each pixel's energy gradient to
    # [-grad_clip, grad_clip] before the step, so no step moves a pixel by more than
    # step_size * grad_clip (plus the noise); None: plain SGLD
    grad_clip: float | None = None

    def __call__(
        self,
        model: nn.Module,
        x0: Tensor,
        labels: Tensor | None = None,
        generator: Generators = None,
    ) -> Tensor:
        """``generator``: one for the batch (on ``x0``'s device), or one host generator per
        chain, whose noise is then drawn on the host (chain ``i``'s path depends on
        ``generator[i]`` alone)."""
        if self.step_size < 0 or self.noise < 0:
            raise JeatError("SGLD step size and noise must be >= 0")
        clip = self.grad_clip
        if clip is not None and not clip > 0:
            raise JeatError(f"SGLD gradient clip must be > 0 (or None), got {clip}")
        per_chain = not (generator is None or isinstance(generator, torch.Generator))

        def update(x: Tensor, grad: Tensor) -> Tensor:
            if clip is not None:
                grad = grad.clamp(-clip, clip)
            if per_chain:
                noise = _draw(torch.randn, tuple(x.shape[1:]), len(x), generator)
                noise = _to_device(noise, x.device).to(x.dtype)
            else:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return (x - self.step_size * grad + self.noise * noise).clamp_(0.0, 1.0)

        energy = _marginal if labels is None else _joint
        return descend(model, x0, energy, update, self.steps, labels)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (on the host) on ``device``; to a GPU through pinned memory without waiting for
    it (a copy from pageable memory would make the host wait for the device first)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


BUFFER_INITS = ("uniform", "gaussian", "data")


def _class_pool(x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training images grouped by class without copying them: the images, an order that sorts
    them by class, each class's first position in that order and its count."""
    y = y.cpu().long()
    if len(x) != len(y) or len(x) == 0:
        raise JeatError(f"a data pool needs images and one label each, got {len(x)} / {len(y)}")
    counts = torch.bincount(y, minlength=num_classes)
    if len(counts) > num_classes or int(y.min()) < 0:
        raise JeatError(f"pool labels must lie in [0, {num_classes - 1}]")
    empty = (counts == 0).nonzero().squeeze(1).tolist()
    if empty:
        raise JeatError(f"class(es) {empty} have no training images to restart chains from")
    order = torch.argsort(y, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    return x.cpu(), order, starts, counts


class ReplayBuffer:
    """Persistent SGLD chains (JEM): ``size`` images, drawn in batches, a ``reinit_freq`` share of
    each batch restarted from the re-initialisation distribution, and written back.

    Slots are partitioned by class (slot ``i`` belongs to class ``i % num_classes``), so
    class-conditional sampling draws only from its class's chains. ``init`` is ``uniform``
    (noise in [0, 1], JEM), ``gaussian`` (class-conditional Gaussian seeds fitted on the
    training data: JEM++'s informative initialisation) or ``data`` (a random training image
    of the slot's class from ``pool`` plus Gaussian noise of standard deviation
    ``init_noise``, clamped to [0, 1]: chains that start at the data, as in contrastive
    divergence). Its state (the images) is saved in training checkpoints; ``seeds`` and
    ``pool`` are not (they come from the training data).
    """

    def __init__(
        self,
        size: int,
        shape: tuple[int, ...],
        num_classes: int,
        reinit_freq: float = 0.05,
        init: str = "uniform",
        seeds: ClassGaussians | None = None,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        pool: tuple[Tensor, Tensor] | None = None,
        init_noise: float = 0.1,
    ) -> None:
        if size < num_classes:
            raise JeatError(f"replay buffer size {size} is smaller than the class count")
        if not 0.0 <= reinit_freq <= 1.0:
            raise JeatError(f"buffer re-init rate must lie in [0, 1], got {reinit_freq}")
        if init not in BUFFER_INITS:
            raise JeatError(f"buffer init must be one of {', '.join(BUFFER_INITS)}, got '{init}'")
        if init == "gaussian" and seeds is None:
            raise JeatError("a 'gaussian' replay buffer needs class Gaussians fitted on data")
        if isinstance(init_noise, bool) or not isinstance(init_noise, (int, float)):
            raise JeatError(f"buffer init noise must be a number >= 0, got {init_noise!r}")
        if not init_noise >= 0:
            raise JeatError(f"buffer init noise must be a number >= 0, got {init_noise!r}")
        self.init_noise = float(init_noise)
        self._pool: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        if init == "data":
            if pool is None:
                raise JeatError("a 'data' replay buffer needs the training images (pool)")
            self._pool = _class_pool(pool[0], pool[1], num_classes)
        self.size = size - size % num_classes
        self.shape = tuple(shape)
        self.num_classes = num_classes
        self.reinit_freq = reinit_freq
        self.init = init
        self.seeds = seeds
        self.device = torch.device(device)
        self.labels = torch.arange(self.size, device=self.device) % num_classes
        self.x = self.fresh(self.labels, generator)

    def fresh(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """New starting points from the re-initialisation distribution, drawn on the host."""
        if self.init == "gaussian":
            assert self.seeds is not None
            return _to_device(self.seeds.sample(labels.cpu(), generator), self.device)
        if self.init == "data":
            assert self._pool is not None
            x_pool, order, starts, counts = self._pool
            lab = labels.cpu().long()
            offset = (torch.rand(len(lab), generator=generator) * counts[lab]).long()
            offset = torch.minimum(offset, counts[lab] - 1)
            x = x_pool[order[starts[lab] + offset]].float()
            if self.init_noise > 0:
                noise = torch.randn(x.shape, generator=generator)
                x = x + self.init_noise * noise
            return _to_device(x.clamp_(0.0, 1.0), self.device)
        return _to_device(torch.rand((len(labels), *self.shape), generator=generator), self.device)

    def sample(
        self, n: int, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` chains (from class ``y[i]``'s partition when ``y`` is given).

        Returns the starting images (a copy) and their slot indices for :meth:`update`.

        The random draws are made on the host (from ``generator``, else the global CPU
        stream), so which chains restart is known there without reading the device: on a GPU
        the draw waits for the device only for class-conditional Gaussian restarts (``y`` and
        ``init="gaussian"``), whose labels must reach the host.
        """
        k = self.num_classes
        if y is None:
            host_idx: Tensor | None = torch.randint(0, self.size, (n,), generator=generator)
            idx = _to_device(host_idx, self.device)
        else:
            per_class = torch.randint(0, self.size // k, (len(y),), generator=generator)
            host_idx = None
            idx = y.to(self.device).long() + k * _to_device(per_class, self.device)
        x = self.x[idx]  # a gather: a new tensor
        restart = torch.rand(len(idx), generator=generator) < self.reinit_freq
        if restart.any():  # a host tensor: no device read
            if host_idx is not None:
                labels = host_idx[restart] % k  # slot i belongs to class i % k
            elif self.init in ("gaussian", "data"):
                labels = y.cpu()[restart]  # the one read from the device
            else:
                labels = torch.zeros(int(restart.sum()), dtype=torch.long)  # count only
            where = _to_device(restart.nonzero().squeeze(1), self.device)
            x[where] = self.fresh(labels, generator)
        return x, idx

    def update(self, idx: Tensor, x: Tensor) -> None:
        """Write chains back. A slot drawn twice in one batch keeps its last sample, chosen
        explicitly: a plain ``x[idx] = ...`` with repeated indices is not deterministic. Every
        position of a slot writes that slot's last sample, so the repeated writes agree, and
        no step needs the distinct slots' count (``torch.unique`` would read the device)."""
        order = torch.arange(len(idx), device=idx.device)
        last = torch.full((self.size,), -1, dtype=torch.long, device=idx.device)
        last = last.scatter_reduce(0, idx, order, reduce="amax")
        self.x[idx] = x.detach()[last[idx]].to(self.device, self.x.dtype)

    def reset(self, generator: torch.Generator | None = None) -> None:
        """Restart every chain (used after a divergence)."""
        self.x = self.fresh(self.labels, generator)

    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x.cpu(), "size": self.size, "num_classes": self.num_classes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        x = state["x"]
        if tuple(x.shape) != (self.size, *self.shape):
            raise JeatError(
                f"saved replay buffer has shape {tuple(x.shape)}, expected "
                f"{(self.size, *self.shape)}; resume with the same buffer settings"
            )
        self.x = x.to(self.device)


@dataclass
class SeededDescent:
    """Descend ``E(x, y) - E(x)`` from seeds with normalised L2 steps in an L2 ball.

    ``radius`` defaults to ``0.2 * sqrt(dim)`` in [0, 1] pixel units (an RMS change of 0.2 per
    pixel; 1.6 on 8x8 digits, 11 on CIFAR) and ``step_size`` to ``2.5 * radius / steps``. On
    digits, larger radii (0.5 * sqrt(dim)) saturate the images and let a standard model's
    targeted perturbations look like digits to other CNNs; smaller ones barely move the seed.
    """

    steps: int = 60
    radius: float | None = None
    step_size: float | None = None

    def __call__(self, model: nn.Module, seeds: Tensor, labels: Tensor) -> Tensor:
        radius = self.radius if self.radius is not None else 0.2 * math.sqrt(seeds[0].numel())
        step = self.step_size if self.step_size is not None else 2.5 * radius / self.steps
        ball = L2Ball(radius)

        def update(x: Tensor, grad: Tensor) -> Tensor:
            return ball.project(ball.step(x, -grad, step), seeds)

        return descend(model, seeds, _class_gap, update, self.steps, labels)


@dataclass
class Samples:
    """Generated images, the class each was made for (None: unconditional) and, per image, the
    seed of its own chain: its starting point and, for SGLD, its noise come from a generator
    seeded with it alone (see :func:`chain_seeds`)."""

    images: Tensor
    labels: Tensor | None
    seeds: list[int]


def chain_seeds(seed: int, labels: Tensor | None, n: int | None = None) -> list[int]:
    """One seed per image, derived from ``seed``: for class-conditional images (``labels``),
    the ``j``-th image of class ``c`` gets ``derive_seed(seed, c, j)``, so it is the same image
    whichever other classes, and however many images, are generated with it; ``n``
    unconditional images (``labels`` None) get ``derive_seed(seed, -1, j)``."""
    if labels is None:
        if n is None:
            raise JeatError("chain_seeds needs labels or a number of images")
        return [derive_seed(seed, -1, j) for j in range(n)]
    seen: dict[int, int] = {}
    out = []
    for c in labels.tolist():
        j = seen.get(c, 0)
        seen[c] = j + 1
        out.append(derive_seed(seed, c, j))
    return out


def generate_chains(
    model: nn.Module,
    data: ImageDataset,
    cfg: Any,
    classes: list[int] | None = None,
    n_per_class: int | None = None,
    seed: int = 0,
) -> Samples:
    """Generate images from a classifier's energy, as a :class:`~jeat.config.GenerateConfig`
    ``cfg`` describes, each image from its own chain.

    * ``method="descent"``: seeded descent on ``E(x, y) - E(x)`` (class-conditional only).
    * ``method="sgld"``: ``cfg.steps`` SGLD steps on ``E(x, y)`` (conditional) or ``E(x)``
      (``conditional=False``), from the seed distribution ``cfg.seeds``.

    Conditional samples come class by class (``n_per_class`` each, labels returned);
    unconditional ones are ``n_per_class * num_classes`` images with labels ``None`` (each
    chain draws its seed's class for class-conditional seeds from its own generator). Every
    image has its own generator, seeded by :func:`chain_seeds`: no two images share a starting
    point or noise, and an image does not change with the batch it is generated in.
    """
    k = data.info.num_classes
    if cfg.method not in ("descent", "sgld"):
        raise JeatError(f"unknown generation method '{cfg.method}'; choose descent or sgld")
    if not cfg.conditional and cfg.method == "descent":
        raise JeatError("descent generation is class-conditional; use method sgld for E(x)")
    classes = list(range(k)) if classes is None else classes
    bad = [c for c in classes if not 0 <= c < k]
    if bad:
        raise JeatError(f"classes {bad} out of range for {data.info.name} (0..{k - 1})")
    n = n_per_class or cfg.n_per_class
    if n < 1:
        raise JeatError(f"images per class must be >= 1, got {n}")
    if cfg.conditional:
        labels: Tensor | None = torch.tensor(classes).repeat_interleave(n)
        seeds = chain_seeds(seed, labels)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        seed_labels = labels
    else:
        labels = None
        seeds = chain_seeds(seed, None, n * k)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        seed_labels = torch.cat([torch.randint(0, k, (1,), generator=g) for g in gens])
    starts = sample_seeds(cfg.seeds, data, seed_labels, gens, max_side=cfg.seed_resolution)
    device = next(model.parameters()).device
    starts = starts.to(device)
    dev_labels = labels.to(device) if labels is not None else None
    if cfg.method == "descent":
        assert dev_labels is not None
        sampler = SeededDescent(steps=cfg.steps, radius=cfg.radius, step_size=cfg.step_size)
        images = sampler(model, starts, dev_labels)
    else:
        sgld = SGLD(steps=cfg.steps, step_size=cfg.sgld_step_size, noise=cfg.sgld_noise)
        images = sgld(model, starts, dev_labels, gens)
    return Samples(images.cpu(), labels, seeds)


def generate(
    model: nn.Module,
    data: ImageDataset,
    cfg: Any,
    classes: list[int] | None = None,
    n_per_class: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """:func:`generate_chains`' images and labels."""
    s = generate_chains(model, data, cfg, classes, n_per_class, seed)
    return s.images, s.labels
