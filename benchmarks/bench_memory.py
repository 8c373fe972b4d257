"""Peak memory and step time of a training script, and side by side with diffusers' example script.

    python benchmarks/bench_memory.py --recipe train_lcm_distill_lora_sdxl.py --steps 2 -- \\
        --pretrained_teacher_model <pipeline folder> --train_data_dir <imagefolder> --resolution 512 \\
        --train_batch_size 1 --mixed_precision bf16 --gradient_checkpointing

    # the same flags through diffusers' script too, one JSON line each plus their ratios
    python benchmarks/bench_memory.py --recipe train_lcm_distill_lora_sdxl.py \\
        --reference path/to/diffusers/examples/consistency_distillation/train_lcm_distill_lora_sdxl.py --until train -- ...

Each script runs in its own process under benchmarks/memory_probe.py, unmodified, for --steps optimizer steps
(the benchmark adds --max_train_steps (--steps_flag), --output_dir, and checkpoint and validation intervals that
never come).
Memory is the process's peak resident set size on the CPU, and CUDA max allocated on a GPU, read at three marks:
  load  - before the first training forward (models loaded and cast, caches filled);
  train - after the last optimizer step (the training step's activations, gradients and optimizer state);
  end   - at exit (the final save and any final validation; not with --until train, which ends the process at the
          last step).
The idle process (python with torch, diffusers, transformers, accelerate and peft imported) is measured once and
subtracted: `*_net_mb` is what the script itself holds. The step time is the median time between successive
optimizer steps (the first step, which includes warm-up, is left out when there are three or more).

Flags after `--` go to every script; --ours and --theirs add flags for one side only (e.g. --ours
"--cache_text_embeddings"). Output: one JSON line per script (and one with the ratios, ours / reference) on stdout,
appended to --append FILE too. docs/memory.md has the tables made with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BIG, ROOT, emit, fail, median, resolve_recipe, split_at_dashes  # noqa: E402

from utils.errors import user_errors  # noqa: E402

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_probe.py")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, shared = split_at_dashes(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--recipe", required=True, help="this repository's recipe (or any training script) to measure")
    p.add_argument("--reference", default=None,
                   help="diffusers' example script to run with the same flags after it (docs/memory.md: where to get "
                        "it, pinned to a release); adds a line with the ratios")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--steps_flag", default="--max_train_steps",
                   help="the script's flag for its number of steps (default: %(default)s; TLCM: "
                        "--steps_flag=--stage1_steps with --stage 1, or =--stage2_steps with --stage 2)")
    p.add_argument("--until", choices=["end", "train"], default="end",
                   help="end: run to exit (save, final validation); train: end each process at its last step "
                        "(default: %(default)s)")
    p.add_argument("--reference_until", choices=["end", "train"], default=None,
                   help="--until for the reference only (default: --until); e.g. train to leave out diffusers' final "
                        "validation, a fresh pipeline sampling at the model's full size")
    p.add_argument("--ours", default="", help="flags for --recipe only, one quoted string")
    p.add_argument("--theirs", default="", help="flags for --reference only, one quoted string")
    p.add_argument("--label", default=None, help="a name for this configuration in the JSON (default: the flags)")
    p.add_argument("--append", default=None, help="also append the JSON lines to this .jsonl file")
    p.add_argument("--work_dir", default=None,
                   help="where each run's throw-away --output_dir goes (default: a new temporary folder, removed "
                        "after)")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs the scripts (default: this one)")
    args = p.parse_args(argv)
    if args.steps < 1:
        fail(f"--steps must be at least 1, got {args.steps}")
    for flag in (args.steps_flag, "--output_dir"):
        if any(a == flag or a.startswith(flag + "=") for a in shared + shlex.split(args.ours + " " + args.theirs)):
            fail(f"{flag} is set by the benchmark (--steps, --work_dir); leave it out of the script's flags")
    args.recipe = resolve_recipe(args.recipe)
    if args.reference is not None and not os.path.isfile(args.reference):
        fail(f"reference script {args.reference} not found (--reference)")
    return args, shared


def run_probed(python: str, script: str | None, flags: list[str], log: str, stop_after: int | None) -> float:
    """Run `script` under the probe (the idle baseline when None); its stderr streams through; wall seconds."""
    command = [python, PROBE, "--log", log]
    if script is None:
        command.append("--baseline")
    else:
        if stop_after is not None:
            command += ["--stop_after", str(stop_after)]
        command += ["--", script, *flags]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, stdout=sys.stderr)
    if proc.returncode != 0:
        fail(f"{os.path.basename(script or 'baseline')} exited with code {proc.returncode} (its last lines are "
             "above)")
    return time.perf_counter() - start


def read_stamps(log: str) -> list[dict]:
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarise(stamps: list[dict], baseline: dict, key: str) -> dict:
    """load / train / end peaks (raw and net of the idle process) under `key` (peak_rss_mb or cuda_peak_mb), and
    what is resident (held) at the first training forward and after the last step."""
    first = next((s for s in stamps if s["event"] == "train_start"), None)
    steps = [s for s in stamps if s["event"] in ("step", "stop")]
    end = next((s for s in stamps if s["event"] == "exit"), None)
    base = baseline.get(key, 0.0) if key == "peak_rss_mb" else 0.0
    out = {}
    for name, s in (("load", first), ("train", steps[-1] if steps else None), ("end", end)):
        if s is not None and s.get(key) is not None:
            out[f"{name}_peak_mb"] = round(s[key], 1)
            out[f"{name}_peak_net_mb"] = round(s[key] - base, 1)
    held = "rss_mb" if key == "peak_rss_mb" else "cuda_mb"
    if first is not None and first.get(held) is not None:
        out["held_at_load_mb"] = round(first[held], 1)
    if steps and steps[-1].get(held) is not None:
        out["held_after_steps_mb"] = round(steps[-1][held], 1)
    return out


def step_times(stamps: list[dict]) -> list[float]:
    """Seconds between successive optimizer steps (from the first training forward to step 1 for the first)."""
    marks = [s["t"] for s in stamps if s["event"] == "train_start"][:1]
    marks += [s["t"] for s in stamps if s["event"] in ("step", "stop")]
    return [round(b - a, 3) for a, b in zip(marks, marks[1:])]


def measure(args, script: str, flags: list[str], work: str, baseline: dict, label: str, until: str) -> dict:
    """One probed run of `script` with `flags` to `until`: its JSON record."""
    out_dir = tempfile.mkdtemp(prefix="run-", dir=work)
    log = os.path.join(work, f"stamps-{os.getpid()}-{time.time_ns()}.jsonl")
    full = [*flags, args.steps_flag, str(args.steps), "--output_dir", out_dir, "--checkpointing_steps", BIG,
            "--validation_steps", BIG]
    wall = run_probed(args.python, script, full, log, args.steps if until == "train" else None)
    stamps = read_stamps(log)
    shutil.rmtree(out_dir, ignore_errors=True)
    times = step_times(stamps)
    timed = times[1:] if len(times) >= 3 else times
    cuda = any("cuda_peak_mb" in s for s in stamps)
    record = {"label": label, "script": os.path.relpath(script, ROOT) if script.startswith(ROOT) else script,
              "flags": shlex.join(flags), "steps": args.steps, "until": until,
              "memory": "cuda max allocated" if cuda else "peak RSS",
              "baseline_mb": round(baseline.get("peak_rss_mb", 0.0), 1),
              **summarise(stamps, baseline, "cuda_peak_mb" if cuda else "peak_rss_mb"),
              "median_step_s": round(median(timed), 3) if timed else None, "step_times_s": times,
              "wall_s": round(wall, 1)}
    if cuda:  # the CPU side of a GPU run, for the record
        record["cpu_train_peak_mb"] = summarise(stamps, baseline, "peak_rss_mb").get("train_peak_mb")
    return record


def ratios(ours: dict, theirs: dict) -> dict:
    """ours / reference for every memory mark both have, and for the step time."""
    out = {"label": f"{ours['label']} (ours / reference)"}
    for key in ("load_peak_mb", "load_peak_net_mb", "train_peak_mb", "train_peak_net_mb", "end_peak_mb",
                "end_peak_net_mb", "median_step_s"):
        if ours.get(key) and theirs.get(key):
            out[key.rsplit("_", 1)[0] + "_ratio"] = round(ours[key] / theirs[key], 3)  # the unit dropped
    return out


def main(argv: list[str]) -> None:
    args, shared = parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench-memory-")
    os.makedirs(work, exist_ok=True)
    try:
        base_log = os.path.join(work, f"baseline-{os.getpid()}.jsonl")
        run_probed(args.python, None, [], base_log, None)
        baseline = read_stamps(base_log)[-1]
        label = args.label or shlex.join(shared)
        ours = measure(args, args.recipe, shared + shlex.split(args.ours), work, baseline, label, args.until)
        emit(ours, args.append)
        if args.reference:
            theirs = measure(args, os.path.abspath(args.reference), shared + shlex.split(args.theirs), work,
                             baseline, f"{label} [reference]", args.reference_until or args.until)
            emit(theirs, args.append)
            emit(ratios(ours, theirs), args.append)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    with user_errors():
        main(sys.argv[1:])
