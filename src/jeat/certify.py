"""The WRM certificate (Sinha, Namkoong & Duchi, ICLR 2018) and the attacks it must bound.

For the transport cost ``c(x', x) = ||x' - x||_2^2`` and any ``gamma >= 0``, weak duality gives,
for every distribution ``P`` within Wasserstein distance ``rho`` of the data distribution
``P0``::

    E_P[loss] <= gamma * rho + E_P0[phi_gamma(x, y)],
    phi_gamma(x, y) = max_x' loss(x', y) - gamma * c(x', x).

``phi_gamma`` is computed per test point by :func:`jeat.objectives.wrm_ascent` (exact when the
loss is smooth and ``gamma`` exceeds its smoothness constant: the problem is then strongly
concave), so the bound is a line in ``rho``. :func:`wrm_certificate` evaluates it for a range
of ``rho`` and, next to it, the loss that our attacks reach at each transport budget: L2 PGD
with per-point radius ``sqrt(rho)`` (mean transport <= rho), and the Lagrangian attack with
other multipliers ``gamma'`` (each gives a point ``(mean transport, mean loss)``). No attack
may exceed the bound; one that does means the inner maximisation did not find the maximum
(a non-smooth model, or ``gamma`` too small).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from jeat.attacks import PGD, L2Ball, check_images, logits_of, model_mode
from jeat.energy import check_labels, cross_entropy_from_logits
from jeat.errors import JeatError

__all__ = ["AttackPoint", "WRMCertificate", "wrm_certificate"]


@dataclass
class AttackPoint:
    attack: str
    transport: float  # mean ||x' - x||^2 over the points
    loss: float  # mean cross-entropy at x'
    bound: float  # the certificate at this transport


@dataclass
class WRMCertificate:
    gamma: float
    phi_mean: float  # E[phi_gamma] on the points
    clean_loss: float
    rho: list[float]
    bound: list[float]
    attacks: list[AttackPoint] = field(default_factory=list)
    n: int = 0

    @property
    def violations(self) -> list[AttackPoint]:
        """Attack points above the certified loss (should be empty)."""
        return [a for a in self.attacks if a.loss > a.bound + 1e-6]

    def to_dict(self) -> dict:
        return {**asdict(self), "violations": [asdict(a) for a in self.violations]}

    def table(self) -> str:
        lines = [
            f"WRM certificate, gamma {self.gamma:g}, {self.n} points: "
            f"E[phi] = {self.phi_mean:.4f}, clean loss {self.clean_loss:.4f}",
            f"{'attack':<22}{'transport':>10}{'loss':>10}{'bound':>10}",
        ]
        for a in self.attacks:
            flag = "  VIOLATION" if a.loss > a.bound + 1e-6 else ""
            lines.append(f"{a.attack:<22}{a.transport:>10.4f}{a.loss:>10.4f}{a.bound:>10.4f}{flag}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """The certified bound against the attacks' losses, as a PNG (atomically)."""
        from jeat.utils import pyplot, save_figure

        fig, ax = pyplot().subplots(figsize=(4.8, 3.4), dpi=120)
        ax.plot(self.rho, self.bound, label=f"certificate (γ={self.gamma:g})")
        for kind, marker in (("pgd-l2", "o"), ("lagrangian", "s")):
            pts = [a for a in self.attacks if a.attack.startswith(kind)]
            if pts:
                ax.scatter([a.transport for a in pts], [a.loss for a in pts], marker=marker,
                           label=kind, zorder=3)  # fmt: skip
        ax.set_xlabel("transport budget ρ (mean ||x' - x||²)")
        ax.set_ylabel("mean cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path)


def _batches(x: Tensor, y: Tensor, batch_size: int, device: torch.device):
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)


def wrm_certificate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    gamma: float,
    rhos: list[float],
    steps: int = 100,
    attack_steps: int = 50,
    lagrangian_gammas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0),
    batch_size: int = 256,
    seed: int = 0,
) -> WRMCertificate:
    """The certificate ``gamma * rho + E[phi_gamma]`` for each ``rho`` and the losses our attacks
    reach at those transport budgets (see the module docstring)."""
    from jeat.objectives import wrm_ascent

    check_images(x, "test images")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise JeatError(f"the certificate's gamma must be a number > 0, got {gamma!r}")
    rhos = sorted(float(r) for r in rhos)
    if not rhos or any(not math.isfinite(r) or r <= 0 for r in rhos):
        raise JeatError(f"transport budgets rho must be numbers > 0, got {rhos}")
    device = next(model.parameters()).device
    with torch.no_grad(), model_mode(model, True):
        width = logits_of(model, x[:1].to(device)).shape[1]
    y = check_labels(y, width, len(x))

    def mean_loss_and_cost(make_adv) -> tuple[float, float, Tensor]:
        losses, costs = [], []
        for xb, yb in _batches(x, y, batch_size, device):
            xa = make_adv(xb, yb)
            with torch.no_grad(), model_mode(model, True):
                losses.append(cross_entropy_from_logits(logits_of(model, xa), yb, check=False))
            costs.append((xa - xb).flatten(1).pow(2).sum(1))
        loss, cost = torch.cat(losses), torch.cat(costs)
        return float(loss.mean()), float(cost.mean()), loss - gamma * cost

    clean, _, _ = mean_loss_and_cost(lambda xb, yb: xb)
    _, _, phi = mean_loss_and_cost(lambda xb, yb: wrm_ascent(model, xb, yb, gamma, steps))
    phi_mean = float(phi.mean())
    cert = WRMCertificate(
        gamma, phi_mean, clean, rhos, [gamma * r + phi_mean for r in rhos], n=len(x)
    )
    generator = torch.Generator(device=device)
    for rho in rhos:
        radius = math.sqrt(rho)
        attack = PGD(L2Ball(radius), steps=attack_steps, step_size=2.5 * radius / attack_steps)
        generator.manual_seed(seed)
        loss, cost, _ = mean_loss_and_cost(
            lambda xb, yb, a=attack: a(model, xb, yb, generator=generator, check=False)
        )
        cert.attacks.append(
            AttackPoint(f"pgd-l2 r={radius:.3g}", cost, loss, gamma * cost + phi_mean)
        )
    for g in lagrangian_gammas:
        loss, cost, _ = mean_loss_and_cost(
            lambda xb, yb, g=g: wrm_ascent(model, xb, yb, float(g), steps)
        )
        cert.attacks.append(
            AttackPoint(f"lagrangian γ'={g:g}", cost, loss, gamma * cost + phi_mean)
        )
    return cert
