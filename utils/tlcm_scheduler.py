"""TLCM samplers as diffusers schedulers (TLCM.md, "Sampler (released)" and "FLUX form").

The TLCM sampling rule, for every step i: predict x0 from the model output at the current noise
level, then re-noise that x0 to the next noise level -- with FRESH Gaussian noise (the released
behaviour, ``renoise="fresh"``) or with the noise the model itself implies (``renoise="implied"``,
deterministic: the ODE step, i.e. Euler for flow matching and DDIM for DDPM models). The last step
returns x0 itself.

* ``FlowMatchEulerTLCMScheduler`` -- FLUX (flow matching, x_t = (1 - sigma) x0 + sigma eps,
  v = eps - x0). Loads from a FLUX pipeline's scheduler config and drives ``FluxPipeline``
  unchanged. FluxPipeline does not pass its ``generator`` to ``step``: give the scheduler its own
  with ``set_noise_generator`` for reproducible fresh noise (otherwise torch's global RNG is used).
* ``tlcm_timesteps`` / ``milestones`` -- the published SDXL timestep subsets of the M + 1 segment
  milestones.
* ``tlcm_lcm_scheduler`` -- diffusers' ``LCMScheduler`` configured so the milestones lie on its
  grid; pass ``timesteps=tlcm_timesteps(n)`` to ``StableDiffusionXLPipeline``.
* ``TLCMScheduler`` -- the released SDXL sampler itself (DDPM alphas_cumprod, eps/v/x0 prediction,
  no c_skip/c_out), on the milestone subsets by default.

All step arithmetic runs in fp32 and is cast back to the sample's dtype.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DDPMScheduler, LCMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import (
    KarrasDiffusionSchedulers,
    SchedulerMixin,
)
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from utils.solvers import (
    ddim_step,
    flow_eps,
    flow_renoise,
    flow_x0,
    time_shift,
    x0_eps_from_model_output,
)

RENOISE_MODES = ("fresh", "implied")

Generators = torch.Generator | list[torch.Generator] | None

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


def _check_renoise(renoise: str) -> None:
    if renoise not in RENOISE_MODES:
        raise ValueError(f"renoise must be one of {', '.join(RENOISE_MODES)}; got {renoise!r}")


def _fresh_noise(shape: Sequence[int], generator: Generators, device: torch.device) -> Tensor:
    """eps_new ~ N(0, I) in fp32 on `device`, drawn from `generator` (one, or one per batch item)."""
    return randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float32)


def _timestep_value(timestep: float | Tensor) -> float:
    if isinstance(timestep, Tensor):
        if timestep.numel() < 1:
            raise ValueError("timestep is an empty tensor")
        return float(timestep.reshape(-1)[0].item())
    return float(timestep)


def _find_index(timesteps: Tensor, timestep: float | Tensor, tol: float) -> int:
    """First i with |timesteps[i] - timestep| <= tol (ValueError if none)."""
    value = _timestep_value(timestep)
    diffs = (timesteps.detach().to("cpu", torch.float64) - value).abs()
    hits = (diffs <= tol).nonzero()
    if len(hits) == 0:
        raise ValueError(f"timestep {value} is not in the scheduler's timesteps {timesteps.tolist()}")
    return int(hits[0].item())


# --- SDXL: milestones and the published timestep subsets ---------------------------------------


def milestones(num_train_timesteps: int = 1000, num_segments: int = 8) -> list[int]:
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
    desc = milestones(T, M)[::-1]
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
    ms = milestones(num_train_timesteps, num_segments)
    k = 0
    for m in ms[1:]:
        k = math.gcd(k, m + 1)
    return int(num_train_timesteps) // k


def tlcm_lcm_scheduler(config: dict[str, Any], num_segments: int = 8, **overrides: Any) -> LCMScheduler:
    """LCMScheduler from `config` with original_inference_steps = T // gcd(m_i + 1) (8 for T=1000, M=8); overrides win."""
    accepted = set(inspect.signature(LCMScheduler.__init__).parameters) - {"self"}
    kept = {k: v for k, v in dict(config).items() if k in accepted}
    T = int(kept.get("num_train_timesteps", 1000))
    kept["original_inference_steps"] = lcm_original_inference_steps(T, num_segments)
    kept.update(overrides)
    return LCMScheduler.from_config(kept)


