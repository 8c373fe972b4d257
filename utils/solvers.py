"""ODE solvers, parameterisation conversions and the FLUX sigma schedule.

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
TIME_SHIFT_TYPES = ("exponential", "linear")  # the resolution shifts of diffusers' flow-matching schedulers

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


MIN_ALPHAS_CUMPROD = 2.0**-24  # what diffusers' samplers set a zero-terminal-SNR schedule's last a_t to


def clamp_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """a_t = max(a_t, 2^-24): a zero-terminal-SNR schedule (rescale_betas_zero_snr) has a_T = 0, where an eps
    prediction's x0 = (x - sigma eps) / alpha divides by zero."""
    return alphas_cumprod.clamp(min=MIN_ALPHAS_CUMPROD)


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


def ddim_jump(z: Tensor, model_output: Tensor, alpha_t: Coef, sigma_t: Coef, alpha_s: Coef, sigma_s: Coef,
              prediction_type: str) -> Tensor:
    """DDIM(z, x0, t, s) = alpha_s x0 + sigma_s (z - alpha_t x0) / sigma_t, with x0 the model output's at (z, t)."""
    x0, eps = x0_eps_from_model_output(model_output, z, alpha_t, sigma_t, prediction_type)
    return ddim_step(x0, eps, alpha_s, sigma_s)


def cfg(cond: Tensor, uncond: Tensor, w: Coef) -> Tensor:
    """Classifier-free guidance, LCM convention: p = p_c + w (p_c - p_u) (classic scale w + 1)."""
    return cond + broadcast_like(w, cond) * (cond - uncond)


def ddim_cfg_step(
    out_cond: Tensor,
    out_uncond: Tensor,
    x_t: Tensor,
    w: Coef,
    alpha_t: Coef,
    sigma_t: Coef,
    alpha_s: Coef,
    sigma_s: Coef,
    prediction_type: str,
) -> Tensor:
    """x_s = alpha_s cfg(x0_c, x0_u, w) + sigma_s cfg(eps_c, eps_u, w): the guided DDIM step t -> s."""
    x0_c, eps_c = x0_eps_from_model_output(out_cond, x_t, alpha_t, sigma_t, prediction_type)
    x0_u, eps_u = x0_eps_from_model_output(out_uncond, x_t, alpha_t, sigma_t, prediction_type)
    return ddim_step(cfg(x0_c, x0_u, w), cfg(eps_c, eps_u, w), alpha_s, sigma_s)


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


def linear_time_shift(sigma: Tensor, mu: float) -> Tensor:
    """sigma' = mu / (mu + (1/sigma - 1)) for sigma in (0, 1]; sigma = 0 -> 0."""
    positive = sigma > 0
    safe = torch.where(positive, sigma, torch.ones_like(sigma))
    return torch.where(positive, mu / (mu + (1.0 / safe - 1.0)), torch.zeros_like(sigma))


def static_shift(sigma: Coef, shift: float) -> Coef:
    """sigma' = s sigma / (1 + (s - 1) sigma), the fixed shift s (= time_shift(sigma, log s))."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flux_shift(sigma: Tensor, mu: float | None, shift: float = 1.0, time_shift_type: str = "exponential") -> Tensor:
    """sigma' = time_shift(sigma, mu) (or linear_time_shift) given mu, else static_shift(sigma, shift)."""
    if time_shift_type not in TIME_SHIFT_TYPES:
        raise ValueError(f"time_shift_type must be one of {', '.join(TIME_SHIFT_TYPES)}; got {time_shift_type!r}")
    if mu is None:
        return static_shift(sigma, shift)
    if time_shift_type == "linear":
        return linear_time_shift(sigma, mu)
    return time_shift(sigma, mu)


def stretch_to_terminal(sigmas: Tensor, terminal: float) -> Tensor:
    """sigma' = 1 - (1 - sigma) (1 - s_term) / (1 - sigma_last): the schedule's last sigma becomes s_term."""
    return 1.0 - (1.0 - sigmas) * (1.0 - terminal) / (1.0 - sigmas[-1])


def uniform_sigmas(num_steps: int) -> Tensor:
    """linspace(1, 1/N, N) in float64: the unshifted sigmas of an N-step schedule (uniform in t = T sigma)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)


def flux_sigmas(
    sigmas: Tensor,
    mu: float | None,
    shift: float = 1.0,
    time_shift_type: str = "exponential",
    shift_terminal: float | None = None,
) -> Tensor:
    """FLUX's N + 1 sampling sigmas: flux_shift(sigmas), stretch_to_terminal if shift_terminal, then 0."""
    shifted = flux_shift(sigmas, mu, shift, time_shift_type)
    if shift_terminal:
        shifted = stretch_to_terminal(shifted, shift_terminal)
    return torch.cat([shifted, shifted.new_zeros(1)])
