"""Gradient attacks in a threat model: PGD (any loss, steps, restarts, targeted) and FGSM.

An attack is a threat model plus a loss written through :mod:`jeat.energy` plus a number of
steps::

    attack = PGD(LinfBall(8 / 255), steps=20)
    x_adv = attack(model, x, y)               # untargeted: ascend E(x', y) - E(x')
    x_tgt = attack(model, x, y, target=t)     # targeted: descend E(x', t) - E(x')
    x_any = MultiTargeted(attack, 9)(model, x, y)   # try the 9 likeliest wrong classes

Attacks leave the model as they found it: the train/eval mode of every submodule is restored
(by default the attack itself runs in eval mode), and parameter ``.grad`` fields are untouched
(only input gradients are taken). Randomness comes from ``generator`` when one is given.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from jeat.attacks.base import check_images, logits_of, model_mode, model_width
from jeat.attacks.threats import ThreatModel, check_step_size
from jeat.energy import check_labels, cross_entropy_from_logits, dlr_from_logits, margin_from_logits
from jeat.errors import JeatError

__all__ = ["PGD", "FGSM", "MultiTargeted", "BPDA", "Unroll", "LOSSES", "attack_loss"]


def _ce(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    # untargeted: E(x', y) - E(x'); targeted: -(E(x', t) - E(x'))
    if target is None:
        return cross_entropy_from_logits(logits, y, check=False)
    return -cross_entropy_from_logits(logits, target, check=False)


def _cw(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    # Carlini-Wagner margin: max_{k != y} f_k - f_y; targeted: f_t - max_{k != t} f_k
    if target is None:
        return margin_from_logits(logits, y, check=False)
    return -margin_from_logits(logits, target, check=False)


def _dlr(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    return dlr_from_logits(logits, y, target)


# Per-example losses to *ascend*, from logits, true labels and (targeted) target labels.
LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor | None], Tensor]] = {
    "ce": _ce,
    "cw": _cw,
    "dlr": _dlr,
}


def attack_loss(name: str) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    if name not in LOSSES:
        raise JeatError(f"unknown attack loss '{name}'; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]


def _check_int(value: object, what: str, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise JeatError(f"{what} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise JeatError(f"{what} must be an integer >= {low}, got {value}")


@dataclass
class PGD:
    """Projected gradient descent with random start (Madry et al. 2018).

    ``step_size`` defaults to the threat's default (``eps / 4`` for the balls: the evaluation
    protocol's PGD-20 setting); training configs usually pass ``2.5 * eps / steps``.
    ``restarts > 1`` keeps, per example, the first restart that fools the model (or the last
    one). With ``target`` given, the attack descends the loss of the target class instead of
    ascending that of the true class.

    ``keep_success=True`` (what evaluation uses) returns, per example, the first iterate that
    fools the model instead of the last one: fixed-size signed steps oscillate, and a last
    iterate can be correctly classified again after an earlier one was not, which would make
    more steps look weaker. It costs no extra forward pass (the logits of every iterate are
    computed for its gradient anyway). Training keeps the last iterate, as Madry et al. do.

    With ``keep_success=True`` the attack also works on an *active set* (``active_set=True``,
    the default): a point leaves the working batch once an iterate fools the model (that
    iterate is its answer), so later steps and restarts only attack the points still standing.
    The working batch is compacted every ``compact_every`` steps (default: every step on the
    CPU, every 5 steps elsewhere, so that between compactions the loop never waits for the
    device; a compaction reads one count on the host). The random starts are drawn for the whole
    batch as the full-batch attack draws them, so each remaining point follows the same
    trajectory as in the full batch. It needs a model that treats examples independently (eval
    mode: ``eval_mode=True``) and a threat without per-example state; otherwise, and with
    ``active_set=False``, every step and restart runs on the whole batch.

    ``eot > 1`` (expectation over transformation, Athalye et al. 2018) averages the loss, the
    logits and the input gradient of ``eot`` forward-backward passes at every step: the attack
    on a randomised model (noise injection, random purification). The success test of an
    iterate then uses the averaged logits. ``log_outputs=True`` attacks the logarithm of the
    model's outputs: the attack on a model that returns probabilities instead of logits.

    ``smooth = sigma > 0`` (gradient smoothing) takes, at every step, the expected gradient of
    the loss under Gaussian input noise ``N(0, sigma^2 I)``: the mean over ``eot`` noisy copies
    of the iterate (antithetic pairs ``+u, -u``) of the input gradient, and, for a point whose
    noisy copies all have a zero or absent gradient (an opaque model: a step computed without
    a graph, outputs detached from the input), the same expectation estimated from the losses
    alone, ``mean((L(x + sigma u) - L(x)) u) / sigma`` (Gaussian smoothing, as NES). The
    success test uses the model at the iterate itself (one more forward pass). It is the attack
    on shattered gradients that jeat cannot see the cause of (Athalye et al. 2018's EOT over a
    Gaussian), for deterministic models too.

    A model whose outputs do not depend on the input through autograd (a detached
    preprocessing step) gives a zero gradient, not an error: the step does nothing, and the
    trace shows it. ``recorder`` (a :class:`jeat.attacks.trace.LossTrace`) receives the
    per-point loss, gradient size and first success of every iterate.
    """

    threat: ThreatModel
    steps: int = 20
    step_size: float | None = None
    loss: str = "ce"
    random_start: bool = True
    restarts: int = 1
    eval_mode: bool = True
    keep_success: bool = False
    active_set: bool = True
    compact_every: int | None = None
    eot: int = 1
    log_outputs: bool = False
    smooth: float = 0.0
    recorder: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_int(self.steps, "attack steps")
        _check_int(self.restarts, "attack restarts")
        if isinstance(self.eot, bool) or not isinstance(self.eot, int) or self.eot < 1:
            raise JeatError(f"EOT samples must be an integer >= 1, got {self.eot!r}")
        if not isinstance(self.active_set, bool):
            raise JeatError(f"active_set must be True or False, got {self.active_set!r}")
        if self.compact_every is not None:
            _check_int(self.compact_every, "compact_every")
        if isinstance(self.smooth, bool) or not isinstance(self.smooth, (int, float)):
            raise JeatError(f"smoothing sigma must be a number >= 0, got {self.smooth!r}")
        if not 0 <= float(self.smooth) < float("inf"):
            raise JeatError(f"smoothing sigma must be a number >= 0, got {self.smooth}")
        self.smooth = float(self.smooth)
        attack_loss(self.loss)
        if self.step_size is None:
            self.step_size = self.threat.default_step_size
        # > 0: a zero step never moves (which only a zero budget means)
        self.step_size = check_step_size(None, self.step_size, self.eps, what="attack step size")

    @property
    def eps(self) -> float:
        return self.threat.eps

    @property
    def uses_active_set(self) -> bool:
        """Whether calls drop fooled points from the working batch (see the class notes)."""
        return (
            self.keep_success
            and self.active_set
            and self.eval_mode
            and getattr(self.threat, "rowwise", False)
        )

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None = None,
        generator: torch.Generator | None = None,
        check: bool = True,
    ) -> Tensor:
        """Return adversarial inputs for ``model`` at ``(x, y)`` (detached, same shape as x).

        ``check=False`` skips the input validation (range and label checks read values on the
        host); training loops that feed already-validated data pass it.
        """
        if check:
            check_images(x)
        loss_fn = attack_loss(self.loss)
        x = x.detach()
        with model_mode(model, self.eval_mode), torch.enable_grad():
            if check:
                width = model_width(model, x)
                check_labels(y, width, x.shape[0])
                if target is not None:
                    check_labels(target, width, x.shape[0])
            if self.uses_active_set:
                return self._run_active(model, x, y, target, loss_fn, generator)
            best = x.clone()
            fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            for restart in range(self.restarts):
                x_adv = self._run(model, x, y, target, loss_fn, generator, restart)
                if self.restarts == 1:
                    return x_adv
                with torch.no_grad():
                    pred = self._final(model, x_adv, y, target, loss_fn).argmax(1)
                    now = pred == target if target is not None else pred != y
                    take = ~fooled
                    best[take] = x_adv[take]
                    fooled |= now
        return best

    def _outputs(self, model: nn.Module, x: Tensor) -> Tensor:
        out = logits_of(model, x)
        return out.clamp_min(1e-30).log() if self.log_outputs else out

    def _gradient(
        self,
        model: nn.Module,
        x_adv: Tensor,
        y: Tensor,
        target: Tensor | None,
        loss_fn: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Logits, per-example loss and input gradient at ``x_adv`` (each the mean over the
        ``eot`` passes); a model whose outputs ignore the input's graph gives a zero gradient."""
        if self.smooth > 0:
            return self._smoothed(model, x_adv, y, target, loss_fn)
        sums: list[Tensor] = []
        for _ in range(self.eot):
            # A no-op after the first step when the threat updates the leaf in place.
            x_adv.requires_grad_(True)
            logits = self._outputs(model, x_adv)
            loss = loss_fn(logits, y, target)
            grad = None
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss.sum(), x_adv, allow_unused=True)
            if grad is None:
                grad = torch.zeros_like(x_adv)
            if self.eot == 1:
                return logits, loss.detach(), grad
            parts = [logits.detach(), loss.detach(), grad]
            sums = parts if not sums else [a + b for a, b in zip(sums, parts, strict=True)]
        logits, loss, grad = (t / self.eot for t in sums)
        return logits, loss, grad

    def _smoothed(
        self,
        model: nn.Module,
        x_adv: Tensor,
        y: Tensor,
        target: Tensor | None,
        loss_fn: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Logits and loss at ``x_adv`` and the Gaussian-smoothed gradient (see the class
        notes): autograd's where any noisy copy has one, else the zeroth-order estimate."""
        x0 = x_adv.detach()
        with torch.no_grad():
            logits = self._outputs(model, x0)
            loss0 = loss_fn(logits, y, target)
        shape = (-1, *([1] * (x0.dim() - 1)))
        auto = torch.zeros_like(x0)
        zeroth = torch.zeros_like(x0)
        u = x0
        for k in range(self.eot):
            u = torch.randn_like(x0) if k % 2 == 0 else -u  # antithetic pairs
            noisy = (x0 + self.smooth * u).clamp(0.0, 1.0).requires_grad_(True)
            loss = loss_fn(self._outputs(model, noisy), y, target)
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss.sum(), noisy, allow_unused=True)
                if grad is not None:
                    auto += grad
            zeroth += (loss.detach() - loss0).view(shape) * u
        has_grad = auto.flatten(1).abs().sum(1) > 0
        grad = torch.where(has_grad.view(shape), auto, zeroth / self.smooth)
        return logits, loss0, grad / self.eot

    @torch.no_grad()
    def _final(
        self,
        model: nn.Module,
        x_adv: Tensor,
        y: Tensor,
        target: Tensor | None,
        loss_fn: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    ) -> Tensor:
        """The logits of the last iterate (averaged over ``eot`` passes), for its success test."""
        logits = self._outputs(model, x_adv)
        if self.smooth > 0:  # the success test is the model at the iterate itself
            return logits
        for _ in range(self.eot - 1):
            logits = logits + self._outputs(model, x_adv)
        return logits / self.eot if self.eot > 1 else logits

    def _run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        loss_fn: Callable[[Tensor, Tensor, Tensor | None], Tensor],
        generator: torch.Generator | None,
        restart: int = 0,
    ) -> Tensor:
        threat = self.threat
        rec = self.recorder
        x_adv = threat.random_init(x, generator) if self.random_start else x.clone()
        bounds = threat.bounds(x)
        keep = self.keep_success
        if keep:
            found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            best = x.clone()
        for step in range(self.steps):
            logits, loss, grad = self._gradient(model, x_adv, y, target, loss_fn)
            with torch.no_grad():
                if keep:
                    self._record(logits, y, target, x_adv, found, best)
                if rec is not None:
                    rec.record(restart, step, None, loss, grad, _fooled(logits, y, target))
                x_adv = threat.advance(x_adv, grad, self.step_size, x, bounds)
        x_adv = x_adv.detach()
        if not keep and rec is None:
            return x_adv
        with torch.no_grad():
            logits = self._final(model, x_adv, y, target, loss_fn)
            if rec is not None:
                fooled = _fooled(logits, y, target)
                rec.record(restart, self.steps, None, loss_fn(logits, y, target), None, fooled)
            if not keep:
                return x_adv
            self._record(logits, y, target, x_adv, found, best)
            return torch.where(found.view(-1, *([1] * (x.dim() - 1))), best, x_adv)

    def _run_active(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        loss_fn: Callable[[Tensor, Tensor, Tensor | None], Tensor],
        generator: torch.Generator | None,
    ) -> Tensor:
        """Every restart on the points not yet fooled, each point leaving the working batch
        at the first iterate that fools the model (written into the output at its index)."""
        threat = self.threat
        rec = self.recorder
        n = x.shape[0]
        every = self.compact_every or (1 if x.device.type == "cpu" else 5)
        out = x.clone()
        pos = torch.arange(n, device=x.device)  # original index of each working row
        for restart in range(self.restarts):
            if pos.numel() == 0:
                break
            # drawn for the whole batch, as the full-batch attack draws them
            start = threat.random_init(x, generator) if self.random_start else x.clone()
            if restart == 0:
                xs, ys, ts, x_adv = x, y, target, start
            else:
                xs, ys, x_adv = x[pos], y[pos], start[pos]
                ts = None if target is None else target[pos]
            bounds = threat.bounds(xs)
            found = torch.zeros(pos.numel(), dtype=torch.bool, device=x.device)
            best = torch.empty_like(x_adv)
            for step in range(self.steps):
                logits, loss, grad = self._gradient(model, x_adv, ys, ts, loss_fn)
                with torch.no_grad():
                    x_adv = x_adv.detach()
                    if rec is not None:
                        rec.record(restart, step, pos, loss, grad, _fooled(logits, ys, ts))
                    if every == 1:  # compact now: the fooled rows' answer is this iterate
                        found, best = _fooled(logits, ys, ts), x_adv
                    else:  # remember first successes on the device until the next compaction
                        self._record(logits, ys, ts, x_adv, found, best)
                    if (step + 1) % every == 0 or step + 1 == self.steps:
                        # rows still standing first; their count is the compaction's one
                        # host read
                        order = torch.argsort(found.to(torch.uint8), stable=True)
                        n_keep = pos.numel() - int(found.sum())
                        if n_keep < pos.numel():
                            keep, done = order[:n_keep], order[n_keep:]
                            out[pos[done]] = best[done]
                            pos, xs, ys, x_adv, grad = (t[keep] for t in (pos, xs, ys, x_adv, grad))
                            ts = None if ts is None else ts[keep]
                            bounds = threat.bounds(xs)
                        if every > 1:
                            found = torch.zeros(n_keep, dtype=torch.bool, device=x.device)
                            best = torch.empty_like(x_adv)
                        if pos.numel() == 0:
                            break
                    x_adv = threat.advance(x_adv, grad, self.step_size, xs, bounds)
            if pos.numel() == 0:
                break
            if every == 1:  # every success so far was written out at its compaction
                found = torch.zeros(pos.numel(), dtype=torch.bool, device=x.device)
                best = torch.empty_like(x_adv)
            with torch.no_grad():
                # the last iterate: its own success test, then compact for the next restart
                logits = self._final(model, x_adv, ys, ts, loss_fn)
                if rec is not None:
                    fooled = _fooled(logits, ys, ts)
                    rec.record(restart, self.steps, pos, loss_fn(logits, ys, ts), None, fooled)
                self._record(logits, ys, ts, x_adv, found, best)
                out[pos] = torch.where(found.view(-1, *([1] * (x.dim() - 1))), best, x_adv)
                if restart + 1 < self.restarts:
                    pos = pos[~found]  # a compaction (one host read) before the next restart
        return out

    @staticmethod
    def _record(
        logits: Tensor, y: Tensor, target: Tensor | None, x_adv: Tensor, found: Tensor, best: Tensor
    ) -> None:
        """Store the iterates that fool the model for the first time (in place, with no
        host-device synchronisation: the attack loop never waits for the device)."""
        now = _fooled(logits, y, target) & ~found
        mask = now.view(-1, *([1] * (x_adv.dim() - 1)))
        torch.where(mask, x_adv.detach(), best, out=best)
        found |= now


