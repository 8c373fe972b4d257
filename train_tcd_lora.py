"""TCD: trajectory consistency distillation into a LoRA of an SDXL (SSD-1B, SD 1.x) teacher.

    accelerate launch train_tcd_lora.py --pretrained_teacher_model <hub id or folder> \
        --train_data_dir <imagefolder> --output_dir out/ --max_train_steps 1000

The recipe (Zheng et al. 2024, "Trajectory Consistency Distillation"), a copy of
train_lcm_distill_lora_sdxl.py (LCM-LoRA) with three changes, ONE UNet in memory as there:
  - student = the UNet with the LoRA enabled; teacher = the same UNet with it disabled, one guided DDIM
    step t -> t_prev = t - k on LCM's skip grid (w ~ U[w_min, w_max] baked in), as in LCM-LoRA;
  - the consistency function is the trajectory consistency function (TCF) of the paper in its first-order
    semi-linear form, the exponential-integrator step from t to ANY earlier time s with the model's x0:
        f(x_t, t, s) = (sigma_s / sigma_t) x_t + (alpha_s - alpha_t sigma_s / sigma_t) x0(x_t, t)
    no c_skip / c_out: f(x, t, t) = x holds by construction (utils.consistency.trajectory_consistency_fn);
  - the target time s is drawn per sample, uniformly over the timesteps 0..t_prev (--target_timestep
    uniform; "zero" pins s = 0, LCM's target, for the ablation); loss d(f(x_t, t, s), stopgrad f(x_prev, t_prev, s))
    with the online student (with --ema_decay: its EMA) as the target network.
Choices the paper leaves open: it draws the target index uniformly up to the teacher's end point on its
discretisation; on a DDPM schedule we take every integer timestep 0..t_prev, since TCDScheduler maps to
s = floor((1 - gamma) t_prev), off the skip grid. s = 0 is the schedule's first timestep (a_0 < 1, so
f(x_t, t, 0) = alpha_0 x0 + sigma_0 eps, not x0 itself), where TCDScheduler's last step lands too. First
order only: a higher-order TCF needs a network call at an intermediate time that TCDScheduler does not make.
With --train_text_encoder_lora the text encoders get a LoRA too, as in LCM-LoRA.

Output: `pytorch_lora_weights.safetensors` (diffusers: `pipe.load_lora_weights(out)`), a PEFT adapter folder
`out/unet`, the kohya/ComfyUI file `lora_kohya.safetensors`, `out/scheduler` (a TCDScheduler on the training
grid) and a model card. Sample with TCDScheduler, 2-8 steps, guidance_scale 0 or 1, eta (gamma) 0.3.
"""

from __future__ import annotations

import argparse
import gc
import logging
from contextlib import nullcontext
from typing import Callable

import torch

from utils import flags, lora, loop, models
from utils.consistency import (TARGET_TIMESTEPS, LCMSchedule, draw_target_timesteps,
                               trajectory_consistency_fn)
from utils.ema import EMAParams
from utils.errors import user_errors
from utils.lora_distill import encoder_lora_note, lora_pipeline, start_lora_run, unet_output, validation_grid
from utils.losses import consistency_loss
from utils.models import Conditioning
from utils.scheduling_lcm import tcd_scheduler
from utils.solvers import alpha_sigma, ddim_cfg_step, ddim_step, previous_timestep, x0_eps_from_model_output