# --- FLUX: flow-matching TLCM scheduler --------------------------------------------------------


class _StepIndex:
    """The step bookkeeping diffusers pipelines expect of a scheduler (shared by both samplers below)."""

    _step_index: int | None
    _begin_index: int | None

    @property
    def step_index(self) -> int | None:
        """Index i of the next step (noise level i -> i + 1); None before the first step."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First step index, set by pipelines through set_begin_index."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start stepping at index begin_index (img2img starts part-way down the schedule)."""
        self._begin_index = int(begin_index)

    def __len__(self) -> int:
        """T = num_train_timesteps."""
        return int(self.config.num_train_timesteps)

    def _current_index(self, timestep: float | Tensor) -> int:
        """The index of this step: the begin index or timestep's index on the first call, then one per step."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        return self._step_index


@dataclass
class FlowMatchEulerTLCMSchedulerOutput(BaseOutput):
    """prev_sample: x_{i+1} (next model input; x0 on the last step); denoised: x0 = x_t - sigma_i v."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class FlowMatchEulerTLCMScheduler(_StepIndex, SchedulerMixin, ConfigMixin):
    """TLCM sampler for flow matching: x0 = x_t - sigma_i v, x_{i+1} = (1 - sigma_{i+1}) x0 + sigma_{i+1} eps.

    eps is fresh N(0, I) noise (``renoise="fresh"``, the released TLCM scheduler) or the implied
    noise eps = x_t + (1 - sigma_i) v (``renoise="implied"``, which equals the Euler step
    x_t + (sigma_{i+1} - sigma_i) v). Takes the config of diffusers' FlowMatchEulerDiscreteScheduler.
    Not implemented (ValueError if enabled): karras/exponential/beta sigmas, invert_sigmas.
    ``stochastic_sampling`` is accepted and ignored (``renoise`` decides).
    """

    _compatibles: ClassVar[list[str]] = ["FlowMatchEulerDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        renoise: str = "fresh",
    ) -> None:
        _check_renoise(renoise)
        if use_karras_sigmas or use_exponential_sigmas or use_beta_sigmas:
            raise ValueError("FlowMatchEulerTLCMScheduler implements FLUX's shifted schedule only; "
                             "karras/exponential/beta sigmas are not supported")
        if invert_sigmas:
            raise ValueError("FlowMatchEulerTLCMScheduler does not support invert_sigmas")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
        T = int(num_train_timesteps)
        sigmas = torch.linspace(1.0, 1.0 / T, T, dtype=torch.float64)
        if not use_dynamic_shifting:
            sigmas = self._static_shift(sigmas, shift)
        self._shift = float(shift)
        self.sigmas = sigmas.to(torch.float32)
        self.timesteps = self.sigmas * T
        self.sigma_min = float(self.sigmas[-1])
        self.sigma_max = float(self.sigmas[0])
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.noise_generator: Generators = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # -- state that pipelines read --

    @property
    def shift(self) -> float:
        """The static shift s of sigma' = s sigma / (1 + (s - 1) sigma)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        """Set the static shift s (used when use_dynamic_shifting is False)."""
        self._shift = float(shift)

    def set_noise_generator(self, generator: Generators) -> None:
        """Generator (or list per batch item) for fresh noise when step() gets none (FluxPipeline passes none)."""
        self.noise_generator = generator

    # -- schedule --

    @staticmethod
    def _static_shift(sigmas: Tensor, shift: float) -> Tensor:
        """sigma' = s sigma / (1 + (s - 1) sigma) = time_shift(sigma, log s)."""
        return time_shift(sigmas, math.log(shift))

    def _shift_sigmas(self, sigmas: Tensor, mu: float | None) -> Tensor:
        """Static shift, or resolution shift: e^mu / (e^mu + 1/sigma - 1) (exponential), mu / (mu + 1/sigma - 1) (linear)."""
        if not self.config.use_dynamic_shifting:
            return self._static_shift(sigmas, self.shift)
        if mu is None:
            raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting is True")
        if self.config.time_shift_type == "exponential":
            return time_shift(sigmas, float(mu))
        positive = sigmas > 0
        safe = torch.where(positive, sigmas, torch.ones_like(sigmas))
        return torch.where(positive, mu / (mu + (1.0 / safe - 1.0)), torch.zeros_like(sigmas))

    def _stretch_to_terminal(self, sigmas: Tensor) -> Tensor:
        """sigma' = 1 - (1 - sigma) (1 - s_term) / (1 - sigma_last), so the last sigma becomes shift_terminal."""
        terminal = float(self.config.shift_terminal)
        return 1.0 - (1.0 - sigmas) * (1.0 - terminal) / (1.0 - sigmas[-1])

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | np.ndarray | Tensor | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | np.ndarray | Tensor | None = None,
    ) -> None:
        """sigmas = shift(linspace(1, 1/N, N) or the given sigmas) then 0 appended; timesteps = T sigmas[:-1].

        Given `timesteps` alone, they are taken as the final schedule: sigmas = timesteps / T, unshifted.
        Given both, sigmas are shifted and timesteps used as given (diffusers' behaviour).
        """
        T = int(self.config.num_train_timesteps)
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("sigmas and timesteps must have the same length")
        if num_inference_steps is None:
            if sigmas is None and timesteps is None:
                raise ValueError("pass num_inference_steps, sigmas or timesteps")
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        elif (sigmas is not None and len(sigmas) != num_inference_steps) or (
            timesteps is not None and len(timesteps) != num_inference_steps
        ):
            raise ValueError("sigmas/timesteps must have num_inference_steps entries")
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")

        custom_t = None if timesteps is None else torch.as_tensor(np.asarray(timesteps, dtype=np.float64))
        if sigmas is None and custom_t is not None:
            sig = custom_t / T
        else:
            if sigmas is None:
                base = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
            else:
                base = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
            sig = self._shift_sigmas(base, mu)
            if self.config.shift_terminal:
                sig = self._stretch_to_terminal(sig)
        ts = custom_t if custom_t is not None else sig * T

        self.num_inference_steps = n
        self.sigmas = torch.cat([sig, sig.new_zeros(1)]).to(device=device, dtype=torch.float32)
        self.timesteps = ts.to(device=device, dtype=torch.float32)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | Tensor, schedule_timesteps: Tensor | None = None) -> int:
        """Index i with timesteps[i] == timestep (to within 1e-3)."""
        return _find_index(self.timesteps if schedule_timesteps is None else schedule_timesteps, timestep, 1e-3)

    # -- forward process (img2img) --

    def scale_noise(self, sample: Tensor, timestep: float | Tensor, noise: Tensor) -> Tensor:
        """x_sigma = (1 - sigma) x0 + sigma eps at the schedule's sigma for `timestep` (one per batch item)."""
        if self._begin_index is None:
            values = timestep.reshape(-1) if isinstance(timestep, Tensor) else torch.tensor([float(timestep)])
            indices = [self.index_for_timestep(t) for t in values]
        else:
            index = self._step_index if self._step_index is not None else self._begin_index
            indices = [index]
        sigma = self.sigmas.to(device=sample.device, dtype=torch.float32)[indices]
        if sigma.numel() == 1:
            sigma = sigma.expand(sample.shape[0])
        out = flow_renoise(sample.to(torch.float32), noise.to(device=sample.device, dtype=torch.float32), sigma)
        return out.to(sample.dtype)

    # -- reverse step --

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        generator: Generators = None,
        return_dict: bool = True,
    ) -> FlowMatchEulerTLCMSchedulerOutput | tuple[Tensor, Tensor]:
        """x0 = x_t - s_i v; x_{i+1} = (1 - s_{i+1}) x0 + s_{i+1} eps, eps fresh or x_t + (1 - s_i) v (s = sigma)."""
        i = self._current_index(timestep)
        if i + 1 >= len(self.sigmas):
            raise IndexError(f"step {i} is past the end of the schedule ({self.num_inference_steps} steps)")
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])

        x_t = sample.to(torch.float32)
        v = model_output.to(device=x_t.device, dtype=torch.float32)
        x0 = flow_x0(x_t, v, sigma)
        if sigma_next == 0.0:
            prev = x0
        else:
            if self.config.renoise == "implied":
                eps = flow_eps(x_t, v, sigma)
            else:
                gen = generator if generator is not None else self.noise_generator
                eps = _fresh_noise(x_t.shape, gen, x_t.device)
            prev = flow_renoise(x0, eps, sigma_next)

        self._step_index = i + 1
        prev, x0 = prev.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return prev, x0
        return FlowMatchEulerTLCMSchedulerOutput(prev_sample=prev, denoised=x0)


