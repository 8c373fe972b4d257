"""TLCM: two-stage, data-free latent consistency distillation of a FLUX transformer into one LoRA.

    accelerate launch train_tlcm_flux.py --pretrained_teacher_model <FLUX hub id or folder> \
        --prompts_file prompts.txt --output_dir out/ --stage all

The method (TLCM, arXiv 2406.05768; ../README "TLCM"), carried to flow matching. No image is read:
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
Guidance: a guidance-distilled model (FLUX.1-dev) gets --teacher_guidance as its guidance input,
student and teacher alike; a model without it is guided by ordinary CFG (--guidance_scale, one
batched cond+uncond pass) and the student learns the guided flow without CFG.

Output (each stage in <output_dir>/stage<k>/lora, the last one also in <output_dir>): a PEFT
adapter folder (`adapter_config.json` + `adapter_model.safetensors`, loads with seed 003's
`get_peft_model(transformer, LoraConfig(r=64, ...))` + `load_adapter(out)`), the diffusers file
`pytorch_lora_weights.safetensors` (`FluxPipeline.load_lora_weights(out)`), `lora_kohya.safetensors`
and a model card. Sample with utils.tlcm_scheduler.FlowMatchEulerTLCMScheduler, 2-8 steps.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from contextlib import nullcontext

import torch

from utils import cache, checkpoint, data, dmd, lora, models, tlcm, training
from utils.ema import EMAParams
from utils.errors import UserError, fail, user_errors
from utils.losses import LOSS_TYPES, consistency_loss
from utils.solvers import cfg, flow_renoise, flow_x0

logger = logging.getLogger("train_tlcm_flux")
STAGES = {"1": ["1"], "2": ["2"], "extras": ["extras"], "all": ["1", "2"]}


def parse_args(argv: list[str] | None = None):
    parser = training.Parser(description=__doc__.split("\n\n")[0])
    m = training.add_teacher_args(parser, "FLUX pipeline: hub id or local diffusers folder (FluxTransformer2DModel)")
    training.add_lora_args(m, "flux", '"flux" (the released TLCM FLUX list: attention, projections, feed-forwards, '
                                      'embedders, norm linears) or a comma-separated list of module names')
    m.add_argument("--guidance_scale", type=float, default=5.0,
                   help="CFG scale of a teacher WITHOUT guidance embedding: v = v_u + g (v_c - v_u) (default: 5)")
    m.add_argument("--teacher_guidance", type=float, default=3.5,
                   help="guidance input of a guidance-distilled teacher (FLUX.1-dev); the student gets the same "
                        "value, so sample with it too (default: %(default)s)")

    p = parser.add_argument_group("prompts (data-free: no image is read)")
    p.add_argument("--prompts_file", default=None, help="prompts: .txt (one per line), .jsonl or .csv")
    p.add_argument("--dataset_name", default=None, help="a `datasets` hub id or folder whose --caption_column is used")
    p.add_argument("--caption_column", default="text", help="prompt column of a .jsonl/.csv/dataset (default: text)")
    p.add_argument("--max_train_samples", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (default: %(default)s)")

    t = parser.add_argument_group("TLCM")
    t.add_argument("--stage", default="all", choices=list(STAGES),
                   help="which stage(s) to run: 1 (DSCD), 2 (DCD), all (1 then 2, plus the extras when an "
                        "extra flag is given), extras (only the extras, from --init_lora or stage 2's output)")
    t.add_argument("--num_segments", type=int, default=8, help="M, segments of [0, T] (default: %(default)s)")
    t.add_argument("--skip", type=float, default=20,
                   help="stage 1 teacher step t_m -> t_n in unshifted timesteps of T=1000 (default: %(default)s)")
    t.add_argument("--stage1_steps", type=int, default=12000, help="stage 1 optimizer steps (default: %(default)s)")
    t.add_argument("--stage1_learning_rate", type=float, default=1e-4, help="stage 1 learning rate (default: 1e-4)")
    t.add_argument("--stage2_steps", type=int, default=2000, help="stage 2 optimizer steps (default: %(default)s)")
    t.add_argument("--stage2_learning_rate", type=float, default=1e-5, help="stage 2 learning rate (default: 1e-5)")
    t.add_argument("--stage2_student_steps", type=int, default=4, help="q: steps of the student's own sample")
    t.add_argument("--stage2_teacher_substeps", type=int, default=3, help="p: teacher sub-steps between milestones")
    t.add_argument("--init_lora", default=None,
                   help="start from this LoRA (any format); default for --stage 2 / extras: the previous stage's "
                        "output in --output_dir")
    t.add_argument("--loss_type", default="l2", choices=LOSS_TYPES + ("lpips",),
                   help="distance d: l2, huber (pseudo-Huber) or lpips (latent LPIPS, --latent_lpips_path)")
    t.add_argument("--huber_c", type=float, default=0.001, help="c of the pseudo-Huber loss")
    t.add_argument("--latent_lpips_path", default=None,
                   help="folder of a latent LPIPS net (utils/latent_lpips.py) whose channels match the VAE latents")
    t.add_argument("--lpips_augmentations", type=int, default=4,
                   help="ensembled latent LPIPS: random augmentations averaged per call (0: plain; default: 4)")

    e = parser.add_argument_group("optional extras (run after stage 2; our choices where the paper is silent)")
    e.add_argument("--reward_model", default=None,
                   help="a differentiable scorer: a toy-judge folder, or package.module:factory returning "
                        "score(images, prompts) (e.g. a wrapper of MPS / ImageReward)")
    e.add_argument("--reward_weight", type=float, default=1.0, help="weight of the reward hinge loss")
    e.add_argument("--reward_s0", type=float, default=2.0,
                   help="hinge threshold s0 of max(s0 - s(x0, c), 0) (the toy judge's score is a log-odds)")
    e.add_argument("--dmd", action="store_true",
                   help="DMD on the one-step sample x: a second LoRA 'fake_score' (zero-init: = base) learns x "
                        "with the flow-matching loss (one update per student micro-batch); the student's gradient is "
                        "g = fake x0 - real (guided teacher) x0 at x re-noised to t ~ U[0.02T, 0.98T], divided per "
                        "sample by mean|x - real x0| (ours), applied as 0.5||x - stopgrad(x - g)||^2")
    e.add_argument("--dmd_weight", type=float, default=1.0, help="weight of the DMD loss (ours; default: 1)")
    e.add_argument("--dmd_learning_rate", type=float, default=1e-5, help="fake-score LoRA's AdamW lr (constant; 1e-5)")
    e.add_argument("--gan", action="store_true",
                   help="adversarial loss: D = the frozen teacher (LoRA off; input of its final norm) + a head (ours: "
                        "per-token linear, SiLU, token mean, linear); real = the student's q-step sample, fake = its "
                        "one-step sample, both re-noised to t ~ U[0.02T, 0.98T]; non-saturating logistic losses "
                        "(ours); one head update per student micro-batch")
    e.add_argument("--gan_weight", type=float, default=0.1, help="weight of the generator's GAN loss (ours; 0.1)")
    e.add_argument("--gan_learning_rate", type=float, default=1e-4, help="the head's AdamW lr (constant; ours; 1e-4)")
    e.add_argument("--extras_steps", type=int, default=500, help="optimizer steps of the extras stage")
    e.add_argument("--extras_learning_rate", type=float, default=1e-5,
                   help="the student's learning rate in the extras stage (loss: reward + DMD + GAN, weighted)")
    training.add_training_args(parser)
    training.add_speed_args(parser, image_recipe=False)
    for action in parser._actions:  # the loop's shared flags this recipe replaces with per-stage ones
        if action.dest in ("learning_rate", "max_train_steps", "num_train_epochs"):
            action.help = "not used here: see --stage1_steps/--stage2_steps/--extras_steps and their learning rates"
    parser.set_defaults(learning_rate=None, train_batch_size=8)
    args = parser.parse_args(argv)
    if args.learning_rate is not None or args.max_train_steps is not None:
        fail("train_tlcm_flux.py sets steps and learning rates per stage: use --stage1_steps/--stage2_steps/"
             "--extras_steps and --stage1_learning_rate/--stage2_learning_rate/--extras_learning_rate")
    if bool(args.prompts_file) == bool(args.dataset_name):
        fail("give exactly one prompt source: --prompts_file or --dataset_name")
    if not 1 <= args.num_segments <= 1000 or args.skip <= 0 or args.skip > 1000 / args.num_segments:
        fail(f"--skip {args.skip} must be in (0, T/M = {1000 / args.num_segments:g}] (--num_segments {args.num_segments})")
    for name in ("stage1_steps", "stage2_steps", "extras_steps", "stage2_student_steps", "stage2_teacher_substeps"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.loss_type == "lpips" and not args.latent_lpips_path:
        fail("--loss_type lpips needs --latent_lpips_path (a latent LPIPS folder)")
    for name in "reward_weight dmd_weight gan_weight extras_learning_rate dmd_learning_rate gan_learning_rate".split():
        if getattr(args, name) < 0:
            fail(f"--{name} must not be negative, got {getattr(args, name)}")
    extra = bool(args.reward_model or args.dmd or args.gan)
    args.stages = STAGES[args.stage] + (["extras"] if args.stage == "all" and extra else [])
    if "extras" in args.stages and not extra:
        fail("--stage extras needs an extra: --reward_model, --dmd and/or --gan")
    training.check_lora_args(args, presets=("flux",))
    args.learning_rate = args.stage1_learning_rate  # checked below; each stage sets its own
    training.check_training_args(args)
    return args


def main(args) -> None:
    accelerator = training.make_accelerator(args)
    from accelerate.utils import set_seed

    set_seed(args.seed)
    models.require_architecture(args.pretrained_teacher_model, "flux", revision=args.revision)
    prompts = data.load_prompts(args.prompts_file, args.dataset_name, args.caption_column, args.max_train_samples)
    dtype, device = training.weight_dtype(accelerator), accelerator.device
    sched_config = models.load_noise_scheduler_config(args.pretrained_teacher_model, args.revision)
    T, M = sched_config.get("num_train_timesteps", 1000), args.num_segments

    # ---- models: frozen VAE (validation, reward) and text encoders; one transformer = teacher + LoRA student
    vae = training.load_frozen_vae(args, device, dtype)
    latent_side = args.resolution // models.vae_scale_factor(vae.config)
    if latent_side % 2:
        fail(f"--resolution {args.resolution}: FLUX packs 2x2 latent patches, so it must be a multiple of "
             f"{2 * args.resolution // latent_side}")
    tokenizers, encoders = models.load_text_encoders(args.pretrained_teacher_model, "flux", args.revision, args.variant)
    for enc in encoders:
        enc.to(device, dtype)
    transformer = models.load_denoiser(args.pretrained_teacher_model, args.revision, args.variant)
    transformer.requires_grad_(False).to(device, dtype)
    lora.add_trainable_lora(transformer, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout)
    if args.dmd:  # the fake score: a second adapter, equal to the base at the start; never saved with the LoRA
        fake_params = dmd.add_fake_score(transformer, args.lora_rank, args.lora_alpha, args.lora_targets)
    training.enable_xformers(transformer, args.enable_xformers_memory_efficient_attention)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    training.prepare_denoiser(transformer, args)  # --torch_compile
    guided = bool(transformer.config.get("guidance_embeds", False))
    transformer = accelerator.prepare(transformer)
    base = accelerator.unwrap_model(transformer)
    params = [p for p in transformer.parameters() if p.requires_grad]
    rng = training.TrainingRNG(args.seed, device, accelerator.process_index)
    accelerator.register_for_checkpointing(rng)
    ema = EMAParams(params, args.ema_decay) if args.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    aux = dict(betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
               max_grad_norm=args.max_grad_norm)  # the extras' own optimizers, checkpointed with their weights
    if args.dmd:
        fake_opt = dmd.AuxOptimizer(fake_params, args.dmd_learning_rate, **aux)
        accelerator.register_for_checkpointing(fake_opt)
    if args.gan:
        head = dmd.DiscriminatorHead(base.config.num_attention_heads * base.config.attention_head_dim, seed=args.seed)
        disc_opt = dmd.AuxOptimizer(head.to(device).parameters(), args.gan_learning_rate, **aux)
        accelerator.register_for_checkpointing(disc_opt)

    # ---- geometry of the packed latents and FLUX's shifted time axis
    channels = base.config.in_channels // 4  # 2x2 patches packed into one token
    tokens, width = (latent_side // 2) ** 2, base.config.in_channels
    img_ids = models.latent_image_ids(latent_side, latent_side, device)
    mu = tlcm.schedule_mu(sched_config, tokens)

    def sigma_fn(t):
        return tlcm.sigma_of_t(t, sched_config, mu).to(device)

    @torch.no_grad()
    def encode(captions):
        if text_cache is not None:  # --cache_text_embeddings: T5 and CLIP ran once per distinct prompt
            embeds, pooled = text_cache.lookup(captions, device, encoders[-1].dtype)
            return {"embeds": embeds, "pooled": pooled, "text_ids": text_ids}
        embeds, pooled, ids = models.encode_prompt_flux(captions, tokenizers, encoders)
        return {"embeds": embeds, "pooled": pooled, "text_ids": ids}

    text_cache, text_ids = None, None
    uncond = encode([""])
    if args.cache_text_embeddings:
        text_ids = uncond["text_ids"]  # zeros (L, 3): the same for every prompt
        text_cache = cache.cached_text_embeddings(
            args, prompts, lambda c: models.encode_prompt_flux(c, tokenizers, encoders)[:2], encoders, accelerator)
    distance = make_distance(args, channels, latent_side, device)

    def velocity(model, z, sigma, cond):
        guidance = torch.full_like(sigma, args.teacher_guidance) if guided else None
        with accelerator.autocast():
            v = model(hidden_states=z.to(dtype), timestep=sigma.to(dtype), guidance=guidance,
                      pooled_projections=cond["pooled"].to(dtype), encoder_hidden_states=cond["embeds"].to(dtype),
                      txt_ids=cond["text_ids"], img_ids=img_ids, return_dict=False)[0]
        return v.float()

    def teacher(cond):
        """v(z, sigma) of the LoRA-free model, guided: by its guidance input, or CFG in one batched pass."""
        def v(z, sigma):
            with torch.no_grad(), lora.adapters_disabled(base):
                if guided:
                    return velocity(base, z, sigma, cond)
                n = z.shape[0]
                both = {"embeds": torch.cat([cond["embeds"], uncond["embeds"].expand(n, -1, -1)]),
                        "pooled": torch.cat([cond["pooled"], uncond["pooled"].expand(n, -1)]),
                        "text_ids": cond["text_ids"]}
                v_c, v_u = velocity(base, torch.cat([z, z]), torch.cat([sigma, sigma]), both).chunk(2)
                return cfg(v_c, v_u, args.guidance_scale - 1.0)  # cfg() uses w = scale - 1
        return v

    def student(cond, model=base):
        return lambda z, sigma: velocity(model, z, sigma, cond)

    def target_weights():
        return ema.swapped() if ema is not None else nullcontext()

    def noise_like(n):
        return torch.randn((n, tokens, width), device=device, generator=rng.generator)

    def stage1_loss(batch):
        """DSCD: both ends jump to the segment's lower milestone (the boundary x0 in the lowest segment)."""
        cond, n, gen = encode(batch["captions"]), len(batch["captions"]), rng.generator
        segment = int(torch.randint(0, M, (1,), generator=gen, device=gen.device))
        t_m, t_n, t_low = tlcm.stage1_times(segment, n, args.skip, T, M, gen, device)
        s_m, s_n, s_low = sigma_fn(t_m), sigma_fn(t_n), sigma_fn(t_low)
        with torch.no_grad():
            z_m = tlcm.data_free_latents(teacher(cond), noise_like(n), t_m, M - segment, sigma_fn, T)
            z_n = tlcm.teacher_solve(teacher(cond), z_m, t_m, t_n, 1, sigma_fn)
            with target_weights():
                target = tlcm.jump(z_n, student(cond)(z_n, s_n), s_n, s_low)
        pred = tlcm.jump(z_m, student(cond, transformer)(z_m, s_m), s_m, s_low)
        return distance(pred, target, gen)

    def stage2_loss(batch):
        """DCD: x0-space consistency between neighbouring milestones, on the student's own samples."""
        cond, n, gen = encode(batch["captions"]), len(batch["captions"]), rng.generator
        with torch.no_grad():
            x0_hat = tlcm.self_sample(student(cond), noise_like(n), tlcm.tlcm_sigmas(
                args.stage2_student_steps, sched_config, mu), gen)
            t_m, t_n = tlcm.stage2_times(n, T, M, gen, device)
            s_m, s_n = sigma_fn(t_m), sigma_fn(t_n)
            z_m = flow_renoise(x0_hat, noise_like(n), s_m)
            z_n = tlcm.teacher_solve(teacher(cond), z_m, t_m, t_n, args.stage2_teacher_substeps, sigma_fn)
            with target_weights():
                target = flow_x0(z_n, student(cond)(z_n, s_n), s_n)
        pred = flow_x0(z_m, student(cond, transformer)(z_m, s_m), s_m)
        return distance(pred, target, gen)

    scorer = None
    if args.reward_model:
        from utils.rewards import hinge_reward_loss, load_reward_model

        scorer = load_reward_model(args.reward_model, device)

    def extras_loss(batch):
        """reward (hinge on the decoded x0 at a milestone of the own sample) + DMD + GAN on the one-step sample."""
        captions = batch["captions"]
        cond, n, gen = encode(captions), len(captions), rng.generator
        total = torch.zeros((), device=device)
        if scorer is not None:
            with torch.no_grad():
                x0_hat = tlcm.self_sample(student(cond), noise_like(n), tlcm.tlcm_sigmas(
                    args.stage2_student_steps, sched_config, mu), gen)
                t_m, _ = tlcm.stage2_times(n, T, M, gen, device)
                z_m = flow_renoise(x0_hat, noise_like(n), sigma_fn(t_m))
            x0 = flow_x0(z_m, student(cond, transformer)(z_m, sigma_fn(t_m)), sigma_fn(t_m))
            images = decode(vae, x0, latent_side)
            shuffled = [captions[(i + 1) % n] for i in range(n)]  # a mismatched prompt as the negative c_neg
            total = total + args.reward_weight * hinge_reward_loss(scorer(images, captions), scorer(
                images, shuffled), args.reward_s0)
        if args.dmd or args.gan:
            noise, top = noise_like(n), sigma_fn(torch.full((n,), float(T), device=device))
            x = flow_x0(noise, student(cond, transformer)(noise, top), top)  # the one-step sample, with grad
            total = total + (args.dmd_weight * dmd_loss(cond, x) if args.dmd else 0.0) + (
                args.gan_weight * gan_loss(cond, x) if args.gan else 0.0)
        return total

    def renoised(x):
        sigma, eps = sigma_fn(dmd.uniform_times(x.shape[0], T, rng.generator, device)), noise_like(x.shape[0])
        return flow_renoise(x, eps, sigma), sigma, eps

    def dmd_loss(cond, x):
        """One fake-score update on the detached x, then the surrogate of g = normalised (fake x0 - real x0)."""
        x_d = x.detach()
        z, sigma, eps = renoised(x_d)
        with dmd.adapter_active(base):
            fake_opt.step(dmd.flow_matching_loss(velocity(base, z, sigma, cond), x_d, eps))
        z, sigma, _ = renoised(x_d)
        with torch.no_grad(), dmd.adapter_active(base):
            fake_x0 = flow_x0(z, velocity(base, z, sigma, cond), sigma)
        real_x0 = flow_x0(z, teacher(cond)(z, sigma), sigma)
        return dmd.dmd_surrogate(x, dmd.dmd_grad(x_d, real_x0, fake_x0))

    def disc_logits(x, cond, grad):
        """The head on the frozen teacher's features (input of its final norm) at a re-noised x."""
        z, sigma, _ = renoised(x)
        with torch.set_grad_enabled(grad), lora.adapters_disabled(base), dmd.captured_input(base.norm_out) as seen:
            velocity(base, z, sigma, cond)
        return head(seen[-1])

    def gan_loss(cond, x):
        """One head update (real: the student's q-step sample, fake: its one-step x), then the generator loss."""
        with torch.no_grad():
            real = tlcm.self_sample(student(cond), noise_like(x.shape[0]), tlcm.tlcm_sigmas(
                args.stage2_student_steps, sched_config, mu), rng.generator)
        disc_opt.step(dmd.gan_discriminator_loss(disc_logits(real, cond, False), disc_logits(x.detach(), cond, False)))
        return dmd.gan_generator_loss(disc_logits(x, cond, True))

    @torch.no_grad()
    @torch.random.fork_rng()  # sampling must not move the training RNG
    def validate(val_prompts, step, tag="validation"):
        """TLCM-sampler samples at 2/3/4/8 steps, one row each, from the same noise."""
        cond, rows = encode(val_prompts), []
        for steps in (2, 3, 4, 8):
            gen = torch.Generator(device).manual_seed(args.seed)
            noise = torch.randn((len(val_prompts), tokens, width), generator=gen, device=device)
            x0 = tlcm.self_sample(student(cond), noise, tlcm.tlcm_sigmas(steps, sched_config, mu), gen)
            rows.append(decode(vae, x0, latent_side).float().cpu())
        path = training.log_image_grid(accelerator, rows, ["2 steps", "3 steps", "4 steps", "8 steps"], step,
                                       args.output_dir, tag)
        logger.info(f"validation grid (rows: 2/3/4/8 TLCM steps) -> {path}")

    losses = {"1": stage1_loss, "2": stage2_loss, "extras": extras_loss}
    for i, stage in enumerate(args.stages):
        stage_dir = os.path.join(args.output_dir, f"stage{stage}")
        done_lora = os.path.join(stage_dir, "lora")
        if os.path.isfile(os.path.join(done_lora, lora.PEFT_WEIGHTS_NAME)):
            logger.info(f"stage {stage} already finished in {stage_dir}: loading its LoRA")
            lora.load_into_adapter(base, os.path.join(done_lora, lora.PEFT_WEIGHTS_NAME))
            if ema is not None:
                ema.shadow = [p.detach().clone() for p in params]
            continue
        init = args.init_lora if i == 0 else None
        if init is None and i == 0 and stage != "1":
            previous = os.path.join(args.output_dir, "stage1" if stage == "2" else "stage2", "lora")
            init = previous if os.path.isdir(previous) else None
            if init is None:
                fail(f"--stage {stage} needs a LoRA to start from: --init_lora, or {previous} from the stage before")
        if init is not None:
            path = os.path.join(init, lora.PEFT_WEIGHTS_NAME) if os.path.isdir(init) else init
            try:
                lora.load_into_adapter(base, path)
            except UserError as exc:
                fail(f"{exc} ({'--init_lora' if init == args.init_lora else 'the previous stage: --init_lora'})")
            logger.info(f"stage {stage} starts from the LoRA {init}")
        if ema is not None:
            ema.shadow = [p.detach().clone() for p in params]
        run_stage(args, stage, stage_dir, accelerator, transformer, params, rng, prompts, losses[stage],
                  lambda prompts_, step_: validate(prompts_, step_, f"stage{stage}"), ema)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_lora(base, done_lora)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = os.path.join(args.output_dir, f"stage{args.stages[-1]}", "lora")
        for name in os.listdir(final):
            shutil.copy2(os.path.join(final, name), os.path.join(args.output_dir, name + ".partial"))
        for name in os.listdir(final):  # the top-level files change only once all are written
            os.replace(os.path.join(args.output_dir, name + ".partial"), os.path.join(args.output_dir, name))
        write_card(args)
    accelerator.end_training()


