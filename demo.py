"""The main job on the toy world, end to end: build it, distill, sample, write grids and tables.

    python demo.py          # about 55 minutes on 2 CPU cores; results in results/demo/

1. build the toy world (datasets + pipeline folders) from the committed weights;
2. check the judge on real images and on VAE reconstructions;
3. sample every toy teacher with its own full-step sampler (50 steps, CFG) and at 4 steps;
4. distill the toy SD teacher with train_lcm_distill_sd.py, the toy SDXL teacher with
   train_lcm_distill_lora_sdxl.py, train_tcd_lora.py (TCD), train_lcm_distill_sd.py (a full student) and
   train_tlcm_sdxl.py (data-free TLCM), all four with the same budget, and the toy FLUX teacher with
   train_tlcm_flux.py (each skipped when its output exists);
5. compare each student with its teacher's own sampler at the same step counts and with the
   teacher's full-step sample (50 steps; FLUX: 28): prompt accuracy, toy FD, RMSE to the
   teacher's full-step sample from the same noise, and time per image.
Writes results/demo/metrics.md (all tables), metrics.json, and *_grid.png (a row per sampler, step
count and CFG, a column per prompt, both labelled in the picture).
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
from utils import outputs
from utils.eval_sampling import row_labels
from utils.evaluate import eval_prompts, evaluate, load_real_images, markdown_table, read_labels
from utils.grids import save_grid
from utils.samplers import set_sampler
from utils.toy.build import DEFAULT_OUT, build
from utils.toy.judge import ToyJudge, judge_images, prompt_accuracy

# guidance scale (diffusers' convention) each toy teacher is sampled with: SD's and SDXL's usual
# defaults; FLUX's "true CFG" and guidance input at the value its toy teacher does best with
TEACHERS = {"sd": 7.5, "sdxl": 5.0, "flux": 5.0, "flux-guidance": 5.0}
ROOT = os.path.dirname(os.path.abspath(__file__))
# the LoRA of the LCM-LoRA and TCD runs, spelled out so a change of the recipes' defaults leaves the rows as they are
LORA_SHAPE = ["--lora_rank", "64", "--lora_alpha", "8"]
TCD_GAMMAS = (0.0, 0.3, 0.5)  # TCDScheduler's eta: deterministic, the authors' choice, more re-noising


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


def distill(script: str, out: str, done_file: str, args: list[str]) -> None:
    """Run a recipe on a toy teacher (a subprocess, exactly as a user runs it) unless its output exists."""
    if os.path.exists(os.path.join(out, done_file)):
        print(f"reusing the distilled result in {out} (delete it to distill again)")
        return
    cmd = [sys.executable, os.path.join(ROOT, script), "--output_dir", out, "--resolution", "32",
           "--checkpoints_total_limit", "1", *args]
    print("distilling:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def distill_sd(world: str, out: str, steps: int, seed: int) -> None:
    distill("train_lcm_distill_sd.py", out, "model_index.json", [
        "--pretrained_teacher_model", os.path.join(world, "models/sd"), "--train_data_dir",
        os.path.join(world, "data/train"), "--train_batch_size", "32", "--learning_rate", "2e-4",
        "--lr_warmup_steps", "100", "--w_min", "3", "--w_max", "8", "--max_train_steps", str(steps),
        "--validation_steps", "250", "--checkpointing_steps", "500", "--seed", str(seed)])


def distill_sdxl(world: str, out: str, steps: int, seed: int) -> None:
    """Full LCM distillation of the SDXL teacher: the LCM-LoRA run's data, batch, w range and steps."""
    distill("train_lcm_distill_sd.py", out, "model_index.json", [
        "--pretrained_teacher_model", os.path.join(world, "models/sdxl"), "--train_data_dir",
        os.path.join(world, "data/train"), "--train_batch_size", "32", "--learning_rate", "2e-4",
        "--lr_warmup_steps", "100", "--w_min", "2", "--w_max", "6", "--max_train_steps", str(steps),
        "--validation_steps", "250", "--checkpointing_steps", "500", "--seed", str(seed)])


