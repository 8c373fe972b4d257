"""Latent consistency distillation (LCM) of a Stable Diffusion 1.x / 2.x or SDXL (SSD-1B) teacher, and LCF.

    accelerate launch train_lcm_distill_sd.py --pretrained_teacher_model <hub id or folder> \
        --train_data_dir <imagefolder> --output_dir out/ --max_train_steps 1000

The recipe (Luo et al. 2023, "Latent Consistency Models"; docs/lcm.md):
  1. sample a point t = tau_i of the skip grid (tau_i = i*k - 1, k = T // N), its neighbour s = t - k,
     and a guidance scale w ~ U[w_min, w_max];
  2. noise the image latent to x_t; the teacher (cond + uncond in ONE batched pass, CFG with scale
     w) takes one DDIM step to x_s;
  3. the student f(x, t, w, c) = c_skip(t) x + c_out(t) x0_theta(x, t, w, c) is pulled towards the EMA
     target f_ema(x_s, s, w, c): loss d(f(x_t, t), stopgrad f_ema(x_s, s)), d = L2 or pseudo-Huber;
  4. the EMA target follows the student: theta_ema <- mu theta_ema + (1 - mu) theta.
The student gets w through a sinusoidal embedding into the UNet's `timestep_cond` (a new
`time_cond_proj` layer, zero-initialised so the untrained student equals the teacher).
SDXL-family teachers (read from the UNet config) condition on two text encoders (penultimate states
concatenated, pooled embeddings of the second) and on each image's micro-conditioning time ids
(original size, crop top-left, target size). The teacher's unconditional CFG input is what its pipeline
uses for an empty negative prompt (--uncond): SDXL's zeroed text embeddings, with each image's own time ids;
SD's empty prompt.

With --lcf (latent consistency fine-tuning) there is no teacher: x_s is the same image latent
noised with the same noise at s, so an existing LCM can be fine-tuned on a custom dataset.

The output folder is a complete StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) with an
LCMScheduler on the training grid: `DiffusionPipeline.from_pretrained(out)`, 2-8 steps, guidance_scale = w + 1.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
from contextlib import contextmanager, nullcontext

import torch

from utils import cache, files, flags, loop, models, outputs
from utils.consistency import (LCMSchedule, consistency_fn, guidance_scale_embedding,
                               scalings_for_boundary_conditions)
from utils.ema import ema_update
from utils.errors import user_errors
from utils.grids import log_image_grid
from utils.losses import consistency_loss
from utils.scheduling_lcm import lcm_scheduler
from utils.solvers import alpha_sigma, ddim_cfg_step, ddim_step, previous_timestep, x0_eps_from_model_output

logger = logging.getLogger("train_lcm_distill_sd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = flags.Parser(description=__doc__.split("\n\n")[0],
                          epilog="Every flag's default is shown in --help; docs/lcm.md explains the method.")
    m = parser.add_teacher_args("SD 1.x/2.x or SDXL-family pipeline: hub id or local diffusers folder "
                                "(for --lcf: an LCM pipeline)")
    m.add_argument("--unet_time_cond_proj_dim", type=int, default=256,
                   help="width of the guidance-scale embedding fed to the student (default: %(default)s)")
    m.add_argument("--cast_teacher_unet", action="store_true",
                   help="keep the frozen teacher UNet in the mixed-precision dtype (saves memory)")
    m.add_argument("--use_fix_crop_and_size", action="store_true",
                   help="SDXL: condition on time ids (r, r, 0, 0, r, r) for every image instead of its own original "
                        "size and crop")
    parser.add_data_args(resolution=None)
    a = parser.add_lcm_args(w_min=None, w_max=15.0)
    a.add_argument("--ema_decay", type=float, default=0.95, help="mu of the EMA target (default: %(default)s)")
    a.add_argument("--ema_target_on_cpu", action="store_true",
                   help="keep the EMA target in CPU memory and move it to the accelerator only for its forward "
                        "(saves one UNet of accelerator memory, costs two copies a step)")
    a.add_argument("--zero_init_time_cond_proj", action=argparse.BooleanOptionalAction, default=True,
                   help="zero-initialise the new guidance projection so the student starts as the teacher")
    a.add_argument("--lcf", action="store_true",
                   help="latent consistency fine-tuning: no teacher, x_s = the same latent noised at s")
    parser.add_training_args(lora_recipe=False)
    args = parser.parse_args(argv)
    if not 0.0 <= args.ema_decay <= 1.0:
        parser.error(f"--ema_decay must be in [0, 1], got {args.ema_decay}")
    if args.unet_time_cond_proj_dim < 4:  # the sinusoidal guidance embedding needs two frequencies
        parser.error(f"--unet_time_cond_proj_dim must be at least 4, got {args.unet_time_cond_proj_dim}")
    sdxl = models.detect_architecture(args.pretrained_teacher_model, args.revision,
                                      "--pretrained_teacher_model") == "sdxl"
    if args.w_min is None:  # the family's guidance range, as the published LCMs use (the size: parser.check)
        args.w_min = 3.0 if sdxl else 5.0
    return parser.check(args)


def make_student(teacher_unet, time_cond_proj_dim: int, zero_init: bool):
    """The teacher's UNet plus a guidance-embedding input (`time_embedding.cond_proj`)."""
    from diffusers import UNet2DConditionModel

    if teacher_unet.config.time_cond_proj_dim is not None:  # already an LCM (e.g. for LCF): reuse it
        return copy.deepcopy(teacher_unet).requires_grad_(True)
    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=time_cond_proj_dim)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("time_embedding.cond_proj") for k in missing), (missing, unexpected)
    if zero_init:
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def unet_x0(unet, x: torch.Tensor, t: torch.Tensor, cond: models.Conditioning, w_embedding: torch.Tensor,
            schedule: LCMSchedule, autocast=nullcontext) -> torch.Tensor:
    """x0 of the student's (or target's) prediction at (x, t) with guidance embedding w_embedding."""
    with autocast():
        out = unet(x, t, timestep_cond=w_embedding, **cond.unet_kwargs(x.dtype)).sample
    alpha, sigma = alpha_sigma(schedule.alphas_cumprod, t)
    return x0_eps_from_model_output(out.float(), x, alpha, sigma, schedule.prediction_type)[0]


