"""Evaluation of a text-to-image pipeline: prompt accuracy, toy FD, CLIP score, FD, fidelity, wall time.

    python -m utils.evaluate --pipeline toy_world/models/sd --steps 4 50 --guidance_scale 7.5

For each step count it samples every evaluation prompt from fixed seeds and reports:
  - prompt accuracy (toy world): fraction of images whose shape and colour, as the toy judge reads
    them, both match the prompt;
  - toy FD: Frechet distance between judge features of the samples and of real images;
  - with --clip_model (a local CLIP folder, for real models): CLIP score, 100 * mean cosine of image
    and prompt embeddings (negatives clipped to 0), and CLIP FD, the Frechet distance of CLIP
    image embeddings of the samples and of --real_images;
  - with --teacher: RMSE to the teacher's sample from the same noise (fidelity);
  - milliseconds per image (sampling only, VAE decode included).
Real models use --prompts_file (one prompt per line) and --judge none. It writes `metrics.json`,
`metrics.md` and `grid.png` (a row per model and step count, labelled with its sampler, steps and
CFG; a column per prompt, the first 12, labelled with the prompt).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .errors import fail, user_errors
from .eval_sampling import Result, row_labels, sample
from .eval_protocol import add_protocol_args, run_protocol
from .metrics import ClipEmbedder, clip_score, frechet_distance as features_frechet_distance
from .grids import save_grid
from .samplers import SAMPLERS, check_sampler, set_sampler, step_kwargs, uses_milestones

if TYPE_CHECKING:
    from .toy.judge import ToyJudge


class ClipScorer(ClipEmbedder):
    """CLIP score and CLIP FD of the old --clip_model path: embeddings from open_clip or transformers (utils/metrics.py)."""

    def score(self, images: torch.Tensor, prompts: list[str]) -> float:
        """Mean over images of 100 * max(cos(image, prompt), 0): the usual CLIP score."""
        return clip_score(self.image_features(images), self.text_features(prompts)).mean().item()


def eval_prompts(per_combo: int = 1) -> list[tuple[str, int, int]]:
    """Fixed prompts covering every shape x colour (backgrounds and sizes cycled): (caption, shape, colour)."""
    from .toy import data as toy_data

    prompts, k = [], 0
    for _ in range(per_combo):
        for shape in toy_data.SHAPES:
            for colour in toy_data.COLOUR_NAMES:
                bg = toy_data.BACKGROUND_NAMES[k % len(toy_data.BACKGROUND_NAMES)]
                size = toy_data.SIZE_NAMES[(k // len(toy_data.BACKGROUND_NAMES)) % len(toy_data.SIZE_NAMES)]
                cap = toy_data.caption(shape, colour, bg, size)
                prompts.append((cap, toy_data.SHAPES.index(shape), toy_data.COLOUR_NAMES.index(colour)))
                k += 1
    return prompts


def load_real_images(folder: str, limit: int = 500) -> torch.Tensor:
    """Images of an imagefolder split, in [-1, 1]."""
    with open(os.path.join(folder, "metadata.jsonl")) as f:
        names = [json.loads(line)["file_name"] for line in f][:limit]
    arr = np.stack([np.asarray(Image.open(os.path.join(folder, n)).convert("RGB")) for n in names])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def read_labels(folder: str) -> torch.Tensor:
    """(shape, colour) label rows of a toy imagefolder split, in metadata order."""
    with open(os.path.join(folder, "metadata.jsonl")) as f:
        return torch.tensor([[row["shape"], row["colour"]] for row in map(json.loads, f)])


def evaluate(pipe, steps_list: list[int], guidance_scale: float, judge: ToyJudge | None = None,
             real_feats: torch.Tensor | None = None, label: str = "", per_combo: int = 1, seed: int = 0,
             reference: torch.Tensor | None = None, prompts: list[str] | None = None, clip: ClipScorer | None = None,
             clip_real_feats: torch.Tensor | None = None,
             call_kwargs: dict | None = None) -> tuple[list[Result], list[torch.Tensor]]:
    """Sample the pipeline at every step count and measure; returns results and the sampled images.

    Prompts are the toy evaluation prompts (with their labels, for the judge) unless `prompts` is
    given. `reference`: images of the same prompts and seeds (e.g. the teacher at 50 steps) to
    measure fidelity against; the same seeds give the same initial noise when the latent shapes match.
    `call_kwargs`: more pipeline-call kwargs, e.g. samplers.step_kwargs' eta for TCD.
    """
    labelled = eval_prompts(per_combo) if prompts is None else None
    texts = [p[0] for p in labelled] if labelled else list(prompts)
    if judge is not None:  # the toy judge's module only when needed
        from .toy.judge import frechet_distance, judge_images, prompt_accuracy
    results, images = [], []
    for steps in steps_list:
        imgs, sec = sample(pipe, texts, steps, guidance_scale, seed, **(call_kwargs or {}))
        acc = fd = None
        if judge is not None:
            ps, pc, feats = judge_images(judge, imgs)
            if labelled:
                acc = prompt_accuracy(ps, pc, torch.tensor([p[1] for p in labelled]),
                                      torch.tensor([p[2] for p in labelled]))
            fd = None if real_feats is None else frechet_distance(feats, real_feats)
        rmse = None if reference is None else (imgs - reference).pow(2).mean().sqrt().item()
        result = Result(label, steps, acc, fd, sec, rmse, guidance_scale=guidance_scale)
        if clip is not None:
            result.clip_score = clip.score(imgs, texts)
            if clip_real_feats is not None:
                result.clip_fd = features_frechet_distance(clip.image_features(imgs).double().numpy(),
                                                           clip_real_feats.double().numpy())
        results.append(result)
        images.append(imgs)
    return results, images


def markdown_table(results: list[Result]) -> str:
    """A Markdown table of the results; CLIP columns only when some result has them."""
    has_clip = any(r.clip_score is not None for r in results)
    head = "| model / sampler | steps | prompt accuracy | toy FD | RMSE to teacher@50 |"
    head += " CLIP score | CLIP FD |" * has_clip + " ms / image |"
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]

    def f(x: float | None, digits: int) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    for r in results:
        row = f"| {r.label} | {r.steps} | {f(r.prompt_accuracy, 3)} | {f(r.toy_fd, 2)} | {f(r.teacher_rmse, 3)} |"
        row += f" {f(r.clip_score, 2)} | {f(r.clip_fd, 4)} |" * has_clip
        lines.append(row + f" {r.seconds_per_image * 1000:.1f} |")
    return "\n".join(lines)


def write_report(results: list[Result], out_dir: str, name: str = "metrics") -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump([asdict(r) for r in results], f, indent=2)
    table = markdown_table(results)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    return table


def main() -> None:
    from .flags import Parser

    parser = Parser(prog="python -m utils.evaluate", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="diffusers pipeline folder (or hub id) to sample")
    parser.add_argument("--lora", default=None,
                        help="a LoRA (folder or file with pytorch_lora_weights.safetensors) to load into --pipeline")
    parser.add_argument("--scheduler", default="default", choices=["default", *SAMPLERS],
                        help="sampler to use on the pipeline's noise schedule, one of utils/samplers.py "
                             "(default: the pipeline's own)")
    parser.add_argument("--eta", type=float, default=None,
                        help="--scheduler tcd only: TCD's gamma, the share of each step re-noised (default: 0.3)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="step counts (default: %(default)s)")
    parser.add_argument("--guidance_scale", type=float, default=7.5,
                        help="CFG scale, diffusers convention (for an LCM student: w + 1)")
    parser.add_argument("--teacher", default=None,
                        help="teacher pipeline folder: also report RMSE to its --teacher_steps sample from the same noise")
    parser.add_argument("--teacher_steps", type=int, nargs="+", default=[50],
                        help="teacher step counts; the largest is the reference (default: %(default)s)")
    parser.add_argument("--teacher_guidance_scale", type=float, default=None, help="teacher CFG (default: --guidance_scale)")
    parser.add_argument("--judge", default="toy_world/judge",
                        help='toy judge folder, or "none" for real models (default: %(default)s)')
    parser.add_argument("--real_images", default="toy_world/data/test",
                        help="imagefolder of real images for toy FD / CLIP FD (default: %(default)s)")
    parser.add_argument("--clip_model", default=None, help="CLIP model folder (or hub id): adds CLIP score and CLIP FD")
    parser.add_argument("--prompts_file", default=None,
                        help="evaluation prompts, one per line (default: the toy prompts, every shape x colour)")
    parser.add_argument("--output_dir", default="results/eval", help="where metrics and the grid go")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --output_dir holding files utils.evaluate did not write (its metrics.json, "
                             "metrics.md and grid.png are replaced, the others kept)")
    parser.add_argument("--per_combo", type=int, default=1, help="toy prompts per shape x colour (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="image i is sampled from seed + i")
    add_protocol_args(parser)
    args = parser.parse_args()
    if any(s < 1 or s > 1000 for s in args.steps):
        fail(f"--steps must be between 1 and 1000, got {args.steps}")
    for flag, value in (("--teacher_steps", min(args.teacher_steps)), ("--per_combo", args.per_combo)):
        if value < 1:
            fail(f"{flag} must be at least 1, got {value}")
    use_judge = args.judge.lower() != "none" and not args.metrics  # the protocol reads no judge
    for flag, path, needed in (("--judge", args.judge, use_judge),
                               ("--real_images", args.real_images, use_judge or (args.clip_model and not args.metrics))):
        if needed and not os.path.isdir(path):
            fail(f"{flag} {path} does not exist (for the toy world: python -m utils.toy build)")
        metadata = os.path.join(path, "metadata.jsonl")
        if needed and flag == "--real_images" and not (os.path.isfile(metadata) and os.path.getsize(metadata)):
            fail(f"--real_images {path} holds no images: an imagefolder has them listed in metadata.jsonl")
    from .outputs import prepare_output  # the output rule: not an input, not a folder of others' files

    prepare_output(args.output_dir, "--output_dir", {"--pipeline": args.pipeline, "--lora": args.lora,
                   "--teacher": args.teacher, "--judge": args.judge, "--real_images": args.real_images,
                   "--clip_model": args.clip_model, "--prompts_file": args.prompts_file}, "utils.evaluate",
                   args.overwrite, own=("metrics.json", "metrics.md", "grid.png").__contains__)

    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    from .data import load_prompts
    from .errors import UserError
    from .models import detect_architecture, pipeline_index

    for library in (diffusers, transformers):  # stderr is for errors: no per-file loading bars or notes
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    with user_errors():
        pipeline_index(args.pipeline, flag="--pipeline")
        if args.scheduler != "default":  # a sampler for another model family, or steps it has no timesteps for
            arch = detect_architecture(args.pipeline, flag="--pipeline")
            check_sampler(args.scheduler, arch)
            if uses_milestones(args.scheduler, arch) and max(args.steps) > 8:
                fail(f"--scheduler {args.scheduler} takes --steps 1..8 (the published milestone subsets), "
                     f"got {args.steps}")
        call = step_kwargs(args.scheduler, args.eta)  # TCD's eta; one line for --eta elsewhere or out of range
        if args.teacher:
            pipeline_index(args.teacher, flag="--teacher")
        prompts = load_prompts(prompts_file=args.prompts_file) if args.prompts_file else None
        if args.lora:  # read and check against the pipeline's denoiser (no weights loaded) before any sampling
            from . import lora_files

            try:
                lora_files.read_lora(args.lora, lora_files.denoiser_skeleton(args.pipeline, flag="--pipeline")[0],
                                     text_encoders=True)  # load_lora_weights loads a text-encoder LoRA too
            except UserError as exc:
                raise UserError(f"{exc} (--lora)") from None
    if args.metrics:
        return run_protocol(args, prompts or [p[0] for p in eval_prompts(args.per_combo)])
    real = load_real_images(args.real_images) if (use_judge or args.clip_model) else None
    ev = dict(per_combo=args.per_combo, seed=args.seed, prompts=prompts)
    if use_judge:
        from .toy.judge import ToyJudge, judge_images

        ev["judge"] = ToyJudge.from_pretrained(args.judge)
        ev["real_feats"] = judge_images(ev["judge"], real)[2]
    if args.clip_model:
        with user_errors():
            ev["clip"] = ClipScorer(args.clip_model)
        ev["clip_real_feats"] = ev["clip"].image_features(real)
    reference, rows, results = None, [], []
    if args.teacher:
        teacher = DiffusionPipeline.from_pretrained(args.teacher, torch_dtype=torch.float32)
        teacher.set_progress_bar_config(disable=True)
        g = args.guidance_scale if args.teacher_guidance_scale is None else args.teacher_guidance_scale
        results, rows = evaluate(teacher, sorted(set(args.teacher_steps)), g,
                                 label=f"teacher ({type(teacher.scheduler).__name__})", **ev)
        reference = rows[-1]
    pipe = DiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if args.lora:
        try:
            pipe.load_lora_weights(args.lora)
        except (OSError, ValueError) as exc:
            fail(f"--lora {args.lora} could not be loaded: {str(exc).strip().splitlines()[0]}")
    sampler = set_sampler(pipe, args.scheduler)
    name = os.path.basename(os.path.normpath(args.lora or args.pipeline))
    label = f"{name} ({sampler}" + "".join(f", {k} {v:g}" for k, v in call.items()) + ")"
    res, images = evaluate(pipe, args.steps, args.guidance_scale, label=label, reference=reference, call_kwargs=call,
                           **ev)
    print(write_report(results + res, args.output_dir))
    texts = prompts or [p[0] for p in eval_prompts(args.per_combo)]
    save_grid(rows + images, os.path.join(args.output_dir, "grid.png"), row_labels(results + res), texts)
    print(f"metrics.json, metrics.md and grid.png written to {args.output_dir}/")


if __name__ == "__main__":
    main()