def distill_lora_sdxl(world: str, out: str, steps: int, seed: int, script: str = "train_lcm_distill_lora_sdxl.py",
                      extra: tuple[str, ...] = ()) -> None:
    """LCM-LoRA of the SDXL teacher; with `script` train_tcd_lora.py, TCD with the same data, batch, LoRA and steps."""
    distill(script, out, "pytorch_lora_weights.safetensors", [
        "--pretrained_teacher_model", os.path.join(world, "models/sdxl"), "--train_data_dir",
        os.path.join(world, "data/train"), "--train_batch_size", "32", "--learning_rate", "5e-4",
        "--lr_warmup_steps", "100", "--w_min", "2", "--w_max", "6", "--max_train_steps", str(steps),
        "--validation_steps", "250", "--checkpointing_steps", "500", "--seed", str(seed), *LORA_SHAPE, *extra])


def distill_tlcm_flux(world: str, out: str, stage1_steps: int, stage2_steps: int, seed: int) -> None:
    distill("train_tlcm_flux.py", out, "adapter_model.safetensors", [
        "--pretrained_teacher_model", os.path.join(world, "models/flux"), "--prompts_file",
        os.path.join(world, "data/train/metadata.jsonl"), "--lora_rank", "16", "--train_batch_size", "16",
        "--stage1_steps", str(stage1_steps), "--stage1_learning_rate", "5e-4", "--stage2_steps",
        str(stage2_steps), "--stage2_learning_rate", "1e-5", "--validation_steps", "250",
        "--checkpointing_steps", "500", "--seed", str(seed)])


def distill_tlcm_sdxl(world: str, out: str, stage1_steps: int, stage2_steps: int, seed: int) -> None:
    """TLCM of the SDXL teacher with the LCM-LoRA run's batch; its steps split over the two stages."""
    distill("train_tlcm_sdxl.py", out, "adapter_model.safetensors", [
        "--pretrained_teacher_model", os.path.join(world, "models/sdxl"), "--prompts_file",
        os.path.join(world, "data/train/metadata.jsonl"), "--train_batch_size", "32", "--guidance_scale", "5",
        "--stage1_steps", str(stage1_steps), "--stage1_learning_rate", "5e-4", "--stage2_steps", str(stage2_steps),
        "--stage2_learning_rate", "1e-5", "--lr_warmup_steps", "100", "--validation_steps", "250",
        "--checkpointing_steps", "500", "--seed", str(seed)])


def with_lora(world: str, teacher: str, lora_dir: str):
    """The toy teacher's pipeline with a distilled LoRA loaded the diffusers way."""
    pipe = load(os.path.join(world, "models", teacher))
    pipe.load_lora_weights(lora_dir)
    return pipe


def tcd_students(world: str, lora_dir: str, tcd_dir: str) -> list:
    """The LCM-LoRA with its LCMScheduler, and the TCD LoRA with TCDScheduler at each of TCD_GAMMAS (as eta)."""
    tcd = with_lora(world, "sdxl", tcd_dir)
    return [("LCM-LoRA (LCMScheduler, no CFG)", with_lora(world, "sdxl", lora_dir), "lcm", 1.0),
            *[(f"TCD LoRA (TCDScheduler, gamma {g:g}, no CFG)", tcd, "tcd", 1.0, {"eta": g}) for g in TCD_GAMMAS]]


def prompt_texts(ev: dict) -> list[str]:
    """The evaluation prompts `evaluate(..., **ev)` samples, in grid column order."""
    return [p[0] for p in eval_prompts(ev["per_combo"])]


def compare(world: str, teacher: str, samplers: list[str], g: float, reference_steps: int, steps: list[int],
            students: list, ev: dict, out_dir: str, name: str) -> list:
    """Teacher at reference_steps, teacher samplers and students at `steps`; a grid; returns the results."""
    pipe = load(os.path.join(world, "models", teacher))
    set_sampler(pipe, samplers[0])
    label = f"teacher {teacher} {samplers[0]}"
    results, (reference,) = evaluate(pipe, steps_list=[reference_steps], guidance_scale=g, label=label, **ev)
    results, rows = list(results), [reference]
    for sampler in samplers:
        set_sampler(pipe, sampler)
        res, images = evaluate(pipe, steps_list=steps, guidance_scale=g, label=f"teacher {teacher} {sampler}",
                               reference=reference, **ev)
        results, rows = results + res, rows + images
    for label, student, sampler, guidance, *call in students:  # call: more pipeline kwargs (TCD's eta)
        set_sampler(student, sampler)
        res, images = evaluate(student, steps_list=steps, guidance_scale=guidance, label=label,
                               reference=reference, call_kwargs=call[0] if call else None, **ev)
        results, rows = results + res, rows + images
    save_grid(rows, os.path.join(out_dir, f"{name}_grid.png"), row_labels(results), prompt_texts(ev))
    print(markdown_table(results), flush=True)
    return results


