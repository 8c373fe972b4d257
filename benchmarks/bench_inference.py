"""Inference wall time per image of a few-step student vs its teacher with CFG, next to the ideal speed-up.

    python benchmarks/bench_inference.py --pipeline toy_world/models/sdxl --lora out/lcm_lora
    python benchmarks/bench_inference.py --pipeline toy_world/models/sd --student out/lcm_sd --student_guidance_scale 7.5
    python benchmarks/bench_inference.py --pipeline toy_world/models/flux --lora out/tlcm --guidance_scale 5

The teacher (--pipeline, its own sampler unless --teacher_scheduler) runs at --teacher_steps with
CFG --guidance_scale; the student (--student: a full pipeline such as train_lcm_distill_sd.py's
output, or --lora: a LoRA loaded into --pipeline and fused) runs at --student_steps with its
sampler (--scheduler; default lcm for a UNet LoRA, tlcm for a FLUX LoRA, the folder's own for
--student). Every configuration is timed as the median of --repeats runs after --warmup untimed
ones, all from the same seeds (image i from seed + i); the time covers the whole pipeline call
(text encoding, denoising loop, VAE decode).

Network evaluations are COUNTED, not assumed: a hook on the denoiser (UNet / FLUX transformer)
adds up the batch rows of every forward, so batched cond + uncond counts 2 per image, FLUX's
true CFG (two calls) also 2, a guidance-embedded FLUX or an LCM student 1. The ideal speed-up of a
student configuration over a teacher one is the ratio of their evaluations per image; the JSON of
each student configuration lists, per teacher configuration, eval_ratio (ideal), speed_ratio
(measured), fraction_of_ideal and whether it reaches --min_fraction (0.9) of the ideal, and
call_ratio, the ratio of denoiser calls: when a call costs the same whatever its batch (a tiny
model, a GPU far from full), batched CFG is nearly free and call_ratio is the reachable bound.

One JSON line per configuration: label, role, model, sampler, steps, guidance_scale, images,
batch_size, resolution, evals_per_image, denoiser_calls, ms_per_image (median), ms_per_image_runs,
device, dtype, torch, threads, and for students vs_teacher.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from utils.errors import UserError, fail, user_errors  # noqa: E402
from utils.samplers import SAMPLERS  # noqa: E402
from utils.flags import Parser  # noqa: E402


def parse_args(argv: list[str] | None = None):
    parser = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="the teacher: a diffusers pipeline folder (or hub id)")
    student = parser.add_mutually_exclusive_group(required=True)
    student.add_argument("--student", help="the student as a full pipeline folder (e.g. train_lcm_distill_sd.py's output)")
    student.add_argument("--lora", help="the student as a LoRA (file or folder) for --pipeline")
    parser.add_argument("--scheduler", default=None, choices=["default", *SAMPLERS],
                        help="student sampler (default: the --student folder's own; lcm for a UNet LoRA, tlcm for a FLUX LoRA)")
    parser.add_argument("--teacher_scheduler", default="default", choices=["default", *SAMPLERS],
                        help="teacher sampler (default: the pipeline's own)")
    parser.add_argument("--student_steps", type=int, nargs="+", default=[1, 2, 4, 8], help="(default: %(default)s)")
    parser.add_argument("--teacher_steps", type=int, nargs="+", default=[25, 50], help="(default: %(default)s)")
    parser.add_argument("--guidance_scale", type=float, default=7.5,
                        help="teacher CFG scale, diffusers convention (default: %(default)s)")
    parser.add_argument("--student_guidance_scale", type=float, default=1.0,
                        help="student guidance: 1 = no CFG (LCM-LoRA, TLCM); an LCM-SD student takes w + 1 "
                             "through its guidance embedding, still one evaluation per step (default: %(default)s)")
    parser.add_argument("--fuse_lora", action=argparse.BooleanOptionalAction, default=True,
                        help="fuse the LoRA into the weights before timing, as deployed (default: on)")
    parser.add_argument("--num_prompts", type=int, default=8, help="toy evaluation prompts to sample (default: 8)")
    parser.add_argument("--prompts_file", default=None, help="prompts, one per line, instead of the toy prompts")
    parser.add_argument("--batch_size", type=int, default=None, help="images per pipeline call (default: all prompts)")
    parser.add_argument("--student_batch_size", default=None,
                        help="images per student pipeline call (default: --batch_size); 'match': as many as the "
                             "teacher's denoiser calls carry rows (2 x --batch_size with batched CFG), so both send "
                             "the same batch through the network (give --num_prompts at least that many)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: the pipeline's own)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per configuration (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="image i is sampled from seed + i (default: 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="fp32", choices=list(common.DTYPES), help="weights dtype (default: fp32)")
    parser.add_argument("--min_fraction", type=float, default=0.9,
                        help="the measured speed-up should reach this fraction of the ideal (default: 0.9)")
    parser.add_argument("--label", default=None, help="free text copied into every JSON line")
    parser.add_argument("--append", default=None, help="also append the JSON lines to this .jsonl file")
    args = parser.parse_args(argv)
    common.check_positive(args, "num_prompts", "repeats")
    if args.warmup < 0:
        fail(f"--warmup must be at least 0, got {args.warmup}")
    if args.batch_size is not None and args.batch_size < 1:
        fail(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.student_batch_size not in (None, "match") and not (
            args.student_batch_size.isdigit() and int(args.student_batch_size) >= 1):
        fail(f"--student_batch_size must be a positive integer or 'match', got {args.student_batch_size}")
    if any(not 1 <= s <= 1000 for s in args.student_steps + args.teacher_steps):
        fail("--student_steps and --teacher_steps must be between 1 and 1000")
    for flag, path in (("--lora", args.lora), ("--prompts_file", args.prompts_file)):
        if path is not None and not os.path.exists(path):
            fail(f"{flag} {path} does not exist")
    return args


class EvalCounter:
    """Counts the denoiser's forwards and the batch rows they carry (rows = network evaluations), and times
    the denoising loop of each pipeline call: from the first denoiser forward to the end of the last step
    (the pipeline's step-end callback, after the scheduler's step), i.e. without text encoding, latent
    preparation and VAE decode."""

    def __init__(self, module) -> None:
        self.calls = self.rows = 0
        self.loop_s, self._start, self._end = 0.0, None, None
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.calls += 1
        self.rows += int(x.shape[0])
        if self._start is None:
            self._start = common.now()

    def step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self._end = common.now()
        return callback_kwargs

    def end_call(self) -> None:
        """Close one pipeline call's loop (called after the call returns)."""
        if self._start is not None and self._end is not None:
            self.loop_s += self._end - self._start
        self._start = self._end = None

    def reset(self) -> None:
        self.calls = self.rows = 0
        self.loop_s, self._start, self._end = 0.0, None, None


def denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def load_pipeline(path: str, flag: str, args):
    import torch
    from diffusers import DiffusionPipeline

    from utils import models

    models.pipeline_index(path, flag=flag)
    pipe = models.load_pretrained(DiffusionPipeline, path, flag, dtype=getattr(torch, common.DTYPES[args.dtype]))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device)


def measure(pipe, prompts: list[str], steps: int, guidance: float, args, batch: int | None = None) -> dict:
    """Median milliseconds per image (whole call, and its denoising loop) over the timed runs, and the
    counted evaluations per image; `batch` prompts per pipeline call (default --batch_size)."""
    from utils.eval_sampling import sample

    counter = EvalCounter(denoiser(pipe))
    extra = {"height": args.resolution, "width": args.resolution} if args.resolution else {}
    batch = batch or args.batch_size or len(prompts)
    runs, loops, evals = [], [], set()
    try:
        for i in range(args.warmup + args.repeats):
            counter.reset()
            common.synchronize()
            _, seconds = sample(pipe, prompts, steps, guidance, seed=args.seed, batch_size=batch,
                                callback_on_step_end=counter.step_end, after_call=counter.end_call, **extra)
            evals.add(counter.rows / len(prompts))
            if i >= args.warmup:
                runs.append(seconds)
                loops.append(counter.loop_s / len(prompts))
    finally:
        counter.handle.remove()
    if len(evals) != 1:
        raise RuntimeError(f"evaluations per image changed between runs: {sorted(evals)}")
    ms, loop_ms = 1000 * common.median(runs), 1000 * common.median(loops)
    return {"steps": steps, "guidance_scale": guidance, "images": len(prompts), "batch_size": batch,
            "evals_per_image": evals.pop(), "denoiser_calls": counter.calls, "rows_per_call": counter.rows / counter.calls,
            "ms_per_image": ms, "loop_ms_per_image": loop_ms, "outside_loop_ms_per_image": ms - loop_ms,
            "ms_per_image_runs": [round(1000 * r, 3) for r in runs]}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import torch
    from tqdm.auto import tqdm

    from utils.data import load_prompts
    from utils.eval_sampling import default_resolution
    from utils.evaluate import eval_prompts
    from utils.samplers import set_sampler

    common.quiet_libraries()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with user_errors():
        if args.prompts_file:
            prompts = load_prompts(prompts_file=args.prompts_file)[:args.num_prompts]
        else:
            per_combo = -(-args.num_prompts // len(eval_prompts(1)))
            prompts = [p[0] for p in eval_prompts(per_combo)][:args.num_prompts]
    base = {"label": args.label, "device": common.device_name() if args.device.startswith("cuda") else "cpu",
            "dtype": args.dtype, **common.environment()}
    with user_errors():
        teacher = load_pipeline(args.pipeline, "--pipeline", args)
    records, teachers = [], []
    bar = tqdm(total=len(args.teacher_steps) + len(args.student_steps), desc="configurations", file=sys.stderr)
    with common.closing_bar(bar):
        resolution = args.resolution or default_resolution(teacher)
        sampler = set_sampler(teacher, args.teacher_scheduler)
        for steps in args.teacher_steps:
            result = measure(teacher, prompts, steps, args.guidance_scale, args)
            teachers.append(result)
            records.append({**base, "role": "teacher", "model": args.pipeline, "sampler": sampler,
                            "resolution": resolution, **result})
            common.emit(records[-1], args.append)
            bar.update(1)
        del teacher
        gc.collect()

        student = load_pipeline(args.student or args.pipeline, "--student" if args.student else "--pipeline", args)
        if args.lora:
            try:
                student.load_lora_weights(args.lora)
            except Exception as exc:  # diffusers reports a LoRA that does not fit in many exception classes
                lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
                raise UserError(f"--lora {args.lora} does not fit {args.pipeline}: "
                                f"{(lines or [type(exc).__name__])[-1]}") from None
            if args.fuse_lora:
                student.fuse_lora()
                student.unload_lora_weights()  # the fused weights stay; the LoRA layers go
        name = args.scheduler or ("default" if args.student else "tlcm" if hasattr(student, "transformer") else "lcm")
        sampler = set_sampler(student, name)
        for steps in args.student_steps:
            batch = args.student_batch_size
            if batch == "match":  # as many images per call as the teacher's calls carry rows
                batch = int(round(teachers[0]["rows_per_call"]))
            result = measure(student, prompts, steps, args.student_guidance_scale, args,
                             batch=int(batch) if batch else None)
            versus = []
            for t in teachers:
                ideal = t["evals_per_image"] / result["evals_per_image"]
                speed = t["ms_per_image"] / result["ms_per_image"]
                loop_speed = t["loop_ms_per_image"] / result["loop_ms_per_image"]
                # the whole call's speed-up if the loop alone sped up by exactly the ideal ratio
                bound = t["ms_per_image"] / (t["loop_ms_per_image"] / ideal + result["outside_loop_ms_per_image"])
                versus.append({"teacher_steps": t["steps"], "teacher_evals_per_image": t["evals_per_image"],
                               "eval_ratio": ideal, "call_ratio": t["denoiser_calls"] / result["denoiser_calls"],
                               "speed_ratio": speed, "fraction_of_ideal": speed / ideal,
                               f"reaches_{args.min_fraction:g}x_ideal": speed >= args.min_fraction * ideal,
                               "loop_speed_ratio": loop_speed, "loop_fraction_of_ideal": loop_speed / ideal,
                               f"loop_reaches_{args.min_fraction:g}x_ideal": loop_speed >= args.min_fraction * ideal,
                               "speed_bound_with_outside_loop_costs": bound})
            records.append({**base, "role": "student", "model": args.student or args.lora, "sampler": sampler,
                            "lora_fused": bool(args.lora and args.fuse_lora), "resolution": resolution, **result,
                            "vs_teacher": versus})
            common.emit(records[-1], args.append)
            bar.update(1)
    bar.close()
    return records


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        fail(str(exc))
