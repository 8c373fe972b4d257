"""LCM-LoRA: latent consistency distillation into a LoRA of an SDXL (SSD-1B, SD 1.x) teacher.

    accelerate launch train_lcm_distill_lora_sdxl.py --pretrained_teacher_model <hub id or folder> \
        --train_data_dir <imagefolder> --output_dir out/ --max_train_steps 1000

The recipe (Luo et al. 2023, "LCM-LoRA"): the same consistency distillation as
train_lcm_distill_sd.py, with ONE UNet in memory:
  - student = the UNet with the LoRA enabled (only the LoRA trains; no guidance embedding: the
    teacher's CFG scale w ~ U[w_min, w_max] is baked in);
  - teacher = the same UNet with the LoRA disabled, cond + uncond in ONE batched forward, one DDIM
    step t -> s with CFG on x0 and eps;
  - target = the online student (with --ema_decay: its EMA) at (x_s, s) under no_grad;
    loss d(f(x_t, t), stopgrad f(x_s, s)).
With --train_text_encoder_lora the text encoders get a LoRA too (CLIP attention projections): the student
and the target condition on the adapted encoders, the teacher on the base ones (adapters disabled).
SDXL conditioning: two text encoders (penultimate states concatenated, pooled embeds of encoder 2)
and the micro-conditioning time ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w) of
each image. The architecture (SDXL family or SD 1.x) is read from the teacher's UNet config.

Output: `pytorch_lora_weights.safetensors` (diffusers: `pipe.load_lora_weights(out)`), a PEFT
adapter folder `out/unet` (`PeftModel.from_pretrained(pipe.unet, out/unet)`; with the encoder LoRA also
`out/text_encoder`, `out/text_encoder_2`), the same LoRA with kohya/ComfyUI key names (`lora_kohya.safetensors`), and a model card. Sample with LCMScheduler,
2-8 steps, guidance_scale 0 or 1.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
from contextlib import nullcontext
from typing import Callable

import torch

from utils import cache, flags, lora, loop, models, outputs
from utils.consistency import LCMSchedule, consistency_fn, scalings_for_boundary_conditions
from utils.ema import EMAParams
from utils.errors import user_errors
from utils.grids import log_image_grid
from utils.lora_files import save_trained_lora
from utils.losses import consistency_loss
from utils.models import Conditioning, unet_conditioning
from utils.scheduling_lcm import lcm_scheduler
from utils.solvers import alpha_sigma, ddim_cfg_step, ddim_step, previous_timestep, x0_eps_from_model_output

logger = logging.getLogger("train_lcm_distill_lora_sdxl")
ENCODER_FOLDERS = ["text_encoder", "text_encoder_2"]  # where a text-encoder LoRA is saved, as diffusers names them


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = flags.Parser(description=__doc__.split("\n\n")[0])
    m = parser.add_teacher_args("SDXL, SSD-1B or SD 1.x pipeline: hub id or local diffusers folder")
    parser.add_lora_args(m, "lcm", '"lcm" (the TLCM/LCM-LoRA list: attention, projections, feed-forward, resnet '
                                   'convs, up/down-samplers, time_emb_proj), "diffusers" (to_q,to_k,to_v,to_out.0), '
                                   'or a comma list', presets=("lcm", "diffusers"))
    m.add_argument("--train_text_encoder_lora", action="store_true",
                   help="also train a LoRA on the text encoders' attention projections (q/k/v/out_proj; SDXL: both "
                        "encoders): the student conditions on the adapted encoders, the teacher on the base ones. "
                        "Off by default (LCM-LoRA adapts the UNet only)")
    m.add_argument("--text_encoder_lora_rank", type=int, default=None,
                   help="rank of the text-encoder LoRA (default: --lora_rank)")
    parser.add_data_args()
    parser.add_lcm_args(w_min=3.0, w_max=15.0)
    parser.add_training_args()
    parser.set_defaults(learning_rate=1e-4)
    args = parser.parse_args(argv)
    if args.text_encoder_lora_rank is None:
        args.text_encoder_lora_rank = args.lora_rank
    elif args.text_encoder_lora_rank < 1:
        parser.error(f"--text_encoder_lora_rank must be at least 1, got {args.text_encoder_lora_rank}")
    return parser.check(args)


def encode_text(arch, captions, tokenizers, encoders) -> tuple:
    """(embeds,) for SD 1.x, (embeds, pooled) for SDXL."""
    return tuple(models.encode_prompts(arch, captions, tokenizers, encoders).values())


def conditioning(args, arch, batch, tokenizers, encoders, text=None) -> Conditioning:
    """Prompt embeddings and UNet kwargs (SDXL: pooled embeds + each image's time ids) for a batch.

    text: the batch's encode_text() output when already known (the --cache_text_embeddings lookup).
    """
    text = text if text is not None else encode_text(arch, batch["captions"], tokenizers, encoders)
    return unet_conditioning(text, batch, args.resolution)


@torch.no_grad()
def base_text(arch, captions, tokenizers, encoders) -> tuple:
    """encode_text() of the base text encoders: any encoder LoRA is switched off meanwhile."""
    with lora.adapters_disabled(*encoders):
        return encode_text(arch, captions, tokenizers, encoders)


def teacher_conditioning(args, arch, batch, tokenizers, encoders, device, text_cache=None) -> Conditioning:
    """conditioning() of the base text encoders (from --cache_text_embeddings' file when there is one)."""
    if text_cache is not None:
        text = text_cache.lookup(batch["captions"], device, encoders[-1].dtype)
    else:
        text = base_text(arch, batch["captions"], tokenizers, encoders)
    return conditioning(args, arch, batch, tokenizers, encoders, text)


@torch.no_grad()
def teacher_uncond(args, teacher: models.Teacher) -> Conditioning:
    """The teacher's unconditional input from its base text encoders: the empty prompt or zeros (--uncond); SDXL's
    time ids are left out, so the loss's expand_as gives each image its own, as SDXL pipelines sample CFG."""
    empty = base_text(teacher.arch, [""], teacher.tokenizers, teacher.text_encoders)
    return unet_conditioning(teacher.uncond_text(empty, args.uncond))


class _Prepared:
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


def lcm_lora_loss(unet, latents: torch.Tensor, teacher_cond: Conditioning, uncond: Conditioning,
                  schedule: LCMSchedule, args, gen: torch.Generator, dtype=torch.float32, autocast=nullcontext,
                  ema: EMAParams | None = None, student_cond: Callable[[], Conditioning] | None = None,
                  base=None) -> torch.Tensor:
    """One LCM-LoRA loss: teacher = `unet` with its adapters disabled, student and target = with them.

    `base` is the same UNet unwrapped from its multi-process wrapper (default: `unet`), whose adapters the
    teacher's pass switches off. `args` gives w_min, w_max, timestep_scaling_factor, batched_teacher_cfg,
    loss_type and huber_c. With `ema` the target uses the EMA of the LoRA; `student_cond()` (a text-encoder
    LoRA) gives the student's and the target's conditioning, else they share the teacher's. Every draw
    comes from `gen`.
    """
    bsz, device, pred = latents.shape[0], latents.device, schedule.prediction_type
    t = schedule.grid[torch.randint(0, len(schedule.grid), (bsz,), device=device, generator=gen)]
    s = previous_timestep(t, schedule.k)
    w = torch.empty(bsz, device=device).uniform_(args.w_min, args.w_max, generator=gen)
    c_skip_t, c_out_t = scalings_for_boundary_conditions(t, timestep_scaling=args.timestep_scaling_factor)
    c_skip_s, c_out_s = scalings_for_boundary_conditions(s, timestep_scaling=args.timestep_scaling_factor)
    alpha_t, sigma_t = alpha_sigma(schedule.alphas_cumprod, t)
    alpha_s, sigma_s = alpha_sigma(schedule.alphas_cumprod, s)
    noise = torch.randn(latents.shape, device=device, generator=gen)
    x_t = ddim_step(latents, noise, alpha_t, sigma_t)  # = alpha_t z + sigma_t eps

    def output(x, timesteps, cond):
        return unet_output(unet, x, timesteps, cond, dtype, autocast)

    with torch.no_grad():  # teacher and target first: swapping in EMA weights must precede the graph
        uncond = uncond.expand_as(teacher_cond)  # with the image's own time ids (SDXL)
        with lora.adapters_disabled(base if base is not None else unet):  # the teacher: the base UNet
            if args.batched_teacher_cfg:  # cond + uncond in one forward
                out_c, out_u = output(torch.cat([x_t, x_t]), torch.cat([t, t]), teacher_cond.cat(uncond)).chunk(2)
            else:
                out_c, out_u = output(x_t, t, teacher_cond), output(x_t, t, uncond)
        x_s = ddim_cfg_step(out_c, out_u, x_t, w, alpha_t, sigma_t, alpha_s, sigma_s, pred)  # the teacher's t -> s
        with ema.swapped() if ema is not None else nullcontext():
            target_cond = student_cond() if student_cond is not None else teacher_cond
            x0_target = x0_eps_from_model_output(output(x_s, s, target_cond), x_s, alpha_s, sigma_s, pred)[0]
            f_target = consistency_fn(x_s, x0_target, c_skip_s, c_out_s)
    cond = student_cond() if student_cond is not None else teacher_cond  # with grad into an encoder LoRA
    x0_student = x0_eps_from_model_output(output(x_t, t, cond), x_t, alpha_t, sigma_t, pred)[0]
    f_student = consistency_fn(x_t, x0_student, c_skip_t, c_out_t)
    return consistency_loss(f_student.float(), f_target.float(), args.loss_type, args.huber_c)


def main(args) -> None:
    accelerator = loop.make_accelerator(args)
    from accelerate.utils import set_seed

    set_seed(args.seed)

    # ---- models: frozen VAE and text encoders; one UNet = frozen teacher + trainable LoRA student
    teacher = models.load_teacher(args, accelerator, ("sdxl", "sd"))
    arch, vae, tokenizers, encoders = teacher.arch, teacher.vae, teacher.tokenizers, teacher.text_encoders
    device, dtype = accelerator.device, teacher.dtype
    unet = teacher.lora_base(accelerator)  # on the CPU if prepare() splits it
    lora.add_trainable_lora(unet, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout)
    if args.train_text_encoder_lora:  # after the UNet's LoRA: its initialisation stays that of a run without
        lora.add_text_encoder_lora(encoders, arch == "sdxl", args.text_encoder_lora_rank, args.lora_alpha,
                                   args.lora_dropout)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    models.prepare_denoiser(unet, args)  # xformers, --merged_lora_forward, --channels_last, --torch_compile

    # ---- data (--cache_latents: VAE posteriors instead of pixels; --cache_text_embeddings: the teacher's text)
    dataloader, max_steps, captions = loop.make_train_data(args, accelerator, vae)
    text_cache = None
    if args.cache_text_embeddings:
        text_cache = cache.cached_text_embeddings(
            args, captions, lambda prompts: base_text(arch, prompts, tokenizers, encoders), encoders, accelerator)

    # ---- optimizer; prepared encoders are saved in every checkpoint and sync their gradients across processes
    trained_encoders = encoders if args.train_text_encoder_lora else []
    optimizer, lr_scheduler = loop.make_optimizer(
        [*unet.parameters(), *(p for e in trained_encoders for p in e.parameters())], args, max_steps,
        accelerator.num_processes)
    unet, *wrapped, optimizer, lr_scheduler = accelerator.prepare(unet, *trained_encoders, optimizer, lr_scheduler)
    encoders = [accelerator.unwrap_model(e) for e in encoders]
    student_encoders = [_Prepared(w, e) for w, e in zip(wrapped, encoders)]
    params = [p for m in (unet, *wrapped) for p in m.parameters() if p.requires_grad]
    rng = loop.TrainingRNG(args.seed, device, accelerator.process_index)
    accelerator.register_for_checkpointing(rng)
    base = accelerator.unwrap_model(unet)
    ema = EMAParams(params, args.ema_decay, base) if args.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    schedule = LCMSchedule.of_teacher(teacher.alphas_cumprod, args.num_ddim_timesteps, teacher.prediction_type)
    uncond = teacher_uncond(args, teacher)

    # ---- the loop
    train = loop.TrainLoop(accelerator, dataloader, max_steps, args, "lcm_distill_lora", lr_scheduler)
    for batch in train:
        latents = cache.latents_of_batch(batch, vae, args.vae_encode_batch_size, rng.generator, device)
        if args.proportion_empty_prompts > 0:  # caption dropout, for student and teacher alike
            drop = torch.rand(len(latents), generator=rng.generator, device=device) < args.proportion_empty_prompts
            batch = {**batch, "captions": ["" if d else c for c, d in zip(batch["captions"], drop.tolist())]}
        # the teacher's conditioning: the base encoders (without --train_text_encoder_lora: everyone's)
        teacher_cond = teacher_conditioning(args, arch, batch, tokenizers, encoders, device, text_cache)
        student_cond = None
        if student_encoders:  # the student's (and target's) conditioning: the adapted encoders
            def student_cond():
                return conditioning(args, arch, batch, tokenizers, student_encoders)
        with accelerator.accumulate(unet):
            loss = lcm_lora_loss(unet, latents, teacher_cond, uncond, schedule, args, rng.generator, dtype,
                                 accelerator.autocast, ema, student_cond, base)
            updated = loop.apply_gradients(accelerator, loss, params, optimizer, lr_scheduler, args.max_grad_norm)
        if not train.step_done(loss, updated):
            continue
        if ema is not None:
            ema.update()
        if train.checkpoint_due:
            train.save_checkpoint()
        if train.validation_due:
            validate(accelerator, args, base, teacher, train.validation_prompts, train.global_step)

    # the LoRA (with the text encoders' when they trained one) in diffusers, PEFT and kohya formats, and its sampler:
    # the LCMScheduler of the training grid in out/scheduler
    save_trained_lora(accelerator, base, args.output_dir, "unet",
                      text_encoders=dict(zip(ENCODER_FOLDERS, trained_encoders)))
    if accelerator.is_main_process:
        lcm_scheduler(teacher.scheduler_config, args.num_ddim_timesteps, args.timestep_scaling_factor).save_pretrained(
            os.path.join(args.output_dir, "scheduler"))
    if train.validation_prompts and train.samples_here:
        validate(accelerator, args, base, teacher, train.validation_prompts, train.global_step)
    if accelerator.is_main_process:  # README.md, then --push_to_hub
        outputs.publish(args, "LCM-LoRA (latent consistency distillation)", model_card(args, len(trained_encoders)))
    accelerator.end_training()


def lcm_pipeline(args, unet, teacher: models.Teacher):
    """The LoRA UNet in the teacher's pipeline class with its other parts and an LCMScheduler on this run's grid."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    vae, tokenizers, encoders = teacher.vae, teacher.tokenizers, teacher.text_encoders
    scheduler = lcm_scheduler(teacher.scheduler_config, args.num_ddim_timesteps, args.timestep_scaling_factor)

    if teacher.arch == "sd":
        return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler)


@torch.no_grad()
@torch.random.fork_rng()  # sampling must not move the training RNG
def validate(accelerator, args, unet, teacher: models.Teacher, prompts, step):
    """LCMScheduler samples of the LoRA student at 1/2/4/8 steps, no CFG; a labelled grid to the trackers and PNG."""
    pipe = lcm_pipeline(args, unet, teacher)
    pipe.set_progress_bar_config(disable=True)
    rows, labels = [], []
    for steps in (1, 2, 4, 8):
        gens = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
        with accelerator.autocast():
            images = pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, generator=gens,
                          height=args.resolution, width=args.resolution, output_type="pt").images
        rows.append(images.float().cpu() * 2 - 1)
        labels.append(f"LCM-LoRA, {steps} step{'s' if steps > 1 else ''}, CFG 1")
    path = log_image_grid(accelerator, rows, labels, step, args.output_dir, column_labels=prompts)
    logger.info(f"validation grid -> {path}")


def model_card(args, trained_encoders: int) -> str:
    """How to load and sample the LoRA: the body of the README.md the run writes (outputs.publish)."""
    note = ""
    if trained_encoders:
        folders = ", ".join(f"`{args.output_dir}/{n}`" for n in ENCODER_FOLDERS[:trained_encoders])
        note = (f"\nThe text encoders carry a LoRA too (rank {args.text_encoder_lora_rank}): `load_lora_weights` "
                f"loads it with the UNet's; PEFT folders {folders}; `lora_te*` keys in the kohya file "
                "(`convert_lora.py` converts UNet LoRAs only).\n")
    return f"""
Distilled from `{args.pretrained_teacher_model}` with `train_lcm_distill_lora_sdxl.py` (rank {args.lora_rank},
alpha {args.lora_alpha}).

```python
from diffusers import DiffusionPipeline, LCMScheduler
pipe = DiffusionPipeline.from_pretrained("{args.pretrained_teacher_model}")
pipe.scheduler = LCMScheduler.from_pretrained("{args.output_dir}", subfolder="scheduler")
pipe.load_lora_weights("{args.output_dir}")
image = pipe("a prompt", num_inference_steps=4, guidance_scale=1.0).images[0]
```
Sampler: LCMScheduler, 2-8 steps, guidance_scale 0 or 1 (the teacher's CFG, w in [{args.w_min:g}, {args.w_max:g}], is
distilled in). `{args.output_dir}/scheduler` holds it on the training grid: {args.num_ddim_timesteps} skip-grid points
(`original_inference_steps`) and boundary scaling {args.timestep_scaling_factor:g} (`timestep_scaling`); the same as
`LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps={args.num_ddim_timesteps},
timestep_scaling={args.timestep_scaling_factor:g})`.
PEFT: `PeftModel.from_pretrained(pipe.unet, "{args.output_dir}/unet")`; ComfyUI / A1111: `lora_kohya.safetensors`.
{note}"""


if __name__ == "__main__":
    gc.freeze()  # the imported libraries live until exit: the collector, and the exit, need not scan them
    with user_errors():  # bad input anywhere ends as one line, exit code 2
        main(parse_args())