logger = logging.getLogger("train_tcd_lora")


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
    t = parser.add_argument_group("trajectory consistency distillation")
    t.add_argument("--target_timestep", default="uniform", choices=TARGET_TIMESTEPS,
                   help="the target time s of f(x_t, t, s): uniform over 0..t_prev (the paper), or zero (LCM's target "
                        "with TCD's parameterisation, for ablations) (default: %(default)s)")
    t.add_argument("--validation_eta", type=float, default=0.3,
                   help="TCDScheduler's eta (the paper's gamma, 0 = deterministic, 1 = re-noise all) in the "
                        "validation grid and the model card (default: %(default)s, the authors' recommendation)")
    parser.add_training_args()
    parser.set_defaults(learning_rate=1e-4)
    args = parser.parse_args(argv)
    if args.timestep_scaling_factor != parser.get_default("timestep_scaling_factor"):
        parser.error("--timestep_scaling_factor sets LCM's c_skip/c_out, which TCD does not use: its trajectory "
                     "consistency function is the identity at s = t by construction")
    if not 0 <= args.validation_eta <= 1:
        parser.error(f"--validation_eta must be in [0, 1], got {args.validation_eta}")
    if args.text_encoder_lora_rank is None:
        args.text_encoder_lora_rank = args.lora_rank
    elif args.text_encoder_lora_rank < 1:
        parser.error(f"--text_encoder_lora_rank must be at least 1, got {args.text_encoder_lora_rank}")
    return parser.check(args)


def tcd_loss(unet, latents: torch.Tensor, teacher_cond: Conditioning, uncond: Conditioning, schedule: LCMSchedule,
             args, gen: torch.Generator, dtype=torch.float32, autocast=nullcontext, ema: EMAParams | None = None,
             student_cond: Callable[[], Conditioning] | None = None, base=None) -> torch.Tensor:
    """One TCD loss: teacher = `unet` with its adapters disabled, student and target = with them.

    `base` is the same UNet unwrapped from its multi-process wrapper (default: `unet`), whose adapters the
    teacher's pass switches off. `args` gives w_min, w_max, target_timestep, batched_teacher_cfg,
    loss_type and huber_c. With `ema` the target uses the EMA of the LoRA; `student_cond()` (a text-encoder
    LoRA) gives the student's and the target's conditioning, else they share the teacher's. Every draw
    comes from `gen`.
    """
    bsz, device, pred = latents.shape[0], latents.device, schedule.prediction_type
    t = schedule.grid[torch.randint(0, len(schedule.grid), (bsz,), device=device, generator=gen)]
    t_prev = previous_timestep(t, schedule.k)
    s = draw_target_timesteps(t_prev, args.target_timestep, gen)  # where the TCF maps to: anywhere in 0..t_prev
    w = torch.empty(bsz, device=device).uniform_(args.w_min, args.w_max, generator=gen)
    alpha_t, sigma_t = alpha_sigma(schedule.alphas_cumprod, t)
    alpha_p, sigma_p = alpha_sigma(schedule.alphas_cumprod, t_prev)
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
        # the teacher's t -> t_prev
        x_prev = ddim_cfg_step(out_c, out_u, x_t, w, alpha_t, sigma_t, alpha_p, sigma_p, pred)
        with ema.swapped() if ema is not None else nullcontext():
            target_cond = student_cond() if student_cond is not None else teacher_cond
            x0_target = x0_eps_from_model_output(output(x_prev, t_prev, target_cond), x_prev, alpha_p, sigma_p,
                                                 pred)[0]
            f_target = trajectory_consistency_fn(x_prev, x0_target, alpha_p, sigma_p, alpha_s, sigma_s)
    cond = student_cond() if student_cond is not None else teacher_cond  # with grad into an encoder LoRA
    x0_student = x0_eps_from_model_output(output(x_t, t, cond), x_t, alpha_t, sigma_t, pred)[0]
    f_student = trajectory_consistency_fn(x_t, x0_student, alpha_t, sigma_t, alpha_s, sigma_s)
    return consistency_loss(f_student.float(), f_target.float(), args.loss_type, args.huber_c)


