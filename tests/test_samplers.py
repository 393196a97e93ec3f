import pytest
import torch
from torch import nn

from jeat import JeatError
from jeat.samplers import SGLD, ReplayBuffer, SeededDescent, descend, fit_class_gaussians


class Quadratic(nn.Module):
    """One logit f(x) = -||x - mu||^2 / 2, so E(x) = -logsumexp f(x) = ||x - mu||^2 / 2."""

    def __init__(self, mu):
        super().__init__()
        self.register_buffer("mu", mu)

    def forward(self, x):
        return -0.5 * (x - self.mu).flatten(1).pow(2).sum(1, keepdim=True)


def test_sgld_on_a_quadratic_energy_reaches_its_mean_and_variance():
    torch.manual_seed(0)
    mu = torch.rand(1, 1, 4, 4) * 0.4 + 0.3  # inside [0, 1], away from the clamps
    model = Quadratic(mu)
    eta, sigma = 0.1, 0.02
    x0 = torch.rand(2000, 1, 4, 4)
    x = SGLD(steps=300, step_size=eta, noise=sigma)(model, x0)
    assert torch.allclose(x.mean(0), mu[0], atol=0.005)
    # stationary variance of x <- x - eta (x - mu) + sigma xi is sigma^2 / (2 eta - eta^2)
    expected = sigma**2 / (2 * eta - eta**2)
    assert x.var(0).mean().item() == pytest.approx(expected, rel=0.1)


def test_sgld_clamps_to_the_input_range():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = SGLD(steps=10, step_size=50.0, noise=1.0)(model, torch.rand(8, 1, 4, 4))
    assert x.min() >= 0 and x.max() <= 1


def test_buffer_reinit_rate_and_class_partitions():
    g = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(1000, (1, 2, 2), num_classes=10, reinit_freq=0.05, generator=g)
    buf.x.fill_(-1.0)  # mark every stored chain, so a restart is visible
    x, idx = buf.sample(20000, generator=g)
    restarted = (x != -1.0).flatten(1).all(1).float().mean().item()
    assert restarted == pytest.approx(0.05, abs=0.006)
    y = torch.randint(0, 10, (500,), generator=g)
    x, idx = buf.sample(500, y, generator=g)
    assert torch.equal(idx % 10, y) and torch.equal(buf.labels[idx], y)
    buf.update(idx, torch.full_like(x, 0.5))
    assert (buf.x[idx] == 0.5).all()


def test_buffer_state_round_trips_and_checks_shape():
    buf = ReplayBuffer(100, (1, 2, 2), num_classes=10)
    other = ReplayBuffer(100, (1, 2, 2), num_classes=10)
    other.load_state_dict(buf.state_dict())
    assert torch.equal(other.x, buf.x)
    with pytest.raises(JeatError, match="same buffer settings"):
        ReplayBuffer(200, (1, 2, 2), num_classes=10).load_state_dict(buf.state_dict())
    with pytest.raises(JeatError, match="re-init rate"):
        ReplayBuffer(100, (1, 2, 2), num_classes=10, reinit_freq=1.5)


def test_gaussian_buffer_init_uses_class_seeds(digits):
    seeds = fit_class_gaussians(digits.x_train, digits.y_train, 10)
    buf = ReplayBuffer(1000, (1, 8, 8), 10, init="gaussian", seeds=seeds)
    for k in (0, 7):
        real = digits.x_train[digits.y_train == k].mean(0)
        assert (buf.x[buf.labels == k].mean(0) - real).abs().mean() < 0.05


def test_seeded_descent_stays_in_its_ball_and_lowers_the_class_energy_gap():
    from jeat.energy import cross_entropy_from_logits

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    seeds = torch.rand(20, 1, 8, 8)
    labels = torch.arange(20) % 10
    out = SeededDescent(steps=20, radius=1.0)(model, seeds, labels)
    assert ((out - seeds).flatten(1).norm(dim=1) <= 1.0 + 1e-5).all()
    with torch.no_grad():
        assert (
            cross_entropy_from_logits(model(out), labels).mean()
            < cross_entropy_from_logits(model(seeds), labels).mean()
        )


def test_descend_leaves_model_and_grads_alone():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    descend(model, torch.rand(3, 1, 2, 2), lambda lg, y: lg.sum(1), lambda x, g: x - g, 3)
    assert model.training and all((p.grad == 1).all() for p in model.parameters())


def test_class_gaussian_seeds_never_copy_a_covariance_factor_per_seed():
    """Filling a CIFAR-sized replay buffer (768-dim Gaussians at 16x16x3) must not materialise
    a 768 x 768 Cholesky factor per seed (10,000 seeds: 23.6 GB); every draw is still
    ``mu_y + L_y z``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    torch.manual_seed(0)
    x, y = torch.rand(300, 3, 32, 32), torch.arange(300) % 10
    gauss = fit_class_gaussians(x, y, 10)
    labels = torch.arange(400) % 10
    with Largest() as spy:
        seeds = gauss.sample(labels, torch.Generator().manual_seed(1))
    assert seeds.shape == (400, 3, 32, 32)
    assert spy.numel <= seeds.numel()  # nothing bigger than the output (a per-seed copy: 60x)
    z = torch.randn(400, 768, generator=torch.Generator().manual_seed(1))
    low = torch.stack([gauss.means[c] + gauss.chol[c] @ z[i] for i, c in enumerate(labels)])
    up = nn.functional.interpolate(low.view(-1, 3, 16, 16), size=(32, 32), mode="bilinear")
    assert torch.allclose(seeds, up.clamp(0, 1), atol=1e-5)
