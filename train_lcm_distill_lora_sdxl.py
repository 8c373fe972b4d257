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
from contextlib import nullcontext
from typing import Callable

import torch

from utils import flags, lora, loop, models
from utils.consistency import LCMSchedule, consistency_fn, scalings_for_boundary_conditions
from utils.ema import EMAParams
from utils.errors import user_errors
from utils.lora_distill import encoder_lora_note, lora_pipeline, start_lora_run, unet_output, validation_grid
from utils.losses import consistency_loss
from utils.models import Conditioning
from utils.scheduling_lcm import lcm_scheduler
from utils.solvers import alpha_sigma, ddim_cfg_step, ddim_step, previous_timestep, x0_eps_from_model_output

logger = logging.getLogger("train_lcm_distill_lora_sdxl")


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
    # models (one UNet: frozen teacher + trainable LoRA student), data, optimizer, RNG, EMA: utils.lora_distill
    run = start_lora_run(args)
    accelerator = run.accelerator
    train = loop.TrainLoop(accelerator, run.dataloader, run.max_steps, args, "lcm_distill_lora", run.lr_scheduler)
    for batch in train:
        latents, teacher_cond, student_cond = run.inputs(args, batch)
        with accelerator.accumulate(run.unet):
            loss = lcm_lora_loss(run.unet, latents, teacher_cond, run.uncond, run.schedule, args, run.rng.generator,
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
    run.finish(args, train, lcm_scheduler(run.teacher.scheduler_config, args.num_ddim_timesteps, args.timestep_scaling_factor), validate,
               "LCM-LoRA (latent consistency distillation)", model_card(args, len(run.trained_encoders)))


def lcm_pipeline(args, unet, teacher: models.Teacher):
    """The LoRA UNet in the teacher's pipeline class with its other parts and an LCMScheduler on this run's grid."""
    return lora_pipeline(unet, teacher, lcm_scheduler(teacher.scheduler_config, args.num_ddim_timesteps,
                                                      args.timestep_scaling_factor))


def validate(accelerator, args, unet, teacher: models.Teacher, prompts, step):
    """LCMScheduler samples of the LoRA student at 1/2/4/8 steps, no CFG; a labelled grid to the trackers and PNG."""
    validation_grid(accelerator, args, lcm_pipeline(args, unet, teacher), prompts, step, "LCM-LoRA",
                    teacher.prompt_kwargs(prompts, accelerator.device))


def model_card(args, trained_encoders: int) -> str:
    """How to load and sample the LoRA: the body of the README.md the run writes (outputs.publish)."""
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
{encoder_lora_note(args, trained_encoders)}"""


if __name__ == "__main__":
    gc.freeze()  # the imported libraries live until exit: the collector, and the exit, need not scan them
    with user_errors():  # bad input anywhere ends as one line, exit code 2
        main(parse_args())
