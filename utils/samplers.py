"""Samplers by name: the one registry behind `--scheduler` of inference.py, utils.evaluate and the benchmarks.

    from utils.samplers import set_sampler
    set_sampler(pipe, "tlcm")          # FLUX: FlowMatchEulerTLCMScheduler; SD/SDXL: TLCMScheduler

Each name builds a diffusers scheduler from the pipeline's own scheduler config (so the noise
schedule, prediction type and FLUX shift stay the model's) and says which model families it fits.

`tlcm-sdxl` is the released TLCM SDXL sampler, TLCMScheduler: predict x0 with no c_skip/c_out,
re-noise it with fresh noise, on the published milestone timesteps (4 steps: 999, 749, 499, 124;
1 to 8 steps). It is what `tlcm` means on SD/SDXL, under the name the release uses.

`tcd` is diffusers' TCDScheduler (strategic stochastic sampling of TCD): each step maps the sample to
s = floor((1 - eta) t_next) with the model's x0 and noise, then re-noises it to t_next with fresh noise.
eta, the paper's gamma, is an argument of the pipeline call, not of the scheduler: `step_kwargs` gives it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import UserError

UNET_ARCHS, FLUX_ARCHS = ("sd", "sdxl"), ("flux",)


@dataclass(frozen=True)
class Sampler:
    """One `--scheduler` name: what it is, the model families it fits and how to build it."""

    description: str
    archs: tuple[str, ...]
    build: Callable[[dict, str, str | None], Any]  # (scheduler config, architecture, re-noising) -> scheduler
    few_step: bool = False          # made for distilled (LCM/TLCM) models rather than base models
    renoise: str | None = None      # a TLCM sampler's default re-noising; None: it does not re-noise x0
    milestones: tuple[str, ...] = ()  # architectures on which it samples the published TLCM milestones (1-8 steps)
    eta: float | None = None        # the default of the pipeline call's `eta` it takes (TCD's gamma); None: none


def diffusers_scheduler(class_name: str, **overrides: Any) -> Callable[[dict, str, str | None], Any]:
    """A builder of diffusers.<class_name> from the pipeline's scheduler config and `overrides`."""

    def build(config: dict, arch: str, renoise: str | None) -> Any:
        import diffusers

        return getattr(diffusers, class_name).from_config(config, **overrides)

    return build


def tlcm_scheduler(config: dict, arch: str, renoise: str | None) -> Any:
    """FlowMatchEulerTLCMScheduler for FLUX, TLCMScheduler (the released SDXL sampler) for SD/SDXL."""
    if arch == "flux":
        from .scheduling_flow_match_euler_tlcm import FlowMatchEulerTLCMScheduler

        return FlowMatchEulerTLCMScheduler.from_config(config, renoise=renoise or "fresh")
    from .scheduling_tlcm import TLCMScheduler

    return TLCMScheduler.from_config(config, renoise=renoise or "fresh")


