"""The released SDXL TLCM sampler as a diffusers scheduler, and the SDXL milestone timesteps it runs on.

The TLCM sampling rule, for every step i: predict x0 from the model output at t_i, then re-noise that
x0 to t_{i+1} -- with FRESH Gaussian noise (the released behaviour, ``renoise="fresh"``) or with the
noise the model itself implies (``renoise="implied"``, i.e. DDIM with eta = 0). The last step returns
x0 itself.

* ``ddpm_milestones`` / ``tlcm_timesteps`` -- the M + 1 segment milestones on the integer DDPM axis
  and the published SDXL timestep subsets of them.
* ``tlcm_lcm_scheduler`` -- diffusers' ``LCMScheduler`` configured so the milestones lie on its
  grid; pass ``timesteps=tlcm_timesteps(n)`` to ``StableDiffusionXLPipeline``.
* ``TLCMScheduler`` -- the released sampler itself (DDPM alphas_cumprod, eps/v/x0 prediction, no
  c_skip/c_out), on the milestone subsets by default.

All step arithmetic runs in fp32 and is cast back to the sample's dtype.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DDPMScheduler, LCMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from torch import Tensor

from .scheduling_lcm import lcm_scheduler
from .scheduling_utils import Generators, StepIndexMixin, check_renoise, find_timestep_index, fresh_noise
from .solvers import alpha_sigma, clamp_alphas_cumprod, ddim_step, x0_eps_from_model_output

# Index subsets (into the milestones in DESCENDING order, T-1 first, 0 last) of the released
# SDXL sampler, for M = 8 segments; 8 steps use all nine milestones.
PUBLISHED_SUBSETS: dict[int, tuple[int, ...]] = {
    1: (0, 8),
    2: (0, 4, 8),
    3: (0, 4, 7, 8),
    4: (0, 2, 4, 7, 8),
    5: (0, 2, 4, 6, 7, 8),
    6: (0, 2, 4, 5, 6, 7, 8),
    7: (0, 2, 3, 4, 5, 6, 7, 8),
    8: (0, 1, 2, 3, 4, 5, 6, 7, 8),
}
PUBLISHED_NUM_SEGMENTS = 8


# --- milestones and the published timestep subsets --------------------------------------------


def ddpm_milestones(num_train_timesteps: int = 1000, num_segments: int = 8) -> list[int]:
    """m_i = floor(i (T - 1) / M), i = 0..M, ascending (T=1000, M=8: 0, 124, 249, ..., 874, 999)."""
    T, M = int(num_train_timesteps), int(num_segments)
    if M < 1 or T < M + 1:
        raise ValueError(f"need 1 <= num_segments < num_train_timesteps; got M={M}, T={T}")
    return [(i * (T - 1)) // M for i in range(M + 1)]


def tlcm_timesteps(num_steps: int, num_train_timesteps: int = 1000, num_segments: int = 8) -> list[int]:
    """Milestones (descending) at the published index subset, final 0 dropped: 4 steps -> 999, 749, 499, 124."""
    T, M, n = int(num_train_timesteps), int(num_segments), int(num_steps)
    if n < 1 or n > M:
        raise ValueError(f"num_steps must be in [1, num_segments={M}], got {n}")
    desc = ddpm_milestones(T, M)[::-1]
    if n == M:
        subset: Sequence[int] = range(M + 1)
    elif n == 1:
        subset = (0, M)
    elif M == PUBLISHED_NUM_SEGMENTS:
        subset = PUBLISHED_SUBSETS[n]
    else:
        raise ValueError(
            f"published TLCM subsets exist only for num_segments={PUBLISHED_NUM_SEGMENTS}; with num_segments={M} "
            f"only 1 or {M} steps are defined (got {n}); pass explicit timesteps instead"
        )
    return [desc[i] for i in subset][:-1]


def lcm_original_inference_steps(num_train_timesteps: int = 1000, num_segments: int = 8) -> int:
    """N_orig = T // k with k = gcd(m_i + 1, i >= 1): LCMScheduler's grid j k - 1 then contains every milestone."""
    k = 0
    for m in ddpm_milestones(num_train_timesteps, num_segments)[1:]:
        k = math.gcd(k, m + 1)
    return int(num_train_timesteps) // k


