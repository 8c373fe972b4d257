"""Few-step text-to-image sampling with an LCM/TLCM LoRA on SD 1.x/2.x, SDXL or FLUX.

    python inference.py --prompt "a cat" --output_dir out/ --lora_path LORA --base_model_path MODEL --infer-steps 4

The base model is any diffusers pipeline folder or hub id; its architecture (sd, sdxl, flux) is read
from model_index.json. The LoRA may be in diffusers, PEFT or kohya format (read from its keys). With no
flags at all it samples the toy FLUX pipeline (built on first use), offline. Every flag: paras.py, or
`python inference.py --help`.

Each image is written as a PNG whose text metadata holds the prompt and every setting (keys `prompt`,
`steps`, `seed`, `scheduler`, `guidance_scale`, `base_model`, `lora`, ..., `loras` (every LoRA: path,
file, format, scale, adapter name), all of them as JSON under `settings`, and an A1111-style `parameters`
line). Several LoRAs (--lora_path repeated, each PATH:SCALE or with its --lora_scale) are named adapters,
fused into the weights by default. Files are written under a temporary name and
renamed, and never replace an existing file.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import itertools
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from paras import (
    DEFAULT_PROMPT,
    DEFAULT_SCHEDULER,
    DISTILLED_STEPS,
    ROOT,
    parse_args,
)
from utils import files, outputs
from utils.errors import UserError, user_errors
from utils.samplers import SAMPLERS, check_sampler, set_sampler, step_kwargs, uses_milestones

LORA_FILE_NAMES = (  # looked for, in this order, in a --lora_path folder
    "pytorch_lora_weights.safetensors",        # diffusers (and our recipes' main output)
    "adapter_model.safetensors",               # PEFT folder
    "unet/adapter_model.safetensors",
    "transformer/adapter_model.safetensors",
    "lora_kohya.safetensors",                  # kohya / ComfyUI keys
)
FEW_STEP_SCHEDULERS = tuple(name for name, sampler in SAMPLERS.items() if sampler.few_step)
SOFTWARE = "inference.py (LCM/TLCM few-step distillation toolkit)"


class Console:
    """Notes and warnings on stderr (notes muted by --quiet)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def note(self, message: str) -> None:
        if not self.quiet:
            print(f"note: {message}", file=sys.stderr)

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- base model


def toy_world_root() -> str:
    """Where the toy world lives: $TOY_WORLD, else toy_world/ at the repository root."""
    return os.environ.get("TOY_WORLD") or os.path.join(ROOT, "toy_world")


def default_base_model(console: Console) -> str:
    """The toy FLUX pipeline folder, built (once, about 15 s) when it is missing."""
    root = toy_world_root()
    path = os.path.join(root, "models", "flux")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        console.note(f"building the toy world into {root} (once, about 15 s)")
        from utils.toy.build import build

        build(root)
    console.note(f"no --base_model_path: sampling the toy FLUX pipeline {path}")
    return path


def image_geometry(path: str, arch: str, revision: str | None) -> tuple[int, int]:
    """(default side in pixels: the model's own size, models.native_resolution; the multiple every side must be)
    from the VAE and denoiser configs."""
    from diffusers import AutoencoderKL

    from utils.models import load_config, native_resolution

    side = native_resolution(path, revision, "--base_model_path")
    vae = load_config(AutoencoderKL, path, "vae", revision, "--base_model_path")
    factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    if arch == "flux":  # FluxPipeline packs 2x2 latent patches into one token
        return side, factor * 2
    return side, factor * 8 // math.gcd(factor, 8)  # the SD/SDXL pipelines check for multiples of 8 whatever the VAE's


def image_size(args: argparse.Namespace, default: int, multiple: int) -> tuple[int, int]:
    """(height, width) from --height/--width/--resolution, checked against the model's multiple."""
    side = args.resolution or default
    size = {"height": args.height or side, "width": args.width or side}
    for name, value in size.items():
        if value % multiple:
            flag = f"--{name}" if getattr(args, name) else "--resolution"
            raise UserError(f"{flag} {value} is not a multiple of {multiple}, which this model needs "
                            f"(VAE downsampling x patch size); try {max(multiple, round(value / multiple) * multiple)}")
    return size["height"], size["width"]


