"""Training objectives: small objects that turn a model and a batch into a loss.

An objective is built once per run (``create_objective(cfg, info)``) and called per batch::

    out = objective(model, x, y)      # -> ObjectiveOutput(loss, logits, y, metrics)
    out.loss.backward()

It may hold state that must survive a resume (JEM's replay buffer, for instance) through
``state_dict``/``load_state_dict``; the training loop saves it in every checkpoint. New
objectives register with ``@register_objective("name")`` and plug into the same loop.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from jeat.accel import same_layout
from jeat.attacks import PGD, make_threat, model_mode
from jeat.attacks.threats import check_budget, check_step_size
from jeat.config import AttackConfig, ObjectiveConfig
from jeat.data import DatasetInfo, ImageDataset
from jeat.energy import (
    as_logits,
    cross_entropy_from_logits,
    joint_energy_from_logits,
    marginal_energy_from_logits,
)
from jeat.errors import JeatError
from jeat.samplers import BUFFER_INITS, SGLD, ReplayBuffer, fit_class_gaussians

__all__ = [
    "ObjectiveOutput",
    "Objective",
    "Standard",
    "PGDAT",
    "JEM",
    "JEAT",
    "TRADES",
    "WRM",
    "wrm_ascent",
    "DOA",
    "kl_divergence_from_logits",
    "register_objective",
    "create_objective",
    "list_objectives",
    "build_attack",
]


@dataclass
class ObjectiveOutput:
    loss: Tensor  # scalar to minimise
    logits: Tensor  # logits of the inputs the classification loss was computed on
    y: Tensor  # their labels
    metrics: dict[str, Tensor] = field(default_factory=dict)  # scalars, averaged per epoch


class Objective:
    """Base class; subclasses implement ``__call__`` and declare their ``options``."""

    name: str = ""
    description: str = ""
    options: dict[str, Any] = {}  # accepted objective options and their defaults

    def __init__(self, cfg: ObjectiveConfig, info: DatasetInfo) -> None:
        unknown = set(cfg.options) - set(self.options)
        if unknown:
            accepted = ", ".join(sorted(self.options)) or "none"
            raise JeatError(
                f"objective '{self.name}' does not take option(s) {', '.join(sorted(unknown))}; "
                f"it takes {accepted}"
            )
        self.cfg = cfg
        self.info = info
        self.opts = {**self.options, **cfg.options}

    def setup(self, data: ImageDataset, device: torch.device) -> None:
        """Called once by the training loop before training or resuming (data-dependent state)."""
        return None

    def begin_step(self, step: int) -> None:
        """Called by the training loop before each optimiser step (global step index), so
        schedules inside an objective are a function of the step and resume exactly."""
        return None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        raise NotImplementedError

    def reset_state(self) -> None:
        """Restart internal state after a divergence (e.g. re-initialise a replay buffer)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def _classification(logits: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean cross-entropy ``E(x, y) - E(x)`` and the mean marginal energy, for logging."""
    ce = cross_entropy_from_logits(logits, y, check=False).mean()
    return ce, {"ce": ce.detach(), "energy": marginal_energy_from_logits(logits).mean().detach()}


_OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    def wrap(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        _OBJECTIVES[name] = cls
        return cls

    return wrap


def build_attack(attack: AttackConfig, info: DatasetInfo, scale: float = 1.0) -> PGD:
    """The PGD attack a training config describes; the dataset sets the default budget.
    ``scale`` multiplies eps and the step size (the eps warm-up)."""
    norm = attack.norm.lower()
    default_eps = info.eps_l2 if norm == "l2" else info.eps_linf
    eps = default_eps if attack.eps is None else attack.eps
    eps = check_budget(norm, eps, info.shape, "objective.attack.eps")
    if attack.step_size is None:
        step = 2.5 * eps / attack.steps
    else:
        what = "objective.attack.step_size"
        step = check_step_size(norm, attack.step_size, eps, info.shape, what)
    return PGD(
        make_threat(norm, eps * scale),
        steps=attack.steps,
        step_size=step * scale,
        random_start=attack.random_start,
    )


class _AdversarialMixin:
    """The training attack of PGD-AT and JEAT, with its eval/train mode and eps warm-up."""

    cfg: ObjectiveConfig
    info: DatasetInfo
    opts: dict[str, Any]

    def _init_attack(self) -> None:
        if self.opts["attack_mode"] not in ("eval", "train"):
            raise JeatError("objective option attack_mode must be 'eval' or 'train'")
        self._scale = 1.0
        self.attack = self._make_attack(1.0)

    def _make_attack(self, scale: float) -> PGD:
        attack = build_attack(self.cfg.attack, self.info, scale)
        attack.eval_mode = self.opts["attack_mode"] == "eval"
        return attack

    def begin_step(self, step: int) -> None:
        warm = self.cfg.attack.eps_warmup_steps
        scale = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
        if scale != self._scale:
            self._scale = scale
            self.attack = self._make_attack(scale)
        super().begin_step(step)  # type: ignore[misc]  # the next class's schedule (JEAT's lambda)


@register_objective("standard")
class Standard(Objective):
    description = "cross-entropy on clean inputs, CE = E(x, y) - E(x)"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        logits = as_logits(model(x))
        loss, metrics = _classification(logits, y)
        return ObjectiveOutput(loss, logits.detach(), y, metrics)


@register_objective("pgd-at")
class PGDAT(_AdversarialMixin, Objective):
    """Madry et al. (2018): ``min_theta E max_{delta in ball} CE(x + delta, y)``.

    The inner maximisation is PGD with random start (``objective.attack``), run in eval mode by
    default (option ``attack_mode: train`` runs it in train mode, as some batch-norm recipes do).
    """

    description = "Madry PGD adversarial training: CE on PGD adversarial examples"
    options = {"attack_mode": "eval"}

    def __init__(self, cfg: ObjectiveConfig, info: DatasetInfo) -> None:
        super().__init__(cfg, info)
        self._init_attack()

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        x_adv = self.attack(model, x, y, check=False)
        logits = as_logits(model(x_adv))
        loss, metrics = _classification(logits, y)
        return ObjectiveOutput(loss, logits.detach(), y, metrics)


def kl_divergence_from_logits(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Per-example ``KL(p(.|x) || q(.|x'))`` between the classifier's predictive distributions,
    i.e. the expected difference of log-likelihoods ``E_p[(E_q(x', y) - E_q(x')) -
    (E_p(x, y) - E_p(x))]`` (computed in float32 or wider)."""
    log_p = torch.log_softmax(logits_p.float(), dim=1)
    log_q = torch.log_softmax(logits_q.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


@register_objective("trades")
class TRADES(_AdversarialMixin, Objective):
    """TRADES (Zhang et al., ICML 2019): ``CE(f(x), y) + beta * KL(p(.|x) || p(.|x'))``.

    The inner maximisation is the paper's: start at ``x + 0.001 * N(0, I)`` and take
    ``objective.attack.steps`` signed (L-inf) or normalised (L2) steps of
    ``objective.attack.step_size`` that ascend the KL to the clean prediction (held fixed),
    projected onto the threat ball and the [0, 1] box; the model is in eval mode while it runs
    (option ``attack_mode``). The outer loss back-propagates through both the clean and the
    adversarial logits. ``beta`` trades accuracy for robustness (the paper's 1/lambda: 6 on
    CIFAR-10, 1 on MNIST).
    """

    description = "TRADES: CE(x) + beta * KL(p(.|x) || p(.|x_adv)), x_adv maximising the KL"
    options = {"attack_mode": "eval", "beta": 6.0}

    def __init__(self, cfg: ObjectiveConfig, info: DatasetInfo) -> None:
        super().__init__(cfg, info)
        check_beta(self.opts["beta"])
        self._init_attack()

    def adversarial(self, model: nn.Module, x: Tensor) -> Tensor:
        """The KL-maximising inputs around ``x`` (detached)."""
        return trades_adversarial(model, x, self.attack)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        x_adv = self.adversarial(model, x)
        logits = as_logits(model(x))
        logits_adv = as_logits(model(x_adv))
        loss, metrics = trades_loss(logits, logits_adv, y, self.opts["beta"])
        return ObjectiveOutput(loss, logits.detach(), y, metrics)


def check_beta(beta: Any) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
        raise JeatError(f"objective option beta must be a number >= 0, got {beta!r}")


def trades_adversarial(model: nn.Module, x: Tensor, attack: PGD) -> Tensor:
    """TRADES' inner maximisation: from ``x + 0.001 * N(0, I)``, ``attack.steps`` steps of
    ``attack.step_size`` that ascend ``KL(p(.|x) || p(.|x'))`` (the clean prediction held
    fixed), projected onto ``attack``'s threat ball and the [0, 1] box (detached)."""
    threat = attack.threat
    with model_mode(model, attack.eval_mode):
        with torch.no_grad():
            clean = as_logits(model(x))
        x_adv = (x + 0.001 * torch.randn_like(x)).clamp_(0.0, 1.0)
        bounds = threat.bounds(x)
        with torch.enable_grad():
            for _ in range(attack.steps):
                x_adv.requires_grad_(True)
                kl = kl_divergence_from_logits(clean, as_logits(model(x_adv))).sum()
                (grad,) = torch.autograd.grad(kl, x_adv)
                with torch.no_grad():
                    x_adv = threat.advance(x_adv, grad, attack.step_size, x, bounds)
    return x_adv.detach()


def trades_loss(
    logits: Tensor, logits_adv: Tensor, y: Tensor, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """``CE(f(x), y) + beta * KL(p(.|x) || p(.|x'))`` and its logged parts."""
    ce, metrics = _classification(logits, y)
    kl = kl_divergence_from_logits(logits, logits_adv).mean()
    metrics["kl"] = kl.detach()
    return ce + beta * kl, metrics


def wrm_ascent(
    model: nn.Module, x: Tensor, y: Tensor, gamma: float, steps: int, eval_mode: bool = True
) -> Tensor:
    """WRM's inner maximisation (Sinha, Namkoong & Duchi 2018): gradient ascent on the
    Lagrangian ``CE(f(x'), y) - gamma * ||x' - x||^2`` from ``x``, with the authors' schedule
    (the objective scaled by ``1 / (2 gamma)``, step ``1 / sqrt(t + 1)``), kept in [0, 1].

    For a smooth loss and ``gamma`` above its smoothness constant the problem is strongly
    concave, so the ascent finds the global maximiser: what both WRM training and its
    certificate (:mod:`jeat.certify`) need.
    """
    x = x.detach()
    x_adv = x.clone()
    with model_mode(model, eval_mode), torch.enable_grad():
        for t in range(steps):
            x_adv.requires_grad_(True)
            ce = cross_entropy_from_logits(as_logits(model(x_adv)), y, check=False).sum()
            (grad,) = torch.autograd.grad(ce, x_adv)
            with torch.no_grad():
                ascent = grad / (2 * gamma) - (x_adv - x)
                x_adv = (x_adv + ascent / (t + 1) ** 0.5).clamp_(0.0, 1.0)
    return x_adv.detach()


_NON_SMOOTH = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU)


@register_objective("wrm")
class WRM(Objective):
    """WRM (Sinha, Namkoong & Duchi, ICLR 2018): distributionally robust training over a
    Wasserstein ball, ``min_theta E[ max_x' CE(x', y) - gamma ||x' - x||^2 ]``, solved with
    :func:`wrm_ascent` (``steps`` ascent steps, ``gamma`` the Lagrange multiplier). Needs a
    smooth model (``activation: elu`` or ``softplus``) for the inner problem to be concave and
    for its certificate to hold; a model with ReLU-type activations gets a warning.
    """

    description = "WRM: CE at the maximiser of CE(x') - gamma ||x' - x||^2 (Wasserstein DRO)"
    options = {"gamma": 2.0, "steps": 15, "attack_mode": "eval"}

    def __init__(self, cfg: ObjectiveConfig, info: DatasetInfo) -> None:
        super().__init__(cfg, info)
        gamma, steps = self.opts["gamma"], self.opts["steps"]
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise JeatError(f"objective option gamma must be a number > 0, got {gamma!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise JeatError(f"objective option steps must be an integer >= 1, got {steps!r}")
        if self.opts["attack_mode"] not in ("eval", "train"):
            raise JeatError("objective option attack_mode must be 'eval' or 'train'")
        self._warned = False

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        if not self._warned:
            self._warned = True
            if any(isinstance(m, _NON_SMOOTH) for m in model.modules()):
                warnings.warn(
                    "WRM wants a smooth model (activation: elu or softplus): with ReLU-type "
                    "activations its inner problem is not concave and its certificate may not "
                    "hold",
                    stacklevel=2,
                )
        o = self.opts
        x_adv = wrm_ascent(model, x, y, float(o["gamma"]), int(o["steps"]),
                           o["attack_mode"] == "eval")  # fmt: skip
        logits = as_logits(model(x_adv))
        loss, metrics = _classification(logits, y)
        metrics["transport"] = (x_adv - x).flatten(1).pow(2).sum(1).mean().detach()
        return ObjectiveOutput(loss, logits.detach(), y, metrics)


@register_objective("doa")
class DOA(Objective):
    """DOA, defence against occlusion attacks (Wu, Tong & Vorobeychik, ICLR 2020): adversarial
    training against the rectangular occlusion attack, ``min_theta E CE(ROA(x), y)``.

    Each batch is attacked by :class:`jeat.attacks.ROA`: the position of one ``height x width``
    rectangle per image is searched (``search``: ``exhaustive`` over the ``stride`` grid, or
    ``gradient``: the ``candidates`` positions with the most squared input-gradient mass;
    ``auto`` picks exhaustive when the grid has at most 256 positions), then ``steps`` signed
    gradient steps of ``step_size`` set the rectangle's pixels freely in [0, 1], from a grey
    fill (or uniform noise with ``random_start``). The model is in eval mode while the attack
    runs (``attack_mode``). ``size`` defaults to about a sixth of the image side (2x2 on 8x8
    digits, 5x5 on 28x28 and 32x32 images); ``height``/``width`` override it.

    Defaults trade attack strength for training cost: 10 steps of 0.1 (a pixel can cross the
    whole range) and 10 gradient-guided candidates, against the evaluation ``roa`` attack's 20
    steps of 0.05 and 30 candidates. The authors fine-tune a standard model with DOA; a config
    does that with ``model.init_from``. The ``objective.attack`` block (an L-p ball) is unused.
    """

    description = "DOA: CE on rectangular-occlusion (ROA) adversarial examples"
    options = {
        "size": None,
        "height": None,
        "width": None,
        "search": "auto",
        "stride": 1,
        "candidates": 10,
        "steps": 10,
        "step_size": 0.1,
        "random_start": False,
        "attack_mode": "eval",
    }

    def __init__(self, cfg: ObjectiveConfig, info: DatasetInfo) -> None:
        super().__init__(cfg, info)
        from jeat.attacks.occlusion import ROA, auto_search, default_side

        o = self.opts
        if o["attack_mode"] not in ("eval", "train"):
            raise JeatError("objective option attack_mode must be 'eval' or 'train'")
        for key in ("size", "height", "width"):
            v = o[key]
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise JeatError(f"objective option {key} must be an integer >= 1, got {v!r}")
        side = o["size"] or default_side(info.shape)
        height, width = o["height"] or side, o["width"] or side
        big_h, big_w = info.shape[-2:]
        if height > big_h or width > big_w:
            raise JeatError(
                f"objective options ask for a {height}x{width} rectangle, larger than the "
                f"{big_h}x{big_w} images of {info.name}"
            )
        search = o["search"]
        if search == "auto":
            search = auto_search(info.shape, height, width, o["stride"])
        step_size = o["step_size"]
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
            raise JeatError(f"objective option step_size must be a number, got {step_size!r}")
        self.attack = ROA(
            height,
            width,
            search=search,
            stride=o["stride"],
            candidates=o["candidates"],
            steps=o["steps"],
            step_size=float(step_size),
            random_start=bool(o["random_start"]),
            eval_mode=o["attack_mode"] == "eval",
        )

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        x_adv = self.attack(model, x, y, check=False)
        logits = as_logits(model(x_adv))
        loss, metrics = _classification(logits, y)
        return ObjectiveOutput(loss, logits.detach(), y, metrics)


# JEM's published sampler settings (Grathwohl et al. 2020), converted from inputs in [-1, 1]
# to [0, 1] pixels: SGLD step 1 -> 0.25, SGLD noise 0.01 -> 0.005, data noise 0.03 -> 0.015.
JEM_DEFAULTS: dict[str, Any] = {
    "energy_weight": 1.0,  # lambda in CE + lambda * [E(x) - E(x_hat)]
    "buffer_size": 10000,
    "reinit_freq": 0.05,
    # uniform | gaussian (class-conditional Gaussian seeds) | data (training images + noise)
    "buffer_init": "uniform",
    "buffer_init_noise": 0.1,  # noise std of the `data` re-initialisation ([0, 1] pixels)
    "sgld_steps": 20,
    "sgld_step_size": 0.25,
    "sgld_noise": 0.005,
    "sgld_grad_clip": None,  # JEM++'s proximal SGLD: clamp the energy gradient per pixel
    "energy_weight_warmup_steps": 0,  # lambda grows linearly from 0 over this many steps
    "sample_batch": None,  # samples per step; None: the data batch size
    "conditional": False,  # sample E(x, y) from class partitions instead of E(x)
    "data_noise": 0.015,
    "energy_l2": 0.0,  # optional penalty on E(x)^2 + E(x_hat)^2 (a common stabiliser)
}


class _EnergyObjective(Objective):
    """Shared machinery of JEM and JEAT: the persistent SGLD sampler and the generative term
    ``lambda * [E(x_data) - E(x_hat)]``."""

    options = dict(JEM_DEFAULTS)

    def __init__(self, cfg: ObjectiveConfig, info: DatasetInfo) -> None:
        super().__init__(cfg, info)
        o = self.opts
        if o["buffer_init"] not in BUFFER_INITS:
            raise JeatError(
                f"objective option buffer_init must be one of {', '.join(BUFFER_INITS)}, got "
                f"{o['buffer_init']!r}"
            )
        if o["sgld_steps"] < 0 or o["buffer_size"] < info.num_classes:
            raise JeatError("sgld_steps must be >= 0 and buffer_size >= the number of classes")
        noise = o["buffer_init_noise"]
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
            raise JeatError(f"objective option buffer_init_noise must be >= 0, got {noise!r}")
        clip = o["sgld_grad_clip"]
        if clip is not None and (
            isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0
        ):
            raise JeatError(f"objective option sgld_grad_clip must be > 0 or null, got {clip!r}")
        warm = o["energy_weight_warmup_steps"]
        if isinstance(warm, bool) or not isinstance(warm, int) or warm < 0:
            raise JeatError(
                f"objective option energy_weight_warmup_steps must be an integer >= 0, got {warm!r}"
            )
        self.sgld = SGLD(
            o["sgld_steps"],
            o["sgld_step_size"],
            o["sgld_noise"],
            None if clip is None else float(clip),
        )
        self.buffer: ReplayBuffer | None = None
        self._lambda_scale = self._warmup_scale(0)

    def _warmup_scale(self, step: int) -> float:
        warm = self.opts["energy_weight_warmup_steps"]
        return min(1.0, (step + 1) / warm) if warm > 0 else 1.0

    @property
    def energy_weight(self) -> float:
        """lambda at the current step (``energy_weight`` after its warm-up)."""
        return float(self.opts["energy_weight"]) * self._lambda_scale

    def begin_step(self, step: int) -> None:
        self._lambda_scale = self._warmup_scale(step)
        super().begin_step(step)

    def setup(self, data: ImageDataset, device: torch.device) -> None:
        o = self.opts
        seeds = None
        if o["buffer_init"] == "gaussian":
            seeds = fit_class_gaussians(data.x_train, data.y_train, data.info.num_classes)
        pool = (data.x_train, data.y_train) if o["buffer_init"] == "data" else None
        self.buffer = ReplayBuffer(
            o["buffer_size"],
            data.info.shape,
            data.info.num_classes,
            reinit_freq=o["reinit_freq"],
            init=o["buffer_init"],
            seeds=seeds,
            device=device,
            pool=pool,
            init_noise=o["buffer_init_noise"],
        )

    def _buffer(self) -> ReplayBuffer:
        if self.buffer is None:
            raise JeatError(f"objective '{self.name}' needs setup(data, device) before use")
        return self.buffer

    def samples(
        self, model: nn.Module, y: Tensor, like: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Draw persistent-SGLD samples (conditioned on ``y`` when ``conditional``), in the
        memory layout of the data batch ``like`` (channels-last on the fast path), so the
        network sees one layout and a compiled network one set of graphs."""
        n = self.opts["sample_batch"] or len(y)
        labels = y[:n] if self.opts["conditional"] and n <= len(y) else None
        if self.opts["conditional"] and labels is None:
            labels = y[torch.randint(0, len(y), (n,), device=y.device)]
        buffer = self._buffer()
        x0, idx = buffer.sample(n, labels)
        if like is not None:
            x0 = same_layout(x0, like)
        x_hat = self.sgld(model, x0, labels)
        buffer.update(idx, x_hat)
        return x_hat, labels

    def energy(self, logits: Tensor, labels: Tensor | None) -> Tensor:
        if labels is not None:
            return joint_energy_from_logits(logits, labels, check=False)
        return marginal_energy_from_logits(logits)

    def generative_term(
        self, model: nn.Module, e_data: Tensor, y: Tensor, like: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``lambda * [mean E(x_data) - mean E(x_hat)]`` (+ optional L2 on energies); the
        samples take the memory layout of ``like`` (the data batch) when given."""
        x_hat, labels = self.samples(model, y, like)
        e_hat = self.energy(as_logits(model(x_hat)), labels)
        gap = e_data.mean() - e_hat.mean()
        term = self.energy_weight * gap
        if self.opts["energy_l2"]:
            term = term + self.opts["energy_l2"] * (e_data.pow(2).mean() + e_hat.pow(2).mean())
        metrics = {
            "energy_data": e_data.mean().detach(),
            "energy_sample": e_hat.mean().detach(),
            "energy_gap": gap.detach(),
        }
        if self.opts["energy_weight_warmup_steps"]:
            metrics["energy_weight"] = torch.tensor(self.energy_weight, device=gap.device)
        return term, metrics

    def noisy(self, x: Tensor) -> Tensor:
        sigma = self.opts["data_noise"]
        return (x + sigma * torch.randn_like(x)).clamp(0.0, 1.0) if sigma > 0 else x

    def reset_state(self) -> None:
        if self.buffer is not None:
            self.buffer.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()} if self.buffer is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "buffer" in state:
            self._buffer().load_state_dict(state["buffer"])


@register_objective("jem")
class JEM(_EnergyObjective):
    """JEM (Grathwohl et al. 2020): ``CE(x, y) + lambda * [E(x) - E(x_hat)]`` with ``x_hat`` from
    persistent SGLD on ``E(x)``; data inputs get Gaussian noise ``data_noise``."""

    description = "JEM: CE + [E(x) - E(x_hat)], x_hat from persistent SGLD (replay buffer)"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        logits = as_logits(model(self.noisy(x)))
        ce, metrics = _classification(logits, y)
        labels = y if self.opts["conditional"] else None
        term, gen = self.generative_term(model, self.energy(logits, labels), y, like=x)
        return ObjectiveOutput(ce + term, logits.detach(), y, {**metrics, **gen})


@register_objective("jeat")
class JEAT(_AdversarialMixin, _EnergyObjective):
    """JEAT (Zhu et al. 2021, as reconstructed in the method notes): CE on PGD adversarial
    examples plus ``lambda * [E(x_data) - E(x_hat)]``.

    ``data_term`` picks ``x_data``: ``adv`` (the adversarial examples: maximise
    ``log p(x_adv, y)``), ``clean`` (the clean inputs) or ``both`` (the mean of the two).
    Defaults: JEM's sampler settings (step size, noise, buffer, re-init), except

    * 3 SGLD steps per update instead of 20, so that a JEAT step costs at most 1.5x a PGD-10
      step (measured in ``benchmarks/compare_objectives.py``);
    * ``buffer_init: gaussian`` (chains restart from class-conditional Gaussian seeds) instead
      of uniform noise: with short chains from noise the model learns to tell noise from data,
      energies drift and robustness drops (MNIST: 54% clean / 18% PGD-20 against PGD-AT's
      91% / 47%; docs/objectives.md);
    * ``energy_weight`` (lambda) 0.01 instead of 1. On digits (5 seeds, paired with PGD-AT)
      lambda = 1 cost 10 points of clean and 10 of AutoAttack accuracy, lambda = 0.1 cost
      3.6 and lambda = 0.03 1.3 points of AutoAttack accuracy; lambda = 0.01 shows no
      AutoAttack difference (0.0 [-1.0, +1.0]) and still a better judge-FID by SGLD
      (docs/objectives.md, benchmarks/results/study-lambda).

    ``robust_loss`` picks the classification part: ``ce`` (CE on the PGD examples, the
    paper's) or ``trades`` (TRADES' ``CE(x) + beta * KL(p(.|x) || p(.|x'))`` with ``x'``
    maximising the KL; ``data_term: adv`` then puts the energy term on ``x'``).
    """

    description = "JEAT: CE on PGD examples + lambda [E(x_data) - E(x_hat)] (persistent SGLD)"
    options = {
        **JEM_DEFAULTS,
        "energy_weight": 0.01,
        "sgld_steps": 3,
        "buffer_init": "gaussian",
        "data_term": "adv",
        "attack_mode": "eval",
        "robust_loss": "ce",  # ce (on the PGD examples) | trades
        "beta": 6.0,  # TRADES' beta, with robust_loss: trades
    }

    def __init__(self, cfg: ObjectiveConfig, info: DatasetInfo) -> None:
        super().__init__(cfg, info)
        if self.opts["data_term"] not in ("adv", "clean", "both"):
            raise JeatError("objective option data_term must be 'adv', 'clean' or 'both'")
        if self.opts["robust_loss"] not in ("ce", "trades"):
            raise JeatError(
                f"objective option robust_loss must be 'ce' or 'trades', got "
                f"{self.opts['robust_loss']!r}"
            )
        check_beta(self.opts["beta"])
        self._init_attack()

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        if self.opts["robust_loss"] == "trades":
            return self._trades(model, x, y)
        x_adv = self.attack(model, x, y, check=False)
        clean = None
        if self.opts["data_term"] == "adv":
            logits = as_logits(model(x_adv))
        else:
            both = as_logits(model(torch.cat([x_adv, self.noisy(x)])))
            logits, clean = both[: len(x)], both[len(x) :]
        ce, metrics = _classification(logits, y)
        term, gen = self.generative_term(model, self._data_energy(logits, clean, y), y, like=x)
        return ObjectiveOutput(ce + term, logits.detach(), y, {**metrics, **gen})

    def _trades(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        """TRADES' loss plus the energy term on ``x'`` (``adv``), ``x`` (``clean``) or both."""
        x_adv = trades_adversarial(model, x, self.attack)
        # two passes, as TRADES takes them (batch-norm statistics stay per batch)
        logits, logits_adv = as_logits(model(x)), as_logits(model(x_adv))
        loss, metrics = trades_loss(logits, logits_adv, y, self.opts["beta"])
        term, gen = self.generative_term(model, self._data_energy(logits_adv, logits, y), y,
                                         like=x)  # fmt: skip
        return ObjectiveOutput(loss + term, logits.detach(), y, {**metrics, **gen})

    def _data_energy(self, logits_adv: Tensor, logits_clean: Tensor | None, y: Tensor) -> Tensor:
        """``E(x_data)`` per ``data_term``: the adversarial inputs, the clean ones, or both
        (adversarial first); conditioned on the labels when ``conditional``."""
        term_on = self.opts["data_term"]
        if term_on == "adv" or logits_clean is None:
            data = logits_adv
        else:
            data = logits_clean if term_on == "clean" else torch.cat([logits_adv, logits_clean])
        labels = None
        if self.opts["conditional"]:
            labels = torch.cat([y, y]) if term_on == "both" else y
        return self.energy(data, labels)


def default_options(name: str) -> dict[str, Any]:
    """The options objective ``name`` runs with when a config sets none (a copy)."""
    return dict(_objective_class(name).options)


def _objective_class(name: str) -> type[Objective]:
    if name not in _OBJECTIVES:
        raise JeatError(
            f"unknown objective '{name}'; known objectives: {', '.join(sorted(_OBJECTIVES))}"
        )
    return _OBJECTIVES[name]


def list_objectives() -> dict[str, str]:
    return {name: cls.description for name, cls in sorted(_OBJECTIVES.items())}


def create_objective(cfg: ObjectiveConfig, info: DatasetInfo) -> Objective:
    return _objective_class(cfg.name)(cfg, info)
