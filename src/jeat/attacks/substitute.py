"""Attacks through a model of the model: a distilled substitute, and BPDA with a learned
approximation of a named module.

**Substitute** (Papernot et al., "Practical black-box attacks against machine learning",
AsiaCCS 2017): train a surrogate network on the target's own outputs, attack the surrogate
white-box and transfer its examples. The target is only queried, never differentiated, so a
step that jeat cannot see into (a shattering preprocessing, detached outputs, a vote) does not
stop it. Ours differs from the paper in three ways, each toward the threat model being
evaluated rather than a remote API:

* the surrogate is distilled (Hinton et al. 2015) on the target's scores where it has them
  (its softmax; its outputs themselves when they already are a distribution) and on its hard
  labels where it has none, over the *unlabelled* inputs it is given (the training inputs and
  the table's points) and ``copies`` random points of each one's threat ball;
* the paper's Jacobian-based augmentation (new points ``x + lambda sign(grad)`` labelled by the
  target) becomes one round of points crafted by PGD on the surrogate inside the ball of each
  of the table's points, labelled by the target, after which the surrogate is trained further:
  it learns the target's decision boundary where the attack looks for it;
* the transfer is *query-verified*: every iterate of the PGD on the surrogate is shown to the
  target, and a point is broken by its first iterate that fools the target (restarts
  alternate the cross-entropy and the CW margin; the first starts at the clean point, as SGM's
  authors do, the others at random points of the ball).

``arch`` is the surrogate: ``small_cnn`` (default) or ``preact_resnet18``, with which
``gamma < 1`` crafts with the Skip Gradient Method (:func:`jeat.attacks.transfer.skip_gradient`).

**LearnedBPDA** (Athalye, Carlini & Wagner, ICML 2018, BPDA with a learned approximation):
the user names a module of the model (``--bpda-module NAME``) whose step is not
differentiable or shatters gradients; a small network ``g`` is fitted (mean squared error) to
map that module's inputs to its outputs on the inputs it is given and random points of their
threat balls, and during the attack the module's output enters as ``out + g(in) -
g(in).detach()``: the forward pass is the model's own, the backward pass ``g``'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from jeat.attacks.base import checked_inputs, logits_of, model_mode
from jeat.attacks.threats import ThreatModel
from jeat.errors import JeatError

__all__ = ["Substitute", "LearnedBPDA", "find_module", "target_distribution"]

ARCHS = ("small_cnn", "preact_resnet18")


def target_distribution(outputs: Tensor) -> Tensor:
    """What a surrogate is distilled on: the outputs themselves when they are a distribution
    (non-negative rows that sum to 1), one-hot labels when they carry no score (integers, or
    at most two distinct values per row), else their softmax."""
    out = outputs.detach().float()
    k = out.shape[1]
    rows_sum = out.sum(1)
    if bool((out >= 0).all()) and bool(torch.allclose(rows_sum, torch.ones_like(rows_sum))):
        return out
    s = out.sort(1).values
    distinct = 1 + (s[:, 1:] != s[:, :-1]).sum(1)
    if bool((out == out.round()).all()) or bool((distinct <= 2).all()):
        return nn.functional.one_hot(out.argmax(1), k).float()
    return torch.softmax(out, 1)


def _query(model: nn.Module, x: Tensor, batch: int = 512) -> Tensor:
    with torch.no_grad():
        return torch.cat(
            [logits_of(model, x[i : i + batch]).float() for i in range(0, len(x), batch)]
        )


@dataclass
class Substitute:
    """Distil a surrogate from the target's outputs, then query-verified transfer from it
    (see the module notes). ``inputs``: unlabelled images to distil on (default: the batch
    being attacked); the surrogate is fitted at the first call and reused."""

    threat: ThreatModel
    steps: int = 50
    step_size: float | None = None
    restarts: int = 3
    epochs: int = 15
    copies: int = 2
    arch: str = "small_cnn"
    gamma: float = 1.0
    seed: int = 0
    inputs: Tensor | None = field(default=None, repr=False)
    surrogate: nn.Module | None = field(default=None, repr=False)
    fit_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise JeatError(f"substitute: arch must be one of {', '.join(ARCHS)}, got {self.arch}")
        for name in ("steps", "restarts", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise JeatError(f"substitute: {name} must be an integer >= 1, got {value!r}")
        if isinstance(self.copies, bool) or int(self.copies) != self.copies or self.copies < 0:
            raise JeatError(f"substitute: copies must be an integer >= 0, got {self.copies!r}")
        if not 0 < float(self.gamma) <= 1:
            raise JeatError(f"substitute: gamma must be in (0, 1], got {self.gamma}")
        if self.gamma < 1 and self.arch != "preact_resnet18":
            raise JeatError("substitute: gamma < 1 (SGM) needs arch=preact_resnet18")
        if self.step_size is None:
            self.step_size = self.threat.eps / 8

    # -- the surrogate -------------------------------------------------------------------------
    def _network(self, x: Tensor, k: int) -> nn.Module:
        from jeat.models import create_model

        opts: dict[str, Any] = {"width": 32} if self.arch == "small_cnn" else {"width": 16}
        if self.arch == "preact_resnet18":
            opts["norm"] = "none"
        mean = x.mean(dim=(0, 2, 3)).tolist()
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
        return create_model(
            self.arch, in_channels=x.shape[1], num_classes=k, mean=mean, std=std, **opts
        ).to(x.device)

    def _train(
        self, net: nn.Module, x: Tensor, p: Tensor, epochs: int, gen: torch.Generator
    ) -> None:
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        net.train()
        batch = 128
        steps = epochs * math.ceil(len(x) / batch)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
        with torch.enable_grad():
            for _ in range(epochs):
                order = torch.randperm(len(x), generator=gen).to(x.device)
                for i in range(0, len(x), batch):
                    sel = order[i : i + batch]
                    logp = torch.log_softmax(net(x[sel]), 1)
                    loss = -(p[sel] * logp).sum(1).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
        net.eval()

    def fit(self, model: nn.Module, x: Tensor, y: Tensor) -> nn.Module:
        """Distil the surrogate from ``model`` (see the module notes); ``x, y`` are the
        points to attack (their labels are used only to craft the augmentation round)."""
        import time

        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed)
        pool = x if self.inputs is None else torch.cat([self.inputs.to(x.device), x])
        parts = [pool]
        for _ in range(self.copies):
            parts.append(self.threat.random_init(pool, None))
        fit_x = torch.cat(parts)
        p = target_distribution(_query(model, fit_x))
        k = p.shape[1]
        net = self._network(pool, k)
        self._train(net, fit_x, p, self.epochs, gen)
        # the augmentation round: the surrogate's own adversarial points near the table's
        # points, labelled by the target
        crafted = self._craft_on_surrogate(net, x, y, steps=10)
        extra_x = torch.cat([crafted, self.threat.random_init(x, None)])
        fit_x = torch.cat([fit_x, extra_x])
        p = torch.cat([p, target_distribution(_query(model, extra_x))])
        self._train(net, fit_x, p, max(1, self.epochs // 3), gen)
        for q in net.parameters():
            q.requires_grad_(False)
        self.fit_seconds += time.perf_counter() - t0
        return net

    def _craft_on_surrogate(self, net: nn.Module, x: Tensor, y: Tensor, steps: int) -> Tensor:
        from jeat.attacks.pgd import PGD

        return PGD(self.threat, steps=steps)(net, x, y, check=False)

    # -- the attack ----------------------------------------------------------------------------
    def _grad(self, net: nn.Module, x_adv: Tensor, y: Tensor, loss: str) -> Tensor:
        from jeat.attacks.pgd import attack_loss
        from jeat.attacks.transfer import skip_gradient

        with torch.enable_grad():
            x_adv = x_adv.detach().requires_grad_(True)
            if self.gamma < 1:
                with skip_gradient(net, self.gamma):
                    value = attack_loss(loss)(net(x_adv), y, None)
            else:
                value = attack_loss(loss)(net(x_adv), y, None)
            (grad,) = torch.autograd.grad(value.sum(), x_adv)
        return grad

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        check: bool = True,
    ) -> Tensor:
        x = checked_inputs(model, x, y, check)
        if len(x) == 0:
            return x.clone()
        with model_mode(model, True), torch.no_grad():
            if self.surrogate is None:
                self.surrogate = self.fit(model, x, y)
            net = self.surrogate.to(x.device)
            out = x.clone()
            open_ = logits_of(model, x).argmax(1) == y
            for r in range(self.restarts):
                idx = open_.nonzero().squeeze(1)
                if len(idx) == 0:
                    break
                xs, ys = x[idx], y[idx]
                cur = xs.clone() if r == 0 else self.threat.random_init(xs, generator)
                bounds = self.threat.bounds(xs)
                loss = "ce" if r % 2 == 0 else "cw"
                alive = torch.ones(len(idx), dtype=torch.bool, device=x.device)
                for _ in range(self.steps):
                    grad = self._grad(net, cur, ys, loss)
                    cur = self.threat.advance(cur.clone(), grad, float(self.step_size), xs, bounds)
                    fooled = (logits_of(model, cur).argmax(1) != ys) & alive
                    if bool(fooled.any()):
                        out[idx[fooled]] = cur[fooled]
                        open_[idx[fooled]] = False
                        alive &= ~fooled
                    if not bool(alive.any()):
                        break
            return out


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of ``model``: its qualified name (``pre``, ``net.pre``), also
    under the adapters jeat puts around a user's model (``model.pre``); a one-line error
    listing the names it has otherwise."""
    names = dict(model.named_modules())
    if name in names and name:
        return names[name]
    tails = [k for k in names if k == name or k.endswith("." + name)]
    if len(tails) == 1:
        return names[tails[0]]
    if len(tails) > 1:
        raise JeatError(
            f"--bpda-module {name} names several modules ({', '.join(tails[:4])}); give the "
            "full name"
        )
    have = ", ".join(k for k in list(names)[1:12] if k) or "none"
    raise JeatError(f"the model has no module named {name!r} (--bpda-module); it has: {have}")