def lcm_loss(student, target, teacher, latents: torch.Tensor, cond: models.Conditioning,
             uncond: models.Conditioning, schedule: LCMSchedule, args: argparse.Namespace, gen: torch.Generator,
             autocast=nullcontext) -> torch.Tensor:
    """Steps 1-3 of the recipe on a batch of image latents and their conditioning; every draw from `gen`.

    teacher=None is LCF: x_s is the same latent noised with the same noise at s. `uncond` is the teacher's
    unconditional branch (a batch of one, or one per image). `args` gives w_min, w_max,
    unet_time_cond_proj_dim, timestep_scaling_factor, batched_teacher_cfg, loss_type and huber_c.
    """
    bsz, device = latents.shape[0], latents.device
    # 1. the skip grid: t = tau_i, s = t - k (clamped at 0); w ~ U[w_min, w_max]
    t = schedule.grid[torch.randint(0, len(schedule.grid), (bsz,), device=device, generator=gen)]
    s = previous_timestep(t, schedule.k)
    w = torch.empty(bsz, device=device).uniform_(args.w_min, args.w_max, generator=gen)
    w_embedding = guidance_scale_embedding(w, args.unet_time_cond_proj_dim).to(device)
    c_skip_t, c_out_t = scalings_for_boundary_conditions(t, timestep_scaling=args.timestep_scaling_factor)
    c_skip_s, c_out_s = scalings_for_boundary_conditions(s, timestep_scaling=args.timestep_scaling_factor)
    alpha_t, sigma_t = alpha_sigma(schedule.alphas_cumprod, t)
    alpha_s, sigma_s = alpha_sigma(schedule.alphas_cumprod, s)
    noise = torch.randn(latents.shape, device=device, generator=gen)
    x_t = ddim_step(latents, noise, alpha_t, sigma_t)  # = alpha_t z + sigma_t eps

    # 3. the online student's consistency function at (x_t, t)
    f_student = consistency_fn(x_t, unet_x0(student, x_t, t, cond, w_embedding, schedule, autocast), c_skip_t, c_out_t)

    with torch.no_grad():
        # 2. the teacher's DDIM step t -> s with CFG (cond and uncond in one batched forward)
        if teacher is None:  # LCF: the same latent and noise at the neighbouring grid point
            x_s = ddim_step(latents, noise, alpha_s, sigma_s)
        else:
            x_in, uncond = x_t.to(teacher.dtype), uncond.expand_as(cond)
            with autocast():
                if args.batched_teacher_cfg:
                    out_c, out_u = teacher(torch.cat([x_in, x_in]), torch.cat([t, t]),
                                           **cond.cat(uncond).unet_kwargs(teacher.dtype)).sample.chunk(2)
                else:
                    out_c, out_u = (teacher(x_in, t, **c.unet_kwargs(teacher.dtype)).sample for c in (cond, uncond))
            x_s = ddim_cfg_step(out_c.float(), out_u.float(), x_t, w, alpha_t, sigma_t, alpha_s, sigma_s,
                                schedule.prediction_type)
        # 3. the EMA target's consistency function at (x_s, s)
        f_target = consistency_fn(x_s, unet_x0(target, x_s, s, cond, w_embedding, schedule, autocast), c_skip_s, c_out_s)

    return consistency_loss(f_student.float(), f_target.float(), args.loss_type, args.huber_c)


