"""Loading a teacher's components and encoding prompts, shared by every recipe and by inference.

One code path serves a hub id and a local folder: every component comes from
`Class.from_pretrained(path, subfolder=..., revision=..., variant=...)` (configs from
`Class.load_config(path, subfolder=...)`), so the toy world is loaded exactly like a real model.

Architectures (detected from model_index.json and the denoiser's config):
    sd    UNet2DConditionModel without additional embeddings (SD 1.x / 2.x family)
    sdxl  UNet2DConditionModel with addition_embed_type "text_time" (SDXL, SSD-1B)
    flux  FluxTransformer2DModel (FLUX.1, with or without guidance embedding)
Bad input (a missing folder, a folder that is not a pipeline, the wrong architecture) raises
`UserError` with one line naming the path or flag.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import transformers
from diffusers import (AutoencoderKL, DDPMScheduler, DiffusionPipeline, FluxTransformer2DModel,
                       UNet2DConditionModel)
from torch import Tensor
from transformers import (CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel,
                          T5TokenizerFast)

from . import sharding
from .errors import UserError

logger = logging.getLogger(__name__)

ARCHITECTURES = ("sd", "sdxl", "flux")

# Denoiser class named in model_index.json -> the subfolder it lives in.
DENOISERS = {"UNet2DConditionModel": "unet", "FluxTransformer2DModel": "transformer"}

# Per architecture: (subfolder, default class) of each tokenizer and text encoder, in the order the
# encode_prompt_* functions expect them.
TOKENIZERS = {
    "sd": [("tokenizer", CLIPTokenizer)],
    "sdxl": [("tokenizer", CLIPTokenizer), ("tokenizer_2", CLIPTokenizer)],
    "flux": [("tokenizer", CLIPTokenizer), ("tokenizer_2", T5TokenizerFast)],
}
TEXT_ENCODERS = {
    "sd": [("text_encoder", CLIPTextModel)],
    "sdxl": [("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)],
    "flux": [("text_encoder", CLIPTextModel), ("text_encoder_2", T5EncoderModel)],
}

VAE_FLAG = "--pretrained_vae_model_name_or_path"
TEACHER_FLAG = "--pretrained_teacher_model"
T5_MAX_SEQUENCE_LENGTH = 512  # FLUX.1 was trained with at most 512 T5 tokens

# "owner/name" as the hub spells repository ids; anything else that does not exist is a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------- paths and configs


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors run to paragraphs)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def looks_like_hub_id(path: str) -> bool:
    """True for an 'owner/name' string that is not an existing local path."""
    return not os.path.exists(path) and bool(_HUB_ID.match(path)) and ".." not in path


def _check_exists(path: str, flag: str | None = None) -> None:
    """Raise UserError for a local-looking path that does not exist (hub ids are left to the loaders)."""
    if not os.path.exists(path) and not looks_like_hub_id(path):
        where = f" ({flag})" if flag else ""
        raise UserError(f"{path} does not exist{where}")


def _unloadable(path: str, exc: BaseException, what: str, flag: str | None) -> UserError:
    """The one-line UserError for a path the libraries could not load."""
    where = f" ({flag})" if flag else ""
    if looks_like_hub_id(path):
        # Our machines are offline, so a typo'd local path that happens to look like owner/name lands here too.
        return UserError(f"{path} is not a local folder and could not be loaded from the hub as {what}"
                         f" (offline machines can't download){where}: {_first_line(exc)}")
    return UserError(f"{path}: could not load {what}{where}: {_first_line(exc)}")


def pipeline_index(path: str, revision: str | None = None, flag: str | None = None) -> dict[str, Any]:
    """The pipeline's model_index.json as a dict; UserError if `path` is not a diffusers pipeline."""
    _check_exists(path, flag)
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        where = f" ({flag})" if flag else ""
        raise UserError(f"{path} is not a diffusers pipeline folder (no model_index.json){where}")
    try:
        return dict(DiffusionPipeline.load_config(path, revision=revision))
    except OSError as exc:  # EnvironmentError is OSError: missing files, failed downloads, bad JSON
        raise _unloadable(path, exc, "a diffusers pipeline", flag) from exc


