"""ODE solvers and parameterisation conversions (DESIGN.md section 3; TLCM.md "FLUX form").

DDPM notation: a_t = alphas_cumprod[t], alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t),
x_t = alpha_t x0 + sigma_t eps.  Flow matching (FLUX): x_t = (1 - sigma) x0 + sigma eps,
v = eps - x0.  Per-sample coefficients of shape (B,) broadcast against latents of shape
(B, C, H, W) or (B, L, D); python floats are accepted wherever a coefficient is.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

Coef = Tensor | float


def append_dims(x: Tensor, target_ndim: int) -> Tensor:
    """x[(...,) + (None,) * (target_ndim - x.ndim)]: trailing singleton dims so (B,) broadcasts to (B, ...)."""
    missing = target_ndim - x.ndim
    if missing < 0:
        raise ValueError(f"append_dims: input has {x.ndim} dims, more than target_ndim={target_ndim}")
    return x[(...,) + (None,) * missing]


def broadcast_like(c: Coef, ref: Tensor) -> Coef:
    """c -> append_dims(c, ref.ndim) in ref's dtype/device if c is a tensor; python floats pass through."""
    if isinstance(c, Tensor):
        return append_dims(c, ref.ndim).to(device=ref.device, dtype=ref.dtype)
    return c


# --- DDPM / DDIM (eps-, v- and x0-prediction models) -------------------------------------------


def ddim_timesteps(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> torch.LongTensor:
    """Skip grid tau_i = i*k - 1, i = 1..N, k = T // N (19, 39, ..., 999 for T=1000, N=50)."""
    T, N = int(num_train_timesteps), int(num_ddim_timesteps)
    if N < 1 or N > T:
        raise ValueError(
            f"num_ddim_timesteps must be in [1, num_train_timesteps={T}], got {N}"
        )
    k = T // N
    return torch.arange(1, N + 1, dtype=torch.long) * k - 1


def previous_timestep(t: torch.LongTensor, k: int) -> torch.LongTensor:
    """s = max(t - k, 0), elementwise (the previous point of the skip grid)."""
    return torch.clamp(t - k, min=0)


def alpha_sigma(alphas_cumprod: Tensor, t: torch.LongTensor) -> tuple[Tensor, Tensor]:
    """alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t) with a_t = alphas_cumprod[t]; shape of t (B,).

    At t = 0 this gives a_0 (not 1.0): the final DDIM step lands on alpha_0 x0 + sigma_0 eps.
    """
    a_t = alphas_cumprod.to(t.device)[t.long()]
    return a_t.sqrt(), (1.0 - a_t).sqrt()


def x0_eps_from_model_output(
    model_output: Tensor, x_t: Tensor, alpha: Coef, sigma: Coef, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """(x0, eps) from a model output: eps-pred x0 = (x - sigma eps)/alpha; v-pred x0 = alpha x - sigma v,
    eps = sigma x + alpha v; x0-pred ("sample") eps = (x - alpha x0)/sigma."""
    a, s = broadcast_like(alpha, x_t), broadcast_like(sigma, x_t)
    if prediction_type == "epsilon":
        eps = model_output
        return (x_t - s * eps) / a, eps
    if prediction_type == "v_prediction":
        v = model_output
        return a * x_t - s * v, s * x_t + a * v
    if prediction_type == "sample":
        x0 = model_output
        return x0, (x_t - a * x0) / s
    raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")


def model_output_from_x0_eps(
    x0: Tensor, eps: Tensor, alpha: Coef, sigma: Coef, prediction_type: str
) -> Tensor:
    """Inverse conversion: epsilon -> eps; v_prediction -> v = alpha eps - sigma x0; sample -> x0."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return broadcast_like(alpha, x0) * eps - broadcast_like(sigma, x0) * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")


def ddim_step(x0: Tensor, eps: Tensor, alpha_s: Coef, sigma_s: Coef) -> Tensor:
    """DDIM step (eta = 0): x_s = alpha_s x0 + sigma_s eps."""
    return broadcast_like(alpha_s, x0) * x0 + broadcast_like(sigma_s, x0) * eps


def cfg(cond: Tensor, uncond: Tensor, w: Coef) -> Tensor:
    """Classifier-free guidance, LCM convention: p = p_c + w (p_c - p_u) (classic scale w + 1)."""
    return cond + broadcast_like(w, cond) * (cond - uncond)


# --- Flow matching (FLUX) ----------------------------------------------------------------------


def flow_x0(x_t: Tensor, v: Tensor, sigma: Coef) -> Tensor:
    """x0 = x_t - sigma v (flow matching, v = eps - x0)."""
    return x_t - broadcast_like(sigma, x_t) * v


def flow_eps(x_t: Tensor, v: Tensor, sigma: Coef) -> Tensor:
    """eps = x_t + (1 - sigma) v (flow matching, v = eps - x0)."""
    return x_t + (1.0 - broadcast_like(sigma, x_t)) * v


def euler_step(x_t: Tensor, v: Tensor, sigma_t: Coef, sigma_s: Coef) -> Tensor:
    """Euler step of the flow ODE: x_s = x_t + (sigma_s - sigma_t) v."""
    return x_t + (broadcast_like(sigma_s, x_t) - broadcast_like(sigma_t, x_t)) * v


def flow_renoise(x0: Tensor, eps: Tensor, sigma: Coef) -> Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps."""
    s = broadcast_like(sigma, x0)
    return (1.0 - s) * x0 + s * eps


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu = base_shift + (max_shift - base_shift) (L - base_seq_len) / (max_seq_len - base_seq_len)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def time_shift(sigma: Coef, mu: float) -> Coef:
    """sigma' = e^mu / (e^mu + (1/sigma - 1)) for sigma in (0, 1]; sigma = 0 -> 0."""
    e_mu = math.exp(mu)
    if not isinstance(sigma, Tensor):
        return 0.0 if sigma == 0 else e_mu / (e_mu + (1.0 / sigma - 1.0))
    positive = sigma > 0
    safe = torch.where(positive, sigma, torch.ones_like(sigma))
    return torch.where(positive, e_mu / (e_mu + (1.0 / safe - 1.0)), torch.zeros_like(sigma))


def flux_sigmas(
    num_steps: int, image_seq_len: int, *, dtype: torch.dtype = torch.float32, **shift_kwargs: float
) -> Tensor:
    """sigmas = time_shift(linspace(1, 1/N, N), flux_mu(L)) followed by 0: N + 1 values (FluxPipeline's)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    shifted = time_shift(base, flux_mu(image_seq_len, **shift_kwargs))
    return torch.cat([shifted, shifted.new_zeros(1)]).to(dtype)