def run_stage(args, stage, stage_dir, accelerator, transformer, params, rng, prompts, loss_fn, validate, ema):
    """One stage = one run of the shared loop with its own steps, learning rate, optimizer and checkpoints."""
    stage_args = copy.copy(args)
    stage_args.output_dir = stage_dir
    stage_args.max_train_steps = {"1": args.stage1_steps, "2": args.stage2_steps, "extras": args.extras_steps}[stage]
    stage_args.learning_rate = {"1": args.stage1_learning_rate, "2": args.stage2_learning_rate,
                                "extras": args.extras_learning_rate}[stage]
    if args.resume_from_checkpoint not in (None, "latest"):  # an explicit checkpoint belongs to one stage
        named = checkpoint.resolve_resume(args.output_dir, args.resume_from_checkpoint)
        inside = os.path.abspath(named).startswith(os.path.abspath(stage_dir) + os.sep)
        stage_args.resume_from_checkpoint = named if inside else None
    os.makedirs(stage_dir, exist_ok=True)
    # each stage starts from its own seed (a resumed stage then restores the checkpointed state)
    rng.generator.manual_seed(args.seed * 1000 + accelerator.process_index + 7919 * (1 + list(STAGES).index(stage)))
    optimizer = training.make_optimizer(params, stage_args, accelerator.num_processes)
    lr_scheduler = training.make_lr_scheduler(optimizer, stage_args, accelerator.num_processes)
    loader = data.make_prompt_dataloader(prompts, args.train_batch_size, args.seed)
    # a stage's checkpoint holds this stage's optimizer, scheduler and loader only
    accelerator._optimizers.clear(), accelerator._schedulers.clear(), accelerator._dataloaders.clear()
    optimizer, lr_scheduler, loader = accelerator.prepare(optimizer, lr_scheduler, loader)
    training.run_training(accelerator, stage_args, loader, transformer, params, optimizer, lr_scheduler, loss_fn,
                          after_step=ema.update if ema is not None else None, validate=validate,
                          name=f"tlcm_stage{stage}")


