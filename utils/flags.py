"""Command-line flags the recipes share: one-line errors, the flag groups, and their checks.

Every check runs before a model is loaded, and names the flag it is about.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

import torch

from . import outputs
from .errors import fail, user_errors

PRECISIONS = ("no", "fp16", "bf16")
TLCM_STAGES = {"1": ["1"], "2": ["2"], "extras": ["extras"], "all": ["1", "2"]}
RESOLUTION_HELP = ("the teacher's own size, read from its config: UNet sample_size x the VAE's downsampling, 512 for "
                   "SD 1.5, 768 for SD 2.x-768, 1024 for SDXL; FLUX: its VAE's sample_size, 1024)")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line, `error: ...`, exit status 2 (no usage dump), with the recipes'
    flag groups (`add_*_args`) and their checks (`check`, after the recipe has filled in its own defaults)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.checks: dict[str, Callable[[argparse.Namespace], None]] = {}

    def error(self, message: str) -> None:  # type: ignore[override]
        fail(message)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        """argparse's, plus: a number flag (type=float) must be finite: nan and inf are refused naming the flag."""
        parsed, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(parsed, action.dest, None)
            values = value if isinstance(value, list) else [value]
            if action.type is float and any(isinstance(v, float) and not math.isfinite(v) for v in values):
                self.error(f"{action.option_strings[0]} must be a finite number, got {value}")
        return parsed, extras

    def check(self, args: argparse.Namespace) -> argparse.Namespace:
        """Run the checks of the flag groups this parser has, in a fixed order (TLCM fills what training checks)."""
        for group in ("lcm", "tlcm", "lora"):
            if group in self.checks:
                self.checks[group](args)
        resolve_resolution(args)  # before the training checks, which create the output folder
        if "training" in self.checks:
            self.checks["training"](args)
        return args

    def add_teacher_args(self, teacher_help: str, uncond: bool = True) -> argparse._ArgumentGroup:
        """The teacher and its VAE (hub id or folder, same code path), and (uncond) the unconditional input of its
        CFG; returns the group for recipe extras."""
        m = self.add_argument_group("models")
        m.add_argument("--pretrained_teacher_model", required=True, help=teacher_help)
        if uncond:
            m.add_argument("--uncond", default="auto", choices=["auto", "zeros", "empty"],
                           help="the teacher's unconditional CFG input: all-zero embeddings, the empty prompt's "
                                "encoding, or auto: what the teacher's pipeline feeds for an empty negative prompt "
                                "(SDXL: zeros, unless its model_index.json sets force_zeros_for_empty_prompt to "
                                "false; SD 1.x/2.x: the empty prompt) (default: %(default)s)")
        m.add_argument("--pretrained_vae_model_name_or_path", default=None,
                       help="a separate VAE (hub id or folder, e.g. an fp16-fix VAE) instead of the teacher's own")
        m.add_argument("--revision", default=None, help="revision of the teacher on the hub")
        m.add_argument("--variant", default=None, help='weights variant of the teacher, e.g. "fp16"')
        m.add_argument("--vae_encode_batch_size", type=int, default=32,
                       help="images per VAE encode call (filling the --cache_latents cache: at most --train_batch_size)")
        return m

    def add_data_args(self, resolution: int | None = None) -> None:
        """Image+caption data: one of three sources, columns, size, crop and flip, caption dropout.

        resolution=None: the teacher's own size, read from its config by `check` (resolve_resolution)."""
        d = self.add_argument_group("data")
        d.add_argument("--dataset_name", default=None, help="a `datasets` hub id or local dataset folder")
        d.add_argument("--train_data_dir", default=None, help="an imagefolder (images + metadata.jsonl with captions)")
        d.add_argument("--train_shards_path_or_url", default=None, help="webdataset .tar shards: path, glob or {a..b}")
        d.add_argument("--image_column", default="image", help="image column of the dataset (default: %(default)s)")
        d.add_argument("--caption_column", default="text", help="caption column of the dataset (default: %(default)s)")
        d.add_argument("--max_train_samples", type=int, default=None, help="use only the first N samples")
        d.add_argument("--cache_dir", default=None, help="`datasets` cache folder")
        d.add_argument("--resolution", type=int, default=resolution,
                       help="training image side in pixels (default: " + (
                           RESOLUTION_HELP if resolution is None else "%(default)s)"))
        d.add_argument("--center_crop", action="store_true", help="center crop (default: random crop)")
        d.add_argument("--random_flip", action="store_true", help="random horizontal flips")
        d.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                       help="fraction of captions replaced by the empty prompt")

    def add_lcm_args(self, w_min: float | None, w_max: float) -> argparse._ArgumentGroup:
        """Latent consistency distillation: skip grid, guidance range, distance, boundary scaling.

        w_min=None: the recipe picks the teacher family's (5 for SD, 3 for SDXL)."""
        self.checks["lcm"] = check_lcm_args
        from .losses import LOSS_TYPES

        a = self.add_argument_group("latent consistency distillation")
        a.add_argument("--num_ddim_timesteps", type=int, default=50, help="N, points of the skip grid (default: %(default)s)")
        a.add_argument("--w_min", type=float, default=w_min,
                       help="smallest guidance scale w (LCM convention, CFG = w + 1; default: " + (
                           "5 for SD, 3 for SDXL)" if w_min is None else "%(default)s)"))
        a.add_argument("--w_max", type=float, default=w_max, help="largest guidance scale w (default: %(default)s)")
        a.add_argument("--loss_type", default="l2", choices=LOSS_TYPES, help="distance d (default: %(default)s)")
        a.add_argument("--huber_c", type=float, default=0.001, help="c of the pseudo-Huber loss")
        a.add_argument("--timestep_scaling_factor", type=float, default=10.0,
                       help="c in c_skip/c_out: larger makes the boundary condition sharper (default: %(default)s)")
        return a

    def add_lora_args(self, group: argparse._ArgumentGroup, default_targets: str, targets_help: str,
                      presets: tuple[str, ...]) -> None:
        """The LoRA of the LoRA recipes: rank, alpha, dropout, target modules (`presets` or a list), an EMA target."""
        self.checks["lora"] = lambda args: check_lora_args(args, presets)
        from .lora import DEFAULT_LORA_ALPHA

        group.add_argument("--lora_rank", type=int, default=64, help="LoRA rank r (default: %(default)s)")
        group.add_argument("--lora_alpha", type=float, default=DEFAULT_LORA_ALPHA,
                           help="LoRA alpha; scale = alpha / r. 8 is PEFT's default, so the published loading snippet "
                                "(LoraConfig(r=...) without alpha) loads our files with the trained scale. diffusers' "
                                "LCM-LoRA script uses alpha = r (64, scale 1): at one --learning_rate our default "
                                "moves the LoRA about 1/8 as far per step (its 1e-4 is about our 8e-4; on the toy "
                                "world 1e-4 at alpha 8 did better, docs/lcm.md) (default: %(default)s)")
        group.add_argument("--lora_dropout", type=float, default=0.0, help="dropout inside the LoRA layers")
        group.add_argument("--lora_dtype", default="fp32", choices=("fp32", "bf16"),
                           help="dtype of the trained LoRA weights, their gradients, Adam moments and EMA shadow. fp32: "
                                "master weights as in usual mixed precision; bf16 (needs --mixed_precision bf16, one "
                                "process or DDP): half the LoRA's training state, as diffusers' LCM-LoRA script holds "
                                "it under bf16; updates smaller than bf16's precision are lost (docs/memory.md) "
                                "(default: %(default)s)")
        group.add_argument("--lora_target_modules", default=default_targets, help=targets_help)
        group.add_argument("--ema_decay", type=float, default=0.0,
                           help="target = EMA of the LoRA with this decay (0: the online student under stop-grad, as "
                                "published; default: %(default)s)")

    def add_training_args(self, image_recipe: bool = True, lora_recipe: bool = True,
                          per_stage: bool = False) -> None:
        """Flags of the optimisation loop, precision, checkpointing, logging (diffusers-example names) and speed-ups.

        per_stage: the recipe sets steps and learning rates per stage (TLCM), so say so in the loop's flags' help.
        """
        self.checks["training"] = check_training_args
        g = self.add_argument_group("training")
        g.add_argument("--output_dir", default="out", help="where checkpoints, logs and the result go (default: %(default)s)")
        g.add_argument("--overwrite_output_dir", action="store_true",
                       help="start over in an --output_dir holding an earlier run: its checkpoints are deleted (TLCM: the "
                            "folders of the stages to run), its final files replaced when this run ends")
        g.add_argument("--seed", type=int, default=0, help="seed of everything random: init, data order, noise")
        g.add_argument("--train_batch_size", type=int, default=16, help="batch size per process (default: %(default)s)")
        g.add_argument("--max_train_steps", type=int, default=None,
                       help="optimizer steps to run; overrides --num_train_epochs when given")
        g.add_argument("--num_train_epochs", type=int, default=1, help="epochs to run if --max_train_steps is not given")
        g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
        g.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute activations in the backward pass: less memory, about 30%% slower")
        g.add_argument("--learning_rate", type=float, default=1e-6, help="peak learning rate (default: %(default)s)")
        g.add_argument("--scale_lr", action="store_true",
                       help="multiply the learning rate by batch size x accumulation x processes")
        g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="learning-rate schedule")
        g.add_argument("--lr_warmup_steps", type=int, default=500, help="linear warm-up steps (default: %(default)s)")
        g.add_argument("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes (CUDA only)")
        g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
        g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
        g.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW decoupled weight decay")
        g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
        g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the global gradient norm to this (0: off)")
        g.add_argument("--mixed_precision", default=None, choices=PRECISIONS,
                       help="autocast precision; default: accelerate's config. Frozen models are stored in it too")
        g.add_argument("--allow_tf32", action="store_true", help="allow TF32 matmuls on Ampere+ GPUs")
        g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="xformers attention; on a machine without CUDA or xformers this warns and uses PyTorch SDPA")
        g.add_argument("--dataloader_num_workers", type=int, default=0, help="data-loading worker processes")
        g.add_argument("--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps")
        g.add_argument("--checkpoints_total_limit", type=int, default=None,
                       help="keep at most N checkpoints (the oldest are deleted once a new one is complete)")
        g.add_argument("--checkpoint_at_end", action="store_true",
                       help="also write a checkpoint at the last step when it is not a multiple of --checkpointing_steps "
                            "(the final weights are the output either way)")
        g.add_argument("--resume_from_checkpoint", default=None,
                       help='a checkpoint folder (path or name in --output_dir) or "latest"')
        g.add_argument("--report_to", default="tensorboard", help='tracker: "tensorboard", "wandb", "all" or "none"')
        g.add_argument("--logging_dir", default="logs", help="tracker folder, inside --output_dir")
        g.add_argument("--validation_steps", type=int, default=200, help="sample a validation grid every N steps")
        g.add_argument("--validation_prompts", nargs="*", default=None,
                       help="prompts of the validation grid (default: the first 4 captions of the data)")
        g.add_argument("--max_nan_steps", type=int, default=10,
                       help="stop after N consecutive steps whose loss or gradients are not finite")
        g.add_argument("--push_to_hub", action="store_true",
                       help="upload the output folder (without checkpoints) to the Hugging Face hub when the run ends")
        g.add_argument("--hub_model_id", default=None,
                       help="the hub repo of --push_to_hub, \"user/name\" (default: the --output_dir folder's name)")
        g.add_argument("--hub_token", default=None,
                       help="hub token for --push_to_hub (default: the login of `hf auth login`); never written anywhere")
        g.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                       help="accepted as torch launchers pass it and ignored: accelerate reads the process's rank from "
                            "the environment")
        self.add_speed_args(image_recipe, lora_recipe)
        if per_stage:
            for action in g._group_actions:
                if action.dest in ("learning_rate", "max_train_steps", "num_train_epochs"):
                    action.help = "not used here: see --stage1_steps/--stage2_steps/--extras_steps and their learning rates"
            self.set_defaults(learning_rate=None)

    def add_speed_args(self, image_recipe: bool = True, lora_recipe: bool = True) -> None:
        """Speed-ups, each measured with benchmarks/bench_train_step.py (docs/benchmarks.md, "Training speed-ups"); --no-X switches one off.

        image_recipe=False (TLCM: prompts only, a transformer, CFG always batched) leaves out --cache_latents,
        --channels_last and --batched_teacher_cfg; lora_recipe=False (full distillation) --merged_lora_forward.
        """
        s = self.add_argument_group("speed")
        bool_flag = argparse.BooleanOptionalAction
        if image_recipe:
            s.add_argument("--cache_latents", action="store_true",
                           help="encode every image once and keep the VAE posterior on disk (reused by later runs, "
                                "rebuilt when the VAE, resolution, flip or data change); images are center-cropped")
        s.add_argument("--cache_text_embeddings", action="store_true",
                       help="encode every distinct caption once with the frozen text encoders and keep the result on "
                            "disk (rebuilt when the encoders or captions change)")
        s.add_argument("--feature_cache_dir", default=None,
                       help="folder of the --cache_* files (default: $XDG_CACHE_HOME/fewstep_distill, else "
                            "~/.cache/fewstep_distill)")
        if image_recipe:
            s.add_argument("--channels_last", action=bool_flag, default=False,
                           help="channels-last memory format for the denoiser's convolutions (default: off; slower on CPU)")
            s.add_argument("--batched_teacher_cfg", action=bool_flag, default=True,
                           help="the teacher's cond and uncond passes as one batched forward (default: on; off = two "
                                "passes)")
        if lora_recipe:
            s.add_argument("--merged_lora_forward", action=bool_flag, default=True,
                           help="compute a LoRA layer as one op with the merged weight W + s B A wherever that costs fewer "
                                "FLOPs than PEFT's separate rank-r branch (chosen per layer and call: no-grad passes, and "
                                "training passes when the rank is large next to the layer width); same outputs up to "
                                "float rounding (default: on)")
        s.add_argument("--fused_adamw", action=bool_flag, default=None,
                       help="the fused AdamW kernel, one kernel for all parameters (default: on where torch has it: "
                            "CUDA and CPU)")
        s.add_argument("--torch_compile", action="store_true",
                       help="torch.compile the denoiser: faster steps after a compile of minutes (one per call shape)")

    def add_tlcm_args(self, script: str, integer_timesteps: bool = False, resolution: int | None = None) -> None:
        """The data-free TLCM recipes: prompts, the two stages, the distance, and the optional extras (see
        check_tlcm_args for `script` and `integer_timesteps`)."""
        self.checks["tlcm"] = lambda args: check_tlcm_args(args, script, integer_timesteps)
        from .losses import LOSS_TYPES

        p = self.add_argument_group("prompts (data-free: no image is read)")
        p.add_argument("--prompts_file", default=None, help="prompts: .txt (one per line), .jsonl or .csv")
        p.add_argument("--dataset_name", default=None, help="a `datasets` hub id or folder whose --caption_column is used")
        p.add_argument("--caption_column", default="text", help="prompt column of a .jsonl/.csv/dataset (default: text)")
        p.add_argument("--max_train_samples", type=int, default=None, help="use only the first N prompts")
        p.add_argument("--resolution", type=int, default=resolution, help="image side in pixels (default: " + (
            RESOLUTION_HELP if resolution is None else "%(default)s)"))

        t = self.add_argument_group("TLCM")
        t.add_argument("--stage", default="all", choices=list(TLCM_STAGES),
                       help="which stage(s) to run: 1 (DSCD), 2 (DCD), all (1 then 2, plus the extras when an "
                            "extra flag is given), extras (only the extras, from --init_lora or stage 2's output)")
        t.add_argument("--num_segments", type=int, default=8, help="M, segments of [0, T] (default: %(default)s)")
        t.add_argument("--skip", type=float, default=20,
                       help="stage 1 teacher step t_m -> t_n in unshifted timesteps of T=1000 (default: %(default)s)")
        t.add_argument("--stage1_steps", type=int, default=12000, help="stage 1 optimizer steps (default: %(default)s)")
        t.add_argument("--stage1_learning_rate", type=float, default=1e-4, help="stage 1 learning rate (default: 1e-4)")
        t.add_argument("--stage2_steps", type=int, default=2000, help="stage 2 optimizer steps (default: %(default)s)")
        t.add_argument("--stage2_learning_rate", type=float, default=1e-5, help="stage 2 learning rate (default: 1e-5)")
        t.add_argument("--stage2_student_steps", type=int, default=4, help="q: steps of the student's own sample")
        t.add_argument("--stage2_teacher_substeps", type=int, default=3, help="p: teacher sub-steps between milestones")
        t.add_argument("--init_lora", default=None,
                       help="start from this LoRA (any format); default for --stage 2 / extras: the previous stage's "
                            "output in --output_dir")
        t.add_argument("--loss_type", default="l2", choices=LOSS_TYPES + ("lpips",),
                       help="distance d: l2, huber (pseudo-Huber) or lpips (latent LPIPS, --latent_lpips_path)")
        t.add_argument("--huber_c", type=float, default=0.001, help="c of the pseudo-Huber loss")
        t.add_argument("--latent_lpips_path", default=None,
                       help="folder of a latent LPIPS net (utils/latent_lpips.py) whose channels match the VAE latents")
        t.add_argument("--lpips_augmentations", type=int, default=4,
                       help="ensembled latent LPIPS: random augmentations averaged per call (0: plain; default: 4)")

        e = self.add_argument_group("optional extras (run after stage 2; our choices where the paper is silent)")
        e.add_argument("--reward_model", default=None,
                       help="a differentiable scorer: a toy-judge folder, or package.module:factory returning "
                            "score(images, prompts) (e.g. a wrapper of MPS / ImageReward)")
        e.add_argument("--reward_weight", type=float, default=1.0, help="weight of the reward hinge loss")
        e.add_argument("--reward_s0", type=float, default=2.0,
                       help="hinge threshold s0 of max(s0 - s(x0, c), 0) (the toy judge's score is a log-odds)")
        e.add_argument("--dmd", action="store_true",
                       help="distribution matching: a second LoRA learns the student's one-step samples with the teacher's "
                            "own loss, and the student follows fake x0 - real (guided teacher) x0 (docs/tlcm.md, Extras)")
        e.add_argument("--dmd_weight", type=float, default=1.0, help="weight of the DMD loss (ours; default: 1)")
        e.add_argument("--dmd_learning_rate", type=float, default=1e-5, help="fake-score LoRA's AdamW lr (constant; 1e-5)")
        e.add_argument("--gan", action="store_true",
                       help="adversarial loss: the frozen teacher's features (LoRA off) + a small trained head tell the "
                            "student's q-step samples (real) from its one-step samples (fake) (docs/tlcm.md, Extras)")
        e.add_argument("--gan_weight", type=float, default=0.1, help="weight of the generator's GAN loss (ours; 0.1)")
        e.add_argument("--gan_learning_rate", type=float, default=1e-4, help="the head's AdamW lr (constant; ours; 1e-4)")
        e.add_argument("--extras_steps", type=int, default=500, help="optimizer steps of the extras stage")
        e.add_argument("--extras_learning_rate", type=float, default=1e-5,
                       help="the student's learning rate in the extras stage (loss: reward + DMD + GAN, weighted)")


