"""TLCM training math: segments, data-free teacher solves, the jumps; flow-matching (FLUX) and DDPM (SDXL) forms.

Time is the teacher's *unshifted* training timestep t in [0, T] (T = num_train_timesteps, 1000):
FLUX's sampling schedules are uniform in t and then shifted, sigma(t) = shift(t / T). So "equal
teacher steps", "--skip 20" and the M segment milestones t_i = i T / M all live on that uniform
axis, and the network sees sigma(t). With M = 8 the milestones' sigmas are exactly FLUX's 8-step
schedule, and the 2- and 4-step schedules are subsets of them (the released TLCM sampler's steps).

Flow matching: x_sigma = (1 - sigma) x0 + sigma eps, velocity v = eps - x0. The paper's DDIM step
becomes the Euler step x_s = x_t + (sigma_s - sigma_t) v, which equals (1 - sigma_s) x0_hat +
sigma_s eps_hat with the model's implied x0 and noise.

DDPM (SDXL, SD 1.x; the paper's own form): integer timesteps t in [0, T - 1], a_t = alphas_cumprod[t],
milestones floor(i (T - 1) / M) (0, 124, ..., 999), pure noise taken as z_{T-1}; the jump is the DDIM
step to a lower time with the model's x0 and its implied noise, and x0 carries no c_skip/c_out.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .solvers import (
    Coef,
    alpha_sigma,
    broadcast_like,
    ddim_jump,
    euler_step,
    flow_renoise,
    flow_x0,
    x0_eps_from_model_output,
    flux_mu,
    flux_shift,
    flux_sigmas,
    uniform_sigmas,
)

Velocity = Callable[[Tensor, Tensor], Tensor]  # v(z, sigma) with sigma of shape (B,)
Denoiser = Callable[[Tensor, Tensor], Tensor]  # DDPM model output (eps, v or x0) at (z, t), t of shape (B,), long


def flux_milestones(num_train_timesteps: int = 1000, num_segments: int = 8) -> Tensor:
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
    """sigma(t) = flux_shift(t / T): the config's resolution shift with mu, or its static shift when mu is None."""
    u = t.double() / scheduler_config.get("num_train_timesteps", 1000)
    return flux_shift(u, mu, float(scheduler_config.get("shift", 1.0)),
                      scheduler_config.get("time_shift_type", "exponential")).float()


def stage1_times(segment: int, batch_size: int, skip: float, num_train_timesteps: int, num_segments: int,
                 generator: torch.Generator | None = None, device=None,
                 milestones: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(t_m, t_n = t_m - skip, lower milestone): t_m = upper - j skip, j uniform, keeping t_n >= lower.

    milestones: the M + 1 segment boundaries, ascending (default: flux_milestones(T, M)).
    """
    edges = flux_milestones(num_train_timesteps, num_segments) if milestones is None else milestones
    lower, upper = float(edges[segment]), float(edges[segment + 1])
    choices = max(1, math.floor((upper - lower) / skip + 1e-9))
    j = torch.randint(0, choices, (batch_size,), generator=generator, device=generator.device if generator else None)
    t_m = (upper - j.double() * skip).to(device)
    return t_m, (t_m - skip).clamp_min(lower), torch.full_like(t_m, lower)


def stage2_times(batch_size: int, num_train_timesteps: int, num_segments: int,
                 generator: torch.Generator | None = None, device=None,
                 milestones: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(t_m, t_n): a milestone t_m = milestones[m] (default m T / M), m uniform in 1..M, and the milestone below it."""
    edges = flux_milestones(num_train_timesteps, num_segments) if milestones is None else milestones
    m = torch.randint(1, num_segments + 1, (batch_size,), generator=generator,
                      device=generator.device if generator else None).cpu()
    return edges[m].to(device), edges[m - 1].to(device)


def uniform_times(n: int, num_train_timesteps: int, generator: torch.Generator, device,
                  low: float = 0.02, high: float = 0.98) -> Tensor:
    """t ~ U[low T, high T] on the unshifted axis (DMD's re-noising range; the GAN's too, our choice)."""
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64).to(device)
    return (low + (high - low) * u) * num_train_timesteps