def make_distance(args, channels: int, latent_side: int, device):
    """d(a, b) on packed latents: L2, pseudo-Huber, or (ensembled) latent LPIPS on the unpacked latents."""
    if args.loss_type != "lpips":
        return lambda a, b, gen=None: consistency_loss(a, b, args.loss_type, args.huber_c)
    from utils.latent_lpips import EnsembledLatentLPIPS, LatentLPIPS

    net = LatentLPIPS.from_pretrained(args.latent_lpips_path, in_channels=channels, flag="--latent_lpips_path")
    net = net.to(device).requires_grad_(False)
    metric = EnsembledLatentLPIPS(net, args.lpips_augmentations) if args.lpips_augmentations > 0 else net

    def d(a, b, gen=None):
        a, b = (models.unpack_latents(x.float(), latent_side, latent_side) for x in (a, b))
        if args.lpips_augmentations > 0:  # the augmentations draw on the CPU
            return metric(a, b, generator=gen if gen is not None and gen.device.type == "cpu" else None).mean()
        return metric(a, b).mean()
    return d


def decode(vae, packed: torch.Tensor, latent_side: int) -> torch.Tensor:
    """Images in [-1, 1] from packed, scaled FLUX latents (differentiable)."""
    return models.decode_latents(vae, models.unpack_latents(packed, latent_side, latent_side))


