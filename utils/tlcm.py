"""TLCM training math for flow-matching models (FLUX): segments, data-free teacher solves, the jumps.

Time is the teacher's *unshifted* training timestep t in [0, T] (T = num_train_timesteps, 1000):
FLUX's sampling schedules are uniform in t and then shifted, sigma(t) = shift(t / T). So "equal
teacher steps", "--skip 20" and the M segment milestones t_i = i T / M all live on that uniform
axis, and the network sees sigma(t). With M = 8 the milestones' sigmas are exactly FLUX's 8-step
schedule, and the 2- and 4-step schedules are subsets of them (the released TLCM sampler's steps).

Flow matching: x_sigma = (1 - sigma) x0 + sigma eps, velocity v = eps - x0. The paper's DDIM step
becomes the Euler step x_s = x_t + (sigma_s - sigma_t) v, which equals (1 - sigma_s) x0_hat +
sigma_s eps_hat with the model's implied x0 and noise (TLCM.md, "FLUX form").
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .solvers import broadcast_like, euler_step, flow_renoise, flow_x0, flux_mu, time_shift

Velocity = Callable[[Tensor, Tensor], Tensor]  # v(z, sigma) with sigma of shape (B,)


def milestones(num_train_timesteps: int = 1000, num_segments: int = 8) -> Tensor:
    """Segment boundaries on the unshifted axis: t_i = i T / M for i = 0..M (float64)."""
    return torch.arange(num_segments + 1, dtype=torch.float64) * (num_train_timesteps / num_segments)


def schedule_mu(scheduler_config: dict, image_seq_len: int) -> float | None:
    """FLUX's resolution-dependent shift mu for `image_seq_len` tokens, or None for a static shift."""
    if not scheduler_config.get("use_dynamic_shifting", False):
        return None
    return flux_mu(image_seq_len, scheduler_config.get("base_image_seq_len", 256),
                   scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                   scheduler_config.get("max_shift", 1.15))


def sigma_of_t(t: Tensor, scheduler_config: dict, mu: float | None) -> Tensor:
    """sigma(t) = e^mu / (e^mu + T/t - 1) (dynamic shift) or s u / (1 + (s - 1) u), u = t / T (static shift s)."""
    u = t.double() / scheduler_config.get("num_train_timesteps", 1000)
    if mu is not None:
        return time_shift(u, mu).float()
    s = float(scheduler_config.get("shift", 1.0))
    return (s * u / (1 + (s - 1) * u)).float()


def stage1_times(segment: int, batch_size: int, skip: float, num_train_timesteps: int, num_segments: int,
                 generator: torch.Generator | None = None, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """(t_m, t_n = t_m - skip, lower milestone): t_m = upper - j skip, j uniform, keeping t_n >= lower."""
    edges = milestones(num_train_timesteps, num_segments)
    lower, upper = float(edges[segment]), float(edges[segment + 1])
    choices = max(1, math.floor((upper - lower) / skip + 1e-9))
    j = torch.randint(0, choices, (batch_size,), generator=generator, device=generator.device if generator else None)
    t_m = (upper - j.double() * skip).to(device)
    return t_m, (t_m - skip).clamp_min(lower), torch.full_like(t_m, lower)


def stage2_times(batch_size: int, num_train_timesteps: int, num_segments: int,
                 generator: torch.Generator | None = None, device=None) -> tuple[Tensor, Tensor]:
    """(t_m, t_n): a milestone t_m = m T / M, m uniform in 1..M, and the milestone below it."""
    edges = milestones(num_train_timesteps, num_segments)
    m = torch.randint(1, num_segments + 1, (batch_size,), generator=generator,
                      device=generator.device if generator else None).cpu()
    return edges[m].to(device), edges[m - 1].to(device)


def teacher_solve(velocity: Velocity, z: Tensor, t_from: Tensor, t_to: Tensor, num_steps: int,
                  sigma_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """num_steps Euler steps of equal size on the unshifted axis: t_k = t_from + (t_to - t_from) k / n."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t_from, t_to = broadcast_like(t_from, z[:, 0, 0]).double(), broadcast_like(t_to, z[:, 0, 0]).double()
    for k in range(num_steps):
        sigma_t = sigma_fn(t_from + (t_to - t_from) * (k / num_steps)).to(z.device)
        sigma_s = sigma_fn(t_from + (t_to - t_from) * ((k + 1) / num_steps)).to(z.device)
        z = euler_step(z, velocity(z, sigma_t).float(), sigma_t, sigma_s)
    return z


def data_free_latents(velocity: Velocity, noise: Tensor, t_m: Tensor, num_steps: int,
                      sigma_fn: Callable[[Tensor], Tensor], num_train_timesteps: int = 1000) -> Tensor:
    """z_{t_m} without data: from pure noise at t = T, num_steps equal teacher steps down to t_m."""
    if bool((t_m >= num_train_timesteps).all()):  # t_m at the top: the noise itself (no step to take)
        return noise
    return teacher_solve(velocity, noise, torch.full_like(t_m, float(num_train_timesteps)), t_m, num_steps, sigma_fn)


def jump(z: Tensor, v: Tensor, sigma_t: Tensor, sigma_target: Tensor) -> Tensor:
    """g(z, t) = (1 - sigma') x0_hat + sigma' eps_hat = z + (sigma' - sigma_t) v: the jump to sigma' (0: x0)."""
    return euler_step(z, v, sigma_t, sigma_target)


@torch.no_grad()
def self_sample(velocity: Velocity, noise: Tensor, sigmas: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The released TLCM sampler: x0 = z - sigma_i v, z <- (1 - sigma_{i+1}) x0 + sigma_{i+1} eps_new; returns x0."""
    z = noise
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].expand(z.shape[0]).to(z.device)
        x0 = flow_x0(z, velocity(z, sigma).float(), sigma)
        if float(sigmas[i + 1]) == 0.0:
            return x0
        fresh = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = flow_renoise(x0, fresh, sigmas[i + 1].to(z.device))
    return z


def tlcm_sigmas(num_steps: int, scheduler_config: dict, mu: float | None) -> Tensor:
    """The sampler's sigmas: sigma(t) on linspace(T, T / N, N), then 0 (FLUX's schedule; N + 1 values)."""
    T = scheduler_config.get("num_train_timesteps", 1000)
    t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64) * T
    return torch.cat([sigma_of_t(t, scheduler_config, mu), torch.zeros(1)])