def tlcm_lcm_scheduler(config: Mapping[str, Any], num_segments: int = 8) -> LCMScheduler:
    """lcm_scheduler(config) with original_inference_steps = T // gcd(m_i + 1) (8 for T=1000, M=8)."""
    T = int(config.get("num_train_timesteps", 1000))
    return lcm_scheduler(config, lcm_original_inference_steps(T, num_segments))


# --- the released sampler ----------------------------------------------------------------------


@dataclass
class TLCMSchedulerOutput(BaseOutput):
    """prev_sample: z at the next timestep (x0 on the last step); denoised: the x0 prediction."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class TLCMScheduler(StepIndexMixin, SchedulerMixin, ConfigMixin):
    """Released SDXL TLCM sampler: x0 = (z - sqrt(1 - a_t) eps) / sqrt(a_t), z_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps'.

    eps' is fresh N(0, I) noise (``renoise="fresh"``, released) or the model's eps
    (``renoise="implied"``, i.e. DDIM with eta = 0). No c_skip/c_out. Default timesteps are
    tlcm_timesteps(N, T, num_segments); custom descending integer timesteps are accepted. Loads from
    any DDPM-family scheduler config (betas and prediction_type are read, other keys ignored); a zero-terminal-SNR
    schedule's a_T = 0 is clamped to 2^-24, as the recipes train on it.
    """

    _compatibles: ClassVar[list[str]] = [e.name for e in KarrasDiffusionSchedulers] + ["LCMScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: list[float] | np.ndarray | None = None,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
        num_segments: int = 8,
        renoise: str = "fresh",
    ) -> None:
        check_renoise(renoise)
        betas_source = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        # as training reads the teacher's schedule (models.teacher_alphas_cumprod): a zero-terminal-SNR a_T = 0 would
        # make the first step's x0 = (z - sigma eps) / 0
        self.alphas_cumprod = clamp_alphas_cumprod(betas_source.alphas_cumprod.to(torch.float32))
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def scale_model_input(self, sample: Tensor, timestep: int | Tensor | None = None) -> Tensor:
        """Identity (DDPM-family models take z_t unscaled)."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """timesteps = tlcm_timesteps(N, T, M), or the given strictly descending integers in [0, T)."""
        T = int(self.config.num_train_timesteps)
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is None:
            ts = tlcm_timesteps(int(num_inference_steps), T, int(self.config.num_segments))
        else:
            ts = [int(t) for t in timesteps]
            if not ts or any(b >= a for a, b in itertools.pairwise(ts)) or ts[0] >= T or ts[-1] < 0:
                raise ValueError(f"timesteps must be strictly descending integers in [0, {T}); got {ts}")
        self.num_inference_steps = len(ts)
        self.timesteps = torch.tensor(ts, dtype=torch.long, device=device)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: int | Tensor, schedule_timesteps: Tensor | None = None) -> int:
        """Index i with timesteps[i] == timestep."""
        return find_timestep_index(self.timesteps if schedule_timesteps is None else schedule_timesteps, timestep, 0.5)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """z_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, per batch item."""
        alpha, sigma = alpha_sigma(self.alphas_cumprod, timesteps.to(original_samples.device))
        out = ddim_step(original_samples.to(torch.float32), noise.to(torch.float32), alpha, sigma)
        return out.to(original_samples.dtype)

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor, generator: Generators = None,
             return_dict: bool = True) -> TLCMSchedulerOutput | tuple[Tensor, Tensor]:
        """x0 from the model output at t_i; z_{i+1} = sqrt(a_s) x0 + sqrt(1 - a_s) eps', s = t_{i+1}; last: x0."""
        i = self.current_step_index(timestep)
        # float64 coefficients: 1 - a_t is not rounded to fp32 before its square root
        alphas_cumprod = self.alphas_cumprod.double()
        alpha_t, sigma_t = alpha_sigma(alphas_cumprod, self.timesteps[i].cpu())

        z = sample.to(torch.float32)
        out = model_output.to(device=z.device, dtype=torch.float32)
        x0, eps = x0_eps_from_model_output(out, z, alpha_t, sigma_t, self.config.prediction_type)
        if i + 1 == len(self.timesteps):
            prev = x0
        else:
            alpha_s, sigma_s = alpha_sigma(alphas_cumprod, self.timesteps[i + 1].cpu())
            noise = eps if self.config.renoise == "implied" else fresh_noise(z.shape, generator, z.device)
            prev = ddim_step(x0, noise, alpha_s, sigma_s)

        return self.finish_step(i, prev, x0, sample, return_dict, TLCMSchedulerOutput)