def component_class(index: dict[str, Any], name: str) -> str | None:
    """Class name of component `name` in a model_index dict, or None when absent or null."""
    entry = index.get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
        return str(entry[1])
    return None


def load_config(cls: Any, path: str, subfolder: str, revision: str | None, flag: str | None = None) -> dict:
    """cls.load_config(path, subfolder=...) as a dict, with library errors turned into a UserError."""
    try:
        return dict(cls.load_config(path, subfolder=subfolder, revision=revision))
    except OSError as exc:
        raise _unloadable(path, exc, f"the {subfolder} config", flag) from exc


def load_pretrained(cls: Any, path: str, flag: str | None = None, **kwargs: Any) -> Any:
    """cls.from_pretrained(path, **kwargs), with library errors turned into a UserError."""
    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(path, **kwargs)
    # ValueError: e.g. a variant or dtype the folder does not have; SafetensorError: a truncated weights file
    except (OSError, ValueError, SafetensorError) as exc:
        what = f"{cls.__name__} ({kwargs['subfolder']})" if kwargs.get("subfolder") else cls.__name__
        raise _unloadable(path, exc, what, flag) from exc


# ----------------------------------------------------------------------------- architecture


def detect_architecture(path: str, revision: str | None = None, flag: str | None = None) -> str:
    """'sd', 'sdxl' or 'flux' for the pipeline at `path` (a local folder or a hub id)."""
    index = pipeline_index(path, revision, flag)
    where = f" ({flag})" if flag else ""
    transformer, unet = component_class(index, "transformer"), component_class(index, "unet")
    if transformer is None and unet is None:
        raise UserError(f"{path} is not a diffusers pipeline folder (model_index.json names no unet or"
                        f" transformer){where}")
    denoiser, subfolder = (transformer, "transformer") if transformer is not None else (unet, "unet")
    if DENOISERS.get(denoiser) != subfolder:
        raise UserError(f"{path}: unsupported denoiser {denoiser} in {subfolder}/ (supported: FLUX's"
                        f" FluxTransformer2DModel, SD/SDXL's UNet2DConditionModel){where}")
    if subfolder == "transformer":
        return "flux"
    config = load_config(UNet2DConditionModel, path, "unet", revision, flag)
    # SDXL conditions on pooled text embeddings + size/crop ids; SSD-1B keeps that and drops blocks.
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"


def require_architecture(path: str, expected: str | tuple[str, ...], flag: str = "--pretrained_teacher_model",
                         revision: str | None = None) -> str:
    """Detect the architecture and raise UserError naming `flag` unless it is one of `expected`."""
    allowed = (expected,) if isinstance(expected, str) else tuple(expected)
    arch = detect_architecture(path, revision, flag)
    if arch not in allowed:
        raise UserError(f"{path} has architecture {arch}, but this needs {' or '.join(allowed)} ({flag})")
    return arch


def native_resolution(path: str, revision: str | None = None, flag: str | None = None) -> int:
    """The image side a pipeline was trained at, from its configs: UNet sample_size x the VAE's downsampling
    factor (SD 1.5: 64 x 8 = 512, SD 2.x-768: 96 x 8 = 768, SDXL: 128 x 8 = 1024; 64 when the config names none);
    FLUX: its VAE's sample_size (1024 when the config names none)."""
    vae = load_config(AutoencoderKL, path, "vae", revision, flag)
    if detect_architecture(path, revision, flag) == "flux":
        side = vae.get("sample_size") or 1024
    else:
        side = load_config(UNet2DConditionModel, path, "unet", revision, flag).get("sample_size", 64)
        side = (side[0] if isinstance(side, (list, tuple)) else side) * vae_scale_factor(vae)
    return int(side[0] if isinstance(side, (list, tuple)) else side)


# ----------------------------------------------------------------------------- components


