"""The stage bookkeeping the two TLCM recipes share (`Stages`): the engine check, a stage finished earlier, a stage's
folder, seed, start LoRA and resume checkpoint, how its LoRA is saved, and the last stage's files on top of the
output folder."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from contextlib import ExitStack

import torch
from torch import nn

from .checkpoint import resolve_resume
from .errors import UserError, fail
from .files import atomic_write
from .flags import TLCM_STAGES
from .lora import is_lora_weight
from .lora_files import PEFT_WEIGHTS_NAME, load_into_adapter, save_lora_outputs, staged_output
from .outputs import make_output_dir
from .sharding import engine, whole_parameters

logger = logging.getLogger(__name__)


class Stages:
    """One TLCM run's stages over one model `base` whose denoiser file is `component` ("unet", "transformer").
    Made before any model is loaded: it refuses first what the engine cannot run."""

    def __init__(self, args: argparse.Namespace, accelerator, component: str) -> None:
        check_engine(accelerator, args)
        self.args, self.accelerator, self.component = args, accelerator, component

    def dir(self, stage: str) -> str:
        return os.path.join(self.args.output_dir, f"stage{stage}")

    def finished(self, base: nn.Module, stage: str) -> bool:
        """Whether the stage finished in an earlier run; then its LoRA is loaded (the next stage starts from it)."""
        return load_finished(base, self.dir(stage), stage)

    def start(self, base: nn.Module, stage: str, index: int, generator: torch.Generator) -> None:
        """Load the stage's start LoRA, create its folder (removed again if the stage ends before writing to it) and
        seed its random stream (a resumed stage then restores the checkpointed state)."""
        start_lora(self.args, stage, index, base)
        make_output_dir(self.dir(stage))
        generator.manual_seed(stage_seed(self.args.seed, self.accelerator.process_index, stage))

    def resume(self, stage: str) -> str | None:
        return stage_resume(self.args, self.dir(stage))

    def save(self, base: nn.Module, stage: str) -> None:
        """Every process: the stage's LoRA (gathered where it is sharded), written by the main process."""
        self.accelerator.wait_for_everyone()
        with whole_parameters(base, is_lora_weight):
            if self.accelerator.is_main_process:
                save_stage_lora(base, os.path.join(self.dir(stage), "lora"), self.component)

    def publish(self) -> None:
        """The last stage's files on top of --output_dir (main process)."""
        publish_last_stage(self.args.output_dir, self.args.stages[-1])


def check_engine(accelerator, args: argparse.Namespace) -> None:
    """One line for what the engine cannot run: the extras --dmd and --gan under DeepSpeed ZeRO-3."""
    if (args.dmd or args.gan) and engine(accelerator) == "zero3":
        fail("--dmd and --gan do not run under DeepSpeed ZeRO-3 (the DMD fake score's own optimizer steps outside "
             "DeepSpeed's engine, whose split weights hold no whole gradient; the GAN loss back-propagates through "
             "the split teacher a second time, which its hooks refuse): use FSDP or ZeRO-2 (docs/distributed.md)")


def load_finished(base: nn.Module, stage_dir: str, stage: str) -> bool:
    """Whether the stage finished in an earlier run (its LoRA is in <stage_dir>/lora); then that LoRA is loaded."""
    done = os.path.join(stage_dir, "lora", PEFT_WEIGHTS_NAME)
    if not os.path.isfile(done):
        return False
    logger.info(f"stage {stage} already finished in {stage_dir}: loading its LoRA")
    load_into_adapter(base, done)
    return True


def stage_seed(seed: int, process_index: int, stage: str) -> int:
    """The seed of a stage's random stream on one process: each stage and process its own."""
    return seed * 1000 + process_index + 7919 * (1 + list(TLCM_STAGES).index(stage))


def start_lora(args: argparse.Namespace, stage: str, index: int, base: nn.Module) -> None:
    """Load the LoRA a stage starts from: --init_lora for the first stage run, else the previous stage's."""
    init = args.init_lora if index == 0 else None
    if init is None and index == 0 and stage != "1":
        previous = os.path.join(args.output_dir, "stage1" if stage == "2" else "stage2", "lora")
        init = previous if os.path.isdir(previous) else None
        if init is None:
            fail(f"--stage {stage} needs a LoRA to start from: --init_lora, or {previous} from the stage before")
    if init is not None:
        path = os.path.join(init, PEFT_WEIGHTS_NAME) if os.path.isdir(init) else init
        try:
            load_into_adapter(base, path)
        except UserError as exc:
            fail(f"{exc} ({'--init_lora' if init == args.init_lora else 'the previous stage: --init_lora'})")
        logger.info(f"stage {stage} starts from the LoRA {init}")


def stage_resume(args: argparse.Namespace, stage_dir: str) -> str | None:
    """--resume_from_checkpoint for one stage: "latest" resumes each stage's latest; a named one only its stage."""
    if args.resume_from_checkpoint in (None, "latest"):
        return args.resume_from_checkpoint
    named = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    return named if os.path.abspath(named).startswith(os.path.abspath(stage_dir) + os.sep) else None


def save_stage_lora(model: nn.Module, out_dir: str, component: str) -> None:
    """PEFT folder + diffusers file + kohya file, written to a temporary folder and renamed when complete."""
    with staged_output(out_dir, overwrite=True) as partial:
        os.makedirs(partial)
        save_lora_outputs(model, partial, component, peft_dir=partial)


def publish_last_stage(output_dir: str, stage: str) -> None:
    """Copy <output_dir>/stage<stage>/lora's files to <output_dir>; they change only once all are written."""
    final = os.path.join(output_dir, f"stage{stage}", "lora")
    with ExitStack() as stack:
        for name in os.listdir(final):
            shutil.copy2(os.path.join(final, name), stack.enter_context(atomic_write(os.path.join(output_dir, name))))
