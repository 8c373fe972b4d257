"""A toy-world style LoRA, and a pixel measure of how much of the style an image shows.

The style, "sepia background": every toy scene drawn on one sepia colour (STYLE_RGB), whatever
background its caption names; shapes, colours and captions are unchanged. A style LoRA is a plain
diffusion-loss LoRA fine-tune of a toy UNet teacher on such images (`train_style_lora`): the toy
counterpart of a style LoRA trained on the same base as an acceleration LoRA.

The style score of an image drawn for a caption naming background b (`style_scores`): take c, the
mean colour of its four 2x2 corner patches (a toy shape reaches one at most with an anti-aliased
edge), and project it on the segment from b to the style colour s:

    score = clip(<c - b, s - b> / |s - b|^2, 0, 1)

0: the prompted background, as the base teacher draws it; 1: the style's background.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import BACKGROUNDS, random_scene, render

STYLE_NAME = "sepia background"
STYLE_RGB = (150, 90, 30)  # far from the three backgrounds and from every shape colour
CORNER = 2  # side of each corner patch, in pixels


def corner_colour(images: torch.Tensor) -> torch.Tensor:
    """Mean RGB (0..255) of the four CORNER x CORNER corner patches of images in [-1, 1], (N, 3, H, W) -> (N, 3)."""
    k = CORNER
    patches = [images[..., :k, :k], images[..., :k, -k:], images[..., -k:, :k], images[..., -k:, -k:]]
    mean = torch.stack([p.float().mean(dim=(-2, -1)) for p in patches]).mean(0)
    return (mean + 1) * 127.5


def background_of(caption: str) -> str:
    """The background a toy caption names ("... on a white background" -> "white")."""
    words = caption.lower().split()
    found = [w for w in words if w in BACKGROUNDS]
    if not found:
        raise ValueError(f"caption {caption!r} names no toy background")
    return found[-1]


def style_scores(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Per image: clip(<c - b, s - b> / |s - b|^2, 0, 1), c its corner colour, b the caption's background, s STYLE_RGB."""
    c = corner_colour(images)
    b = torch.tensor([BACKGROUNDS[background_of(t)] for t in captions], dtype=torch.float32)
    s = torch.tensor(STYLE_RGB, dtype=torch.float32)
    return (((c - b) * (s - b)).sum(-1) / (s - b).pow(2).sum(-1)).clamp(0, 1)