def vae_scale_factor(vae_config: Any) -> int:
    """Pixels per latent side: 2^(len(block_out_channels) - 1), as diffusers' pipelines compute it."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def load_vae(path: str, vae_path: str | None = None, revision: str | None = None, variant: str | None = None,
             dtype: torch.dtype = torch.float32, flag: str | None = None) -> AutoencoderKL:
    """AutoencoderKL from `vae_path` (a VAE folder/hub id, no subfolder) if given, else `path`/vae."""
    if vae_path:
        _check_exists(vae_path, VAE_FLAG)
        if os.path.isfile(os.path.join(vae_path, "model_index.json")):
            # A common slip: the flag wants the VAE folder itself, not the pipeline holding it.
            raise UserError(f"{vae_path} is a whole pipeline; pass its VAE folder"
                            f" ({os.path.join(vae_path, 'vae')}) ({VAE_FLAG})")
        # revision/variant name versions of the teacher repo; a separate VAE repo (e.g. the fp16-fix VAE)
        # has its own, so they are not passed on.
        return load_pretrained(AutoencoderKL, vae_path, VAE_FLAG, torch_dtype=dtype)
    _check_exists(path, flag)
    return load_pretrained(AutoencoderKL, path, flag, subfolder="vae", revision=revision, variant=variant,
                           torch_dtype=dtype)


def load_denoiser(path: str, revision: str | None = None, variant: str | None = None,
                  dtype: torch.dtype = torch.float32, flag: str | None = None
                  ) -> UNet2DConditionModel | FluxTransformer2DModel:
    """The UNet (sd, sdxl) or FLUX transformer of the pipeline at `path` (a load error names `flag`)."""
    if detect_architecture(path, revision, flag) == "flux":
        cls, subfolder = FluxTransformer2DModel, "transformer"
    else:
        cls, subfolder = UNet2DConditionModel, "unet"
    return load_pretrained(cls, path, flag, subfolder=subfolder, revision=revision, variant=variant,
                           torch_dtype=dtype)


def _transformers_class(index: dict[str, Any], name: str, default: type) -> type:
    """The transformers class model_index.json names for `name`, or `default` if it names none we have."""
    named = component_class(index, name)
    return getattr(transformers, named, default) if named else default


def load_text_encoders(path: str, arch: str | None = None, revision: str | None = None,
                       variant: str | None = None, dtype: torch.dtype = torch.float32,
                       flag: str | None = None) -> tuple[list, list]:
    """(tokenizers, text_encoders) of the pipeline, frozen and in eval mode, in encode_prompt_* order (a load error
    names `flag`)."""
    arch = arch or detect_architecture(path, revision)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    index = pipeline_index(path, revision)
    for name, _ in TOKENIZERS[arch] + TEXT_ENCODERS[arch]:
        if component_class(index, name) is None:
            raise UserError(f"{path} has no {name}, which a {arch} pipeline needs")
    # Tokenizers use fixed classes: the fast ones read tokenizer.json or convert vocab files, while the
    # class names in model_index.json differ between transformers versions (T5Tokenizer vs T5TokenizerFast).
    tokenizers = [load_pretrained(cls, path, flag, subfolder=name, revision=revision) for name, cls in TOKENIZERS[arch]]
    encoders = []
    for name, default in TEXT_ENCODERS[arch]:
        cls = _transformers_class(index, name, default)
        encoder = load_pretrained(cls, path, flag, subfolder=name, revision=revision, variant=variant, dtype=dtype)
        encoders.append(encoder.eval().requires_grad_(False))
    return tokenizers, encoders


def load_noise_scheduler_config(path: str, revision: str | None = None, flag: str | None = None) -> dict:
    """The config dict of the pipeline's scheduler subfolder (its _class_name included; a load error names `flag`)."""
    _check_exists(path, flag)
    # load_config only reads scheduler_config.json; any scheduler class reads the same file, whatever
    # class the file itself names, so this works for DDIM, Euler and flow-matching schedulers alike.
    return load_config(DDPMScheduler, path, "scheduler", revision, flag)


# ----------------------------------------------------------------------------- prompt encoding


def _as_list(prompts: str | Sequence[str]) -> list[str]:
    """A single prompt becomes a batch of one."""
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _token_ids(tokenizer: Any, prompts: list[str], max_length: int) -> Any:
    """Tokenizer output padded and truncated to exactly max_length tokens, as tensors."""
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")