def _fooled(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    """Which rows the attack has won: predicted as the target (targeted) or not as y."""
    pred = logits.argmax(1)
    return pred == target if target is not None else pred != y


def FGSM(threat: ThreatModel, loss: str = "ce", eval_mode: bool = True) -> PGD:  # noqa: N802
    """Fast gradient sign method (Goodfellow et al. 2015): one full-size step, no random start."""
    return PGD(
        threat, steps=1, step_size=threat.eps, loss=loss, random_start=False, eval_mode=eval_mode
    )


@dataclass
class MultiTargeted:
    """Run a targeted ``attack`` toward each of the ``n_targets`` likeliest wrong classes (by
    the clean logits, as APGD-T does) and keep, per example, the first run that changes the
    prediction away from the true class. This is the untargeted use of a targeted attack."""

    attack: PGD
    n_targets: int = 9

    def __post_init__(self) -> None:
        _check_int(self.n_targets, "number of target classes")

    @property
    def threat(self) -> ThreatModel:
        return self.attack.threat

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        check: bool = True,
    ) -> Tensor:
        if check:
            check_images(x)
        x = x.detach()
        with model_mode(model, self.attack.eval_mode), torch.no_grad():
            logits = logits_of(model, x)
            if check:
                check_labels(y, logits.shape[1], x.shape[0])
            ranked = logits.masked_fill(
                nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")
            ).argsort(dim=1, descending=True)
        n = min(self.n_targets, logits.shape[1] - 1)
        best = x.clone()
        open_ = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        rec = self.attack.recorder
        for k in range(n):
            idx = open_.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            if rec is not None:  # target k's restarts are runs k * restarts, ...
                rec.select(idx, k * self.attack.restarts)
            x_adv = self.attack(
                model, x[idx], y[idx], target=ranked[idx, k], generator=generator, check=False
            )
            with model_mode(model, self.attack.eval_mode), torch.no_grad():
                broken = logits_of(model, x_adv).argmax(1) != y[idx]
            best[idx] = x_adv
            open_[idx[broken]] = False
        if rec is not None:
            rec.select(None, 0)
        return best