def resolve_resolution(args: argparse.Namespace) -> None:
    """--resolution not given: the teacher's own size (models.native_resolution), so no family trains at another's."""
    if getattr(args, "resolution", 0) is None:
        from .models import native_resolution

        with user_errors():
            args.resolution = native_resolution(args.pretrained_teacher_model, args.revision,
                                                "--pretrained_teacher_model")


def check_lcm_args(args: argparse.Namespace) -> None:
    """Reject impossible LCM and data settings before any model is loaded."""
    if args.w_min > args.w_max:
        fail(f"--w_min {args.w_min} is larger than --w_max {args.w_max}")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        fail(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    if args.huber_c <= 0:
        fail(f"--huber_c must be positive, got {args.huber_c}")
    if args.timestep_scaling_factor <= 0:
        fail(f"--timestep_scaling_factor must be positive, got {args.timestep_scaling_factor}")
    # LCMScheduler samples at most N steps of the N-point grid; validation (and 2-8 step sampling) needs 8
    if not 8 <= args.num_ddim_timesteps <= 1000:
        fail(f"--num_ddim_timesteps must be in 8..1000 (LCMScheduler samples at most that many steps; validation "
             f"samples 8), got {args.num_ddim_timesteps}")


def check_lora_args(args: argparse.Namespace, presets: tuple[str, ...]) -> None:
    """Reject impossible LoRA settings; fill args.lora_targets from --lora_target_modules (a preset or a list)."""
    from .lora import resolve_targets

    if args.lora_rank < 1:
        fail(f"--lora_rank must be at least 1, got {args.lora_rank}")
    if args.lora_alpha <= 0:
        fail(f"--lora_alpha must be positive, got {args.lora_alpha}")
    if not 0.0 <= args.lora_dropout < 1.0:
        fail(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if not 0.0 <= args.ema_decay < 1.0:
        fail(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    args.lora_targets = resolve_targets(args.lora_target_modules, presets)
    args.lora_torch_dtype = torch.bfloat16 if args.lora_dtype == "bf16" else torch.float32


def check_training_args(args: argparse.Namespace) -> None:
    """Reject impossible combinations before any model is loaded; create --output_dir (see utils/outputs.py)."""
    outputs.handle_stop_signals()  # a stop while the libraries and models load: one line, not a silent exit -15
    positive = ["train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps",
                "num_train_epochs", "max_nan_steps"]
    for name in positive:
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "checkpoints_total_limit", "max_train_samples", "vae_encode_batch_size",
                 "resolution"):  # optional, or of some recipes only
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("lr_warmup_steps", "dataloader_num_workers", "adam_weight_decay", "max_grad_norm"):
        if getattr(args, name) < 0:
            fail(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.learning_rate <= 0:
        fail(f"--learning_rate must be positive, got {args.learning_rate}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            fail(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.adam_epsilon <= 0:
        fail(f"--adam_epsilon must be positive, got {args.adam_epsilon}")
    if not 0 <= args.seed < 2**32:  # numpy's seed range (accelerate's set_seed seeds numpy too)
        fail(f"--seed must be in 0..{2**32 - 1}, got {args.seed}")
    if args.mixed_precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        fail("--mixed_precision bf16: this GPU has no bf16 support; use fp16")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        fail("--mixed_precision fp16 needs a CUDA GPU (accelerate sets up no fp16 autocast or loss scaling on CPU); "
             "use bf16 or no")
    check_report_to(args.report_to)
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        fail("--overwrite_output_dir starts over and --resume_from_checkpoint continues: give one of them")
    if args.resume_from_checkpoint not in (None, "latest"):  # a named checkpoint must exist: say so before loading
        from .checkpoint import resolve_resume

        with user_errors():
            resolve_resume(args.output_dir, args.resume_from_checkpoint)
    outputs.check_not_an_input(args)
    outputs.check_others_files(args)  # before anything is written there (claim checks again, holding the lock)
    outputs.make_output_dir(args.output_dir)  # a run that fails before writing anything leaves no empty folder
    check_folder_flags(args)


def check_folder_flags(args: argparse.Namespace) -> None:
    """--cache_dir and --logging_dir (under --output_dir unless absolute) must be folders or creatable ones:
    a regular file there, or above them, fails inside datasets or the tracker otherwise."""
    import os

    for flag, path in (("--cache_dir", getattr(args, "cache_dir", None)),
                       ("--logging_dir", os.path.join(args.output_dir, args.logging_dir))):
        head = os.path.abspath(os.path.expanduser(path)) if path else None
        while head and not os.path.exists(head):
            head = os.path.dirname(head)
        if head and not os.path.isdir(head):
            fail(f"{flag} {path} cannot be a folder: {head} is a file")


def check_report_to(value: str) -> None:
    """--report_to names trackers accelerate knows and this machine has installed (or none, or all installed)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType if t.value != "all"]
    available = [str(getattr(t, "value", t)) for t in get_available_trackers()]
    if value in ("none", "all"):
        return
    if value not in known:
        fail(f"--report_to {value}: not a tracker; choose none, all or one of {', '.join(known)}")
    if value not in available:
        fail(f"--report_to {value}: its package is not installed here (installed: {', '.join(available) or 'none'}); "
             f"pip install {value.replace('_', '-')}, or use --report_to none")


def check_tlcm_args(args: argparse.Namespace, script: str, integer_timesteps: bool = False) -> None:
    """Reject impossible TLCM settings; fill args.stages (the stages to run, in order). integer_timesteps: a DDPM
    teacher (whole --skip; its student samples with the released sampler, on the milestone subsets only)."""
    if args.learning_rate is not None or args.max_train_steps is not None:
        fail(f"{script} sets steps and learning rates per stage: use --stage1_steps/--stage2_steps/"
             "--extras_steps and --stage1_learning_rate/--stage2_learning_rate/--extras_learning_rate")
    if bool(args.prompts_file) == bool(args.dataset_name):
        fail("give exactly one prompt source: --prompts_file or --dataset_name")
    if not 1 <= args.num_segments <= 1000:
        fail(f"--num_segments must be in 1..1000, got {args.num_segments}")
    if not 0 < args.skip <= 1000 / args.num_segments:
        fail(f"--skip {args.skip} must be in (0, T/M = {1000 / args.num_segments:g}] (--num_segments {args.num_segments})")
    for name in ("stage1_steps", "stage2_steps", "extras_steps", "stage2_student_steps", "stage2_teacher_substeps"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    if integer_timesteps:
        from .scheduling_tlcm import tlcm_timesteps

        if args.skip != int(args.skip):
            fail(f"--skip {args.skip}: a DDPM teacher has integer timesteps, so it must be a whole number")
        try:
            tlcm_timesteps(args.stage2_student_steps, 1000, args.num_segments)
        except ValueError as exc:
            fail(f"--stage2_student_steps {args.stage2_student_steps}: {exc}")
    if args.huber_c <= 0:
        fail(f"--huber_c must be positive, got {args.huber_c}")
    if args.loss_type == "lpips" and not args.latent_lpips_path:
        fail("--loss_type lpips needs --latent_lpips_path (a latent LPIPS folder)")
    for name in ("stage1_learning_rate", "stage2_learning_rate"):
        if getattr(args, name) <= 0:
            fail(f"--{name} must be positive, got {getattr(args, name)}")
    for name in "reward_weight dmd_weight gan_weight extras_learning_rate dmd_learning_rate gan_learning_rate".split():
        if getattr(args, name) < 0:
            fail(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.lpips_augmentations < 0:
        fail(f"--lpips_augmentations must not be negative, got {args.lpips_augmentations}")
    extra = bool(args.reward_model or args.dmd or args.gan)
    args.stages = TLCM_STAGES[args.stage] + (["extras"] if args.stage == "all" and extra else [])
    if "extras" in args.stages and not extra:
        fail("--stage extras needs an extra: --reward_model, --dmd and/or --gan")
    args.learning_rate = args.stage1_learning_rate  # for check_training_args; each stage sets its own
