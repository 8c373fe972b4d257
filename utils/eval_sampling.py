"""Sampling a pipeline, as inference.py, utils.evaluate and its --metrics protocol do: the device and dtype from
--device / --dtype, the guidance kwargs of each pipeline family, fixed seeds per image, and the result row of one
model at one step count."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class Result:
    label: str
    steps: int
    prompt_accuracy: float | None
    toy_fd: float | None
    seconds_per_image: float
    teacher_rmse: float | None = None  # pixel RMSE to the reference (teacher, 50 steps) from the same noise
    clip_score: float | None = None
    clip_fd: float | None = None
    guidance_scale: float | None = None


def row_labels(results: list[Result]) -> list[str]:
    """Grid row labels naming what each row of images is: "<label>, <steps> steps, CFG <scale>"."""
    return [f"{r.label}, {r.steps} step{'s' * (r.steps != 1)}"
            + ("" if r.guidance_scale is None else f", CFG {r.guidance_scale:g}") for r in results]


def guidance_kwargs(pipe, guidance_scale: float, num_prompts: int) -> dict:
    """Pipeline kwargs for classifier-free guidance of scale `guidance_scale` (diffusers' convention).

    FLUX with a guidance embedding takes the scale as an input; FLUX without one needs "true CFG"
    with an empty negative prompt; UNet pipelines take `guidance_scale` directly.
    """
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return {"guidance_scale": guidance_scale}
    kwargs = {"max_sequence_length": min(512, pipe.tokenizer_2.model_max_length)}
    if transformer.config.get("guidance_embeds", False):
        kwargs["guidance_scale"] = guidance_scale
    elif guidance_scale > 1.0:
        kwargs.update(true_cfg_scale=guidance_scale, negative_prompt=[""] * num_prompts)
    return kwargs


def default_resolution(pipe) -> int:
    """The image side a pipeline was made for: the UNet's sample size, else the VAE's (FLUX)."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return unet.config.sample_size * pipe.vae_scale_factor
    sample_size = pipe.vae.config.sample_size
    return sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size


@torch.no_grad()
def sample(pipe, prompts: list[str], steps: int, guidance_scale: float, seed: int = 0, batch_size: int = 64,
           after_call=None, **extra) -> tuple[torch.Tensor, float]:
    """Images in [-1, 1] (N, 3, H, W) for the prompts, image i from seed + i; and seconds per image.

    after_call: called with no argument after each pipeline call (a benchmark's per-call bookkeeping).
    """
    images, elapsed = [], 0.0
    res = default_resolution(pipe)
    extra = {"height": res, "width": res, **extra}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        kwargs = dict(guidance_kwargs(pipe, guidance_scale, len(chunk)), **extra)
        if hasattr(pipe.scheduler, "set_noise_generator"):  # re-noising samplers draw from their own generator
            pipe.scheduler.set_noise_generator(torch.Generator().manual_seed(seed + start))
        t0 = time.perf_counter()
        out = pipe(prompt=chunk, num_inference_steps=steps, generator=gens, output_type="np", **kwargs).images
        elapsed += time.perf_counter() - t0
        if after_call is not None:
            after_call()
        images.append(torch.from_numpy(np.asarray(out)).permute(0, 3, 1, 2) * 2 - 1)
    return torch.cat(images).float(), elapsed / len(prompts)


def resolve_device(name: str) -> torch.device:
    """torch.device for --device ("auto": CUDA, else MPS, else CPU); one-line error when it is not there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple MPS is not available on this machine")
    return device


def resolve_dtype(name: str, arch: str, device: torch.device) -> torch.dtype:
    """torch dtype for --dtype; fp16 on CPU and bf16 on a GPU without it are one-line errors."""
    if name == "auto":
        if device.type == "cpu":
            name = "fp32"
        elif device.type == "cuda" and arch == "flux" and torch.cuda.is_bf16_supported():
            name = "bf16"  # FLUX is released in bf16; fp16 overflows in its activations
        else:
            name = "fp16"
    if name == "fp16" and device.type == "cpu":
        raise UserError("--dtype fp16 is not supported on CPU (many CPU kernels lack it): use fp32 or bf16")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--dtype bf16: this GPU has no bf16 support; use fp16 or fp32")
    return getattr(torch, DTYPE_NAMES[name])
