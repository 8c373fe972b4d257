"""diffusers' LCMScheduler and TCDScheduler on a teacher's noise schedule (the samplers of LCM and TCD students)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from diffusers import LCMScheduler, TCDScheduler


def on_teacher_schedule(cls: type, teacher_scheduler_config: Mapping[str, Any], **overrides: Any) -> Any:
    """`cls` (a diffusers scheduler) from the teacher config's betas and prediction type, with `overrides`."""
    # keep only the class's own keys: a teacher's other keys (e.g. Euler's sigma options) are meaningless here
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    config = {k: v for k, v in dict(teacher_scheduler_config).items() if k in accepted}
    return cls.from_config({**config, **overrides})


def lcm_scheduler(
    teacher_scheduler_config: Mapping[str, Any],
    original_inference_steps: int,
    timestep_scaling: float | None = None,
) -> LCMScheduler:
    """LCMScheduler with the teacher config's betas and prediction type, the skip grid T // original_inference_steps
    and the boundary scaling timestep_scaling (None: the config's, else LCMScheduler's default)."""
    extra = {} if timestep_scaling is None else {"timestep_scaling": timestep_scaling}
    return on_teacher_schedule(LCMScheduler, teacher_scheduler_config,
                               original_inference_steps=int(original_inference_steps), **extra)


def tcd_scheduler(teacher_scheduler_config: Mapping[str, Any], original_inference_steps: int) -> TCDScheduler:
    """TCDScheduler with the teacher config's betas and prediction type and the skip grid T // original_inference_steps
    (its eta, the paper's gamma, is a pipeline-call argument)."""
    return on_teacher_schedule(TCDScheduler, teacher_scheduler_config,
                               original_inference_steps=int(original_inference_steps))