# ----------------------------------------------------------------------------- device and precision


# ----------------------------------------------------------------------------- LoRA


def resolve_lora_file(path: str) -> str:
    """The LoRA .safetensors file of --lora_path (a file, or a folder holding one)."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist (--lora_path)")
    if os.path.isfile(path):
        return path
    for name in LORA_FILE_NAMES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(found) == 1:
        return os.path.join(path, found[0])
    if found:
        raise UserError(f"{path} holds several .safetensors files ({', '.join(found)}): pass one of them (--lora_path)")
    raise UserError(f"{path} holds no LoRA .safetensors file (looked for {', '.join(LORA_FILE_NAMES)}) (--lora_path)")


def check_lora(path: str, base: str) -> None:
    """Read the LoRA file and check it against the base model's denoiser (names and shapes, no weights loaded),
    so a bad file is a one-line error before the pipeline is loaded."""
    from utils import lora_files

    try:
        lora_files.read_lora(path, lora_files.denoiser_skeleton(base, flag="--base_model_path")[0], text_encoders=True)
    except UserError as exc:
        raise UserError(f"{exc} (--lora_path)" if "(--" not in str(exc) else str(exc)) from None


def adapter_names(paths: Sequence[str]) -> list[str]:
    """A distinct adapter name per LoRA from its file or folder name (a recipe's standard file names: the folder's),
    e.g. results/demo/lcm-lora-sdxl -> lcm_lora_sdxl; a repeated name gets _2, _3, ..."""
    standard = {os.path.basename(n).removesuffix(".safetensors") for n in LORA_FILE_NAMES}
    names: list[str] = []
    for path in paths:
        parts = [p for p in os.path.normpath(path).split(os.sep) if p not in ("", ".")]
        while len(parts) > 1 and (parts[-1].removesuffix(".safetensors") in standard
                                  or parts[-1] in ("unet", "transformer")):
            parts.pop()
        stem = parts[-1].removesuffix(".safetensors") if parts else ""
        name = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_") or "lora"
        names.append(name if name not in names else
                     next(f"{name}_{k}" for k in itertools.count(2) if f"{name}_{k}" not in names))
    return names


def add_lora_adapter(pipe: Any, denoiser: Any, path: str, name: str) -> str:
    """Add the LoRA file (any format) to the UNet/transformer as adapter `name`; returns its format. A file that also
    holds a text-encoder LoRA (an LCM-LoRA trained with --train_text_encoder_lora) goes to the text encoders too,
    through the pipeline's own load_lora_weights."""
    from utils import lora_files

    try:
        raw = lora_files.read_safetensors(path)[0]
        denoiser_part = lora_files.without_text_encoders(raw)
        fmt = lora_files.detect_format(denoiser_part)
        with warnings.catch_warnings():  # a second adapter is what is asked for here: PEFT's warning says otherwise
            warnings.filterwarnings("ignore", message=".*multiple adapters.*", category=UserWarning)
            if len(denoiser_part) < len(raw):
                load_pipeline_lora(pipe, path, name)
            else:
                lora_files.load_lora_file(path, denoiser, adapter_name=name)
    except UserError as exc:
        raise UserError(f"{exc} (--lora_path)" if "(--" not in str(exc) else str(exc)) from None
    return fmt


def load_pipeline_lora(pipe: Any, path: str, name: str) -> None:
    """The LoRA of the denoiser and the text encoders in one file, loaded by diffusers into all of them as `name`."""
    try:
        pipe.load_lora_weights(path, adapter_name=name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"LoRA file {path} (denoiser and text encoders) could not be loaded: {first}") from None


