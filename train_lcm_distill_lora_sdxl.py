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

import logging
from contextlib import ExitStack, nullcontext

import torch

from utils import cache, lora, models, training
from utils.consistency import consistency_fn, scalings_for_boundary_conditions
from utils.ema import EMAParams
from utils.errors import fail, user_errors
from utils.losses import consistency_loss
from utils.solvers import (
    alpha_sigma,
    cfg,
    ddim_step,
    ddim_timesteps,
    previous_timestep,
    x0_eps_from_model_output,
)

logger = logging.getLogger("train_lcm_distill_lora_sdxl")


def parse_args(argv: list[str] | None = None):
    parser = training.Parser(description=__doc__.split("\n\n")[0])
    m = training.add_teacher_args(parser, "SDXL, SSD-1B or SD 1.x pipeline: hub id or local diffusers folder")
    training.add_lora_args(m, "lcm", '"lcm" (the TLCM/LCM-LoRA list: attention, projections, feed-forward, resnet '
                                     'convs, up/down-samplers, time_emb_proj), "diffusers" (to_q,to_k,to_v,to_out.0), '
                                     'or a comma list')
    m.add_argument("--train_text_encoder_lora", action="store_true",
                   help="also train a LoRA on the text encoders' attention projections (q/k/v/out_proj; SDXL: both "
                        "encoders): the student conditions on the adapted encoders, the teacher on the base ones. "
                        "Off by default (LCM-LoRA adapts the UNet only)")
    m.add_argument("--text_encoder_lora_rank", type=int, default=None,
                   help="rank of the text-encoder LoRA (default: --lora_rank)")
    m.add_argument("--uncond", default="zeros", choices=["zeros", "empty"],
                   help="the teacher's unconditional input: all-zero embeddings (SDXL's default) or the empty prompt")
    training.add_data_args(parser, resolution=1024)
    training.add_lcm_args(parser, w_min=3.0, w_max=15.0)
    training.add_training_args(parser)
    training.add_speed_args(parser)
    parser.set_defaults(learning_rate=1e-4)
    args = parser.parse_args(argv)
    training.check_lcm_args(args)
    training.check_lora_args(args, presets=("lcm", "diffusers"))
    if args.text_encoder_lora_rank is None:
        args.text_encoder_lora_rank = args.lora_rank
    elif args.text_encoder_lora_rank < 1:
        fail(f"--text_encoder_lora_rank must be at least 1, got {args.text_encoder_lora_rank}")
    training.check_training_args(args)
    return args


def encode_text(arch, captions, tokenizers, encoders) -> tuple:
    """(embeds,) for SD 1.x, (embeds, pooled) for SDXL."""
    if arch == "sd":
        return (models.encode_prompt_sd(captions, tokenizers[0], encoders[0]),)
    return models.encode_prompt_sdxl(captions, tokenizers, encoders)


def conditioning(args, arch, batch, tokenizers, encoders, device, text=None):
    """Prompt embeddings and UNet kwargs (SDXL: pooled embeds + per-image time ids) for a batch.

    text: the batch's encode_text() output when already known (the --cache_text_embeddings lookup).
    """
    embeds, *pooled = text if text is not None else encode_text(arch, batch["captions"], tokenizers, encoders)
    if arch == "sd":
        return embeds, {}
    r = args.resolution
    time_ids = torch.cat([models.sdxl_time_ids(tuple(o), tuple(c), (r, r))
                          for o, c in zip(batch["original_sizes"], batch["crop_top_lefts"])]).to(device)
    return embeds, {"text_embeds": pooled[0], "time_ids": time_ids}


@torch.no_grad()
def base_text(arch, captions, tokenizers, encoders) -> tuple:
    """encode_text() of the base text encoders: any encoder LoRA is switched off meanwhile."""
    with ExitStack() as stack:
        for enc in encoders:
            if lora.has_lora(enc):
                stack.enter_context(lora.adapters_disabled(enc))
        return encode_text(arch, captions, tokenizers, encoders)