def main(args) -> None:
    # models (one UNet: frozen teacher + trainable LoRA student), data, optimizer, RNG, EMA: utils.lora_distill
    run = start_lora_run(args)
    accelerator = run.accelerator
    train = loop.TrainLoop(accelerator, run.dataloader, run.max_steps, args, "tcd_lora", run.lr_scheduler)
    for batch in train:
        latents, teacher_cond, student_cond = run.inputs(args, batch)
        with accelerator.accumulate(run.unet):
            loss = tcd_loss(run.unet, latents, teacher_cond, run.uncond, run.schedule, args, run.rng.generator,
                            run.dtype, accelerator.autocast, run.ema, student_cond, run.base)
            updated = loop.apply_gradients(accelerator, loss, run.params, run.optimizer, run.lr_scheduler,
                                           args.max_grad_norm)
        if not train.step_done(loss, updated):
            continue
        if run.ema is not None:
            run.ema.update()
        if train.checkpoint_due:
            train.save_checkpoint()
        if train.validation_due:
            validate(accelerator, args, run.base, run.teacher, train.validation_prompts, train.global_step)
    # the LoRA (and the text encoders' when they trained one) in diffusers, PEFT and kohya formats; its sampler on
    # the training grid in out/scheduler
    run.finish(args, train, tcd_scheduler(run.teacher.scheduler_config, args.num_ddim_timesteps), validate,
               "TCD LoRA (trajectory consistency distillation)", model_card(args, len(run.trained_encoders)))


def tcd_pipeline(args, unet, teacher: models.Teacher):
    """The LoRA UNet in the teacher's pipeline class with its other parts and a TCDScheduler on this run's grid."""
    return lora_pipeline(unet, teacher, tcd_scheduler(teacher.scheduler_config, args.num_ddim_timesteps))


def validate(accelerator, args, unet, teacher: models.Teacher, prompts, step):
    """TCDScheduler samples (eta --validation_eta) of the LoRA at 1/2/4/8 steps, no CFG; a labelled grid."""
    validation_grid(accelerator, args, tcd_pipeline(args, unet, teacher), prompts, step,
                    f"TCD LoRA, eta {args.validation_eta:g}", teacher.prompt_kwargs(prompts, accelerator.device),
                    eta=args.validation_eta)


def model_card(args, trained_encoders: int) -> str:
    """How to load and sample the LoRA: the body of the README.md the run writes (outputs.publish)."""
    return f"""
Distilled from `{args.pretrained_teacher_model}` with `train_tcd_lora.py` (rank {args.lora_rank}, alpha
{args.lora_alpha}, target time s {args.target_timestep}).

```python
from diffusers import DiffusionPipeline, TCDScheduler
pipe = DiffusionPipeline.from_pretrained("{args.pretrained_teacher_model}")
pipe.scheduler = TCDScheduler.from_pretrained("{args.output_dir}", subfolder="scheduler")
pipe.load_lora_weights("{args.output_dir}")
image = pipe("a prompt", num_inference_steps=4, guidance_scale=1.0, eta={args.validation_eta:g}).images[0]
```
Sampler: TCDScheduler, 2-8 steps, guidance_scale 0 or 1 (the teacher's CFG, w in [{args.w_min:g}, {args.w_max:g}], is
distilled in). Pass `eta` (the paper's gamma: the share of each step that is re-noised; 0 is deterministic) on
every call: pipelines default to 0. {args.validation_eta:g} is the authors' usual value; more steps take a higher one.
`{args.output_dir}/scheduler` holds the sampler on the training grid, {args.num_ddim_timesteps} skip-grid points
(`original_inference_steps`): the same as `TCDScheduler.from_config(pipe.scheduler.config,
original_inference_steps={args.num_ddim_timesteps})`.
PEFT: `PeftModel.from_pretrained(pipe.unet, "{args.output_dir}/unet")`; ComfyUI / A1111: `lora_kohya.safetensors`.
{encoder_lora_note(args, trained_encoders)}"""


if __name__ == "__main__":
    gc.freeze()  # the imported libraries live until exit: the collector, and the exit, need not scan them
    with user_errors():  # bad input anywhere ends as one line, exit code 2
        main(parse_args())