def encode_prompt_sd(prompts: str | Sequence[str], tokenizer: Any, text_encoder: Any) -> Tensor:
    """(B, L, D) last hidden state of the CLIP text encoder, L = tokenizer.model_max_length."""
    tokens = _token_ids(tokenizer, _as_list(prompts), tokenizer.model_max_length)
    device = text_encoder.device
    # A few SD 2.x-era encoders were trained with an attention mask; the pipeline honours the flag too.
    mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


def encode_prompt_sdxl(prompts: str | Sequence[str], tokenizers: Sequence[Any],
                       text_encoders: Sequence[Any]) -> tuple[Tensor, Tensor]:
    """(embeds (B, L, D1 + D2), pooled (B, P)): penultimate layers of both encoders, encoder 2's text_embeds."""
    prompts = _as_list(prompts)
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = _token_ids(tokenizer, prompts, tokenizer.model_max_length).input_ids
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer (no final norm)
        pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        raise ValueError("the last SDXL text encoder must return text_embeds (CLIPTextModelWithProjection)")
    device, dtype = text_encoders[-1].device, text_encoders[-1].dtype
    embeds = torch.cat([h.to(device) for h in hidden], dim=-1).to(dtype)
    return embeds, pooled


def sdxl_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int],
                  batch_size: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, 6) SDXL micro-conditioning ids: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    Every argument is (height, width) or (top, left) order, as diffusers' pipelines take them:
    original_size=(48, 32) is an image 48 px high and 32 px wide. (Reference training scripts
    that build these from PIL's (width, height) `.size` swap h and w; do not pass `.size` here.)
    """
    values = [*original_size, *crop_top_left, *target_size]
    if len(values) != 6:
        raise ValueError(f"sdxl_time_ids takes three pairs, got {original_size}, {crop_top_left}, {target_size}")
    return torch.tensor([values], dtype=dtype).repeat(batch_size, 1)


@dataclass
class Conditioning:
    """What a UNet is conditioned on: prompt embeddings and, for SDXL, its added_cond_kwargs (text_embeds =
    the pooled embeddings, time_ids = the micro-conditioning); `added` is empty for SD 1.x/2.x."""

    embeds: Tensor
    added: dict

    def cat(self, other: Conditioning) -> Conditioning:
        """Both batches in one (e.g. cond + uncond for one CFG forward)."""
        return Conditioning(torch.cat([self.embeds, other.embeds]),
                            {k: torch.cat([v, other.added[k]]) for k, v in self.added.items()})

    def expand_as(self, other: Conditioning) -> Conditioning:
        """This (batch of one) repeated to `other`'s batch; keys this one lacks are taken from `other`."""
        return Conditioning(self.embeds.expand_as(other.embeds),
                            {k: self.added[k].expand_as(v) if k in self.added else v for k, v in other.added.items()})

    def unet_kwargs(self, dtype: torch.dtype) -> dict:
        """encoder_hidden_states and added_cond_kwargs of a UNet2DConditionModel call, in `dtype`."""
        return {"encoder_hidden_states": self.embeds.to(dtype),
                "added_cond_kwargs": {k: v.to(dtype) for k, v in self.added.items()} or None}


def unet_conditioning(text: Sequence[Tensor], batch: dict | None = None, resolution: int | None = None,
                      fixed_size: bool = False) -> Conditioning:
    """Conditioning from Teacher.encode's (embeds,) or (embeds, pooled); SDXL's time ids per image: its
    original size and crop from `batch`, target = resolution (fixed_size or no batch: (r, r, 0, 0, r, r);
    no resolution: none, for a branch that takes each image's own later, see Conditioning.expand_as)."""
    embeds, *pooled = text
    if not pooled:
        return Conditioning(embeds, {})
    if resolution is None:
        return Conditioning(embeds, {"text_embeds": pooled[0]})
    r, n = resolution, embeds.shape[0]
    if fixed_size or batch is None:
        time_ids = sdxl_time_ids((r, r), (0, 0), (r, r), n)
    else:
        time_ids = torch.cat([sdxl_time_ids(tuple(o), tuple(c), (r, r))
                              for o, c in zip(batch["original_sizes"], batch["crop_top_lefts"])])
    return Conditioning(embeds, {"text_embeds": pooled[0], "time_ids": time_ids.to(embeds.device)})


def flux_max_sequence_length(tokenizer_2: Any) -> int:
    """T5 sequence length for FLUX: the tokenizer's limit, at most 512."""
    return min(T5_MAX_SEQUENCE_LENGTH, int(tokenizer_2.model_max_length))


def encode_prompt_flux(prompts: str | Sequence[str], tokenizers: Sequence[Any], text_encoders: Sequence[Any],
                       max_sequence_length: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(T5 embeds (B, L, D), CLIP pooled (B, P), text_ids zeros (L, 3)) as FluxPipeline encodes them."""
    prompts = _as_list(prompts)
    clip_tok, t5_tok = tokenizers
    clip, t5 = text_encoders
    length = max_sequence_length or flux_max_sequence_length(t5_tok)
    clip_ids = _token_ids(clip_tok, prompts, clip_tok.model_max_length).input_ids
    pooled = clip(clip_ids.to(clip.device), output_hidden_states=False).pooler_output.to(clip.dtype)
    t5_ids = _token_ids(t5_tok, prompts, length).input_ids
    embeds = t5(t5_ids.to(t5.device), output_hidden_states=False)[0].to(t5.dtype)
    # Text tokens carry no position in FLUX's 3-axis RoPE: all ids are zero.
    text_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=clip.dtype)
    return embeds, pooled, text_ids


def encode_prompts(arch: str, prompts: str | Sequence[str], tokenizers: Sequence[Any],
                   text_encoders: Sequence[Any], **kwargs: Any) -> dict[str, Tensor]:
    """Encode prompts for `arch` into a dict of named tensors (the keyword names the pipelines use)."""
    if arch == "sd":
        return {"prompt_embeds": encode_prompt_sd(prompts, tokenizers[0], text_encoders[0], **kwargs)}
    if arch == "sdxl":
        embeds, pooled = encode_prompt_sdxl(prompts, tokenizers, text_encoders, **kwargs)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if arch == "flux":
        embeds, pooled, text_ids = encode_prompt_flux(prompts, tokenizers, text_encoders, **kwargs)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids}
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


# ----------------------------------------------------------------------------- FLUX latent packing


@torch.no_grad()
def encode_latents(vae: Any, pixel_values: Tensor, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """z = scaling_factor * (a sample of q(z | x) - shift_factor), in chunks of batch_size to bound memory."""
    latents = [vae.encode(chunk).latent_dist.sample(generator) for chunk in pixel_values.split(batch_size)]
    return scale_latents(vae, torch.cat(latents))


def scale_latents(vae: Any, z: Tensor) -> Tensor:
    """The denoiser's latents from raw VAE latents: (z - shift_factor) * scaling_factor (decode_latents' inverse)."""
    return (z - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor


def decode_latents(vae: Any, latents: Tensor) -> Tensor:
    """Images in [-1, 1] from latents as the denoiser sees them: vae.decode(z / scaling_factor + shift_factor)."""
    z = latents / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
    return vae.decode(z.to(vae.dtype)).sample.clamp(-1, 1)


def _check_even(height: int, width: int) -> None:
    """FLUX packs 2x2 latent patches, so both latent sides must be even."""
    if height % 2 or width % 2:
        raise ValueError(f"FLUX latents need even height and width, got {height}x{width}")


def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch becomes one token, row-major over patches."""
    b, c, h, w = latents.shape
    _check_even(h, w)
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2)
    # token order (patch row, patch col); features ordered (channel, dy, dx)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W), the inverse of pack_latents for latent height/width H, W."""
    b, n, d = packed.shape
    _check_even(height, width)
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"packed latents {tuple(packed.shape)} do not fit a {height}x{width} latent")
    patches = packed.reshape(b, height // 2, width // 2, d // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> Tensor:
    """(H/2 * W/2, 3) RoPE ids (0, patch row, patch col) of the packed tokens of an H x W latent."""
    _check_even(height, width)
    rows = torch.arange(height // 2).repeat_interleave(width // 2)
    cols = torch.arange(width // 2).repeat(height // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(torch.float32)
    return ids.to(device=device, dtype=dtype)


def enable_xformers(model: Any, requested: bool) -> None:
    """Use xformers attention if asked and possible; otherwise say why and keep PyTorch SDPA."""
    if not requested:
        return
    if not torch.cuda.is_available():
        logger.warning("--enable_xformers_memory_efficient_attention: no CUDA device; using PyTorch SDPA attention")
        return
    try:
        import xformers  # noqa: F401
    except ImportError:
        logger.warning("--enable_xformers_memory_efficient_attention: xformers is not installed; using PyTorch SDPA")
        return
    model.enable_xformers_memory_efficient_attention()


def prepare_denoiser(model: torch.nn.Module, args: Any) -> None:
    """In place, after every adapter is added: --enable_xformers_memory_efficient_attention,
    --merged_lora_forward, --channels_last and --torch_compile (Module.compile keeps the state-dict keys)."""
    from . import merged_lora

    enable_xformers(model, args.enable_xformers_memory_efficient_attention)
    if getattr(args, "merged_lora_forward", False):
        merged_lora.enable(model)
    if getattr(args, "channels_last", False):
        model.to(memory_format=torch.channels_last)
    if getattr(args, "torch_compile", False):
        model.compile(dynamic=False)  # a few fixed shapes per run: no symbolic-shape guards


def load_frozen_vae(args: Any, device: torch.device | str, dtype: torch.dtype) -> Any:
    """The (possibly separate) VAE, frozen, on `device`; --resolution checked against its downsampling."""
    vae = load_vae(args.pretrained_teacher_model, args.pretrained_vae_model_name_or_path, args.revision,
                   args.variant, flag=TEACHER_FLAG).requires_grad_(False).eval()
    factor = vae_scale_factor(vae.config)
    if args.resolution % factor:
        raise UserError(f"--resolution {args.resolution} is not a multiple of the VAE's downsampling factor {factor}")
    # the VAE stays fp32 when its config asks for it (SD-family VAEs overflow in fp16)
    return vae.to(device, torch.float32 if vae.config.get("force_upcast", False) else dtype)


@dataclass
class Teacher:
    """A teacher pipeline's parts: the frozen VAE and text encoders (on the run's device, in its mixed-precision
    dtype unless the VAE must stay fp32), the denoiser as loaded (on the CPU, fp32 or with `frozen_denoiser` the
    run's dtype: the recipe decides its copies), and the noise schedule (alphas_cumprod and prediction_type for a
    DDPM teacher, None for flow matching)."""

    arch: str  # "sd", "sdxl" or "flux"
    scheduler_config: dict
    vae: Any
    tokenizers: list
    text_encoders: list
    denoiser: Any
    dtype: torch.dtype  # the mixed-precision dtype of frozen models
    alphas_cumprod: Tensor | None = None
    prediction_type: str | None = None
    latent_side: int | None = None  # --resolution in latent pixels
    zeros_for_empty_prompt: bool = False  # the pipeline's uncond for an empty negative prompt: zeros, not its encoding
    text_cache: Any = None  # set by release_text_encoders: the cached outputs that stand in for the encoders

    def encode(self, prompts: str | Sequence[str]) -> tuple[Tensor, ...]:
        """(embeds,) for SD, (embeds, pooled) for SDXL, (embeds, pooled, text_ids) for FLUX."""
        return tuple(encode_prompts(self.arch, prompts, self.tokenizers, self.text_encoders).values())

    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] from (unpacked) latents as the denoiser sees them (differentiable)."""
        return decode_latents(self.vae, latents)

    def uncond_text(self, empty: tuple[Tensor, ...], mode: str = "auto") -> tuple[Tensor, ...]:
        """The unconditional input of the teacher's CFG from `empty`, the empty prompt's encode(): itself, or zeros
        of its shapes with --uncond zeros, or with auto where the pipeline feeds zeros for an empty negative prompt."""
        zeros = mode == "zeros" or (mode == "auto" and self.zeros_for_empty_prompt)
        return tuple(torch.zeros_like(x) for x in empty) if zeros else tuple(empty)

    def release_text_encoders(self, text_cache: Any) -> None:
        """Free the text encoders once `text_cache` (--cache_text_embeddings) holds every prompt the run encodes:
        `text_encoders` becomes [], and a lookup of a caption the cache lacks fails in one line."""
        import gc

        self.text_encoders.clear()  # in place: whoever holds this list lets go of the encoders too
        self.text_cache = text_cache
        text_cache.release_encoders()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("text encoders freed: their outputs for every prompt of this run are cached "
                    "(--cache_text_embeddings)")

    def prompt_kwargs(self, prompts: list[str], device: Any) -> dict[str, Any]:
        """A diffusers pipeline's prompt arguments for `prompts` without CFG: the prompts, or their cached embeddings
        (prompt_embeds, SDXL's pooled_prompt_embeds) once the encoders are freed."""
        if self.text_encoders:
            return {"prompt": prompts}
        text = self.text_cache.lookup(prompts, device, self.dtype)
        return dict(zip(("prompt_embeds", "pooled_prompt_embeds"), text))

    def lora_base(self, accelerator: Any) -> Any:
        """The frozen denoiser a LoRA trains on, in the run's dtype, where accelerator.prepare() takes it from: the
        run's device, or the CPU when prepare() splits the model (sharding.staging_device)."""
        return self.denoiser.to(sharding.staging_device(accelerator), self.dtype)


def teacher_alphas_cumprod(scheduler_config: dict) -> Tensor:
    """a_t of the teacher's DDPM schedule, clamped as solvers.clamp_alphas_cumprod does (zero-terminal SNR)."""
    from .solvers import clamp_alphas_cumprod

    return clamp_alphas_cumprod(DDPMScheduler.from_config(scheduler_config).alphas_cumprod)


def load_teacher(args: Any, accelerator: Any, archs: str | tuple[str, ...], frozen_denoiser: bool = False) -> Teacher:
    """The teacher of --pretrained_teacher_model (one of `archs`) with --pretrained_vae_model_name_or_path,
    --revision and --variant; --resolution checked against the VAE's downsampling. `frozen_denoiser`: the denoiser
    is only ever used frozen in the run's dtype (a LoRA's base), so it loads in that dtype; else in fp32."""
    from .solvers import PREDICTION_TYPES

    path, device = args.pretrained_teacher_model, accelerator.device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    arch = require_architecture(path, archs, revision=args.revision)
    config = load_noise_scheduler_config(path, args.revision, TEACHER_FLAG)
    alphas_cumprod = prediction_type = None
    if arch != "flux":
        prediction_type = config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"teacher's scheduler has prediction_type {prediction_type!r}; supported: "
                            f"{', '.join(PREDICTION_TYPES)} (--pretrained_teacher_model)")
        alphas_cumprod = teacher_alphas_cumprod(config).to(device)
    with sharding.loaded_whole(accelerator):  # ZeRO-3 would split every model as it loads; prepare() does
        vae = load_frozen_vae(args, device, dtype)
        latent_side = args.resolution // vae_scale_factor(vae.config)
        if arch == "flux" and latent_side % 2:  # said before the transformer loads
            raise UserError(f"--resolution {args.resolution}: FLUX packs 2x2 latent patches, so it must be a "
                            f"multiple of {2 * vae_scale_factor(vae.config)}")
        # frozen weights load straight into the run's dtype: no transient fp32 copy (a 2.6 B UNet: 10 GB) ever exists
        tokenizers, encoders = load_text_encoders(path, arch, args.revision, args.variant, dtype, TEACHER_FLAG)
        for encoder in encoders:
            encoder.to(device)
        denoiser = load_denoiser(path, args.revision, args.variant, dtype if frozen_denoiser else torch.float32,
                                 TEACHER_FLAG).requires_grad_(False)
    # SDXL pipelines feed zero embeddings as the uncond of an empty negative prompt unless their index says not to
    zeros = arch == "sdxl" and pipeline_index(path, args.revision).get("force_zeros_for_empty_prompt", True)
    return Teacher(arch, config, vae, tokenizers, encoders, denoiser, dtype, alphas_cumprod, prediction_type,
                   latent_side, zeros)
