"""The one flow-matching convention of the project, used by the world model and the action expert.

Time runs from data to noise: t = 0 is data, t = 1 is pure Gaussian noise, and

    x_t = (1 - t) * x_0 + t * noise        the model predicts the velocity  v = noise - x_0

which is diffusers' `FlowMatchEulerDiscreteScheduler` convention (its sigma is our t; its
timesteps are 1000 * t). Sampling integrates dx/dt = v from t = 1 down to t = 0 with Euler steps.
Everything here is stateless, so one call can carry many candidates in its batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TIMESTEP_SCALE = 1000.0  # diffusers models embed timesteps given on a 0..1000 scale


TIME_DISTRIBUTIONS = ("logit_normal", "beta")


def sample_time(
    batch: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    distribution: str = "logit_normal",
):
    """Training times t in (0, 1), (batch,).

    "logit_normal" favours the middle, where an image's velocity is hardest to predict (Esser et
    al. 2024, the SD3 paper). "beta" favours the noisy end, 1 - t ~ 0.999 * (1 - Beta(1.5, 1))
    (Black et al. 2024, the pi0 paper): there the sample's mode is chosen, and only the
    conditioning can choose it; an action model trained mostly mid-way learns the actions'
    spread across observations and picks a mode by its noise instead."""
    if distribution == "logit_normal":
        normal = torch.randn(batch, device=device, generator=generator)
        return torch.sigmoid(normal).clamp(1e-4, 1 - 1e-4)
    if distribution == "beta":
        # Beta(1.5, 1) by inversion: its CDF is x^1.5
        uniform = torch.rand(batch, device=device, generator=generator)
        return 1 - 0.999 * (1 - uniform ** (1 / 1.5))
    raise ValueError(f"time distribution {distribution!r}: expected one of {TIME_DISTRIBUTIONS}")


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for data x0 (B, ...), noise like x0, and t (B,)."""
    t = t.reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def flow_loss(
    velocity: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity (noise - x0), averaged over
    the elements where `mask` (broadcastable to x0) is True."""
    error = (velocity - (noise - x0)).square()
    if mask is None:
        return error.mean()
    mask = mask.expand_as(error).to(error.dtype)
    return (error * mask).sum() / mask.sum().clamp_min(1.0)


def prefix_length(prefix: torch.Tensor | None, horizon: int) -> int:
    """d, the steps a fixed prefix (B, d, ...) of a chunk of `horizon` steps holds (0 for None);
    a prefix longer than the chunk is an error."""
    d = 0 if prefix is None else prefix.shape[1]
    if not 0 <= d <= horizon:
        raise ValueError(f"prefix: at most {horizon} actions, got {d}")
    return d


def inpaint(velocity: torch.Tensor, noise: torch.Tensor, prefix: torch.Tensor | None):
    """The velocity (B, H, ...) with its first d steps replaced by the straight path from the
    initial `noise` (B, H, ...) to the fixed `prefix` (B, d, ...): velocity noise - prefix, so
    Euler integration from that noise ends exactly on the prefix (actions already committed),
    and at every step the model reads them at the noise level of the rest. None: unchanged."""
    if prefix is None or not prefix.shape[1]:
        return velocity
    d = prefix.shape[1]
    return torch.cat([noise[:, :d] - prefix, velocity[:, d:]], 1)


def euler_sample(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """Integrate from x_1 = noise to x_0 in `steps` equal Euler steps.

    velocity_fn(x_t, t) -> v, with x_t like `noise` and t of shape (B,).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = noise
    times = torch.linspace(1.0, 0.0, steps + 1, device=noise.device, dtype=noise.dtype)
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        v = velocity_fn(x, t.expand(x.shape[0]))
        x = x + (t_next - t) * v  # dt < 0: towards the data
    return x
