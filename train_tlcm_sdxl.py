"""TLCM: two-stage, data-free latent consistency distillation of an SDXL (SSD-1B, SD 1.x) UNet into one LoRA.

    accelerate launch train_tlcm_sdxl.py --pretrained_teacher_model <SDXL hub id or folder> \
        --prompts_file prompts.txt --output_dir out/ --stage all

The method as published for SDXL (TLCM, arXiv 2406.05768; docs/tlcm.md) on an eps- (or v-) prediction DDPM
teacher: integer timesteps, a_t = alphas_cumprod[t], M + 1 milestones floor(i (T - 1) / M) (M = 8: 0, 124,
249, ..., 874, 999). No image is read: every latent comes from the teacher or the student. One UNet is in
memory: the student is it with the LoRA enabled, the teacher is it with the LoRA disabled, guided by CFG in
one batched cond + uncond pass with --guidance_scale w: eps = eps_u + w (eps_c - eps_u) (the paper's w,
diffusers' guidance_scale). The student's x0 is f(z, t) = (z - sqrt(1 - a_t) eps) / sqrt(a_t) (no
c_skip/c_out) and its jump to a lower time s is g(z, t) = DDIM(z, f, t, s) =
sqrt(a_s) f + sqrt(1 - a_s) (z - sqrt(a_t) f) / sqrt(1 - a_t)  (utils/tlcm.py).
  stage 1, DSCD (sub-segment consistency): pick a segment s and t_m in it on the --skip grid; z_{t_m} =
      M - s equal CFG-teacher DDIM steps from pure noise; z_{t_n} = one teacher DDIM step of --skip; the
      student jumps each to the segment's lower milestone; loss d(g(z_{t_m}, t_m), stopgrad g(z_{t_n}, t_n)).
  stage 2, DCD (global consistency): the student samples its own x0 in q steps (the released sampler: x0
      prediction, fresh re-noising, on the milestone subsets); noise it to a milestone t_m; the teacher runs
      p DDIM sub-steps to the milestone below; loss d(f(z_{t_m}), stopgrad f(z_{t_n})).
  extras (optional, after stage 2), as in train_tlcm_flux.py: a reward hinge loss on decoded student
      samples; DMD (a second, "fake_score" LoRA learns the student's one-step samples with the diffusion
      loss; the student follows fake - real x0); GAN (the frozen teacher's mid-block output + a small head;
      real = the q-step sample, fake = the one-step one).
Conditioning: SDXL's two text encoders (penultimate states concatenated, encoder 2's pooled embeds) and
time ids (r, r, 0, 0, r, r) for --resolution r (no image: original size = target size, no crop); SD 1.x
its one encoder. The architecture is read from the teacher's UNet config.

Output (each stage in <output_dir>/stage<k>/lora, the last one also in <output_dir>): a PEFT adapter folder
(`get_peft_model(unet, LoraConfig(r=64, ...))` + `load_adapter(out)`), the diffusers file
`pytorch_lora_weights.safetensors` (`pipe.load_lora_weights(out)`), `lora_kohya.safetensors` and a model
card. Sample with utils.scheduling_tlcm.TLCMScheduler or diffusers' LCMScheduler, 2-8 steps, guidance 0.
"""

from __future__ import annotations

import argparse
import gc
import logging
from contextlib import nullcontext

import torch

from utils import cache, data, flags, loop, lora, models, outputs, sharding, tlcm, tlcm_extras, tlcm_stages
from utils.ema import EMAParams
from utils.errors import user_errors
from utils.grids import log_image_grid
from utils.losses import (dmd_grad, dmd_surrogate, gan_discriminator_loss, gan_generator_loss, hinge_reward_loss,
                          l2_loss, latent_distance)
from utils.scheduling_tlcm import TLCMScheduler, ddpm_milestones, lcm_original_inference_steps, tlcm_timesteps
from utils.solvers import alpha_sigma, cfg, ddim_step, model_output_from_x0_eps

