"""Flags of inference.py: few-step sampling of a base model (SD 1.x/2.x, SDXL, FLUX) with an LCM/TLCM LoRA.

    python inference.py --prompt "a cat" --output_dir out/ --lora_path LORA --base_model_path MODEL --infer-steps 4

`parse_args(argv=None)` parses and checks the flags that need no model; inference.py resolves the
defaults that depend on the base model (architecture, resolution, scheduler, guidance, dtype).
"""

from __future__ import annotations

import argparse
import math
import os
import textwrap
from collections.abc import Sequence

from utils.errors import fail
from utils.samplers import SAMPLERS
from utils.flags import Parser

ROOT = os.path.dirname(os.path.abspath(__file__))

MIN_STEPS, MAX_STEPS = 1, 50            # what --infer-steps accepts
DISTILLED_STEPS = (2, 8)                # the range an LCM/TLCM LoRA is made for
DEFAULT_PROMPT = "a large red circle on a white background"  # a caption of the toy world

# --scheduler names, what each means and the architectures it fits: utils/samplers.py.
DEFAULT_SCHEDULER = {"flux": "tlcm", "sd": "lcm", "sdxl": "lcm"}
DTYPES = ("auto", "fp32", "fp16", "bf16")
RENOISE = ("fresh", "implied")

GUIDANCE_HELP = """\
guidance scale, diffusers convention (1 or less: no guidance).
Default, by model and sampler:
  SD/SDXL with lcm, tlcm-sdxl or tlcm: 0, no CFG, as the published
    LCM/TLCM LoRA snippets (a UNet that embeds w itself, i.e. a
    full LCM student, gets 7.5, w = 6.5 through that embedding);
  SD/SDXL with euler/ddim/dpm++: CFG 7.5 (SD) or 5.0 (SDXL);
  FLUX taking guidance as an input (guidance_embeds, FLUX.1-dev
    like): 3.5, FluxPipeline's default and the guidance input
    train_tlcm_flux.py trains with by default (the published TLCM FLUX
    LoRA was shown with 7: pass --guidance_scale 7 for it);
  FLUX without it (FLUX.1-schnell like, the toy FLUX): true CFG 5.0
    against an empty (or --negative_prompt) prompt, or 1.0 (none)
    with a LoRA, whose student has the teacher's guidance built in"""


