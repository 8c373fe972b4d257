"""Consistency-model parameterisation: boundary-condition scalings, f(x, t), guidance embedding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from utils.solvers import Coef, broadcast_like, ddim_timesteps


def scalings_for_boundary_conditions(
    timestep: Coef, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[Coef, Coef]:
    """c_skip = sd^2 / ((t c)^2 + sd^2), c_out = (t c) / sqrt((t c)^2 + sd^2), c = timestep_scaling.

    c_out here deliberately omits the sigma_data factor of the consistency-models paper
    (c_out = sd (t c) / sqrt(...)): released LCMs and diffusers' LCMScheduler use this form, so
    we keep it for compatibility. c_skip(0) = 1, c_out(0) = 0 (the boundary condition f(x, 0) = x).
    """
    if isinstance(timestep, Tensor) and not timestep.is_floating_point():
        timestep = timestep.double()
    scaled = timestep * timestep_scaling
    denom = scaled**2 + sigma_data**2
    return sigma_data**2 / denom, scaled / denom**0.5


def consistency_fn(x_t: Tensor, x0_pred: Tensor, c_skip: Coef, c_out: Coef) -> Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t)."""
    return broadcast_like(c_skip, x_t) * x_t + broadcast_like(c_out, x_t) * x0_pred


def guidance_scale_embedding(
    w: Tensor, embedding_dim: int = 256, dtype: torch.dtype = torch.float32
) -> Tensor:
    """emb(w) = [sin(1000 w f_j) | cos(1000 w f_j)], f_j = exp(-log(10000) j / (half - 1)), j < half = dim // 2;
    zero-padded by one column if dim is odd. Shape (B, embedding_dim)."""
    if w.ndim != 1:
        raise ValueError(f"w must have shape (B,), got {tuple(w.shape)}")
    half = embedding_dim // 2
    if half < 2:
        raise ValueError(f"embedding_dim must be >= 4, got {embedding_dim}")
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * (-math.log(10000.0) / (half - 1)))
    args = (w * 1000.0).to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


@dataclass
class LCMSchedule:
    """The teacher's DDPM noise schedule and the skip grid of latent consistency distillation."""

    alphas_cumprod: Tensor  # a_t, t = 0..T-1
    grid: Tensor  # tau_i = i k - 1, i = 1..N (solvers.ddim_timesteps)
    k: int  # the grid's spacing T // N
    prediction_type: str  # the teacher's: epsilon, v_prediction or sample

    @classmethod
    def of_teacher(cls, alphas_cumprod: Tensor, num_ddim_timesteps: int, prediction_type: str) -> LCMSchedule:
        """The N-point skip grid over the teacher's T = len(alphas_cumprod) timesteps, on its device."""
        T = len(alphas_cumprod)
        return cls(alphas_cumprod, ddim_timesteps(T, num_ddim_timesteps).to(alphas_cumprod.device),
                   T // num_ddim_timesteps, prediction_type)


def trajectory_consistency_fn(x_t: Tensor, x0_pred: Tensor, alpha_t: Coef, sigma_t: Coef, alpha_s: Coef,
                              sigma_s: Coef) -> Tensor:
    """TCD's first-order f(x_t, t, s) = (sigma_s / sigma_t) x_t + (alpha_s - alpha_t sigma_s / sigma_t) x0_pred.

    The exponential-integrator (DDIM) step t -> s from the x0 prediction: f(x, t, t) = x for any x0_pred, and
    f = x0_pred where alpha_s = 1, sigma_s = 0. TCDScheduler takes the same step when it samples.
    """
    ratio = broadcast_like(sigma_s, x_t) / broadcast_like(sigma_t, x_t)
    return ratio * x_t + (broadcast_like(alpha_s, x_t) - broadcast_like(alpha_t, x_t) * ratio) * x0_pred


TARGET_TIMESTEPS = ("uniform", "zero")  # how TCD draws its target time s (train_tcd_lora.py --target_timestep)


def draw_target_timesteps(t_prev: torch.LongTensor, mode: str, gen: torch.Generator) -> torch.LongTensor:
    """s ~ U{0, ..., t_prev} per sample (mode "uniform"), or s = 0 (mode "zero": LCM's target time)."""
    if mode == "zero":
        return torch.zeros_like(t_prev)
    if mode != "uniform":
        raise ValueError(f"unknown target timestep mode {mode!r}; allowed: {', '.join(TARGET_TIMESTEPS)}")
    u = torch.rand(t_prev.shape, device=t_prev.device, generator=gen)
    return torch.minimum((u * (t_prev + 1)).long(), t_prev)  # the minimum guards a float rounding up to t_prev + 1
