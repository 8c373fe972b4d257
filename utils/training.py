"""Plumbing every training recipe shares: flags, accelerator, optimizer, precision, logging, model card.

The recipes keep the algorithm (models, loss, loop) in their own file; what is here is the part
that is the same for all of them and that a user rarely changes.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import math
import os
import sys
from typing import Any, Iterable

import torch

from . import merged_lora
from .errors import fail, user_errors

logger = logging.getLogger(__name__)

PRECISIONS = ("no", "fp16", "bf16")
# Testing aid: when set to a path, every process appends one JSON line per batch it trains on
# ({"epoch", "batch", "captions"}) to `<path>.<process index>`, so a test can see what each process read.
BATCH_LOG_ENV = "DISTILL_LOG_BATCHES"
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line, `error: ...`, exit status 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        fail(message)


def add_teacher_args(parser: argparse.ArgumentParser, teacher_help: str) -> argparse._ArgumentGroup:
    """The teacher and its VAE (hub id or folder, same code path); returns the group for recipe extras."""
    m = parser.add_argument_group("models")
    m.add_argument("--pretrained_teacher_model", required=True, help=teacher_help)
    m.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="a separate VAE (hub id or folder, e.g. an fp16-fix VAE) instead of the teacher's own")
    m.add_argument("--revision", default=None, help="revision of the teacher on the hub")
    m.add_argument("--variant", default=None, help='weights variant of the teacher, e.g. "fp16"')
    m.add_argument("--vae_encode_batch_size", type=int, default=32, help="images per VAE encode call")
    return m


def add_data_args(parser: argparse.ArgumentParser, resolution: int) -> None:
    """Image+caption data: one of three sources, columns, size, crop and flip, caption dropout."""
    d = parser.add_argument_group("data")
    d.add_argument("--dataset_name", default=None, help="a `datasets` hub id or local dataset folder")
    d.add_argument("--train_data_dir", default=None, help="an imagefolder (images + metadata.jsonl with captions)")
    d.add_argument("--train_shards_path_or_url", default=None, help="webdataset .tar shards: path, glob or {a..b}")
    d.add_argument("--image_column", default="image", help="image column of the dataset (default: %(default)s)")
    d.add_argument("--caption_column", default="text", help="caption column of the dataset (default: %(default)s)")
    d.add_argument("--max_train_samples", type=int, default=None, help="use only the first N samples")
    d.add_argument("--cache_dir", default=None, help="`datasets` cache folder")
    d.add_argument("--resolution", type=int, default=resolution,
                   help="training image side in pixels (default: %(default)s)")
    d.add_argument("--center_crop", action="store_true", help="center crop (default: random crop)")
    d.add_argument("--random_flip", action="store_true", help="random horizontal flips")
    d.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="fraction of captions replaced by the empty prompt")


def add_lcm_args(parser: argparse.ArgumentParser, w_min: float, w_max: float) -> argparse._ArgumentGroup:
    """Latent consistency distillation: skip grid, guidance range, distance, boundary scaling."""
    from .losses import LOSS_TYPES

    a = parser.add_argument_group("latent consistency distillation")
    a.add_argument("--num_ddim_timesteps", type=int, default=50, help="N, points of the skip grid (default: %(default)s)")
    a.add_argument("--w_min", type=float, default=w_min,
                   help="smallest guidance scale w (LCM convention, CFG = w + 1; default: %(default)s)")
    a.add_argument("--w_max", type=float, default=w_max, help="largest guidance scale w (default: %(default)s)")
    a.add_argument("--loss_type", default="l2", choices=LOSS_TYPES, help="distance d (default: %(default)s)")
    a.add_argument("--huber_c", type=float, default=0.001, help="c of the pseudo-Huber loss")
    a.add_argument("--timestep_scaling_factor", type=float, default=10.0,
                   help="c in c_skip/c_out: larger makes the boundary condition sharper (default: %(default)s)")
    return a


def check_lcm_args(args: argparse.Namespace) -> None:
    """Reject impossible LCM and data settings before any model is loaded."""
    if args.w_min > args.w_max:
        fail(f"--w_min {args.w_min} is larger than --w_max {args.w_max}")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        fail(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    if args.huber_c <= 0:
        fail(f"--huber_c must be positive, got {args.huber_c}")
    if args.vae_encode_batch_size < 1:
        fail(f"--vae_encode_batch_size must be at least 1, got {args.vae_encode_batch_size}")
    if not 1 <= args.num_ddim_timesteps <= 1000:
        fail(f"--num_ddim_timesteps must be in 1..1000, got {args.num_ddim_timesteps}")


def add_lora_args(group: argparse._ArgumentGroup, default_targets: str, targets_help: str) -> None:
    """The LoRA of the LoRA recipes: rank, alpha, dropout, target modules, and an optional EMA target."""
    from .lora import DEFAULT_LORA_ALPHA

    group.add_argument("--lora_rank", type=int, default=64, help="LoRA rank r (default: %(default)s)")
    group.add_argument("--lora_alpha", type=float, default=DEFAULT_LORA_ALPHA,
                       help="LoRA alpha; scale = alpha / r. 8 is PEFT's default, so the published loading snippet "
                            "(LoraConfig(r=...) without alpha) loads our files with the trained scale "
                            "(default: %(default)s)")
    group.add_argument("--lora_dropout", type=float, default=0.0, help="dropout inside the LoRA layers")
    group.add_argument("--lora_target_modules", default=default_targets, help=targets_help)
    group.add_argument("--ema_decay", type=float, default=0.0,
                       help="target = EMA of the LoRA with this decay (0: the online student under stop-grad, as "
                            "published; default: %(default)s)")


def check_lora_args(args: argparse.Namespace, presets: tuple[str, ...]) -> None:
    """Reject impossible LoRA settings; fill args.lora_targets from --lora_target_modules (a preset or a list)."""
    from .lora import resolve_targets

    if args.lora_rank < 1:
        fail(f"--lora_rank must be at least 1, got {args.lora_rank}")
    if not 0.0 <= args.ema_decay < 1.0:
        fail(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    args.lora_targets = resolve_targets(args.lora_target_modules, presets)


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the optimisation loop, precision, checkpointing and logging (diffusers-example names)."""
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", default="out", help="where checkpoints, logs and the result go (default: %(default)s)")
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
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help='a checkpoint folder (path or name in --output_dir) or "latest"')
    g.add_argument("--report_to", default="tensorboard", help='tracker: "tensorboard", "wandb", "all" or "none"')
    g.add_argument("--logging_dir", default="logs", help="tracker folder, inside --output_dir")
    g.add_argument("--validation_steps", type=int, default=200, help="sample a validation grid every N steps")
    g.add_argument("--validation_prompts", nargs="*", default=None,
                   help="prompts of the validation grid (default: the first 4 captions of the data)")
    g.add_argument("--max_nan_steps", type=int, default=10,
                   help="stop after N consecutive steps whose loss or gradients are not finite")


