"""Assemble the toy world on disk from the committed weights: datasets and pipeline folders.

    python -m utils.toy build [--out toy_world]

Layout written (a second call reuses every part that is complete):
    data/train/, data/test/        HF imagefolder (PNG + metadata.jsonl with a `text` column)
    data/shards/                   the train split again as webdataset .tar shards
    models/sd/                     StableDiffusionPipeline (eps, CLIP text encoder, DDIM scheduler)
    models/sdxl/                   StableDiffusionXLPipeline (two CLIP encoders, text_time UNet)
    models/flux/                   FluxPipeline (T5 + CLIP, no guidance embedding: ordinary CFG)
    models/flux-guidance/          FluxPipeline whose transformer takes the guidance scale as input
    judge/                         ToyJudge (shape/colour classifier for prompt accuracy and toy FD)
    latent_lpips/sd/               LatentLPIPS on the SD/SDXL VAE's 4-channel latents (utils/latent_lpips.py)
    latent_lpips/flux/             LatentLPIPS on the FLUX VAE's 16-channel latents
Each folder is written under a temporary name and renamed when complete; builds of the same folder started
together (parallel test workers) take turns on out/.build.lock.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from .. import files
from . import data
from .train import WEIGHTS, weights_dir

DEFAULT_OUT = "toy_world"


_w = weights_dir  # short name: every component below is read from the committed weights


def _atomic(out: str, write: Callable[[str], None], force: bool = False) -> bool:
    """Run write(tmp) and install tmp as out; skip if out exists. Returns True if it wrote."""
    if os.path.isdir(out) and not force:
        return False
    with files.atomic_write(out.rstrip("/")) as tmp:
        write(tmp)
    return True


def sd_scheduler_config() -> dict:
    """Stable Diffusion 1.x's training schedule, as its scheduler configs carry it."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", clip_sample=False,
                set_alpha_to_one=False)


def write_sd(out: str) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    f32 = dict(torch_dtype=torch.float32)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(_w("vae_sd"), **f32),
        text_encoder=CLIPTextModel.from_pretrained(_w("sd_text_encoder"), **f32),
        tokenizer=CLIPTokenizer.from_pretrained(_w("clip_tokenizer")),
        unet=UNet2DConditionModel.from_pretrained(_w("sd_unet"), **f32),
        scheduler=DDIMScheduler(**sd_scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)


def write_sdxl(out: str) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    f32 = dict(torch_dtype=torch.float32)
    tok = CLIPTokenizer.from_pretrained(_w("clip_tokenizer"))
    cfg = {k: v for k, v in sd_scheduler_config().items() if k not in ("clip_sample", "set_alpha_to_one")}
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(_w("vae_sd"), **f32),
        text_encoder=CLIPTextModel.from_pretrained(_w("sdxl_text_encoder"), **f32),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(_w("sdxl_text_encoder_2"), **f32),
        tokenizer=tok, tokenizer_2=tok,
        unet=UNet2DConditionModel.from_pretrained(_w("sdxl_unet"), **f32),
        scheduler=EulerDiscreteScheduler(**cfg),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out)


def flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def write_flux(out: str, transformer_name: str) -> None:
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    f32 = dict(torch_dtype=torch.float32)
    pipe = FluxPipeline(
        scheduler=flux_scheduler(),
        vae=AutoencoderKL.from_pretrained(_w("vae_flux"), **f32),
        text_encoder=CLIPTextModel.from_pretrained(_w("flux_text_encoder"), **f32),
        tokenizer=CLIPTokenizer.from_pretrained(_w("clip_tokenizer")),
        text_encoder_2=T5EncoderModel.from_pretrained(_w("flux_text_encoder_2"), **f32),
        tokenizer_2=T5TokenizerFast.from_pretrained(_w("t5_tokenizer")),
        transformer=FluxTransformer2DModel.from_pretrained(_w(transformer_name), **f32),
    )
    pipe.save_pretrained(out)


def write_judge(out: str) -> None:
    from .judge import ToyJudge

    ToyJudge.from_pretrained(_w("judge"), torch_dtype=torch.float32).save_pretrained(out)


def write_latent_lpips(out: str, name: str) -> None:
    from ..latent_lpips import LatentLPIPS

    LatentLPIPS.from_pretrained(_w(name)).save_pretrained(out)


def weights_fingerprint() -> str:
    """sha256 over the committed weight files, so a world built from other weights is rebuilt."""
    import hashlib

    digest = hashlib.sha256()
    for root, _, names in sorted(os.walk(WEIGHTS)):
        for name in sorted(names):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, WEIGHTS).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


@contextmanager
def one_builder_at_a_time(out: str) -> Iterator[None]:
    """Hold an exclusive lock on out/.build.lock: builds started together (parallel test workers) take turns,
    and the later ones find the parts complete."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ".build.lock"), "a") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no file locks, builds are not to be started together
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def build(out: str = DEFAULT_OUT, train_images: int = 2000, test_images: int = 500, shard_size: int = 500,
          seed: int = 0, resolution: int = 32, force: bool = False) -> str:
    """Write the whole toy world under `out` (idempotent) and return its path."""
    from tqdm.auto import tqdm

    parts = [
        ("data/train", lambda p: data.write_imagefolder(p, train_images, seed, resolution)),
        ("data/test", lambda p: data.write_imagefolder(p, test_images, seed + 1, resolution)),
        ("data/shards", lambda p: data.write_webdataset(p, train_images, seed, resolution, shard_size)),
        ("models/sd", write_sd),
        ("models/sdxl", write_sdxl),
        ("models/flux", lambda p: write_flux(p, "flux_transformer")),
        ("models/flux-guidance", lambda p: write_flux(p, "flux_guidance_transformer")),
        ("judge", write_judge),
        ("latent_lpips/sd", lambda p: write_latent_lpips(p, "latent_lpips_sd")),
        ("latent_lpips/flux", lambda p: write_latent_lpips(p, "latent_lpips_flux")),
    ]
    stamp = os.path.join(out, "weights.fingerprint")
    fingerprint = weights_fingerprint()
    with one_builder_at_a_time(out):
        stale = not os.path.exists(stamp) or open(stamp).read().strip() != fingerprint
        for rel, write in tqdm(parts, desc="toy world", leave=False):
            path = os.path.join(out, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _atomic(path, write, force or (stale and not rel.startswith("data")))
        with open(stamp, "w") as f:
            f.write(fingerprint + "\n")
    return out
