"""A decision-based attack: HopSkipJump (Chen, Jordan & Wainwright, IEEE S&P 2020).

It reads only the model's decision (the predicted class), never a score or a gradient, so it
is the attack for a model whose outputs carry no usable score: hard labels, votes, a softmax
saturated to one-hot. Written here from the paper (no reference implementation is a
dependency of this project; torchattacks 3.5.1 has none), batched over points:

1. **Start**: for each point, a uniform random image that the model misclassifies (up to
   ``init_tries`` draws), then a binary search on the segment to the clean point.
2. **Boundary**: a binary search towards the clean point to the decision boundary: on the
   segment ``(1 - a) x + a x_adv`` for L2, on the L-inf ball ``clip(x_adv - x, -a, a)`` for
   L-inf, until the interval is below ``theta`` (``d^-3/2`` for L2, ``d^-2`` for L-inf, in the
   units of the respective distance; ``d`` the input dimension).
3. **Gradient direction**: Monte-Carlo estimate at the boundary point from ``B_t = B_0 sqrt(t)``
   random unit directions ``u_b`` (at most ``max_batch``): ``sum_b (phi_b - mean(phi)) u_b`` with
   ``phi = +1`` adversarial, ``-1`` not, probed at distance ``delta_t = sqrt(d) theta d_{t-1}``
   (L2) or ``d theta d_{t-1}`` (L-inf), ``d_{t-1}`` the previous distance (the paper's choice).
4. **Step**: along the estimate (normalised for L2, its sign for L-inf) with the geometric
   step ``xi_t = ||x_t - x||_2 / sqrt(t)``, halved until the point is adversarial again.

Repeated until every point has used ``n_queries`` queries (the attack's budget per point;
the default 1,000 is where HopSkipJump's L2 and L-inf curves in the paper have levelled off on
MNIST/CIFAR-sized inputs). The answer is projected onto the threat model: a point whose
adversarial iterate lies farther than ``eps`` gets the projected point, which the table then
checks (it breaks the point only if the projection still fools the model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from jeat.attacks.base import checked_inputs, logits_of, model_mode
from jeat.attacks.threats import ThreatModel
from jeat.errors import JeatError

__all__ = ["HopSkipJump"]


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


@dataclass
class HopSkipJump:
    """HopSkipJump, untargeted, L2 or L-inf (the threat's norm); see the module notes.
    ``n_queries`` is the budget per point; ``init_evals`` is ``B_0``; ``generator`` draws
    every random number (the model's own randomness aside)."""

    threat: ThreatModel
    n_queries: int = 1000
    init_evals: int = 100
    max_batch: int = 1000
    init_tries: int = 100
    gamma: float = 1.0

    def __post_init__(self) -> None:
        if self.threat.norm not in ("linf", "l2"):
            raise JeatError(f"HopSkipJump supports L-inf and L2 threats, not '{self.threat.norm}'")
        for name in ("n_queries", "init_evals", "max_batch", "init_tries"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise JeatError(f"HopSkipJump: {name} must be an integer >= 1, got {value!r}")

    # -- the model's decision ------------------------------------------------------------------
    def _adversarial(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            return logits_of(model, x.clamp(0.0, 1.0)).argmax(1) != y

    def _distance(self, a: Tensor, b: Tensor) -> Tensor:
        diff = (a - b).flatten(1)
        return diff.abs().amax(1) if self.threat.norm == "linf" else diff.norm(dim=1)

    def _blend(self, x: Tensor, x_adv: Tensor, alpha: Tensor) -> Tensor:
        """The point ``alpha`` of the way from ``x`` to ``x_adv`` (L2: on the segment; L-inf:
        ``x_adv`` clipped into the L-inf ball of radius ``alpha`` around ``x``)."""
        a = _view(alpha, x)
        if self.threat.norm == "l2":
            return (1 - a) * x + a * x_adv
        return torch.minimum(torch.maximum(x_adv, x - a), x + a)

    def _boundary(
        self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, theta: float
    ) -> tuple[Tensor, int]:
        """Binary search from ``x_adv`` (adversarial) towards ``x``: the adversarial end of the
        final interval, and the queries it took."""
        if self.threat.norm == "l2":
            high = torch.ones(len(x), device=x.device, dtype=x.dtype)
            tol = torch.full_like(high, theta)
        else:
            high = self._distance(x_adv, x)
            tol = (high * theta).clamp_min(1e-12)
        low = torch.zeros_like(high)
        queries = 0
        while bool(((high - low) > tol).any()) and queries < 64:
            mid = (high + low) / 2
            adv = self._adversarial(model, self._blend(x, x_adv, mid), y)
            queries += 1
            high = torch.where(adv, mid, high)
            low = torch.where(adv, low, mid)
        return self._blend(x, x_adv, high), queries

    # -- the attack ----------------------------------------------------------------------------
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
            return self._run(model, x, y, generator)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator | None) -> Tensor:
        d = x[0].numel()
        linf = self.threat.norm == "linf"
        theta = self.gamma / (d * d) if linf else self.gamma / (d * math.sqrt(d))
        out = x.clone()
        # 1. a misclassified start for every point (uniform noise), points already fooled
        #    keep their own image
        start = x.clone()
        found = self._adversarial(model, x, y)
        used = 1
        for _ in range(self.init_tries):
            if bool(found.all()):
                break
            noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            adv = self._adversarial(model, noise, y) & ~found
            start[adv] = noise[adv]
            found |= adv
            used += 1
        if not bool(found.any()):
            return out
        idx = found.nonzero().squeeze(1)
        xs, ys, cur = x[idx], y[idx], start[idx]
        cur, q = self._boundary(model, xs, ys, cur, theta)
        used += q
        dist = self._distance(cur, xs)
        best, best_dist = cur.clone(), dist.clone()  # the closest adversarial point so far
        t = 0
        while used < self.n_queries:
            t += 1
            # 3. gradient direction at the boundary point
            if t == 1:  # the first probe radius, as in the paper's code: 0.1 of the range
                delta = torch.full_like(dist, 0.1)
            else:
                delta = (d * theta if linf else math.sqrt(d) * theta) * dist
            evals = int(min(self.init_evals * math.sqrt(t), self.max_batch))
            evals = max(2, min(evals, self.n_queries - used))
            signed = torch.zeros_like(cur)  # sum_b phi_b u_b
            total = torch.zeros_like(cur)  # sum_b u_b
            mean_phi = torch.zeros(len(cur), device=x.device, dtype=x.dtype)
            for _ in range(evals):
                u = torch.randn(cur.shape, generator=gen, device=x.device, dtype=x.dtype)
                u = u / _view(u.flatten(1).norm(dim=1).clamp_min(1e-12), u)
                probe = (cur + _view(delta, cur) * u).clamp(0.0, 1.0)
                phi = self._adversarial(model, probe, ys).to(x.dtype) * 2 - 1
                signed += _view(phi, cur) * u
                total += u
                mean_phi += phi / evals
            used += evals
            # sum_b (phi_b - mean phi) u_b: the estimate with its baseline (the paper's
            # variance reduction); a positive scale does not change the direction
            grad = signed - _view(mean_phi, cur) * total
            if linf:
                direction = grad.sign()
            else:
                direction = grad / _view(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)
            # 4. geometric step, halved until adversarial again
            step = self._distance(cur, xs) / math.sqrt(t)
            todo = torch.ones(len(cur), dtype=torch.bool, device=x.device)
            nxt = cur.clone()
            for _ in range(20):
                if not bool(todo.any()) or used >= self.n_queries:
                    break
                cand = (cur + _view(step, cur) * direction).clamp(0.0, 1.0)
                adv = self._adversarial(model, cand, ys)
                used += 1
                take = todo & adv
                nxt[take] = cand[take]
                todo &= ~adv
                step = torch.where(todo, step / 2, step)
            # 2. back to the boundary
            cur, q = self._boundary(model, xs, ys, nxt, theta)
            used += q
            dist = self._distance(cur, xs)
            closer = dist < best_dist
            best[closer], best_dist[closer] = cur[closer], dist[closer]
        out[idx] = self.threat.project(best, xs)
        return out