def teacher_conditioning(args, arch, batch, tokenizers, encoders, device, text_cache=None):
    """conditioning() of the base text encoders (from --cache_text_embeddings' file when there is one)."""
    if text_cache is not None:
        text = text_cache.lookup(batch["captions"], device, encoders[-1].dtype)
    else:
        text = base_text(arch, batch["captions"], tokenizers, encoders)
    return conditioning(args, arch, batch, tokenizers, encoders, device, text)


def add_text_encoder_lora(args, arch, encoders) -> None:
    """--train_text_encoder_lora: a LoRA (fp32) on the CLIP attention projections of every encoder.

    SDXL conditions on encoder 1's penultimate layer, so that encoder's last layer gets none: its LoRA
    would never receive a gradient, which multi-process (DDP) training refuses.
    """
    for i, enc in enumerate(encoders):
        targets = lora.TEXT_ENCODER_LORA_TARGETS
        if arch == "sdxl" and i == 0:
            last = f".layers.{enc.config.num_hidden_layers - 1}."
            targets = sorted(n for n in lora.targeted_modules(enc, targets) if last not in n)
        lora.add_trainable_lora(enc, args.text_encoder_lora_rank, args.lora_alpha, targets, args.lora_dropout,
                                "--train_text_encoder_lora")


class _Prepared:
    """A prepared (possibly DDP-wrapped) model whose calls go through the wrapper (gradient sync) while
    attributes (`device`, `dtype`, `config`) come from the model itself, as the prompt encoders read them."""

    def __init__(self, wrapped, model):
        self._wrapped, self._model = wrapped, model

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def main(args) -> None:
    accelerator = training.make_accelerator(args)
    from accelerate.utils import set_seed

    set_seed(args.seed)
    arch = models.require_architecture(args.pretrained_teacher_model, ("sdxl", "sd"), revision=args.revision)
    dtype = training.weight_dtype(accelerator)
    scheduler_config, prediction_type, alphas_cumprod = training.load_teacher_schedule(args, accelerator.device)

    # ---- models: frozen VAE and text encoders; one UNet = frozen teacher + trainable LoRA student
    vae = training.load_frozen_vae(args, accelerator.device, dtype)
    tokenizers, encoders = models.load_text_encoders(args.pretrained_teacher_model, arch, args.revision, args.variant)
    for enc in encoders:
        enc.to(accelerator.device, dtype)
    unet = models.load_denoiser(args.pretrained_teacher_model, args.revision, args.variant).requires_grad_(False)
    unet.to(accelerator.device, dtype)
    lora.add_trainable_lora(unet, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout)
    if args.train_text_encoder_lora:  # after the UNet's LoRA: its initialisation stays that of a run without
        add_text_encoder_lora(args, arch, encoders)
    training.enable_xformers(unet, args.enable_xformers_memory_efficient_attention)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    training.prepare_denoiser(unet, args)  # --channels_last, --torch_compile

    # ---- data (--cache_latents: VAE posteriors instead of pixels; --cache_text_embeddings: the teacher's text)
    dataloader = training.make_train_data(args, accelerator, vae)
    text_cache = None
    if args.cache_text_embeddings:
        text_cache = cache.cached_text_embeddings(
            args, args.train_captions, lambda captions: base_text(arch, captions, tokenizers, encoders), encoders,
            accelerator)
    trained_encoders = encoders if args.train_text_encoder_lora else []
    optimizer = training.make_optimizer([*unet.parameters(), *(p for e in trained_encoders for p in e.parameters())],
                                        args, accelerator.num_processes)
    lr_scheduler = training.make_lr_scheduler(optimizer, args, accelerator.num_processes)
    # prepared encoders are saved in every checkpoint with the UNet and sync their gradients across processes
    unet, *wrapped, optimizer, lr_scheduler = accelerator.prepare(unet, *trained_encoders, optimizer, lr_scheduler)
    encoders = [accelerator.unwrap_model(e) for e in encoders]
    student_encoders = [_Prepared(w, e) for w, e in zip(wrapped, encoders)]
    params = [p for m in (unet, *wrapped) for p in m.parameters() if p.requires_grad]
    rng = training.TrainingRNG(args.seed, accelerator.device, accelerator.process_index)
    accelerator.register_for_checkpointing(rng)
    base = accelerator.unwrap_model(unet)
    ema = EMAParams(params, args.ema_decay) if args.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    grid = ddim_timesteps(scheduler_config["num_train_timesteps"], args.num_ddim_timesteps).to(accelerator.device)
    k = scheduler_config["num_train_timesteps"] // args.num_ddim_timesteps
    with torch.no_grad():
        empty = {"captions": [""], "original_sizes": [(args.resolution,) * 2], "crop_top_lefts": [(0, 0)]}
        uncond_embeds, uncond_kwargs = teacher_conditioning(args, arch, empty, tokenizers, encoders,
                                                            accelerator.device)
        if args.uncond == "zeros":
            uncond_embeds = torch.zeros_like(uncond_embeds)
            uncond_kwargs = {k_: (torch.zeros_like(v) if k_ == "text_embeds" else v) for k_, v in uncond_kwargs.items()}

    def loss_fn(batch):
        """Steps 1-3 of train_lcm_distill_sd.py's recipe, teacher = this UNet with adapters disabled."""
        gen = rng.generator
        device = accelerator.device
        latents = cache.latents_of_batch(batch, vae, args.vae_encode_batch_size, gen, device)
        # the teacher's conditioning: the base encoders (without --train_text_encoder_lora: everyone's)
        embeds, added = teacher_conditioning(args, arch, batch, tokenizers, encoders, device, text_cache)
        bsz = latents.shape[0]
        t = grid[torch.randint(0, len(grid), (bsz,), device=device, generator=gen)]
        s = previous_timestep(t, k)
        w = torch.empty(bsz, device=device).uniform_(args.w_min, args.w_max, generator=gen)
        c_skip_t, c_out_t = scalings_for_boundary_conditions(t, timestep_scaling=args.timestep_scaling_factor)
        c_skip_s, c_out_s = scalings_for_boundary_conditions(s, timestep_scaling=args.timestep_scaling_factor)
        alpha_t, sigma_t = alpha_sigma(alphas_cumprod, t)
        alpha_s, sigma_s = alpha_sigma(alphas_cumprod, s)
        noise = torch.randn(latents.shape, device=device, generator=gen)
        x_t = ddim_step(latents, noise, alpha_t, sigma_t)  # = alpha_t z + sigma_t eps

        def unet_x0(x, timesteps, emb, kwargs):
            with accelerator.autocast():
                out = unet(x.to(dtype), timesteps, encoder_hidden_states=emb.to(dtype),
                           added_cond_kwargs={k_: v.to(dtype) for k_, v in kwargs.items()} or None).sample
            a, sg = alpha_sigma(alphas_cumprod, timesteps)
            return x0_eps_from_model_output(out.float(), x, a, sg, prediction_type)

        with torch.no_grad():  # teacher and target first: swapping in EMA weights must precede the graph
            uncond_added = {k_: uncond_kwargs[k_].expand_as(v) for k_, v in added.items()}
            with lora.adapters_disabled(base):
                if args.batched_teacher_cfg:  # cond + uncond in one forward
                    both_kwargs = {k_: torch.cat([v, uncond_added[k_]]) for k_, v in added.items()}
                    x0_both, eps_both = unet_x0(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                                torch.cat([embeds, uncond_embeds.expand_as(embeds)]), both_kwargs)
                else:
                    x0_eps = [unet_x0(x_t, t, e, kw) for e, kw in ((embeds, added),
                                                                   (uncond_embeds.expand_as(embeds), uncond_added))]
                    x0_both, eps_both = (torch.cat(parts) for parts in zip(*x0_eps))
            x0 = cfg(x0_both[:bsz], x0_both[bsz:], w)
            eps = cfg(eps_both[:bsz], eps_both[bsz:], w)
            x_s = ddim_step(x0, eps, alpha_s, sigma_s)
            with ema.swapped() if ema is not None else nullcontext():
                if student_encoders:  # the target conditions on the (EMA) student's encoders
                    embeds, added = conditioning(args, arch, batch, tokenizers, encoders, device)
                f_target = consistency_fn(x_s, unet_x0(x_s, s, embeds, added)[0], c_skip_s, c_out_s)
        if student_encoders:  # the student's conditioning, with grad into the encoder LoRA
            embeds, added = conditioning(args, arch, batch, tokenizers, student_encoders, device)
        f_student = consistency_fn(x_t, unet_x0(x_t, t, embeds, added)[0], c_skip_t, c_out_t)
        return consistency_loss(f_student.float(), f_target.float(), args.loss_type, args.huber_c)

    def validate_fn(prompts, step):
        validate(accelerator, args, arch, base, vae, tokenizers, encoders, scheduler_config, prompts, step)

    done = training.run_training(accelerator, args, dataloader, unet, params, optimizer, lr_scheduler, loss_fn,
                                 after_step=ema.update if ema is not None else None, validate=validate_fn,
                                 name="lcm_distill_lora")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_lora(args, base, encoders if args.train_text_encoder_lora else [])
        if done["validation_prompts"]:
            validate_fn(done["validation_prompts"], done["global_step"])
    accelerator.end_training()