@dataclass
class _Switched:
    """Run ``attack`` with the model's modules switched to another backward pass (the forward
    pass, and so the attack's success test, is unchanged)."""

    attack: PGD | MultiTargeted | _Switched

    @property
    def threat(self) -> ThreatModel:
        return self.attack.threat

    def _switch(self, model: nn.Module) -> AbstractContextManager[None]:
        raise NotImplementedError

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        check: bool = True,
    ) -> Tensor:
        with self._switch(model):
            return self.attack(model, x, y, generator=generator, check=check)


class BPDA(_Switched):
    """Run ``attack`` under :func:`jeat.models.bpda` (Backward Pass Differentiable
    Approximation, Athalye et al. 2018): every k-WTA layer is differentiated as a ReLU and every
    test-time defence of :mod:`jeat.defences` with a non-differentiable step as the identity.
    The adaptive attack for masked gradients.
    """

    def _switch(self, model: nn.Module) -> AbstractContextManager[None]:
        from jeat.models import bpda

        return bpda(model)


class Unroll(_Switched):
    """Run ``attack`` under :func:`jeat.models.unrolled`: every purifier of :mod:`jeat.defences`
    (an iterative test-time step, SGLD purification) is differentiated through its unrolled
    chain, the true gradient of the deployed defence, rather than BPDA's identity surrogate.
    Purifiers unroll even inside :class:`BPDA`; the other layers keep BPDA's backward.
    """

    def _switch(self, model: nn.Module) -> AbstractContextManager[None]:
        from jeat.models import unrolled

        return unrolled(model)