class _Approx(nn.Module):
    """The learned approximation of a module: a small convolutional map when the module keeps
    the images' height and width (with a skip connection when it keeps the channels too),
    else a two-layer perceptron on the flattened tensors."""

    def __init__(self, inp: Tensor, out: Tensor) -> None:
        super().__init__()
        self.out_shape = tuple(out.shape[1:])
        self.conv = inp.dim() == 4 and out.dim() == 4 and inp.shape[2:] == out.shape[2:]
        self.skip = self.conv and inp.shape[1] == out.shape[1]
        if self.conv:
            c_in, c_out, w = inp.shape[1], out.shape[1], 32
            self.net = nn.Sequential(
                nn.Conv2d(c_in, w, 3, padding=1), nn.ReLU(),
                nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
                nn.Conv2d(w, c_out, 3, padding=1),
            )  # fmt: skip
        else:
            d_in, d_out = inp[0].numel(), out[0].numel()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(d_in, 512), nn.ReLU(),
                                     nn.Linear(512, d_out))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x)
        if self.skip:
            y = y + x
        return y.view(-1, *self.out_shape)


@dataclass
class LearnedBPDA:
    """Run ``attack`` with the module ``module`` of the model differentiated through a learned
    approximation (see the module notes). ``inputs``: images to fit it on (default: the batch
    being attacked), with ``copies`` random points of each one's threat ball; ``fit_steps``
    Adam steps of batch 256."""

    attack: Callable[..., Tensor]
    module: str
    inputs: Tensor | None = field(default=None, repr=False)
    copies: int = 2
    fit_steps: int = 400
    seed: int = 0
    approx: nn.Module | None = field(default=None, repr=False)
    fit_seconds: float = 0.0

    @property
    def threat(self) -> ThreatModel:
        return self.attack.threat  # type: ignore[attr-defined]

    def fit(self, model: nn.Module, x: Tensor) -> nn.Module:
        import time

        t0 = time.perf_counter()
        target = find_module(model, self.module)
        pool = x if self.inputs is None else torch.cat([self.inputs.to(x.device), x])
        parts = [pool] + [self.threat.random_init(pool, None) for _ in range(self.copies)]
        fit_x = torch.cat(parts)
        seen: list[tuple[Tensor, Tensor]] = []

        def grab(mod: nn.Module, args: tuple, out: Any) -> None:
            if not args or not isinstance(args[0], Tensor) or not isinstance(out, Tensor):
                raise JeatError(
                    f"--bpda-module {self.module}: the module must take and return tensors"
                )
            seen.append((args[0].detach().float(), out.detach().float()))

        handle = target.register_forward_hook(grab)
        try:
            with torch.no_grad():
                for i in range(0, len(fit_x), 512):
                    logits_of(model, fit_x[i : i + 512])
        finally:
            handle.remove()
        if not seen:
            raise JeatError(f"--bpda-module {self.module}: the module never ran on the inputs")
        ins = torch.cat([a for a, _ in seen])
        outs = torch.cat([b for _, b in seen])
        gen = torch.Generator().manual_seed(self.seed)
        approx = _Approx(ins, outs).to(x.device)
        opt = torch.optim.Adam(approx.parameters(), lr=1e-3)
        with torch.enable_grad():
            for _ in range(self.fit_steps):
                sel = torch.randint(len(ins), (min(256, len(ins)),), generator=gen).to(x.device)
                loss = (approx(ins[sel]) - outs[sel]).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for q in approx.parameters():
            q.requires_grad_(False)
        approx.eval()
        self.fit_seconds += time.perf_counter() - t0
        return approx

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        check: bool = True,
    ) -> Tensor:
        target = find_module(model, self.module)
        if self.approx is None:
            with model_mode(model, True):
                self.approx = self.fit(model, x.detach())
        approx = self.approx

        def swap(mod: nn.Module, args: tuple, out: Any) -> Any:
            inp = args[0]
            if not (torch.is_grad_enabled() and isinstance(out, Tensor) and inp.requires_grad):
                return out
            a = approx(inp.float()).to(out.dtype if out.is_floating_point() else torch.float32)
            base = out.detach() if out.is_floating_point() else out.detach().float()
            return base + a - a.detach()

        handle = target.register_forward_hook(swap)
        try:
            return self.attack(model, x, y, generator=generator, check=check)
        finally:
            handle.remove()
