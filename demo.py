"""The main job on the toy world, end to end: build it, distill, sample, write grids and tables.

    python demo.py          # about 10 minutes on 2 CPU cores; results in results/demo/

1. build the toy world (datasets + pipeline folders) from the committed weights;
2. check the judge on real images and on VAE reconstructions;
3. sample every toy teacher with its own full-step sampler (50 steps, CFG) and at 4 steps;
4. distill the toy SD teacher with train_lcm_distill_sd.py (skipped when its output exists);
5. compare the LCM student at 1/2/4/8 steps with the teacher's DDIM and DPM-Solver++ at the same
   step counts and with DDIM at 50 steps: prompt accuracy, toy FD, RMSE to the teacher's 50-step
   sample from the same noise, and time per image.
Writes results/demo/metrics.md (all tables), metrics.json, and *_grid.png (rows = sampler/steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict

import torch

import utils  # noqa: F401  (quiets optional-dependency warnings before diffusers is imported)
from utils.evaluate import evaluate, load_real_images, markdown_table, read_labels, save_grid, set_scheduler
from utils.toy.build import DEFAULT_OUT, build
from utils.toy.judge import ToyJudge, judge_images, prompt_accuracy

# guidance scale (diffusers' convention) each toy teacher is sampled with: SD's and SDXL's usual
# defaults; FLUX's "true CFG" and guidance input at the value its toy teacher does best with
TEACHERS = {"sd": 7.5, "sdxl": 5.0, "flux": 5.0, "flux-guidance": 5.0}
ROOT = os.path.dirname(os.path.abspath(__file__))


@torch.no_grad()
def judge_report(world: str, judge: ToyJudge, real: torch.Tensor) -> list[str]:
    """Judge accuracy (shape and colour both right) on held-out real images and their VAE reconstructions."""
    from diffusers import AutoencoderKL

    labels = read_labels(os.path.join(world, "data/test"))[: len(real)]
    shape, colour = labels[:, 0], labels[:, 1]
    acc = prompt_accuracy(*judge_images(judge, real)[:2], shape, colour)
    lines = [f"- judge accuracy on {len(real)} held-out real images: {acc:.3f}"]
    for name in ("sd", "flux"):
        vae = AutoencoderKL.from_pretrained(os.path.join(world, "models", name, "vae"))
        recon = torch.cat([vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1) for x in real.split(100)])
        acc = prompt_accuracy(*judge_images(judge, recon)[:2], shape, colour)
        lines.append(f"- judge accuracy on their {name} VAE reconstructions "
                     f"({vae.config.latent_channels} latent channels): {acc:.3f}")
    return lines


def load(path: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def distill_sd(world: str, out: str, steps: int, seed: int) -> None:
    """Run the LCM recipe on the toy SD teacher (a subprocess, exactly as a user runs it)."""
    if os.path.exists(os.path.join(out, "model_index.json")):
        print(f"reusing the distilled student in {out} (delete it to distill again)")
        return
    cmd = [sys.executable, os.path.join(ROOT, "train_lcm_distill_sd.py"),
           "--pretrained_teacher_model", os.path.join(world, "models/sd"),
           "--train_data_dir", os.path.join(world, "data/train"), "--output_dir", out, "--resolution", "32",
           "--train_batch_size", "32", "--learning_rate", "2e-4", "--lr_warmup_steps", "100",
           "--w_min", "3", "--w_max", "8", "--max_train_steps", str(steps), "--validation_steps", "250",
           "--checkpointing_steps", "500", "--checkpoints_total_limit", "1", "--seed", str(seed)]
    print("distilling:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy_world", default=DEFAULT_OUT, help="where the toy world is (re)built")
    parser.add_argument("--output_dir", default="results/demo", help="where grids, metrics and the student go")
    parser.add_argument("--distill_steps", type=int, default=1000, help="LCM distillation steps (default: %(default)s)")
    parser.add_argument("--per_combo", type=int, default=2, help="evaluation prompts per shape x colour")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)

    world = build(args.toy_world)
    judge = ToyJudge.from_pretrained(os.path.join(world, "judge"))
    real = load_real_images(os.path.join(world, "data/test"))
    real_feats = judge_images(judge, real)[2]
    judge_lines = judge_report(world, judge, real)
    print("\n".join(judge_lines))
    ev = dict(judge=judge, real_feats=real_feats, per_combo=args.per_combo, seed=args.seed)

    # teachers with their own samplers: 50 steps vs 4 steps
    teacher_results, teacher_rows = [], []
    for name, g in TEACHERS.items():
        pipe = load(os.path.join(world, "models", name))
        label = f"teacher {name} ({type(pipe.scheduler).__name__}, CFG {g})"
        res, images = evaluate(pipe, [4, 50], g, label=label, **ev)
        teacher_results += res
        teacher_rows += images
        save_grid(images, os.path.join(args.output_dir, f"teacher_{name}_grid.png"))
        print(markdown_table(res).split("\n", 2)[2], flush=True)

    save_grid(teacher_rows, os.path.join(args.output_dir, "teachers_grid.png"))

    # LCM distillation of the SD teacher, then student vs teacher samplers at the same step counts
    student_dir = os.path.join(args.output_dir, "lcm-sd")
    distill_sd(world, student_dir, args.distill_steps, args.seed)
    teacher = load(os.path.join(world, "models/sd"))
    g = TEACHERS["sd"]
    set_scheduler(teacher, "ddim")
    ref_res, (reference,) = evaluate(teacher, steps_list=[50], guidance_scale=g, label="teacher DDIM", **ev)
    compare, rows = list(ref_res), [reference]
    for sampler in ("ddim", "dpm++"):
        set_scheduler(teacher, sampler)
        res, images = evaluate(teacher, steps_list=[1, 2, 4, 8], guidance_scale=g,
                               label=f"teacher {'DDIM' if sampler == 'ddim' else 'DPM-Solver++'}",
                               reference=reference, **ev)
        compare += res
        rows += images
    student = load(student_dir)
    # the student embeds w = guidance_scale - 1: the same CFG strength as the teacher's scale g
    res, images = evaluate(student, steps_list=[1, 2, 4, 8], guidance_scale=g, label="LCM student (LCMScheduler)",
                           reference=reference, **ev)
    compare += res
    rows += images
    save_grid(rows, os.path.join(args.output_dir, "lcm_sd_grid.png"))

    report = ["# Toy world results", "", "## Judge", "", *judge_lines, "",
              "## Teachers (their own samplers)", "", markdown_table(teacher_results), "",
              f"## LCM distillation of the SD teacher ({args.distill_steps} steps), CFG {g}", "",
              markdown_table(compare), ""]
    with open(os.path.join(args.output_dir, "metrics.md"), "w") as f:
        f.write("\n".join(report))
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump({"judge": judge_lines, "teachers": [asdict(r) for r in teacher_results],
                   "lcm_sd": [asdict(r) for r in compare]}, f, indent=2)
    print("\n".join(report))
    print(f"grids and metrics written to {args.output_dir}/")


if __name__ == "__main__":
    main()