def load_loras(pipe: Any, denoiser: Any, loras: Sequence[tuple[str, float]], fuse: bool = True,
               names: Sequence[str] | None = None) -> list[str]:
    """Add each (file, scale) as a named adapter (names: adapter_names of the files), give each its scale times its
    alpha/r through diffusers' set_adapters, and with `fuse` merge them all into the weights (W + sum_i s_i B_i A_i,
    the LoRA layers then removed); returns their formats."""
    from utils import lora

    names = list(names or adapter_names([path for path, _ in loras]))
    formats = [add_lora_adapter(pipe, denoiser, path, name) for (path, _), name in zip(loras, names)]
    pipe.set_adapters(names, adapter_weights=[float(scale) for _, scale in loras])
    if fuse:  # W + s B A once, instead of the rank-r branches in every step
        adapted = [c for c in pipe._lora_loadable_modules if getattr(pipe, c, None) is not None
                   and lora.has_lora(getattr(pipe, c))]
        pipe.fuse_lora(components=adapted, adapter_names=names)
        pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    return formats


DEMO_LORA_DIR = os.path.join(ROOT, "results", "demo", "tlcm-flux")  # demo.py's TLCM LoRA of the toy FLUX
DEMO_DONE_FILE = "adapter_model.safetensors"  # what demo.py checks to reuse that run: the LoRA is complete


def demo_lora() -> str | None:
    """The LoRA file `python demo.py` distilled for the toy FLUX, when a finished one is in DEMO_LORA_DIR."""
    if not os.path.isfile(os.path.join(DEMO_LORA_DIR, DEMO_DONE_FILE)):
        return None
    return resolve_lora_file(DEMO_LORA_DIR)


# ----------------------------------------------------------------------------- scheduler and guidance


def milestone_timesteps(steps: int, num_train_timesteps: int, scheduler: str) -> list[int]:
    """The published TLCM SDXL timesteps for `steps` (1-8), or a one-line error naming the flags."""
    from utils.scheduling_tlcm import tlcm_timesteps

    try:
        return [int(t) for t in tlcm_timesteps(steps, num_train_timesteps)]
    except ValueError:
        raise UserError(f"--scheduler {scheduler} on SD/SDXL takes --infer-steps 1..8 "
                        f"(the published milestone subsets), got {steps}") from None


def set_scheduler(pipe: Any, arch: str, name: str, steps: int, renoise: str | None,
                  eta: float | None = None) -> dict[str, Any]:
    """Install the --scheduler (utils/samplers.py) on the pipeline; returns the step kwargs of the pipeline call
    (with TCD's eta, --eta or its default)."""
    set_sampler(pipe, name, arch, renoise)
    if uses_milestones(name, arch):  # given explicitly, so the PNG metadata records them
        return {"timesteps": milestone_timesteps(steps, pipe.scheduler.config.num_train_timesteps, name)}
    return {"num_inference_steps": steps, **step_kwargs(name, eta)}


def default_guidance(arch: str, pipe: Any, scheduler: str, has_lora: bool) -> float:
    """The guidance scale used when --guidance_scale is not given (paras.GUIDANCE_HELP explains it)."""
    if arch == "flux":
        if pipe.transformer.config.get("guidance_embeds", False):
            return 3.5  # FluxPipeline's default and train_tlcm_flux.py's --teacher_guidance
        return 1.0 if has_lora else 5.0
    if scheduler in FEW_STEP_SCHEDULERS:
        return 7.5 if pipe.unet.config.get("time_cond_proj_dim") is not None else 0.0
    return 7.5 if arch == "sd" else 5.0


def guidance_mode(arch: str, pipe: Any, scale: float) -> str:
    """How the guidance scale enters the model: cfg, true-cfg, input, w-embedding or none."""
    if arch == "flux":
        if pipe.transformer.config.get("guidance_embeds", False):
            return "input"
        return "true-cfg" if scale > 1.0 else "none"
    if pipe.unet.config.get("time_cond_proj_dim") is not None:
        return "w-embedding"
    return "cfg" if scale > 1.0 else "none"