def build_parser() -> argparse.ArgumentParser:
    """The inference.py argument parser; bad flags are reported as one line with exit status 2."""
    p = Parser(prog="python inference.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)

    io = p.add_argument_group("what to draw and where")
    io.add_argument("--prompt", default=None,
                    help=f'text prompt (default: a toy-world caption, "{DEFAULT_PROMPT}")')
    io.add_argument("--prompts_file", default=None,
                    help="instead of --prompt: many prompts, a .txt (one per line), .jsonl or .csv file")
    io.add_argument("--negative_prompt", default=None,
                    help="negative prompt; used only where CFG runs (guidance > 1 on SD/SDXL or on FLUX without\n"
                         "a guidance input); ignored, with a warning, otherwise")
    io.add_argument("--output_dir", default="samples",
                    help="folder for the PNGs (created; existing files are never overwritten: new names get\n"
                         "a -1, -2, ... suffix). Each PNG holds the prompt and all settings in its text\n"
                         "metadata (default: %(default)s)")
    io.add_argument("--overwrite", action="store_true",
                    help="write into an --output_dir that holds files inference.py did not write (they are kept:\n"
                         "the PNGs take free names); without it such a folder is refused")
    io.add_argument("--num_images", type=int, default=1,
                    help="images per prompt; image i is drawn from seed + i (default: %(default)s)")
    io.add_argument("--batch_size", type=int, default=1,
                    help="images per pipeline call (default: %(default)s)")
    io.add_argument("--seed", type=int, default=0, help="seed of the first image (default: %(default)s)")

    m = p.add_argument_group("models")
    m.add_argument("--base_model_path", default=None,
                   help="diffusers pipeline folder or hub id: SD 1.x/2.x, SDXL (SSD-1B) or FLUX, detected from\n"
                        "its model_index.json (default: the toy FLUX pipeline, toy_world/models/flux under\n"
                        "$TOY_WORLD or the repository root, built on first use in about 15 s)")
    m.add_argument("--lora_path", action="append", default=None, metavar="PATH[:SCALE]",
                   help="LoRA .safetensors file, or a folder holding one: diffusers\n"
                        "(pytorch_lora_weights.safetensors), PEFT (adapter_model.safetensors +\n"
                        "adapter_config.json, also under unet/ or transformer/) or kohya/ComfyUI keys;\n"
                        "the format is read from the keys; a text-encoder LoRA in the same file (LCM-LoRA's\n"
                        "--train_text_encoder_lora) is loaded into the text encoders. Give it again for\n"
                        "several LoRAs (e.g. an LCM-LoRA and a style LoRA of the same base): each becomes a\n"
                        "named adapter (from its file or folder name) with its own scale, given as\n"
                        "PATH:SCALE or by --lora_scale (default: none; with neither --lora_path nor\n"
                        "--base_model_path, the LoRA a demo run distilled for the toy FLUX, results/demo/\n"
                        "tlcm-flux, when it is there, else the base model alone)")
    m.add_argument("--lora_scale", action="append", type=float, default=None,
                   help="multiplier of a LoRA's alpha/r; one per --lora_path, in the same order\n"
                        "(--lora_path A --lora_path B --lora_scale 1.0 --lora_scale 0.8), or none\n"
                        "(every LoRA at 1.0, or as its PATH:SCALE says) (default: 1.0)")
    m.add_argument("--fuse_lora", action=argparse.BooleanOptionalAction, default=True,
                   help="merge the LoRA(s), each at its scale, into the weights once before sampling, so a\n"
                        "step costs what a base-model step costs; --no-fuse_lora keeps them as PEFT's\n"
                        "separate rank-r branches in every step (same images up to float rounding)\n"
                        "(default: on)")
    m.add_argument("--variant", default=None, help='weights variant of the base model, e.g. "fp16"')
    m.add_argument("--revision", default=None, help="revision of the base model on the hub")

    s = p.add_argument_group("sampling")
    s.add_argument("--infer-steps", "--infer_steps", "--num_inference_steps", dest="infer_steps", type=int,
                   default=4,
                   help=f"sampling steps, {MIN_STEPS}..{MAX_STEPS}; an LCM/TLCM LoRA is made for "
                        f"{DISTILLED_STEPS[0]}..{DISTILLED_STEPS[1]} (default: %(default)s)")
    s.add_argument("--scheduler", default=None, choices=list(SAMPLERS),
                   help="sampler (default: tlcm for FLUX, lcm for SD/SDXL):\n"
                        + "\n".join(textwrap.fill(f"{k}: {v.description}", 72, initial_indent="  ",
                                                   subsequent_indent="    ") for k, v in SAMPLERS.items()))
    s.add_argument("--renoise", default=None, choices=RENOISE,
                   help="tlcm only: re-noise each x0 prediction with fresh Gaussian noise (the published\n"
                        "sampler) or with the noise implied by the current sample (deterministic)\n"
                        "(default: fresh)")
    s.add_argument("--eta", type=float, default=None,
                   help="tcd only: the share of each step that is re-noised with fresh noise (TCD's gamma),\n"
                        "0 (deterministic) to 1; higher with more steps (default: 0.3, the TCD authors' choice)")
    s.add_argument("--guidance_scale", type=float, default=None, help=GUIDANCE_HELP)
    s.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels, square; must be a multiple of the VAE's downsampling factor\n"
                        "(x2 for FLUX's patches; SD/SDXL pipelines need a multiple of 8) (default: the\n"
                        "model's own size from its UNet/VAE config: 512 SD 1.5, 1024 SDXL and FLUX, 32 toy)")
    s.add_argument("--height", type=int, default=None, help="image height, overrides --resolution")
    s.add_argument("--width", type=int, default=None, help="image width, overrides --resolution")

    h = p.add_argument_group("hardware")
    h.add_argument("--device", default="auto",
                   help='"auto" (CUDA if available, else Apple MPS, else CPU), "cpu", "cuda", "cuda:1", "mps"\n'
                        "(default: %(default)s)")
    h.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights and compute precision. auto: bf16 for FLUX and fp16 for SD/SDXL on a GPU,\n"
                        "fp32 on CPU. fp16 on CPU is an error (many CPU kernels lack it; use fp32 or bf16);\n"
                        "bf16 on a GPU without bf16 is an error (default: %(default)s)")
    h.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention; without CUDA or without xformers installed this warns and\n"
                        "uses PyTorch SDPA attention")
    h.add_argument("--quiet", action="store_true", help="no progress bar and no notes, only the written file names")
    return p


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Reject impossible values that need no model; one-line errors with exit status 2."""
    if not MIN_STEPS <= args.infer_steps <= MAX_STEPS:
        fail(f"--infer-steps must be in {MIN_STEPS}..{MAX_STEPS}, got {args.infer_steps}")
    for flag in ("num_images", "batch_size"):
        if getattr(args, flag) < 1:
            fail(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("resolution", "height", "width"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            fail(f"--{flag} must be a positive number of pixels, got {value}")
    if args.prompt is not None and args.prompts_file is not None:
        fail("--prompt and --prompts_file given together: pass one")
    if args.prompt is not None and not args.prompt.strip():
        fail("--prompt is empty")
    if args.renoise is not None and args.scheduler not in (None, "tlcm"):
        fail(f"--renoise applies to --scheduler tlcm only, not {args.scheduler}")
    if args.eta is not None and args.scheduler not in (None, "tcd"):
        fail(f"--eta applies to --scheduler tcd only, not {args.scheduler}")
    if args.eta is not None and not 0 <= args.eta <= 1:
        fail(f"--eta must be in [0, 1] (the share of each step that is re-noised), got {args.eta}")
    if args.seed < 0:
        fail(f"--seed must be non-negative, got {args.seed}")
    args.loras = lora_specs(args.lora_path or [], args.lora_scale or [])
    return args


def split_lora_spec(text: str) -> tuple[str, float | None]:
    """--lora_path PATH or PATH:SCALE -> (path, scale or None); an existing path is taken whole, even with a ':'."""
    if os.path.exists(text) or ":" not in text:
        return text, None
    path, tail = text.rsplit(":", 1)
    try:
        scale = float(tail)
    except ValueError:
        fail(f"--lora_path {text}: no such file or folder, and {tail!r} after the last ':' is not a scale "
             "(PATH:SCALE, e.g. style.safetensors:0.8)")
    if not math.isfinite(scale) or not path:
        fail(f"--lora_path {text}: PATH:SCALE needs a path and a finite scale")
    return path, scale


def lora_specs(paths: Sequence[str], scales: Sequence[float]) -> list[tuple[str, float]]:
    """(path, scale) of every --lora_path, its scale from PATH:SCALE or the --lora_scale in the same position."""
    if scales and not paths:
        fail("--lora_scale given without --lora_path")
    if scales and len(scales) != len(paths):
        fail(f"{len(scales)} --lora_scale for {len(paths)} --lora_path: give one per LoRA, in the same order, or none")
    specs = [split_lora_spec(p) for p in paths]
    if scales and any(s is not None for _, s in specs):
        fail("give the LoRAs' scales either as PATH:SCALE or with --lora_scale, not both")
    return [(path, scales[i] if scales else 1.0 if s is None else s) for i, (path, s) in enumerate(specs)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check inference.py's flags (sys.argv[1:] when argv is None)."""
    return check_args(build_parser().parse_args(argv))
