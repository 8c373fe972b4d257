"""Convert, merge and export LoRAs of a diffusers UNet or FLUX transformer.

    python convert_lora.py convert LORA --to kohya --base_model BASE --output_path out.safetensors
    python convert_lora.py merge LORA --base_model BASE --output_dir merged/ [--denoiser_only]
    python convert_lora.py from-checkpoint out/checkpoint-500 --base_model BASE --output_dir final/

LORA is a .safetensors file in any of the three formats (diffusers `pytorch_lora_weights.safetensors`, PEFT
`adapter_model.safetensors` + `adapter_config.json`, kohya/ComfyUI/A1111 `lora_unet_...` keys) or a folder
holding one (a LoRA recipe's --output_dir works too). BASE is the diffusers pipeline folder the LoRA belongs
to: its denoiser's module names turn kohya's flattened names back into real ones, and every tensor's shape is
checked against it. The alpha conventions of the three formats are documented at the top of utils/lora_files.py;
conversions keep the LoRA's output unchanged and round trips give back identical tensors.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

from utils import checkpoint, flags, lora, lora_files, models, outputs
from utils.errors import UserError, user_errors

_NAMED = re.compile(r"\((--[\w-]+|[A-Z]+)\)")  # a message that already names its flag or positional argument
SAVE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PROGRAM = "convert_lora.py"  # as its folder outputs' marker names it (utils/outputs.py)


def parse_args(argv: list[str] | None = None):
    parser = flags.Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{convert,merge,from-checkpoint}")

    def base_flags(p):
        p.add_argument("--base_model", required=True,
                       help="diffusers pipeline folder (or hub id) the LoRA belongs to: SD/SDXL UNet or FLUX transformer")
        p.add_argument("--overwrite", action="store_true",
                       help="replace the output if it already exists (into a folder: the files of the names written "
                            "are replaced, the others kept); an output that is, holds or lies in an input is refused "
                            "even so")

    c = sub.add_parser("convert", help="a LoRA in one format -> another format",
                       description="Rewrite a LoRA (any format) as diffusers, PEFT or kohya; outputs are unchanged.")
    c.add_argument("lora", help="LoRA .safetensors file (any format) or a folder holding one")
    c.add_argument("--to", required=True, choices=lora_files.FORMATS,
                   help="target format: diffusers (pipe.load_lora_weights), peft (PeftModel.from_pretrained "
                        "folder, lora_alpha 8) or kohya (ComfyUI / A1111 key names, .alpha kept)")
    c.add_argument("--output_path", required=True,
                   help="where to write: a .safetensors file, or a folder (diffusers: FOLDER/pytorch_lora_weights."
                        "safetensors, kohya: FOLDER/lora_kohya.safetensors; peft always writes a folder)")
    base_flags(c)

    m = sub.add_parser("merge", help="base pipeline + LoRA -> a pipeline with the LoRA merged into its weights",
                       description="Fuse a LoRA (any format) into the base denoiser and save a diffusers pipeline.")
    m.add_argument("lora", help="LoRA .safetensors file (any format) or a folder holding one")
    m.add_argument("--output_dir", required=True, help="folder to write: a full pipeline (DiffusionPipeline."
                                                       "from_pretrained(OUT)), or with --denoiser_only the model folder")
    m.add_argument("--denoiser_only", action="store_true",
                   help="save only the merged UNet / FLUX transformer (UNet2DConditionModel.from_pretrained(OUT))")
    m.add_argument("--save_dtype", default="fp32", choices=list(SAVE_DTYPES),
                   help="dtype of the saved weights; the merge itself is computed in fp32 (default: %(default)s)")
    base_flags(m)

    k = sub.add_parser("from-checkpoint", help="a training checkpoint (out/checkpoint-N) -> the recipe's final outputs",
                       description="Export a checkpoint of train_lcm_distill_lora_sdxl.py (LoRA: diffusers file, "
                                   "PEFT folder, kohya file, as the recipe's final save writes them) or of "
                                   "train_lcm_distill_sd.py (full model: an LCM pipeline folder or the UNet alone).")
    k.add_argument("checkpoint", help="checkpoint folder written during training, e.g. out/checkpoint-500")
    k.add_argument("--output_dir", required=True, help="folder to write the outputs to")
    k.add_argument("--lora_alpha", type=float, default=lora.DEFAULT_LORA_ALPHA,
                   help="LoRA checkpoints: the run's --lora_alpha (checkpoints do not record it; default: %(default)s)")
    k.add_argument("--lora_target_modules", default="auto",
                   help='LoRA checkpoints: the run\'s --lora_target_modules ("lcm", "diffusers", "flux" or a comma '
                        'list); "auto" picks the preset that adapts exactly the checkpoint\'s modules (default)')
    k.add_argument("--lora_dropout", type=float, default=0.0,
                   help="LoRA checkpoints: the run's --lora_dropout, recorded in adapter_config.json (default: 0)")
    k.add_argument("--ema", action="store_true",
                   help="full-model checkpoints: export the EMA target network instead of the online student")
    k.add_argument("--denoiser_only", action="store_true",
                   help="full-model checkpoints: write only the UNet / transformer folder, not a whole pipeline")
    k.add_argument("--num_ddim_timesteps", type=int, default=50,
                   help="UNet checkpoints (full or LoRA): the run's --num_ddim_timesteps, for the LCMScheduler "
                        "(default: 50)")
    k.add_argument("--timestep_scaling_factor", type=float, default=10.0,
                   help="UNet checkpoints (full or LoRA): the run's --timestep_scaling_factor, for the LCMScheduler "
                        "(default: 10)")
    base_flags(k)
    return parser.parse_args(argv)


@contextmanager
def naming(what: str) -> Iterator[None]:
    """Append `(what)`, the argument at fault, to a UserError raised inside the block that names none."""
    try:
        yield
    except UserError as exc:
        message = str(exc)
        raise UserError(message if _NAMED.search(message) else f"{message} ({what})") from None


def convert(args) -> None:
    with naming("--output_path"):
        target = lora_files.output_path(args.output_path, args.to)
        lora_files.check_output(target, args.overwrite)
    model, component = lora_files.denoiser_skeleton(args.base_model)
    with naming("LORA"):
        sd, alphas, fmt = lora_files.read_lora(args.lora, model)
    targets = lora.infer_targets(set(lora_files.lora_ranks(sd)), model) if args.to == "peft" else None
    with lora_files.staged_output(target, args.overwrite, PROGRAM) as tmp:
        lora_files.write_lora(sd, alphas, args.to, tmp, component, targets)
    print(f"{fmt} -> {args.to}: {target}")


def load_pipeline(path: str):
    """The base pipeline (checked first, so a wrong folder is a one-line error) and its denoiser's name."""
    from diffusers import DiffusionPipeline

    component = "transformer" if models.detect_architecture(path, flag="--base_model") == "flux" else "unet"
    return models.load_pretrained(DiffusionPipeline, path, "--base_model"), component