def lcm_pipeline(arch, unet, vae, tokenizers, encoders, scheduler_config, args):
    from diffusers import (
        LCMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    scheduler = LCMScheduler.from_config(config, original_inference_steps=args.num_ddim_timesteps,
                                         timestep_scaling=args.timestep_scaling_factor)
    if arch == "sd":
        return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler)


@torch.no_grad()
@torch.random.fork_rng()  # sampling must not move the training RNG
def validate(accelerator, args, arch, unet, vae, tokenizers, encoders, scheduler_config, prompts, step):
    """LCMScheduler samples of the LoRA student at 1/2/4/8 steps, no CFG; a grid to the trackers and PNG."""
    pipe = lcm_pipeline(arch, unet, vae, tokenizers, encoders, scheduler_config, args)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for steps in (1, 2, 4, 8):
        gens = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
        with accelerator.autocast():
            images = pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, generator=gens,
                          height=args.resolution, width=args.resolution, output_type="pt").images
        rows.append(images.float().cpu() * 2 - 1)
    path = training.log_image_grid(accelerator, rows, ["1 step", "2 steps", "4 steps", "8 steps"], step,
                                   args.output_dir)
    logger.info(f"validation grid (rows: 1/2/4/8 LCM steps) -> {path}")


def save_lora(args, unet, encoders=()) -> None:
    """The LoRA (with the text encoders' when they trained one) in diffusers, PEFT and kohya formats, and a model card."""
    names = ["text_encoder", "text_encoder_2"]
    lora.save_lora_outputs(unet, args.output_dir, "unet", text_encoders=dict(zip(names, encoders)))
    note = ""
    if encoders:
        folders = ", ".join(f"`{args.output_dir}/{n}`" for n in names[:len(encoders)])
        note = (f"\nThe text encoders carry a LoRA too (rank {args.text_encoder_lora_rank}): `load_lora_weights` "
                f"loads it with the UNet's; PEFT folders {folders}; `lora_te*` keys in the kohya file "
                "(`convert_lora.py` converts UNet LoRAs only).\n")
    training.write_model_card(args.output_dir, "LCM-LoRA (latent consistency distillation)", args, f"""
Distilled from `{args.pretrained_teacher_model}` with `train_lcm_distill_lora_sdxl.py` (rank {args.lora_rank},
alpha {args.lora_alpha}).

```python
from diffusers import DiffusionPipeline, LCMScheduler
pipe = DiffusionPipeline.from_pretrained("{args.pretrained_teacher_model}")
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
pipe.load_lora_weights("{args.output_dir}")
image = pipe("a prompt", num_inference_steps=4, guidance_scale=1.0).images[0]
```
PEFT: `PeftModel.from_pretrained(pipe.unet, "{args.output_dir}/unet")`; ComfyUI / A1111: `lora_kohya.safetensors`.
{note}""")


if __name__ == "__main__":
    with user_errors():  # bad input anywhere ends as one line, exit code 2
        main(parse_args())
