"""TLCM: two-stage, data-free latent consistency distillation of a FLUX transformer into one LoRA.

    accelerate launch train_tlcm_flux.py --pretrained_teacher_model <FLUX hub id or folder> \
        --prompts_file prompts.txt --output_dir out/ --stage all

The method (TLCM, arXiv 2406.05768; docs/tlcm.md), carried to flow matching. No image is read:
every latent comes from the teacher or the student. One transformer is in memory: the student is
it with the LoRA enabled, the teacher is it with the LoRA disabled. Times are the teacher's
unshifted timesteps t in [0, T], seen by the network as FLUX's shifted sigma(t); the M segment
milestones are t_i = i T / M (utils/tlcm.py).
  stage 1, DSCD (sub-segment consistency): pick a segment s and t_m in it; z_{t_m} = M - s equal
      CFG-teacher Euler steps from pure noise; z_{t_n} = one teacher step of --skip; the student
      jumps each to the segment's lower milestone, g(z, t) = z + (sigma_low - sigma_t) v;
      loss d(g(z_{t_m}, t_m), stopgrad g(z_{t_n}, t_n)).
  stage 2, DCD (global consistency): the student samples its own x0 in q steps (x0 prediction,
      fresh re-noising); noise it to a milestone t_m; the teacher runs p sub-steps to the milestone
      below; loss d(f(z_{t_m}), stopgrad f(z_{t_n})) with f = the student's x0 prediction.
  extras (optional, after stage 2): a reward hinge loss on decoded student samples; DMD (a second,
      "fake_score" LoRA learns the student's one-step samples; the student follows fake - real x0);
      GAN (frozen-teacher features + a small head; real = the q-step sample, fake = the one-step one).
      The fake score and the head take their own step after the student's, on the same samples.
Guidance: a guidance-distilled model (FLUX.1-dev) gets --teacher_guidance as its guidance input,
student and teacher alike; a model without it is guided by ordinary CFG (--guidance_scale, one
batched cond+uncond pass) and the student learns the guided flow without CFG.

Output (each stage in <output_dir>/stage<k>/lora, the last one also in <output_dir>): a PEFT
adapter folder (`adapter_config.json` + `adapter_model.safetensors`: `get_peft_model(transformer,
LoraConfig(r=64, ...))` + `load_adapter(out)`), the diffusers file `pytorch_lora_weights.safetensors`
(`FluxPipeline.load_lora_weights(out)`), `lora_kohya.safetensors` and a model card. Sample with
utils.scheduling_flow_match_euler_tlcm.FlowMatchEulerTLCMScheduler, 2-8 steps.
"""

from __future__ import annotations

import argparse
import gc
import logging
from contextlib import nullcontext

import torch

from utils import cache, data, flags, lora, loop, models, outputs, sharding, tlcm, tlcm_extras, tlcm_stages
from utils.ema import EMAParams
from utils.errors import user_errors
from utils.grids import log_image_grid
from utils.losses import (dmd_grad, dmd_surrogate, flow_matching_loss, gan_discriminator_loss, gan_generator_loss,
                          hinge_reward_loss, latent_distance)
from utils.solvers import cfg, flow_renoise, flow_x0

logger = logging.getLogger("train_tlcm_flux")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = flags.Parser(description=__doc__.split("\n\n")[0])
    m = parser.add_teacher_args("FLUX pipeline: hub id or local diffusers folder (FluxTransformer2DModel)",
                                uncond=False)
    parser.add_lora_args(m, "flux", '"flux" (the released TLCM FLUX list: attention, projections, feed-forwards, '
                                    'embedders, norm linears) or a comma-separated list of module names', presets=("flux",))
    m.add_argument("--guidance_scale", type=float, default=5.0,
                   help="CFG scale of a teacher WITHOUT guidance embedding: v = v_u + g (v_c - v_u) (default: 5)")
    m.add_argument("--teacher_guidance", type=float, default=3.5,
                   help="guidance input of a guidance-distilled teacher (FLUX.1-dev); the student gets the same "
                        "value, so sample with it too (default: %(default)s)")
    parser.add_tlcm_args("train_tlcm_flux.py")
    parser.add_training_args(image_recipe=False, per_stage=True)
    parser.set_defaults(train_batch_size=8)
    return parser.check(parser.parse_args(argv))