def save_lora(transformer, out_dir: str) -> None:
    """PEFT folder + diffusers file + kohya file, written to a temporary folder and renamed when complete."""
    with lora.staged_output(out_dir, overwrite=True) as partial:
        os.makedirs(partial)
        lora.save_lora_outputs(transformer, partial, "transformer", peft_dir=partial)


def write_card(args) -> None:
    training.write_model_card(args.output_dir, "TLCM LoRA (two-stage data-free consistency distillation)", args, f"""
Distilled from `{args.pretrained_teacher_model}` with `train_tlcm_flux.py` (stages {', '.join(args.stages)};
rank {args.lora_rank}). No image was used: prompts only.

```python
from diffusers import FluxPipeline
from utils.tlcm_scheduler import FlowMatchEulerTLCMScheduler
pipe = FluxPipeline.from_pretrained("{args.pretrained_teacher_model}")
pipe.scheduler = FlowMatchEulerTLCMScheduler.from_config(pipe.scheduler.config)
pipe.load_lora_weights("{args.output_dir}")
image = pipe("a prompt", num_inference_steps=4, guidance_scale={args.teacher_guidance}).images[0]
```
PEFT (seed 003): `get_peft_model(pipe.transformer, LoraConfig(r={args.lora_rank}, target_modules=...))` then
`load_adapter("{args.output_dir}", adapter_name="default")`; ComfyUI: `lora_kohya.safetensors`.
Or: `python inference.py --base_model_path {args.pretrained_teacher_model} --lora_path {args.output_dir} --infer-steps 4`.
""")


if __name__ == "__main__":
    with user_errors():  # bad input anywhere ends as one line, exit code 2
        main(parse_args())