RUNS = ("lcm-sd", "lcm-sdxl", "lcm-lora-sdxl", "tcd-lora-sdxl", "tlcm-flux", "tlcm-sdxl")


def demo_file(name: str) -> bool:
    """Whether a file or folder name in --output_dir is one the demo writes (its runs, grids and metrics)."""
    return name in RUNS or name.endswith("_grid.png") or name in ("metrics.md", "metrics.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy_world", default=DEFAULT_OUT, help="where the toy world is (re)built")
    parser.add_argument("--output_dir", default="results/demo", help="where grids, metrics and the student go")
    parser.add_argument("--distill_steps", type=int, default=1000, help="LCM distillation steps (default: %(default)s)")
    parser.add_argument("--lora_steps", type=int, default=1000, help="LCM-LoRA (SDXL) steps (default: %(default)s)")
    parser.add_argument("--tlcm_stage1_steps", type=int, default=1000, help="TLCM stage 1 steps (default: %(default)s)")
    parser.add_argument("--tlcm_stage2_steps", type=int, default=200, help="TLCM stage 2 steps (default: %(default)s)")
    parser.add_argument("--per_combo", type=int, default=2, help="evaluation prompts per shape x colour")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # the output rule (utils/outputs.py); a results folder of an earlier demo, marked or not, is its own and reused
    outputs.prepare_output(args.output_dir, "--output_dir", {"--toy_world": args.toy_world}, "demo.py",
                           overwrite_flag=None, own=demo_file)

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
        save_grid(images, os.path.join(args.output_dir, f"teacher_{name}_grid.png"), row_labels(res), prompt_texts(ev))
        print(markdown_table(res).split("\n", 2)[2], flush=True)

    save_grid(teacher_rows, os.path.join(args.output_dir, "teachers_grid.png"), row_labels(teacher_results),
              prompt_texts(ev))

    # each recipe on its toy teacher, then student vs the teacher's own samplers at the same step counts
    sd_dir, sdxl_dir, lora_dir, tcd_dir, tlcm_dir, tlcm_sdxl_dir = (
        os.path.join(args.output_dir, n) for n in RUNS)
    distill_sd(world, sd_dir, args.distill_steps, args.seed)
    g = TEACHERS["sd"]
    # the full LCM student embeds w = guidance_scale - 1: the same CFG strength as the teacher's scale g
    lcm_sd = compare(world, "sd", ["ddim", "dpm++"], g, 50, [1, 2, 4, 8],
                     [("LCM student (LCMScheduler)", load(sd_dir), None, g)], ev, args.output_dir, "lcm_sd")

    distill_lora_sdxl(world, lora_dir, args.lora_steps, args.seed)
    lcm_lora = compare(world, "sdxl", ["euler"], TEACHERS["sdxl"], 50, [1, 2, 4, 8],
                       [("LCM-LoRA (LCMScheduler, no CFG)", with_lora(world, "sdxl", lora_dir), "lcm", 1.0)],
                       ev, args.output_dir, "lcm_lora_sdxl")

    # TCD of the same SDXL teacher with the LCM-LoRA run's data, batch, LoRA and steps; TCDScheduler at three gammas
    distill_lora_sdxl(world, tcd_dir, args.lora_steps, args.seed, "train_tcd_lora.py")
    tcd = compare(world, "sdxl", ["euler"], TEACHERS["sdxl"], 50, [1, 2, 4, 8], tcd_students(world, lora_dir, tcd_dir),
                  ev, args.output_dir, "tcd_sdxl")

    # full LCM distillation of the same SDXL teacher with the LCM-LoRA run's budget, against both
    distill_sdxl(world, sdxl_dir, args.lora_steps, args.seed)
    g = TEACHERS["sdxl"]
    lcm_sdxl = compare(world, "sdxl", ["euler", "ddim"], g, 50, [1, 2, 4, 8],
                       [("LCM student (LCMScheduler)", load(sdxl_dir), None, g),
                        ("LCM-LoRA (LCMScheduler, no CFG)", with_lora(world, "sdxl", lora_dir), "lcm", 1.0)],
                       ev, args.output_dir, "lcm_sdxl")

    # TLCM of the same SDXL teacher, data-free, with the LCM-LoRA run's batch and number of steps
    distill_tlcm_sdxl(world, tlcm_sdxl_dir, args.lora_steps - args.tlcm_stage2_steps, args.tlcm_stage2_steps, args.seed)
    students = [("LCM-LoRA (LCMScheduler, no CFG)", with_lora(world, "sdxl", lora_dir), "lcm", 1.0)]
    for stages, folder in (("stage 1", os.path.join(tlcm_sdxl_dir, "stage1", "lora")), ("stages 1+2", tlcm_sdxl_dir)):
        pipe = with_lora(world, "sdxl", folder)
        students += [(f"TLCM {stages}, {name} re-noising", pipe, sampler, 1.0)
                     for name, sampler in (("fresh", "tlcm"), ("implied", "tlcm-implied"))]
    tlcm_sdxl = compare(world, "sdxl", ["euler"], TEACHERS["sdxl"], 50, [2, 3, 4, 8], students, ev,
                        args.output_dir, "tlcm_sdxl")

    distill_tlcm_flux(world, tlcm_dir, args.tlcm_stage1_steps, args.tlcm_stage2_steps, args.seed)
    students = []  # stage 1 alone and stage 1 + 2, each with the released (fresh) and the implied re-noising
    for stages, folder in (("stage 1", os.path.join(tlcm_dir, "stage1", "lora")), ("stages 1+2", tlcm_dir)):
        pipe = with_lora(world, "flux", folder)
        students += [(f"TLCM {stages}, {name} re-noising", pipe, sampler, 1.0)
                     for name, sampler in (("fresh", "tlcm"), ("implied", "tlcm-implied"))]
    tlcm_res = compare(world, "flux", ["flow-euler"], TEACHERS["flux"], 28, [2, 3, 4, 8], students, ev,
                       args.output_dir, "tlcm_flux")

    report = ["# Toy world results", "", "## Judge", "", *judge_lines, "",
              "## Teachers (their own samplers)", "", markdown_table(teacher_results), "",
              f"## LCM distillation of the SD teacher ({args.distill_steps} steps), CFG {g}", "",
              markdown_table(lcm_sd), "",
              f"## LCM-LoRA of the SDXL teacher ({args.lora_steps} steps); teacher CFG {TEACHERS['sdxl']}", "",
              markdown_table(lcm_lora), "",
              f"## TCD LoRA of the SDXL teacher ({args.lora_steps} steps, as the LCM-LoRA), TCDScheduler at gamma "
              f"{', '.join(f'{g:g}' for g in TCD_GAMMAS)}; teacher CFG {TEACHERS['sdxl']}", "", markdown_table(tcd), "",
              f"## LCM distillation of the SDXL teacher ({args.lora_steps} steps, as the LCM-LoRA), CFG "
              f"{TEACHERS['sdxl']}", "", markdown_table(lcm_sdxl), "",
              f"## TLCM of the SDXL teacher (stage 1: {args.lora_steps - args.tlcm_stage2_steps} steps, stage 2: "
              f"{args.tlcm_stage2_steps}), against the LCM-LoRA; teacher CFG {TEACHERS['sdxl']}", "",
              markdown_table(tlcm_sdxl), "",
              f"## TLCM of the FLUX teacher (stage 1: {args.tlcm_stage1_steps} steps, stage 2: "
              f"{args.tlcm_stage2_steps}); teacher CFG {TEACHERS['flux']}", "", markdown_table(tlcm_res), ""]
    with open(os.path.join(args.output_dir, "metrics.md"), "w") as f:
        f.write("\n".join(report))
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump({"judge": judge_lines, "teachers": [asdict(r) for r in teacher_results],
                   "lcm_sd": [asdict(r) for r in lcm_sd], "lcm_lora_sdxl": [asdict(r) for r in lcm_lora],
                   "tcd_sdxl": [asdict(r) for r in tcd],
                   "lcm_sdxl": [asdict(r) for r in lcm_sdxl], "tlcm_sdxl": [asdict(r) for r in tlcm_sdxl],
                   "tlcm_flux": [asdict(r) for r in tlcm_res]}, f, indent=2)
    print("\n".join(report))
    print(f"grids and metrics written to {args.output_dir}/")


if __name__ == "__main__":
    main()
