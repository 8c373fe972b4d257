"""Time the training step of a recipe, or of any training command; print one JSON line.

In-process mode (this repository's recipes): the recipe is imported and run in this process for
warmup + steps optimizer steps; every optimizer step is stamped (after a CUDA synchronise) and a
step is the time between two successive stamps, so it holds everything the loop does: data
loading, VAE encode, text encoding, teacher, target and student passes, backward, optimizer, EMA.
The number reported is the MEDIAN over the timed steps ("mode": "median"). The recipe stops
right after the last timed step (no final save or validation). Pass the recipe's flags after
`--`, without --max_train_steps (TLCM: without --stage1_steps/--stage2_steps; --stage 1 or 2):

    python benchmarks/bench_train_step.py --recipe train_lcm_distill_lora_sdxl.py --warmup 3 --steps 10 -- \\
        --pretrained_teacher_model toy_world/models/sdxl --train_data_dir toy_world/data/train \\
        --resolution 32 --train_batch_size 16 --lora_rank 4

External mode (any command, e.g. another script on the same model and data): the command runs
twice, with {steps} replaced by W = --warmup and by W + N; the per-step time is the MEAN BY
DIFFERENCE (T(W+N) - T(W)) / N, which cancels start-up, loading and saving ("mode": "mean by
difference"); peak memory is the peak RSS of the command (a GPU command's CUDA memory is not seen):

    python benchmarks/bench_train_step.py --warmup 3 --steps 10 \\
        --command "python other_script.py --pretrained_teacher_model M --train_batch_size 16 --max_train_steps {steps}"

Output keys: label, recipe, model, batch_size (samples per optimizer step), device, dtype, warmup,
steps, median_step_s (the per-step time of either mode), samples_per_s, peak_mem_mb,
peak_mem_kind, mode, torch, threads; in-process step_times_s (every timed step); external
run_times_s (every run) and run_spread_s (their largest spread: the noise the difference carries).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from utils.errors import fail, user_errors  # noqa: E402
from utils.flags import Parser  # noqa: E402

# Runs the command from a small fresh interpreter: a child forked from this (torch-sized) process would
# count this process's memory in its peak RSS; the launcher writes the command's own peak (KiB).
LAUNCHER = """import resource, subprocess, sys
try:
    rc = subprocess.call(sys.argv[2:])
except OSError as exc:
    print(f"cannot start {sys.argv[2]}: {exc.strerror}", file=sys.stderr)
    rc = 127
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc)
"""
STEP_FLAGS = ("--max_train_steps", "--stage1_steps", "--stage2_steps", "--extras_steps")


def parse_args(argv: list[str] | None = None):
    own, recipe_args = common.split_at_dashes(sys.argv[1:] if argv is None else argv)
    parser = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    usage="%(prog)s (--recipe SCRIPT | --command CMD) [options] [-- RECIPE FLAGS]")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--recipe", help="in-process mode: a recipe script of this repository, e.g. "
                                       "train_lcm_distill_lora_sdxl.py (its flags go after --)")
    what.add_argument("--command", help="external mode: a command line with {steps} where its step count goes")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed optimizer steps first, at least 1 (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="external mode: run each of the two commands this often and take medians (default: 1)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="external mode: samples per optimizer step, for samples/s (default: the command's "
                             "--train_batch_size)")
    parser.add_argument("--model", default=None,
                        help="external mode: model name for the JSON (default: the command's "
                             "--pretrained_teacher_model or --pretrained_model_name_or_path)")
    parser.add_argument("--label", default=None, help="free text copied into the JSON, e.g. 'bf16 + fused adam'")
    parser.add_argument("--append", default=None, help="also append the JSON line to this .jsonl file")
    args = parser.parse_args(own)
    args.recipe_args = recipe_args
    common.check_positive(args, "warmup", "steps", "repeats")
    if args.command is not None:
        if recipe_args:
            fail("flags after -- go to --recipe; with --command put them into the command")
        if "{steps}" not in args.command:
            fail("--command must contain {steps} where the number of training steps goes")
    else:
        if args.batch_size is not None or args.model is not None:
            fail("--batch_size and --model are for --command; in-process they come from the recipe's flags")
        given = [f for f in STEP_FLAGS if common.flag_value(recipe_args, f) is not None]
        if given:
            fail(f"leave {given[0]} out of the recipe flags: the benchmark sets the step count to warmup + steps")
    return args


class _Done(BaseException):
    """Raised after the last timed step: ends the recipe without its final save and validation."""


def step_flags(module, recipe_args: list[str], total: int) -> list[str]:
    """The recipe's flags for `total` optimizer steps (TLCM: one stage; the others: --max_train_steps)."""
    if common.recipe_kind(module) != "tlcm":
        return ["--max_train_steps", str(total)]
    stage = common.flag_value(recipe_args, "--stage") or "1"
    if stage not in ("1", "2", "extras"):
        fail(f"--stage {stage}: time one stage at a time (--stage 1, 2 or extras)")
    name = "--extras_steps" if stage == "extras" else f"--stage{stage}_steps"
    return ["--stage", stage, name, str(total)]


