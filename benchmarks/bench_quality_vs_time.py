"""Prompt accuracy and toy FD of a distilled student as a function of training wall time (PNG + JSON).

Train (the recipe runs for --steps with a checkpoint every --every steps; its flags go after --):

    python benchmarks/bench_quality_vs_time.py --recipe train_lcm_distill_sd.py --steps 600 --every 100 -- \\
        --pretrained_teacher_model toy_world/models/sd --train_data_dir toy_world/data/train \\
        --output_dir out/qvt_sd --resolution 32 --train_batch_size 32 --learning_rate 2e-4 --w_min 3 --w_max 8
    python benchmarks/bench_quality_vs_time.py --recipe train_tlcm_flux.py --every 100 -- \\
        --pretrained_teacher_model toy_world/models/flux --prompts_file toy_world/data/train/metadata.jsonl \\
        --output_dir out/qvt_flux --resolution 32 --lora_rank 16 --stage1_steps 400 --stage2_steps 100

Reuse an existing run (--run_dir; the flags after -- must be that run's, they say how to rebuild
its student): add --run_dir out/qvt_sd and leave out --steps/--every.

Every checkpoint-N of the run becomes a model (LCM-SD: the checkpoint holds the student UNet; the
LoRA recipes: it holds the whole denoiser with PEFT LoRA keys, whose LoRA weights are loaded into a
fresh teacher pipeline; TLCM: stage-2 checkpoints continue after stage 1's) and is evaluated with
utils.evaluate at --inference_steps (4) with the recipe's sampler: LCMScheduler (LoRA: guidance 1;
LCM-SD: its own w + 1, the middle of [w_min, w_max]) or TLCM's (guidance 1, or --teacher_guidance
for a guidance-embedded FLUX). Step 0 (the untrained student: the teacher with the student's
sampler) is included unless --no-include_start. Its time is the checkpoint's training_state.json
mtime minus the run's start (the launch of the recipe; for a run not started here, extrapolated
from its first two checkpoints), so it includes model loading and checkpoint saving.

The points go into --out/quality_vs_time.json under --name (default from the recipe); each call
replaces its own entry and redraws --out/quality_vs_time.png from all entries: one line per recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from utils.errors import UserError, fail, user_errors  # noqa: E402
from utils.flags import Parser  # noqa: E402

NAMES = {"lcm": "LCM-SD", "lora": "LCM-LoRA", "tlcm": "TLCM"}
START_FILE = "bench_run_start.json"


def parse_args(argv: list[str] | None = None):
    own, recipe_args = common.split_at_dashes(sys.argv[1:] if argv is None else argv)
    parser = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    usage="%(prog)s --recipe SCRIPT [--steps N --every K | --run_dir DIR] [options] -- RECIPE FLAGS")
    parser.add_argument("--recipe", required=True,
                        help="train_lcm_distill_sd.py, train_lcm_distill_lora_sdxl.py, train_tlcm_flux.py or train_tlcm_sdxl.py")
    parser.add_argument("--run_dir", default=None, help="evaluate this finished run's checkpoints instead of training")
    parser.add_argument("--steps", type=int, default=None,
                        help="training: optimizer steps (LCM recipes; TLCM: --stage1_steps/--stage2_steps after --)")
    parser.add_argument("--every", type=int, default=None, help="training: a checkpoint every K steps")
    parser.add_argument("--out", default="results/quality_vs_time", help="folder of the JSON and PNG (default: %(default)s)")
    parser.add_argument("--name", default=None, help="the curve's name (default: LCM-SD, LCM-LoRA-SDXL, TLCM-FLUX, ...)")
    parser.add_argument("--inference_steps", type=int, default=4, help="sampling steps of the evaluation (default: 4)")
    parser.add_argument("--guidance_scale", type=float, default=None, help="evaluation guidance (default: the recipe's)")
    parser.add_argument("--per_combo", type=int, default=1, help="toy prompts per shape x colour (default: 1 = 24)")
    parser.add_argument("--judge", default="toy_world/judge", help="toy judge folder (default: %(default)s)")
    parser.add_argument("--real_images", default="toy_world/data/test", help="real images for toy FD (default: %(default)s)")
    parser.add_argument("--include_start", action=argparse.BooleanOptionalAction, default=True,
                        help="also evaluate the untrained student at minute 0 (default: on)")
    args = parser.parse_args(own)
    args.recipe_args = recipe_args
    if not recipe_args:
        fail("give the recipe's flags after -- (for --run_dir: the flags of that run)")
    common.check_positive(args, "inference_steps", "per_combo")
    if args.run_dir is not None:
        if args.steps is not None or args.every is not None:
            fail("--steps and --every are for training; --run_dir evaluates a finished run")
        if not os.path.isdir(args.run_dir):
            fail(f"--run_dir {args.run_dir} does not exist")
    elif args.every is None:
        fail("give --every (checkpoint interval) to train, or --run_dir to reuse a run")
    elif args.every < 1 or (args.steps is not None and args.steps < 1):
        fail("--steps and --every must be at least 1")
    for flag in ("--max_train_steps", "--checkpointing_steps"):
        if args.run_dir is None and common.flag_value(recipe_args, flag) is not None:
            fail(f"leave {flag} out of the recipe flags: use --steps / --every")
    for flag, path in (("--judge", args.judge), ("--real_images", args.real_images)):
        if not os.path.isdir(path):
            fail(f"{flag} {path} does not exist (for the toy world: python -m utils.toy build)")
    return args


def recipe_args_for(module, args):
    """The recipe's parsed flags (what its checkpoints were trained with)."""
    argv = list(args.recipe_args)
    if args.run_dir is not None:
        argv += ["--output_dir", args.run_dir]
    elif args.steps is not None and common.recipe_kind(module) != "tlcm":
        argv += ["--max_train_steps", str(args.steps)]
    with user_errors():
        return module.parse_args(argv + ["--report_to", "none"])


