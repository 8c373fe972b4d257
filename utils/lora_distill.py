"""What the UNet LoRA distillation recipes (LCM-LoRA, TCD) share that is not their algorithm.

One UNet holds teacher (adapters off) and student (adapters on); with --train_text_encoder_lora the text
encoders carry a LoRA too, the student conditioning on the adapted encoders and the teacher on the base
ones. Here: `LoRARun` (models, data, optimizer, RNG, EMA, each batch's inputs, the final save), the prompt
conditioning of teacher and student, the teacher's unconditional input, the UNet call in float32, the
sampling pipeline of the LoRA UNet, its validation grid, and the model card's note on encoder LoRAs. The
recipes keep their loss and their loop.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import cache, loop, lora, models, outputs
from .consistency import LCMSchedule
from .ema import EMAParams
from .grids import log_image_grid
from .lora_files import save_trained_lora
from .models import Conditioning, unet_conditioning

logger = logging.getLogger(__name__)
ENCODER_FOLDERS = ["text_encoder", "text_encoder_2"]  # where a text-encoder LoRA is saved, as diffusers names them


def encode_text(arch: str, captions: list[str], tokenizers, encoders) -> tuple:
    """(embeds,) for SD 1.x, (embeds, pooled) for SDXL."""
    return tuple(models.encode_prompts(arch, captions, tokenizers, encoders).values())


def conditioning(args, arch: str, batch: dict, tokenizers, encoders, text: tuple | None = None) -> Conditioning:
    """Prompt embeddings and UNet kwargs (SDXL: pooled embeds + each image's time ids) for a batch.

    text: the batch's encode_text() output when already known (the --cache_text_embeddings lookup).
    """
    text = text if text is not None else encode_text(arch, batch["captions"], tokenizers, encoders)
    return unet_conditioning(text, batch, args.resolution)


@torch.no_grad()
def base_text(arch: str, captions: list[str], tokenizers, encoders) -> tuple:
    """encode_text() of the base text encoders: any encoder LoRA is switched off meanwhile."""
    with lora.adapters_disabled(*encoders):
        return encode_text(arch, captions, tokenizers, encoders)


def teacher_conditioning(args, arch: str, batch: dict, tokenizers, encoders, device, text_cache=None,
                         dtype: torch.dtype | None = None) -> Conditioning:
    """conditioning() of the base text encoders (from --cache_text_embeddings' file, in `dtype`, when there is one)."""
    if text_cache is not None:
        text = text_cache.lookup(batch["captions"], device, dtype)
    else:
        text = base_text(arch, batch["captions"], tokenizers, encoders)
    return conditioning(args, arch, batch, tokenizers, encoders, text)


@torch.no_grad()
def teacher_uncond(args, teacher: models.Teacher, text_cache=None) -> Conditioning:
    """The teacher's unconditional input from its base text encoders (or their cached outputs): the empty prompt or
    zeros (--uncond); SDXL's time ids are left out, so the loss's expand_as gives each image its own, as SDXL
    pipelines sample CFG."""
    if text_cache is not None:
        empty = text_cache.lookup([""], teacher.vae.device, teacher.dtype)
    else:
        empty = base_text(teacher.arch, [""], teacher.tokenizers, teacher.text_encoders)
    return unet_conditioning(teacher.uncond_text(empty, args.uncond))


class Prepared:
    """A prepared (possibly DDP-wrapped) model whose calls go through the wrapper (gradient sync) while
    attributes (`device`, `dtype`, `config`) come from the model itself, as the prompt encoders read them."""

    def __init__(self, wrapped, model):
        self._wrapped, self._model = wrapped, model

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def unet_output(unet, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, dtype, autocast=nullcontext) -> torch.Tensor:
    """The UNet's prediction at (x, t) under `cond`, in float32."""
    with autocast():
        out = unet(x.to(dtype), t, **cond.unet_kwargs(dtype)).sample
    return out.float()


def lora_pipeline(unet, teacher: models.Teacher, scheduler) -> Any:
    """The LoRA UNet in the teacher's pipeline class, with the teacher's other parts and `scheduler`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    vae, tokenizers, encoders = teacher.vae, teacher.tokenizers, teacher.text_encoders or [None, None]
    if teacher.arch == "sd":
        return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler)


@torch.no_grad()
@torch.random.fork_rng()  # sampling must not move the training RNG
def validation_grid(accelerator, args, pipe, prompts: list[str], step: int, label: str,
                    prompt_kwargs: dict | None = None, **call: Any) -> None:
    """Samples of `pipe` at 1/2/4/8 steps, no CFG, image i from seed + i (`prompt_kwargs`: the prompts' pipeline
    arguments, default prompt=prompts; `call`: more pipeline kwargs); a labelled grid to the trackers and a PNG; rows
    are labelled "<label>, <n> steps, CFG 1"."""
    pipe.set_progress_bar_config(disable=True)
    rows, labels = [], []
    for steps in (1, 2, 4, 8):
        gens = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
        with accelerator.autocast():
            images = pipe(**(prompt_kwargs or {"prompt": prompts}), num_inference_steps=steps, guidance_scale=1.0,
                          generator=gens, height=args.resolution, width=args.resolution, output_type="pt",
                          **call).images
        rows.append(images.float().cpu() * 2 - 1)
        labels.append(f"{label}, {steps} step{'s' if steps > 1 else ''}, CFG 1")
    path = log_image_grid(accelerator, rows, labels, step, args.output_dir, column_labels=prompts)
    logger.info(f"validation grid -> {path}")


def encoder_lora_note(args, trained_encoders: int) -> str:
    """The model card's paragraph on the text encoders' LoRA ("" when none was trained)."""
    if not trained_encoders:
        return ""
    folders = ", ".join(f"`{args.output_dir}/{n}`" for n in ENCODER_FOLDERS[:trained_encoders])
    return (f"\nThe text encoders carry a LoRA too (rank {args.text_encoder_lora_rank}): `load_lora_weights` "
            f"loads it with the UNet's; PEFT folders {folders}; `lora_te*` keys in the kohya file "
            "(`convert_lora.py` converts UNet LoRAs only).\n")


@dataclass
class LoRARun:
    """A UNet LoRA recipe's training state: the prepared models, data, optimizer and what its loss draws on."""

    accelerator: Any
    teacher: models.Teacher
    unet: Any  # prepared (possibly wrapped): the student's calls go through it
    base: Any  # the same UNet unwrapped, whose adapters the teacher's pass switches off
    encoders: list  # the text encoders, unwrapped
    student_encoders: list  # Prepared views of the trained encoders ([] without --train_text_encoder_lora)
    trained_encoders: list
    params: list
    optimizer: Any
    lr_scheduler: Any
    dataloader: Any
    max_steps: int
    text_cache: Any
    rng: loop.TrainingRNG
    ema: EMAParams | None
    schedule: LCMSchedule
    uncond: Conditioning

    @property
    def dtype(self) -> torch.dtype:
        return self.teacher.dtype

    def inputs(self, args, batch: dict) -> tuple[torch.Tensor, Conditioning, Callable[[], Conditioning] | None]:
        """(latents, the teacher's conditioning, the student's conditioning as a call or None) of a batch, after
        caption dropout (--proportion_empty_prompts) for student and teacher alike."""
        arch, tokenizers, device = self.teacher.arch, self.teacher.tokenizers, self.accelerator.device
        latents = cache.latents_of_batch(batch, self.teacher.vae, args.vae_encode_batch_size, self.rng.generator,
                                         device)
        if args.proportion_empty_prompts > 0:
            drop = torch.rand(len(latents), generator=self.rng.generator, device=device) < args.proportion_empty_prompts
            batch = {**batch, "captions": ["" if d else c for c, d in zip(batch["captions"], drop.tolist())]}
        # the teacher's conditioning: the base encoders (without --train_text_encoder_lora: everyone's)
        teacher_cond = teacher_conditioning(args, arch, batch, tokenizers, self.encoders, device, self.text_cache,
                                            self.dtype)
        if not self.student_encoders:
            return latents, teacher_cond, None
        # the student's (and target's): the adapted encoders, called inside the loss (with grad into their LoRA)
        return latents, teacher_cond, lambda: conditioning(args, arch, batch, tokenizers, self.student_encoders)

    def finish(self, args, train: loop.TrainLoop, scheduler, validate: Callable, title: str, card: str) -> None:
        """Save the LoRA (and the encoders') in diffusers, PEFT and kohya formats and `scheduler` in out/scheduler,
        validate a last time, write the model card (then --push_to_hub), end training."""
        accelerator = self.accelerator
        save_trained_lora(accelerator, self.base, args.output_dir, "unet",
                          text_encoders=dict(zip(ENCODER_FOLDERS, self.trained_encoders)))
        if accelerator.is_main_process:
            scheduler.save_pretrained(os.path.join(args.output_dir, "scheduler"))
        if train.validation_prompts and train.samples_here:
            validate(accelerator, args, self.base, self.teacher, train.validation_prompts, train.global_step)
        if accelerator.is_main_process:  # README.md, then --push_to_hub
            outputs.publish(args, title, card)
        accelerator.end_training()


def start_lora_run(args) -> LoRARun:
    """Accelerator and seed; the teacher (SDXL family or SD 1.x) with one UNet = frozen base + trainable LoRA (and
    the encoders' with --train_text_encoder_lora); data; optimizer and LR schedule; the loss's RNG and the EMA
    target (both saved in checkpoints); the skip grid; the teacher's unconditional input."""
    from accelerate.utils import set_seed

    accelerator = loop.make_accelerator(args)
    set_seed(args.seed)
    teacher = models.load_teacher(args, accelerator, ("sdxl", "sd"), frozen_denoiser=True)
    arch, vae, tokenizers, encoders = teacher.arch, teacher.vae, teacher.tokenizers, teacher.text_encoders
    unet = teacher.lora_base(accelerator)  # on the CPU if prepare() splits it
    lora.add_trainable_lora(unet, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout,
                            dtype=args.lora_torch_dtype)
    if args.train_text_encoder_lora:  # after the UNet's LoRA: its initialisation stays that of a run without
        lora.add_text_encoder_lora(encoders, arch == "sdxl", args.text_encoder_lora_rank, args.lora_alpha,
                                   args.lora_dropout, args.lora_torch_dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    models.prepare_denoiser(unet, args)  # xformers, --merged_lora_forward, --channels_last, --torch_compile

    # data (--cache_latents: VAE posteriors instead of pixels; --cache_text_embeddings: the teacher's text)
    dataloader, max_steps, captions = loop.make_train_data(args, accelerator, vae)
    text_cache = None
    if args.cache_text_embeddings:
        text_cache = cache.cached_text_embeddings(
            args, captions, lambda prompts: base_text(arch, prompts, tokenizers, encoders), encoders, accelerator)

    # optimizer; prepared encoders are saved in every checkpoint and sync their gradients across processes
    trained_encoders = encoders if args.train_text_encoder_lora else []
    optimizer, lr_scheduler = loop.make_optimizer(
        [*unet.parameters(), *(p for e in trained_encoders for p in e.parameters())], args, max_steps,
        accelerator.num_processes)
    unet, *wrapped, optimizer, lr_scheduler = accelerator.prepare(unet, *trained_encoders, optimizer, lr_scheduler)
    encoders = [accelerator.unwrap_model(e) for e in encoders]
    params = [p for m in (unet, *wrapped) for p in m.parameters() if p.requires_grad]
    rng = loop.TrainingRNG(args.seed, accelerator.device, accelerator.process_index)
    accelerator.register_for_checkpointing(rng)
    base = accelerator.unwrap_model(unet)
    ema = EMAParams(params, args.ema_decay, base) if args.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    schedule = LCMSchedule.of_teacher(teacher.alphas_cumprod, args.num_ddim_timesteps, teacher.prediction_type)
    uncond = teacher_uncond(args, teacher, text_cache)
    if text_cache is not None and not trained_encoders:  # every prompt is cached: the encoders' memory is free
        teacher.release_text_encoders(text_cache)
        encoders = []
    return LoRARun(accelerator, teacher, unet, base, encoders, [Prepared(w, e) for w, e in zip(wrapped, encoders)],
                   trained_encoders, params, optimizer, lr_scheduler, dataloader, max_steps, text_cache, rng, ema,
                   schedule, uncond)