SAMPLERS: dict[str, Sampler] = {
    "tlcm": Sampler("predict x0, re-noise it to the next noise level (fresh noise, as released; see --renoise); "
                    "FLUX: FlowMatchEulerTLCMScheduler, SD/SDXL: TLCMScheduler on the milestone timesteps (1-8 steps)",
                    FLUX_ARCHS + UNET_ARCHS, tlcm_scheduler, few_step=True, renoise="fresh", milestones=UNET_ARCHS),
    "tlcm-implied": Sampler("tlcm re-noising with the noise the model implies instead of fresh noise "
                            "(deterministic: Euler / DDIM steps from the x0 prediction)",
                            FLUX_ARCHS + UNET_ARCHS, tlcm_scheduler, few_step=True, renoise="implied",
                            milestones=UNET_ARCHS),
    "tlcm-sdxl": Sampler("SD/SDXL: the released TLCM SDXL sampler, TLCMScheduler on the published milestone "
                         "timesteps (4 steps: 999, 749, 499, 124; 1-8 steps); the same as tlcm there",
                         UNET_ARCHS, tlcm_scheduler, few_step=True, renoise="fresh", milestones=UNET_ARCHS),
    "lcm": Sampler("SD/SDXL: diffusers' LCMScheduler (LCM students and LoRAs)", UNET_ARCHS,
                   diffusers_scheduler("LCMScheduler"), few_step=True),
    "tcd": Sampler("SD/SDXL: diffusers' TCDScheduler (TCD LoRAs, LCM students too): each step maps to "
                   "s = (1 - eta) t_next with the model's x0 and re-noises the rest with fresh noise (--eta, the "
                   "paper's gamma; 0 is deterministic)", UNET_ARCHS, diffusers_scheduler("TCDScheduler"),
                   few_step=True, eta=0.3),
    "euler": Sampler("SD/SDXL base models: EulerDiscreteScheduler", UNET_ARCHS,
                     diffusers_scheduler("EulerDiscreteScheduler")),
    # latents are not images: a config without clip_sample (e.g. SDXL's Euler one) must not get DDIM's default True
    "ddim": Sampler("SD/SDXL base models: DDIMScheduler", UNET_ARCHS,
                    diffusers_scheduler("DDIMScheduler", clip_sample=False)),
    "dpm++": Sampler("SD/SDXL base models: DPMSolverMultistepScheduler (dpmsolver++)", UNET_ARCHS,
                     diffusers_scheduler("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++")),
    "flow-euler": Sampler("FLUX base models: FLUX's own FlowMatchEulerDiscreteScheduler", FLUX_ARCHS,
                          diffusers_scheduler("FlowMatchEulerDiscreteScheduler")),
}


def pipeline_architecture(pipe: Any) -> str:
    """sd, sdxl or flux, from the components of a loaded diffusers pipeline."""
    if getattr(pipe, "transformer", None) is not None:
        return "flux"
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


def check_sampler(name: str, arch: str) -> Sampler:
    """SAMPLERS[name], or a one-line UserError naming --scheduler when it does not fit `arch`."""
    sampler = SAMPLERS[name]
    if arch not in sampler.archs:
        fits = [k for k, v in SAMPLERS.items() if arch in v.archs]
        raise UserError(f"--scheduler {name} does not fit a {arch} model; use one of {', '.join(fits)}")
    return sampler


def set_sampler(pipe: Any, name: str | None, arch: str | None = None, renoise: str | None = None) -> str:
    """Swap the pipeline's scheduler for SAMPLERS[name] on the same noise schedule ("default" or None:
    keep its own); `renoise` overrides a TLCM sampler's re-noising. Returns the scheduler's class name."""
    if name not in (None, "default"):
        arch = arch or pipeline_architecture(pipe)
        sampler = check_sampler(name, arch)
        if renoise is not None and sampler.renoise is None:
            raise ValueError(f"{name} does not re-noise its x0 predictions; renoise={renoise!r} applies to TLCM only")
        pipe.scheduler = sampler.build(pipe.scheduler.config, arch, renoise or sampler.renoise)
    return type(pipe.scheduler).__name__


def uses_milestones(name: str | None, arch: str) -> bool:
    """Whether `name` samples the published TLCM milestone timesteps (1-8 steps) on `arch`."""
    return name in SAMPLERS and arch in SAMPLERS[name].milestones


def step_kwargs(name: str | None, eta: float | None = None) -> dict[str, float]:
    """The pipeline-call kwargs of sampler `name`: {"eta": eta, else its default} where it takes one (tcd), else {}.
    A one-line UserError names --eta when it is given to a sampler without one, or outside [0, 1]."""
    default = SAMPLERS[name].eta if name in SAMPLERS else None
    if eta is not None and default is None:
        raise UserError(f"--eta applies to --scheduler tcd only, not {name or 'the pipeline default'}")
    if default is None:
        return {}
    eta = default if eta is None else eta
    if not 0 <= eta <= 1:
        raise UserError(f"--eta must be in [0, 1] (the share of each step that is re-noised), got {eta}")
    return {"eta": eta}