def train(module, args, rargs) -> None:
    """Run the recipe in a subprocess with checkpoints every --every steps; record when it started."""
    argv = list(args.recipe_args) + ["--checkpointing_steps", str(args.every), "--checkpoint_at_end",
                                     "--validation_steps", common.BIG, "--report_to", "none"]
    if args.steps is not None and common.recipe_kind(module) != "tlcm":
        argv += ["--max_train_steps", str(args.steps)]
    os.makedirs(rargs.output_dir, exist_ok=True)
    with open(os.path.join(rargs.output_dir, START_FILE), "w") as f:
        json.dump({"start": time.time(), "argv": argv}, f)
    print(f"training: {os.path.basename(module.__file__)} -> {rargs.output_dir} (progress below)", file=sys.stderr)
    proc = subprocess.run([sys.executable, module.__file__, *argv], stdout=subprocess.DEVNULL, cwd=os.getcwd())
    if proc.returncode != 0:
        fail(f"the recipe exited with status {proc.returncode} (its error is above)")


def checkpoints(kind: str, rargs) -> list[dict]:
    """[{path, step, stage, written}] of the run, in training order (TLCM: stage 1 then stage 2, steps offset)."""
    from utils.checkpoint import list_checkpoints

    if kind != "tlcm":
        folders = [("", rargs.output_dir, 0)]
    else:
        folders = [("1", os.path.join(rargs.output_dir, "stage1"), 0),
                   ("2", os.path.join(rargs.output_dir, "stage2"), rargs.stage1_steps)]
    found = []
    for stage, folder, offset in folders:
        for path in list_checkpoints(folder):
            with open(os.path.join(path, "training_state.json")) as f:
                step = json.load(f)["global_step"]
            found.append({"path": path, "stage": stage or None, "step": offset + step,
                          "written": os.path.getmtime(os.path.join(path, "training_state.json"))})
    return found


def run_start(output_dir: str, found: list[dict]) -> tuple[float, str]:
    """When the run started (recorded by train()), or extrapolated back from its first two checkpoints."""
    path = os.path.join(output_dir, START_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)["start"], "recipe launch"
    if len(found) < 2:
        return found[0]["written"], "first checkpoint (no start record)"
    a, b = found[0], found[1]
    rate = (b["written"] - a["written"]) / max(1, b["step"] - a["step"])
    return a["written"] - a["step"] * rate, "extrapolated from the first two checkpoints"