def call_kwargs(pipe: Any, scale: float, mode: str, negative_prompt: str | None, n: int) -> dict[str, Any]:
    """Pipeline kwargs for the guidance (and negative prompt) of one batch of n images."""
    from utils.eval_sampling import guidance_kwargs

    kwargs = guidance_kwargs(pipe, scale, n)
    if negative_prompt is not None and mode in ("cfg", "true-cfg"):
        kwargs["negative_prompt"] = [negative_prompt] * n
    return kwargs


# ----------------------------------------------------------------------------- output


OWN_PNG = re.compile(r".+-seed\d+-\d+steps(-\d+)?\.png")  # the names write_png gives


def prepare_output_dir(args: argparse.Namespace, base: str, loras: list[tuple[str, str, float]]) -> None:
    """The output rule (utils/outputs.py) for --output_dir: not an input (the base model, every LoRA, the prompts),
    not a folder of others' files unless --overwrite; created, writable; SIGTERM / Ctrl-C from here on end with one
    line. A folder it creates and leaves without an image is removed at exit (outputs.release)."""
    inputs = {"--base_model_path": base, "--lora_path": [path for path, _, _ in loras],
              "--prompts_file": args.prompts_file}
    outputs.prepare_output(args.output_dir, "--output_dir", inputs, "inference.py", args.overwrite,
                           own=OWN_PNG.fullmatch)  # its images from before the marker are its own


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "image"