def add_speed_args(parser: argparse.ArgumentParser, image_recipe: bool = True, lora_recipe: bool = True) -> None:
    """Speed-ups, each measured with benchmarks/bench_train_step.py (README "Speed-ups"); --no-X switches one off.

    image_recipe=False (TLCM: prompts only, a transformer, CFG always batched) leaves out --cache_latents,
    --channels_last and --batched_teacher_cfg; lora_recipe=False (full distillation) --merged_lora_forward.
    """
    s = parser.add_argument_group("speed")
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


def prepare_denoiser(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """--merged_lora_forward, --channels_last and --torch_compile, in place (Module.compile keeps the
    state-dict keys unchanged). Call it after every adapter is added."""
    if getattr(args, "merged_lora_forward", False):
        merged_lora.enable(model)
    if getattr(args, "channels_last", False):
        model.to(memory_format=torch.channels_last)
    if getattr(args, "torch_compile", False):
        model.compile(dynamic=False)  # a few fixed shapes per run: no symbolic-shape guards


def check_training_args(args: argparse.Namespace) -> None:
    """Reject impossible combinations before any model is loaded."""
    positive = ["train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps",
                "num_train_epochs", "max_nan_steps"]
    for name in positive:
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        fail(f"--max_train_steps must be at least 1, got {args.max_train_steps}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        fail(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}")
    if args.learning_rate <= 0:
        fail(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.mixed_precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        fail("--mixed_precision bf16: this GPU has no bf16 support; use fp16")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        fail("--mixed_precision fp16 needs a CUDA GPU (accelerate sets up no fp16 autocast or loss scaling on CPU); "
             "use bf16 or no")
    if args.resume_from_checkpoint not in (None, "latest"):  # a named checkpoint must exist: say so before loading
        from .checkpoint import resolve_resume

        with user_errors():
            resolve_resume(args.output_dir, args.resume_from_checkpoint)
    created = not os.path.exists(args.output_dir)
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        # a name of this process's own: the processes of a multi-process run probe at the same time
        probe = os.path.join(args.output_dir, f".write_test.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as exc:
        fail(f"--output_dir {args.output_dir} is not writable ({exc.strerror})")
    if created:  # a run that fails before writing anything leaves no empty folder behind
        atexit.register(_remove_if_empty, args.output_dir)


def _remove_if_empty(path: str) -> None:
    try:
        os.rmdir(path)  # only ever removes an empty folder
    except OSError:
        pass


def make_accelerator(args: argparse.Namespace):
    """An Accelerator with the run's precision, accumulation and tracker; logging set up on every process."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        stream=sys.stdout)
    config = ProjectConfiguration(project_dir=args.output_dir,
                                  logging_dir=os.path.join(args.output_dir, args.logging_dir))
    report_to = None if args.report_to == "none" else args.report_to
    # a seedable sampler makes epoch e's order a function of (seed, e): exact resume mid-run needs it
    loader_config = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed)
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    # torchrun (or `accelerate launch --multi_gpu`) on a machine without a GPU: accelerate only picks its
    # multi-CPU (gloo) mode when told to use the CPU; otherwise each process would run alone, as a
    # duplicate of the others writing to the same output folder
    on_cpu = world_size > 1 and not torch.accelerator.is_available()
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, log_with=report_to, project_config=config,
                              dataloader_config=loader_config, cpu=on_cpu)
    if accelerator.num_processes != world_size:
        fail(f"{world_size} processes were launched (WORLD_SIZE) but accelerate set up {accelerator.num_processes}; "
             "launch with `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`")
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    # accelerate logs every file of every checkpoint at INFO; the libraries warn about casts we do on purpose
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()  # per-file loading bars; the run has its own
    import datasets

    datasets.disable_progress_bars()  # "Generating train split" bars of a first imagefolder load
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def weight_dtype(accelerator) -> torch.dtype:
    """The dtype for frozen models: the autocast precision (fp16/bf16) or fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def enable_xformers(model: Any, requested: bool) -> None:
    """Use xformers attention if asked and possible; otherwise say why and keep PyTorch SDPA."""
    if not requested:
        return
    if not torch.cuda.is_available():
        logger.warning("--enable_xformers_memory_efficient_attention: no CUDA device; using PyTorch SDPA attention")
        return
    try:
        import xformers  # noqa: F401
    except ImportError:
        logger.warning("--enable_xformers_memory_efficient_attention: xformers is not installed; using PyTorch SDPA")
        return
    model.enable_xformers_memory_efficient_attention()


def make_optimizer(params: Iterable[torch.nn.Parameter], args: argparse.Namespace,
                   num_processes: int = 1) -> torch.optim.Optimizer:
    """AdamW (fused per --fused_adamw) or bitsandbytes' 8-bit AdamW with the run's hyper-parameters.

    --scale_lr multiplies the learning rate by the samples per optimizer step (batch x accumulation x processes).
    """
    params = [p for p in params if p.requires_grad]
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.train_batch_size * args.gradient_accumulation_steps * num_processes
    kwargs = dict(lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.use_8bit_adam:
        if not torch.cuda.is_available():
            fail("--use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit optimizers run on CUDA)")
        try:
            import bitsandbytes as bnb
        except ImportError:
            fail("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
        return bnb.optim.AdamW8bit(params, **kwargs)
    # --fused_adamw unset: fused wherever every parameter lives on a device with the fused kernel (CPU, CUDA);
    # on CPU it is ~6x faster than the per-tensor loop for a LoRA's hundreds of small tensors (README "Speed-ups")
    fused = getattr(args, "fused_adamw", None)
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, num_processes: int):
    from diffusers.optimization import get_scheduler

    # the scheduler is stepped once per process per optimizer step by accelerate's wrapper
    return get_scheduler(args.lr_scheduler, optimizer=optimizer,
                         num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=args.max_train_steps * num_processes)


def resolve_train_steps(args: argparse.Namespace, batches_per_epoch: int | None) -> None:
    """Fill args.max_train_steps from epochs (or epochs from steps) for a dataset of known length."""
    if batches_per_epoch is None:  # a stream: only --max_train_steps can end it
        if args.max_train_steps is None:
            fail("--max_train_steps is required with --train_shards_path_or_url (a stream has no epoch length)")
        return
    updates_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / updates_per_epoch)


class TrainingRNG:
    """The generator of every random draw of the loss (timesteps, w, noise, dropout), checkpointed with the run.

    A dedicated generator, not torch's global one: data loaders and libraries draw from the global
    RNG at moments that differ between a resumed and an uninterrupted run (a new loader iterator,
    for one), which would make the resumed run diverge.

    Each process draws from its own stream (seeded with its index). accelerate writes a registered
    object from the main process only, so with several processes `state_dict` (called on every
    process by `save_state`) gathers all the streams and `load_state_dict` takes back this one's.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu", process_index: int = 0) -> None:
        self.generator = torch.Generator(device).manual_seed(seed * 1000 + process_index)

    @staticmethod
    def _world() -> tuple[int, int]:
        """(this process's rank, number of processes) of the running distributed job, (0, 1) outside one."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def state_dict(self) -> dict:
        state = self.generator.get_state()
        _, world = self._world()
        if world == 1:
            return {"state": state}
        states: list = [None] * world
        torch.distributed.all_gather_object(states, state)  # a collective: every process calls save_state
        return {"states": states}

    def load_state_dict(self, state: dict) -> None:
        rank, world = self._world()
        states = state["states"] if "states" in state else [state["state"]]
        if len(states) == world:
            self.generator.set_state(states[rank])
            return
        # saved by another number of processes: no exact continuation exists; keep the streams distinct
        logger.warning(f"the checkpoint's random streams are from {len(states)} process(es), this run has {world}: "
                       "the resumed run is not an exact continuation")
        self.generator.set_state(states[0])
        offset = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device))
        self.generator.manual_seed(offset + rank)


def grads_are_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    """True if every gradient is finite (a NaN/inf step must be skipped, not applied)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return bool(torch.isfinite(torch.stack(norms)).all()) if norms else True


def apply_gradients(accelerator, loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer, lr_scheduler,
                    max_grad_norm: float) -> bool:
    """Backward, then (on a sync step) clip and step, unless the loss or a gradient is not finite.

    `params` must be a list: a generator would be exhausted by the finiteness check and the
    clipping would then silently do nothing (a known defect of the reference scripts).
    Returns False when the update was skipped because of a non-finite value.
    """
    accelerator.backward(loss)
    if getattr(accelerator, "scaler", None) is not None and bool(torch.isfinite(loss.detach())):
        # fp16 loss scaling: an overflowing gradient is expected now and then, and the grad scaler
        # owns it (it skips that step and lowers the scale); skipping here instead would never let
        # the scale come down, so every later step would overflow too
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, max_grad_norm)  # unscales first
        scale = accelerator.scaler.get_scale()
        optimizer.step()
        # the scaler lowers its scale exactly when it skipped the update; accelerate's scheduler wrapper
        # sees that skip for unfused optimizers only (a fused one skips inside its kernel), so ask the scale
        if accelerator.scaler.get_scale() >= scale:
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return True
    finite = bool(torch.isfinite(loss.detach())) and grads_are_finite(params)
    if accelerator.num_processes > 1:  # all processes must skip or step together, or the replicas drift apart
        votes = accelerator.reduce(torch.tensor([float(finite)], device=accelerator.device), reduction="sum")
        finite = int(votes.item()) == accelerator.num_processes
    if finite:
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return finite


def log_image_grid(accelerator, rows: list[torch.Tensor], row_labels: list[str], step: int, output_dir: str,
                   tag: str = "validation") -> str:
    """Log a grid (one row per entry, images in [-1, 1]) to the trackers and save it as a PNG."""
    import numpy as np

    from .evaluate import save_grid

    path = os.path.join(output_dir, "validation", f"{tag}-{step:06d}.png")
    save_grid(rows, path, columns=max(r.shape[0] for r in rows), scale=4)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            from PIL import Image

            grid = np.asarray(Image.open(path).convert("RGB"))
            tracker.writer.add_image(tag, grid, step, dataformats="HWC")
            tracker.writer.add_text(f"{tag}/rows", ", ".join(row_labels), step)
    return path


def write_model_card(output_dir: str, title: str, args: argparse.Namespace, body: str = "") -> None:
    """A README.md in the output folder: what it is, how to load it, and every training argument."""
    lines = [f"# {title}", "", body.strip(), "", "## Training arguments", "", "```json",
             json.dumps(vars(args), indent=2, default=str), "```", ""]
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write("\n".join(lines))


def run_training(accelerator, args: argparse.Namespace, dataloader, model, params: list[torch.nn.Parameter],
                 optimizer, lr_scheduler, loss_fn, after_step=None, validate=None, name: str = "distill") -> dict:
    """The loop every recipe shares: resume, epochs, accumulation, skipped non-finite steps, logs, checkpoints.

    loss_fn(batch) -> loss is the recipe's algorithm; after_step() runs after each optimizer update
    (e.g. the EMA target); validate(prompts, step) samples a grid on the main process. Returns
    {"global_step", "validation_prompts"}. Everything needed to resume exactly (model, optimizer,
    scheduler, registered objects, RNG, data position) is saved every --checkpointing_steps.
    """
    from tqdm.auto import tqdm

    from . import checkpoint, data

    global_step, epoch, batches_done, nan_streak, skipped_images = 0, 0, 0, 0, 0
    resume = checkpoint.resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if resume:
        state = checkpoint.load_checkpoint(accelerator, resume)
        global_step, epoch, batches_done = state["global_step"], state["epoch"], state["batches_in_epoch"]
        nan_streak, skipped_images = state.get("nan_streak", 0), state.get("skipped_images", 0)
        logger.info(f"resumed from {resume} at step {global_step}")
    elif args.resume_from_checkpoint:
        logger.info("no checkpoint to resume from: starting fresh")
    trackers_started = False  # started at the first logged step: a run that fails before it leaves no logs
    prompts = args.validation_prompts

    progress = None  # shown from the first usable batch: bad data found before it ends as one line, no bar
    batch_log_path = os.environ.get(BATCH_LOG_ENV)
    batch_log = open(f"{batch_log_path}.{accelerator.process_index}", "a") if batch_log_path else None
    while global_step < args.max_train_steps:
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        for batch in checkpoint.skip_batches_for_resume(accelerator, dataloader, batches_done):
            batches_done += 1
            skipped_images += batch["num_skipped"]
            if batch_log is not None:
                entry = {"epoch": epoch, "batch": batches_done, "captions": batch["captions"]}
                batch_log.write(json.dumps(entry) + "\n")
                batch_log.flush()
            if len(batch["captions"]) == 0:
                continue
            if prompts is None:
                prompts = batch["captions"][:4]
            if progress is None:
                progress = tqdm(total=args.max_train_steps, initial=global_step, desc="steps",
                                disable=not accelerator.is_local_main_process)
            with accelerator.accumulate(model):
                loss = loss_fn(batch)
                finite = apply_gradients(accelerator, loss, params, optimizer, lr_scheduler, args.max_grad_norm)
            if not accelerator.sync_gradients:
                continue
            if not finite:  # skip the update, count it, stop if it keeps happening
                nan_streak += 1
                logger.warning(f"step {global_step}: non-finite loss or gradients, update skipped ({nan_streak} in a row)")
                if nan_streak >= args.max_nan_steps:
                    progress.close()  # the error gets a line of its own
                    fail(f"{nan_streak} consecutive non-finite steps (--max_nan_steps); the last good checkpoint "
                         f"is kept in {args.output_dir}")
                continue
            nan_streak = 0
            if after_step is not None:
                after_step()
            global_step += 1
            progress.update(1)
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "skipped_images": skipped_images}
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
            if not trackers_started and accelerator.is_main_process:
                accelerator.init_trackers(name, config={k: str(v) for k, v in vars(args).items()})
            trackers_started = True
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                state = {"epoch": epoch, "batches_in_epoch": batches_done, "nan_streak": nan_streak,
                         "skipped_images": skipped_images}
                path = checkpoint.save_checkpoint(accelerator, args.output_dir, global_step, state,
                                                  args.checkpoints_total_limit)
                logger.info(f"saved {path}")
            if validate is not None and accelerator.is_main_process and global_step % args.validation_steps == 0:
                validate(prompts, global_step)
            if global_step >= args.max_train_steps:
                break
        else:  # the epoch ran out: a first epoch of nothing but undecodable images is fatal
            if batches_done == 0:  # and so is one with no batch at all: the loop would never end
                fail(f"process {accelerator.process_index} of {accelerator.num_processes} got no training batch in "
                     f"epoch {epoch} (fewer webdataset shards than processes?) (--train_shards_path_or_url)")
            if epoch == 0:
                data.check_not_all_corrupt(batches_done * args.train_batch_size, skipped_images)
            epoch, batches_done = epoch + 1, 0
    if progress is not None:
        progress.close()
    if batch_log is not None:
        batch_log.close()
    if skipped_images:
        logger.warning(f"{skipped_images} undecodable image(s) were skipped (process {accelerator.process_index})")
    return {"global_step": global_step, "validation_prompts": prompts}


def load_teacher_schedule(args: argparse.Namespace, device) -> tuple[dict, str, torch.Tensor]:
    """The teacher's noise-scheduler config, its prediction type (checked) and alphas_cumprod on `device`."""
    from diffusers import DDPMScheduler

    from . import models
    from .solvers import PREDICTION_TYPES

    config = models.load_noise_scheduler_config(args.pretrained_teacher_model, args.revision)
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        fail(f"teacher's scheduler has prediction_type {prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}")
    return config, prediction_type, DDPMScheduler.from_config(config).alphas_cumprod.to(device)


def load_frozen_vae(args: argparse.Namespace, device, dtype: torch.dtype):
    """The (possibly separate) VAE, frozen, on `device`; --resolution checked against its downsampling."""
    from . import models

    vae = models.load_vae(args.pretrained_teacher_model, args.pretrained_vae_model_name_or_path, args.revision,
                          args.variant).requires_grad_(False).eval()
    factor = models.vae_scale_factor(vae.config)
    if args.resolution % factor:
        fail(f"--resolution {args.resolution} is not a multiple of the VAE's downsampling factor {factor}")
    # the VAE stays fp32 when its config asks for it (SD-family VAEs overflow in fp16)
    return vae.to(device, torch.float32 if vae.config.get("force_upcast", False) else dtype)


def make_train_data(args: argparse.Namespace, accelerator, vae: Any = None):
    """The image+caption dataloader of the data flags, prepared for the processes; fills max_train_steps.

    With --cache_latents (pass the VAE) the samples are cached VAE posteriors instead of pixels; with
    --cache_text_embeddings the dataset's captions are also listed in `args.train_captions`.
    """
    from . import cache, data

    transform = data.ImageTransform(args.resolution, args.center_crop, args.random_flip)
    dataset = data.load_image_caption_dataset(args.dataset_name, args.train_data_dir, args.train_shards_path_or_url,
                                              args.image_column, args.caption_column, args.max_train_samples,
                                              args.cache_dir, args.seed, transform)
    if getattr(args, "cache_text_embeddings", False):
        args.train_captions = cache.dataset_captions(dataset)
    if getattr(args, "cache_latents", False):
        dataset = cache.cached_latent_dataset(args, dataset, vae, accelerator)
    dataloader = data.make_train_dataloader(dataset, args.train_batch_size, args.dataloader_num_workers, args.seed)
    if isinstance(dataset, torch.utils.data.IterableDataset):  # webdataset shards: no epoch length, and
        resolve_train_steps(args, None)  # the stream already splits itself across processes, by shard
        shards = getattr(dataset, "shards", None)
        if shards is not None and len(shards) < accelerator.num_processes:
            fail(f"{len(shards)} webdataset shard(s) for {accelerator.num_processes} processes: each process reads "
                 "whole shards, so give at least one per process (--train_shards_path_or_url)")
        return dataloader
    dataloader = accelerator.prepare(dataloader)
    resolve_train_steps(args, len(dataloader))  # after prepare: each of N processes gets 1/N of the batches
    return dataloader