def student_pipeline(module, kind: str, rargs, state: dict | None, device: str = "cpu"):
    """A fresh teacher pipeline turned into the recipe's student: `state` is a checkpoint's model state
    (None: the untrained student), loaded as the student UNet (LCM-SD) or as the LoRA (LoRA recipes)."""
    import torch
    from diffusers import DiffusionPipeline

    from utils import lora_files, models
    from utils.samplers import set_sampler
    from utils.scheduling_lcm import lcm_scheduler

    teacher = rargs.pretrained_teacher_model
    pipe = models.load_pretrained(DiffusionPipeline, teacher, "--pretrained_teacher_model", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    config = models.load_noise_scheduler_config(teacher)
    if kind == "lcm":
        torch.manual_seed(rargs.seed)  # a non-zero-initialised guidance projection of step 0 is drawn from it
        unet = module.make_student(pipe.unet, rargs.unet_time_cond_proj_dim, rargs.zero_init_time_cond_proj)
        if state is not None:
            missing, unexpected = unet.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise UserError(f"the checkpoint does not fit the student UNet ({len(missing)} missing, "
                                f"{len(unexpected)} unexpected keys): are the flags after -- the run's?")
        pipe.register_modules(unet=unet.eval())
        pipe.scheduler = lcm_scheduler(config, rargs.num_ddim_timesteps, rargs.timestep_scaling_factor)
        return pipe.to(device)
    if state is not None:
        net = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
        weights = lora_files.checkpoint_lora_state(state)
        if not weights:
            raise UserError("the checkpoint holds no LoRA weights: is --recipe the run's recipe?")
        lora_files.add_lora_from_state(net, weights, rargs.lora_alpha, rargs.lora_targets, rargs.lora_dropout)
        net.eval()
    if kind == "tlcm":
        set_sampler(pipe, "tlcm")
    else:
        pipe.scheduler = lcm_scheduler(config, rargs.num_ddim_timesteps, rargs.timestep_scaling_factor)
    return pipe.to(device)


def default_guidance(kind: str, rargs, pipe) -> float:
    if kind == "lcm":
        return (rargs.w_min + rargs.w_max) / 2 + 1
    if kind == "tlcm" and hasattr(pipe, "transformer") and pipe.transformer.config.get("guidance_embeds", False):
        return rargs.teacher_guidance
    return 1.0


def plot(entries: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, (acc, fd) = plt.subplots(1, 2, figsize=(10, 4))
    for name, entry in sorted(entries.items()):
        minutes = [p["minutes"] for p in entry["points"]]
        label = f"{name} ({entry['inference_steps']} steps)"
        acc.plot(minutes, [p["prompt_accuracy"] for p in entry["points"]], marker="o", label=label)
        fd.plot(minutes, [p["toy_fd"] for p in entry["points"]], marker="o", label=label)
    acc.set(xlabel="training wall time (minutes)", ylabel="prompt accuracy", ylim=(0, 1.02),
            title="prompt accuracy")
    fd.set(xlabel="training wall time (minutes)", ylabel="toy FD (lower is better)", yscale="log", title="toy FD")
    fd.yaxis.set_major_formatter(ScalarFormatter())
    fd.yaxis.set_minor_formatter(ScalarFormatter())
    for ax in (acc, fd):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    module = common.import_recipe(args.recipe)
    kind = common.recipe_kind(module)
    rargs = recipe_args_for(module, args)
    if args.run_dir is None:
        if checkpoints(kind, rargs):
            fail(f"--output_dir {rargs.output_dir} already holds checkpoints: evaluate them with --run_dir, "
                 "or train into a fresh --output_dir")
        train(module, args, rargs)
    common.quiet_libraries()
    from tqdm.auto import tqdm

    from utils import checkpoint, models
    from utils.evaluate import eval_prompts, evaluate, load_real_images
    from utils.toy.judge import ToyJudge, judge_images

    found = checkpoints(kind, rargs)
    if not found:
        fail(f"no complete checkpoint-N in {rargs.output_dir}{' (stage1/, stage2/)' if kind == 'tlcm' else ''}")
    start, origin = run_start(rargs.output_dir, found)
    judge = ToyJudge.from_pretrained(args.judge)
    real_feats = judge_images(judge, load_real_images(args.real_images))[2]
    todo = ([{"path": None, "stage": None, "step": 0, "written": start}] if args.include_start else []) + found
    points, guidance, sampler = [], args.guidance_scale, None
    bar = tqdm(todo, desc="checkpoints", file=sys.stderr)
    for item in bar:
        with common.closing_bar(bar):
            state = None if item["path"] is None else checkpoint.read_model_state(item["path"])
            pipe = student_pipeline(module, kind, rargs, state)
        guidance = default_guidance(kind, rargs, pipe) if args.guidance_scale is None else args.guidance_scale
        (result,), _ = evaluate(pipe, [args.inference_steps], guidance, judge=judge, real_feats=real_feats,
                                per_combo=args.per_combo)
        sampler = type(pipe.scheduler).__name__
        points.append({"step": item["step"], "stage": item["stage"], "checkpoint": item["path"],
                       "minutes": round((item["written"] - start) / 60, 3),
                       "prompt_accuracy": round(result.prompt_accuracy, 4), "toy_fd": round(result.toy_fd, 3)})
    arch = models.detect_architecture(rargs.pretrained_teacher_model)
    name = args.name or (NAMES[kind] + ("-" + arch.upper() if kind in ("lora", "tlcm") else ""))
    entry = {"recipe": os.path.basename(module.__file__), "model": rargs.pretrained_teacher_model,
             "run_dir": rargs.output_dir, "time_origin": origin, "inference_steps": args.inference_steps,
             "sampler": sampler, "guidance_scale": guidance, "prompts": len(eval_prompts(args.per_combo)),
             "device": common.device_name(), **common.environment(), "points": points}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "quality_vs_time.json")
    entries = {}
    if os.path.isfile(path):
        with open(path) as f:
            entries = json.load(f)
    entries[name] = entry
    with open(path, "w") as f:
        json.dump(entries, f, indent=2)
    plot(entries, os.path.join(args.out, "quality_vs_time.png"))
    print(json.dumps({"name": name, **entry}))
    print(f"{path} and quality_vs_time.png written ({len(entries)} curve(s))", file=sys.stderr)
    return entry


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        fail(str(exc))
