import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from experts.flow_matching import euler_sample, flow_loss, interpolate, sample_time


def test_convention_matches_diffusers_flow_match_scheduler():
    """Our t is diffusers' sigma: x_t = (1 - t) x0 + t noise."""
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    timestep = scheduler.timesteps[4]
    sigma = timestep / 1000
    expected = scheduler.scale_noise(x0, timestep.reshape(1), noise)
    torch.testing.assert_close(interpolate(x0, noise, sigma.expand(3)), expected)


def test_euler_with_the_true_velocity_recovers_the_data():
    x0, noise = torch.randn(5, 16, 4), torch.randn(5, 16, 4)
    calls = []

    def velocity(x, t):
        calls.append(t)
        assert t.shape == (5,)
        return noise - x0  # straight paths: the velocity is constant

    torch.testing.assert_close(euler_sample(velocity, noise, steps=7), x0)
    assert len(calls) == 7 and calls[0][0] == 1.0 and calls[-1][0] > 0.0


def test_flow_loss_ignores_masked_elements():
    x0, noise = torch.zeros(2, 3, 1), torch.ones(2, 3, 1)
    velocity = torch.ones(2, 3, 1)  # exact
    velocity[1, 2] = 100.0  # wrong, but masked out
    mask = torch.ones(2, 3, 1, dtype=torch.bool)
    mask[1, 2] = False
    assert flow_loss(velocity, x0, noise, mask) == 0.0
    assert flow_loss(velocity, x0, noise) > 0.0


def test_training_times_lie_inside_the_unit_interval():
    t = sample_time(10_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.02


def test_beta_times_favour_the_noisy_end_as_pi0_does():
    """1 - t ~ 0.999 (1 - Beta(1.5, 1)): P(t > 0.9) = 1 - (1 - 0.1 / 0.999) ** 1.5 = 0.146, ten
    times the logit-normal's 0.014."""
    g = torch.Generator().manual_seed(0)
    beta = sample_time(100_000, torch.device("cpu"), g, "beta")
    middle = sample_time(100_000, torch.device("cpu"), g)
    assert beta.min() > 0 and beta.max() <= 1
    assert abs((beta > 0.9).float().mean().item() - 0.146) < 0.005
    assert abs(beta.mean().item() - (1 - 0.999 * 0.4)) < 0.005  # E[Beta(1.5, 1)] = 0.6
    assert (middle > 0.9).float().mean() < 0.02
    with pytest.raises(ValueError, match="'uniform'.*logit_normal"):
        sample_time(4, torch.device("cpu"), g, "uniform")