def styled_batch(n: int, rng: np.random.Generator, resolution: int = 32,
                 captions: list[str] | None = None) -> tuple[list[str], torch.Tensor]:
    """n random toy scenes (or scenes of these captions) drawn in the style: (their usual captions, images in [-1, 1])."""
    scenes = [random_scene(rng, captions[i] if captions else None) for i in range(n)]
    images = np.stack([np.asarray(render(s, resolution, background_rgb=STYLE_RGB)) for s in scenes])
    return [s.caption for s in scenes], torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_style_lora(teacher: str, out_dir: str, steps: int = 400, batch: int = 32, lr: float = 1e-3, rank: int = 8,
                     seed: int = 0, p_uncond: float = 0.1) -> str:
    """Fine-tune a LoRA of a toy UNet teacher (SD or SDXL folder) on styled images with the teacher's own loss,
    E ||eps - eps_theta(sqrt(a_t) z0 + sqrt(1 - a_t) eps, t, c)||^2 (t uniform, 10% of captions empty);
    writes the recipes' LoRA files (diffusers, PEFT, kohya) into out_dir and returns its diffusers file."""
    from diffusers import DDPMScheduler

    from .. import lora, models
    from ..lora_files import save_lora_outputs

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    arch = models.detect_architecture(teacher)
    vae = models.load_vae(teacher).requires_grad_(False)
    unet = models.load_denoiser(teacher).requires_grad_(False)
    tokenizers, encoders = models.load_text_encoders(teacher, arch)
    noise_schedule = DDPMScheduler.from_config(models.load_noise_scheduler_config(teacher))
    resolution = unet.config.sample_size * models.vae_scale_factor(vae.config)
    lora.add_trainable_lora(unet, rank, float(rank), lora.LCM_LORA_TARGETS)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    bar = tqdm(range(steps), desc=f"style LoRA ({STYLE_NAME})")
    for _ in bar:
        captions, images = styled_batch(batch, rng, resolution)
        captions = ["" if rng.random() < p_uncond else c for c in captions]
        with torch.no_grad():
            z0 = models.encode_latents(vae, images, batch)
            text = tuple(models.encode_prompts(arch, captions, tokenizers, encoders).values())
        cond = models.unet_conditioning(text, None, resolution)
        noise = torch.randn_like(z0)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,))
        x_t = noise_schedule.add_noise(z0, noise, t)
        loss = F.mse_loss(unet(x_t, t, **cond.unet_kwargs(x_t.dtype)).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    save_lora_outputs(unet, out_dir, "unet")
    return os.path.join(out_dir, "pytorch_lora_weights.safetensors")


@torch.no_grad()
def measure_style(teacher: str, style_lora: str, accel_lora: str, judge_dir: str, per_combo: int = 2,
                  seed: int = 0, teacher_steps: int = 25, teacher_cfg: float = 5.0, steps: int = 4,
                  scales: tuple[tuple[float, float], ...] = ((1.0, 1.0), (1.5, 1.0), (2.0, 1.0), (1.0, 0.8))
                  ) -> list[dict]:
    """Style score and judge prompt accuracy on the toy evaluation prompts of: styled real images; the teacher (Euler,
    teacher_steps, CFG) alone and with the style LoRA; the acceleration LoRA (LCMScheduler, `steps`, no CFG) alone and
    with the style LoRA at each (style, acceleration) scale pair; the first pair again unfused and in the other
    loading order, with its largest pixel difference to the fused run."""
    import inference

    from ..evaluate import eval_prompts, sample
    from ..samplers import set_sampler
    from .judge import ToyJudge, judge_images, prompt_accuracy

    judge = ToyJudge.from_pretrained(judge_dir)
    prompts = eval_prompts(per_combo)
    texts = [p[0] for p in prompts]
    labels = torch.tensor([p[1] for p in prompts]), torch.tensor([p[2] for p in prompts])

    def row(label: str, images: torch.Tensor, **extra) -> dict:
        shape, colour = judge_images(judge, images)[:2]
        return {"label": label, "style_score": style_scores(images, texts).mean().item(),
                "prompt_accuracy": prompt_accuracy(shape, colour, *labels), **extra}

    def run(loras: list[tuple[str, float]], sampler: str, n: int, cfg: float, fuse: bool = True) -> torch.Tensor:
        pipe = models_pipeline(teacher)
        if loras:
            files = [(inference.resolve_lora_file(path), scale) for path, scale in loras]
            inference.load_loras(pipe, pipe.unet, files, fuse, [f"lora{i}" for i in range(len(loras))])
        set_sampler(pipe, sampler)
        return sample(pipe, texts, n, cfg, seed)[0]

    rng = np.random.default_rng(seed)
    rows = [row("styled real images of the prompts (the style's data)", styled_batch(len(texts), rng, captions=texts)[1])]
    teacher_run = f"Euler, {teacher_steps} steps, CFG {teacher_cfg:g}"
    accel_run = f"LCMScheduler, {steps} steps, no CFG"
    rows.append(row(f"teacher ({teacher_run})", run([], "euler", teacher_steps, teacher_cfg)))
    rows.append(row(f"teacher + style LoRA 1.0 ({teacher_run})",
                    run([(style_lora, 1.0)], "euler", teacher_steps, teacher_cfg), reference=True))
    rows.append(row(f"teacher + style LoRA 1.0 (Euler, {steps} steps, CFG {teacher_cfg:g})",
                    run([(style_lora, 1.0)], "euler", steps, teacher_cfg)))
    rows.append(row(f"LCM-LoRA 1.0 ({accel_run})", run([(accel_lora, 1.0)], "lcm", steps, 1.0)))
    fused = None
    for style_scale, accel_scale in scales:
        images = run([(accel_lora, accel_scale), (style_lora, style_scale)], "lcm", steps, 1.0)
        fused = images if fused is None else fused
        rows.append(row(f"style LoRA {style_scale:g} + LCM-LoRA {accel_scale:g} ({accel_run})", images))
    (style_scale, accel_scale) = scales[0]
    for label, loras, fuse in (("not fused", [(accel_lora, accel_scale), (style_lora, style_scale)], False),
                               ("style LoRA loaded first", [(style_lora, style_scale), (accel_lora, accel_scale)], True)):
        images = run(loras, "lcm", steps, 1.0, fuse)
        rows.append(row(f"style LoRA {style_scale:g} + LCM-LoRA {accel_scale:g}, {label} ({accel_run})", images,
                        max_pixel_difference_to_fused=((images - fused).abs().max().item() * 127.5)))
    return rows


def models_pipeline(path: str):
    """The toy pipeline at `path` in fp32, progress bars off."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def markdown(rows: list[dict]) -> str:
    """The rows of measure_style as a Markdown table."""
    lines = ["| model / sampler | style score | prompt accuracy | max pixel difference to fused |", "|---|---:|---:|---:|"]
    for r in rows:
        diff = r.get("max_pixel_difference_to_fused")
        lines.append(f"| {r['label']} | {r['style_score']:.3f} | {r['prompt_accuracy']:.3f} | "
                     f"{'-' if diff is None else f'{diff:.2f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m utils.toy.style", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a style LoRA of a toy UNet teacher")
    t.add_argument("--teacher", required=True, help="a toy SD or SDXL pipeline folder")
    t.add_argument("--output_dir", required=True, help="where the style LoRA's files go")
    t.add_argument("--steps", type=int, default=400, help="optimizer steps (default: %(default)s)")
    t.add_argument("--batch", type=int, default=32, help="batch size (default: %(default)s)")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    t.add_argument("--rank", type=int, default=8, help="LoRA rank, alpha = rank (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("measure", help="style score of the style LoRA with the teacher and with an LCM-LoRA")
    m.add_argument("--teacher", required=True, help="the toy SDXL (or SD) pipeline folder both LoRAs were trained on")
    m.add_argument("--style_lora", required=True, help="the style LoRA (train's output)")
    m.add_argument("--lcm_lora", required=True, help="an LCM-LoRA of the same teacher")
    m.add_argument("--judge", required=True, help="the toy judge folder")
    m.add_argument("--per_combo", type=int, default=2, help="evaluation prompts per shape x colour (default: 2)")
    m.add_argument("--output_dir", required=True, help="where style.json and style.md go")
    args = parser.parse_args(argv)
    if args.command == "train":
        print(train_style_lora(args.teacher, args.output_dir, args.steps, args.batch, args.lr, args.rank, args.seed))
        return
    rows = measure_style(args.teacher, args.style_lora, args.lcm_lora, args.judge, args.per_combo)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "style.json"), "w") as f:
        json.dump(rows, f, indent=2)
    table = markdown(rows)
    with open(os.path.join(args.output_dir, "style.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
