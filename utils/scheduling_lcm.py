"""diffusers' LCMScheduler on a teacher's noise schedule (the sampler of every LCM student)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from diffusers import LCMScheduler


def lcm_scheduler(
    teacher_scheduler_config: Mapping[str, Any],
    original_inference_steps: int,
    timestep_scaling: float | None = None,
) -> LCMScheduler:
    """LCMScheduler with the teacher config's betas and prediction type, the skip grid T // original_inference_steps
    and the boundary scaling timestep_scaling (None: the config's, else LCMScheduler's default)."""
    # keep only LCMScheduler's own keys: a teacher's other keys (e.g. Euler's sigma options) are meaningless here
    accepted = set(inspect.signature(LCMScheduler.__init__).parameters) - {"self"}
    config = {k: v for k, v in dict(teacher_scheduler_config).items() if k in accepted}
    config["original_inference_steps"] = int(original_inference_steps)
    if timestep_scaling is not None:
        config["timestep_scaling"] = timestep_scaling
    return LCMScheduler.from_config(config)
