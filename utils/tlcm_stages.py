"""The stage bookkeeping the two TLCM recipes share (`Stages`): whether the losses must act alike on every process,
a stage finished earlier, a stage's folder, seed, start LoRA and resume checkpoint, how its LoRA is saved, and the
last stage's files on top of the output folder."""

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
from .lora_files import PEFT_WEIGHTS_NAME, load_into_adapter, save_trained_lora
from .outputs import make_output_dir
from .sharding import splits_weights

logger = logging.getLogger(__name__)


class Stages:
    """One TLCM run's stages, each training the LoRA of the model `base` its methods take, saved as the denoiser
    `component` ("unet", "transformer")."""

    def __init__(self, args: argparse.Namespace, accelerator, component: str) -> None:
        self.args, self.accelerator, self.component = args, accelerator, component
        # sharded weights (FSDP, ZeRO-3) make every forward a collective: each process must run as many, so a
        # random choice that sets their number (a stage-1 segment) must be the same on every process
        self.collective = splits_weights(accelerator)

    def dir(self, stage: str) -> str:
        return os.path.join(self.args.output_dir, f"stage{stage}")

    def finished(self, base: nn.Module, stage: str) -> bool:
        """Whether the stage finished in an earlier run; then its LoRA is loaded (the next stage starts from it)."""
        done = os.path.join(self.dir(stage), "lora", PEFT_WEIGHTS_NAME)
        if not os.path.isfile(done):
            return False
        logger.info(f"stage {stage} already finished in {self.dir(stage)}: loading its LoRA")
        load_into_adapter(base, done)
        return True

    def start(self, base: nn.Module, stage: str, index: int, generator: torch.Generator) -> None:
        """Load the LoRA the stage starts from (--init_lora for the first stage run, else the previous stage's),
        create its folder (removed again if the stage ends before writing to it) and seed its random stream, each
        stage and process its own (a resumed stage then restores the checkpointed state)."""
        args = self.args
        init = args.init_lora if index == 0 else None
        if init is None and index == 0 and stage != "1":
            previous = os.path.join(self.dir("1" if stage == "2" else "2"), "lora")
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
        make_output_dir(self.dir(stage))
        generator.manual_seed(args.seed * 1000 + self.accelerator.process_index
                              + 7919 * (1 + list(TLCM_STAGES).index(stage)))

    def resume(self, stage: str) -> str | None:
        """--resume_from_checkpoint for the stage: "latest" resumes each stage's latest; a named one only its stage."""
        if self.args.resume_from_checkpoint in (None, "latest"):
            return self.args.resume_from_checkpoint
        named = resolve_resume(self.args.output_dir, self.args.resume_from_checkpoint)
        return named if os.path.abspath(named).startswith(os.path.abspath(self.dir(stage)) + os.sep) else None

    def save(self, base: nn.Module, stage: str) -> None:
        """Every process: the stage's LoRA (gathered where it is sharded), written by the main process."""
        save_trained_lora(self.accelerator, base, os.path.join(self.dir(stage), "lora"), self.component, staged=True)

    def copy_last_to_output(self) -> None:
        """Copy the last stage's LoRA files to --output_dir (main process); they change only once all are written."""
        final = os.path.join(self.dir(self.args.stages[-1]), "lora")
        with ExitStack() as stack:
            for name in os.listdir(final):
                target = os.path.join(self.args.output_dir, name)
                shutil.copy2(os.path.join(final, name), stack.enter_context(atomic_write(target)))