logger = logging.getLogger("train_tlcm_sdxl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = flags.Parser(description=__doc__.split("\n\n")[0])
    m = parser.add_teacher_args("SDXL, SSD-1B or SD 1.x pipeline (eps- or v-prediction): hub id or local "
                                "diffusers folder")
    parser.add_lora_args(m, "lcm", '"lcm" (the released TLCM SDXL list: attention, projections, feed-forward, resnet '
                                   'convs, up/down-samplers, time_emb_proj), "diffusers" (to_q,to_k,to_v,to_out.0), '
                                   'or a comma list', presets=("lcm", "diffusers"))
    m.add_argument("--guidance_scale", type=float, default=8.0,
                   help="the teacher's CFG scale w, eps = eps_u + w (eps_c - eps_u): the paper's w and diffusers' "
                        "guidance_scale (not LCM's w + 1); the student learns the guided teacher and samples "
                        "without CFG (default: 8, the paper's)")
    parser.add_tlcm_args("train_tlcm_sdxl.py", integer_timesteps=True)
    parser.add_training_args(image_recipe=False, per_stage=True)
    parser.set_defaults(train_batch_size=8)
    return parser.check(parser.parse_args(argv))


class UNetDiffusion:
    """The UNet as a DDPM denoiser: its output (eps, v or x0) at integer timesteps, student and CFG teacher."""

    def __init__(self, base, teacher: models.Teacher, latent_side: int, args: argparse.Namespace, device,
                 autocast=nullcontext, collective: bool = False) -> None:
        self.base, self.args, self.device, self.autocast, self.dtype = base, args, device, autocast, teacher.dtype
        self.collective = collective  # sharded weights: a forward is a collective, every process must run as many
        self.alphas_cumprod, self.prediction_type = teacher.alphas_cumprod.to(device), teacher.prediction_type
        self.T, self.latent_side, self.channels = len(self.alphas_cumprod), latent_side, base.config.in_channels
        self.milestones = torch.tensor(ddpm_milestones(self.T, args.num_segments), dtype=torch.float64)
        self.sampler = TLCMScheduler.from_config(teacher.scheduler_config, num_segments=args.num_segments)
        r = args.resolution  # data-free: original size = target size = the resolution, no crop
        self.time_ids = models.sdxl_time_ids((r, r), (0, 0), (r, r)).to(device) if teacher.arch == "sdxl" else None

    def noise(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randn((n, self.channels, self.latent_side, self.latent_side), device=self.device, generator=gen)

    def output(self, model, z: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        added = None
        if self.time_ids is not None:
            added = {"text_embeds": cond["pooled"].to(self.dtype),
                     "time_ids": self.time_ids.expand(z.shape[0], -1).to(self.dtype)}
        with self.autocast():
            out = model(z.to(self.dtype), t, encoder_hidden_states=cond["embeds"].to(self.dtype),
                        added_cond_kwargs=added).sample
        return out.float()

    def teacher(self, cond: dict, uncond: dict):
        """The LoRA-free UNet's output at (z, t), CFG-guided in one batched cond + uncond pass."""
        def out(z, t):
            with torch.no_grad(), lora.adapters_disabled(self.base):
                both = {k: torch.cat([v, uncond[k].expand_as(v)]) for k, v in cond.items()}
                o_c, o_u = self.output(self.base, torch.cat([z, z]), torch.cat([t, t]), both).chunk(2)
                return cfg(o_c, o_u, self.args.guidance_scale - 1.0)  # cfg() uses w = scale - 1
        return out

    def student(self, cond: dict, model=None):
        """The output at (z, t) of the model with its LoRA: `model` (the prepared one, with grad) or the bare base."""
        return lambda z, t: self.output(model if model is not None else self.base, z, t, cond)

    def x0(self, z: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return tlcm.ddpm_x0(z, out, t, self.alphas_cumprod, self.prediction_type)

    def renoise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ddim_step(x0, eps, *alpha_sigma(self.alphas_cumprod, t))

    @torch.no_grad()
    def sample(self, denoiser, noise: torch.Tensor, steps: int, gen: torch.Generator) -> torch.Tensor:
        """x0 of the released sampler (TLCMScheduler: x0, fresh re-noising) on the milestone subset of `steps`."""
        self.sampler.set_timesteps(steps, device=self.device)
        z = noise
        for t in self.sampler.timesteps:
            z = self.sampler.step(denoiser(z, t.expand(z.shape[0])), t, z, generator=gen, return_dict=False)[0]
        return z


def stage1_loss(diff: UNetDiffusion, unet, cond: dict, uncond: dict, distance, gen: torch.Generator,
                ema: EMAParams | None = None) -> torch.Tensor:
    """DSCD: both ends DDIM-jump to the segment's lower milestone with the student's x0 and implied noise."""
    args, n, M = diff.args, cond["embeds"].shape[0], diff.args.num_segments
    ac, pred = diff.alphas_cumprod, diff.prediction_type
    segment = int(torch.randint(0, M, (1,), generator=gen, device=gen.device))
    if diff.collective:  # the segment sets the number of teacher steps: every process takes process 0's
        segment = sharding.same_everywhere(segment)
    t_m, t_n, t_low = (t.long() for t in tlcm.stage1_times(segment, n, args.skip, diff.T, M, gen, diff.device,
                                                           diff.milestones))
    with torch.no_grad():
        teacher = diff.teacher(cond, uncond)
        z_m = tlcm.ddpm_data_free_latents(teacher, diff.noise(n, gen), t_m, M - segment, ac, pred)
        z_n = tlcm.ddpm_solve(teacher, z_m, t_m, t_n, 1, ac, pred)
        with ema.swapped() if ema is not None else nullcontext():
            target = tlcm.ddpm_jump(z_n, diff.student(cond)(z_n, t_n), t_n, t_low, ac, pred)
    prediction = tlcm.ddpm_jump(z_m, diff.student(cond, unet)(z_m, t_m), t_m, t_low, ac, pred)
    return distance(prediction, target, gen)


def stage2_loss(diff: UNetDiffusion, unet, cond: dict, uncond: dict, distance, gen: torch.Generator,
                ema: EMAParams | None = None) -> torch.Tensor:
    """DCD: x0-space consistency between neighbouring milestones, on the student's own samples."""
    args, n = diff.args, cond["embeds"].shape[0]
    with torch.no_grad():
        x0_hat = diff.sample(diff.student(cond), diff.noise(n, gen), args.stage2_student_steps, gen)
        t_m, t_n = (t.long() for t in tlcm.stage2_times(n, diff.T, args.num_segments, gen, diff.device,
                                                        diff.milestones))
        z_m = diff.renoise(x0_hat, diff.noise(n, gen), t_m)
        z_n = tlcm.ddpm_solve(diff.teacher(cond, uncond), z_m, t_m, t_n, args.stage2_teacher_substeps,
                              diff.alphas_cumprod, diff.prediction_type)
        with ema.swapped() if ema is not None else nullcontext():
            target = diff.x0(z_n, diff.student(cond)(z_n, t_n), t_n)
    prediction = diff.x0(z_m, diff.student(cond, unet)(z_m, t_m), t_m)
    return distance(prediction, target, gen)


def extras_loss(diff: UNetDiffusion, unet, cond: dict, uncond: dict, captions: list[str], gen: torch.Generator,
                decode=None, scorer=None, head=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(reward hinge on the decoded x0 of the own sample at a milestone + DMD + GAN on the one-step sample x,
    x detached for the fake score's and the head's own updates, or None without DMD and GAN)."""
    args, n = diff.args, len(captions)
    total = torch.zeros((), device=diff.device)
    if scorer is not None:
        with torch.no_grad():
            x0_hat = diff.sample(diff.student(cond), diff.noise(n, gen), args.stage2_student_steps, gen)
            t_m = tlcm.stage2_times(n, diff.T, args.num_segments, gen, diff.device, diff.milestones)[0].long()
            z_m = diff.renoise(x0_hat, diff.noise(n, gen), t_m)
        images = decode(diff.x0(z_m, diff.student(cond, unet)(z_m, t_m), t_m))
        shuffled = [captions[(i + 1) % n] for i in range(n)]  # a mismatched prompt as the negative c_neg
        total = total + args.reward_weight * hinge_reward_loss(scorer(images, captions), scorer(images, shuffled),
                                                               args.reward_s0)
    if not (args.dmd or args.gan):
        return total, None
    noise, top = diff.noise(n, gen), torch.full((n,), diff.T - 1, device=diff.device)
    x = diff.x0(noise, diff.student(cond, unet)(noise, top), top)  # the one-step sample, with grad
    if args.dmd:  # the student follows g = normalised (fake x0 - real x0) at x re-noised
        z, t, _ = renoised(diff, x.detach(), gen)
        with torch.no_grad(), tlcm_extras.adapter_active(diff.base):
            fake_x0 = diff.x0(z, diff.output(diff.base, z, t, cond), t)
        real_x0 = diff.x0(z, diff.teacher(cond, uncond)(z, t), t)
        total = total + args.dmd_weight * dmd_surrogate(x, dmd_grad(x.detach(), real_x0, fake_x0))
    if args.gan:
        total = total + args.gan_weight * gan_generator_loss(disc_logits(diff, head, x, cond, gen, grad=True))
    return total, x.detach()


def renoised(diff: UNetDiffusion, x: torch.Tensor, gen: torch.Generator):
    """(x re-noised to t, t, the noise) with integer t ~ U[0.02 T, 0.98 T]."""
    t = tlcm.uniform_times(x.shape[0], diff.T, gen, diff.device).round().long()
    eps = diff.noise(x.shape[0], gen)
    return diff.renoise(x, eps, t), t, eps


def fake_score_loss(diff: UNetDiffusion, cond: dict, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The DMD fake score's diffusion loss (the teacher's parameterisation) on the student's detached samples x;
    call it, and back-propagate it, inside tlcm_extras.adapter_active (only there do the fake score's weights require
    grad)."""
    z, t, eps = renoised(diff, x, gen)
    target = model_output_from_x0_eps(x, eps, *alpha_sigma(diff.alphas_cumprod, t), diff.prediction_type)
    return l2_loss(diff.output(diff.base, z, t, cond), target)


def disc_logits(diff: UNetDiffusion, head, x: torch.Tensor, cond: dict, gen: torch.Generator,
                grad: bool) -> torch.Tensor:
    """The head on the frozen teacher's mid-block output at a re-noised x, its pixels as tokens."""
    z, t, _ = renoised(diff, x, gen)
    with torch.set_grad_enabled(grad), lora.adapters_disabled(diff.base), head.reading(diff.base) as seen:
        diff.output(diff.base, z, t, cond)
    return head(seen[-1].flatten(2).transpose(1, 2))


def disc_loss(diff: UNetDiffusion, head, cond: dict, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The head's loss: real = the student's q-step sample, fake = its (detached) one-step sample x."""
    real = diff.sample(diff.student(cond), diff.noise(x.shape[0], gen), diff.args.stage2_student_steps, gen)
    return gan_discriminator_loss(disc_logits(diff, head, real, cond, gen, False),
                                  disc_logits(diff, head, x, cond, gen, False))


def main(args: argparse.Namespace) -> None:
    accelerator = loop.make_accelerator(args)
    stages = tlcm_stages.Stages(args, accelerator, "unet")
    from accelerate.utils import set_seed

    set_seed(args.seed)
    prompts = data.load_prompts(args.prompts_file, args.dataset_name, args.caption_column, args.max_train_samples)

    # ---- models: frozen VAE (validation, reward) and text encoders; one UNet = teacher + LoRA student
    teacher = models.load_teacher(args, accelerator, ("sdxl", "sd"), frozen_denoiser=True)
    encoders, device = teacher.text_encoders, accelerator.device
    base = teacher.lora_base(accelerator)  # on the CPU if prepare() splits it
    lora.add_trainable_lora(base, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout,
                            dtype=args.lora_torch_dtype)
    # the extras' players, each when its flag asks: the reward model, the DMD fake score (a second adapter) and the
    # GAN head (on the mid-block output), each of the last two with its own optimizer
    scorer, fake_opt, head, disc_opt = tlcm_extras.add_extras(args, base, device, base.config.block_out_channels[-1],
                                                              features=("mid_block", "output"))
    if args.gradient_checkpointing:
        base.enable_gradient_checkpointing()
    models.prepare_denoiser(base, args)  # xformers, --merged_lora_forward, --torch_compile
    trained = [name for name, p in base.named_parameters() if p.requires_grad]
    params = [p for p in base.parameters() if p.requires_grad]
    diff = UNetDiffusion(base, teacher, teacher.latent_side, args, device, accelerator.autocast,
                         collective=stages.collective)

    # ---- what every stage's checkpoint holds besides its own optimizer, schedule and loader: the loss's random
    # stream, the EMA, the extras' optimizers (with their weights)
    rng = loop.TrainingRNG(args.seed, device, accelerator.process_index)
    ema = EMAParams(params, args.ema_decay, base) if args.ema_decay > 0 else None
    for state in (rng, ema, fake_opt, disc_opt):
        if state is not None:
            accelerator.register_for_checkpointing(state)

    # ---- prompts: encoded on the fly, or once per distinct prompt (--cache_text_embeddings)
    text_cache = (cache.cached_text_embeddings(args, prompts, teacher.encode, encoders, accelerator)
                  if args.cache_text_embeddings else None)

    @torch.no_grad()
    def encode(captions):
        out = teacher.encode(captions) if text_cache is None else text_cache.lookup(captions, device, teacher.dtype)
        return dict(zip(("embeds", "pooled"), out))
    empty = encode([""])  # the CFG's unconditional input: its encoding or zeros (--uncond)
    uncond = dict(zip(empty, teacher.uncond_text(tuple(empty.values()), args.uncond)))
    if text_cache is not None:  # every prompt (validation's too) is cached: the encoders' memory is free
        teacher.release_text_encoders(text_cache)
    distance = latent_distance(args.loss_type, args.huber_c, device, args.latent_lpips_path,
                               base.config.in_channels, args.lpips_augmentations)

    # ---- the stages: each is one training with its own steps, learning rate, optimizer and checkpoints
    steps = {"1": args.stage1_steps, "2": args.stage2_steps, "extras": args.extras_steps}
    lrs = {"1": args.stage1_learning_rate, "2": args.stage2_learning_rate, "extras": args.extras_learning_rate}
    for i, stage in enumerate(args.stages):
        if stages.finished(base, stage):  # its LoRA is loaded: the next stage starts from it
            continue
        stages.start(base, stage, i, rng.generator)  # its start LoRA, folder and seed
        optimizer, lr_scheduler = loop.make_optimizer(params, args, steps[stage], accelerator.num_processes,
                                                      lr=lrs[stage])
        loader = data.make_prompt_dataloader(prompts, args.train_batch_size, args.seed)
        unet, optimizer, lr_scheduler, loader = accelerator.prepare(base, optimizer, lr_scheduler, loader)
        params = sharding.prepared_parameters(base, trained, optimizer)  # FSDP2 put new (sharded) objects in place
        if ema is not None:
            ema.reset(params)
        if fake_opt is not None:
            fake_opt.retarget(base)
        train = loop.TrainLoop(accelerator, loader, steps[stage], args, f"tlcm_sdxl_stage{stage}", lr_scheduler,
                               output_dir=stages.dir(stage), resume=stages.resume(stage))
        for batch in train:
            cond = encode(batch["captions"])
            with accelerator.accumulate(unet):
                x = None
                if stage == "1":
                    loss = stage1_loss(diff, unet, cond, uncond, distance, rng.generator, ema)
                elif stage == "2":
                    loss = stage2_loss(diff, unet, cond, uncond, distance, rng.generator, ema)
                else:
                    loss, x = extras_loss(diff, unet, cond, uncond, batch["captions"], rng.generator,
                                          teacher.decode, scorer, head)
                updated = loop.apply_gradients(accelerator, loss, params, optimizer, lr_scheduler, args.max_grad_norm)
            if x is not None:  # the extras' own updates, one per micro-batch, after the student's
                if fake_opt is not None:
                    with tlcm_extras.adapter_active(base):
                        fake_opt.step(fake_score_loss(diff, cond, x, rng.generator))
                if disc_opt is not None:
                    disc_opt.step(disc_loss(diff, head, cond, x, rng.generator))
            if not train.step_done(loss, updated):
                continue
            if ema is not None:
                ema.update()
            if train.checkpoint_due:
                train.save_checkpoint()
            if train.validation_due:
                validate(diff, encode, teacher.decode, train.validation_prompts, train.global_step, accelerator, f"stage{stage}")
        stages.save(base, stage)  # <output_dir>/stage<k>/lora
        accelerator.free_memory()  # the next stage prepares its own optimizer, schedule and loader

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        stages.copy_last_to_output()  # the last stage's LoRA files on top of --output_dir
        # README.md, then --push_to_hub
        outputs.publish(args, "TLCM LoRA (two-stage data-free consistency distillation)", model_card(args, teacher.arch))
    accelerator.end_training()


@torch.no_grad()
@torch.random.fork_rng()  # sampling must not move the training RNG
def validate(diff: UNetDiffusion, encode, decode, prompts: list[str], step: int, accelerator, tag: str) -> None:
    """TLCM-sampler samples at 2/3/4/8 steps, one row each, from the same noise; a labelled grid."""
    cond, rows, labels = encode(prompts), [], []
    for steps in (2, 3, 4, 8):
        gen = torch.Generator(diff.device).manual_seed(diff.args.seed)
        x0 = diff.sample(diff.student(cond), diff.noise(len(prompts), gen), steps, gen)
        rows.append(decode(x0).float().cpu())
        labels.append(f"TLCM {tag}, {steps} steps")
    path = log_image_grid(accelerator, rows, labels, step, diff.args.output_dir, tag)
    logger.info(f"validation grid -> {path}")


def model_card(args: argparse.Namespace, arch: str) -> str:
    """How to load and sample the LoRA: the body of the README.md the run writes (outputs.publish)."""
    pipeline = "StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline"
    M = args.num_segments
    n = 4 if M == 8 else M  # the published subsets are for 8 segments; otherwise only 1 or M steps exist
    return f"""
Distilled from `{args.pretrained_teacher_model}` with `train_tlcm_sdxl.py` (stages {', '.join(args.stages)};
rank {args.lora_rank}; teacher CFG {args.guidance_scale:g}, distilled in). No image was used: prompts only.

```python
from diffusers import LCMScheduler, {pipeline}
from utils.scheduling_tlcm import TLCMScheduler, tlcm_timesteps
pipe = {pipeline}.from_pretrained("{args.pretrained_teacher_model}")
pipe.load_lora_weights("{args.output_dir}")
pipe.scheduler = TLCMScheduler.from_config(pipe.scheduler.config, num_segments={M})
image = pipe("a prompt", num_inference_steps={n}, guidance_scale=0).images[0]
# or diffusers' LCMScheduler on the same timesteps (its grid of {lcm_original_inference_steps(1000, M)} points holds the milestones)
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps={lcm_original_inference_steps(1000, M)})
image = pipe("a prompt", timesteps=tlcm_timesteps({n}, num_segments={M}), guidance_scale=0).images[0]
```
Samplers: TLCMScheduler (this project's `utils/`: predict x0, re-noise it with fresh noise, on the milestone
timesteps; {n} steps: {tlcm_timesteps(n, num_segments=M)}) or diffusers' LCMScheduler on the same timesteps; {"2-8" if M == 8 else f"1 or {M}"} steps, guidance_scale 0.
PEFT: `get_peft_model(pipe.unet, LoraConfig(r={args.lora_rank}, target_modules=...))` then
`load_adapter("{args.output_dir}", adapter_name="default")`; ComfyUI / A1111: `lora_kohya.safetensors`.
Or: `python inference.py --base_model_path {args.pretrained_teacher_model} --lora_path {args.output_dir} --infer-steps 4`
(add `--scheduler tlcm` for the TLCM sampler; the default is LCMScheduler).
"""


if __name__ == "__main__":
    gc.freeze()  # the imported libraries live until exit: the collector, and the exit, need not scan them
    with user_errors():  # bad input anywhere ends as one line, exit code 2
        main(parse_args())
