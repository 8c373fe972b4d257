"""What the TLCM schedulers share: the renoise modes, fresh-noise draws and diffusers' step bookkeeping."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

# "fresh": new N(0, I) noise at every step (the released TLCM sampler); "implied": the model's own noise (ODE step)
RENOISE_MODES = ("fresh", "implied")

Generators = torch.Generator | list[torch.Generator] | None


def check_renoise(renoise: str) -> None:
    """ValueError unless renoise is one of RENOISE_MODES."""
    if renoise not in RENOISE_MODES:
        raise ValueError(f"renoise must be one of {', '.join(RENOISE_MODES)}; got {renoise!r}")


def fresh_noise(shape: Sequence[int], generator: Generators, device: torch.device) -> Tensor:
    """eps_new ~ N(0, I) in fp32 on `device`, drawn from `generator` (one, or one per batch item)."""
    return randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float32)


def _timestep_value(timestep: float | Tensor) -> float:
    if isinstance(timestep, Tensor):
        if timestep.numel() < 1:
            raise ValueError("timestep is an empty tensor")
        return float(timestep.reshape(-1)[0].item())
    return float(timestep)


def find_timestep_index(timesteps: Tensor, timestep: float | Tensor, tol: float) -> int:
    """First i with |timesteps[i] - timestep| <= tol (ValueError if none)."""
    value = _timestep_value(timestep)
    diffs = (timesteps.detach().to("cpu", torch.float64) - value).abs()
    hits = (diffs <= tol).nonzero()
    if len(hits) == 0:
        raise ValueError(f"timestep {value} is not in the scheduler's timesteps {timesteps.tolist()}")
    return int(hits[0].item())


class StepIndexMixin:
    """The step bookkeeping diffusers pipelines expect of a scheduler (begin index, step index, len)."""

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

    def current_step_index(self, timestep: float | Tensor) -> int:
        """The index of this step: the begin index or timestep's index on the first call, then one per step
        (IndexError past the last step)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        if self._step_index >= self.num_inference_steps:
            raise IndexError(f"step {self._step_index} is past the end of the schedule ({self.num_inference_steps} steps)")
        return self._step_index

    def finish_step(self, i: int, prev: Tensor, x0: Tensor, sample: Tensor, return_dict: bool, output_cls):
        """After step i: the step index moves on; (prev, x0) in the sample's dtype, as output_cls(prev_sample=...,
        denoised=...) or, without return_dict, a tuple."""
        self._step_index = i + 1
        prev, x0 = prev.to(sample.dtype), x0.to(sample.dtype)
        return output_cls(prev_sample=prev, denoised=x0) if return_dict else (prev, x0)