def main(args: argparse.Namespace) -> None:
    accelerator = loop.make_accelerator(args)
    from accelerate.utils import set_seed

    set_seed(args.seed)

    # ---- models: frozen VAE, text encoder and teacher; trainable student; EMA target
    teacher = models.load_teacher(args, accelerator, ("sd", "sdxl"))
    device, dtype = accelerator.device, teacher.dtype
    student = make_student(teacher.denoiser, args.unet_time_cond_proj_dim, args.zero_init_time_cond_proj).train()
    target = copy.deepcopy(student).requires_grad_(False).eval()  # the EMA target
    target.to("cpu" if args.ema_target_on_cpu else device)
    if args.lcf:
        teacher.denoiser = None  # consistency training needs no teacher UNet
    else:
        teacher.denoiser.eval().to(device, dtype if args.cast_teacher_unet else torch.float32)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    for unet in (student, target, teacher.denoiser):
        if unet is not None:
            models.prepare_denoiser(unet, args)  # xformers, --channels_last, --torch_compile

    # ---- data (--cache_latents: VAE posteriors instead of pixels; --cache_text_embeddings: the prompts' embeddings)
    dataloader, max_steps, captions = loop.make_train_data(args, accelerator, teacher.vae)
    text_cache = None
    if args.cache_text_embeddings:
        text_cache = cache.cached_text_embeddings(args, captions, teacher.encode, teacher.text_encoders, accelerator)
    with torch.no_grad():  # the CFG's unconditional input (--uncond); SDXL: without time ids, each image gets its own
        uncond = models.unet_conditioning(teacher.uncond_text(teacher.encode([""]), args.uncond))
    schedule = LCMSchedule.of_teacher(teacher.alphas_cumprod, args.num_ddim_timesteps, teacher.prediction_type)

    # ---- optimizer, and what an exact resume restores: prepared objects + the EMA target + the loss's RNG
    optimizer, lr_scheduler = loop.make_optimizer(student.parameters(), args, max_steps, accelerator.num_processes)
    student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    params = [p for p in student.parameters() if p.requires_grad]
    rng = loop.TrainingRNG(args.seed, device, accelerator.process_index)
    accelerator.register_for_checkpointing(target, rng)

    # ---- the loop
    train = loop.TrainLoop(accelerator, dataloader, max_steps, args, "lcm_distill_sd", lr_scheduler)
    for batch in train:
        latents = cache.latents_of_batch(batch, teacher.vae, args.vae_encode_batch_size, rng.generator, device)
        drop = torch.rand(len(latents), generator=rng.generator, device=device) < args.proportion_empty_prompts
        prompts = ["" if d else c for c, d in zip(batch["captions"], drop.tolist())]
        with torch.no_grad():
            text = text_cache.lookup(prompts, device, dtype) if text_cache else teacher.encode(prompts)
        cond = models.unet_conditioning(text, batch, args.resolution, args.use_fix_crop_and_size)
        with accelerator.accumulate(student), on_device(target, device, args.ema_target_on_cpu):
            loss = lcm_loss(student, target, teacher.denoiser, latents, cond, uncond, schedule, args,
                            rng.generator, accelerator.autocast)
            updated = loop.apply_gradients(accelerator, loss, params, optimizer, lr_scheduler, args.max_grad_norm)
        if not train.step_done(loss, updated):
            continue
        ema_update(target, accelerator.unwrap_model(student), args.ema_decay)  # 4. the target follows
        if train.checkpoint_due:
            train.save_checkpoint()
        if train.validation_due:
            validate(accelerator, args, student, teacher, train.validation_prompts, train.global_step)

    # ---- save: the student UNet and a complete LCM pipeline
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(student)  # every process: sharded weights are gathered on the main one
    if accelerator.is_main_process:
        save_pipeline(args, unet_with(accelerator.unwrap_model(student).config, weights), teacher)
    if train.validation_prompts and train.samples_here:
        validate(accelerator, args, student, teacher, train.validation_prompts, train.global_step)
    if accelerator.is_main_process:  # README.md, then --push_to_hub
        outputs.publish(args, "LCM student (latent consistency distillation)", model_card(args, teacher.arch))
    accelerator.end_training()