class FluxFlow:
    """The transformer as the velocity field v(z, sigma) of FLUX's packed latents on its shifted time axis."""

    def __init__(self, base, sched_config: dict, latent_side: int, args: argparse.Namespace, dtype, device,
                 autocast=nullcontext, collective: bool = False) -> None:
        self.base, self.args, self.dtype, self.device, self.autocast = base, args, dtype, device, autocast
        self.collective = collective  # sharded weights: a forward is a collective, every process must run as many
        self.sched_config, self.latent_side = sched_config, latent_side
        self.T = sched_config.get("num_train_timesteps", 1000)
        self.tokens, self.width = (latent_side // 2) ** 2, base.config.in_channels  # 2x2 patches packed per token
        self.img_ids = models.latent_image_ids(latent_side, latent_side, device)
        self.mu = tlcm.schedule_mu(sched_config, self.tokens)
        self.guided = bool(base.config.get("guidance_embeds", False))

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) latents from the packed tokens."""
        return models.unpack_latents(packed, self.latent_side, self.latent_side)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """FLUX's shifted sigma of unshifted timesteps t in [0, T]."""
        return tlcm.sigma_of_t(t, self.sched_config, self.mu).to(self.device)

    def sampler_sigmas(self, steps: int) -> torch.Tensor:
        return tlcm.tlcm_sigmas(steps, self.sched_config, self.mu)

    def noise(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randn((n, self.tokens, self.width), device=self.device, generator=gen)

    def velocity(self, model, z: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        guidance = torch.full_like(sigma, self.args.teacher_guidance) if self.guided else None
        with self.autocast():
            v = model(hidden_states=z.to(self.dtype), timestep=sigma.to(self.dtype), guidance=guidance,
                      pooled_projections=cond["pooled"].to(self.dtype),
                      encoder_hidden_states=cond["embeds"].to(self.dtype), txt_ids=cond["text_ids"],
                      img_ids=self.img_ids, return_dict=False)[0]
        return v.float()

    def teacher(self, cond: dict, uncond: dict):
        """v(z, sigma) of the LoRA-free model, guided: by its guidance input, or CFG in one batched pass."""
        def v(z, sigma):
            with torch.no_grad(), lora.adapters_disabled(self.base):
                if self.guided:
                    return self.velocity(self.base, z, sigma, cond)
                n = z.shape[0]
                both = {"embeds": torch.cat([cond["embeds"], uncond["embeds"].expand(n, -1, -1)]),
                        "pooled": torch.cat([cond["pooled"], uncond["pooled"].expand(n, -1)]),
                        "text_ids": cond["text_ids"]}
                v_c, v_u = self.velocity(self.base, torch.cat([z, z]), torch.cat([sigma, sigma]), both).chunk(2)
                return cfg(v_c, v_u, self.args.guidance_scale - 1.0)  # cfg() uses w = scale - 1
        return v

    def student(self, cond: dict, model=None):
        """v(z, sigma) of the model with its LoRA: `model` (the prepared one, with grad) or the bare base."""
        return lambda z, sigma: self.velocity(model if model is not None else self.base, z, sigma, cond)


def stage1_loss(flow: FluxFlow, transformer, cond: dict, uncond: dict, distance, gen: torch.Generator,
                ema: EMAParams | None = None) -> torch.Tensor:
    """DSCD: both ends jump to the segment's lower milestone (the boundary x0 in the lowest segment)."""
    args, n, M = flow.args, cond["embeds"].shape[0], flow.args.num_segments
    segment = int(torch.randint(0, M, (1,), generator=gen, device=gen.device))
    if flow.collective:  # the segment sets the number of teacher steps: every process takes process 0's
        segment = sharding.same_everywhere(segment)
    t_m, t_n, t_low = tlcm.stage1_times(segment, n, args.skip, flow.T, M, gen, flow.device)
    s_m, s_n, s_low = flow.sigma(t_m), flow.sigma(t_n), flow.sigma(t_low)
    with torch.no_grad():
        z_m = tlcm.data_free_latents(flow.teacher(cond, uncond), flow.noise(n, gen), t_m, M - segment, flow.sigma,
                                     flow.T)
        z_n = tlcm.teacher_solve(flow.teacher(cond, uncond), z_m, t_m, t_n, 1, flow.sigma)
        with ema.swapped() if ema is not None else nullcontext():
            target = tlcm.jump(z_n, flow.student(cond)(z_n, s_n), s_n, s_low)
    pred = tlcm.jump(z_m, flow.student(cond, transformer)(z_m, s_m), s_m, s_low)
    return distance(pred, target, gen)


def stage2_loss(flow: FluxFlow, transformer, cond: dict, uncond: dict, distance, gen: torch.Generator,
                ema: EMAParams | None = None) -> torch.Tensor:
    """DCD: x0-space consistency between neighbouring milestones, on the student's own samples."""
    args, n = flow.args, cond["embeds"].shape[0]
    with torch.no_grad():
        x0_hat = tlcm.self_sample(flow.student(cond), flow.noise(n, gen),
                                  flow.sampler_sigmas(args.stage2_student_steps), gen)
        t_m, t_n = tlcm.stage2_times(n, flow.T, args.num_segments, gen, flow.device)
        s_m, s_n = flow.sigma(t_m), flow.sigma(t_n)
        z_m = flow_renoise(x0_hat, flow.noise(n, gen), s_m)
        z_n = tlcm.teacher_solve(flow.teacher(cond, uncond), z_m, t_m, t_n, args.stage2_teacher_substeps, flow.sigma)
        with ema.swapped() if ema is not None else nullcontext():
            target = flow_x0(z_n, flow.student(cond)(z_n, s_n), s_n)
    pred = flow_x0(z_m, flow.student(cond, transformer)(z_m, s_m), s_m)
    return distance(pred, target, gen)


def extras_loss(flow: FluxFlow, transformer, cond: dict, uncond: dict, captions: list[str], gen: torch.Generator,
                decode=None, scorer=None, head=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(reward hinge on the decoded x0 of the own sample at a milestone + DMD + GAN on the one-step sample x,
    x detached for the fake score's and the head's own updates, or None without DMD and GAN)."""
    args, n = flow.args, len(captions)
    total = torch.zeros((), device=flow.device)
    if scorer is not None:
        with torch.no_grad():
            x0_hat = tlcm.self_sample(flow.student(cond), flow.noise(n, gen),
                                      flow.sampler_sigmas(args.stage2_student_steps), gen)
            t_m, _ = tlcm.stage2_times(n, flow.T, args.num_segments, gen, flow.device)
            z_m = flow_renoise(x0_hat, flow.noise(n, gen), flow.sigma(t_m))
        x0 = flow_x0(z_m, flow.student(cond, transformer)(z_m, flow.sigma(t_m)), flow.sigma(t_m))
        images = decode(flow.unpack(x0))
        shuffled = [captions[(i + 1) % n] for i in range(n)]  # a mismatched prompt as the negative c_neg
        total = total + args.reward_weight * hinge_reward_loss(scorer(images, captions), scorer(images, shuffled),
                                                               args.reward_s0)
    if not (args.dmd or args.gan):
        return total, None
    noise, top = flow.noise(n, gen), flow.sigma(torch.full((n,), float(flow.T), device=flow.device))
    x = flow_x0(noise, flow.student(cond, transformer)(noise, top), top)  # the one-step sample, with grad
    if args.dmd:  # the student follows g = normalised (fake x0 - real x0) at x re-noised
        z, sigma, _ = renoised(flow, x.detach(), gen)
        with torch.no_grad(), tlcm_extras.adapter_active(flow.base):
            fake_x0 = flow_x0(z, flow.velocity(flow.base, z, sigma, cond), sigma)
        real_x0 = flow_x0(z, flow.teacher(cond, uncond)(z, sigma), sigma)
        total = total + args.dmd_weight * dmd_surrogate(x, dmd_grad(x.detach(), real_x0, fake_x0))
    if args.gan:
        total = total + args.gan_weight * gan_generator_loss(disc_logits(flow, head, x, cond, gen, grad=True))
    return total, x.detach()


def renoised(flow: FluxFlow, x: torch.Tensor, gen: torch.Generator):
    """(x re-noised to sigma(t), sigma, the noise) with t ~ U[0.02 T, 0.98 T]."""
    sigma, eps = flow.sigma(tlcm.uniform_times(x.shape[0], flow.T, gen, flow.device)), flow.noise(x.shape[0], gen)
    return flow_renoise(x, eps, sigma), sigma, eps


def fake_score_loss(flow: FluxFlow, cond: dict, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The DMD fake score's flow-matching loss on the student's (detached) one-step samples x; call it, and
    back-propagate it, inside tlcm_extras.adapter_active (only there do the fake score's weights require grad)."""
    z, sigma, eps = renoised(flow, x, gen)
    return flow_matching_loss(flow.velocity(flow.base, z, sigma, cond), x, eps)


def disc_logits(flow: FluxFlow, head, x: torch.Tensor, cond: dict, gen: torch.Generator, grad: bool) -> torch.Tensor:
    """The head on the frozen teacher's features (input of its final norm) at a re-noised x."""
    z, sigma, _ = renoised(flow, x, gen)
    with torch.set_grad_enabled(grad), lora.adapters_disabled(flow.base), head.reading(flow.base) as seen:
        flow.velocity(flow.base, z, sigma, cond)
    return head(seen[-1])


def disc_loss(flow: FluxFlow, head, cond: dict, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The head's loss: real = the student's q-step sample, fake = its (detached) one-step sample x."""
    with torch.no_grad():
        real = tlcm.self_sample(flow.student(cond), flow.noise(x.shape[0], gen),
                                flow.sampler_sigmas(flow.args.stage2_student_steps), gen)
    return gan_discriminator_loss(disc_logits(flow, head, real, cond, gen, False),
                                  disc_logits(flow, head, x, cond, gen, False))


def main(args: argparse.Namespace) -> None:
    accelerator = loop.make_accelerator(args)
    stages = tlcm_stages.Stages(args, accelerator, "transformer")
    from accelerate.utils import set_seed

    set_seed(args.seed)
    prompts = data.load_prompts(args.prompts_file, args.dataset_name, args.caption_column, args.max_train_samples)

    # ---- models: frozen VAE (validation, reward) and text encoders; one transformer = teacher + LoRA student
    teacher = models.load_teacher(args, accelerator, "flux", frozen_denoiser=True)
    encoders, device, dtype = teacher.text_encoders, accelerator.device, teacher.dtype
    base = teacher.lora_base(accelerator)  # on the CPU if prepare() splits it
    lora.add_trainable_lora(base, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout,
                            dtype=args.lora_torch_dtype)
    # the extras' players, each when its flag asks: the reward model, the DMD fake score (a second adapter) and the
    # GAN head (on the input of the final norm layer), each of the last two with its own optimizer
    width = base.config.num_attention_heads * base.config.attention_head_dim
    scorer, fake_opt, head, disc_opt = tlcm_extras.add_extras(args, base, device, width, features=("norm_out", "input"))
    if args.gradient_checkpointing:
        base.enable_gradient_checkpointing()
    models.prepare_denoiser(base, args)  # xformers, --merged_lora_forward, --torch_compile
    trained = [name for name, p in base.named_parameters() if p.requires_grad]
    params = [p for p in base.parameters() if p.requires_grad]
    flow = FluxFlow(base, teacher.scheduler_config, teacher.latent_side, args, dtype, device, accelerator.autocast,
                    collective=stages.collective)

    # ---- what every stage's checkpoint holds besides its own optimizer, schedule and loader: the loss's random
    # stream, the EMA, the extras' optimizers (with their weights)
    rng = loop.TrainingRNG(args.seed, device, accelerator.process_index)
    ema = EMAParams(params, args.ema_decay, base) if args.ema_decay > 0 else None
    for state in (rng, ema, fake_opt, disc_opt):
        if state is not None:
            accelerator.register_for_checkpointing(state)

    # ---- prompts: encoded on the fly, or once per distinct prompt (--cache_text_embeddings)
    text_cache, text_ids = None, None

    @torch.no_grad()
    def encode(captions):
        if text_cache is not None:
            embeds, pooled = text_cache.lookup(captions, device, dtype)
            return {"embeds": embeds, "pooled": pooled, "text_ids": text_ids}
        embeds, pooled, ids = teacher.encode(captions)
        return {"embeds": embeds, "pooled": pooled, "text_ids": ids}

    uncond = encode([""])
    if args.cache_text_embeddings:
        text_ids = uncond["text_ids"]  # zeros (L, 3): the same for every prompt
        text_cache = cache.cached_text_embeddings(
            args, prompts, lambda c: teacher.encode(c)[:2], encoders, accelerator)
        teacher.release_text_encoders(text_cache)  # every prompt (validation's too) is cached: T5's memory is free
    distance = latent_distance(args.loss_type, args.huber_c, device, args.latent_lpips_path,
                               base.config.in_channels // 4, args.lpips_augmentations,
                               to_latents=flow.unpack)

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
        transformer, optimizer, lr_scheduler, loader = accelerator.prepare(base, optimizer, lr_scheduler, loader)
        params = sharding.prepared_parameters(base, trained, optimizer)  # FSDP2 put new (sharded) objects in place
        if ema is not None:
            ema.reset(params)
        if fake_opt is not None:
            fake_opt.retarget(base)
        train = loop.TrainLoop(accelerator, loader, steps[stage], args, f"tlcm_stage{stage}", lr_scheduler,
                               output_dir=stages.dir(stage), resume=stages.resume(stage))
        for batch in train:
            cond = encode(batch["captions"])
            with accelerator.accumulate(transformer):
                x = None
                if stage == "1":
                    loss = stage1_loss(flow, transformer, cond, uncond, distance, rng.generator, ema)
                elif stage == "2":
                    loss = stage2_loss(flow, transformer, cond, uncond, distance, rng.generator, ema)
                else:
                    loss, x = extras_loss(flow, transformer, cond, uncond, batch["captions"], rng.generator,
                                          teacher.decode, scorer, head)
                updated = loop.apply_gradients(accelerator, loss, params, optimizer, lr_scheduler, args.max_grad_norm)
            if x is not None:  # the extras' own updates, one per micro-batch, after the student's
                if fake_opt is not None:
                    with tlcm_extras.adapter_active(base):
                        fake_opt.step(fake_score_loss(flow, cond, x, rng.generator))
                if disc_opt is not None:
                    disc_opt.step(disc_loss(flow, head, cond, x, rng.generator))
            if not train.step_done(loss, updated):
                continue
            if ema is not None:
                ema.update()
            if train.checkpoint_due:
                train.save_checkpoint()
            if train.validation_due:
                validate(flow, encode, teacher.decode, train.validation_prompts, train.global_step, accelerator,
                         f"stage{stage}")
        stages.save(base, stage)  # <output_dir>/stage<k>/lora
        accelerator.free_memory()  # the next stage prepares its own optimizer, schedule and loader

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        stages.copy_last_to_output()  # the last stage's LoRA files on top of --output_dir
        # README.md, then --push_to_hub
        outputs.publish(args, "TLCM LoRA (two-stage data-free consistency distillation)", model_card(args))
    accelerator.end_training()


@torch.no_grad()
@torch.random.fork_rng()  # sampling must not move the training RNG
def validate(flow: FluxFlow, encode, decode, prompts: list[str], step: int, accelerator, tag: str) -> None:
    """TLCM-sampler samples at 2/3/4/8 steps, one row each, from the same noise; a labelled grid."""
    cond, rows, labels = encode(prompts), [], []
    for steps in (2, 3, 4, 8):
        gen = torch.Generator(flow.device).manual_seed(flow.args.seed)
        x0 = tlcm.self_sample(flow.student(cond), flow.noise(len(prompts), gen), flow.sampler_sigmas(steps), gen)
        rows.append(decode(flow.unpack(x0)).float().cpu())
        labels.append(f"TLCM {tag}, {steps} steps")
    path = log_image_grid(accelerator, rows, labels, step, flow.args.output_dir, tag, column_labels=prompts)
    logger.info(f"validation grid -> {path}")


def model_card(args: argparse.Namespace) -> str:
    """How to load and sample the LoRA: the body of the README.md the run writes (outputs.publish)."""
    return f"""
Distilled from `{args.pretrained_teacher_model}` with `train_tlcm_flux.py` (stages {', '.join(args.stages)};
rank {args.lora_rank}). No image was used: prompts only.

```python
from diffusers import FluxPipeline
from utils.scheduling_flow_match_euler_tlcm import FlowMatchEulerTLCMScheduler
pipe = FluxPipeline.from_pretrained("{args.pretrained_teacher_model}")
pipe.scheduler = FlowMatchEulerTLCMScheduler.from_config(pipe.scheduler.config)
pipe.load_lora_weights("{args.output_dir}")
image = pipe("a prompt", num_inference_steps=4, guidance_scale={args.teacher_guidance}).images[0]
```
Sampler: FlowMatchEulerTLCMScheduler (this project's `utils/`), 2-8 steps, trained on {args.num_segments} segments.
PEFT: `get_peft_model(pipe.transformer, LoraConfig(r={args.lora_rank}, target_modules=...))` then
`load_adapter("{args.output_dir}", adapter_name="default")`; ComfyUI: `lora_kohya.safetensors`.
Or: `python inference.py --base_model_path {args.pretrained_teacher_model} --lora_path {args.output_dir} --infer-steps 4`.
"""


if __name__ == "__main__":
    gc.freeze()  # the imported libraries live until exit: the collector, and the exit, need not scan them
    with user_errors():  # bad input anywhere ends as one line, exit code 2
        main(parse_args())