def merge(args) -> None:
    import torch

    with naming("--output_dir"):
        lora_files.check_output(args.output_dir, args.overwrite)
    with naming("LORA"):  # bad input fails before the big load
        lora_files.read_lora(args.lora, lora_files.denoiser_skeleton(args.base_model)[0])
    if args.denoiser_only:
        pipe, merged = None, models.load_denoiser(args.base_model, flag="--base_model")
    else:
        pipe, component = load_pipeline(args.base_model)
        merged = getattr(pipe, component)
    merged = merged.to(torch.float32)  # the merge runs in fp32 even when the base is stored in fp16
    lora_files.load_lora_file(args.lora, merged)
    merged = lora.merge_lora(merged)
    if pipe is not None:
        pipe.register_modules(**{component: merged})
    saved = merged if pipe is None else pipe
    if args.save_dtype != "fp32":
        saved.to(getattr(torch, SAVE_DTYPES[args.save_dtype]))
    with lora_files.staged_output(args.output_dir, args.overwrite, PROGRAM) as tmp:
        saved.save_pretrained(tmp)
    print(f"merged {args.lora} into {args.base_model}: {args.output_dir}")


def denoiser_from_state(base_model: str, component: str, state: dict):
    """The base pipeline's denoiser class and config (plus the LCM guidance input if the state has one) with `state`."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    cls = FluxTransformer2DModel if component == "transformer" else UNet2DConditionModel
    config = models.load_config(cls, base_model, component, None, "--base_model")
    cond = state.get("time_embedding.cond_proj.weight")
    if component == "unet" and cond is not None:
        config["time_cond_proj_dim"] = int(cond.shape[1])
    model = cls.from_config(config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise UserError(f"the checkpoint's weights do not fit the {component} of {base_model} (--base_model): "
                        f"{str(exc).strip().splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise UserError(f"the checkpoint's weights do not fit the {component} of {base_model} ({len(missing)} "
                        f"missing, {len(unexpected)} unexpected keys; another architecture?) (--base_model)")
    return model


def from_checkpoint(args) -> None:
    checkpoint.check_checkpoint(args.checkpoint, "CHECKPOINT")
    with naming("--output_dir"):
        lora_files.check_output(args.output_dir, args.overwrite)
    with naming("CHECKPOINT"):
        state = checkpoint.read_model_state(args.checkpoint)
    component = "transformer" if models.detect_architecture(args.base_model, flag="--base_model") == "flux" else "unet"
    lora_sd = lora_files.checkpoint_lora_state(state)
    if lora_sd:
        if args.ema or args.denoiser_only:
            raise UserError(f"{args.checkpoint} holds a LoRA: --ema and --denoiser_only are for full-model checkpoints")
        model = models.load_denoiser(args.base_model, flag="--base_model")
        if args.lora_target_modules == "auto":
            targets = lora.infer_targets(set(lora_files.lora_ranks(lora_sd)), model)
        else:
            targets = lora.resolve_targets(args.lora_target_modules)
        lora_files.add_lora_from_state(model, lora_sd, args.lora_alpha, targets, args.lora_dropout)
        encoders = encoders_with_lora(args)
        # train_lcm_distill_lora_sdxl.py keeps the PEFT folder in out/unet; FLUX LoRA runs keep it in out/.
        with lora_files.staged_output(args.output_dir, args.overwrite, PROGRAM) as tmp:
            lora_files.save_lora_outputs(model, tmp, component, None if component == "unet" else tmp,
                                         text_encoders=encoders)
            if component == "unet":  # as train_lcm_distill_lora_sdxl.py: the LCMScheduler of the training grid
                from utils.scheduling_lcm import lcm_scheduler

                config = models.load_noise_scheduler_config(args.base_model, flag="--base_model")
                scheduler = lcm_scheduler(config, args.num_ddim_timesteps, args.timestep_scaling_factor)
                scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
        with_encoders = f"; with the LoRA of {', '.join(encoders)}" if encoders else ""
        print(f"LoRA of {args.checkpoint} (rank {max(lora_files.lora_ranks(lora_sd).values())}{with_encoders}): "
              f"{args.output_dir}")
        return
    if args.ema:
        names = set(state)
        found = [s for s in checkpoint.read_registered_states(args.checkpoint) if isinstance(s, dict) and set(s) == names]
        if not found:
            raise UserError(f"{args.checkpoint} holds no EMA copy of the model (--ema)")
        state = found[0]
    student = denoiser_from_state(args.base_model, component, state)
    with lora_files.staged_output(args.output_dir, args.overwrite, PROGRAM) as tmp:
        if args.denoiser_only:
            student.save_pretrained(tmp)
        else:
            save_pipeline(args, student, component, tmp)
    print(f"{'EMA target' if args.ema else 'student'} of {args.checkpoint}: {args.output_dir}")


def encoders_with_lora(args) -> dict:
    """{folder name: text encoder with its LoRA} of a checkpoint of train_lcm_distill_lora_sdxl.py
    --train_text_encoder_lora, whose prepared models 1 and 2 are the text encoders; {} for any other checkpoint."""
    states = {}
    for index, name in enumerate(("text_encoder", "text_encoder_2"), start=1):
        if not checkpoint.holds_model(args.checkpoint, index):
            break
        with naming("CHECKPOINT"):
            states[name] = lora_files.checkpoint_lora_state(checkpoint.read_model_state(args.checkpoint, index))
    if not any(states.values()):
        return {}
    _, encoders = models.load_text_encoders(args.base_model, flag="--base_model")
    if len(encoders) != len(states):
        raise UserError(f"{args.checkpoint} holds {len(states)} text encoder(s), {args.base_model} has "
                        f"{len(encoders)} (--base_model)")
    for sd, encoder in zip(states.values(), encoders):
        targets = lora.infer_targets(set(lora_files.lora_ranks(sd)), encoder)
        lora_files.add_lora_from_state(encoder, sd, args.lora_alpha, targets, args.lora_dropout)
    return dict(zip(states, encoders))


def save_pipeline(args, student, component: str, out_dir: str) -> None:
    """The base pipeline with the checkpoint's denoiser; a UNet student gets train_lcm_distill_sd.py's LCMScheduler."""
    import torch

    from utils.scheduling_lcm import lcm_scheduler

    pipe, _ = load_pipeline(args.base_model)
    pipe.register_modules(**{component: student})
    if component == "unet":
        config = models.load_noise_scheduler_config(args.base_model, flag="--base_model")
        pipe.register_modules(scheduler=lcm_scheduler(config, args.num_ddim_timesteps, args.timestep_scaling_factor))
    pipe.to(torch.float32)  # as the recipe saves it
    pipe.save_pretrained(out_dir)


def check_numbers(args) -> None:
    """from-checkpoint's numbers are written into the outputs (adapter_config.json, the scheduler): refuse the
    values no run could have trained with, naming the flag."""
    if args.command != "from-checkpoint":
        return
    if args.lora_alpha <= 0:
        raise UserError(f"--lora_alpha must be positive, got {args.lora_alpha}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UserError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if not 1 <= args.num_ddim_timesteps <= 1000:
        raise UserError(f"--num_ddim_timesteps must be in 1..1000, got {args.num_ddim_timesteps}")
    if args.timestep_scaling_factor <= 0:
        raise UserError(f"--timestep_scaling_factor must be positive, got {args.timestep_scaling_factor}")


COMMANDS = {"convert": convert, "merge": merge, "from-checkpoint": from_checkpoint}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    outputs.handle_stop_signals()  # SIGTERM / Ctrl-C while the libraries and the models load: one line
    import diffusers
    import transformers

    for library in (diffusers, transformers):  # stderr is for errors: no per-file loading bars or cast notes
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    with user_errors():  # bad input anywhere ends as one line on stderr, exit code 2
        for flag in ("lora", "checkpoint"):
            path = getattr(args, flag, None)
            if path is not None and not os.path.exists(path):
                raise UserError(f"{path} does not exist ({flag.upper()})")
        check_numbers(args)
        # the output rule (utils/outputs.py): never over, into or around an input, even with --overwrite; an
        # existing output is replaced only with --overwrite, and then a folder keeps the files of other names
        output, flag = (args.output_path, "--output_path") if args.command == "convert" else (args.output_dir,
                                                                                           "--output_dir")
        inputs = {"LORA": getattr(args, "lora", None), "CHECKPOINT": getattr(args, "checkpoint", None),
                  "--base_model": args.base_model}
        outputs.prepare_output(output, flag, inputs, PROGRAM, args.overwrite, folder=False)
        if os.path.isfile(output) and (args.command != "convert" or args.to == "peft"):
            raise UserError(f"{output} is a file; {args.command} writes a folder there ({flag})")
        COMMANDS[args.command](args)


if __name__ == "__main__":
    gc.freeze()  # the imported libraries live until exit: the collector, and the exit, need not scan them
    main()