def unet_with(config, weights: dict):
    """A plain UNet2DConditionModel of `config` holding `weights` (a state dict), whatever engine trained them."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():  # no random initialisation of weights about to be replaced
        unet = UNet2DConditionModel.from_config(config)
    unet.load_state_dict(weights, assign=True)
    return unet


@contextmanager
def on_device(model, device, offloaded: bool):
    """--ema_target_on_cpu: the model on `device` inside the block, back in CPU memory after it."""
    if offloaded:
        model.to(device)
    try:
        yield
    finally:
        if offloaded:
            model.to("cpu")


def lcm_pipeline(args, unet, teacher: models.Teacher):
    """The student in the teacher's pipeline class with its other parts and an LCMScheduler on this run's grid."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = lcm_scheduler(teacher.scheduler_config, args.num_ddim_timesteps, args.timestep_scaling_factor)
    (tokenizer, *tokenizer_2), (encoder, *encoder_2) = teacher.tokenizers, teacher.text_encoders
    if teacher.arch == "sdxl":
        return StableDiffusionXLPipeline(vae=teacher.vae, text_encoder=encoder, text_encoder_2=encoder_2[0],
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2[0], unet=unet,
                                         scheduler=scheduler)
    return StableDiffusionPipeline(vae=teacher.vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@torch.no_grad()
@torch.random.fork_rng()  # sampling must not move the training RNG: resumed runs stay identical
def validate(accelerator, args, student, teacher: models.Teacher, prompts, step):
    """Sample the student with LCMScheduler at 1/2/4/8 steps; log a labelled grid (rows = step counts)."""
    pipe = lcm_pipeline(args, accelerator.unwrap_model(student), teacher)
    pipe.set_progress_bar_config(disable=True)
    w = (args.w_min + args.w_max) / 2
    rows, labels = [], []
    for steps in (1, 2, 4, 8):
        gens = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
        with accelerator.autocast():
            images = pipe(prompts, num_inference_steps=steps, guidance_scale=w + 1, generator=gens,
                          height=args.resolution, width=args.resolution, output_type="pt").images
        rows.append(images.float().cpu() * 2 - 1)
        labels.append(f"LCM, {steps} step{'s' if steps > 1 else ''}, w {w:g}")
    path = log_image_grid(accelerator, rows, labels, step, args.output_dir, column_labels=prompts)
    logger.info(f"validation grid -> {path}")


def save_pipeline(args, student, teacher: models.Teacher) -> None:
    """Write `unet/` and the whole StableDiffusionPipeline (LCMScheduler with this run's grid) to --output_dir."""
    for part in (teacher.vae, *teacher.text_encoders):
        part.to(torch.float32)  # saved as fp32 weights, like the student
    pipe = lcm_pipeline(args, student.to(torch.float32), teacher)  # `student` is unet_with()'s own copy: no second one
    with files.atomic_write(args.output_dir, into=True) as tmp:  # a stop or a full disk leaves nothing half-written
        pipe.save_pretrained(tmp)


def model_card(args, arch: str) -> str:
    """How to load and sample the student: the body of the README.md the run writes (outputs.publish)."""
    w = (args.w_min + args.w_max) / 2
    size = f", height={args.resolution}, width={args.resolution}" if arch == "sdxl" else ""
    return f"""
Distilled from `{args.pretrained_teacher_model}` with `train_lcm_distill_sd.py`{' (LCF mode)' if args.lcf else ''}.

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{args.output_dir}")
image = pipe("a prompt", num_inference_steps=4, guidance_scale={w + 1:.1f}{size}).images[0]
```
Or only the UNet into the teacher's pipeline (e.g. with another VAE):
`UNet2DConditionModel.from_pretrained("{args.output_dir}", subfolder="unet")`, then
`pipe.scheduler = LCMScheduler.from_pretrained("{args.output_dir}", subfolder="scheduler")`.
Sampler: LCMScheduler, 2-8 steps, trained on a {args.num_ddim_timesteps}-point skip grid (`original_inference_steps`)
with boundary scaling {args.timestep_scaling_factor:g} (`timestep_scaling`), both recorded in the saved scheduler config.
`guidance_scale` is w + 1: trained for w in [{args.w_min:g}, {args.w_max:g}], so use {args.w_min + 1:g}-{args.w_max + 1:g}.
"""


if __name__ == "__main__":
    gc.freeze()  # the imported libraries live until exit: the collector, and the exit, need not scan them
    with user_errors():  # bad input anywhere (a path, a column, a file) ends as one line, exit code 2
        main(parse_args())