def run_in_process(args) -> dict:
    module = common.import_recipe(args.recipe)
    from utils import loop

    total = args.warmup + args.steps
    argv = list(args.recipe_args) + step_flags(module, args.recipe_args, total)
    argv += ["--checkpointing_steps", common.BIG, "--validation_steps", common.BIG, "--report_to", "none"]
    scratch = None
    if common.flag_value(args.recipe_args, "--output_dir") is None:
        scratch = tempfile.TemporaryDirectory(prefix="bench_train_step_")
        argv += ["--output_dir", scratch.name]
    with user_errors():
        recipe_args = module.parse_args(argv)
    stamps, seen = [], {}
    original = loop.apply_gradients

    def timed_apply_gradients(accelerator, *a, **kw):
        finite = original(accelerator, *a, **kw)
        if accelerator.sync_gradients:  # an optimizer step (not a micro-batch of gradient accumulation)
            stamps.append(common.now())
            seen["accelerator"] = accelerator
            if len(stamps) == total:
                raise _Done
        return finite

    common.reset_peak_memory()
    loop.apply_gradients = timed_apply_gradients
    try:
        with redirect_stdout(sys.stderr), user_errors():  # the recipe's logs go to stderr: stdout is the JSON
            module.main(recipe_args)
    except _Done:
        pass
    finally:
        loop.apply_gradients = original
        if scratch is not None:
            scratch.cleanup()
    if len(stamps) < total:
        fail(f"the recipe made {len(stamps)} optimizer steps, {total} were needed (a finished stage in "
             "--output_dir? a dataset smaller than one batch?)")
    times = [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])]
    accelerator = seen["accelerator"]
    batch = recipe_args.train_batch_size * recipe_args.gradient_accumulation_steps * accelerator.num_processes
    memory, kind = common.peak_memory()
    med = common.median(times)
    return {"recipe": os.path.basename(args.recipe), "model": recipe_args.pretrained_teacher_model,
            "batch_size": batch, "device": common.device_name(),
            "dtype": {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision),
            "warmup": args.warmup, "steps": args.steps, "median_step_s": med, "samples_per_s": batch / med,
            "peak_mem_mb": round(memory, 1), "peak_mem_kind": kind, "mode": "median",
            "step_times_s": [round(t, 5) for t in times], "_main": accelerator.is_main_process}


def run_external(args) -> dict:
    from tqdm.auto import tqdm

    peaks = []

    def run(steps: int) -> float:
        cmd = shlex.split(args.command.replace("{steps}", str(steps)))
        with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", LAUNCHER, rss.name, *cmd], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
            elapsed = time.perf_counter() - start
            peak = rss.read().strip()
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output on stderr)"])[-1]
            bar.close()  # before the error, so the error stays the last line
            fail(f"--command with {steps} steps exited with status {proc.returncode}: {last}")
        peaks.append(float(peak) / 1024)
        return elapsed

    short, long = [], []
    bar = tqdm(total=2 * args.repeats, desc="command runs", file=sys.stderr)
    for _ in range(args.repeats):  # interleaved, so a slow drift of the machine hits both alike
        short.append(run(args.warmup))
        bar.update(1)
        long.append(run(args.warmup + args.steps))
        bar.update(1)
    bar.close()
    per_step = (common.median(long) - common.median(short)) / args.steps
    spread = max(max(short) - min(short), max(long) - min(long))
    if args.repeats > 1 and per_step * args.steps < 5 * spread:
        print(f"warning: the runs vary by up to {spread:.2f} s, not small next to the {args.steps} timed steps "
              f"({per_step * args.steps:.2f} s): use more --steps or --repeats", file=sys.stderr)
    words = shlex.split(args.command)
    batch = args.batch_size or common.flag_value(words, "--train_batch_size")
    batch = int(batch) if batch is not None else None
    model = args.model or common.flag_value(words, "--pretrained_teacher_model") or \
        common.flag_value(words, "--pretrained_model_name_or_path")
    if per_step <= 0:
        print(f"warning: T({args.warmup + args.steps}) <= T({args.warmup}): the run-to-run noise is larger than "
              f"{args.steps} steps; use more --steps or --repeats", file=sys.stderr)
    return {"recipe": next((w for w in words if w.endswith(".py")), words[0]), "command": args.command,
            "model": model, "batch_size": batch, "device": common.device_name(), "dtype": None,
            "warmup": args.warmup, "steps": args.steps, "median_step_s": per_step,
            "samples_per_s": batch / per_step if batch and per_step > 0 else None,
            "peak_mem_mb": round(max(peaks), 1),
            "peak_mem_kind": "peak RSS of the command", "mode": "mean by difference",
            "run_spread_s": spread, "run_times_s": {str(args.warmup): short, str(args.warmup + args.steps): long}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    record = run_external(args) if args.command is not None else run_in_process(args)
    main_process = record.pop("_main", True)  # under `accelerate launch`, one line from the main process
    record = {"label": args.label, **record, **common.environment()}
    if main_process:
        common.emit(record, args.append)
    return record


if __name__ == "__main__":
    main()