def png_info(settings: dict[str, Any]) -> Any:
    """PIL PngInfo with each setting as a text chunk, all of them as JSON, and an A1111-style line."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in settings.items():
        if value is not None:
            info.add_text(key, value if isinstance(value, str) else json.dumps(value), zip=False)
    info.add_text("settings", json.dumps(settings))
    neg = f"\nNegative prompt: {settings['negative_prompt']}" if settings.get("negative_prompt") else ""
    line = (f"Steps: {settings['steps']}, Sampler: {settings['scheduler']}, CFG scale: {settings['guidance_scale']}, "
            f"Seed: {settings['seed']}, Size: {settings['width']}x{settings['height']}, "
            f"Model: {settings['base_model']}, Lora: {settings['lora']}")
    info.add_text("parameters", f"{settings['prompt']}{neg}\n{line}")
    info.add_text("Software", SOFTWARE)
    return info


def lora_settings(loras: list[tuple[str, str, float]], names: list[str], formats: list[str]) -> dict[str, Any]:
    """The PNG metadata of the LoRAs: `loras`, one {path, file, format, scale, adapter} each, and the flat keys
    `lora` (the paths, or "none"), `lora_file`, `lora_format`, `lora_scale` (a value for one LoRA, a list for more)."""
    rows = [{"path": path, "file": file, "format": fmt, "scale": scale, "adapter": name}
            for (path, file, scale), name, fmt in zip(loras, names, formats)]
    flat = {key: [row[key] for row in rows] for key in ("file", "format", "scale")}
    if len(rows) == 1:
        flat = {key: value[0] for key, value in flat.items()}
    elif not rows:
        flat = dict.fromkeys(flat)
    return {"lora": ", ".join(row["path"] for row in rows) or "none", "lora_file": flat["file"],
            "lora_format": flat["format"], "lora_scale": flat["scale"], "loras": rows}


def write_png(image: Any, out_dir: str, stem: str, settings: dict[str, Any]) -> str:
    """Save as the first free `stem[-k].png`, written under a temporary name first; never overwrites."""
    for k in range(100000):
        final = os.path.join(out_dir, f"{stem}.png" if k == 0 else f"{stem}-{k}.png")
        if os.path.exists(final):
            continue
        try:
            with files.atomic_write(final, overwrite=False) as tmp:
                image.save(tmp, format="PNG", pnginfo=png_info(settings))
            return final
        except FileExistsError:  # another process took the name meanwhile
            continue
    raise UserError(f"no free file name for {stem}.png in {out_dir} (--output_dir)")


# ----------------------------------------------------------------------------- main


def load_pipeline(path: str, dtype: Any, variant: str | None, revision: str | None) -> Any:
    """DiffusionPipeline.from_pretrained, library errors as one line."""
    import transformers
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from utils.models import load_pretrained

    diffusers_logging.disable_progress_bar()  # the per-component loading bars; sampling keeps its bar
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # notes about optional image-processor backends
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        return load_pretrained(DiffusionPipeline, path, "--base_model_path", torch_dtype=dtype, variant=variant,
                                revision=revision)


def enable_attention(pipe: Any, requested: bool, device: Any, console: Console) -> None:
    """xformers attention when asked, on CUDA with xformers installed; PyTorch SDPA otherwise (with a warning)."""
    if not requested:
        return
    if device.type != "cuda":
        console.warn("--enable_xformers_memory_efficient_attention: not on a CUDA device; using PyTorch SDPA attention")
        return
    from utils.models import enable_xformers

    try:
        enable_xformers(pipe, True)
    except (ValueError, NotImplementedError, RuntimeError, ModuleNotFoundError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        console.warn(f"--enable_xformers_memory_efficient_attention failed ({first}); using PyTorch SDPA attention")


def run(args: argparse.Namespace, console: Console) -> list[str]:
    """Everything after flag parsing; returns the written PNG paths. Bad input raises UserError."""
    from utils.eval_sampling import resolve_device, resolve_dtype  # torch: imported once the flags are good
    from utils.models import ARCHITECTURES, require_architecture

    base = args.base_model_path or default_base_model(console)
    arch = require_architecture(base, ARCHITECTURES, flag="--base_model_path", revision=args.revision)
    scheduler = args.scheduler or DEFAULT_SCHEDULER[arch]
    check_sampler(scheduler, arch)
    if args.renoise is not None and scheduler != "tlcm":
        raise UserError(f"--renoise applies to --scheduler tlcm only, not {scheduler}")
    renoise = args.renoise or SAMPLERS[scheduler].renoise
    step_kwargs(scheduler, args.eta)  # --eta on a sampler without one: fail before loading anything
    if uses_milestones(scheduler, arch):
        milestone_timesteps(args.infer_steps, 1000, scheduler)  # 1..8 steps: fail before loading anything
    default_side, multiple = image_geometry(base, arch, args.revision)
    height, width = image_size(args, default_side, multiple)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, arch, device)
    loras = [(path, resolve_lora_file(path), scale) for path, scale in args.loras]
    demo = demo_lora() if not loras and args.base_model_path is None else None
    if demo is not None:
        console.note(f"no --lora_path: loading the LoRA the demo distilled for this base, {demo} (to sample the base "
                     "model alone, pass --base_model_path)")
        loras = [(DEMO_LORA_DIR, demo, 1.0)]
    for _, lora_file, _ in loras:
        check_lora(lora_file, base)
    if not loras:
        hint = "" if args.scheduler or scheduler not in FEW_STEP_SCHEDULERS else (
            f"; {scheduler} is a sampler for distilled models, the base model's own is --scheduler "
            + ("flow-euler" if arch == "flux" else "euler, ddim or dpm++"))
        console.note(f"no --lora_path: sampling the base model alone{hint}")
    elif not DISTILLED_STEPS[0] <= args.infer_steps <= DISTILLED_STEPS[1] and scheduler in FEW_STEP_SCHEDULERS:
        console.warn(f"--infer-steps {args.infer_steps} is outside {DISTILLED_STEPS[0]}..{DISTILLED_STEPS[1]}, "
                     "the range LCM/TLCM LoRAs are made for")
    if args.prompts_file:
        from utils.data import load_prompts

        prompts = load_prompts(prompts_file=args.prompts_file)
    else:
        prompts = [args.prompt if args.prompt is not None else DEFAULT_PROMPT]
    prepare_output_dir(args, base, loras)
    return _generate(args, console, base, arch, scheduler, renoise, height, width, device, dtype, loras, prompts, [])


def _generate(args: argparse.Namespace, console: Console, base: str, arch: str, scheduler: str, renoise: str | None,
              height: int, width: int, device: Any, dtype: Any, loras: list[tuple[str, str, float]],
              prompts: list[str], written: list[str]) -> list[str]:
    """Load the pipeline and LoRA(s) ((given path, file, scale) each), sample every (prompt, seed) in batches and write the PNGs into `written`."""
    import torch

    pipe = load_pipeline(base, dtype, args.variant, args.revision)
    denoiser = pipe.transformer if arch == "flux" else pipe.unet
    names = adapter_names([path for path, _, _ in loras])
    formats = load_loras(pipe, denoiser, [(f, scale) for _, f, scale in loras], args.fuse_lora, names) if loras else []
    extra = set_scheduler(pipe, arch, scheduler, args.infer_steps, renoise, args.eta)
    guidance = args.guidance_scale if args.guidance_scale is not None else \
        default_guidance(arch, pipe, scheduler, bool(loras))
    mode = guidance_mode(arch, pipe, guidance)
    if args.negative_prompt is not None and mode not in ("cfg", "true-cfg"):
        console.warn(f"--negative_prompt is ignored: guidance {guidance} runs no CFG here ({mode})")
    pipe.to(device)
    enable_attention(pipe, args.enable_xformers_memory_efficient_attention, device, console)
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)

    settings_base = {
        "steps": args.infer_steps, "scheduler": scheduler, "scheduler_class": type(pipe.scheduler).__name__,
        "timesteps": extra.get("timesteps"), "renoise": renoise, "eta": extra.get("eta"),
        "guidance_scale": guidance, "guidance": mode, "base_model": base, "architecture": arch,
        **lora_settings(loras, names, formats), "lora_fused": bool(loras and args.fuse_lora),
        "height": height, "width": width,
        "dtype": str(dtype).replace("torch.", ""), "device": device.type,
    }
    items = [(p, args.seed + i) for p in prompts for i in range(args.num_images)]
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    for start in range(0, len(items), args.batch_size):
        chunk = items[start:start + args.batch_size]
        # One generator per image, so image i depends on seed + i only (not on --batch_size): it draws the
        # initial noise and then any fresh noise of the sampler. FluxPipeline does not hand its generator
        # to scheduler.step, so the TLCM scheduler is given it directly.
        generators = [torch.Generator().manual_seed(seed) for _, seed in chunk]
        if hasattr(pipe.scheduler, "set_noise_generator"):
            pipe.scheduler.set_noise_generator(generators)
        torch.manual_seed(chunk[0][1])  # for any other sampler that draws from the global RNG
        kwargs = dict(call_kwargs(pipe, guidance, mode, args.negative_prompt, len(chunk)), **extra)
        try:
            with torch.inference_mode():
                images = pipe(prompt=[p for p, _ in chunk], height=height, width=width, generator=generators,
                              output_type="pil", **kwargs).images
        except oom:
            raise UserError(f"out of GPU memory at --batch_size {args.batch_size}, {width}x{height}: lower "
                            "--batch_size or --resolution, or use --dtype fp16/bf16") from None
        for (prompt, seed), image in zip(chunk, images):
            settings = {"prompt": prompt, "negative_prompt": args.negative_prompt, "seed": seed, **settings_base}
            stem = f"{slug(prompt)}-seed{seed}-{args.infer_steps}steps"
            written.append(write_png(image, args.output_dir, stem, settings))
            print(written[-1], flush=True)
    return written


def main(argv: Sequence[str] | None = None, console_factory: Callable[[bool], Console] = Console) -> list[str]:
    """Parse the flags and sample; returns the written PNG paths (bad input: one line on stderr, exit 2)."""
    args = parse_args(argv)
    outputs.handle_stop_signals()  # SIGTERM / Ctrl-C while the libraries and the pipeline load: one line
    with user_errors():
        return run(args, console_factory(args.quiet))


if __name__ == "__main__":
    atexit.register(gc.freeze)  # at exit the libraries and the pipeline are still alive: the exit need not scan them
    main()
