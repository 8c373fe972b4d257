"""The TLCM sampler for flow matching (FLUX) as a diffusers scheduler.

x_t = (1 - sigma) x0 + sigma eps, v = eps - x0. Every step predicts x0 = x_t - sigma_i v and re-noises
it to sigma_{i+1} with FRESH Gaussian noise (the released TLCM scheduler, ``renoise="fresh"``) or with
the noise the model implies (``renoise="implied"``: the Euler step); the last step returns x0 itself.
Loads from a FLUX pipeline's scheduler config and drives ``FluxPipeline`` unchanged. FluxPipeline does
not pass its ``generator`` to ``step``: give the scheduler its own with ``set_noise_generator`` for
reproducible fresh noise (otherwise torch's global RNG is used).

All step arithmetic runs in fp32 and is cast back to the sample's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from torch import Tensor

from .scheduling_utils import Generators, StepIndexMixin, check_renoise, find_timestep_index, fresh_noise
from .solvers import TIME_SHIFT_TYPES, flow_eps, flow_renoise, flux_sigmas, static_shift, uniform_sigmas
from .tlcm import sampler_step


@dataclass
class FlowMatchEulerTLCMSchedulerOutput(BaseOutput):
    """prev_sample: x_{i+1} (next model input; x0 on the last step); denoised: x0 = x_t - sigma_i v."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class FlowMatchEulerTLCMScheduler(StepIndexMixin, SchedulerMixin, ConfigMixin):
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
        check_renoise(renoise)
        if use_karras_sigmas or use_exponential_sigmas or use_beta_sigmas:
            raise ValueError("FlowMatchEulerTLCMScheduler implements FLUX's shifted schedule only; "
                             "karras/exponential/beta sigmas are not supported")
        if invert_sigmas:
            raise ValueError("FlowMatchEulerTLCMScheduler does not support invert_sigmas")
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type must be one of {', '.join(TIME_SHIFT_TYPES)}, got {time_shift_type!r}")
        T = int(num_train_timesteps)
        sigmas = uniform_sigmas(T)
        if not use_dynamic_shifting:
            sigmas = static_shift(sigmas, shift)
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

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | np.ndarray | Tensor | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | np.ndarray | Tensor | None = None,
    ) -> None:
        """sigmas = flux_sigmas(the given sigmas, or linspace(1, sigma_min, N) as diffusers' flow-matching Euler
        scheduler: sigma_min = 1/T, statically shifted when there is no dynamic shift); timesteps = T sigmas[:-1].

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
            schedule = torch.cat([custom_t / T, custom_t.new_zeros(1)])
        else:
            if self.config.use_dynamic_shifting and mu is None:
                raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting is True")
            if sigmas is None:  # as diffusers' FlowMatchEulerDiscreteScheduler: from the training schedule's
                smallest = 1.0 / T  # largest sigma (1) to its smallest (1/T, statically shifted without mu)
                if not self.config.use_dynamic_shifting:
                    smallest = static_shift(smallest, self.shift)
                base = torch.linspace(1.0, smallest, n, dtype=torch.float64)
            else:
                base = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
            schedule = flux_sigmas(base, mu if self.config.use_dynamic_shifting else None, self.shift,
                                   self.config.time_shift_type, self.config.shift_terminal)
        ts = custom_t if custom_t is not None else schedule[:-1] * T

        self.num_inference_steps = n
        self.sigmas = schedule.to(device=device, dtype=torch.float32)
        self.timesteps = ts.to(device=device, dtype=torch.float32)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | Tensor, schedule_timesteps: Tensor | None = None) -> int:
        """Index i with timesteps[i] == timestep (to within 1e-3)."""
        return find_timestep_index(self.timesteps if schedule_timesteps is None else schedule_timesteps, timestep, 1e-3)

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

    def step(self, model_output: Tensor, timestep: float | Tensor, sample: Tensor, generator: Generators = None,
             return_dict: bool = True) -> FlowMatchEulerTLCMSchedulerOutput | tuple[Tensor, Tensor]:
        """tlcm.sampler_step sigma_i -> sigma_{i+1}, with fresh noise or the implied eps = x_t + (1 - sigma_i) v."""
        i = self.current_step_index(timestep)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])

        x_t = sample.to(torch.float32)
        v = model_output.to(device=x_t.device, dtype=torch.float32)
        implied = self.config.renoise == "implied"
        gen = generator if generator is not None else self.noise_generator
        prev, x0 = sampler_step(x_t, v, sigma, sigma_next,
                                lambda: flow_eps(x_t, v, sigma) if implied else fresh_noise(x_t.shape, gen, x_t.device))

        return self.finish_step(i, prev, x0, sample, return_dict, FlowMatchEulerTLCMSchedulerOutput)