def equal_steps(t_from: Tensor, t_to: Tensor, num_steps: int) -> list[tuple[Tensor, Tensor]]:
    """[(t_k, t_{k+1}) for k < n], t_k = t_from + (t_to - t_from) k / n, per sample, in float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t_from, t_to = t_from.double(), t_to.double()
    times = [t_from + (t_to - t_from) * (k / num_steps) for k in range(num_steps + 1)]
    return list(zip(times[:-1], times[1:]))


def teacher_solve(velocity: Velocity, z: Tensor, t_from: Tensor, t_to: Tensor, num_steps: int,
                  sigma_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """num_steps Euler steps of equal size on the unshifted axis: t_k = t_from + (t_to - t_from) k / n."""
    t_from, t_to = broadcast_like(t_from, z[:, 0, 0]), broadcast_like(t_to, z[:, 0, 0])
    for t, s in equal_steps(t_from, t_to, num_steps):
        sigma_t, sigma_s = sigma_fn(t).to(z.device), sigma_fn(s).to(z.device)
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


def sampler_step(z: Tensor, v: Tensor, sigma: Coef, sigma_next: Coef,
                 noise: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
    """(z', x0) with x0 = z - sigma v, z' = (1 - sigma') x0 + sigma' noise(); z' = x0 when sigma' = 0."""
    x0 = flow_x0(z, v, sigma)
    if float(sigma_next) == 0.0:  # noise is a callable so that the last step draws none
        return x0, x0
    return flow_renoise(x0, noise(), sigma_next), x0


@torch.no_grad()
def self_sample(velocity: Velocity, noise: Tensor, sigmas: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The released TLCM sampler: sampler_step along `sigmas` with fresh N(0, I) noise; returns x0."""
    z = noise
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].expand(z.shape[0]).to(z.device)
        z, _ = sampler_step(z, velocity(z, sigma).float(), sigma, sigmas[i + 1],
                            lambda z=z: torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype))
        if float(sigmas[i + 1]) == 0.0:
            break
    return z


def tlcm_sigmas(num_steps: int, scheduler_config: dict, mu: float | None) -> Tensor:
    """The sampler's N + 1 sigmas: flux_sigmas(uniform_sigmas(N)) under the config's shifts (FLUX's schedule)."""
    return flux_sigmas(uniform_sigmas(num_steps), mu, float(scheduler_config.get("shift", 1.0)),
                       scheduler_config.get("time_shift_type", "exponential"),
                       scheduler_config.get("shift_terminal")).float()


# --- DDPM form (SDXL, SD 1.x) ------------------------------------------------------------------


def ddpm_x0(z: Tensor, model_output: Tensor, t: Tensor, alphas_cumprod: Tensor, prediction_type: str) -> Tensor:
    """f(z, t) = (z - sqrt(1 - a_t) eps) / sqrt(a_t) for eps-prediction (v and x0 alike): the x0 prediction."""
    alpha, sigma = alpha_sigma(alphas_cumprod, t)
    return x0_eps_from_model_output(model_output, z, alpha, sigma, prediction_type)[0]


def ddpm_jump(z: Tensor, model_output: Tensor, t: Tensor, s: Tensor, alphas_cumprod: Tensor,
              prediction_type: str) -> Tensor:
    """g(z, t) = DDIM(z, x0, t, s) = sqrt(a_s) x0 + sqrt(1 - a_s) (z - sqrt(a_t) x0) / sqrt(1 - a_t)."""
    return ddim_jump(z, model_output, *alpha_sigma(alphas_cumprod, t), *alpha_sigma(alphas_cumprod, s),
                     prediction_type)


def ddpm_solve(denoiser: Denoiser, z: Tensor, t_from: Tensor, t_to: Tensor, num_steps: int,
               alphas_cumprod: Tensor, prediction_type: str) -> Tensor:
    """num_steps DDIM steps t_k -> t_{k+1}, t_k = round(t_from + (t_to - t_from) k / n) on the integer axis."""
    for t, s in equal_steps(t_from, t_to, num_steps):
        t, s = t.round().long(), s.round().long()
        z = ddpm_jump(z, denoiser(z, t).float(), t, s, alphas_cumprod, prediction_type)
    return z


def ddpm_data_free_latents(denoiser: Denoiser, noise: Tensor, t_m: Tensor, num_steps: int,
                           alphas_cumprod: Tensor, prediction_type: str) -> Tensor:
    """z_{t_m} without data: pure noise taken as z_{T-1}, then num_steps equal teacher DDIM steps down to t_m."""
    top = len(alphas_cumprod) - 1
    if bool((t_m >= top).all()):  # t_m at the top: the noise itself (no step to take)
        return noise
    return ddpm_solve(denoiser, noise, torch.full_like(t_m, top), t_m, num_steps, alphas_cumprod, prediction_type)
