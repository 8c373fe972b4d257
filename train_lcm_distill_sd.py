"""Latent consistency distillation (LCM) of a Stable Diffusion 1.x / 2.x teacher, and LCF.

    accelerate launch train_lcm_distill_sd.py --pretrained_teacher_model <hub id or folder> \
        --train_data_dir <imagefolder> --output_dir out/ --max_train_steps 1000

The recipe (Luo et al. 2023, "Latent Consistency Models"):
  1. sample a point t = tau_i of the skip grid (tau_i = i*k - 1, k = T // N), its neighbour s = t - k,
     and a guidance scale w ~ U[w_min, w_max];
  2. noise the image latent to x_t; the teacher (cond + uncond in ONE batched pass, CFG with scale
     w) takes one DDIM step to x_s;
  3. the student f(x, t, w, c) = c_skip(t) x + c_out(t) x0_theta(x, t, w, c) is pulled towards the EMA
     target f_ema(x_s, s, w, c): loss d(f(x_t, t), stopgrad f_ema(x_s, s)), d = L2 or pseudo-Huber;
  4. the EMA target follows the student: theta_ema <- mu theta_ema + (1 - mu) theta.
The student gets w through a sinusoidal embedding into the UNet's `timestep_cond` (a new
`time_cond_proj` layer, zero-initialised so the untrained student equals the teacher).

With --lcf (latent consistency fine-tuning) there is no teacher: x_s is the same image latent
noised with the same noise at s, so an existing LCM can be fine-tuned on a custom dataset.

The output folder is a complete StableDiffusionPipeline with an LCMScheduler: load it with
`StableDiffusionPipeline.from_pretrained(out)` and sample in 2-8 steps (guidance_scale = w + 1).
"""

from __future__ import annotations

import argparse
import copy
import logging

import torch

from utils import cache, models, training
from utils.consistency import consistency_fn, guidance_scale_embedding, scalings_for_boundary_conditions
from utils.ema import ema_update
from utils.errors import fail, user_errors
from utils.losses import consistency_loss
from utils.solvers import (alpha_sigma, cfg, ddim_step, ddim_timesteps, previous_timestep,
                           x0_eps_from_model_output)

logger = logging.getLogger("train_lcm_distill_sd")


def parse_args(argv: list[str] | None = None):
    parser = training.Parser(description=__doc__.split("\n\n")[0],
                             epilog="Every flag's default is shown in --help; see README.md for a full walk-through.")
    m = training.add_teacher_args(parser, "SD 1.x/2.x pipeline: hub id or local diffusers folder "
                                          "(for --lcf: an LCM pipeline)")
    m.add_argument("--unet_time_cond_proj_dim", type=int, default=256,
                   help="width of the guidance-scale embedding fed to the student (default: %(default)s)")
    m.add_argument("--cast_teacher_unet", action="store_true",
                   help="keep the frozen teacher UNet in the mixed-precision dtype (saves memory)")
    training.add_data_args(parser, resolution=512)
    a = training.add_lcm_args(parser, w_min=5.0, w_max=15.0)
    a.add_argument("--ema_decay", type=float, default=0.95, help="mu of the EMA target (default: %(default)s)")
    a.add_argument("--zero_init_time_cond_proj", action=argparse.BooleanOptionalAction, default=True,
                   help="zero-initialise the new guidance projection so the student starts as the teacher")
    a.add_argument("--lcf", action="store_true",
                   help="latent consistency fine-tuning: no teacher, x_s = the same latent noised at s")
    training.add_training_args(parser)
    training.add_speed_args(parser, lora_recipe=False)
    args = parser.parse_args(argv)

    training.check_lcm_args(args)
    if not 0.0 <= args.ema_decay <= 1.0:
        fail(f"--ema_decay must be in [0, 1], got {args.ema_decay}")
    training.check_training_args(args)
    return args


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