# --- SDXL (DDPM, eps / v / x0 prediction): the released sampler as a scheduler -----------------


@dataclass
class TLCMSchedulerOutput(BaseOutput):
    """prev_sample: z at the next timestep (x0 on the last step); denoised: the x0 prediction."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class TLCMScheduler(_StepIndex, SchedulerMixin, ConfigMixin):
    """Released SDXL TLCM sampler: x0 = (z - sqrt(1 - a_t) eps) / sqrt(a_t), z_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps'.

    eps' is fresh N(0, I) noise (``renoise="fresh"``, released) or the model's eps
    (``renoise="implied"``, i.e. DDIM with eta = 0). No c_skip/c_out. Default timesteps are
    tlcm_timesteps(N, T, num_segments); custom descending integer timesteps are accepted. Loads from
    any DDPM-family scheduler config (betas and prediction_type are read, other keys ignored).
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
        _check_renoise(renoise)
        betas_source = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self.alphas_cumprod = betas_source.alphas_cumprod.to(torch.float32)
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
        return _find_index(self.timesteps if schedule_timesteps is None else schedule_timesteps, timestep, 0.5)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """z_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, per batch item."""
        a = self.alphas_cumprod.to(original_samples.device)[timesteps.to(original_samples.device).long()]
        out = ddim_step(original_samples.to(torch.float32), noise.to(torch.float32), a.sqrt(), (1.0 - a).sqrt())
        return out.to(original_samples.dtype)

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: Generators = None,
        return_dict: bool = True,
    ) -> TLCMSchedulerOutput | tuple[Tensor, Tensor]:
        """x0 from the model output at t_i; z_{i+1} = sqrt(a_s) x0 + sqrt(1 - a_s) eps', s = t_{i+1}; last step -> x0."""
        i = self._current_index(timestep)
        if i >= len(self.timesteps):
            raise IndexError(f"step {i} is past the end of the schedule ({self.num_inference_steps} steps)")
        a_t = float(self.alphas_cumprod[int(self.timesteps[i])])

        z = sample.to(torch.float32)
        out = model_output.to(device=z.device, dtype=torch.float32)
        x0, eps = x0_eps_from_model_output(out, z, math.sqrt(a_t), math.sqrt(1.0 - a_t), self.config.prediction_type)
        if i + 1 == len(self.timesteps):
            prev = x0
        else:
            a_s = float(self.alphas_cumprod[int(self.timesteps[i + 1])])
            noise = eps if self.config.renoise == "implied" else _fresh_noise(z.shape, generator, z.device)
            prev = ddim_step(x0, noise, math.sqrt(a_s), math.sqrt(1.0 - a_s))

        self._step_index = i + 1
        prev, x0 = prev.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return prev, x0
        return TLCMSchedulerOutput(prev_sample=prev, denoised=x0)