@torch.no_grad()
@torch.random.fork_rng()  # sampling must not move the training RNG: resumed runs stay identical
def validate(accelerator, args, student, vae, tokenizer, text_encoder, scheduler_config, prompts, step):
    """Sample the student with LCMScheduler at 1/2/4/8 steps; log a grid (rows = step counts)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=accelerator.unwrap_model(student), scheduler=lcm_scheduler(args, scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    w = (args.w_min + args.w_max) / 2
    rows, labels = [], []
    for steps in (1, 2, 4, 8):
        gens = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
        with accelerator.autocast():
            images = pipe(prompts, num_inference_steps=steps, guidance_scale=w + 1, generator=gens,
                          height=args.resolution, width=args.resolution, output_type="pt").images
        rows.append(images.float().cpu() * 2 - 1)
        labels.append(f"{steps} steps")
    path = training.log_image_grid(accelerator, rows, labels, step, args.output_dir)
    logger.info(f"validation grid (rows: 1/2/4/8 LCM steps, w = {w}) -> {path}")


def lcm_scheduler(args, scheduler_config: dict):
    """LCMScheduler on the teacher's noise schedule, with this run's skip grid and boundary scaling."""
    from diffusers import LCMScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return LCMScheduler.from_config(config, original_inference_steps=args.num_ddim_timesteps,
                                    timestep_scaling=args.timestep_scaling_factor)


def main(args) -> None:
    accelerator = training.make_accelerator(args)
    from accelerate.utils import set_seed

    set_seed(args.seed)

    # ---- models: frozen VAE, text encoder and teacher; trainable student; EMA target
    models.require_architecture(args.pretrained_teacher_model, "sd", revision=args.revision)
    dtype = training.weight_dtype(accelerator)
    scheduler_config, prediction_type, alphas_cumprod = training.load_teacher_schedule(args, accelerator.device)
    vae = training.load_frozen_vae(args, accelerator.device, dtype)
    (tokenizer,), (text_encoder,) = models.load_text_encoders(args.pretrained_teacher_model, "sd", args.revision,
                                                              args.variant)
    teacher = models.load_denoiser(args.pretrained_teacher_model, args.revision, args.variant).requires_grad_(False)
    student = make_student(teacher, args.unet_time_cond_proj_dim, args.zero_init_time_cond_proj).train()
    target = copy.deepcopy(student).requires_grad_(False).eval()  # the EMA target
    if args.lcf:
        del teacher  # consistency training needs no teacher
        teacher = None
    else:
        teacher.eval().to(accelerator.device, dtype if args.cast_teacher_unet else torch.float32)
    text_encoder.to(accelerator.device, dtype)
    target.to(accelerator.device)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    for unet in (student, target, teacher):
        if unet is not None:
            training.enable_xformers(unet, args.enable_xformers_memory_efficient_attention)
            training.prepare_denoiser(unet, args)  # --channels_last, --torch_compile

    # ---- data (--cache_latents: VAE posteriors instead of pixels; --cache_text_embeddings: the prompts' embeddings)
    dataloader = training.make_train_data(args, accelerator, vae)
    text_cache = None
    if args.cache_text_embeddings:
        text_cache = cache.cached_text_embeddings(
            args, args.train_captions, lambda captions: (models.encode_prompt_sd(captions, tokenizer, text_encoder),),
            [text_encoder], accelerator)
    optimizer = training.make_optimizer(student.parameters(), args, accelerator.num_processes)
    lr_scheduler = training.make_lr_scheduler(optimizer, args, accelerator.num_processes)
    student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    params = [p for p in student.parameters() if p.requires_grad]
    rng = training.TrainingRNG(args.seed, accelerator.device, accelerator.process_index)
    accelerator.register_for_checkpointing(target, rng)

    with torch.no_grad():
        uncond_embeds = models.encode_prompt_sd([""], tokenizer, text_encoder)  # the CFG's unconditional input
    grid = ddim_timesteps(scheduler_config["num_train_timesteps"], args.num_ddim_timesteps).to(accelerator.device)
    k = scheduler_config["num_train_timesteps"] // args.num_ddim_timesteps

    # ---- the loop (resume, accumulation, checkpoints, logging: utils/training.py); the algorithm is lcm_loss
    def loss_fn(batch):
        return lcm_loss(args, batch, student, target, teacher, vae, tokenizer, text_encoder, uncond_embeds,
                        alphas_cumprod, grid, k, prediction_type, accelerator, rng.generator, text_cache)

    def validate_fn(prompts, step):
        validate(accelerator, args, student, vae, tokenizer, text_encoder, scheduler_config, prompts, step)

    done = training.run_training(
        accelerator, args, dataloader, student, params, optimizer, lr_scheduler, loss_fn,
        after_step=lambda: ema_update(target, accelerator.unwrap_model(student), args.ema_decay),  # step 4
        validate=validate_fn, name="lcm_distill_sd")

    # ---- save: the student UNet and a complete LCM pipeline
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_pipeline(args, accelerator.unwrap_model(student), vae, tokenizer, text_encoder, scheduler_config)
        if done["validation_prompts"]:
            validate_fn(done["validation_prompts"], done["global_step"])
    accelerator.end_training()


def lcm_loss(args, batch, student, target, teacher, vae, tokenizer, text_encoder, uncond_embeds, alphas_cumprod,
             grid, k, prediction_type, accelerator, gen: torch.Generator, text_cache=None) -> torch.Tensor:
    """One LCM (or LCF) loss evaluation on a batch: steps 1-3 of the module docstring; all draws from `gen`."""
    device = accelerator.device
    latents = cache.latents_of_batch(batch, vae, args.vae_encode_batch_size, gen, device)
    bsz = latents.shape[0]
    drop = torch.rand(bsz, generator=gen, device=gen.device) < args.proportion_empty_prompts
    captions = ["" if d else c for c, d in zip(batch["captions"], drop.tolist())]
    if text_cache is not None:
        embeds = text_cache.lookup(captions, device, text_encoder.dtype)[0]
    else:
        with torch.no_grad():
            embeds = models.encode_prompt_sd(captions, tokenizer, text_encoder)

    # 1. the skip grid: t = tau_i, s = t - k (clamped at 0); w ~ U[w_min, w_max]
    t = grid[torch.randint(0, len(grid), (bsz,), device=device, generator=gen)]
    s = previous_timestep(t, k)
    w = torch.empty(bsz, device=device).uniform_(args.w_min, args.w_max, generator=gen)
    w_embedding = guidance_scale_embedding(w, args.unet_time_cond_proj_dim).to(device)
    c_skip_t, c_out_t = scalings_for_boundary_conditions(t, timestep_scaling=args.timestep_scaling_factor)
    c_skip_s, c_out_s = scalings_for_boundary_conditions(s, timestep_scaling=args.timestep_scaling_factor)
    alpha_t, sigma_t = alpha_sigma(alphas_cumprod, t)
    alpha_s, sigma_s = alpha_sigma(alphas_cumprod, s)
    noise = torch.randn(latents.shape, device=device, generator=gen)
    x_t = ddim_step(latents, noise, alpha_t, sigma_t)  # = alpha_t z + sigma_t eps

    # 3. the online student's consistency function at (x_t, t)
    with accelerator.autocast():
        out = student(x_t, t, encoder_hidden_states=embeds, timestep_cond=w_embedding).sample
    x0_student = x0_eps_from_model_output(out.float(), x_t, alpha_t, sigma_t, prediction_type)[0]
    f_student = consistency_fn(x_t, x0_student, c_skip_t, c_out_t)

    with torch.no_grad():
        # 2. the teacher's DDIM step t -> s with CFG (cond and uncond in one batched forward)
        if teacher is None:  # LCF: the same latent and noise at the neighbouring grid point
            x_s = ddim_step(latents, noise, alpha_s, sigma_s)
        else:
            x_in, t_in = x_t.to(teacher.dtype), torch.cat([t, t])
            emb_in = torch.cat([embeds, uncond_embeds.expand(bsz, -1, -1)]).to(teacher.dtype)
            with accelerator.autocast():
                if args.batched_teacher_cfg:  # cond + uncond in one forward
                    both = teacher(torch.cat([x_in, x_in]), t_in, encoder_hidden_states=emb_in).sample
                else:
                    both = torch.cat([teacher(x_in, t, encoder_hidden_states=e).sample for e in emb_in.chunk(2)])
            x0_eps_c = x0_eps_from_model_output(both[:bsz].float(), x_t, alpha_t, sigma_t, prediction_type)
            x0_eps_u = x0_eps_from_model_output(both[bsz:].float(), x_t, alpha_t, sigma_t, prediction_type)
            x0 = cfg(x0_eps_c[0], x0_eps_u[0], w)
            eps = cfg(x0_eps_c[1], x0_eps_u[1], w)
            x_s = ddim_step(x0, eps, alpha_s, sigma_s)
        # 3. the EMA target's consistency function at (x_s, s)
        with accelerator.autocast():
            out = target(x_s, s, encoder_hidden_states=embeds, timestep_cond=w_embedding).sample
        x0_target = x0_eps_from_model_output(out.float(), x_s, alpha_s, sigma_s, prediction_type)[0]
        f_target = consistency_fn(x_s, x0_target, c_skip_s, c_out_s)

    return consistency_loss(f_student.float(), f_target.float(), args.loss_type, args.huber_c)


def save_pipeline(args, student, vae, tokenizer, text_encoder, scheduler_config) -> None:
    """Write `unet/` and the whole StableDiffusionPipeline (LCMScheduler) to --output_dir, atomically per part."""
    from diffusers import StableDiffusionPipeline

    student = copy.deepcopy(student).to(torch.float32)
    pipe = StableDiffusionPipeline(vae=vae.to(torch.float32), text_encoder=text_encoder.to(torch.float32),
                                   tokenizer=tokenizer, unet=student, scheduler=lcm_scheduler(args, scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(args.output_dir)
    w = (args.w_min + args.w_max) / 2
    training.write_model_card(args.output_dir, "LCM student (latent consistency distillation)", args, f"""
Distilled from `{args.pretrained_teacher_model}` with `train_lcm_distill_sd.py`{' (LCF mode)' if args.lcf else ''}.

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{args.output_dir}")
image = pipe("a prompt", num_inference_steps=4, guidance_scale={w + 1:.1f}).images[0]
```
`guidance_scale` is w + 1 (trained for w in [{args.w_min}, {args.w_max}]); the scheduler is LCMScheduler.
""")


if __name__ == "__main__":
    with user_errors():  # bad input anywhere (a path, a column, a file) ends as one line, exit code 2
        main(parse_args())
